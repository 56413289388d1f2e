"""`locpath serve --ray`: the same FastAPI app as a Ray Serve deployment, one replica per device. Each replica builds
its own Service (a Pipeline, its worker lanes) when Ray starts it; all replicas share the job store (PostgreSQL by URL
across nodes, or the SQLite file on one node) and the slide cache (a folder every node sees), so a slide ingested
by one replica is answered by any other from the cache. Ingestion jobs are claimed in the database: of several
replicas one runs each job, and a job whose replica stopped answering for a minute is taken over by another.

    ray start --head --port 6379                   # then, on other nodes: ray start --address HEAD:6379
    locpath serve BUNDLE --ray --ray-address HEAD:6379 --replicas 4 --database postgresql+psycopg://... \\
        --data-dir /shared/locpath --cache-dir /shared/locpath/slides --host 0.0.0.0
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket

from ..errors import LocpathError
from ..raycluster import connect
from .app import create_app
from .config import ServeConfig
from .service import Service, open_checked


def _replica_name() -> str:
    """This replica's name in the job table: Ray Serve's unique replica id (a restarted replica gets a new one, and
    its unfinished jobs are taken over once its heartbeat is stale)."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return f"ray:{serve.get_replica_context().replica_tag}"
    except RayServeException:  # outside a replica (never in practice): still unique per process
        return f"ray:{socket.gethostname()}:{os.getpid()}"


def check_in_driver(cfg: ServeConfig) -> None:
    """What can be checked without loading a model, here where an error can be shown: the settings, the data
    folder, the database (opened, migrated, the key rule) and the bundle's manifest, checksum list and signature
    (the files' hashes are checked by each replica as it loads them)."""
    from ..bundle.integrity import TrustedKeys, verify_bundle

    open_checked(cfg).close()
    verify_bundle(cfg.bundle, trusted_keys=TrustedKeys.from_setting(cfg.runtime.trusted_keys), check_files=False)


def run_on_ray(cfg: ServeConfig, replicas: int, ray_address: str | None, cpus: float, gpus: float) -> None:
    try:
        from ray import serve
    except ImportError:
        raise LocpathError("serve --ray needs Ray Serve (pip install 'locpath[cluster]')") from None
    check_in_driver(cfg)
    started = connect(ray_address, "serve --ray")
    app = create_app(cfg=cfg, build=lambda: Service(cfg, owner=_replica_name()))

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
                      max_ongoing_requests=max(cfg.question_queue, 8), health_check_period_s=5)
    @serve.ingress(app)
    class LocpathReplica:
        def __init__(self):  # the Service (every ONNX session) is built here, on the replica, once
            app.state.service.ensure().start()

        def __del__(self):
            try:
                app.state.service.stop()
            except Exception:  # the replica is going away anyway
                pass

    logging.getLogger("ray.serve").setLevel(logging.WARNING)

    def _stop(signum, frame):  # SIGTERM (systemd, docker stop) ends the app and its replicas like Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(LocpathReplica.bind(), name="locpath", route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        with contextlib.suppress(Exception):  # nothing was deployed if the start failed
            serve.delete("locpath")
        if started:
            serve.shutdown()
            import ray

            ray.shutdown()
