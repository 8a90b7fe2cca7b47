"""One real export of the tiny checkpoint (fp32 and fp16), shared by the export tests of a session."""

import dataclasses
from pathlib import Path

import onnx
import pytest


@dataclasses.dataclass(frozen=True)
class TinyExport:
    out_dir: Path
    paths: tuple[Path, ...]
    fp32: Path
    fp16: Path

    def load(self, precision: str) -> onnx.ModelProto:
        return onnx.load(self.fp32 if precision == "fp32" else self.fp16)


@pytest.fixture(scope="session")
def tiny_export(tiny_checkpoint, tmp_path_factory) -> TinyExport:
    from reconad.export.onnx import export_onnx

    out_dir = tmp_path_factory.mktemp("export")
    paths = export_onnx(tiny_checkpoint, out_dir, precision="both", max_batch=4)
    onnx_files = {path.name.rsplit("-", 1)[1]: path for path in paths if path.suffix == ".onnx"}
    return TinyExport(out_dir, tuple(paths), onnx_files["fp32.onnx"], onnx_files["fp16.onnx"])
