"""PNG images of a registered slide: its thumbnail with tissue and tiles, and a finished question's evidence as a
heatmap. Both read the slide file (blocking: routes call these from the threadpool)."""

from __future__ import annotations

import io

from .service import Service


def thumbnail_png(svc: Service, slide) -> bytes:
    from ..wsi import open_slide
    from ..wsi.overlay import write_overlay

    cached = svc.cfg.data_dir / "thumbnails" / f"{slide.id}.png"
    with svc.open_slide(slide.id) as f:  # also when cached: a swapped slide shows nothing
        if not cached.exists():
            with open_slide(f) as s:
                write_overlay(s, svc.pipe.plan_tiles(s), cached, max_size=768)
    return cached.read_bytes()


def evidence_png(svc: Service, slide, job: dict) -> bytes:
    """The heatmap of a finished question's evidence over the slide's thumbnail (recomputed from the latents in
    memory or the slide cache: the stored answer keeps only its top tiles). A slide whose latents are gone is sent
    back to ingestion (NotPrepared: 503), never encoded here."""
    from ..wsi import open_slide
    from ..wsi.overlay import evidence_image

    with svc.open_slide(slide.id) as f:
        ev = question_evidence(svc, slide, job, f)
        with open_slide(f) as s:
            img = evidence_image(s, ev.coords, ev.weights, ev.tile_size_level0, max_size=768)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def question_evidence(svc: Service, slide, job: dict, f):
    """The evidence of a finished question about the open slide `f` (also the viewer's heatmap: viewer.py)."""
    from ..runtime.pipeline import NotPrepared

    try:
        ctx = svc.pipe.prepare(f, cached_only=True)
    except NotPrepared:
        svc.reprepare(slide.id)
        raise
    return svc.pipe.evidence(ctx, svc.pipe.question_kv(ctx.latents, job["request"]["question"]))
