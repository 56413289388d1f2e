"""Shape ranges of a component's inputs, from the profile ranges its manifest entry declares (axis -> [min, opt,
max]): what TensorRT plans are built for and what the ONNX Runtime TensorRT provider is told, so both accept
every shape the runtime will feed (the decoder's ranges cover `generation.max_length`)."""

from __future__ import annotations

from ..errors import LocpathError
from .manifest import ComponentEntry
from .names import DECODER


def shape_ranges(entry: ComponentEntry, axes: dict[str, list[int]]) -> dict[str, tuple[tuple, tuple, tuple]]:
    """min/opt/max shape of every input, symbolic axes taken from `axes` (axis -> [min, opt, max])."""
    out = {}
    for spec in entry.inputs:
        dims = []
        for d in spec.shape:
            if isinstance(d, int):
                dims.append((d, d, d))
            elif d in axes:
                dims.append(tuple(axes[d]))
            else:
                raise LocpathError(f"input {spec.name}: no profile range for axis {d!r}")
        out[spec.name] = tuple(tuple(x[i] for x in dims) for i in range(3))
    return out


def optimization_profiles(component: str, entry: ComponentEntry) -> list[dict]:
    """Profiles for one component: one for most graphs; the decoder gets prefill (empty past) and decode (one
    new token) profiles, because their shape regimes differ and one wide profile tunes both badly."""
    p = {k: list(v) for k, v in entry.profiles.items()}
    if component != DECODER:
        return [shape_ranges(entry, p)]
    seq, past = p["sequence"], p["past"]
    prefill = dict(p, sequence=seq, past=[0, 0, 0], total=list(seq))
    decode = dict(p, sequence=[1, 1, 1], past=[1, max(1, past[1]), past[2] - 1], total=[2, max(1, past[1]) + 1, past[2]])
    return [shape_ranges(entry, prefill), shape_ranges(entry, decode)]


def union_ranges(entry: ComponentEntry) -> dict[str, tuple[tuple, tuple, tuple]]:
    """One range per input covering all of a component's profiles (for runtimes that take a single profile)."""
    profiles = optimization_profiles(DECODER if "past" in entry.profiles else "", entry)
    out = {}
    for name in profiles[0]:
        lo = tuple(min(p[name][0][i] for p in profiles) for i in range(len(profiles[0][name][0])))
        opt = profiles[-1][name][1]
        hi = tuple(max(p[name][2][i] for p in profiles) for i in range(len(profiles[0][name][2])))
        out[name] = (lo, opt, hi)
    return out
