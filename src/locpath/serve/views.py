"""What a caller sees of slides, jobs and answers: an admin key everything; any other key no server path (the
service's folders are shortened to file names in sources, errors and answers)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from .auth import Caller

_ABS_PATH = re.compile(r"(?<![\w.~:/-])/(?:[^/\s'\"]+/)+[^/\s'\"]*")


def server_paths(cfg) -> list[str]:
    """The folders whose names a non-admin key must not learn (as given and resolved), longest first."""
    found = set()
    for p in (cfg.data_dir, cfg.runtime.cache_dir, cfg.bundle, *cfg.slide_roots):
        if p is None:
            continue
        for q in (Path(p), Path(p).resolve(), Path(p).absolute()):
            if len(str(q)) > 1:
                found.add(str(q).rstrip("/"))
    return sorted(found, key=len, reverse=True)


def hide_paths(text: str, server_paths: list[str]) -> str:
    """A message with every server path shortened to its file name (known folders first, so names with spaces
    go whole; then anything that looks like an absolute path)."""
    for prefix in server_paths:
        text = re.sub(re.escape(prefix) + r"(?:/[^\s'\"]*)?", lambda m: Path(m.group(0)).name, text)
    return _ABS_PATH.sub(lambda m: Path(m.group(0)).name, text)


def public_answer(answer: dict, server_paths: list[str]) -> dict:
    slide = dict(answer.get("slide") or {})
    if isinstance(slide.get("source"), str):
        slide["source"] = Path(slide["source"]).name
    return dict(answer, slide=slide)


def public_done(answer, server_paths: list[str]):
    """A finished Answer as a non-admin key receives it."""
    return dataclasses.replace(answer, slide=public_answer({"slide": answer.slide}, server_paths)["slide"])


def public_slide(d: dict, server_paths: list[str]) -> dict:
    d = dict(d)
    d.pop("key_id", None)
    if d.get("source_kind") == "path":
        d["source"] = Path(d["source"]).name
    if d.get("error"):
        d["error"] = hide_paths(d["error"], server_paths)
    return d


def slide_view(s, caller: Caller, server_paths: list[str]) -> dict:
    d = s.to_dict()
    d.pop("path", None)
    d["thumbnail"] = f"/v1/slides/{s.id}/thumbnail.png"
    return d if caller.admin else public_slide(d, server_paths)


def public_job(job, caller: Caller, server_paths: list[str]) -> dict:
    d = job.to_dict()
    if caller.admin:
        return d
    for k in ("key_id", "owner"):  # internal: which key (the caller's own) and which server host ran it
        d.pop(k, None)
    if d.get("error"):
        d["error"] = hide_paths(d["error"], server_paths)
    if isinstance(d.get("dicom_store"), dict) and d["dicom_store"].get("last_error"):
        d["dicom_store"] = dict(d["dicom_store"], last_error=hide_paths(d["dicom_store"]["last_error"], server_paths))
    req = d.get("request")
    if isinstance(req, dict) and req.get("source_kind") == "path" and isinstance(req.get("source"), str):
        d["request"] = dict(req, source=Path(req["source"]).name)
    if isinstance(d.get("result"), dict) and "slide" in d["result"]:
        d["result"] = public_answer(d["result"], server_paths)
    return d
