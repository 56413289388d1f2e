"""The slide cache (locpath.runtime.slide_cache) degrades, never fails an answer, and a poisoned cache steers
nothing: through the CLI in a subprocess."""

import json
import os
import resource
import shutil
import signal

import numpy as np
import pytest
from cli_checks import Q, assert_answered, assert_refused, cache_copy, entry_dir, err_lines, no_temporaries, run, tree


def test_poisoned_memo_cannot_steer_a_delete_or_swap_latents(ref_bundle, slide, cached, tmp_path):
    cache = cache_copy(cached, tmp_path)
    victim = tmp_path / "victim"
    (victim / "keep").mkdir(parents=True)
    (victim / "keep" / "data.txt").write_text("precious")
    before = tree(victim)
    memo = cache / "hashes.json"
    m = json.loads(memo.read_text())
    (key,) = m["entries"]
    m["entries"][key] = "../../victim"
    memo.write_text(json.dumps(m))
    res = run("ask", ref_bundle, slide, Q, "--json", "--cache-dir", cache)
    ans = assert_answered(res, warnings=0)["answers"][0]
    assert ans["answer"] == cached[1]["answer"] and tree(victim) == before  # nothing outside the cache deleted

    # slide B mapped to slide A's digest: B must be answered from B's own pixels
    other = tmp_path / "other.svs"
    from locpath.synth import make_spec, write_slide

    write_slide(make_spec(777, diagnosis="benign", organ="kidney", necrosis=False), other)
    fresh = assert_answered(run("ask", ref_bundle, other, Q, "--json", "--no-cache"))["answers"][0]
    digest_a = entry_dir(cache).name
    st = other.stat()
    m = json.loads(memo.read_text())
    m["entries"][f"{other.resolve()}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"] = digest_a
    memo.write_text(json.dumps(m))
    got = assert_answered(run("ask", ref_bundle, other, Q, "--json", "--cache-dir", cache))["answers"][0]
    assert got["slide"]["tiles"] == fresh["slide"]["tiles"] != cached[1]["slide"]["tiles"]
    assert got["answer"] == fresh["answer"] and not got["slide"]["cache_hit"]

def test_unwritable_cache_warns_once_and_answers(ref_bundle, slide, tmp_path):
    if os.geteuid() == 0:
        blocked = tmp_path / "not-a-folder"
        blocked.write_text("a file where the cache folder should be")
        cache, kw = blocked / "cache", {}
    else:
        cache, kw = tmp_path / "ro", {}
        cache.mkdir()
        cache.chmod(0o555)
    res = run("ask", ref_bundle, slide, Q, "Is necrosis present?", "--json", "--cache-dir", cache, **kw)
    out = assert_answered(res, warnings=1)
    assert "slide cache cannot be written" in err_lines(res)[0] and len(out["answers"]) == 2

def test_full_disk_while_caching_warns_once_and_answers(ref_bundle, slide, tmp_path):
    def small_files():  # writes past 16 KiB fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, 16 << 10))

    cache = tmp_path / "cache"
    res = run("ask", ref_bundle, slide, Q, "--json", "--cache-dir", cache, preexec=small_files)
    assert_answered(res, warnings=1)
    assert "cannot be written" in err_lines(res)[0]
    assert no_temporaries(cache) and not list(cache.rglob("features.h5"))  # nothing half-written

@pytest.mark.parametrize("damage", ["meta_empty", "memo_list", "nan_latents", "wrong_shape", "junk_h5"])
def test_damaged_cache_entries_are_dropped_and_recomputed(ref_bundle, slide, cached, tmp_path, damage):
    cache = cache_copy(cached, tmp_path)
    e = entry_dir(cache)
    if damage == "meta_empty":
        (e / "meta.json").write_text("{}")
    elif damage == "memo_list":
        (cache / "hashes.json").write_text("[1, 2, 3]")
    elif damage == "nan_latents":
        lat = np.load(e / "latents.npy")
        lat[0, 3, 5] = np.nan
        np.save(e / "latents.npy", lat)
    elif damage == "wrong_shape":
        np.save(e / "latents.npy", np.zeros((1, 3, 3), np.float32))
    else:
        (e / "features.h5").write_bytes(b"not hdf5 at all")
    res = run("ask", ref_bundle, slide, Q, "--json", "--cache-dir", cache)
    got = assert_answered(res, warnings=0 if damage == "memo_list" else 1)["answers"][0]
    assert got["answer"] == cached[1]["answer"] and got["slide"]["tiles"] == cached[1]["slide"]["tiles"]
    again = assert_answered(run("ask", ref_bundle, slide, Q, "--json", "--cache-dir", cache), warnings=0)
    assert again["answers"][0]["slide"]["cache_hit"]  # the recomputed entry is good

def test_a_deleted_slide_is_not_answered_from_the_cache(ref_bundle, slide, cached, tmp_path):
    gone = tmp_path / "gone.svs"
    shutil.copy(slide, gone)
    cache = cache_copy(cached, tmp_path)
    assert_answered(run("ask", ref_bundle, gone, Q, "--json", "--cache-dir", cache))
    gone.unlink()
    assert_refused(run("ask", ref_bundle, gone, Q, "--cache-dir", cache), str(gone), "file not found")
