"""`bench --published`: a Qwen2.5-7B-shaped bundle built from shards here, its build and runtime measured
(bench/published.py; JSON `published`); with `--slide FILE`, also a cold `ask` from that slide file and a second
question on it (bench/published_slide.py; JSON `published.from_slide`), each step in a process of its own; then
the same bundle with its vision graphs on OpenVINO and a synthetic 1k-tile slide (bench/published_vision.py; JSON
`published.openvino_vision`)."""

from __future__ import annotations

from ..suite import Context, Suite


def run(ctx: Context) -> dict:
    from ..published import bench_published

    return bench_published(ctx.cfg.workdir / "published", ctx.log, tiles=tuple(ctx.cfg.tiles or (1000, 10000)),
                           slide=ctx.cfg.slide, vision=ctx.cfg.published_vision,
                           synthetic_tiles=ctx.cfg.published_synthetic_tiles,
                           encoders=tuple(ctx.cfg.published_encoders))


SUITE = Suite("published", "published", run, flag="published", needs_torch=True,
              off="pass --published for a Qwen2.5-7B-shaped bundle built from shards here (first run writes ~15 GB "
                  "of shards and builds a ~5 GB bundle: minutes)")
