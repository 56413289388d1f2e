"""Every function and method in src/locpath stays under 100 lines (the project's bar: small named steps), read
with `ast` from the source tree this test sits in, so a long function fails here naming file:line, name, length.

`python tests/test_function_length.py` lists the longest functions.
"""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "locpath"
MAX_LINES = 100


def function_lengths(path: Path) -> list[tuple[int, str, int]]:
    """(line, qualified name, lines from `def` to the last line of the body) of every function in a file."""
    out = []

    def visit(node, prefix: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                out.append((child.lineno, name, child.end_lineno - child.lineno + 1))
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), "")
    return out


def too_long(root: Path, limit: int = MAX_LINES) -> list[str]:
    return [f"{p.relative_to(root.parents[1])}:{line} {name} {n} lines"
            for p in sorted(root.rglob("*.py")) for line, name, n in function_lengths(p) if n > limit]


def test_no_function_in_src_is_over_100_lines():
    files = list(SRC.rglob("*.py"))
    assert len(files) > 50, f"{SRC}: the package's sources were not found"
    long = too_long(SRC)
    assert not long, f"{len(long)} functions over {MAX_LINES} lines (split them into named steps):\n" + "\n".join(long)


def test_the_check_names_a_long_method_and_passes_one_at_the_limit(tmp_path):
    pkg = tmp_path / "src" / "pkg"
    pkg.mkdir(parents=True)
    body = "\n".join(f"        x{i} = {i}" for i in range(MAX_LINES - 1))
    (pkg / "m.py").write_text(f"class C:\n    def ok(self):\n{body}\n\n    async def long(self):\n{body}\n"
                              "        return 1\n")
    assert too_long(pkg) == [f"src/pkg/m.py:{MAX_LINES + 3} C.long {MAX_LINES + 1} lines"]


if __name__ == "__main__":
    limit = int(sys.argv[1]) if len(sys.argv) > 1 else 60
    rows = sorted(((n, f"{p.relative_to(ROOT)}:{line} {name}") for p in SRC.rglob("*.py")
                   for line, name, n in function_lengths(p) if n > limit), reverse=True)
    for n, where in rows:
        print(f"{n:4d}  {where}")
