"""The `locpath` command as a package of command modules: every option documented, one set of runtime flags with
per-command defaults, `--help` free of heavy imports, `bench --json` on stdout, and a failure after answers reported
with them (PartialAnswers) in the one `ask --json` document."""

import argparse
import json
import subprocess
import sys

from servers import cli, shipped

from locpath.cli import build_parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_has_help():
    missing = [f"{name} {a.option_strings or a.dest}"
               for name, sp in _subparsers(build_parser()).items() for a in sp._actions
               if not isinstance(a, argparse._HelpAction) and not (a.help and a.help != argparse.SUPPRESS)]
    assert not missing, f"options without help text: {missing}"


def test_demo_help_says_what_the_demo_does():
    text = " ".join(_subparsers(build_parser())["demo"].format_help().split())
    assert "shipped reference bundle" in text and "three synthetic slides" in text and "slide cache" in text
    assert "--decoder" in text and "WORKDIR/slide-cache" in text


def test_runtime_flags_are_one_set_with_per_command_defaults(tmp_path):
    from locpath.cli import batch, serve

    parsers = _subparsers(build_parser())
    for name in ("ask", "chat", "serve", "batch", "demo", "eval"):
        opts = {o for a in parsers[name]._actions for o in a.option_strings}
        assert {"--device", "--threads", "--decoder", "--decode-batch", "--cache-dir", "--no-cache",
                "--memory-slides", "--tile-batch", "--trusted-keys"} <= opts, name
    p = build_parser()
    sv = serve.serve_config(p.parse_args(["serve", "b", "--data-dir", str(tmp_path), "--decoder", "plain"]))
    assert sv.runtime.decoder == "plain" and sv.runtime.memory_slides == 16 and sv.runtime.decode_batch == 8
    bt = batch.batch_config(p.parse_args(["batch", "b", "--slides", "s", "--questions", "q", "--out", "o",
                                          "--decode-batch", "3", "--no-cache"]))
    assert bt.runtime.decode_batch == 3 and bt.runtime.memory_slides == 1 and bt.runtime.use_cache is False
    ask = p.parse_args(["ask", "b", "s", "q"])
    assert (ask.memory_slides, ask.decode_batch, ask.use_cache) == (8, 8, True)


def test_help_imports_no_heavy_library():
    code = """
import sys
from locpath.cli import build_parser, main
p = build_parser()
for sp in next(a for a in p._actions if hasattr(a, 'choices') and isinstance(a.choices, dict)).choices.values():
    sp.format_help()
bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'timm', 'onnxruntime',
                                                            'openvino', 'fastapi', 'ray'))
assert not bad, bad
print('ok')
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
    res = cli("--help")
    assert res.returncode == 0 and "demo" in res.stdout


def test_ask_json_reports_the_answers_given_before_a_failure(small_svs, tmp_path):
    (tmp_path / "a-file").write_text("")
    res = cli("ask", shipped(), small_svs, "What is the diagnosis?", "Is necrosis present?", "--json",
              "--decode-batch", "1", "--cache-dir", tmp_path / "cache", "--evidence", tmp_path / "a-file" / "ev.png")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    doc = json.loads(res.stdout)  # one document: the answers, then the error
    assert doc["schema"] == "locpath-answers/1" and len(doc["answers"]) == 2 and all(a["answer"] for a in doc["answers"])
    assert "a-file" in doc["error"]
    assert res.stderr.strip().splitlines() == [f"locpath: error: {doc['error']}"]


def test_bench_json_prints_the_report_and_json_file_writes_it(tmp_path):
    res = cli("bench", shipped(), "--tiles", "40", "--repeats", "1", "--warmup", "0", "--no-baselines",
              "--workdir", tmp_path / "work", "--json", "--json-file", tmp_path / "report.json")
    assert res.returncode == 0, res.stderr[-2000:]
    printed = json.loads(res.stdout)  # stdout is the report alone; progress went to stderr
    assert printed["schema"] == "locpath-bench/1" and "bench:" in res.stderr
    assert json.loads((tmp_path / "report.json").read_text()) == printed
