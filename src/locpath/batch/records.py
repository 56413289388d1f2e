"""The output folder of a batch, and what makes a rerun do no work:

    OUT/records/<key>.json        one record per slide and run (its answers, tiles, timings), written atomically;
                                  key = sha256(slide content digest, run digest), the run digest being that of the
                                  questions, the generation options given and the bundle (its SHA256SUMS): a slide
                                  with a record under this key is done
    OUT/features/<key>.h5         its tile features (TRIDENT layout); key = sha256(slide digest, bundle digest)
    OUT/answers.jsonl             this run's records, one line each, sorted by slide (rebuilt from records at the end;
                                  `--format parquet` writes answers.parquet with pyarrow)
So a slide is recorded once per question set however often the run is interrupted or repeated, and whichever worker
finished it; a rerun into the same folder with other questions (or another bundle, or another --max-new-tokens)
asks them, and one with the same skips every slide already answered.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import socket
from pathlib import Path

from ..bundle.integrity import CHECKSUMS
from ..bundle.paths import check_sha256, read_bounded
from ..errors import LocpathError
from ..fsutil import atomic_file
from ..wsi.features import write_features

SCHEMA = "locpath-batch/2"
MAX_RECORD_BYTES = 64 << 20  # a file in records/ larger than this is not one of ours


def bundle_digest(bundle: str | Path) -> str:
    """sha256 of the bundle's SHA256SUMS: it lists every file of the bundle (manifest, graphs, tokenizer) by digest,
    so any change to what answers depends on changes this. A folder that is no bundle is named as the runtime
    names it (its files are hashed when the pipeline loads it)."""
    from ..bundle.integrity import verify_bundle

    verify_bundle(bundle, check_files=False)
    return hashlib.sha256(read_bounded(Path(bundle) / CHECKSUMS, 16 << 20, "bundle checksum list")).hexdigest()


def _sha(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8", "surrogatepass")).hexdigest()


class Output:
    def __init__(self, out: str | Path, bundle: str = ""):
        self.dir = Path(out)
        self.records = self.dir / "records"
        self.features = self.dir / "features"
        self.bundle = bundle  # the bundle's digest (bundle_digest); part of every record and features key

    def run_digest(self, questions: list[str], sampling: dict) -> str:
        """What a slide's answers depend on besides the slide: the questions (in order), the generation options
        given, the bundle."""
        given = {k: v for k, v in sorted(sampling.items()) if v is not None}
        return _sha(json.dumps({"questions": list(questions), "sampling": given, "bundle": self.bundle},
                               sort_keys=True, default=str))

    def prepare(self) -> "Output":
        try:
            self.records.mkdir(parents=True, exist_ok=True)
            self.features.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LocpathError(f"{self.dir}: cannot create the output folder ({exc.strerror or exc})") from None
        return self

    def record_path(self, digest: str, questions: list[str], sampling: dict) -> Path:
        return self.records / f"{_sha(check_sha256(digest, 'slide digest'), self.run_digest(questions, sampling))}.json"

    def done(self, digest: str, questions: list[str], sampling: dict) -> bool:
        return self.record_path(digest, questions, sampling).is_file()

    def write(self, digest: str, slide: str, ctx, answers: list, seconds: float, questions: list[str],
              sampling: dict) -> dict:
        """Features first, record last: a record exists only for a slide whose outputs all exist."""
        feat = self.features / f"{_sha(check_sha256(digest, 'slide digest'), self.bundle)}.h5"
        if ctx.features is not None:
            write_features(feat, ctx.features)
        record = {"schema": SCHEMA, "slide": slide, "digest": digest, "run": self.run_digest(questions, sampling),
                  "bundle": self.bundle, "sampling": {k: v for k, v in sampling.items() if v is not None},
                  "tiles": ctx.tiles, "slide_trust": getattr(ctx, "trust", None),
                  "tokens_after_stm": ctx.tokens, "features": str(feat.relative_to(self.dir)),
                  "answers": [{"question": a.question, "answer": a.answer, "token_ids": a.token_ids,
                               "stop_reason": a.generation["stop_reason"], "timings_ms": a.timings_ms,
                               "trust": getattr(a, "trust", None)}
                              for a in answers],
                  "slide_timings_ms": ctx.timings_ms, "seconds": round(seconds, 3),
                  "worker": f"{socket.gethostname()}:{os.getpid()}",
                  "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        with atomic_file(self.record_path(digest, questions, sampling)) as tmp:
            tmp.write_text(json.dumps(record, indent=1))
        return record

    def all_records(self, questions: list[str] | None = None, sampling: dict | None = None) -> list[dict]:
        """The records in the folder; with `questions`, only this run's (those questions, options and bundle)."""
        run = self.run_digest(questions, sampling or {}) if questions is not None else None
        out = []
        for p in sorted(self.records.glob("*.json")):
            try:
                r = json.loads(read_bounded(p, MAX_RECORD_BYTES, "batch record"))
            except (LocpathError, OSError, ValueError, RecursionError):
                continue  # never a half record (atomic writes); an unreadable one is left to the next run
            if isinstance(r, dict) and isinstance(r.get("slide"), str) and (run is None or r.get("run") == run):
                out.append(r)
        return sorted(out, key=lambda r: r["slide"])

    def consolidate(self, records: list[dict], fmt: str = "jsonl") -> Path:
        """One answers file over `records` (all_records())."""
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            rows = [{k: r[k] for k in ("slide", "digest", "tiles", "tokens_after_stm", "features", "seconds")}
                    | {"answers": [{"question": a["question"], "answer": a["answer"]} for a in r["answers"]]}
                    for r in records]
            target = self.dir / "answers.parquet"
            with atomic_file(target, suffix=".parquet") as tmp:
                pq.write_table(pa.Table.from_pylist(rows), tmp)
            return target
        target = self.dir / "answers.jsonl"
        with atomic_file(target) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        return target
