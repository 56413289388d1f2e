"""`locpath export OUT`: a checkpoint exported to a validated ONNX bundle (needs the training extra)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LocpathError
from .common import non_negative_int, quiet_if


def register(sub) -> None:
    x = sub.add_parser("export", help="export a checkpoint to a validated ONNX bundle")
    x.add_argument("out", help="bundle folder to create")
    x.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the shipped reference)")
    x.add_argument("--no-validate", action="store_true", help="skip the comparison with PyTorch")
    x.add_argument("--stream-decoder", choices=("auto", "int4", "fp32", "off"), default="auto",
                   help="write the decoder straight from the checkpoint's weights, one matrix at a time, at this "
                        "precision, never building the LLM (auto: int4 for LLMs above 2 B parameters, whose fp32 "
                        "model would not fit in memory; such a bundle has only the fused decoder)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    x.add_argument("--json", action="store_true", help="print the export summary as one JSON object")
    x.add_argument("--fit-trust", type=non_negative_int, nargs=2, default=None, metavar=("TRAIN_SEED", "VAL_SEED"),
                   help="then fit the bundle's trust.json (as `locpath trust fit` with these seeds, 100 training and "
                        "150 validation slides): train with the seed the checkpoint was trained with")
    x.set_defaults(func=run)


def run(args) -> int:
    from ..checkpoints import shipped_checkpoint

    try:
        from ..export.bundle import export_bundle
    except ImportError as exc:
        raise LocpathError(f"export needs the training extra (pip install 'locpath[train]'): {exc}") from exc
    ckpt = Path(args.checkpoint) if args.checkpoint else shipped_checkpoint("reference")
    log = quiet_if(args.json)
    stream = args.stream_decoder
    if stream == "auto":
        from ..export.streamed import STREAM_ABOVE_PARAMS, llm_parameters
        from ..models.checkpoint import read_config

        stream = "int4" if llm_parameters(read_config(ckpt).llm) > STREAM_ABOVE_PARAMS else "off"
    if stream != "off":
        from ..export.streamed import export_checkpoint_streamed

        _, summary = export_checkpoint_streamed(ckpt, args.out, quant=stream, validate=not args.no_validate,
                                                overwrite=args.overwrite, log=log)
    else:
        _, summary = export_bundle(ckpt, args.out, validate=not args.no_validate, overwrite=args.overwrite, log=log)
    if args.fit_trust is not None:
        from ..trust.fit import fit_bundle

        model, _ = fit_bundle(args.out, args.fit_trust[0], args.fit_trust[1], 100, 150, progress=not args.json)
        summary = dict(summary, trust={"temperature": model.temperature, "ood_threshold": model.ood.threshold,
                                       "min_tissue_tiles": model.min_tissue_tiles})
    if args.json:
        print(json.dumps(summary))
    return 0
