import os
import shutil
from pathlib import Path

import numpy as np
import pytest

# torch's OpenMP threads spin while they wait: on CI's 2 cores, beside ONNX Runtime, a server subprocess or a second
# xdist worker, small torch ops then ran 10-30x slower (measured on tests/test_models.py). Waiting passively changes no
# result; it has to be set before torch is first imported (test modules import it after this file).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

DATA = Path(__file__).resolve().parent / "data"  # shipped with the tests (see data/README.md)
REAL_SVS = DATA / "cmu_small_region.svs"


@pytest.fixture(scope="session")
def real_svs(tmp_path_factory) -> Path:
    if not REAL_SVS.exists():
        pytest.skip(f"{REAL_SVS} not present")
    dst = tmp_path_factory.mktemp("real") / REAL_SVS.name
    shutil.copy(REAL_SVS, dst)
    return dst


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synth")


@pytest.fixture(scope="session")
def small_spec():
    from locpath.synth import make_spec

    return make_spec(101, tiles=(10, 9), diagnosis="adenocarcinoma", grade="high grade", necrosis=True, organ="lung")


@pytest.fixture(scope="session")
def small_svs(small_spec, synth_dir) -> Path:
    from locpath.synth import write_slide

    return write_slide(small_spec, synth_dir / "small.svs", fmt="svs")


@pytest.fixture(scope="session")
def small_tiff(small_spec, synth_dir) -> Path:
    from locpath.synth import write_slide

    return write_slide(small_spec, synth_dir / "small.tiff", fmt="tiff")


@pytest.fixture(scope="session")
def tokenizer():
    from locpath.synth.qa import corpus
    from locpath.text import train_tokenizer

    return train_tokenizer(corpus(), 512)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture(scope="session")
def shipped_reference() -> Path:
    """The reference checkpoint shipped in the package (read, never written: exports write elsewhere)."""
    from locpath.checkpoints import shipped_checkpoint

    p = shipped_checkpoint("reference")
    if not (p / "model.safetensors").exists():
        pytest.skip("the shipped reference checkpoint is not present")
    return p


@pytest.fixture(scope="session")
def ref_bundle(tmp_path_factory) -> Path:
    """The reference bundle shipped in the package (`locpath export` of the shipped checkpoint, as
    test_shipped.py checks), copied once per session so that no test writes into the package. No torch."""
    from locpath.checkpoints import shipped_bundle

    src = shipped_bundle("reference")
    if not (src / "manifest.json").exists():
        pytest.skip("the shipped reference bundle is not present")
    out = tmp_path_factory.mktemp("bundles") / "reference"
    shutil.copytree(src, out)
    return out


@pytest.fixture(scope="session")
def exported_bundle(shipped_reference, tmp_path_factory) -> Path:
    """The shipped reference exported with torch once per run (about half a minute): only for the tests whose point
    is the export itself; everything else takes `ref_bundle`. Under pytest-xdist the workers share one export (the
    first writes it under a lock, the others wait and read it): nothing writes into it."""
    from filelock import FileLock  # a dependency of torch, which this fixture needs anyway

    from locpath.export.bundle import export_bundle

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    out = root / "exported-reference"
    with FileLock(str(out) + ".lock"):
        if not (out / "manifest.json").exists():
            export_bundle(shipped_reference, out, log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def eval_slide(tmp_path_factory) -> Path:
    from locpath.synth import make_spec, write_slide

    spec = make_spec(4242, diagnosis="squamous cell carcinoma", grade="high grade", organ="colon", necrosis=True)
    return write_slide(spec, tmp_path_factory.mktemp("evalslide") / "case.svs")


@pytest.fixture(scope="session")
def slide(eval_slide, tmp_path_factory) -> Path:
    """eval_slide in a folder of its own, for the hardening tests (tests/test_*_hardening.py)."""
    d = tmp_path_factory.mktemp("slides")
    shutil.copy(eval_slide, d / "case.svs")
    return d / "case.svs"


@pytest.fixture(scope="session")
def cached(ref_bundle, slide, tmp_path_factory):
    """A slide cache holding the slide's entry, and the answer the bundle gives (a reference for every case); tests
    that change the cache work on a copy (cli_checks.cache_copy)."""
    from cli_checks import Q, assert_answered, run

    cache = tmp_path_factory.mktemp("cache")
    res = run("ask", ref_bundle, slide, Q, "--json", "--cache-dir", cache)
    return cache, assert_answered(res, warnings=0)["answers"][0]


def reseal(bundle: Path, mutate=None) -> dict:
    """Edit a bundle's manifest.json (mutate(dict) in place) and rewrite SHA256SUMS to match, as someone with write
    access to the bundle folder could: what integrity alone cannot catch, validation or a signature must."""
    import hashlib
    import json

    mf_path = bundle / "manifest.json"
    mf = json.loads(mf_path.read_text())
    if mutate is not None:
        mutate(mf)
    mf_path.write_text(json.dumps(mf, indent=2))
    sums = bundle / "SHA256SUMS"
    lines = [ln for ln in sums.read_text().splitlines() if not ln.endswith("  manifest.json")]
    digest = hashlib.sha256(mf_path.read_bytes()).hexdigest()
    sums.write_text("\n".join([f"{digest}  manifest.json", *lines]) + "\n")
    return mf


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server on a loopback port for the session (Debian package postgresql; skipped without it).
    As root, the server runs as the `postgres` user, as PostgreSQL requires."""
    import glob
    import os
    import socket
    import subprocess
    import tempfile
    import time

    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    pytest.importorskip("psycopg")
    bindir = Path(bins[-1]).parent
    root = os.geteuid() == 0
    as_pg = ["runuser", "-u", "postgres", "--"] if root else []
    d = Path(tempfile.mkdtemp(prefix="locpath-pg-"))
    if root:
        shutil.chown(d, "postgres", "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run(as_pg + [str(bindir / "initdb"), "-D", str(d / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True, timeout=120)
    log = d / "server.log"
    proc = subprocess.Popen(as_pg + [str(bindir / "postgres"), "-D", str(d / "data"), "-p", str(port), "-h",
                                     "127.0.0.1", "-k", str(d)], stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    import psycopg

    deadline = time.time() + 60
    while True:
        try:
            with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True):
                pass
            break
        except psycopg.OperationalError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"PostgreSQL did not start: {log.read_text()[-1000:]}")
            time.sleep(0.3)
    yield port
    proc.terminate()
    proc.wait(30)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_database(postgres_server):
    """Makes a fresh, empty database on the session's PostgreSQL server and returns its SQLAlchemy URL."""
    import uuid

    import psycopg

    def make() -> str:
        name = f"locpath_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"host=127.0.0.1 port={postgres_server} user=postgres dbname=postgres",
                             autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return f"postgresql+psycopg://postgres@127.0.0.1:{postgres_server}/{name}"
    return make


@pytest.fixture
def postgres_url(postgres_database):
    """A fresh, empty database for one test."""
    return postgres_database()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """Orthanc with its DICOMweb plugin on a loopback port (tests/servers.py Orthanc): its REST root URL."""
    from servers import Orthanc

    server = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield server.url
    server.stop()
