"""The package layering (pyproject's [tool.importlinter] contracts): packages import only downward, the runtime,
bundle and slide layers never reach torch/transformers/timm, no package has an import cycle between its modules,
and the commands of locpath.cli do not import each other. import-linter reads every import statement, function-level
ones included.

`python tests/test_layering.py` prints the package graph (one line per package: what it imports).
"""

import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "transformers", "timm", "onnx", "onnxruntime", "openvino", "nncf", "tensorrt", "cuda",
         "onnxruntime_genai", "peft", "ray", "fastapi", "sqlalchemy"}


def _lint(src_root: Path, cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (pip install 'locpath[test]')")
    env = dict(os.environ, PYTHONPATH=str(src_root))
    return subprocess.run([exe, "--no-cache", "--config", str(cwd / "pyproject.toml")], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_layering_contracts_hold():
    res = _lint(ROOT / "src", ROOT)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "7 kept, 0 broken" in res.stdout


@pytest.mark.parametrize("module,line,contract", [
    ("runtime/pipeline.py", "from ..engines import build as _upward\n", "packages depend only downward"),
    ("bundle/paths.py", "from ..runtime import machine as _upward\n", "packages depend only downward"),
    ("runtime/sampler.py", "def _lazy():\n    import torch  # noqa\n", "never reach torch"),
    ("runtime/runner.py", "def _lazy():\n    from . import backends  # noqa\n", "no import cycles"),
    ("cli/chat.py", "def _lazy():\n    from .ask import FEATURE_FILES  # noqa\n", "do not import each other"),
    ("serve/routers/jobs.py", "from . import slides as _sibling  # noqa\n", "routers do not import each other"),
    ("serve/service.py", "def _lazy():\n    from . import deps  # noqa\n", "which use the Service"),
    ("bench/suites/batched.py", "def _lazy():\n    from . import decoder_05b  # noqa\n", "suites do not import each other"),
])
def test_contracts_fail_on_a_bad_import(tmp_path, module, line, contract):
    """The same contracts on a copy of the package with one bad import added (function-level ones count)."""
    shutil.copytree(ROOT / "src" / "locpath", tmp_path / "src" / "locpath",
                    ignore=shutil.ignore_patterns("checkpoints", "__pycache__"))
    (tmp_path / "src" / "locpath" / "checkpoints").mkdir()
    (tmp_path / "src" / "locpath" / "checkpoints" / "__init__.py").write_text("")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "src" / "locpath" / module
    target.write_text(target.read_text() + "\n\n" + line)
    res = _lint(tmp_path / "src", tmp_path)
    assert res.returncode != 0
    assert "BROKEN" in res.stdout and contract in res.stdout.replace("\n", " ")


def package_graph() -> dict[str, set[str]]:
    import grimp

    g = grimp.build_graph("locpath", include_external_packages=True)

    def top(m: str) -> str:
        p = m.split(".")
        return p[1] if p[0] == "locpath" and len(p) > 1 else p[0]

    deps: dict[str, set[str]] = defaultdict(set)
    for m in g.modules:
        if not m.startswith("locpath."):
            continue
        for imp in g.find_modules_directly_imported_by(m):
            a, b = top(m), top(imp)
            if a != b and (imp.startswith("locpath.") or b in HEAVY):
                deps[a].add(b)
    return deps


if __name__ == "__main__":
    for pkg, uses in sorted(package_graph().items()):
        print(f"{pkg:12s} -> {', '.join(sorted(uses))}")
