"""Declarative key maps: a release's state-dict names -> locpath's, validated when loaded and when applied.

A key map is a JSON file (format `locpath-keymap/1`):

    {
      "format": "locpath-keymap/1",
      "name": "my-map",
      "doc": "what it assumes",
      "macros": {"P": "(?:module\\\\.)?(?:base_model\\\\.model\\\\.)?"},      # ${P} inside match/ignore patterns
      "config": {"tis": {"question_dim": "$llm.hidden_size"}},            # ModelConfig values the release implies
      "lora": {"alpha": null},                                             # LoRA alpha (null: alpha = rank)
      "rules": [
        {"match": "${P}resampler\\\\.latents", "target": "resampler.latents"},
        {"match": "${P}resampler\\\\.layers\\\\.(\\\\d+)\\\\.attn\\\\.in_proj_weight",
         "target": ["resampler.blocks.{1}.cross.q.weight", "resampler.blocks.{1}.cross.k.weight",
                    "resampler.blocks.{1}.cross.v.weight"],
         "transform": [{"split": 0}]},
        {"match": "${P}cara\\\\.(\\\\d+)\\\\.gate", "target": "cara.blocks.{1}.attn_gate",
         "lookup": {"1": {"0": "3", "1": "10"}}, "transform": [{"reshape": []}]},
        {"match": "...\\\\.(?P<part>q|k|v)_proj\\\\.weight", "target": "...qkv.weight",
         "concat": {"group": "part", "order": ["q", "k", "v"], "dim": 0}},
        {"match": "${P}(model\\\\.layers\\\\.\\\\d+\\\\.self_attn\\\\.[qkvo]_proj)\\\\.lora_(A|B)\\\\.weight",
         "target": "llm.{1}.lora_{2}"},
        {"target": "tis.embed.weight", "from": "llm.model.embed_tokens.weight"}
      ],
      "ignore": ["${P}mae_decoder\\\\..*"]
    }

- `match` is a regex in RE2 syntax (Python's, less backreferences and lookaround), matched against the whole source
  key by a linear-time engine (google-re2): a pattern from a file never backtracks for ever; `target` one template or a list (one per piece
  of a `split`), with `{1}`, `{2}`... (groups), `{name}` (named groups) and `{0}` (the whole key).
- `transform`, applied in order: "transpose" (2-D), "squeeze", {"squeeze": d}, {"unsqueeze": d},
  {"reshape": [..]} (-1 allowed, [] for a scalar), {"permute": [..]}, {"scale": x}, {"dtype": "float32"},
  {"slice": {"dim": d, "start": a, "stop": b}}, {"split": d} or {"split": {"dim": d, "sizes": [..]}} (into as
  many pieces as the rule has targets; the transforms after it apply to each piece). Every tensor is finally cast
  to the dtype of the locpath tensor it fills.
- `concat`: the keys the rule matches that differ only in the named group are joined along `dim`, in `order`.
- `lookup`: a group's value replaced before the target is written (an adapter index -> the LLM layer it sits in).
- `from`: a locpath tensor filled from another locpath tensor after the LLM is loaded and LoRA merged (a TIS
  that embeds questions with the LLM's own embedding matrix: `"from": "llm.model.embed_tokens.weight"`).
- Targets: a locpath state-dict key (`resampler.*`, `tis.*`, `cara.*`, `mae_head.*`, `tile_encoder.*`), an LLM
  weight `llm.<HF name>` (replaces the folder's), or a LoRA factor `llm.<module>.lora_A` / `.lora_B` (merged into
  that Linear through peft: rank from the shapes, alpha from `lora.alpha` or --lora-alpha, default the rank).
- `config`: values merged into the model config; a string "$llm.<field>" is the LLM folder's config.json value.

Applying a map to a file: every key must be matched by exactly one rule or ignore pattern (unmatched and ambiguous
keys are refused, named), every target is filled once per file (a later release file may fill it again and wins),
and every tensor's shape must equal the locpath tensor's (both shapes named). This module is torch-free until a
tensor is transformed.
"""

from __future__ import annotations

import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from ..engines.safetensors_header import load_json
from ..errors import CheckpointError

KEYMAP_FORMAT = "locpath-keymap/1"
TOP_FIELDS = ("format", "name", "doc", "macros", "config", "lora", "rules", "ignore")
RULE_FIELDS = ("match", "target", "transform", "concat", "lookup", "from", "doc")
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "checkpoints" / "keymaps"
DEFAULT_KEYMAP = "locpath-release-v1"
TRANSFORMS = ("transpose", "squeeze", "unsqueeze", "reshape", "permute", "scale", "dtype", "slice", "split")
DTYPES = ("float32", "float16", "bfloat16", "float64")
MACRO = re.compile(r"\$\{(\w+)\}")
MAX_KEYMAP_BYTES = 8 << 20
MAX_RULES = 4096  # rules and ignore patterns each: every key is matched against all of them
MAX_PATTERN = 8192  # characters of one pattern, macros expanded
MAX_CONFIG_DEPTH = 8


def compile_pattern(text: str):
    """A compiled RE2 pattern (linear-time matching, never catastrophic backtracking), or re2.error for syntax RE2
    cannot run (backreferences, lookaround) or a pattern too large for its memory budget."""
    import re2

    opts = re2.Options()
    opts.log_errors = False  # the error comes back as an exception: no C++ log lines on stderr
    return re2.compile(text, opts)


def _depth(x, limit: int) -> int:
    if limit < 0:
        return 1
    if isinstance(x, dict):
        return 1 + max((_depth(v, limit - 1) for v in x.values()), default=0)
    if isinstance(x, list):
        return 1 + max((_depth(v, limit - 1) for v in x), default=0)
    return 0


def shipped_keymap(name: str = DEFAULT_KEYMAP) -> Path:
    return SHIPPED_DIR / f"{name}.json"


@dataclass
class Rule:
    index: int
    targets: list[str]
    match: re.Pattern | None = None
    transforms: list = field(default_factory=list)
    concat: dict | None = None
    lookup: dict[str, dict[str, str]] = field(default_factory=dict)
    source: str | None = None  # `from`: a locpath key
    pattern: str = ""

    def label(self) -> str:
        what = self.pattern if self.match is not None else f"from {self.source}"
        return f"rule {self.index} ({what[:80]})"


@dataclass
class Assignment:
    """One step of a plan: these source keys (several for a concat) make these targets, by this rule."""

    rule: Rule
    sources: list[str]
    targets: list[str]


@dataclass
class FilePlan:
    label: str
    assignments: list[Assignment]
    ignored: list[str]

    def targets(self) -> dict[str, Assignment]:
        return {t: a for a in self.assignments for t in a.targets}


@dataclass
class KeyMap:
    path: str
    name: str
    doc: str
    rules: list[Rule]
    ignore: list[tuple[re.Pattern, str]]
    config: dict
    lora_alpha: float | None

    @property
    def derived(self) -> list[Rule]:
        return [r for r in self.rules if r.source is not None]

    # -- names --------------------------------------------------------------------------------------------------
    def plan(self, keys: list[str], label: str) -> FilePlan:
        """Which rule makes which targets from these source keys, or a CheckpointError naming the keys that no
        rule (or more than one) matches and the targets filled twice."""
        unmatched, ambiguous = [], []
        ignored: list[str] = []
        singles: list[Assignment] = []
        concats: dict[tuple[int, tuple[str, ...]], dict[str, str]] = {}
        for key in keys:
            try:
                key.encode("utf-8")
            except UnicodeEncodeError:
                raise CheckpointError(f"{label}: key {key[:80]!a} is not valid Unicode text") from None
            hits = [(r, m) for r in self.rules if r.match is not None and (m := r.match.fullmatch(key))]
            ign = [text for pat, text in self.ignore if pat.fullmatch(key)]
            if len(hits) + len(ign) == 0:
                unmatched.append(key)
                continue
            if len(hits) + len(ign) > 1:
                names = [r.label() for r, _ in hits] + [f"ignore ({t[:60]})" for t in ign]
                ambiguous.append(f"{key} ({' and '.join(names)})")
                continue
            if ign:
                ignored.append(key)
                continue
            rule, m = hits[0]
            targets = _targets(rule, m, key, self.path)
            if rule.concat is None:
                singles.append(Assignment(rule, [key], targets))
            else:
                part = m.group(rule.concat["group"])
                slot = concats.setdefault((rule.index, tuple(targets)), {})
                if part in slot:
                    ambiguous.append(f"{key} (same part {part!r} of {targets[0]} as {slot[part]})")
                slot[part] = key
        if unmatched:
            raise CheckpointError(f"{label}: {len(unmatched)} keys match no rule of key map {self.path} and no ignore "
                                  f"pattern: {_few(unmatched)}")
        if ambiguous:
            raise CheckpointError(f"{label}: {len(ambiguous)} keys match more than one rule of key map {self.path}: "
                                  f"{_few(ambiguous, 3)}")
        out = singles + self._concats(concats, label)
        seen: dict[str, str] = {}
        twice = []
        for a in out:
            for t in a.targets:
                if t in seen:
                    twice.append(f"{t} (from {seen[t]} and {a.sources[0]})")
                seen[t] = a.sources[0]
        if twice:
            raise CheckpointError(f"{label}: key map {self.path} fills {len(twice)} targets twice: {_few(twice, 3)}")
        return FilePlan(label, out, ignored)

    def _concats(self, concats: dict[tuple[int, tuple[str, ...]], dict[str, str]], label: str) -> list[Assignment]:
        """One assignment per concat target, its parts in the rule's order; a missing or unexpected part refused."""
        out = []
        rules = {r.index: r for r in self.rules}
        for (idx, targets), parts in concats.items():
            rule = rules[idx]
            order = rule.concat["order"]
            missing = [p for p in order if p not in parts]
            extra = sorted(set(parts) - set(order))
            if missing or extra:
                raise CheckpointError(f"{label}: {rule.label()} of key map {self.path}: {targets[0]} needs parts "
                                      f"{order}; missing {missing}" + (f", unexpected {extra}" if extra else "")
                                      + f" (found {sorted(parts.values())[:3]})")
            out.append(Assignment(rule, [parts[p] for p in order], list(targets)))
        return out


def _few(items: list[str], n: int = 5) -> str:
    cut = [i if len(i) <= 200 else i[:200] + "..." for i in items[:n]]
    return ", ".join(cut) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _targets(rule: Rule, m: re.Match, key: str, where: str) -> list[str]:
    groups = [m.group(0)] + [g if g is not None else "" for g in m.groups()]
    named = {k: (v if v is not None else "") for k, v in m.groupdict().items()}
    for ref, table in rule.lookup.items():
        value = named[ref] if ref in named else groups[int(ref)]
        if value not in table:
            raise CheckpointError(f"{key}: {rule.label()} of key map {where}: lookup of group {ref} has no entry for "
                                  f"{value!r} (entries: {sorted(table)})")
        if ref in named:
            named[ref] = table[value]
        else:
            groups[int(ref)] = table[value]
    return [t.format(*groups, **named) for t in rule.targets]


# -- loading ----------------------------------------------------------------------------------------------------
def load_keymap(path: str | os.PathLike | None = None) -> KeyMap:
    """A key map file (default: the shipped guess), validated field by field: one CheckpointError line naming the
    file and the rule for anything wrong (unknown fields, bad regex, a template naming a group the regex lacks)."""
    p = Path(path) if path is not None else shipped_keymap()
    data = load_json(p, "key map", limit=MAX_KEYMAP_BYTES)
    kf = _KeymapFile(str(p), {})
    kf.macros = _check_top(data, kf)
    rules = _load_rules(data.get("rules", []), kf)
    ignore = _load_ignore(data.get("ignore", []), kf)
    config = data.get("config", {})
    if not isinstance(config, dict) or _depth(config, MAX_CONFIG_DEPTH) > MAX_CONFIG_DEPTH:
        kf.fail(f"config must be an object (ModelConfig fields), nested at most {MAX_CONFIG_DEPTH} deep")
    alpha = _lora_alpha(data.get("lora", {}), kf)
    doc = data.get("doc", "")
    return KeyMap(kf.where, str(data.get("name", p.stem)), doc if isinstance(doc, str) else " ".join(map(str, doc)),
                  rules, ignore, config, None if alpha is None else float(alpha))


@dataclass
class _KeymapFile:
    """The key map being loaded: its path (every error line starts with it) and its macros (expanded in patterns)."""

    where: str
    macros: dict[str, str]

    def fail(self, msg: str) -> NoReturn:
        raise CheckpointError(f"{self.where}: {msg}")

    def expand(self, text, what: str) -> str:
        if not isinstance(text, str) or not text:
            self.fail(f"{what}: a pattern must be a non-empty string, got {text!r}")

        def sub(m):
            if m.group(1) not in self.macros:
                self.fail(f"{what}: unknown macro ${{{m.group(1)}}} (defined: {sorted(self.macros)})")
            return self.macros[m.group(1)]

        out = MACRO.sub(sub, text)
        if len(out) > MAX_PATTERN:
            self.fail(f"{what}: a pattern of {len(out)} characters (macros expanded), over the {MAX_PATTERN} limit")
        return out

    def compile(self, text: str, what: str):
        try:
            return compile_pattern(text)
        except ImportError:
            raise CheckpointError("key maps need google-re2 (pip install google-re2)") from None
        except Exception as exc:  # re2.error; its message is bytes
            msg = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
            self.fail(f"{what}: bad regex {text[:200]!r} ({msg}; key maps are RE2 patterns, matched in linear time: "
                      "no backreferences or lookaround)")


def _check_top(data, kf: _KeymapFile) -> dict:
    """The top level: an object of known fields in the right format; returns its macros."""
    if not isinstance(data, dict):
        kf.fail("a key map is a JSON object")
    unknown = sorted(set(data) - set(TOP_FIELDS))
    if unknown:
        kf.fail(f"unknown fields {unknown} (allowed: {', '.join(TOP_FIELDS)})")
    if data.get("format") != KEYMAP_FORMAT:
        kf.fail(f"format must be {KEYMAP_FORMAT!r}, got {data.get('format')!r}")
    macros = data.get("macros", {})
    if not isinstance(macros, dict) or not all(isinstance(v, str) for v in macros.values()):
        kf.fail("macros must map names to regex text")
    return macros


def _load_rules(raw_rules, kf: _KeymapFile) -> list[Rule]:
    if not isinstance(raw_rules, list):
        kf.fail("rules must be a list")
    if len(raw_rules) > MAX_RULES:
        kf.fail(f"{len(raw_rules)} rules, over the limit of {MAX_RULES}")
    return [_load_rule(i, r, kf) for i, r in enumerate(raw_rules)]


def _load_rule(i: int, r, kf: _KeymapFile) -> Rule:
    what = f"rule {i}"
    if not isinstance(r, dict):
        kf.fail(f"{what}: a rule is a JSON object")
    bad = sorted(set(r) - set(RULE_FIELDS))
    if bad:
        kf.fail(f"{what}: unknown fields {bad} (allowed: {', '.join(RULE_FIELDS)})")
    targets = r.get("target")
    targets = [targets] if isinstance(targets, str) else targets
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        kf.fail(f"{what}: target must be a non-empty string or list of strings")
    rule = Rule(i, list(targets))
    if ("match" in r) == ("from" in r):
        kf.fail(f"{what}: give exactly one of match (source keys) or from (a locpath tensor)")
    if "from" in r:
        if not isinstance(r["from"], str) or not r["from"]:
            kf.fail(f"{what}: from must name a locpath tensor")
        if any(k in r for k in ("concat", "lookup")) or "{" in "".join(targets):
            kf.fail(f"{what}: a from rule has fixed targets (no concat, lookup or {{groups}})")
        rule.source = r["from"]
    else:
        rule.pattern = kf.expand(r["match"], what)
        rule.match = kf.compile(rule.pattern, what)
    rule.transforms = _check_transforms(r.get("transform", []), len(targets), f"{kf.where}: {what}")
    if "concat" in r:
        rule.concat = _rule_concat(r["concat"], rule, kf, what)
    if "lookup" in r:
        rule.lookup = _rule_lookup(r["lookup"], kf, what)
    if rule.match is not None:
        _check_template_groups(rule, targets, kf, what)
    return rule


def _rule_concat(c, rule: Rule, kf: _KeymapFile, what: str) -> dict:
    if not (isinstance(c, dict) and set(c) <= {"group", "order", "dim"} and isinstance(c.get("group"), str)
            and isinstance(c.get("order"), list) and len(c["order"]) >= 2
            and all(isinstance(o, str) for o in c["order"]) and isinstance(c.get("dim", 0), int)):
        kf.fail(f"{what}: concat is {{\"group\": NAME, \"order\": [PART, ...], \"dim\": D}}")
    if c["group"] not in rule.match.groupindex:
        kf.fail(f"{what}: concat group {c['group']!r} is not a named group of the match pattern")
    return {"group": c["group"], "order": list(c["order"]), "dim": int(c.get("dim", 0))}


def _rule_lookup(lk, kf: _KeymapFile, what: str) -> dict[str, dict[str, str]]:
    if not (isinstance(lk, dict) and all(isinstance(t, dict) and all(isinstance(v, (str, int))
                                                                       for v in t.values())
                                         for t in lk.values())):
        kf.fail(f"{what}: lookup maps a group to a table of value -> replacement")
    return {str(g): {str(k): str(v) for k, v in t.items()} for g, t in lk.items()}


def _check_template_groups(rule: Rule, targets: list[str], kf: _KeymapFile, what: str) -> None:
    """Every {field} of the targets (and every lookup) names a group of the match pattern."""
    names = set(rule.match.groupindex)
    refs = set(rule.lookup)
    for t in targets:
        try:
            parts = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(t) if f is not None]
        except ValueError as exc:
            kf.fail(f"{what}: bad target template {t!r} ({exc})")
        if any(spec or conv for _, spec, conv in parts):
            kf.fail(f"{what}: target template {t[:120]!r}: fields are {{N}} or {{name}}, without ! or :")
        refs |= {f for f, _, _ in parts}
    for f in refs:
        ok = (f.isdigit() and int(f) <= rule.match.groups) or f in names
        if not ok:
            kf.fail(f"{what}: {f!r} is not a group of {rule.pattern!r}")
    if rule.concat is not None and any(rule.concat["group"] in _fields(t) for t in targets):
        kf.fail(f"{what}: the targets of a concat must not name its group {rule.concat['group']!r}")


def _load_ignore(raw_ignore, kf: _KeymapFile) -> list[tuple[re.Pattern, str]]:
    if not isinstance(raw_ignore, list):
        kf.fail("ignore must be a list of regex patterns")
    if len(raw_ignore) > MAX_RULES:
        kf.fail(f"{len(raw_ignore)} ignore patterns, over the limit of {MAX_RULES}")
    ignore = []
    for j, text in enumerate(raw_ignore):
        pat = kf.expand(text, f"ignore {j}")
        ignore.append((kf.compile(pat, f"ignore {j}"), pat))
    return ignore


def _lora_alpha(lora, kf: _KeymapFile) -> float | None:
    if not isinstance(lora, dict) or set(lora) - {"alpha", "doc"}:
        kf.fail("lora is {\"alpha\": number or null}")
    alpha = lora.get("alpha")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0):
        kf.fail(f"lora.alpha must be a positive number or null, got {alpha!r}")
    return alpha


def _fields(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}


def _check_transforms(ts, n_targets: int, what: str) -> list:
    if not isinstance(ts, list):
        raise CheckpointError(f"{what}: transform must be a list")
    out, splits = [], 0
    for t in ts:
        if isinstance(t, str):
            name, arg = t, None
        elif isinstance(t, dict) and len(t) == 1:
            name, arg = next(iter(t.items()))
        else:
            raise CheckpointError(f"{what}: a transform is a name or a one-key object, got {t!r}")
        if name not in TRANSFORMS:
            raise CheckpointError(f"{what}: unknown transform {name!r} (known: {', '.join(TRANSFORMS)})")
        ok = {
            "transpose": arg is None,
            "squeeze": arg is None or isinstance(arg, int),
            "unsqueeze": isinstance(arg, int),
            "reshape": isinstance(arg, list) and all(isinstance(s, int) for s in arg),
            "permute": isinstance(arg, list) and all(isinstance(s, int) for s in arg),
            "scale": isinstance(arg, (int, float)) and not isinstance(arg, bool),
            "dtype": arg in DTYPES,
            "slice": isinstance(arg, dict) and set(arg) <= {"dim", "start", "stop"}
            and all(isinstance(v, int) for v in arg.values()),
            "split": isinstance(arg, int) or (isinstance(arg, dict) and set(arg) <= {"dim", "sizes"}
                                              and isinstance(arg.get("dim", 0), int)
                                              and all(isinstance(s, int) for s in arg.get("sizes", []))),
        }[name]
        if not ok:
            raise CheckpointError(f"{what}: bad argument for transform {name!r}: {arg!r}")
        splits += name == "split"
        out.append((name, arg))
    if splits > 1:
        raise CheckpointError(f"{what}: at most one split")
    if (splits == 1) != (n_targets > 1):
        raise CheckpointError(f"{what}: {n_targets} targets need {'a split' if n_targets > 1 else 'no split'}")
    return out


# -- tensors ----------------------------------------------------------------------------------------------------
def produce(a: Assignment, get) -> list:
    """The target tensors of one assignment; `get(source key)` gives a torch tensor (real, or on the meta device
    to check shapes before anything is read)."""
    import torch

    rule = a.rule
    where = f"{rule.label()} on {a.sources[0]}"
    parts = [get(k) for k in a.sources]
    if rule.concat is not None:
        try:
            tensors = [torch.cat(parts, dim=rule.concat["dim"])]
        except RuntimeError as exc:
            raise CheckpointError(f"{where}: cannot concatenate {[tuple(p.shape) for p in parts]} ({exc})") from None
    else:
        tensors = parts
    for name, arg in rule.transforms:
        try:
            if name == "split":
                dim = arg if isinstance(arg, int) else arg.get("dim", 0)
                sizes = None if isinstance(arg, int) else arg.get("sizes")
                x = tensors[0]
                if sizes:
                    if sum(sizes) != x.shape[dim] or len(sizes) != len(a.targets):
                        raise CheckpointError(f"{where}: split sizes {sizes} do not cut {tuple(x.shape)} along dim "
                                              f"{dim} into {len(a.targets)} pieces")
                    tensors = list(torch.split(x, sizes, dim=dim))
                else:
                    if x.shape[dim] % len(a.targets):
                        raise CheckpointError(f"{where}: {tuple(x.shape)} does not split evenly along dim {dim} into "
                                              f"{len(a.targets)} pieces")
                    tensors = list(torch.chunk(x, len(a.targets), dim=dim))
                continue
            tensors = [_apply(name, arg, x) for x in tensors]
        except CheckpointError:
            raise
        except (RuntimeError, IndexError, ValueError) as exc:
            raise CheckpointError(f"{where}: transform {name} fails on {[tuple(x.shape) for x in tensors]} "
                                  f"({str(exc).splitlines()[0][:200]})") from None
    return tensors


def _apply(name: str, arg, x):
    import torch

    if name == "transpose":
        if x.dim() != 2:
            raise ValueError(f"transpose needs a 2-D tensor, got {x.dim()}-D")
        return x.t()
    if name == "squeeze":
        return x.squeeze() if arg is None else x.squeeze(arg)
    if name == "unsqueeze":
        return x.unsqueeze(arg)
    if name == "reshape":
        return x.reshape(arg)
    if name == "permute":
        return x.permute(*arg)
    if name == "scale":
        return x * arg
    if name == "dtype":
        return x.to(getattr(torch, arg))
    if name == "slice":
        d = arg.get("dim", 0)
        return x.narrow(d, arg.get("start", 0), arg.get("stop", x.shape[d]) - arg.get("start", 0))
    raise ValueError(f"unknown transform {name}")
