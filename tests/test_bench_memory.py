"""Memory measured right (issue 24): each figure from the process that did the work. The parent here holds a few
hundred MB it touched; a measured child's figure must not include them (Linux carries ru_maxrss across exec, so a
child reading it reports its parent's peak)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from servers import cli, shipped

PARENT_MB = 600


@pytest.fixture(scope="module")
def big_parent():
    """This process's resident set raised by PARENT_MB, held while the module's children run."""
    a = np.ones(PARENT_MB * 2**20, np.uint8)
    yield a
    del a


def test_a_child_step_reports_its_own_peak_not_its_parents(big_parent):
    from locpath.bench.child import run_step

    res = run_step("locpath.bench.child:probe", {"mb": 120})
    p = res["process"]
    assert res["touched_mb"] == 120
    assert 120 <= p["peak_rss_mb"] < PARENT_MB - 100, p  # its own 120 MB and an interpreter, not the parent's
    assert p["ru_maxrss_mb"] >= PARENT_MB, p  # what the old figure (ru_maxrss) said in the same child
    assert p["source"].startswith("VmHWM")


def test_a_step_outside_the_bench_is_refused():
    from locpath.bench.child import run_step
    from locpath.errors import LocpathError

    with pytest.raises(LocpathError, match="not a locpath.bench function"):
        run_step("os:system", {"command": "true"})


def test_cold_ask_from_a_slide_file_measured_in_its_own_process(big_parent, real_svs):
    """`bench --published --slide`'s step on the shipped bundle: a cold ask from the real slide region, then a
    second question on the cached slide; the peak is the child's own."""
    from locpath.bench.child import run_step

    res = run_step("locpath.bench.published_slide:cold_ask",
                   {"bundle": str(shipped()), "slide": str(real_svs), "new_tokens": 4})
    cold, warm = res["cold"], res["warm"]
    assert cold["tiles"] > 0 and cold["tiles_read"] == cold["tiles"] and not cold["cache_hit"]
    assert cold["tiles_per_s"] > 0 and cold["encoder_tiles_per_s"] >= cold["tiles_per_s"]
    assert warm["cache_hit"] and warm["tiles_read"] == 0
    assert cold["time_to_first_token_ms"] > warm["time_to_first_token_ms"] > 0
    assert res["cold_ttft_over_2x_warm_plus_encoder"] > 0
    assert res["process"]["peak_rss_mb"] < PARENT_MB - 100 <= res["process"]["ru_maxrss_mb"], res["process"]
    assert res["peak_rss_mb"] <= res["process"]["peak_rss_mb"] + 1


def test_an_answers_peak_rss_is_its_own_process(big_parent, real_svs, tmp_path):
    """`locpath ask --json` started by a process holding PARENT_MB: the answer's peak_rss_mb is the ask's own."""
    r = cli("ask", shipped(), real_svs, "What is the diagnosis?", "--json", "--no-cache", "--max-new-tokens", "2")
    assert r.returncode == 0, r.stderr
    ans = json.loads(r.stdout)
    ans = ans[0] if isinstance(ans, list) else ans
    assert 0 < ans["peak_rss_mb"] < PARENT_MB - 100, ans["peak_rss_mb"]


def test_sessions_are_made_and_run_at_load_not_in_the_first_question():
    """The warm-up at load: every session exists when from_bundle returns (ONNX Runtime read and prepacked the
    weights then), and `warmup=False` leaves them to the first question as before."""
    from locpath.runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(shipped(), use_cache=False)
    assert pipe.warmup_ms > 0 and all(r._sess is not None for r in pipe.runners.values())
    lazy = Pipeline.from_bundle(shipped(), use_cache=False, warmup=False)
    assert lazy.warmup_ms is None and lazy.runners["tile_encoder"]._sess is None


def test_prepacking_is_a_per_runner_session_setting():
    from locpath.runtime.ort_runner import OrtRunner

    path = shipped() / "cross_kv.onnx"
    on, off = OrtRunner(path, "cross_kv").load(), OrtRunner(path, "cross_kv", prepack=False).load()
    assert on.prepack and not off.prepack
    assert off.session.get_session_options().get_session_config_entry("session.disable_prepacking") == "1"
    assert on.session.get_session_options().get_session_config_entry("session.disable_prepacking") == "0"
