"""`locpath inspect` and `locpath import` on checkpoints made by someone else: safetensors headers, shard indexes, key
maps and adapter folders written by hand to break the readers. Each is one line naming the file and the problem,
exit 2, no traceback, in seconds; through the CLI in a subprocess. Inspect tests are torch-free; import tests are
marked `torch` (the import command needs the training extra)."""

import json
import os
import struct
import time

import numpy as np
import pytest

from servers import cli
from servers import one_line as _one_line


def write_st(path, header, data: bytes = b"", length: int | None = None, raw: bytes | None = None):
    """A safetensors file from a header dict (or raw header bytes) and data, as a hostile writer makes one."""
    hb = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb) if length is None else length) + hb + data)
    return path


def good_header(n: int = 2):
    """Two float32 tensors of n elements, back to back."""
    return {"a": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]},
            "b": {"dtype": "F32", "shape": [n], "data_offsets": [4 * n, 8 * n]}}


def inspect(path, *extra):
    return cli("inspect", path, *extra, timeout=120)


# -- safetensors headers --------------------------------------------------------------------------------------------
def test_a_well_formed_file_still_reads(tmp_path):
    p = write_st(tmp_path / "ok.safetensors", good_header(), np.arange(4, dtype=np.float32).tobytes())
    res = inspect(p, "--json")
    assert res.returncode == 0, res.stderr
    inv = json.loads(res.stdout)
    assert inv["tensors"] == 2 and inv["parameters"] == 4 and inv["bytes"] == 16


def test_names_with_terminal_escapes_are_shown_escaped(tmp_path):
    header = {"evil\x1b]0;owned\x07\x1b[2J": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    p = write_st(tmp_path / "esc.safetensors", header, b"\0" * 4)
    res = inspect(p)
    assert res.returncode == 0, res.stderr
    assert "\x1b" not in res.stdout and "\x07" not in res.stdout and "evil\\x1b]0;owned\\x07" in res.stdout


def _bad_headers():
    h = good_header()
    neg_dim = {"a": {"dtype": "F32", "shape": [-2, -1], "data_offsets": [0, 8]}}  # (-2)(-1)(4) = 8 bytes: passed
    overlap = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
               "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    same = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}  # two tensors on the same bytes
    hole = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    return [
        ("neg-offset", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, 16, "data_offsets"),
        ("neg-dim", neg_dim, 8, "not a list of non-negative integers"),
        ("overlap", overlap, 12, "overlaps"),
        ("same-bytes", same, 8, "overlaps"),
        ("hole", hole, 16, "belong to no tensor"),
        ("past-end", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 8, "outside the file"),
        ("numel", {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, 16, "needs 12 bytes"),
        ("dtype", {"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, 8, "unknown dtype 'F33'"),
        ("float-dim", {"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, 8, "non-negative integers"),
        ("bool-dim", {"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, 8, "non-negative"),
        ("trailing", h, 24, "trailing data"),
        ("entry-list", {"a": [1, 2]}, 8, "a header entry is"),
        ("metadata", {"__metadata__": {"x": 1}, **h}, 16, "__metadata__"),
        ("not-object", [1, 2], 8, "not a JSON object"),
    ]


@pytest.mark.parametrize("name,header,data_len,fragment", _bad_headers(), ids=[c[0] for c in _bad_headers()])
def test_inspect_refuses_malformed_headers(tmp_path, name, header, data_len, fragment):
    p = write_st(tmp_path / f"{name}.safetensors", header, b"\0" * data_len)
    _one_line(inspect(p), p, fragment)


def test_inspect_refuses_hostile_header_bytes(tmp_path):
    t0 = time.monotonic()
    deep = write_st(tmp_path / "deep.safetensors", None, raw=b"[" * 200_000 + b"]" * 200_000)  # RecursionError once
    _one_line(inspect(deep), deep, "nested too deeply")
    deep_obj = write_st(tmp_path / "deepobj.safetensors", None, raw=b'{"a":' * 200_000 + b"1" + b"}" * 200_000)
    _one_line(inspect(deep_obj), deep_obj, "nested too deeply")
    dup = write_st(tmp_path / "dup.safetensors", None, b"\0" * 8,
                   raw=b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                       b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}')
    _one_line(inspect(dup), dup, "appears twice")
    nan = write_st(tmp_path / "nan.safetensors", None, b"\0" * 8,
                   raw=b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}')
    _one_line(inspect(nan), nan, "non-negative integers")
    big = write_st(tmp_path / "bigint.safetensors", None, b"\0" * 8,
                   raw=b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 8]}}')
    _one_line(inspect(big), big, "not valid JSON")
    surrogate = write_st(tmp_path / "surrogate.safetensors", None, b"\0" * 8,
                         raw=b'{"a\\udcff": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}')
    _one_line(inspect(surrogate), surrogate, "not valid Unicode")
    eight = tmp_path / "eight.safetensors"
    eight.write_bytes(struct.pack("<Q", 2))  # 8 bytes: a length and nothing else
    _one_line(inspect(eight), eight, "header length 2 for a 8-byte file")
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02")
    _one_line(inspect(tiny), tiny, "shorter than its 8-byte header length")
    longer = write_st(tmp_path / "longer.safetensors", good_header(), b"\0" * 16, length=10_000)
    _one_line(inspect(longer), longer, "header length 10000")
    huge = tmp_path / "huge.safetensors"  # a 150 MB header length on a sparse file: refused before it is read
    with open(huge, "wb") as f:
        f.write(struct.pack("<Q", 150_000_000))
        f.truncate(150_000_100)
    _one_line(inspect(huge), huge, "over the format's")
    assert time.monotonic() - t0 < 60


# -- shard indexes and folders --------------------------------------------------------------------------------------
def _folder(root, index=None, shards=("model-1.safetensors",)):
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    for s in shards:
        write_st(root / s, good_header(), b"\0" * 16)
    if index is not None:
        (root / "model.safetensors.index.json").write_text(json.dumps(index) if not isinstance(index, str)
                                                            else index)
    return root


def test_inspect_refuses_bad_indexes(tmp_path):
    ok = _folder(tmp_path / "ok", {"weight_map": {"a": "model-1.safetensors", "b": "model-1.safetensors"}})
    res = inspect(ok, "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["tensors"] == 2, res.stderr
    outside = tmp_path / "outside.safetensors"
    write_st(outside, good_header(), b"\0" * 16)
    cases = [
        ({"weight_map": {"a": ["model-1.safetensors"]}}, "is a list, not a shard file name"),
        ({"weight_map": {"a": 3}}, "is a int, not a shard file name"),
        ({"weight_map": {"a": None}}, "is a NoneType"),
        ({"weight_map": ["a"]}, "not a shard index"),
        ({"weight_map": {}}, "not a shard index"),
        ([1], "not a shard index"),
        ({"weight_map": {"a": "../outside.safetensors"}}, "not a plain file name"),
        ({"weight_map": {"a": str(outside)}}, "not a plain file name"),
        ({"weight_map": {"a": ".hidden.safetensors"}}, "not a plain file name"),
        ({"weight_map": {"a": "model-1.bin"}}, "not safetensors"),
        ({"weight_map": {"a": "model-2.safetensors"}}, "names shard 'model-2.safetensors', which is not in"),
        ({"weight_map": {"zz": "model-1.safetensors"}}, "lacks 1 tensors"),
        ('{"weight_map": ' * 100_000 + "1" + "}" * 100_000, "nested too deeply"),
        ("{not json", "not valid JSON"),
    ]
    for i, (index, fragment) in enumerate(cases):
        d = _folder(tmp_path / f"m{i}", index)
        _one_line(inspect(d), "model.safetensors.index.json" if "lacks" not in fragment else d, fragment)


def test_shards_that_escape_their_folder_are_refused(tmp_path):
    outside = write_st(tmp_path / "secret.safetensors", good_header(), b"\0" * 16)
    d = _folder(tmp_path / "m", {"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}})
    os.symlink(outside, d / "model-2.safetensors")  # a shard that is a symlink out of its folder
    _one_line(inspect(d), "model-2.safetensors", "outside its folder")
    single = tmp_path / "single"
    single.mkdir()
    os.symlink(outside, single / "model.safetensors")
    _one_line(inspect(single), "model.safetensors", "outside its folder")
    loop = _folder(tmp_path / "loop", {"weight_map": {"a": "model-1.safetensors", "b": "x.safetensors"}})
    os.symlink(loop / "x.safetensors", loop / "x.safetensors")
    _one_line(inspect(loop), "x.safetensors", "symbolic link loop")
    fifo = _folder(tmp_path / "fifo", {"weight_map": {"a": "model-1.safetensors", "b": "p.safetensors"}})
    os.mkfifo(fifo / "p.safetensors")
    t0 = time.monotonic()
    _one_line(inspect(fifo), "p.safetensors", "not a regular file")
    assert time.monotonic() - t0 < 30  # never blocked opening the FIFO
    # an index naming one shard under two names (an in-folder symlink): the tensors are read once each, or refused
    twice = _folder(tmp_path / "twice", {"weight_map": {"a": "model-1.safetensors", "b": "alias.safetensors"}})
    os.symlink(twice / "model-1.safetensors", twice / "alias.safetensors")
    res = inspect(twice, "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["tensors"] == 2, res.stderr
    peft = tmp_path / "adapter"
    peft.mkdir()
    (peft / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    os.symlink(outside, peft / "adapter_model.safetensors")
    _one_line(inspect(peft), "adapter_model.safetensors", "outside its folder")


# -- import: key maps, LLM folders ----------------------------------------------------------------------------------
def _tiny_llm(root):
    """An LLM folder as far as the importer reads it before loading weights: config.json, a tokenizer with ChatML's
    tokens, a chat template (no weights: the key map fails first)."""
    from tokenizers import Tokenizer, models

    from locpath.text import SPECIAL_TOKENS

    root.mkdir()
    (root / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64,
                                                  "num_hidden_layers": 2, "num_attention_heads": 2}))
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, "<|endoftext|>", "<|im_start|>", "<|im_end|>", "a"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    tok.add_special_tokens(list(vocab)[:-1])
    tok.save(str(root / "tokenizer.json"))
    (root / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return root


def _keymap(path, rules=(), ignore=(), **top):
    path.write_text(json.dumps({"format": "locpath-keymap/1", "rules": rules if isinstance(rules, (list, dict))
                                else list(rules), "ignore": list(ignore), **top}))
    return path


def _import(llm, stage2, keymap, out, *extra):
    return cli("import", "--llm", llm, "--stage2", stage2, "--key-map", keymap, "--out", out, *extra, timeout=300)


@pytest.mark.torch
def test_catastrophic_key_map_patterns_finish_in_seconds(tmp_path):
    """`(a+)+` and `(.+)+Z` against keys of thousands of characters: exponential in Python's re (hangs for ever),
    linear in RE2."""
    llm = _tiny_llm(tmp_path / "llm")
    keys = {"a" * 5000 + "b": 0, "x" * 5000: 1}
    header = {k: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for k, i in keys.items()}
    stage2 = write_st(tmp_path / "stage2.safetensors", header, b"\0" * 8)
    km = _keymap(tmp_path / "evil.json", [{"match": "(a+)+", "target": "resampler.latents"}], ["(.+)+Z"])
    t0 = time.monotonic()
    line = _one_line(_import(llm, stage2, km, tmp_path / "out"), stage2, "2 keys match no rule", km)
    assert time.monotonic() - t0 < 60 and len(line) < 2000  # and the 5000-character keys are cut in the message
    assert not (tmp_path / "out").exists()


def _bad_key_maps(tmp_path):
    cases = [
        (_keymap(tmp_path / "backref.json", [{"match": r"(a)\1", "target": "x"}]), "rule 0: bad regex '(a)\\\\1'"),
        (_keymap(tmp_path / "lookahead.json", [], [r"(?=a)a"]), "ignore 0: bad regex '(?=a)a'"),
        (_keymap(tmp_path / "lookbehind.json", [{"match": r"(?<!b)a", "target": "x"}]), "lookaround"),
        (_keymap(tmp_path / "big.json", [{"match": "(a{1000}){1000}", "target": "x"}]), "bad regex"),
        (_keymap(tmp_path / "format.json", [{"match": "(a)", "target": "{1:>99999999999}"}]), "without ! or :"),
        (_keymap(tmp_path / "attr.json", [{"match": "(a)", "target": "{1.__class__}"}]), "is not a group"),
        (_keymap(tmp_path / "types.json", [{"match": 5, "target": "x"}]), "non-empty string"),
        (_keymap(tmp_path / "rules.json", {"a": 1}), "rules must be a list"),
        (_keymap(tmp_path / "many.json", [{"match": "a", "target": "x"}] * 5000), "over the limit"),
        (_keymap(tmp_path / "cfg.json", config=json.loads('{"a": ' * 500 + "1" + "}" * 500)), "nested at most"),
    ]
    notjson = tmp_path / "notjson.json"
    notjson.write_text("{format: keymap")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"format": "\xe9"}')
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    return cases + [(notjson, "key map is not valid JSON"), (deep, "nested too deeply"), (latin, "not valid JSON"),
                    (fifo, "not a regular file")]


@pytest.mark.torch
def test_key_maps_the_safe_engine_cannot_run_or_that_are_not_key_maps(tmp_path):
    from locpath.errors import CheckpointError
    from locpath.export.keymap import load_keymap

    for km, fragment in _bad_key_maps(tmp_path):
        with pytest.raises(CheckpointError) as err:
            load_keymap(km)
        assert str(err.value).startswith(str(km)) and fragment in str(err.value), (fragment, str(err.value))


@pytest.mark.torch
def test_import_names_the_key_map_and_pattern_it_refuses(tmp_path):
    llm = _tiny_llm(tmp_path / "llm")
    stage2 = write_st(tmp_path / "stage2.safetensors", good_header(), b"\0" * 16)
    cases = {p.name: (p, f) for p, f in _bad_key_maps(tmp_path)}
    for name in ("backref.json", "lookahead.json", "deep.json", "fifo.json"):
        km, fragment = cases[name]
        _one_line(_import(llm, stage2, km, tmp_path / "out"), km, fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.torch
def test_import_refuses_an_llm_folder_with_escaping_or_special_files(tmp_path):
    km = _keymap(tmp_path / "km.json", [{"match": "a|b", "target": "resampler.latents"}])
    stage2 = write_st(tmp_path / "stage2.safetensors", good_header(), b"\0" * 16)
    secret = write_st(tmp_path / "secret.safetensors", good_header(), b"\0" * 16)
    llm = _tiny_llm(tmp_path / "llm")
    (llm / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    os.symlink(secret, llm / "model-1.safetensors")
    _one_line(_import(llm, stage2, km, tmp_path / "out"), "model-1.safetensors", "outside its folder")
    llm2 = _tiny_llm(tmp_path / "llm2")
    (llm2 / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../secret.safetensors"}}))
    _one_line(_import(llm2, stage2, km, tmp_path / "out"), "model.safetensors.index.json", "not a plain file name")
    llm3 = _tiny_llm(tmp_path / "llm3")
    os.mkfifo(llm3 / "generation_config.json")
    _one_line(_import(llm3, stage2, km, tmp_path / "out"), "generation_config.json", "not a regular file")
    llm4 = _tiny_llm(tmp_path / "llm4")
    (llm4 / "config.json").write_text('{"a": ' * 100_000 + "1" + "}" * 100_000)
    _one_line(_import(llm4, stage2, km, tmp_path / "out"), "config.json", "nested too deeply")
    llm = _tiny_llm(tmp_path / "llm5")
    fifo = tmp_path / "options.fifo"
    os.mkfifo(fifo)
    t0 = time.monotonic()  # option files that are FIFOs or nested past the parser: one line, never blocked
    _one_line(_import(llm, stage2, km, tmp_path / "out", "--config", fifo), fifo, "not a regular file")
    _one_line(_import(llm, stage2, km, tmp_path / "out", "--chat-template", fifo), fifo, "not a regular file")
    deep = tmp_path / "deep.json"
    deep.write_text("{" + '"a": {' * 100_000 + "}" * 100_001)
    _one_line(_import(llm, stage2, km, tmp_path / "out", "--config", deep), deep, "not valid JSON")
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "out").exists()


# -- PEFT modules_to_save -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm_and_adapter(tmp_path_factory):
    """The reduced Qwen2.5 folder of test_import.py and a PEFT adapter trained with modules_to_save=["lm_head"]:
    PEFT saves a whole lm_head, which replaces the base's at merge."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from test_import import write_qwen_folder

    root = tmp_path_factory.mktemp("peft_save")
    hf = write_qwen_folder(root / "Qwen2.5-reduced")
    base = AutoModelForCausalLM.from_pretrained(hf, local_files_only=True, dtype=torch.float32)
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(root / "adapter")
    return hf, root / "adapter"


def _peft_import(hf, adapter, out, *extra):
    from test_import import HEADS, LOCPATH_OVERRIDES

    config = dict(LOCPATH_OVERRIDES, cara={"num_heads": HEADS})
    return cli("import", "--llm", hf, "--lora", adapter, "--out", out, "--allow-missing", "--cara-layers", "1,3",
               "--config", json.dumps(config), "--json", *extra, timeout=600)


@pytest.mark.torch
@pytest.mark.parametrize("stream", ["off", "on"])
def test_peft_modules_to_save_is_said_recorded_and_applied(llm_and_adapter, tmp_path, stream):
    from safetensors.numpy import load_file

    hf, adapter = llm_and_adapter
    res = _peft_import(hf, adapter, tmp_path / "ckpt", "--stream", stream, "--dtype", "float32")
    assert res.returncode == 0, res.stderr[-3000:]
    warnings = [ln for ln in res.stderr.splitlines() if "wholesale" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("locpath: warning: ") and "lm_head" in warnings[0], \
        res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    summary = json.loads(res.stdout)
    assert summary["lora"][0]["replaced_modules"] == ["lm_head"]
    saved = json.loads((tmp_path / "ckpt" / "import.json").read_text())
    assert saved["lora"][0]["replaced_modules"] == ["lm_head"]
    want = load_file(str(adapter / "adapter_model.safetensors"))["base_model.model.lm_head.weight"]
    got = load_file(str(tmp_path / "ckpt" / "model.safetensors"))["llm.lm_head.weight"]
    np.testing.assert_array_equal(got, want)  # the adapter's lm_head, not the base's


@pytest.mark.torch
def test_peft_modules_to_save_with_another_shape_is_refused(llm_and_adapter, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    hf, adapter = llm_and_adapter
    bad = tmp_path / "adapter"
    shutil.copytree(adapter, bad)
    sd = load_file(str(bad / "adapter_model.safetensors"))
    w = sd["base_model.model.lm_head.weight"]
    sd["base_model.model.lm_head.weight"] = np.zeros((w.shape[0] + 64, w.shape[1]), w.dtype)  # a grown vocabulary
    save_file(sd, str(bad / "adapter_model.safetensors"))
    for stream in ("off", "on"):
        line = _one_line(_peft_import(hf, bad, tmp_path / "ckpt", "--stream", stream), bad, "lm_head",
                         f"[{w.shape[0] + 64}, {w.shape[1]}]", f"[{w.shape[0]}, {w.shape[1]}]")
        assert "modules_to_save" in line
    assert not (tmp_path / "ckpt").exists()
