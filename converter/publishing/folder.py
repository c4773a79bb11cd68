"""What a converted folder OUT holds, read from its small files only: the pipeline class
(model_index.json), each component's class and config (quantization included), the conversion
record, and the files an upload would send with their sizes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConversionError
from ..read.files import config_class
from ..write.naming import MODEL_INDEX
from ..write.workfiles import RECORD_NAME, model_files, not_model_files
from .provenance import read_record


@dataclass
class ConvertedFolder:
    path: Path
    pipeline_class: str | None  # model_index.json's _class_name; None for a partial conversion
    components: dict[str, dict]  # folder with weights -> its config.json
    record: dict | None
    files: list[tuple[str, int]] = field(default_factory=list)  # what an upload sends: (path in repo, bytes)
    weights: dict[str, tuple[int, list[str]]] = field(default_factory=dict)  # component -> (tensors, dtype tags)
    record_path: Path | None = None  # where the record was read from (OUT's own, or --record)
    single: bool = False  # OUT is one component folder (config.json and weights at its top)

    @property
    def quantization(self) -> dict[str, dict]:
        """component -> quantization_config (as diffusers/transformers save it in config.json)."""
        return {c: cfg["quantization_config"] for c, cfg in self.components.items()
                if isinstance(cfg.get("quantization_config"), dict)}

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def class_of(self, component: str) -> str | None:
        cfg = self.components.get(component) or {}
        return config_class(cfg)


def upload_files(out: Path) -> list[tuple[str, int]]:
    """The files an upload sends: the model's own (converter/write/workfiles.py decides), with sizes.
    A symlink that leads out of OUT is refused."""
    return [(rel, p.stat().st_size) for rel, p in model_files(out)]


def left_out(out: Path) -> list[str]:
    """What an upload leaves out: work folders, backups, hidden files, the record, other kinds."""
    return not_model_files(out)


def _json(path: Path) -> dict:
    from ..read.files import load_json

    data = load_json(path)
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: not a JSON object")
    return data


def weights_summary(folder: Path) -> tuple[int, list[str]]:
    """From the safetensors headers alone: how many tensors, in which dtypes."""
    from ..read.safetensors_file import read_header

    n, dtypes = 0, set()
    for f in sorted(folder.glob("*.safetensors")):
        tensors = read_header(f).tensors
        n += len(tensors)
        dtypes |= {r.dtype for r in tensors.values()}
    return n, sorted(dtypes)


def component_of_class(class_name) -> str | None:
    """The component (its output folder name) whose table targets this class."""
    from ..mapping.tables import load_table, table_names

    for c in table_names():
        if class_name in load_table(c).built_classes:
            return load_table(c).output.folder
    return None


def read_folder(out: Path, record: Path | None = None) -> ConvertedFolder:
    """`record`: the conversion record to use instead of OUT's own (e.g. the float folder's, for
    a transformer folder `wan2diffusers quantize` made, which has none of its own)."""
    out = Path(out)
    if not out.is_dir():
        raise ConversionError(f"{out}: no such folder (pass the OUT folder `wan2diffusers convert` wrote)")
    index = out / MODEL_INDEX
    pipeline_class = _json(index).get("_class_name") if index.is_file() else None
    from ..mapping.tables import KNOWN_COMPONENTS

    def pipeline_order(p: Path):
        return (KNOWN_COMPONENTS.index(p.name) if p.name in KNOWN_COMPONENTS else len(KNOWN_COMPONENTS), p.name)

    components, single = {}, False
    for sub in sorted((p for p in out.iterdir() if p.is_dir()), key=pipeline_order):
        cfg = sub / "config.json"
        has_weights = any(sub.glob("*.safetensors"))
        if cfg.is_file() and has_weights:
            components[sub.name] = _json(cfg)
    if not components and (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        cfg = _json(out / "config.json")  # one component folder (e.g. what `quantize X/transformer OUT` writes)
        name = component_of_class(config_class(cfg))
        if name is not None:
            components, single = {name: cfg}, True
    if not components:
        raise ConversionError(f"{out}: no converted component in this folder (no <component>/config.json "
                              f"with .safetensors weights); run `wan2diffusers convert` first")
    record_path = Path(record) if record is not None else out / RECORD_NAME
    if record is not None and not record_path.is_file():
        raise ConversionError(f"{record_path}: no such conversion record")
    folder = ConvertedFolder(out, pipeline_class, components, read_record(record_path), upload_files(out),
                             {c: weights_summary(out if single else out / c) for c in components}, record_path,
                             single)
    if folder.record is None:
        folder.record_path = None
    return folder
