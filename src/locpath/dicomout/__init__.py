"""Answers as DICOM objects a hospital's archive and viewers read: a Structured Report per answered question set
(sr.py: TID 1500 measurement report with the questions, answers, model identity, trust fields and the evidence tiles
as SCOORD regions on the source image) and Microscopy Bulk Simple Annotations of the evidence tiles
(annotations.py), both made with highdicom from the source series' own headers (sources.py). Torch-free; the
runtime never imports it (cli and serve do)."""

from __future__ import annotations

from .answers import ReportedAnswer
from .errors import DicomOutError
from .identity import ModelIdentity
from .sources import SourceSeries


def build_objects(source: SourceSeries, identity: ModelIdentity, answers: list[dict], annotations: bool = True):
    """(the SR, the bulk annotations or None when no answer has a positioned evidence tile) of answers given as
    `Answer.to_dict()` dicts."""
    from .annotations import build_annotations
    from .sr import build_sr

    reported = [ReportedAnswer.from_dict(a) for a in answers]
    sr = build_sr(source, identity, reported)
    ann = build_annotations(source, identity, reported) if annotations and any(a.tiles for a in reported) else None
    return sr, ann


__all__ = ["DicomOutError", "ModelIdentity", "ReportedAnswer", "SourceSeries", "build_objects"]
