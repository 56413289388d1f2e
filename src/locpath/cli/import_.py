"""`locpath import`: a Hugging Face LLM folder (+ LoRA) and a release's state dicts -> a locpath checkpoint, through
a declarative key map (needs the training extra). The module is `import_` because `import` is a keyword."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import LocpathError
from .common import positive_float, quiet_if


def register(sub) -> None:
    im = sub.add_parser("import", help="a Hugging Face LLM folder (+ LoRA) and a release's state dicts -> a locpath "
                                       "checkpoint, through a declarative key map")
    im.add_argument("--llm", required=True, help="Hugging Face Qwen2/Llama folder (config.json, safetensors shards, "
                                                 "tokenizer.json, chat template)")
    im.add_argument("--out", required=True, help="checkpoint folder to create")
    im.add_argument("--lora", default=None, help="a PEFT adapter folder, or a LoRA state dict (PEFT key names)")
    im.add_argument("--lora-alpha", type=positive_float, default=None,
                    help="LoRA alpha of state-dict LoRA (default: the key map's, else alpha = rank)")
    im.add_argument("--release", default=None, help="a folder with mae.pth, stage1.pth, stage2.pth (or checkpoints/)")
    im.add_argument("--mae", default=None, help="the release's mae file (.pth/.safetensors; read first)")
    im.add_argument("--stage1", default=None, help="the release's stage1 file (read next; its tensors replace earlier ones)")
    im.add_argument("--stage2", default=None, help="the release's stage2 file (read last)")
    im.add_argument("--key-map", default=None, help="JSON key map (default: the shipped guess locpath-release-v1)")
    im.add_argument("--encoder", default=None, help="registered tile encoder (TRIDENT name, e.g. conch_v1)")
    im.add_argument("--encoder-weights", default=None, help="its local weights (.safetensors/.bin/.pth)")
    im.add_argument("--config", default=None, help="ModelConfig overrides: inline JSON or a JSON file")
    im.add_argument("--cara-layers", type=_layer_list, default=None,
                    help="LLM layers with CARA blocks, e.g. 3,10,17,24 (default: those the release fills)")
    im.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="checkpoint dtype (auto: float32 up to 2 B LLM parameters, bfloat16 above)")
    im.add_argument("--stream", choices=("auto", "on", "off"), default="auto",
                    help="write the checkpoint tensor by tensor from the LLM's shards, LoRA merged per tensor, never "
                         "holding the LLM (auto: above 2 B LLM parameters, where the in-memory import needs more than "
                         "a 24 GB machine has); `locpath export` then streams the decoder from it")
    im.add_argument("--chat-template", default=None, help="a Jinja chat template (default: the LLM folder's)")
    im.add_argument("--allow-missing", action="store_true",
                    help="keep adapter tensors no release file fills at random init (a deployment-shape test)")
    im.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint folder")
    im.add_argument("--json", action="store_true", help="print the import summary as one JSON object")
    im.set_defaults(func=run)


def run(args) -> int:
    try:
        from ..export.importer import ImportOptions, import_checkpoint, release_dir
    except ImportError as exc:
        raise LocpathError(f"import needs the training extra (pip install 'locpath[train]'): {exc}") from exc
    if args.release and (args.mae or args.stage1 or args.stage2):
        raise LocpathError("give either --release DIR or --mae/--stage1/--stage2 files, not both")
    release = release_dir(args.release) if args.release else \
        {k: Path(v) for k, v in (("mae", args.mae), ("stage1", args.stage1), ("stage2", args.stage2)) if v}
    if args.encoder_weights and not args.encoder:
        raise LocpathError("--encoder-weights needs --encoder NAME (which registered tile encoder they are)")
    opts = ImportOptions(
        llm=Path(args.llm), out=Path(args.out), lora=Path(args.lora) if args.lora else None,
        lora_alpha=args.lora_alpha, release=release, key_map=Path(args.key_map) if args.key_map else None,
        encoder=args.encoder, encoder_weights=Path(args.encoder_weights) if args.encoder_weights else None,
        config=_json_arg(args.config, "--config"), cara_layers=args.cara_layers, dtype=args.dtype,
        chat_template=Path(args.chat_template) if args.chat_template else None, allow_missing=args.allow_missing,
        overwrite=args.overwrite, stream=args.stream)
    summary = import_checkpoint(opts, log=quiet_if(args.json))
    if args.json:
        print(json.dumps(summary))
    return 0


def _json_arg(text: str | None, option: str):
    """--config: inline JSON (starting with '{') or a JSON file."""
    if text is None:
        return None
    raw = text
    if not text.lstrip().startswith("{"):
        from ..bundle.paths import read_bounded

        try:  # a regular file of at most 1 MiB: never a FIFO or device read for ever
            raw = read_bounded(Path(text), 1 << 20, f"{option} file").decode("utf-8")
        except UnicodeDecodeError as exc:
            raise LocpathError(f"{option} {text}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        shown = text[:80] if raw is text else text  # inline JSON cut short; a file named in full
        raise LocpathError(f"{option} {shown}: not valid JSON ({str(exc)[:200] or 'nested too deeply'})") from None
    if not isinstance(value, dict):
        raise LocpathError(f"{option}: a JSON object of ModelConfig fields, e.g. '{{\"resampler\": {{\"depth\": 1}}}}'")
    return value


def _layer_list(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of layer indices: {text!r}") from None
    if not layers or len(set(layers)) != len(layers) or min(layers) < 0:
        raise argparse.ArgumentTypeError(f"distinct non-negative layer indices, e.g. 3,10,17,24: {text!r}")
    return tuple(sorted(layers))
