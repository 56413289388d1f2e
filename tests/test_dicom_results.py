"""Answers as DICOM where hospital systems look (issue 26): `ask --dicom-sr/--dicom-ann` on a DICOM slide made from
the small real SVS, checked by reading them back with highdicom and validating them with dicom3tools' dciodvfy;
`serve --store-results` storing both by STOW-RS on a real Orthanc, found there by QIDO-RS and read back by WADO-RS;
a failed store retried and shown in the job; bad inputs refused before any work."""

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

hd = pytest.importorskip("highdicom")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("dicomweb_client")

from servers import Orthanc, Server, cli, dicomize, one_line, shipped, wait_ready  # noqa: E402

Q1, Q2 = "What is the diagnosis?", "Is there necrosis?"


@pytest.fixture(scope="module")
def dicom_slide(real_svs, tmp_path_factory):
    """(study UID, series UID, files, folder) of the real SVS as a DICOM WSI series."""
    folder = tmp_path_factory.mktemp("dicom") / "series"
    study, series, files = dicomize(real_svs, folder)
    return study, series, files, folder


def base_header(files):
    """The largest VOLUME image of the series (the one the evidence coordinates are in)."""
    import pydicom

    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    vols = [h for h in heads if h.ImageType[2] == "VOLUME"]
    return max(vols, key=lambda h: h.TotalPixelMatrixColumns * h.TotalPixelMatrixRows)


def read_sr(sr) -> dict:
    """What a reader finds in the report: questions and answers, evidence rectangles and weights per question, the
    bundle digest (device observer serial number and algorithm parameter), the images it refers to."""
    from highdicom.sr.utils import find_content_items
    from pydicom.sr.codedict import codes

    report = sr.content
    out = {"qa": [], "tiles": {}, "images": set()}
    for g in report.get_image_measurement_groups():
        texts = {str(i.name.meaning): i.value for i in find_content_items(g[0], value_type=hd.sr.ValueTypeValues.TEXT)}
        out["qa"].append((texts["Request"], texts["Finding"]))
        out["params"] = [i.value for i in find_content_items(g[0], name=codes.DCM.AlgorithmParameters)]
    for g in report.get_planar_roi_measurement_groups():
        question = int(str(g.tracking_identifier).split()[1])
        pts = np.asarray(g.roi.value)
        weight = [m.value for m in g.get_measurements() if m.name == codes.DCM.Saliency][0]
        out["tiles"].setdefault(question, []).append((*pts.min(0), *pts.max(0), float(weight)))
        out["images"].add(str(g.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
    device = [c for c in report.get_observer_contexts() if c.observer_type == codes.DCM.Device][0]
    out["serial"] = device.observer_identifying_attributes.serial_number
    return out


def read_ann(ann, base) -> dict:
    """label -> [(x0, y0, x1, y1, weight)] in the base image's total pixel matrix (from slide coordinates)."""
    to_image = hd.spatial.ReferenceToImageTransformer.for_image(base, for_total_pixel_matrix=True)
    out = {}
    for g in ann.get_annotation_groups():
        _, values, _ = g.get_measurements()
        rects = [to_image(np.asarray(r)) for r in g.get_graphic_data(coordinate_type="3D")]
        out[g.label] = [(*r[:, :2].min(0), *r[:, :2].max(0), float(w)) for r, w in zip(rects, values[:, 0])]
    return out


def expected(answer: dict, size) -> list:
    ev = answer["evidence"]
    s = ev["tile_size_level0"]
    return [(t["x"], t["y"], min(t["x"] + s, size[0]), min(t["y"] + s, size[1]), t["weight"]) for t in ev["top"]]


def same_tiles(got, want) -> None:
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert np.allclose(g[:4], w[:4], atol=1e-3), (g, w)
        assert abs(g[4] - w[4]) < 1e-6, (g, w)


def bundle_digest() -> str:
    return hashlib.sha256((shipped() / "SHA256SUMS").read_bytes()).hexdigest()


def dciodvfy_errors(path: Path) -> list[str]:
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy is not installed (apt-get install dicom3tools)")
    res = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]


# -- ask --dicom-sr / --dicom-ann ----------------------------------------------------------------------------------
def test_ask_writes_a_dicom_sr_and_annotations_that_read_back_and_validate(dicom_slide, tmp_path):
    study, series, files, folder = dicom_slide
    sr_path, ann_path = tmp_path / "answers-sr.dcm", tmp_path / "evidence-ann.dcm"
    res = cli("ask", shipped(), folder, Q1, Q2, "--json", "--no-cache", "--dicom-sr", sr_path, "--dicom-ann", ann_path)
    assert res.returncode == 0, res.stderr[-2000:]
    answers = json.loads(res.stdout)["answers"]
    base = base_header(files)
    size = (base.TotalPixelMatrixColumns, base.TotalPixelMatrixRows)

    sr = hd.sr.srread(sr_path)
    assert sr.StudyInstanceUID == study and sr.SeriesInstanceUID != series and sr.Modality == "SR"
    got = read_sr(sr)
    assert got["qa"] == [(a["question"], a["answer"]) for a in answers]
    assert got["serial"] == bundle_digest() and f"bundle_sha256={bundle_digest()}" in got["params"]
    assert got["images"] == {str(base.SOPInstanceUID)}
    for i, a in enumerate(answers, 1):
        same_tiles(got["tiles"][i], expected(a, size))

    ann = hd.ann.annread(ann_path)
    assert ann.StudyInstanceUID == study and ann.FrameOfReferenceUID == base.FrameOfReferenceUID
    assert ann.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    tiles = read_ann(ann, base)
    for i, a in enumerate(answers, 1):
        same_tiles(tiles[f"question {i} evidence"], expected(a, size))
    assert dciodvfy_errors(sr_path) == [] and dciodvfy_errors(ann_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers-sr.dcm", "evidence-ann.dcm"]  # no temporaries


def test_trust_fields_go_into_the_report_when_the_answer_has_them(dicom_slide):
    """Confidence (NUM "Certainty of Impression") and warnings (TEXT "Comment") of the shared trust schema; an
    answer without them (older bundles, before TRUST) gives neither."""
    from highdicom.sr.utils import find_content_items
    from pydicom.sr.codedict import codes

    from locpath.bundle.integrity import verify_bundle
    from locpath.dicomout import build_objects
    from locpath.dicomout.identity import model_identity
    from locpath.dicomout.sources import read_source

    ident = model_identity(shipped(), verify_bundle(shipped(), check_files=False), "decoder")
    plain = {"question": Q1, "answer": "adenocarcinoma",
             "evidence": {"tile_size_level0": 224, "tiles": 2, "top": [{"x": 0, "y": 0, "weight": 1.0}]}}
    trusted = dict(plain, trust={"confidence": 0.42, "abstained": False, "warnings": [
        {"code": "low_confidence", "message": "the model is unsure"}]})
    sr, ann = build_objects(read_source(dicom_slide[3]), ident, [trusted, plain])
    groups = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_image_measurement_groups()
    nums = [[m.value for m in g.get_measurements() if m.name == codes.DCM.CertaintyOfImpression] for g in groups]
    notes = [[i.value for i in find_content_items(g[0], name=codes.DCM.Comment)] for g in groups]
    assert nums == [[0.42], []] and notes == [["low_confidence: the model is unsure"], []]
    assert ann.AnnotationGroupSequence[0].NumberOfAnnotations == 1


def test_dicom_outputs_refuse_bad_inputs_before_any_work(real_svs, dicom_slide, tmp_path):
    folder = dicom_slide[3]
    out = tmp_path / "sr.dcm"
    t0 = time.monotonic()
    svs = cli("ask", shipped(), real_svs, Q1, "--dicom-sr", out)
    one_line(svs, str(real_svs), "DICOM output needs a DICOM slide")
    assert "Q:" not in svs.stdout and not out.exists() and time.monotonic() - t0 < 60
    one_line(cli("ask", shipped(), folder, Q1, "--dicom-sr", "/proc/locpath-sr.dcm"), "/proc/locpath-sr.dcm",
             "--dicom-sr: cannot write in /proc")
    one_line(cli("ask", shipped(), folder, Q1, "--dicom-sr", tmp_path / "missing" / "sr.dcm"),
             "--dicom-sr: the folder", "does not exist")
    one_line(cli("ask", shipped(), folder, Q1, "--dicom-ann", tmp_path / "ann.txt"), "--dicom-ann must name a .dcm")
    one_line(cli("ask", shipped(), folder, Q1, "--dicom-sr", out, "--dicom-ann", out), "name the same file")
    assert list(tmp_path.iterdir()) == []
    one_line(cli("serve", shipped(), "--store-results", "--data-dir", tmp_path / "data"),
             "--store-results stores answers on the DICOMweb server", "--dicomweb URL")


# -- serve --store-results: STOW-RS to a real Orthanc -----------------------------------------------------------------
@pytest.fixture(scope="module")
def archive(dicom_slide, tmp_path_factory):
    """Orthanc holding the slide (stopped by the failing-store test, the last of this file)."""
    server = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    server.upload(dicom_slide[2])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def storing(archive, tmp_path_factory):
    """`locpath serve --store-results` on the archive (the URL carries a password that must never be shown)."""
    url = archive.dicomweb.replace("http://", "http://locpath:s3cret-pw@")
    with Server(shipped(), tmp_path_factory.mktemp("serve"), "--dicomweb", url, "--store-results",
                "--store-attempts", "2") as s:
        yield s


@pytest.fixture(scope="module")
def dicom_slide_id(storing, dicom_slide):
    with storing.client() as c:
        r = c.post("/v1/slides", json={"dicomweb": {"study": dicom_slide[0], "series": dicom_slide[1]}})
        assert r.status_code == 202, r.text
        s = wait_ready(c, r.json()["slide"]["id"])
        assert s["status"] == "ready", s
        return s["id"]


def stored_status(c, job_id: str, until: tuple, timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    job = None
    while time.time() < deadline:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if (job.get("dicom_store") or {}).get("status") in until:
            return job
        time.sleep(0.2)
    raise AssertionError(f"store of job {job_id} did not end: {job}")


def test_answers_are_stored_in_the_slides_study_and_read_back(storing, archive, dicom_slide, dicom_slide_id):
    from dicomweb_client.api import DICOMwebClient

    study, series, files, _ = dicom_slide
    with storing.client() as c:
        r = c.post(f"/v1/slides/{dicom_slide_id}/questions", json={"question": Q1})
        assert r.status_code == 200, r.text
        job = stored_status(c, r.json()["job"], ("stored", "failed"))
    st, answer = job["dicom_store"], job["result"]
    assert st["status"] == "stored" and st["attempts"] == 1 and st["study"] == study and st["last_error"] is None
    assert "s3cret" not in json.dumps(job)

    web = DICOMwebClient(url=archive.dicomweb)
    found = {s["0020000E"]["Value"][0]: s["00080060"]["Value"][0] for s in web.search_for_series(study)}  # QIDO-RS
    assert found[st["sr"]["series"]] == "SR" and found[st["annotations"]["series"]] == "ANN" and found[series] == "SM"
    sr = hd.sr.Comprehensive3DSR.from_dataset(web.retrieve_instance(study, st["sr"]["series"], st["sr"]["sop_instance"]))
    ann = hd.ann.MicroscopyBulkSimpleAnnotations.from_dataset(
        web.retrieve_instance(study, st["annotations"]["series"], st["annotations"]["sop_instance"]))
    base = base_header(files)
    size = (base.TotalPixelMatrixColumns, base.TotalPixelMatrixRows)
    got = read_sr(sr)
    assert got["qa"] == [(Q1, answer["answer"])] and r.json()["answer"] == answer["answer"]
    assert got["serial"] == bundle_digest()
    same_tiles(got["tiles"][1], expected(answer, size))
    same_tiles(read_ann(ann, base)["question 1 evidence"], expected(answer, size))


def test_a_failed_store_is_retried_and_shown_in_the_job(storing, archive, dicom_slide_id):
    archive.stop()  # the archive goes away after the slide was pulled
    with storing.client() as c:
        r = c.post(f"/v1/slides/{dicom_slide_id}/questions", json={"question": Q2})
        assert r.status_code == 200 and r.json()["answer"], r.text  # the answer is not held up by the store
        job = stored_status(c, r.json()["job"], ("stored", "failed"))
    st = job["dicom_store"]
    assert job["status"] == "done" and st["status"] == "failed" and st["attempts"] == st["max_attempts"] == 2
    assert "STOW-RS failed" in st["last_error"] and st["sr"]["sop_instance"] and st["annotations"]["sop_instance"]
    assert "s3cret" not in json.dumps(job)
