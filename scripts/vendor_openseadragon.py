"""Vendor OpenSeadragon (the page's deep-zoom viewer) from the npm registry: a pinned version, checked against the
registry's recorded integrity, its licence beside it. Nothing is fetched when the service runs.

    python scripts/vendor_openseadragon.py            # fetch with `npm pack`, check, copy into static/vendor/
    python scripts/vendor_openseadragon.py --check    # only check the vendored files against SHA256SUMS (no network)

What is copied: the minified build, the licence, and the images of the navigation controls the page shows (zoom in,
zoom out, home, full page). SHA256SUMS beside them (`sha256sum -c` reads it) records each file's sha256; VENDOR.txt
names the package, version and the tarball's sha512 integrity.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEST = ROOT / "src" / "locpath" / "serve" / "static" / "vendor" / "openseadragon"
PACKAGE, VERSION = "openseadragon", "6.1.1"
INTEGRITY = "sha512-g4iKe2q8B642SaBT3+x4ZF3/8b1TxPPydyjmtrOLgDrlYWMKd9ZXM+1Cb/xa9DVySkvs/7l6HR1nHKfD5F3Tsw=="
BUTTONS = ("zoomin", "zoomout", "home", "fullpage")
STATES = ("rest", "grouphover", "hover", "pressed")
# tarball member -> vendored path (relative to DEST)
FILES = {"package/build/openseadragon/openseadragon.min.js": "openseadragon.min.js",
         "package/LICENSE.txt": "LICENSE.txt",
         **{f"package/build/openseadragon/images/{b}_{s}.png": f"images/{b}_{s}.png" for b in BUTTONS for s in STATES}}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(work: Path) -> Path:
    """`npm pack` of the pinned version; the tarball's sha512 must be the integrity recorded here (and the one the
    registry reports)."""
    out = subprocess.run(["npm", "pack", f"{PACKAGE}@{VERSION}", "--json", "--pack-destination", str(work)],
                         capture_output=True, text=True, check=True, cwd=work)
    info = json.loads(out.stdout)[0]
    if info.get("integrity") != INTEGRITY:
        sys.exit(f"vendor_openseadragon: the registry reports integrity {info.get('integrity')}, expected {INTEGRITY}")
    tarball = work / info["filename"]
    got = "sha512-" + base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
    if got != INTEGRITY:
        sys.exit(f"vendor_openseadragon: {tarball.name} has integrity {got}, expected {INTEGRITY}")
    return tarball


def copy(tarball: Path) -> None:
    """The named members only, each a regular file (no links, no other paths), into a fresh DEST."""
    if DEST.exists():
        shutil.rmtree(DEST)
    (DEST / "images").mkdir(parents=True)
    with tarfile.open(tarball, "r:gz") as tar:
        for member, rel in FILES.items():
            info = tar.getmember(member)
            if not info.isfile():
                sys.exit(f"vendor_openseadragon: {member} is not a regular file in the tarball")
            (DEST / rel).write_bytes(tar.extractfile(info).read())
    sums = "".join(f"{sha256(DEST / rel)}  {rel}\n" for rel in sorted(FILES.values()))
    (DEST / "SHA256SUMS").write_text(sums)
    (DEST / "VENDOR.txt").write_text(
        f"{PACKAGE} {VERSION} from the npm registry (https://registry.npmjs.org/{PACKAGE}/-/{PACKAGE}-{VERSION}.tgz)\n"
        f"tarball integrity: {INTEGRITY}\nlicence: BSD-3-Clause (LICENSE.txt)\n"
        "copied by scripts/vendor_openseadragon.py; each file's sha256 is in SHA256SUMS\n")


def check() -> list[str]:
    """What differs between the vendored files and SHA256SUMS (an empty list when all match)."""
    sums = DEST / "SHA256SUMS"
    if not sums.exists():
        return [f"{sums}: missing"]
    recorded = dict(reversed(line.split("  ", 1)) for line in sums.read_text().splitlines() if line.strip())
    problems = [f"{rel}: not recorded" for rel in FILES.values() if rel not in recorded]
    for rel, digest in recorded.items():
        path = DEST / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif sha256(path) != digest:
            problems.append(f"{rel}: sha256 differs from SHA256SUMS")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="check the vendored files only (no network)")
    args = ap.parse_args()
    if not args.check:
        with tempfile.TemporaryDirectory() as work:
            copy(fetch(Path(work)))
    problems = check()
    for p in problems:
        print(f"vendor_openseadragon: {p}", file=sys.stderr)
    if not problems:
        print(f"{PACKAGE} {VERSION}: {len(FILES)} files match SHA256SUMS")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
