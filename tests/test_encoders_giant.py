"""`bench --encoders-giant` (issue 24): the full-depth run's own code path (a child process per encoder, the
project's exporter, PyTorch fp32 against ONNX Runtime fp32 on real tissue tiles) on a depth-1 Virchow2 at its real
width; a failing encoder (an error in its child, a child killed) is reported beside the others, not raised."""

from __future__ import annotations

import pytest

from servers import cli, shipped

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def giant(real_svs, tmp_path_factory):
    from locpath.bench.encoders_giant import bench_encoders_giant

    work = tmp_path_factory.mktemp("giant")
    # virchow2 at depth 1 (its real width, registers and cls+mean pooling); uni_v2 at a depth its registry entry
    # refuses, so its child fails in the build phase
    res = bench_encoders_giant(work, lambda m: None, encoders=["uni_v2", "virchow2"], slide=real_svs,
                               depth={"virchow2": 1, "uni_v2": 99}, tiles={"real": 2, "synthetic": 1, "noise": 1},
                               batch=2, repeats=1, keep=True)
    return work, res


@pytest.mark.slow  # a ViT-H-wide export and validation: ~20 s
def test_an_encoder_is_exported_validated_and_measured_in_its_own_child(giant):
    work, res = giant
    assert res["failed"] == ["uni_v2"]  # the failing one beside it did not stop it
    v = res["encoders"]["virchow2"]
    assert v["ok"] and v["depth"] == 1 and not v["full_depth"]
    assert v["out_dim"] == 2560 and v["params"] > 20_000_000  # CLS + mean of patch tokens at width 1280
    assert v["validation"]["tiles"] == {"real": 2, "synthetic": 1, "noise": 1}
    assert v["validation"]["cosine_min"] > 0.9999 and v["validation"]["cosine_min_real"] > 0.9999
    assert 0 <= v["validation"]["max_abs_diff"] < 1e-3 < v["validation"]["max_abs_feature"]
    files = work / "virchow2"
    assert (files / v["onnx"]).stat().st_size == v["onnx_bytes"] > v["weights_bytes_fp32"] * 0.9
    assert v["data_files"] == [] and v["data_bytes"] == 0  # under 2 GB: the weights are in the graph file
    assert v["export_s"] > 0 and v["validation_s"] > 0 and v["ort_fp32"]["tiles_per_s"] > 0
    assert 0 < v["ort_fp32"]["cores_busy"] <= 2.2 and 0 < v["pytorch_fp32_cores_busy"] <= 2.2
    assert set(v["phase_peak_rss_mb"]) == {"build", "export", "reference", "ort"}
    # the child's own peak: at least its weights, and the max of its phases
    assert v["peak_rss_mb"] == max(v["phase_peak_rss_mb"].values()) > v["weights_bytes_fp32"] / 2**20
    assert not (work / "virchow2.heartbeat.json").exists()


def test_a_failing_encoder_is_reported_with_its_phase_and_error(tmp_path):
    from locpath.bench.encoders_giant import bench_encoders_giant

    # uni_v2 at a depth its registry entry refuses: its child fails in the build phase
    res = bench_encoders_giant(tmp_path, lambda m: None, encoders=["uni_v2"], depth={"uni_v2": 99})
    u = res["encoders"]["uni_v2"]
    assert res["failed"] == ["uni_v2"] and not u["ok"] and u["phase"] == "build"
    assert u["error"].startswith("ConfigError: tile encoder uni_v2: the config differs from the registry: depth 99")
    assert u["peak_rss_mb"] > 0


def test_a_killed_child_is_reported_with_its_last_phase(tmp_path):
    from locpath.bench.encoders_giant import bench_encoders_giant

    res = bench_encoders_giant(tmp_path, lambda m: None, encoders=["gigapath"], depth={"gigapath": 1},
                               timeout_s=4)
    g = res["encoders"]["gigapath"]
    assert res["failed"] == ["gigapath"] and not g["ok"]
    assert g["error"] == "timed out after 4 s (child killed)"
    assert g["phase"] in (None, "start", "build", "export")  # where the last heartbeat found it
    assert not (tmp_path / "gigapath").exists()  # its partial export deleted


def test_names_and_a_wrong_one_on_the_cli():
    from locpath.bench.encoders_giant import GIANT, giant_names

    assert giant_names(None) == giant_names("all") == list(GIANT)
    assert giant_names("H-optimus-1, UNI2-h") == ["uni_v2", "hoptimus0"]  # registry order; hoptimus1 as hoptimus0
    r = cli("bench", shipped(), "--encoders-giant", "uni_v1,virchow2", "--workdir", "/nonexistent/never-made")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == ("locpath: error: --encoders-giant: 'uni_v1' is not one of the giant encoders (uni_v2, "
                                "virchow2, hoptimus0, gigapath, or hoptimus1 which runs as hoptimus0)")
