"""`locpath eval`: accuracy on held-out synthetic slides, through PyTorch (a checkpoint) or the runtime (a bundle)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LocpathError
from ..runtime.options import RuntimeOptions, add_runtime_options, runtime_options
from .common import positive_int, retell

DEFAULTS = RuntimeOptions()


def register(sub) -> None:
    e = sub.add_parser("eval", help="accuracy on held-out synthetic slides")
    e.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the shipped reference)")
    e.add_argument("--bundle", default=None, help="evaluate an exported bundle through the torch-free runtime "
                                                  "(the runtime flags below apply to it)")
    e.add_argument("--seed", type=int, default=1, help="held-out seed (default 1)")
    e.add_argument("--count", type=positive_int, default=20, help="held-out slides (default 20)")
    e.add_argument("--json", action="store_true", help="print the result as one JSON object")
    e.add_argument("--records", action="store_true", help="with --json: every question, answer and truth")
    e.add_argument("--keep-slides", default=None, help="keep the generated slides in this folder")
    add_runtime_options(e, DEFAULTS)
    retell(e, "--cache-dir", "cache the held-out slides' latents in this folder (default: no slide cache)")
    e.set_defaults(func=run)


def run(args) -> int:
    from ..checkpoints import shipped_checkpoint

    if args.bundle and args.checkpoint:
        raise LocpathError("give either --checkpoint or --bundle, not both")
    if args.bundle:
        from ..eval import evaluate_bundle

        ckpt = Path(args.bundle)
        # held-out slides are written fresh: a slide cache only where one is named
        options = runtime_options(args, DEFAULTS).replace(use_cache=args.use_cache and args.cache_dir is not None)
        res = evaluate_bundle(ckpt, args.seed, args.count, keep_dir=args.keep_slides, progress=not args.json,
                              options=options)
    else:
        from ..eval import evaluate_checkpoint

        ckpt = Path(args.checkpoint) if args.checkpoint else shipped_checkpoint("reference")
        res = evaluate_checkpoint(ckpt, args.seed, args.count, keep_dir=args.keep_slides, progress=not args.json)
    if args.json:
        print(json.dumps(res.to_dict(with_records=args.records)))
    else:
        print(f"checkpoint {ckpt}: {res.count} held-out slides (seed {res.seed}), {res.seconds:.0f} s")
        print(f"accuracy {res.accuracy:.3f}")
        for t, a in res.per_type.items():
            print(f"  {t:10s} {a:.3f}")
    return 0
