"""How a Pipeline runs on this machine, in one place: `RuntimeOptions` is what `Pipeline.from_bundle` takes and what
the service's and the batch's configs embed, and `add_runtime_options` gives every command the same flags with the
same names, checks and help (they drifted when each command retyped them).

    parser = argparse.ArgumentParser(); add_runtime_options(parser)
    pipe = Pipeline.from_bundle(args.bundle, runtime_options(args))
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from ..errors import ConfigError
from .resampler_chunks import RESAMPLER_CHUNK

DEVICES = ("cpu", "cuda", "tensorrt")
DECODER_CHOICES = ("auto", "fused", "plain")


@dataclass(frozen=True)
class RuntimeOptions:
    """Everything about how a bundle runs, nothing about what it answers (sampling is per question)."""
    device: str = "cpu"  # ONNX Runtime execution provider: cpu, cuda or tensorrt
    threads: int | None = None  # intra-op threads per session (None: every core)
    decoder: str = "auto"  # which decoder graph: auto, fused or plain
    decode_batch: int = 8  # the most answers decoded together as one batch
    cache_dir: str | None = None  # the slide cache folder (None: ~/.cache/locpath/slides)
    use_cache: bool = True  # read and write the slide cache
    memory_slides: int = 8  # slides whose latents stay in memory (least recently used go first)
    tile_batch: int = 32  # tiles per encoder call
    reader_workers: int = 2  # threads reading tiles ahead of the encoder
    prefill_graph: bool = True  # prompts on the bundle's decoder_fused_prefill graph when it has one
    resampler_chunk: int = RESAMPLER_CHUNK  # chunked resampler above this many STM tokens (0: never)
    decoder_spin: bool = True  # the decoder's intra-op threads spin between its back-to-back calls
    warmup: bool = True  # sessions made and each graph but the tile encoder run once at load, not in the 1st question
    trusted_keys: str | None = None  # Ed25519 public keys a bundle must be signed by ($LOCPATH_TRUSTED_KEYS)

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ConfigError(f"unknown device {self.device!r} (choose from {', '.join(DEVICES)})")
        if self.decoder not in DECODER_CHOICES:
            raise ConfigError(f"unknown decoder {self.decoder!r} (choose from {', '.join(DECODER_CHOICES)})")
        for name, low in (("threads", 1), ("decode_batch", 1), ("memory_slides", 0), ("tile_batch", 1),
                          ("reader_workers", 1), ("resampler_chunk", 0)):
            v = getattr(self, name)
            if v is None and name == "threads":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {v!r}")

    def replace(self, **changes) -> "RuntimeOptions":
        """These options with some changed (unknown names refused: a typo would otherwise be ignored)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown runtime options {sorted(unknown)}")
        return dataclasses.replace(self, **changes)


def int_at_least(low: int):
    """An argparse type: an integer >= `low`, else one line saying which (the CLI's flags use it too)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}: {text!r}")
        return v
    parse.__name__ = "integer"
    return parse


def add_runtime_options(parser: argparse.ArgumentParser, defaults: RuntimeOptions = RuntimeOptions()) -> None:
    """The runtime flags, under their own heading in --help; `defaults` lets a command start elsewhere (the
    service keeps more slides in memory, a batch fewer)."""
    g = parser.add_argument_group("runtime", "how the bundle runs on this machine")
    g.add_argument("--device", choices=DEVICES, default=defaults.device,
                   help=f"ONNX Runtime execution provider; cuda/tensorrt need onnxruntime-gpu (default {defaults.device})")
    g.add_argument("--threads", type=int_at_least(1), default=defaults.threads, metavar="N",
                   help="intra-op threads per graph (default: all cores)")
    g.add_argument("--decoder", choices=DECODER_CHOICES, default=defaults.decoder,
                   help="decoder graph: fused (GroupQueryAttention, ONNX Runtime) when the bundle has one and the "
                        f"device runs it, or plain (default {defaults.decoder})")
    g.add_argument("--decode-batch", type=int_at_least(1), default=defaults.decode_batch, metavar="N",
                   help="decode up to N answers as one batch; answers equal one-by-one answers; 1 = one at a time "
                        f"(default {defaults.decode_batch})")
    g.add_argument("--cache-dir", default=defaults.cache_dir, metavar="DIR",
                   help="slide cache folder (default ~/.cache/locpath/slides)")
    g.add_argument("--no-cache", dest="use_cache", action="store_false", default=defaults.use_cache,
                   help="do not read or write the slide cache")
    g.add_argument("--memory-slides", type=int_at_least(0), default=defaults.memory_slides, metavar="N",
                   help=f"slides whose latents stay in memory, least recently used dropped first "
                        f"(default {defaults.memory_slides})")
    g.add_argument("--tile-batch", type=int_at_least(1), default=defaults.tile_batch, metavar="N",
                   help=f"at most N tiles per tile-encoder call; a ViT with large tiles takes fewer, so one call's "
                        f"activations stay within 96 MiB (CONCH v1 at 448 px: 2) (default {defaults.tile_batch})")
    g.add_argument("--no-warmup", dest="warmup", action="store_false", default=defaults.warmup,
                   help="do not make the sessions and run each graph once at load (the first question then pays "
                        "ONNX Runtime's session creation: reading and prepacking the decoder's weights)")
    g.add_argument("--trusted-keys", default=defaults.trusted_keys, metavar="PEM_OR_DIR",
                   help="run only bundles signed by one of these Ed25519 public keys (default: $LOCPATH_TRUSTED_KEYS; "
                        "unset = signatures not required)")


def runtime_options(args: argparse.Namespace, defaults: RuntimeOptions = RuntimeOptions()) -> RuntimeOptions:
    """The options `add_runtime_options` parsed (fields it does not expose keep `defaults`)."""
    names = ("device", "threads", "decoder", "decode_batch", "cache_dir", "use_cache", "memory_slides", "tile_batch",
             "warmup", "trusted_keys")
    return defaults.replace(**{n: getattr(args, n) for n in names if hasattr(args, n)})
