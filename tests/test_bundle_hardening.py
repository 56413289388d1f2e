"""A bundle someone else could write to: paths leaving the folder, hand edits, templates, signatures and broken
manifests are refused with one line (locpath.bundle), through the CLI in a subprocess."""

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
from conftest import reseal
from cli_checks import Q, assert_answered, assert_refused, run


@pytest.fixture()
def bundle(ref_bundle, tmp_path) -> Path:
    b = tmp_path / "bundle"
    shutil.copytree(ref_bundle, b)
    return b

@pytest.mark.parametrize("member", ["/etc/passwd", "../outside.onnx", "/dev/zero", "sub/../../x.onnx"])
def test_manifest_paths_outside_the_bundle_are_refused(bundle, tmp_path, member):
    outside = tmp_path / "outside.onnx"
    shutil.copy(bundle / "tis.onnx", outside)
    size = 0 if member == "/dev/zero" else (outside.stat().st_size if "outside" in member else 10)

    def point_outside(mf):
        entry = mf["files"].pop("tis.onnx")
        entry["bytes"] = size
        mf["files"][member] = entry
        mf["components"]["tis"]["file"] = member

    reseal(bundle, point_outside)
    start = time.time()
    assert_refused(run("ask", bundle, "x.svs", Q, "--no-cache"), "manifest.json")
    assert time.time() - start < 60  # /dev/zero is never read

def test_data_files_and_checksum_list_are_confined(bundle):
    reseal(bundle, lambda mf: mf["components"]["tis"]["data_files"].append("../../../etc/hostname"))
    assert_refused(run("verify", bundle), "etc/hostname", "leaves or names the bundle folder")
    sums = bundle / "SHA256SUMS"
    sums.write_text(sums.read_text() + f"{'0' * 64}  /etc/passwd\n")
    assert_refused(run("verify", bundle), "SHA256SUMS", "absolute path")

def test_a_hand_edited_manifest_is_refused(bundle):
    mf = json.loads((bundle / "manifest.json").read_text())
    mf["generation"]["max_new_tokens"] = 200
    (bundle / "manifest.json").write_text(json.dumps(mf, indent=2))
    assert_refused(run("ask", bundle, "x.svs", Q), "manifest.json: checksum mismatch with SHA256SUMS")

def test_chat_template_is_checksummed_and_used(bundle, slide, cached):
    tmpl = bundle / "chat_template.jinja"
    tmpl.write_text(tmpl.read_text().replace("message['content']", "'Pathologist asks: ' + message['content']"))
    assert_refused(run("ask", bundle, slide, Q, "--no-cache"), "chat_template.jinja", "was modified")

    def rehash(mf):
        mf["files"]["chat_template.jinja"] = {"sha256": hashlib.sha256(tmpl.read_bytes()).hexdigest(),
                                              "bytes": tmpl.stat().st_size}

    reseal(bundle, rehash)
    (bundle / "SHA256SUMS").write_text("\n".join(
        ln if not ln.endswith("  chat_template.jinja") else f"{hashlib.sha256(tmpl.read_bytes()).hexdigest()}  "
        "chat_template.jinja" for ln in (bundle / "SHA256SUMS").read_text().splitlines()) + "\n")
    got = assert_answered(run("ask", bundle, slide, Q, "--json", "--no-cache"))["answers"][0]
    assert got["generation"]["prompt_tokens"] > cached[1]["generation"]["prompt_tokens"]  # the template built it

def test_signatures_under_a_trusted_keys_setting(bundle, slide, tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    assert run("keygen", keys / "site").returncode == 0
    assert run("keygen", keys / "intruder").returncode == 0
    assert oct((keys / "site.key").stat().st_mode & 0o777) == "0o600"
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    shutil.copy(keys / "site.pub", trusted / "site.pem")
    assert_refused(run("ask", bundle, slide, Q, "--no-cache", "--trusted-keys", trusted), "is not signed")
    assert_refused(run("verify", bundle, env={"LOCPATH_TRUSTED_KEYS": str(trusted)}), "is not signed")
    assert run("sign", bundle, "--key", keys / "intruder.key").returncode == 0
    assert_refused(run("verify", bundle, "--trusted-keys", trusted), "SHA256SUMS.sig", "not among the trusted keys")
    assert run("sign", bundle, "--key", keys / "site.key").returncode == 0
    assert_answered(run("ask", bundle, slide, Q, "--json", "--no-cache", "--trusted-keys", trusted), warnings=0)
    reseal(bundle, lambda mf: mf["generation"].update(max_new_tokens=3))  # consistent edit after signing
    assert_refused(run("ask", bundle, slide, Q, "--no-cache", "--trusted-keys", trusted),
                   "signature does not match SHA256SUMS")
    assert_refused(run("sign", bundle, "--key", keys / "site.pub"), "site.pub", "private key")

def test_broken_manifests(bundle):
    cases = [
        (lambda mf: mf.update(components=[]), "components must be a JSON object"),
        (lambda mf: mf["components"].pop("tile_encoder"), "components lack tile_encoder"),
        (lambda mf: mf["generation"].update(max_length=-4), "generation.max_length"),
        (lambda mf: mf["generation"].update(stop_tokens=["<|not-a-token|>"]), "'<|not-a-token|>' is not a token"),
        (lambda mf: mf["preprocessing"].update(target_mpp="fast"), "preprocessing.target_mpp"),
        (lambda mf: mf["components"]["decoder"]["templates"].update(num_layers=0), "manifest.json: components.decoder.templates"),
    ]
    pristine = (bundle / "manifest.json").read_text()
    for mutate, fragment in cases:
        (bundle / "manifest.json").write_text(pristine)
        reseal(bundle, mutate)
        assert_refused(run("ask", bundle, "x.svs", Q, "--no-cache"), fragment, str(bundle / "manifest.json"))
