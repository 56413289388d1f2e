"""`locpath batch` under hostile or careless inputs, through the CLI in a subprocess with the shipped bundle: a rerun
into the same --out with other questions asks them (records are keyed by slide content, questions, options and
bundle), and slide lists or question files that can never work are refused in one line naming the file."""

import json
import os
import time

import pytest

from servers import cli, shipped
from servers import one_line as _one_line


def _batch(slides, questions, out, *extra, cache):
    return cli("batch", shipped(), "--slides", slides, "--questions", questions, "--out", out, "--cache-dir", cache,
               "--json", "--quiet", "--no-overlap", *extra, timeout=300)


def test_rerun_with_other_questions_asks_them_and_the_same_questions_skip(small_svs, tmp_path):
    q1, q2 = tmp_path / "q1.txt", tmp_path / "q2.txt"
    q1.write_text("What is the diagnosis?\n")
    q2.write_text("Is necrosis present?\nWhich organ is this?\n")
    out, cache = tmp_path / "out", tmp_path / "cache"

    first = _batch(small_svs, q1, out, cache=cache)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["done"] == 1

    second = _batch(small_svs, q2, out, cache=cache)  # the old code: "1 already done", the new questions never asked
    assert second.returncode == 0, second.stderr
    s2 = json.loads(second.stdout)
    assert (s2["done"], s2["skipped"], s2["records"]) == (1, 0, 1)
    (rec,) = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    assert [a["question"] for a in rec["answers"]] == ["Is necrosis present?", "Which organ is this?"]
    assert all(a["answer"] for a in rec["answers"])

    again = _batch(small_svs, q2, out, cache=cache)  # the same questions: nothing to do
    s3 = json.loads(again.stdout)
    assert again.returncode == 0 and (s3["done"], s3["skipped"]) == (0, 1)
    back = _batch(small_svs, q1, out, cache=cache)  # the first set's record is still there
    assert json.loads(back.stdout)["skipped"] == 1
    (rec,) = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    assert [a["question"] for a in rec["answers"]] == ["What is the diagnosis?"]

    capped = _batch(small_svs, q1, out, "--max-new-tokens", "3", cache=cache)  # an option that changes answers
    s4 = json.loads(capped.stdout)
    assert capped.returncode == 0 and s4["done"] == 1
    assert len(list((out / "records").glob("*.json"))) == 3


@pytest.fixture
def questions(tmp_path):
    q = tmp_path / "q.txt"
    q.write_text("What is the diagnosis?\n")
    return q


def test_slide_list_entries_that_can_never_be_slides(small_svs, questions, tmp_path):
    loop = tmp_path / "loop.svs"
    os.symlink(loop, loop)
    (tmp_path / "a").mkdir()
    os.symlink(tmp_path / "b", tmp_path / "b2")  # a two-link loop
    os.symlink(tmp_path / "b2", tmp_path / "b")
    fifo = tmp_path / "pipe.svs"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.svs"
    folder.mkdir()
    cases = [(f"{small_svs}\nloop.svs\n", "loop.svs", "symbolic link loop", 2),
             ("b/x.svs\n", "b/x.svs", "symbolic link loop", 1),
             (f"{folder}\n", "folder.svs", "is a folder", 1),
             (f"# fifo\n{fifo}\n", "pipe.svs", "not a regular file", 2),
             ("/dev/null\n", "/dev/null", "not a regular file", 1),
             ("x" * 5000 + ".svs\n", "xxxx", "cannot be read", 1),
             ("a\0b.svs\n", "a", "not a valid path", 1)]
    for text, entry, problem, line in cases:
        listing = tmp_path / "list.txt"
        listing.write_text(text)
        t0 = time.monotonic()
        res = _batch(listing, questions, tmp_path / "out", cache=tmp_path / "cache")
        _one_line(res, listing, f"line {line}", entry, problem)
        assert time.monotonic() - t0 < 30
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_slide_list_and_question_files_that_are_not_text(small_svs, questions, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"slide\xe9.svs\n")
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as f:
        f.truncate((16 << 20) + 1)
    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)
    for path, fragment in [(bad, "not UTF-8"), (huge, "over the"), (fifo, "not a regular file")]:
        _one_line(_batch(path, questions, tmp_path / "out", cache=tmp_path / "cache"), path, fragment)

    many = tmp_path / "many.txt"
    many.write_text("Is it?\n" * 1_000_000)
    long = tmp_path / "long.txt"
    long.write_text("Is it " + "very " * 2_000_000 + "big?\n")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    for path, fragment in [(many, "1000000 questions, over the limit"), (long, "question 1 is"),
                           (deep, "not a JSON list of questions"), (fifo, "not a regular file"),
                           (huge, "over the")]:
        t0 = time.monotonic()
        _one_line(_batch(small_svs, path, tmp_path / "out", cache=tmp_path / "cache"), path, fragment)
        assert time.monotonic() - t0 < 30
