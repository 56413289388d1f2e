"""One typed config for every size of the model, from the tiny reference to the published scale.

Plain dataclasses with to_dict/from_dict, importable without torch: the runtime reads the same config
from a bundle manifest that training wrote into a checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import ConfigError


@dataclass
class TileEncoderConfig:
    """The tile encoder, always built by timm (`models/encoders.py`).

    family "vit": timm's plain VisionTransformer from the sizes below (the tiny reference). Any other family is a
    registered encoder under TRIDENT's name (`locpath.encoders`: conch_v1, uni_v1, uni_v2, virchow2, hoptimus0,
    hoptimus1, gigapath): timm's own definition of it, whose sizes, tile size and normalisation this config must
    repeat (checked when the model is built; `models.encoders.encoder_config(name, depth=None)` writes them) and
    whose depth may be smaller (tests). mlp_ratio, class_token, global_pool, layer_scale_init and head_always apply
    to family "vit" only: a registered encoder's timm definition fixes them.
    """

    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    class_token: bool = True
    global_pool: str = "token"  # "token" (CLS) or "avg"
    layer_scale_init: float | None = None  # UNI uses 1e-5 (adds blocks.i.ls1/ls2.gamma)
    out_dim: int = 512  # features per tile; a `head` Linear when != embed_dim or `head_always`
    head_always: bool = False
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    name: str = "vit"  # what feature files carry: TRIDENT's name for a registered encoder
    family: str = "vit"

    @property
    def has_head(self) -> bool:
        """Family "vit": a `head` Linear to out_dim. Registered encoders pool as their definition says."""
        return self.family == "vit" and (self.head_always or self.out_dim != self.embed_dim)

    def validate(self):
        if not isinstance(self.family, str) or not self.family:
            raise ConfigError(f"tile encoder: family must be 'vit' or a registered encoder name, got {self.family!r}")
        if self.img_size % self.patch_size:
            raise ConfigError(f"tile encoder: img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"tile encoder: embed_dim {self.embed_dim} not divisible by num_heads {self.num_heads}")
        if self.global_pool not in ("token", "avg"):
            raise ConfigError(f"tile encoder: global_pool must be 'token' or 'avg', got {self.global_pool!r}")
        if self.global_pool == "token" and not self.class_token:
            raise ConfigError("tile encoder: global_pool 'token' needs class_token")


@dataclass
class STMConfig:
    """Sparse Token Merger: merge near-duplicate tiles inside small spatial windows."""

    window: int = 2  # merge only inside window x window blocks of the tile grid
    threshold: float = 0.95  # cosine similarity needed to merge
    enabled: bool = True


@dataclass
class ResamplerConfig:
    dim: int = 1024
    num_latents: int = 128
    depth: int = 2
    num_heads: int = 8
    mlp_ratio: float = 4.0
    mae_mask_ratio: float = 0.6
    mae_decoder_depth: int = 1


@dataclass
class TISConfig:
    top_m: int = 96
    question_dim: int = 256  # the scorer's own question embedding width


@dataclass
class LLMConfig:
    """A Hugging Face decoder-only LLM (Qwen2/Llama family), built from these values or loaded from a folder."""

    architecture: str = "qwen2"  # "qwen2" or "llama"
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    max_position_embeddings: int = 32768
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    pretrained_path: str | None = None  # a local HF directory; overrides the sizes above when set


@dataclass
class CARAConfig:
    """Cross-Attention Routing Adapter: gated cross-attention in a few decoder layers."""

    layers: tuple[int, ...] = (3, 10, 17, 24)
    num_heads: int = 28
    ffn_mult: float = 2.0
    gate_init: float = 0.0  # tanh(gate) scales the adapter; 0 leaves the LLM untouched at start


@dataclass
class PrefixConfig:
    """The brute-force baseline: every tile token projected into the LLM's input (SlideChat/LLaVA-style)."""

    projector_hidden: int = 4096


@dataclass
class ModelConfig:
    preset: str = "published"
    fusion: str = "cara"  # "cara" (LoC-Path) or "prefix" (baseline)
    tile_encoder: TileEncoderConfig = field(default_factory=TileEncoderConfig)
    stm: STMConfig = field(default_factory=STMConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    tis: TISConfig = field(default_factory=TISConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    cara: CARAConfig = field(default_factory=CARAConfig)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    target_mpp: float = 0.5
    max_answer_tokens: int = 16

    @property
    def feature_dim(self) -> int:
        return self.tile_encoder.out_dim

    def validate(self) -> "ModelConfig":
        self.tile_encoder.validate()
        if self.fusion not in ("cara", "prefix"):
            raise ConfigError(f"fusion must be 'cara' or 'prefix', got {self.fusion!r}")
        if self.tis.top_m > self.resampler.num_latents:
            raise ConfigError(f"TIS top_m {self.tis.top_m} exceeds num_latents {self.resampler.num_latents}")
        if self.resampler.dim % self.resampler.num_heads:
            raise ConfigError("resampler: dim not divisible by num_heads")
        if self.llm.pretrained_path is None:
            bad = [i for i in self.cara.layers if not 0 <= i < self.llm.num_hidden_layers]
            if bad:
                raise ConfigError(f"CARA layers {bad} outside the LLM's {self.llm.num_hidden_layers} layers")
            if self.llm.hidden_size % self.cara.num_heads:
                raise ConfigError("CARA: LLM hidden size not divisible by cara.num_heads")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return _from_dict(cls, d).validate()


def _from_dict(cls, d):
    if not isinstance(d, dict):
        raise ConfigError(f"{cls.__name__}: expected a mapping, got {type(d).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(names)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
    kwargs = {}
    for k, v in d.items():
        f = names[k]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            kwargs[k] = _from_dict(type(default), v)
        elif isinstance(v, list):
            kwargs[k] = tuple(v)
        else:
            kwargs[k] = v
    return cls(**kwargs)


def preset(name: str, fusion: str = "cara") -> ModelConfig:
    """`tiny`: the trained reference. `published`: LoC-Path's published scale (random weights only here)."""
    if name == "published":
        cfg = ModelConfig(preset="published", fusion=fusion)
    elif name == "tiny":
        cfg = ModelConfig(
            preset="tiny",
            fusion=fusion,
            tile_encoder=TileEncoderConfig(embed_dim=96, depth=3, num_heads=4, out_dim=64, name="locpath-tiny-vit"),
            stm=STMConfig(window=2, threshold=0.97),
            resampler=ResamplerConfig(dim=128, num_latents=32, depth=2, num_heads=4, mlp_ratio=2.0),
            tis=TISConfig(top_m=16, question_dim=64),
            llm=LLMConfig(
                vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                rope_theta=10000.0, tie_word_embeddings=True,
            ),
            cara=CARAConfig(layers=(1, 3), num_heads=4, ffn_mult=2.0, gate_init=0.1),
            prefix=PrefixConfig(projector_hidden=256),
        )
    else:
        raise ConfigError(f"unknown preset {name!r} (tiny or published)")
    return cfg.validate()
