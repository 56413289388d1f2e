"""Bad questions, options and stdin lines, and a closed pipe: one line, exit 2, nothing printed before (locpath.cli)."""

import json
import subprocess
import sys

from cli_checks import Q, assert_refused, cache_copy, err_lines, run


def test_bad_questions_and_options_fail_before_any_output(ref_bundle, slide):
    bad_utf8 = b"What is the \xff\xfe diagnosis?"
    res = subprocess.run([sys.executable, "-m", "locpath.cli", "ask", str(ref_bundle), str(slide), bad_utf8,
                          "--no-cache"], capture_output=True, timeout=120)
    assert_refused(res, "question 1", "not valid UTF-8")
    assert res.stdout == b""
    for opts, fragment in ((["--seed", "-1"], "--seed"), (["--temperature", "inf"], "--temperature"),
                           (["--repetition-penalty", "inf"], "--repetition-penalty"), (["--top-k", "-3"], "--top-k"),
                           (["--max-new-tokens", "100000"], "max_new_tokens 100000 does not fit")):
        res = run("ask", ref_bundle, slide, Q, "--no-cache", *opts)
        assert_refused(res, fragment)
        assert res.stdout == b""
    res = run("ask", ref_bundle, slide, Q, "--no-cache", "--json", "--max-new-tokens", "100000")
    assert_refused(res, "does not fit")
    out = json.loads(res.stdout)
    assert out["schema"] == "locpath-answers/1" and out["answers"] == [] and "does not fit" in out["error"]
    assert_refused(run("ask", ref_bundle, slide, "word " * 1000, "--no-cache"), "question 1", "prompt is")

def test_chat_survives_a_bad_line(ref_bundle, slide, cached, tmp_path):
    lines = b"What is the diagnosis?\n\xff\xfe broken\nIs necrosis present?\n"
    res = run("chat", ref_bundle, slide, "--cache-dir", cache_copy(cached, tmp_path), stdin=lines)
    assert res.returncode == 0 and b"Traceback" not in res.stderr
    assert res.stdout.decode().count("A: ") == 2
    assert sum("not valid UTF-8" in ln for ln in err_lines(res)) == 1

def test_broken_pipe_is_quiet(ref_bundle, slide, cached, tmp_path):
    cmd = [sys.executable, "-m", "locpath.cli", "ask", str(ref_bundle), str(slide), *([Q] * 20), "--cache-dir",
           str(cache_copy(cached, tmp_path))]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.readline()
    p.stdout.close()  # as `| head -1` does
    err = p.stderr.read()
    assert p.wait(timeout=120) == 2 and b"Traceback" not in err
    assert len(err.decode().strip().splitlines()) == 1 and b"pipe" in err
