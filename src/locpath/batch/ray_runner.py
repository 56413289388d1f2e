"""A batch on a Ray cluster: a Ray Data pipeline over the slide paths whose map step is an actor pool, one
`SlideWorker` (a Pipeline loaded once) per worker, each given the CPUs and GPUs asked for. Records and features are
written by the workers onto the shared output folder, atomically per slide, and latents into the slide cache (a
folder all nodes see, safe for concurrent writers). Ray restarts a worker that dies and retries its slide; a slide
whose record exists is skipped, so a retried or repeated slide is recorded once.

    ray start --head --port 6379            # on the first node
    ray start --address HEAD:6379           # on every other node
    locpath batch BUNDLE --slides DIR --questions Q.txt --out OUT --ray-address HEAD:6379 --workers 8
(`--ray` alone starts a local cluster for this run.)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..raycluster import connect
from .job import run_slide
from .records import Output
from .progress import Progress
from .settings import BatchConfig


class SlideWorker:
    """The map step: constructed once per actor (loads the bundle), called with one slide at a time."""

    def __init__(self, bundle: str, out: str, questions: list[str], sampling: dict, cache_dir: str | None,
                 threads: int | None, device: str, trusted_keys: str | None, bundle_digest: str = ""):
        from ..runtime.pipeline import Pipeline

        self.pipe = Pipeline.from_bundle(bundle, trusted_keys=trusted_keys, device=device, threads=threads,
                                         cache_dir=cache_dir, memory_slides=1)
        self.out = Output(out, bundle=bundle_digest)
        self.questions, self.sampling = questions, sampling

    def __call__(self, batch: dict) -> dict:
        rows = [run_slide(self.pipe, self.out, Path(str(p)), self.questions, self.sampling) for p in batch["path"]]
        self.pipe.forget_slides()
        return {k: [r[k] for r in rows] for k in rows[0]}


def run_on_ray(cfg: BatchConfig, slides: list[Path], questions: list[str], out: Output) -> dict:
    started = connect(cfg.ray_address, "batch --ray")
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our progress line instead; Ray Data's own log stays in the session folder
    ctx.verbose_progress = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    threads = cfg.runtime.threads or max(1, int(cfg.cpus_per_worker))
    cache_dir = cfg.runtime.cache_dir
    ds = ray.data.from_items([{"path": str(p)} for p in slides], override_num_blocks=max(1, len(slides)))
    results = ds.map_batches(
        SlideWorker, batch_size=1, num_cpus=cfg.cpus_per_worker,
        compute=ray.data.ActorPoolStrategy(size=cfg.workers, max_tasks_in_flight_per_actor=1),
        num_gpus=cfg.gpus_per_worker or None,
        fn_constructor_kwargs=dict(bundle=str(Path(cfg.bundle).resolve()), out=str(out.dir.resolve()),
                                   questions=questions, sampling=cfg.sampling,
                                   cache_dir=str(Path(cache_dir).resolve()) if cache_dir else None,
                                   threads=threads, device=cfg.runtime.device, trusted_keys=cfg.runtime.trusted_keys,
                                   bundle_digest=out.bundle))
    # Ray Data's actor pools default to max_restarts=-1 and max_task_retries=-1: a worker that dies is restarted
    # and its slide retried (tests/test_batch.py kills one).
    prog = Progress(len(slides), cfg.progress)
    try:
        for row in results.iter_rows():
            prog.update({k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()})
    finally:
        if started:
            ray.shutdown()
    return dict(prog.close(), runner="ray", workers=cfg.workers, ray_address=cfg.ray_address or "local",
                pid=os.getpid())
