"""The output folder of a batch, and what makes a rerun do no work:

    OUT/records/<digest>.json     one record per slide (its answers, tiles, timings), written atomically; a
                                  slide whose content digest has a record is done
    OUT/features/<digest>.h5      its tile features (TRIDENT layout)
    OUT/answers.jsonl             every record, one line each, sorted by slide (rebuilt from records at the end;
                                  `--format parquet` writes answers.parquet with pyarrow)
A record is keyed by the slide's content, so a slide is recorded once however often the run is interrupted or
repeated, and whichever worker finished it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
from pathlib import Path

from ..bundle.paths import check_sha256
from ..errors import LocpathError
from ..fsutil import atomic_file
from ..wsi.features import write_features

SCHEMA = "locpath-batch/1"


class Output:
    def __init__(self, out: str | Path):
        self.dir = Path(out)
        self.records = self.dir / "records"
        self.features = self.dir / "features"

    def prepare(self) -> "Output":
        try:
            self.records.mkdir(parents=True, exist_ok=True)
            self.features.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LocpathError(f"{self.dir}: cannot create the output folder ({exc.strerror or exc})") from None
        return self

    def record_path(self, digest: str) -> Path:
        return self.records / f"{check_sha256(digest, 'slide digest')}.json"

    def done(self, digest: str) -> bool:
        return self.record_path(digest).is_file()

    def write(self, digest: str, slide: str, ctx, answers: list, seconds: float) -> dict:
        """Features first, record last: a record exists only for a slide whose outputs all exist."""
        feat = self.features / f"{check_sha256(digest, 'slide digest')}.h5"
        if ctx.features is not None:
            write_features(feat, ctx.features)
        record = {"schema": SCHEMA, "slide": slide, "digest": digest, "tiles": ctx.tiles,
                  "tokens_after_stm": ctx.tokens, "features": str(feat.relative_to(self.dir)),
                  "answers": [{"question": a.question, "answer": a.answer, "token_ids": a.token_ids,
                               "stop_reason": a.generation["stop_reason"], "timings_ms": a.timings_ms}
                              for a in answers],
                  "slide_timings_ms": ctx.timings_ms, "seconds": round(seconds, 3),
                  "worker": f"{socket.gethostname()}:{os.getpid()}",
                  "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        with atomic_file(self.record_path(digest)) as tmp:
            tmp.write_text(json.dumps(record, indent=1))
        return record

    def all_records(self) -> list[dict]:
        out = []
        for p in sorted(self.records.glob("*.json")):
            try:
                out.append(json.loads(p.read_text()))
            except (OSError, ValueError):
                continue  # never a half record (atomic writes); an unreadable one is left to the next run
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
