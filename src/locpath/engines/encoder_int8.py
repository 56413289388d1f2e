"""The safe INT8 tile encoder (OpenVINO + NNCF): INT8 where it keeps every tile close to fp32, float where it does not.

A mean feature cosine hides the tiles an INT8 encoder breaks, so the bound is on the *minimum* per-tile cosine
against the fp32 graph (ONNX Runtime), over calibration tiles and tiles held out of calibration. The recipe:

1. NNCF post-training INT8 (transformer model type: LayerNorm, Softmax, GELU and residual adds stay float) on
   the calibration tiles, with the held-out tiles (every `held_out_every`-th one) never seen by the calibrator.
2. Measure the per-tile cosine at both OpenVINO precision hints (the float ops between the INT8 ones run at the
   hint, so the hint changes accuracy as well as speed).
3. While the bound fails: rank the encoder's layer groups by sensitivity, measured, not guessed (each group's
   activation quantizers removed from the quantized model alone, then the minimum cosine of the worst tiles), keep
   the most sensitive groups in float (NNCF's ignored scope) and quantize again.
The fastest hint that holds the bound is kept; if no tried set holds it, the build fails with the best it reached.
Everything measured goes into the manifest (quantization info).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import LocpathError

MIN_TILE_COSINE = 0.995


@dataclass(frozen=True)
class Int8SafeConfig:
    """How the safe INT8 encoder is made. `preset` "performance" (symmetric activations) measured better than
    "mixed" (asymmetric) on ViT-B: minimum tile cosine 0.9966 vs 0.9923. SmoothQuant alpha 0.5 on the MatMuls
    measured best: 0.9990 vs 0.9966 at NNCF's transformer default (0.95) and 0.9986 without SmoothQuant, at the same
    speed (ViT-B/16, 23 real H&E + 48 synthetic calibration tiles, 22 + 48 held out). None keeps NNCF's default. `float_groups`: layer groups kept float from the start (names as
    `layer_groups` gives them, e.g. "attention_matmuls", "block0")."""

    min_cosine: float = MIN_TILE_COSINE
    preset: str = "performance"
    smooth_quant_alpha: float | None = 0.5
    held_out_every: int = 4
    float_groups: tuple[str, ...] = ()
    max_rounds: int = 3
    groups_per_round: int = 2
    hints: tuple[str, ...] = ("bf16", "f32")
    batch: int = 16
    rank_tiles: int = 8  # sensitivity is measured on the worst tiles only (the bound is on the worst)


@dataclass
class EncoderLayer:
    name: str  # the ONNX node name (OpenVINO keeps it as the op's friendly name)
    role: str  # qkv, attn_scores, attn_values, proj, fc1, fc2, patch_embed, head
    block: int  # transformer block, -1 outside the blocks


@dataclass
class Check:
    hint: str
    cosines: np.ndarray
    held_out: np.ndarray = field(repr=False)

    def summary(self) -> dict:
        c, h = self.cosines, self.held_out
        return {"cosine_min": float(c.min()), "cosine_mean": float(c.mean()),
                "calibration_min": float(c[~h].min()), "calibration_mean": float(c[~h].mean()),
                "held_out_min": float(c[h].min()) if h.any() else None,
                "held_out_mean": float(c[h].mean()) if h.any() else None}


def held_out_mask(n: int, every: int = 4) -> np.ndarray:
    """Which of n calibration tiles the recipe holds out of calibration (every `every`-th): only checked."""
    held = np.zeros(n, bool)
    held[every - 1::every] = True
    return held


def encoder_layers(onnx_path: Path) -> list[EncoderLayer]:
    """Every MatMul/Gemm/Conv of a ViT tile-encoder graph with its role and block, read from the graph's structure
    (exporters name nodes node_MatMul_12, not after modules): a block starts at its first LayerNorm; weight matmuls
    fed by LayerNorms are qkv then fc1, by GELU fc2, otherwise proj; activation x activation matmuls are attention."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    consts = {i.name for i in m.graph.initializer}
    consts |= {o for n in m.graph.node if n.op_type == "Constant" for o in n.output}
    producer = {o: n for n in m.graph.node for o in n.output}

    def source(name: str):
        """The first producer that is not a reshape-like pass-through."""
        n = producer.get(name)
        while n is not None and n.op_type in ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Cast", "Identity"):
            n = producer.get(n.input[0])
        return n

    blocks = sum(1 for n in m.graph.node if n.op_type == "LayerNormalization") // 2  # 2 per block + final
    layers, norms, after_norm = [], 0, {}
    for n in m.graph.node:
        if n.op_type == "LayerNormalization":
            norms += 1
        if n.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        block = (norms - 1) // 2 if norms else -1
        src = source(n.input[0])
        w = source(n.input[1])
        if n.op_type == "Conv":
            role, block = "patch_embed", -1
        elif norms > 2 * blocks:  # after the final norm
            role, block = "head", -1
        elif n.input[1] not in consts and w is not None and w.op_type != "Constant":
            role = "attn_values" if src is not None and src.op_type == "Softmax" else "attn_scores"
        elif src is not None and src.op_type == "Gelu":
            role = "fc2"
        elif src is not None and src.op_type == "LayerNormalization":
            seen = after_norm.get(block, 0)
            role = ("qkv", "fc1")[min(seen, 1)]
            after_norm[block] = seen + 1
        else:
            role = "proj"
        layers.append(EncoderLayer(n.name, role, block))
    return layers


def openvino_names(onnx_path: Path, layers: list[EncoderLayer]) -> list[EncoderLayer]:
    """The layers under OpenVINO's op names, which NNCF's ignored scope and the quantized model use: the ONNX node
    name, or with "/WithoutBiases" where OpenVINO split a Conv/Gemm's bias into its own Add."""
    import openvino as ov

    ops = {op.get_friendly_name() for op in ov.Core().read_model(str(onnx_path)).get_ordered_ops()
           if op.get_type_name() in ("MatMul", "Convolution")}
    out = []
    for layer in layers:
        name = layer.name if layer.name in ops else f"{layer.name}/WithoutBiases"
        if name not in ops:
            raise LocpathError(f"{onnx_path}: OpenVINO has no MatMul/Convolution for the graph's {layer.name}")
        out.append(EncoderLayer(name, layer.role, layer.block))
    return out


def layer_groups(layers: list[EncoderLayer]) -> dict[str, list[str]]:
    """Candidate groups to keep float: each block, each role across blocks, the patch embedding and the head."""
    groups: dict[str, list[str]] = {}
    for layer in layers:
        if layer.block >= 0:
            groups.setdefault(f"block{layer.block}", []).append(layer.name)
            groups.setdefault(f"all_{layer.role}", []).append(layer.name)
        else:
            groups.setdefault(layer.role, []).append(layer.name)
    return groups


def nncf_quantize(onnx_path: Path, tiles: np.ndarray, ignored: list[str], cfg: Int8SafeConfig):
    """One NNCF post-training quantization of the ONNX graph (OpenVINO backend); `ignored` node names stay float."""
    try:
        import nncf
        import openvino as ov
        from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters,
                                                           AdvancedSmoothQuantParameters)
    except ImportError as exc:
        raise LocpathError("OpenVINO int8 needs NNCF (pip install 'locpath[openvino]')") from exc
    presets = {"mixed": nncf.QuantizationPreset.MIXED, "performance": nncf.QuantizationPreset.PERFORMANCE}
    if cfg.preset not in presets:
        raise LocpathError(f"INT8 encoder preset must be mixed or performance, not {cfg.preset!r}")
    adv = AdvancedQuantizationParameters()
    if cfg.smooth_quant_alpha is not None:
        adv = AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=cfg.smooth_quant_alpha))
    items = [np.ascontiguousarray(tiles[i:i + 1]) for i in range(len(tiles))]
    kw = {"ignored_scope": nncf.IgnoredScope(names=list(ignored), validate=False)} if ignored else {}
    model = ov.Core().read_model(str(onnx_path))
    return nncf.quantize(model, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(items),
                         preset=presets[cfg.preset], advanced_parameters=adv, **kw)


def run_model(model, tiles: np.ndarray, hint: str, batch: int = 16) -> np.ndarray:
    """Features of `tiles` from an OpenVINO model compiled for the CPU at `hint`."""
    import openvino as ov

    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"})
    req = compiled.create_infer_request()
    out = [np.array(req.infer({"tiles": np.ascontiguousarray(tiles[i:i + batch])})[compiled.outputs[0]])
           for i in range(0, len(tiles), batch)]
    return np.concatenate(out)


def tile_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def fp32_features(onnx_path: Path, tiles: np.ndarray, batch: int = 16) -> np.ndarray:
    """The reference: the fp32 graph on ONNX Runtime, as the bundle's fp32 encoder runs."""
    from ..runtime.ort_runner import OrtRunner

    r = OrtRunner(onnx_path, "tile_encoder")
    try:
        return np.concatenate([r.run({"tiles": np.ascontiguousarray(tiles[i:i + batch])}, ["features"])["features"]
                               for i in range(0, len(tiles), batch)])
    finally:
        r.release()


def without_activation_quantizers(model, names: set[str]):
    """A copy of a quantized model whose layers `names` see float inputs (their FakeQuantize bypassed), as NNCF's
    accuracy control reverts a quantizer: cheap (no calibration), used only to rank sensitivity."""
    clone = model.clone()
    for op in clone.get_ordered_ops():
        if op.get_friendly_name() not in names:
            continue
        for inp in op.inputs():
            src = inp.get_source_output()
            if src.get_node().get_type_name() == "FakeQuantize":
                inp.replace_source_output(src.get_node().input_value(0))
    return clone


def rank_groups(qmodel, groups: dict[str, list[str]], tiles: np.ndarray, ref: np.ndarray, hint: str,
                batch: int = 16) -> list[tuple[str, float]]:
    """Each group's minimum tile cosine when it alone is returned to float, best first (the sensitivity order)."""
    gains = []
    for g, names in groups.items():
        c = tile_cosines(run_model(without_activation_quantizers(qmodel, set(names)), tiles, hint, batch), ref)
        gains.append((g, float(c.min())))
    return sorted(gains, key=lambda x: -x[1])


def tiles_per_s(model, tiles: np.ndarray, hint: str, batch: int = 16, repeats: int = 3) -> float:
    import openvino as ov

    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"})
    req = compiled.create_infer_request()
    x = np.ascontiguousarray(tiles[:batch])
    req.infer({"tiles": x})
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        req.infer({"tiles": x})
        ts.append(time.perf_counter() - t0)
    return len(x) / float(np.median(ts))


def build_int8_safe(onnx_path: Path, out_dir: Path, comp: str, tiles: np.ndarray,
                    cfg: Int8SafeConfig = Int8SafeConfig(), log=print) -> dict:
    """Quantize, check every tile, keep sensitive groups float until min tile cosine >= cfg.min_cosine; save the
    IR as `<comp>.openvino-int8.xml` in out_dir. Returns the manifest's quantization info (artifact, data_file,
    ov_hint, the checks per round)."""
    import openvino as ov

    if len(tiles) < 2:
        raise LocpathError("the safe INT8 encoder needs at least 2 calibration tiles (one held out)")
    held = held_out_mask(len(tiles), cfg.held_out_every)
    ref = fp32_features(onnx_path, tiles, cfg.batch)
    layers = openvino_names(onnx_path, encoder_layers(onnx_path))
    groups = layer_groups(layers)
    unknown = [g for g in cfg.float_groups if g not in groups]
    if unknown:
        raise LocpathError(f"INT8 encoder: unknown layer group(s) {', '.join(unknown)} (known: {', '.join(groups)})")
    kept: list[str] = list(cfg.float_groups)
    rounds, best = [], None
    for rnd in range(cfg.max_rounds + 1):
        ignored = sorted({n for g in kept for n in groups[g]})
        t0 = time.time()
        qmodel = nncf_quantize(onnx_path, tiles[~held], ignored, cfg)
        checks = {h: Check(h, tile_cosines(run_model(qmodel, tiles, h, cfg.batch), ref), held) for h in cfg.hints}
        ok = [h for h, c in checks.items() if c.cosines.min() >= cfg.min_cosine]
        speed = {h: round(tiles_per_s(qmodel, tiles, h, cfg.batch), 1) for h in ok}
        row = {"round": rnd, "float_groups": list(kept), "float_layers": len(ignored), "seconds": 0.0,
               "checks": {h: c.summary() for h, c in checks.items()}, "tiles_per_s": speed}
        rounds.append(row)
        top = max(checks.values(), key=lambda c: c.cosines.min())
        log(f"int8-safe round {rnd}: float groups {kept or 'none'}, min tile cosine "
            + ", ".join(f"{h} {c.cosines.min():.5f}" for h, c in checks.items()))
        if best is None or top.cosines.min() > best[1]:
            best = (kept, float(top.cosines.min()))
        if ok:
            hint = max(speed, key=speed.get)
            row["seconds"] = round(time.time() - t0, 1)
            break
        if rnd == cfg.max_rounds:
            raise LocpathError(f"INT8 encoder: no tried float set keeps every tile at cosine >= {cfg.min_cosine} "
                               f"(best {best[1]:.5f} with float groups {best[0] or 'none'}); build bf16 instead")
        worst = np.argsort(top.cosines)[:cfg.rank_tiles]
        ranked = rank_groups(qmodel, {g: n for g, n in groups.items() if g not in kept}, tiles[worst], ref[worst],
                             top.hint, cfg.batch)
        row["sensitivity"] = [[g, round(c, 5)] for g, c in ranked]
        row["seconds"] = round(time.time() - t0, 1)
        kept = kept + [g for g, _ in ranked[:cfg.groups_per_round]]
    xml = f"{comp}.openvino-int8.xml"
    ov.save_model(qmodel, str(Path(out_dir) / xml), compress_to_fp16=False)
    final = checks[hint].summary()
    return {"method": "NNCF post-training INT8 (OpenVINO backend), transformer model type, sensitive layer groups "
                      "kept float until every tile holds the cosine bound",
            "recipe": "int8-safe", "preset": cfg.preset, "smooth_quant_alpha": cfg.smooth_quant_alpha,
            "min_tile_cosine_bound": cfg.min_cosine, "float_groups": list(kept), "float_layers": ignored,
            "calibration_tiles": int((~held).sum()), "held_out_tiles": int(held.sum()), "rounds": rounds,
            **{k: final[k] for k in ("cosine_min", "cosine_mean", "calibration_min", "calibration_mean",
                                     "held_out_min", "held_out_mean")},
            "ov_hint": hint, "ov_hint_tiles_per_s": rounds[-1]["tiles_per_s"],
            "nncf": _nncf_version(), "artifact": xml, "data_file": xml[:-4] + ".bin"}


def _nncf_version() -> str:
    import nncf

    return getattr(nncf, "__version__", "?")
