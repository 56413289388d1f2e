"""What a batch runs on: slides (a folder of slide files, feature files and DICOM series folders, a list file with one
path per line, or one slide or feature file) and questions (a text file, one per line, or a JSON list).

Feature files: TRIDENT/CLAM .h5 and SlideChat .csv. A .csv is a feature file when its second line is a row of
numbers; otherwise (e.g. slides.csv, one path per line) it is a slide list."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

from ..bundle.paths import read_bounded
from ..errors import LocpathError

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide", ".dcm",
                  ".h5", ".hdf5")
TEXT_LIMIT = 16 << 20  # a slide list or questions file larger than this is not one
SNIFF_BYTES = 1 << 20  # what is read of a .csv to tell a feature file from a slide list
MAX_QUESTIONS = 4096  # every slide is asked every question: more than this is a mistake, not a study


def is_feature_csv(p: Path) -> bool:
    """A .csv whose second line (after a header) or first line is all numbers, comma-separated: a SlideChat feature
    file. Reads at most SNIFF_BYTES."""
    if p.suffix.lower() != ".csv" or not p.is_file():
        return False
    try:
        with open(p, "rb") as f:
            head = f.read(SNIFF_BYTES).decode("utf-8", "replace").splitlines()[:2]
    except OSError:
        return False

    def numbers(line: str) -> bool:
        cells = [c.strip() for c in line.split(",")]
        if len(cells) < 2:
            return False
        try:
            [float(c) for c in cells if c]
        except ValueError:
            return False
        return any(cells)

    return any(numbers(ln) for ln in head[1:2] or head[:1])


def _read_text(p: Path, what: str) -> str:
    """A small UTF-8 text file, refusing devices, pipes and huge files (never read for ever)."""
    try:
        return read_bounded(p, TEXT_LIMIT, what).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LocpathError(f"{p}: the {what} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def list_slides(source: str | Path) -> list[Path]:
    """Absolute paths, sorted and without duplicates."""
    from ..wsi.dicom import is_dicom_folder

    p = Path(source)
    if not p.exists():
        raise LocpathError(f"{p}: --slides names no file or folder")
    if p.is_dir():
        found = []
        for q in sorted(p.iterdir()):
            if q.is_dir() and is_dicom_folder(q):
                found.append(q)
            elif q.is_file() and not q.name.startswith(".") and (q.suffix.lower() in SLIDE_SUFFIXES
                                                                   or is_feature_csv(q)):
                found.append(q)
        if not found:
            raise LocpathError(f"{p}: no slide files in this folder ({', '.join(SLIDE_SUFFIXES[:6])}, ...)")
    elif p.suffix.lower() in SLIDE_SUFFIXES or is_feature_csv(p):
        found = [p]  # one slide or feature file
    else:
        lines = _read_text(p, "slide list").splitlines()
        found = [_list_entry(p, n, x.strip()) for n, x in enumerate(lines, 1)
                 if x.strip() and not x.lstrip().startswith("#")]
        if not found:
            raise LocpathError(f"{p}: the slide list is empty")
    out, seen = [], set()
    for f in found:
        try:
            r = f.resolve()
        except (OSError, RuntimeError) as exc:  # a loop in a parent folder
            raise LocpathError(f"{f}: cannot be resolved ({getattr(exc, 'strerror', None) or exc})") from None
        if r not in seen:
            seen.add(r)
            out.append(r)
    return out


def _list_entry(listing: Path, line: int, entry: str) -> Path:
    """One entry of a slide list, refused in one line naming the list, the line and the entry when it can never be a
    slide (a symlink loop, a folder that is no DICOM series, a FIFO, socket or device, a name the system refuses).
    A missing file is left to the run: it becomes that slide's failed row, as a slide that vanishes mid-run does."""
    from ..wsi.dicom import is_dicom_folder

    where = f"{listing}: line {line}: {entry[:200]!r}"
    f = Path(entry) if Path(entry).is_absolute() else listing.parent / entry
    try:
        st = os.stat(f)
    except FileNotFoundError:
        return f
    except ValueError:  # an embedded NUL
        raise LocpathError(f"{where}: not a valid path") from None
    except OSError as exc:
        what = "a symbolic link loop" if exc.errno == errno.ELOOP else f"cannot be read ({exc.strerror or exc})"
        raise LocpathError(f"{where}: {what}") from None
    if stat.S_ISDIR(st.st_mode):
        try:
            dicom = is_dicom_folder(f)
        except OSError:
            dicom = False
        if not dicom:
            raise LocpathError(f"{where}: is a folder, not a slide file (nor a DICOM series folder)")
    elif not stat.S_ISREG(st.st_mode):
        raise LocpathError(f"{where}: not a regular file (a FIFO, socket or device)")
    return f


def read_questions(path: str | Path) -> list[str]:
    p = Path(path)
    text = _read_text(p, "questions file")
    if text.lstrip().startswith("["):
        try:
            qs = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise LocpathError(f"{p}: not a JSON list of questions ({str(exc)[:200] or 'nested too deeply'})") \
                from None
        if not isinstance(qs, list) or not all(isinstance(q, str) for q in qs):
            raise LocpathError(f"{p}: a JSON questions file must be a list of strings")
    else:
        qs = [line for line in text.splitlines()]
    from ..runtime.question import MAX_QUESTION_CHARS

    qs = [q.strip() for q in qs if q.strip()]
    if not qs:
        raise LocpathError(f"{p}: no questions in it")
    if len(qs) > MAX_QUESTIONS:
        raise LocpathError(f"{p}: {len(qs)} questions, over the limit of {MAX_QUESTIONS} (every slide is asked "
                           "every question)")
    for i, q in enumerate(qs, 1):
        if len(q) > MAX_QUESTION_CHARS:
            raise LocpathError(f"{p}: question {i} is {len(q)} characters long; at most {MAX_QUESTION_CHARS}")
    return qs
