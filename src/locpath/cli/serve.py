"""`locpath serve BUNDLE`: the HTTP service (FastAPI on uvicorn, or Ray Serve)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import LocpathError
from ..runtime.options import add_runtime_options, runtime_options
from ..serve.config import SERVE_RUNTIME
from .common import byte_size, positive_float, positive_int, retell, serve_data_dir

DEFAULTS = SERVE_RUNTIME  # a service meets the same slides again: more of them kept in memory
MAX_HEADER_BYTES = 64 << 10  # the request line and headers of one request to `locpath serve`


def register(sub) -> None:
    sv = sub.add_parser("serve", help="the HTTP service: slides by path, upload or DICOMweb; questions as JSON, "
                                      "server-sent events or OpenAI chat completions; a web page")
    sv.add_argument("bundle", help="a bundle folder (locpath export / build)")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (non-loopback needs an API key)")
    sv.add_argument("--port", type=positive_int, default=8000, help="port (default 8000)")
    sv.add_argument("--allowed-host", action="append", metavar="NAME",
                    help="a name clients reach the service by (repeatable). Requests whose Host header is not "
                         "localhost, 127.0.0.1, [::1], the --host address or such a name are refused (421), "
                         "against DNS rebinding: behind a proxy or on 0.0.0.0, name the host clients use")
    sv.add_argument("--data-dir", default=None, help="database, uploads, retrieved DICOM (default ~/.cache/locpath/serve)")
    sv.add_argument("--database", default=None, help="SQLAlchemy URL (default: SQLite in the data folder)")
    sv.add_argument("--slide-root", action="append", type=Path, help="a folder slides may be registered from by path "
                                                                     "(repeatable; symlinks are resolved first)")
    sv.add_argument("--dicomweb", default=None, metavar="URL", help="a DICOMweb server slides can be pulled from")
    sv.add_argument("--store-results", action="store_true",
                    help="store each answer about a slide pulled from --dicomweb back on that server (STOW-RS), as "
                         "a DICOM Structured Report and bulk annotations of the evidence tiles in the slide's study; "
                         "done after the answer, retried on failure; GET /v1/jobs/ID shows its status")
    sv.add_argument("--store-attempts", type=positive_int, default=4, metavar="N",
                    help="with --store-results: STOW-RS tries per answer, waiting 1, 2, 4, ... s between (default 4)")
    sv.add_argument("--init", action="store_true",
                    help="accept a database file that is empty or not locpath's (refused otherwise: its keys would "
                         "be gone); a missing file is always created")
    sv.add_argument("--plain-logs", action="store_true", help="human-readable logs instead of JSON lines")
    _add_limits(sv)
    _add_ray(sv)
    add_runtime_options(sv, DEFAULTS)
    retell(sv, "--decode-batch", "decode up to N clients' questions as one batch; a question joins as soon as a row "
                                 "is free (default 8; 1 = one at a time)")
    sv.set_defaults(func=run)


def _add_limits(sv) -> None:
    sv.add_argument("--max-upload-mb", type=positive_float, default=4096.0,
                    help="the largest upload in MiB (default 4096)")
    sv.add_argument("--upload-quota", type=byte_size, default=64 << 30, metavar="BYTES",
                    help="per API key: the most bytes its stored uploads may take (suffix K, M, G or T; default 64G); "
                         "more is refused with 413 while streaming; failed and deleted uploads free their share")
    sv.add_argument("--question-queue", type=positive_int, default=16, help="waiting questions before 429")
    sv.add_argument("--ingest-queue", type=positive_int, default=64, help="waiting slides before 429")
    sv.add_argument("--timeout", type=positive_float, default=120.0, help="seconds per question")
    sv.add_argument("--ingest-timeout", type=positive_float, default=7200.0, metavar="S",
                    help="seconds one slide's ingestion may take before it is failed (default 7200)")


def _add_ray(sv) -> None:
    sv.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment (a local cluster unless "
                                                       "--ray-address)")
    sv.add_argument("--ray-address", default=None, metavar="HOST:PORT", help="run on this Ray cluster")
    sv.add_argument("--replicas", type=positive_int, default=1, help="Ray Serve replicas (one per device)")
    sv.add_argument("--cpus-per-replica", type=positive_float, default=1.0, help="Ray: CPUs each replica reserves")
    sv.add_argument("--gpus-per-replica", type=float, default=0.0, help="Ray: GPUs each replica reserves")


def serve_config(args):
    from ..serve.config import ServeConfig

    return ServeConfig(bundle=Path(args.bundle), data_dir=serve_data_dir(args.data_dir), host=args.host,
                       port=args.port, slide_roots=args.slide_root or [], database=args.database,
                       dicomweb_url=args.dicomweb, store_results=args.store_results,
                       store_attempts=args.store_attempts, max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
                       question_queue=args.question_queue, upload_quota_bytes=args.upload_quota,
                       init_database=args.init, ingest_queue=args.ingest_queue, question_timeout_s=args.timeout,
                       ingest_timeout_s=args.ingest_timeout, log_json=not args.plain_logs,
                       allowed_hosts=args.allowed_host or [], runtime=runtime_options(args, DEFAULTS))


def run(args) -> int:
    try:
        import uvicorn

        from ..serve import logs
        from ..serve.app import create_app
        from ..serve.service import Service
    except ImportError as exc:
        raise LocpathError(f"`locpath serve` needs the serve extra (pip install 'locpath[serve]'): {exc}") from exc
    cfg = serve_config(args)
    logs.setup(cfg.log_json)
    if args.ray or args.ray_address:
        from ..serve.ray_app import run_on_ray

        print(f"locpath serve: {cfg.bundle} on Ray Serve ({args.replicas} replicas) at http://{cfg.host}:{cfg.port}",
              file=sys.stderr, flush=True)
        run_on_ray(cfg, args.replicas, args.ray_address, args.cpus_per_replica, args.gpus_per_replica)
        return 0
    service = Service(cfg)
    app = create_app(service)
    print(f"locpath serve: {cfg.bundle} on http://{cfg.host}:{cfg.port} (data {cfg.data_dir}; "
          f"{'API keys required' if service.auth_required else 'open: loopback only'})", file=sys.stderr,
          flush=True)
    # h11 bounds a request's header block (httptools takes headers of any size: memory for anyone who connects)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False, http="h11",
                h11_max_incomplete_event_size=MAX_HEADER_BYTES)
    return 0
