"""One small declarative export config per component (in the manner of optimum's OnnxConfig).

Each config names its graph inputs and outputs with symbolic axes, wraps the PyTorch piece in a module whose
forward takes exactly those inputs (flat tensors, no Python objects), and generates dummy inputs for any
axis sizes, so export and validation can run the same config on different shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..bundle import names
from ..bundle.decoder_io import DecoderContract, TensorDecl
from ..models.resampler import ResamplerChunks
from ..models.slide_llm import LocPathModel

DTYPES = {"uint8": torch.uint8, "float32": torch.float32, "int64": torch.int64, "bool": torch.bool}


TensorSpec = TensorDecl  # a graph input or output: name, dtype, shape (ints or symbolic axis names)


@dataclass
class ExportConfig:
    component: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    sample_dims: dict  # axis sizes used for tracing
    check_dims: list[dict]  # fresh axis sizes used for validation
    atol: float = 1e-4
    description: str = ""
    templates: dict = field(default_factory=dict)  # logical per-layer name -> graph name template
    fixed_args: int | None = None  # forward(a, b, c, *flat): the number of named args before *flat

    def module(self, model: LocPathModel) -> nn.Module:
        raise NotImplementedError

    def dummy_inputs(self, model: LocPathModel, dims: dict, seed: int = 0) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        out = {}
        for spec in self.inputs:
            shape = tuple(d if isinstance(d, int) else dims[d] for d in spec.shape)
            out[spec.name] = self.make_input(model, spec, shape, dims, g)
        return out

    def make_input(self, model, spec: TensorSpec, shape, dims, g) -> torch.Tensor:
        if spec.dtype == "uint8":
            return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        if spec.dtype == "int64":
            return torch.randint(0, model.llm.config.vocab_size, shape, generator=g)
        if spec.dtype == "bool":
            return torch.ones(shape, dtype=torch.bool)
        return torch.randn(shape, generator=g)

    def axes(self) -> set[str]:
        return {d for s in self.inputs + self.outputs for d in s.shape if isinstance(d, str)}


# -- tile encoder -----------------------------------------------------------------
class _TileEncoder(nn.Module):
    def __init__(self, m: LocPathModel | nn.Module):
        super().__init__()
        self.enc = _encoder_of(m)

    def forward(self, tiles):
        return self.enc.forward_uint8(tiles)


class TileEncoderExport(ExportConfig):
    def module(self, model):
        return _TileEncoder(model)


def _encoder_of(model):
    """The tile encoder of a slide model, or the model itself when it is a tile encoder (`build_tile_encoder`)."""
    enc = getattr(model, "tile_encoder", None)
    return model if enc is None else enc


def tile_encoder_config(model: LocPathModel | nn.Module) -> ExportConfig:
    """The tile encoder of `model` (a LocPathModel, or a bare encoder from `build_tile_encoder`) at its own tile size:
    uint8 NHWC (batch, img, img, 3) -> (batch, out_dim), the encoder's mean/std inside the graph."""
    c = _encoder_of(model).cfg
    return TileEncoderExport(
        component=names.TILE_ENCODER,
        inputs=[TensorSpec("tiles", "uint8", ("batch", c.img_size, c.img_size, 3))],
        outputs=[TensorSpec("features", "float32", ("batch", c.out_dim))],
        sample_dims={"batch": 2},
        check_dims=[{"batch": 1}, {"batch": 5}],
        description="uint8 NHWC tiles -> features; mean/std normalisation inside the graph",
    )


# -- resampler --------------------------------------------------------------------
class _Resampler(nn.Module):
    def __init__(self, m: LocPathModel):
        super().__init__()
        self.r = m.resampler

    def forward(self, tokens, positions, counts, token_mask):
        return self.r(tokens, positions, counts, token_mask, with_attention=True)


class ResamplerExport(ExportConfig):
    def module(self, model):
        return _Resampler(model)

    def make_input(self, model, spec, shape, dims, g):
        if spec.name == "positions":
            return torch.randint(0, 40, shape, generator=g).float()
        if spec.name == "counts":
            return torch.randint(1, 5, shape, generator=g).float()
        if spec.name == "token_mask":
            m = torch.ones(shape, dtype=torch.bool)
            if shape[0] > 1:
                m[1:, shape[1] // 2:] = False  # padded rows exercise the mask
            return m
        return super().make_input(model, spec, shape, dims, g)


def resampler_config(model: LocPathModel) -> ExportConfig:
    cfg = model.cfg
    return ResamplerExport(
        component=names.RESAMPLER,
        inputs=[
            TensorSpec("tokens", "float32", ("batch", "tokens", cfg.feature_dim)),
            TensorSpec("positions", "float32", ("batch", "tokens", 2)),
            TensorSpec("counts", "float32", ("batch", "tokens")),
            TensorSpec("token_mask", "bool", ("batch", "tokens")),
        ],
        outputs=[TensorSpec("latents", "float32", ("batch", cfg.resampler.num_latents, cfg.resampler.dim)),
                 TensorSpec("attention", "float32", ("batch", cfg.resampler.num_latents, "tokens"))],
        sample_dims={"batch": 2, "tokens": 17},
        check_dims=[{"batch": 1, "tokens": 5}, {"batch": 1, "tokens": 300}, {"batch": 3, "tokens": 40}],
        description="STM tokens (grid positions, member counts) -> L latents, and each latent's cross-attention over "
                    "the tokens (mean over heads and blocks: the evidence trail back to tiles)",
    )


# -- the resampler a chunk of tokens at a time ------------------------------------------------------------
class _ResamplerPartial(nn.Module):
    def __init__(self, m: LocPathModel):
        super().__init__()
        self.c = ResamplerChunks(m.resampler)

    def forward(self, latents, block, tokens, positions, counts, token_mask):
        return self.c.partial(latents, block, tokens, positions, counts, token_mask)


class _ResamplerWeights(_ResamplerPartial):
    def forward(self, latents, block, tokens, positions, counts, token_mask, m_ref, s_ref):
        return self.c.weights(latents, block, tokens, positions, counts, token_mask, m_ref, s_ref)


class _ResamplerFinish(_ResamplerPartial):
    def forward(self, latents, block, attended):
        return self.c.finish(latents, block, attended)


class ResamplerChunkExport(ResamplerExport):
    def __init__(self, module_cls: type, **kw):
        super().__init__(**kw)
        self.module_cls = module_cls

    def module(self, model):
        return self.module_cls(model)

    def make_input(self, model, spec, shape, dims, g):
        if spec.name == "block":
            return torch.randint(0, model.cfg.resampler.depth, shape, generator=g)
        return super().make_input(model, spec, shape, dims, g)

    def dummy_inputs(self, model, dims, seed=0):
        """As the runtime feeds them: the weights graph's m_ref/s_ref are the chunk's own (m, s) from the partial
        graph, so `weights` are softmax probabilities (random references would overflow, and check nothing)."""
        inputs = super().dummy_inputs(model, dims, seed)
        if "m_ref" in inputs:
            keys = ("latents", "block", "tokens", "positions", "counts", "token_mask")
            with torch.no_grad():
                m, s, *_ = ResamplerChunks(model.resampler).partial(*[inputs[k] for k in keys])
            inputs["m_ref"], inputs["s_ref"] = m, s
        return inputs


def resampler_chunk_configs(model: LocPathModel) -> list[ExportConfig]:
    """The three graphs of the chunked resampler (models.resampler.ResamplerChunks; run by
    runtime/resampler_chunks.py)."""
    cfg = model.cfg
    r = cfg.resampler
    lat = TensorSpec("latents", "float32", ("batch", r.num_latents, r.dim))
    chunk = [lat, TensorSpec("block", "int64", (1,)),
             TensorSpec("tokens", "float32", ("batch", "tokens", cfg.feature_dim)),
             TensorSpec("positions", "float32", ("batch", "tokens", 2)),
             TensorSpec("counts", "float32", ("batch", "tokens")),
             TensorSpec("token_mask", "bool", ("batch", "tokens"))]
    per_head = ("batch", r.num_heads, r.num_latents)
    attended = ("batch", r.num_heads, r.num_latents, r.dim // r.num_heads)
    checks = [{"batch": 1, "tokens": 5}, {"batch": 1, "tokens": 300}, {"batch": 2, "tokens": 40}]
    partial = ResamplerChunkExport(
        _ResamplerPartial, component=names.RESAMPLER_PARTIAL, inputs=chunk,
        outputs=[TensorSpec("m", "float32", per_head), TensorSpec("s", "float32", per_head),
                 TensorSpec("o", "float32", attended),
                 TensorSpec("p", "float32", ("batch", r.num_heads, r.num_latents, "tokens"))],
        sample_dims={"batch": 2, "tokens": 17}, check_dims=checks,
        atol=1e-3,  # `s` sums up to 300 exps (~3e2 for random tokens): 1e-3 is ~3e-6 relative
        description="one block's cross-attention over a chunk of STM tokens, for the online softmax: per head and "
                    "latent the max logit, the sum of exp, the chunk's own attention output and its exp(logit - max) "
                    "per token (the evidence map without a second pass)")
    weights = ResamplerChunkExport(
        _ResamplerWeights, component=names.RESAMPLER_WEIGHTS,
        inputs=chunk + [TensorSpec("m_ref", "float32", per_head), TensorSpec("s_ref", "float32", per_head)],
        outputs=[TensorSpec("weights", "float32", ("batch", r.num_latents, "tokens"))],
        sample_dims={"batch": 2, "tokens": 17}, check_dims=checks,
        description="one block's attention probabilities over a chunk (mean over heads), given the whole slide's "
                    "max logit and sum of exp")
    finish = ResamplerChunkExport(
        _ResamplerFinish, component=names.RESAMPLER_FINISH,
        inputs=[lat, TensorSpec("block", "int64", (1,)), TensorSpec("attended", "float32", attended)],
        outputs=[TensorSpec("latents_out", "float32", lat.shape), TensorSpec("latents_normed", "float32", lat.shape),
                 TensorSpec("initial_latents", "float32", lat.shape)],
        sample_dims={"batch": 2}, check_dims=[{"batch": 1}, {"batch": 3}],
        description="the rest of a resampler block from its merged cross-attention output; the final norm; and the "
                    "learned latents block 0 starts from")
    return [partial, weights, finish]


# -- TIS --------------------------------------------------------------------------
class _TIS(nn.Module):
    def __init__(self, m: LocPathModel):
        super().__init__()
        self.tis = m.tis

    def forward(self, latents, question_ids, question_mask):
        return self.tis(latents, question_ids, question_mask)


class TISExport(ExportConfig):
    def module(self, model):
        return _TIS(model)

    def make_input(self, model, spec, shape, dims, g):
        if spec.name == "question_mask":
            m = torch.ones(shape, dtype=torch.int64)
            if shape[0] > 1:
                m[1:, : shape[1] // 2] = 0  # left padding
            return m
        rows = getattr(model.tis, "stand_in_rows", None)  # export/tis_shared.py: a stand-in for the LLM's table
        if spec.name == "question_ids" and rows:
            return torch.randint(0, rows, shape, generator=g)
        return super().make_input(model, spec, shape, dims, g)


def tis_config(model: LocPathModel) -> ExportConfig:
    cfg = model.cfg
    return TISExport(
        component=names.TIS,
        inputs=[
            TensorSpec("latents", "float32", ("batch", cfg.resampler.num_latents, cfg.resampler.dim)),
            TensorSpec("question_ids", "int64", ("batch", "question_len")),
            TensorSpec("question_mask", "int64", ("batch", "question_len")),
        ],
        outputs=[TensorSpec("scores", "float32", ("batch", cfg.resampler.num_latents))],
        sample_dims={"batch": 2, "question_len": 7},
        check_dims=[{"batch": 1, "question_len": 3}, {"batch": 4, "question_len": 12}],
        description="latents x question -> one score per latent; top-M and sigmoid weighting run in the runtime",
    )


# -- cross-KV ---------------------------------------------------------------------
class _CrossKV(nn.Module):
    def __init__(self, m: LocPathModel):
        super().__init__()
        self.cara = m.cara

    def forward(self, selected_latents):
        kv = self.cara.cross_kv(selected_latents)
        out = []
        for i in self.cara.layer_ids:
            out.extend(kv[i])
        return tuple(out)


class CrossKVExport(ExportConfig):
    def module(self, model):
        return _CrossKV(model)


def cross_kv_config(model: LocPathModel) -> ExportConfig:
    cfg = model.cfg
    contract = plain_decoder_contract(model)
    return CrossKVExport(
        component=names.CROSS_KV,
        inputs=[TensorSpec("selected_latents", "float32", ("batch", "selected", cfg.resampler.dim))],
        outputs=contract.cross_outputs(),
        sample_dims={"batch": 2, "selected": cfg.tis.top_m},
        check_dims=[{"batch": 1, "selected": cfg.tis.top_m}, {"batch": 3, "selected": cfg.tis.top_m}],
        description="the M selected latents -> cross keys/values of every CARA layer, once per question",
        templates={"cross_key": "cross_key.{layer}", "cross_value": "cross_value.{layer}",
                   "layers": list(model.cara.layer_ids)},
    )


# -- decoder ----------------------------------------------------------------------
class _Decoder(nn.Module):
    """input ids + positions + mask + flat past K/V + flat cross K/V -> logits + flat present K/V."""

    def __init__(self, m: LocPathModel):
        super().__init__()
        self.llm = m.llm
        self.cara = m.cara
        self.n_layers = m.llm.config.num_hidden_layers
        self.cara_layers = m.cara.layer_ids

    def forward(self, input_ids, attention_mask, position_ids, *flat):
        from transformers import DynamicCache

        n = self.n_layers
        past, cross = flat[: 2 * n], flat[2 * n:]
        cache = DynamicCache(config=self.llm.config)
        for j in range(n):
            cache.update(past[2 * j], past[2 * j + 1], j)
        kv = {i: (cross[2 * k], cross[2 * k + 1]) for k, i in enumerate(self.cara_layers)}
        with self.cara.visual_context(kv):
            out = self.llm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           cache=cache, use_cache=True)
        present = []
        for j in range(n):
            present += [out.cache.layers[j].keys, out.cache.layers[j].values]
        return (out.logits, *present)


class DecoderExport(ExportConfig):
    def module(self, model):
        return _Decoder(model)

    def dummy_inputs(self, model, dims, seed=0):
        g = torch.Generator().manual_seed(seed)
        b, s, p = dims["batch"], dims["sequence"], dims["past"]
        out = {
            "input_ids": torch.randint(0, model.llm.config.vocab_size, (b, s), generator=g),
            "attention_mask": torch.ones(b, p + s, dtype=torch.int64),
            "position_ids": (torch.arange(s) + p).unsqueeze(0).repeat(b, 1),
        }
        if b > 1 and p > 1:
            out["attention_mask"][1:, : p // 2] = 0  # left padding inside the past
            out["position_ids"][1:] -= p // 2
        for spec in self.inputs[3:]:
            shape = tuple(d if isinstance(d, int) else dims[d] for d in spec.shape)
            out[spec.name] = torch.randn(shape, generator=g) * 0.5
        return out


def plain_decoder_contract(model: LocPathModel) -> DecoderContract:
    c = model.llm.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    ch = model.cfg.cara.num_heads
    return DecoderContract(kind="plain", num_layers=c.num_hidden_layers, num_kv_heads=c.num_key_value_heads,
                           head_dim=hd, vocab=c.vocab_size, cara_layers=tuple(model.cara.layer_ids), cara_heads=ch,
                           cara_head_dim=model.hidden // ch)


def decoder_config(model: LocPathModel) -> ExportConfig:
    contract = plain_decoder_contract(model)
    m = model.cfg.tis.top_m
    return DecoderExport(
        component=names.DECODER,
        inputs=contract.inputs(),
        outputs=contract.outputs(),
        sample_dims={"batch": 2, "sequence": 3, "past": 5, "total": 8, "selected": m},
        check_dims=[{"batch": 1, "sequence": 9, "past": 0, "total": 9, "selected": m},
                    {"batch": 1, "sequence": 1, "past": 12, "total": 13, "selected": m},
                    {"batch": 3, "sequence": 1, "past": 4, "total": 5, "selected": m},
                    {"batch": 2, "sequence": 4, "past": 6, "total": 10, "selected": m}],
        description="one graph for prefill (past 0) and decode; self K/V in and out; cross K/V fixed per question",
        templates=contract.to_templates(),
        fixed_args=3,
    )


def vision_configs(model: LocPathModel) -> list[ExportConfig]:
    """Every graph before the decoder (what a streamed bundle exports from its skeleton too)."""
    return [tile_encoder_config(model), resampler_config(model), *resampler_chunk_configs(model), tis_config(model),
            cross_kv_config(model)]


def export_configs(model: LocPathModel) -> list[ExportConfig]:
    return [*vision_configs(model), decoder_config(model)]
