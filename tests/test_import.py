"""`locpath inspect` and `locpath import` on random weights written in exactly the real layouts: a Qwen2.5-shaped
Hugging Face folder (bf16 safetensors in two shards + model.safetensors.index.json, a Qwen2-style byte-level BPE
tokenizer.json with Qwen's added tokens, tokenizer_config.json with Qwen2.5-Instruct's chat template), a PEFT LoRA
adapter folder written by peft itself, and a fake fp16 tensor-only stage2.pth in the shipped key map's guessed
names. locpath's side at the published widths (resampler 1024 wide, 128 latents, 96 kept, CONCH's 512-d features),
the LLM at reduced width and depth. Then export, INT4 build and answers through the runtime."""

import json

import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")  # the whole file needs torch

from locpath.cli import main

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_ADDED = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
              "<|repo_name|>", "<|file_sep|>"]
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
# Qwen2.5-Instruct's chat template (tokenizer_config.json), the tools branch included
QWEN25_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided "
    "with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == "
    "\"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)
HIDDEN, HEADS, KV_HEADS, LAYERS, FFN = 256, 2, 1, 4, 512  # head_dim 128 as Qwen2.5-7B; reduced width and depth
CARA_LAYERS = (1, 3)
PEFT_R, PEFT_ALPHA, RELEASE_R = 16, 32, 128  # the release's LoRA rank is 128
LOCPATH_OVERRIDES = {"resampler": {"depth": 1},
                     "tile_encoder": {"embed_dim": 64, "depth": 1, "num_heads": 2, "out_dim": 512,
                                      "name": "locpath-test-vit"}}
Q = "What is the diagnosis?"


def qwen_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from locpath.synth.qa import corpus

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    lines = corpus() + ["You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", "system", "user",
                        "assistant"]
    tok.train_from_iterator(lines * 3, trainer=trainer)
    tok.add_special_tokens(QWEN_SPECIAL)
    tok.add_tokens(QWEN_ADDED)
    return tok


def write_qwen_folder(path, seed: int = 0):
    """Qwen2.5's folder layout: config.json, generation_config.json, model-0000{1,2}-of-00002.safetensors (bf16),
    model.safetensors.index.json, tokenizer.json, tokenizer_config.json (with the chat template)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = qwen_tokenizer()
    vocab = (tok.get_vocab_size() + 63) // 64 * 64  # padded as Qwen pads 151665 tokens to 152064 rows
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=32768,
                      rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
                      bos_token_id=tok.token_to_id("<|endoftext|>"), eos_token_id=tok.token_to_id("<|im_end|>"))
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    size = sum(p.numel() * 2 for p in model.parameters())
    model.save_pretrained(path, max_shard_size=f"{size * 6 // 10 // 1000}KB")
    tok.save(str(path / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": t in QWEN_SPECIAL}
             for t in QWEN_SPECIAL + QWEN_ADDED}
    (path / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
        "chat_template": QWEN25_TEMPLATE, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
        "errors": "replace", "model_max_length": 131072, "pad_token": "<|endoftext|>",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}, indent=2))
    return path


def locpath_shapes(hf_dir):
    """The locpath tensors the release must fill, at the published widths with the test's overrides."""
    from transformers import AutoConfig

    from locpath.config import preset
    from locpath.export.importer import llm_config
    from locpath.models.slide_llm import LocPathModel

    cfg = preset("published")
    cfg.resampler.depth = 1
    cfg.tile_encoder.out_dim = 512
    cfg.llm = llm_config(AutoConfig.from_pretrained(hf_dir, local_files_only=True))
    cfg.tis.question_dim = HIDDEN
    cfg.cara.num_heads, cfg.cara.layers = HEADS, CARA_LAYERS
    cfg.tile_encoder.embed_dim, cfg.tile_encoder.depth, cfg.tile_encoder.num_heads = 64, 1, 2
    with torch.device("meta"):
        m = LocPathModel(cfg)
    return {k: tuple(v.shape) for k, v in m.state_dict().items() if k.startswith(("resampler.", "tis.", "cara."))}


def release_name(key: str) -> str | None:
    """locpath key -> the name the shipped key map guesses for the authors' release (None: packed elsewhere)."""
    p = "base_model.model."
    if key == "tis.embed.weight":
        return None  # the LLM's own embeddings
    if key.startswith("resampler.blocks."):
        _, _, i, mod, *rest = key.split(".")
        if mod in ("cross", "self_attn"):
            att = "cross_attn" if mod == "cross" else "self_attn"
            if rest[0] in ("q", "k", "v"):
                return None  # packed into in_proj_weight / in_proj_bias
            return f"{p}resampler.layers.{i}.{att}.out_proj.{rest[1]}"
        names = {"norm_lat": "norm_latents", "norm_tok": "norm_media", "norm_self": "norm_self", "norm_ff": "norm_ff"}
        if mod in names:
            return f"{p}resampler.layers.{i}.{names[mod]}.{rest[0]}"
        return f"{p}resampler.layers.{i}.ff.{'0' if rest[0] == 'fc1' else '2'}.{rest[1]}"
    if key.startswith("resampler."):
        rest = key[len("resampler."):]
        rest = rest.replace("in_proj.", "proj_in.")
        return f"{p}resampler.{rest}"
    if key.startswith("tis."):
        return p + key.replace("tis.q_proj", "tis.query_proj").replace("tis.l_proj", "tis.latent_proj")
    if key.endswith("attn_gate") or key.endswith("ffn_gate"):
        return p + key.replace("ffn_gate", "ff_gate")
    return p + key


def write_release(path, shapes: dict, seed: int = 1, lora: bool = True, extra: dict | None = None):
    """A fake stage2.pth: fp16 tensors only, in the guessed names; values that make every part matter (gates
    open, norms near one). Returns (what was written, the locpath tensors it should become)."""
    g = torch.Generator().manual_seed(seed)
    want, sd = {}, {}
    for k, shape in shapes.items():
        if k == "tis.embed.weight":
            continue
        if k.endswith(("_gate",)):
            t = torch.tensor(0.6)
        elif "norm" in k.split(".")[-2] and k.endswith("weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            fan = shape[-1] if len(shape) > 1 else 1
            t = torch.randn(shape, generator=g) / max(fan, 1) ** 0.5 * (0.5 if len(shape) > 1 else 0.05)
        want[k] = t.half().float()
    for k, t in want.items():
        name = release_name(k)
        if name is not None:
            sd[name] = t.half().reshape([1]) if k.endswith("_gate") else t.half()
    for i in range(1):
        for att, mod in (("cross_attn", "cross"), ("self_attn", "self_attn")):
            base = f"base_model.model.resampler.layers.{i}.{att}."
            sd[base + "in_proj_weight"] = torch.cat([want[f"resampler.blocks.{i}.{mod}.{x}.weight"] for x in "qkv"]).half()
            sd[base + "in_proj_bias"] = torch.cat([want[f"resampler.blocks.{i}.{mod}.{x}.bias"] for x in "qkv"]).half()
    if lora:
        for layer in range(LAYERS):
            for proj, (din, dout) in (("q_proj", (HIDDEN, HIDDEN)), ("v_proj", (HIDDEN, KV_HEADS * 128))):
                pre = f"base_model.model.model.layers.{layer}.self_attn.{proj}."
                sd[pre + "lora_A.weight"] = (torch.randn(RELEASE_R, din, generator=g) * 0.02).half()
                sd[pre + "lora_B.weight"] = (torch.randn(dout, RELEASE_R, generator=g) * 0.02).half()
    sd["base_model.model.mae_decoder.blocks.0.weight"] = torch.zeros(4, dtype=torch.float16)  # ignored by the map
    sd.update(extra or {})
    torch.save(sd, path)
    return sd, want


def write_peft_adapter(hf_dir, out, seed: int = 2):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, dtype=torch.float32)
    pm = get_peft_model(base, LoraConfig(r=PEFT_R, lora_alpha=PEFT_ALPHA, lora_dropout=0.0,
                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)  # B starts at zero in peft: make the merge matter
    pm.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("import")
    hf = write_qwen_folder(root / "Qwen2.5-reduced")
    peft_dir = write_peft_adapter(hf, root / "adapter")
    shapes = locpath_shapes(hf)
    sd, want = write_release(root / "stage2.pth", shapes)
    return {"root": root, "hf": hf, "peft": peft_dir, "stage2": root / "stage2.pth", "sd": sd, "want": want,
            "shapes": shapes}


def _one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("locpath: error: "), err
    return err[0]


def _import_args(r, out, *extra, config=None) -> list[str]:
    return ["import", "--llm", str(r["hf"]), "--stage2", str(r["stage2"]),
            "--config", json.dumps(config or LOCPATH_OVERRIDES), "--out", str(out), *map(str, extra)]


def write_conch(path, seed: int = 3):
    """CONCH v1's vision tower at depth 1 (real width, 448 px tiles, 512-d features), as its release names it
    (pytorch_model.bin, keys under 'visual.')."""
    from locpath.models.encoders import build_tile_encoder, encoder_config

    torch.manual_seed(seed)
    enc = build_tile_encoder(encoder_config("conch_v1", depth=1))
    sd = {k: v.clone() for k, v in enc.state_dict().items()}
    torch.save({f"visual.{k}": v.half() for k, v in sd.items()}, path)
    return {k: v.half().float() for k, v in sd.items()}


# -- inspect --------------------------------------------------------------------------------------------------------
def test_inspect_layouts(release, capsys):
    r = release
    files = sorted(p.name for p in r["hf"].iterdir())
    assert "model-00001-of-00002.safetensors" in files and "model-00002-of-00002.safetensors" in files
    assert "model.safetensors.index.json" in files
    assert main(["inspect", str(r["hf"]), "--json"]) == 0
    inv = json.loads(capsys.readouterr().out)
    assert inv["kind"] == "hf-folder" and len(inv["files"]) == 3 and inv["dtypes"] == {"bfloat16": inv["tensors"]}
    groups = {g["prefix"]: g for g in inv["groups"]}
    q = groups["model.layers.*.self_attn.q_proj.weight"]
    assert q["count"] == LAYERS and q["shape"] == [HIDDEN, HIDDEN] and q["dtypes"] == ["bfloat16"]
    assert groups["model.layers.*.self_attn.k_proj.bias"]["shape"] == [KV_HEADS * 128]
    index = json.loads((r["hf"] / "model.safetensors.index.json").read_text())
    assert inv["bytes"] == index["metadata"]["total_size"]
    assert inv["parameters"] == sum(g["parameters"] for g in inv["groups"])
    # the PEFT folder and the fp16 .pth (mmap'd, weights only)
    assert main(["inspect", str(r["peft"]), "--json"]) == 0
    inv = json.loads(capsys.readouterr().out)
    assert inv["kind"] == "peft-adapter" and inv["meta"]["r"] == PEFT_R
    a = {g["prefix"]: g for g in inv["groups"]}["base_model.model.model.layers.*.self_attn.q_proj.lora_A.weight"]
    assert a["count"] == LAYERS and a["shape"] == [PEFT_R, HIDDEN]
    assert main(["inspect", str(r["stage2"])]) == 0
    table = capsys.readouterr().out
    assert "torch" in table and "float16" in table
    assert main(["inspect", str(r["stage2"]), "--json"]) == 0
    inv = json.loads(capsys.readouterr().out)
    g = {g["prefix"]: g for g in inv["groups"]}
    assert g["base_model.model.model.layers.*.self_attn.q_proj.lora_B.weight"]["count"] == LAYERS
    assert g["base_model.model.cara.blocks.*.attn_gate"] == {**g["base_model.model.cara.blocks.*.attn_gate"],
                                                             "count": 2, "shape": [1]}
    assert inv["tensors"] == len(r["sd"]) and set(inv["dtypes"]) == {"float16"}
    # only the layer index collapses: a layer's nn.Sequential positions keep their own rows and shapes
    assert g["base_model.model.resampler.layers.*.ff.0.weight"]["shape"] == [4096, 1024]
    assert g["base_model.model.resampler.layers.*.ff.2.weight"]["shape"] == [1024, 4096]
    assert main(["inspect", str(r["stage2"]), "--depth", "3", "--json"]) == 0
    inv = json.loads(capsys.readouterr().out)
    assert {g["prefix"] for g in inv["groups"]} >= {"base_model.model.resampler.…", "base_model.model.model.…"}


def test_inspect_refuses_pickles_and_junk(tmp_path, capsys):
    import argparse

    p = tmp_path / "pickled.pth"
    torch.save({"w": torch.zeros(2), "args": argparse.Namespace(lr=1e-4)}, p)  # a training script's args: pickle
    line = _one_line_error(capsys, main(["inspect", str(p)]))
    assert str(p) in line and "needs pickle" in line
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 64)
    line = _one_line_error(capsys, main(["inspect", str(tmp_path / "bad.safetensors")]))
    assert "bad.safetensors" in line and "not a safetensors file" in line
    line = _one_line_error(capsys, main(["inspect", str(tmp_path)]))
    assert str(tmp_path) in line


def test_7b_scale_memory_is_checked_before_loading(monkeypatch, tmp_path):
    from locpath.errors import LocpathError
    from locpath.export import importer

    monkeypatch.setattr(importer, "available_bytes", lambda: 120 << 30)
    assert importer.choose_dtype("auto", 7_615_616_512, 8_300_000_000, tmp_path) == "bfloat16"
    assert importer.choose_dtype("auto", 2_593_024, 30_000_000, tmp_path) == "float32"
    monkeypatch.setattr(importer, "available_bytes", lambda: 22 << 30)
    with pytest.raises(LocpathError, match=r"needs about 34\.0 GiB .* 22\.0 GiB is available"):
        importer.choose_dtype("auto", 7_615_616_512, 8_300_000_000, tmp_path)
    with pytest.raises(LocpathError, match=r"in float32 needs about .*try --dtype bfloat16"):
        importer.choose_dtype("float32", 7_615_616_512, 8_300_000_000, tmp_path)


# -- key maps -------------------------------------------------------------------------------------------------------
def test_shipped_map_names(tmp_path):
    """The guess is self-consistent: wrappers, packed attention, lookups, LoRA, base weights, ignores."""
    from locpath.export.keymap import load_keymap

    km = load_keymap()
    plan = km.plan(["module.base_model.model.resampler.modules_to_save.default.latents",
                    "resampler.layers.0.self_attn.in_proj_weight",
                    "base_model.model.cara.layers.24.alpha_attn",
                    "base_model.model.model.layers.27.mlp.down_proj.lora_B.default.weight",
                    "base_model.model.model.layers.27.self_attn.q_proj.base_layer.bias",
                    "base_model.model.lm_head.weight", "base_model.model.resampler.original_module.latents",
                    "model.layers.0.self_attn.rotary_emb.inv_freq"], "names")
    got = {a.sources[0]: a.targets for a in plan.assignments}
    assert got["module.base_model.model.resampler.modules_to_save.default.latents"] == ["resampler.latents"]
    assert got["resampler.layers.0.self_attn.in_proj_weight"] == [f"resampler.blocks.0.self_attn.{x}.weight"
                                                                   for x in "qkv"]
    assert got["base_model.model.cara.layers.24.alpha_attn"] == ["cara.blocks.24.attn_gate"]
    assert got["base_model.model.model.layers.27.mlp.down_proj.lora_B.default.weight"] == [
        "llm.model.layers.27.mlp.down_proj.lora_B"]
    assert got["base_model.model.model.layers.27.self_attn.q_proj.base_layer.bias"] == [
        "llm.model.layers.27.self_attn.q_proj.bias"]
    assert got["base_model.model.lm_head.weight"] == ["llm.lm_head.weight"]
    assert len(plan.ignored) == 2
    assert [r.targets for r in km.derived] == [["tis.embed.weight"]]


def test_bad_key_maps_name_the_file_and_rule(tmp_path, capsys):
    from locpath.errors import CheckpointError
    from locpath.export.keymap import load_keymap

    def write(rules, **top):
        p = tmp_path / "map.json"
        p.write_text(json.dumps({"format": "locpath-keymap/1", "rules": rules, **top}))
        return p

    with pytest.raises(CheckpointError, match=r"map.json: rule 1: bad regex"):
        load_keymap(write([{"match": "a", "target": "b"}, {"match": "a(", "target": "b"}]))
    with pytest.raises(CheckpointError, match=r"map.json: rule 0: unknown fields \['tranform'\]"):
        load_keymap(write([{"match": "a", "target": "b", "tranform": ["transpose"]}]))
    with pytest.raises(CheckpointError, match=r"map.json: rule 0: '2' is not a group"):
        load_keymap(write([{"match": r"a\.(\d+)", "target": "b.{2}"}]))
    with pytest.raises(CheckpointError, match=r"map.json: rule 0: 3 targets need a split"):
        load_keymap(write([{"match": "a", "target": ["x", "y", "z"]}]))
    with pytest.raises(CheckpointError, match=r"map.json: unknown fields \['rulez'\]"):
        load_keymap(write([], rulez=[]))
    # a concat and a lookup, applied
    km = load_keymap(write([{"match": r"m\.(\d+)\.(?P<p>q|k)", "target": "qk.{1}", "lookup": {"1": {"0": "5"}},
                             "concat": {"group": "p", "order": ["q", "k"], "dim": 0}, "transform": ["transpose"]}]))
    from locpath.export.keymap import produce

    plan = km.plan(["m.0.k", "m.0.q"], "x")
    (a,) = plan.assignments
    assert a.targets == ["qk.5"] and a.sources == ["m.0.q", "m.0.k"]
    t = {"m.0.q": torch.ones(2, 3), "m.0.k": torch.zeros(1, 3)}
    assert produce(a, t.__getitem__)[0].shape == (3, 3)
    with pytest.raises(CheckpointError, match=r"1 keys match no rule .*: m\.1\.v"):
        km.plan(["m.1.v"], "x")
    # through the CLI: one line, the file named
    bad = write([{"match": "a(", "target": "b"}])
    code = main(["import", "--llm", str(tmp_path), "--key-map", str(bad), "--out", str(tmp_path / "o")])
    line = _one_line_error(capsys, code)
    assert str(bad) in line and "rule 0: bad regex" in line


def test_unmatched_and_misshaped_release_keys_are_refused(release, tmp_path, capsys):
    r = release
    bad = tmp_path / "stage2_extra.pth"
    write_release(bad, r["shapes"], lora=False,
                  extra={"base_model.model.resampler.layers.0.extra_scale": torch.ones(3, dtype=torch.float16)})
    args = _import_args(r, tmp_path / "out")
    args[args.index("--stage2") + 1] = str(bad)
    line = _one_line_error(capsys, main(args))
    assert "base_model.model.resampler.layers.0.extra_scale" in line and "match no rule" in line and str(bad) in line
    wrong = tmp_path / "stage2_shape.pth"
    write_release(wrong, r["shapes"], lora=False,
                  extra={"base_model.model.tis.query_proj.weight": torch.zeros(1024, HIDDEN + 1, dtype=torch.float16)})
    args[args.index("--stage2") + 1] = str(wrong)
    line = _one_line_error(capsys, main(args))
    assert "tis.query_proj.weight" in line and f"[1024, {HIDDEN + 1}]" in line and f"[1024, {HIDDEN}]" in line
    short = tmp_path / "stage2_short.pth"
    sd = {k: v for k, v in r["sd"].items() if "cara.blocks.3.router" not in k}
    torch.save(sd, short)
    args[args.index("--stage2") + 1] = str(short)
    line = _one_line_error(capsys, main(args))
    assert "cara.blocks.3.router.weight" in line and "filled by no release file" in line
    assert not (tmp_path / "out").exists()


# -- the whole path -------------------------------------------------------------------------------------------------
def test_import_export_int4_and_answers(release, tmp_path, capsys):
    from locpath.export.bundle import export_bundle
    from locpath.models.checkpoint import load_checkpoint
    from locpath.runtime.pipeline import Pipeline
    from locpath.wsi.features import FeatureFile, write_features

    r = release
    ckpt = tmp_path / "ckpt"
    conch = write_conch(tmp_path / "pytorch_model.bin")
    args = _import_args(r, ckpt, "--lora", r["peft"], "--encoder", "conch_v1", "--encoder-weights",
                        tmp_path / "pytorch_model.bin", "--json",
                        config={"resampler": {"depth": 1}, "tile_encoder": {"depth": 1}})
    args[args.index("--stage2"): args.index("--stage2") + 2] = ["--release", str(r["root"])]  # finds stage2.pth
    code = main(args)
    out = capsys.readouterr()
    assert code == 0, out.err
    summary = json.loads(out.out)
    assert summary["cara_layers"] == list(CARA_LAYERS) and summary["dtype"] == "float32"
    assert [x["rank"] for x in summary["lora"]] == [PEFT_R, RELEASE_R] and summary["random"] == ["mae_head"]
    assert (ckpt / "chat_template.jinja").read_text() == QWEN25_TEMPLATE
    model, tok = load_checkpoint(ckpt)
    assert tok.get_vocab_size() == json.loads((r["hf"] / "tokenizer.json").read_text())["added_tokens"][-1]["id"] + 1
    prompt = model.chat_template.render(Q)
    assert prompt.startswith("<|im_start|>system\nYou are Qwen") and prompt.endswith("<|im_start|>assistant\n")
    # the release's tensors, through the map (packed attention split, [1] gates as scalars, fp16 -> fp32)
    sd = model.state_dict()
    for k, v in r["want"].items():
        assert torch.equal(sd[k], v), k
    assert model.cfg.tile_encoder.family == "conch_v1" and summary["tile_encoder"]["weights"]["loaded"] == len(conch)
    for k, v in conch.items():
        assert torch.equal(sd[f"tile_encoder.{k}"], v), k
    assert torch.equal(sd["tis.embed.weight"], sd["llm.model.embed_tokens.weight"])
    # LoRA merged exactly as peft's merge: W + (alpha / r) B A, the adapter folder's and then the release's
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(r["hf"], local_files_only=True, dtype=torch.float32)
    ad = load_file(str(r["peft"] / "adapter_model.safetensors"))
    for layer in (0, 3):
        pre = f"base_model.model.model.layers.{layer}.self_attn.q_proj."
        w = base.model.layers[layer].self_attn.q_proj.weight.detach()
        w = w + (PEFT_ALPHA / PEFT_R) * ad[pre + "lora_B.weight"] @ ad[pre + "lora_A.weight"]
        w = w + (RELEASE_R / RELEASE_R) * r["sd"][pre + "lora_B.weight"].float() @ r["sd"][pre + "lora_A.weight"].float()
        got = sd[f"llm.model.layers.{layer}.self_attn.q_proj.weight"]
        assert torch.allclose(got, w, atol=1e-6, rtol=0), (layer, (got - w).abs().max())
        k_want = base.model.layers[layer].self_attn.k_proj.weight.detach() + (PEFT_ALPHA / PEFT_R) * \
            ad[pre.replace("q_proj", "k_proj") + "lora_B.weight"] @ ad[pre.replace("q_proj", "k_proj") + "lora_A.weight"]
        assert torch.allclose(sd[f"llm.model.layers.{layer}.self_attn.k_proj.weight"], k_want, atol=1e-6, rtol=0)
    # export (fp32, fused decoder) and INT4; the runtime answers as PyTorch does, token for token, in fp32
    bundle, _ = export_bundle(ckpt, tmp_path / "bundle", log=lambda m: None)
    assert (bundle / "chat_template.jinja").read_text() == QWEN25_TEMPLATE
    assert main(["build", str(bundle), str(tmp_path / "int4"), "--precision", "int4", "--json"]) == 0
    capsys.readouterr()
    rng = np.random.default_rng(0)
    n = 40
    h5 = write_features(tmp_path / "f.h5", FeatureFile(
        rng.normal(size=(n, 512)).astype(np.float32), np.stack([np.arange(n) % 8 * 448, np.arange(n) // 8 * 448], 1),
        448, 448, 0.5, 0.5, "conch_v1"))
    pipe = Pipeline.from_bundle(bundle, use_cache=False)
    assert pipe.prompt_ids(Q) == model.prompt_ids(tok, Q)  # the folder's template, in both
    ans = pipe.ask(h5, Q, max_new_tokens=8)
    lat = pipe.compress(pipe.read_feature_file(h5)).latents
    with torch.no_grad():
        want = model.answer_tokens(tok, torch.from_numpy(lat), [Q], max_new=8)[0]
    assert ans.generation["decoder"] == "decoder_fused" and ans.token_ids == want and len(want) == 8
    code = main(["ask", str(tmp_path / "int4"), str(h5), Q, "--no-cache", "--max-new-tokens", "8", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["answers"][0]["generation"]["new_tokens"] >= 1


def test_streamed_import_writes_the_same_checkpoint_tensor_by_tensor(release, tmp_path, capsys):
    """`--stream on` (what a 7B import takes automatically): the checkpoint written tensor by tensor from the shards,
    the PEFT and the release's LoRA merged per tensor, equals the in-memory import's; `export --stream-decoder`
    of it answers as PyTorch does, token for token."""
    from safetensors.torch import load_file

    from locpath.export.streamed import checkpoint_skeleton, export_streamed_bundle
    from locpath.models.checkpoint import load_checkpoint
    from locpath.runtime.pipeline import Pipeline
    from locpath.wsi.features import FeatureFile, write_features

    r = release
    assert main(_import_args(r, tmp_path / "mem", "--lora", r["peft"], "--stream", "off", "--json")) == 0
    capsys.readouterr()
    assert main(_import_args(r, tmp_path / "str", "--lora", r["peft"], "--stream", "on", "--dtype", "float32",
                             "--json")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["streamed"] and [x["weights"] > 0 for x in summary["lora"]] == [True, True]
    a, b = load_file(str(tmp_path / "mem" / "model.safetensors")), load_file(str(tmp_path / "str" / "model.safetensors"))
    assert set(a) == set(b)
    random = tuple(g + "." for g in summary["random"])  # left at random init by both (no file fills them)
    assert random == ("mae_head.", "tile_encoder.")
    worst = max(float((a[k] - b[k]).abs().max()) for k in a if not k.startswith(random))
    assert worst < 1e-5, worst
    for f in ("tokenizer.json", "chat_template.jinja"):
        assert (tmp_path / "mem" / f).read_bytes() == (tmp_path / "str" / f).read_bytes()

    model, tok = load_checkpoint(tmp_path / "str")
    skel, hf = checkpoint_skeleton(tmp_path / "str")
    bundle, _ = export_streamed_bundle(skel, hf, tmp_path / "bundle", quant="fp32", max_length=256,
                                       tokenizer_dir=tmp_path / "str", log=lambda m: None)
    n = 24
    rng = np.random.default_rng(1)
    h5 = write_features(tmp_path / "f.h5", FeatureFile(
        rng.normal(size=(n, model.cfg.feature_dim)).astype(np.float32),
        np.stack([np.arange(n) % 6 * 224, np.arange(n) // 6 * 224], 1), 224, 224, 0.5, 0.5, model.cfg.tile_encoder.name))
    pipe = Pipeline.from_bundle(bundle, use_cache=False)
    ans = pipe.ask(h5, Q, max_new_tokens=6)
    lat = pipe.compress(pipe.read_feature_file(h5)).latents
    with torch.no_grad():
        want = model.answer_tokens(tok, torch.from_numpy(lat), [Q], max_new=6)[0]
    assert ans.token_ids == want
