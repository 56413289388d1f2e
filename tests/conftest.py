import shutil
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
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
