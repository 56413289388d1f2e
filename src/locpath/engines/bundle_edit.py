"""A bundle being rebuilt: the source bundle's files copied into a temporary folder, components replaced one by one
(each built artifact with an EngineConfig beside it, in the manner of TensorRT-LLM), then the manifest and its
SHA256SUMS written. Every build recipe (ONNX Runtime, OpenVINO, TensorRT) goes through this one class."""

from __future__ import annotations

import datetime as _dt
import shutil
import time
from pathlib import Path

from ..bundle import names
from ..bundle.engine_config import EngineConfig
from ..bundle.integrity import write_manifest
from ..bundle.manifest import Manifest
from ..bundle.paths import member_path, sha256_file


class BundleEdit:
    def __init__(self, src: Path, tmp: Path, manifest: Manifest, log=print):
        self.src, self.tmp, self.manifest, self.log = Path(src), Path(tmp), manifest, log
        self.t_start = time.time()
        for name in manifest.files:  # the source was verified: its names are safe and its files regular
            dst = self.tmp / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(member_path(self.src, name, "the manifest"), dst)

    def source(self, comp: str) -> Path:
        """The fp32 file of a component in the source bundle."""
        return self.src / self.manifest.components[comp].file

    def replace(self, comp: str, backend: str, precision: str, artifact: str, machine: dict, info: dict,
                data_files: list[str] | tuple = ()) -> None:
        """Point `comp` at a built artifact in the temporary folder, with its engine config beside it; the files
        the component used before are removed from the bundle."""
        entry = self.manifest.components[comp]
        old = set(entry.referenced_files())
        art_sha = sha256_file(self.tmp / artifact)
        ec_name = f"{comp}.{backend}-{precision}.engine.json"
        # onnx_sha256 names the ONNX the chain started from: a component rebuilt twice in one build (INT4, then
        # moved to OpenVINO) still names the export's graph, which the runtime checks the engine config against
        EngineConfig(component=comp, backend=backend, precision=precision, artifact=artifact, artifact_sha256=art_sha,
                     onnx_sha256=entry.parent_sha256 or entry.sha256, device=machine["device"], libraries=machine["libraries"],
                     build=info).save(self.tmp / ec_name)
        entry.parent_sha256 = entry.parent_sha256 or entry.sha256
        entry.file, entry.sha256, entry.backend, entry.precision = artifact, art_sha, backend, precision
        entry.quantization, entry.engine_config, entry.data_files = info, ec_name, list(data_files)
        new = set(entry.referenced_files())
        for name in old - new:
            (self.tmp / name).unlink(missing_ok=True)
            self.manifest.drop_file(name)
        for name in new:
            self.manifest.record_file(self.tmp, name)

    def drop(self, comp: str, why: str) -> None:
        entry = self.manifest.components.pop(comp, None)
        if entry is None:
            return
        for name in entry.referenced_files():
            (self.tmp / name).unlink(missing_ok=True)
            self.manifest.drop_file(name)
        self.log(f"build: {comp} dropped ({why})")

    def drop_resampler_chunks(self, why: str) -> None:
        """The chunked resampler graphs are the fp32 ONNX Runtime twin of the resampler: a build that moves the
        resampler to another precision or runtime drops them, so small and large slides run the same resampler
        (OpenVINO builds move them to OpenVINO instead, unless its one graph measured clearly faster for large
        slides: engines/resampler_route.py)."""
        for comp in names.RESAMPLER_CHUNKS:
            self.drop(comp, why)

    def drop_fused(self) -> None:
        self.drop(names.DECODER_FUSED, "an ONNX Runtime CPU graph; this build runs the plain decoder")

    def finish(self, precision: str, backend: str, **extra) -> None:
        m = self.manifest
        earlier = m.export.get("build")  # a bundle built before (its other graphs kept): what was done then
        m.export = dict(m.export, build=dict(
            precision=precision, backend=backend, source_bundle=str(self.src),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            seconds=round(time.time() - self.t_start, 1), **extra, **({"earlier": earlier} if earlier else {})))
        write_manifest(self.tmp, m)
