"""The conversion record: a small JSON file convert leaves in OUT (`wan2diffusers.json`) saying
what was converted from where, by which tool and tables, with which coverage result and dtype.
`publish` reads it to write the model card.  It sits at the top of OUT, where
DiffusionPipeline.from_pretrained never looks (it reads model_index.json and the component
folders; a Hub download fetches only those), and publish does not upload it (it holds local paths).

Source file hashes are recorded only when they are free: a file in the local Hub cache is a
link to a blob named after its sha256 (the LFS oid the Hub computed). Anything else is hashed at
publish time when asked (`--hash-sources`), streamed."""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from ..errors import ConversionError

from ..write.workfiles import RECORD_NAME  # noqa: E402,F401 - named where what belongs to a model is decided
RECORD_VERSION = 1
LIBRARIES = ("diffusers", "transformers", "torch", "huggingface_hub", "safetensors")
CARD_FIELDS = ("license", "license_name", "license_link", "language", "tags", "pipeline_tag")
SHA256 = re.compile(r"[0-9a-f]{64}")
FROM_HUB_CACHE = "hub-cache"  # the blob name of the local Hub cache (the LFS oid)
FROM_PUBLISH = "computed"  # streamed through sha256 at publish time


def library_versions() -> dict[str, str | None]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def file_sha256(path: Path, progress: bool = True) -> str:
    """Streamed (read/files.file_sha256), with a progress bar on a terminal."""
    from ..read.files import file_sha256 as streamed

    with tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"sha256 {path.name}",
              disable=None if progress else True, leave=False) as bar:
        return streamed(path, bar.update)


def hub_cache_sha256(path: Path) -> str | None:
    """The sha256 of a file of a Hub cache snapshot, from the name of the blob it links to."""
    try:
        if not path.is_symlink():
            return None
        name = Path(os.readlink(path)).name
    except OSError:
        return None
    return name if SHA256.fullmatch(name) else None


def hub_revision(snapshot: Path) -> str | None:
    """A Hub cache snapshot folder is named after the commit it holds."""
    if snapshot.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", snapshot.name):
        return snapshot.name
    return None


def source_card(folder: Path) -> dict | None:
    """The fields of the source README's YAML front matter a derived model carries over."""
    readme = folder / "README.md"
    if not folder.is_dir() or not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        data = ModelCard(readme.read_text(encoding="utf-8"), ignore_metadata_errors=True).data.to_dict()
    except Exception:  # noqa: BLE001 - a README we cannot parse just carries nothing
        return None
    return {k: data[k] for k in CARD_FIELDS if data.get(k)} or None


def table_versions(components: list[str], with_pipeline: bool) -> dict[str, dict]:
    from ..mapping.tables import load_table, table_file, tables_root

    out = {}
    for name in components:
        path = table_file(name)
        out[name] = {"file": path.name, "schema_version": load_table(name).schema_version,
                     "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    if with_pipeline:
        path = Path(str(tables_root().joinpath("pipeline.yaml")))
        out["pipeline"] = {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return out


def build_record(src: Path, hub_repo: str | None, dtype: str, plans, report: dict) -> dict:
    """`src`: the local source (a Hub snapshot folder when `hub_repo` is set); `plans`: the
    ComponentPlans written; `report`: convert's report (describe() of each, pipeline)."""
    from ..version import __version__

    src = Path(os.path.abspath(src))  # not resolved: a Hub snapshot's files are links into blobs/
    root = src if src.is_dir() else src.parent
    components = []
    for cp, info in zip(plans, report["components"]):
        files = []
        for f in cp.source.files:
            f = Path(os.path.abspath(f))
            sha = hub_cache_sha256(f)
            try:
                name = f.relative_to(root).as_posix()
            except ValueError:
                name = f.name
            files.append({"name": name, "size": f.stat().st_size, "sha256": sha,
                          "sha256_from": FROM_HUB_CACHE if sha else None})
        components.append({
            "component": cp.folder, "table": cp.component, "variant": info["variant"], "size": info["size"], "class": info["class"],
            "source_layout": info["source_layout"], "source_files": files,
            "source_tensors": info["source_tensors"], "target_tensors": info["target_tensors"],
            "converted": info["converted"], "dropped": info["dropped"], "coverage": info["coverage"],
            "dtypes": info["dtypes"], "bytes": info["bytes"],
            "original_config": cp.source.original_config,  # what --to original writes back
        })
    pipe = report.get("pipeline")
    return {
        "record_version": RECORD_VERSION,
        "tool": {"name": "wan2diffusers", "version": __version__},
        "libraries": library_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {"repo_id": hub_repo, "revision": hub_revision(src) if hub_repo else None,
                   "path": str(src), "name": src.name, "card": source_card(src)},
        "dtype": dtype,
        "tables": table_versions([cp.component for cp in plans], pipe is not None),
        "components": components,
        "pipeline": pipe,
        # LoRAs merged into the weights (merge): the output is not the source's weights alone
        **({"merged_loras": report["loras"]} if report.get("loras") else {}),
    }


def write_record(folder: Path, record: dict, path: Path | None = None) -> None:
    """Into a new file renamed over the old one: never through a link another folder shares."""
    from ..write.atomic import replace_file

    path = Path(path) if path is not None else Path(folder) / RECORD_NAME
    replace_file(path, json.dumps(record, indent=2) + "\n")


MAX_RECORD_BYTES = 16 * 1024 * 1024  # a record of a whole pipeline is a few KB


def read_record(path: Path) -> dict | None:
    """`path`: the record file, or a folder holding one. Read strictly (read/files.py: size limit,
    depth, duplicate keys) and checked against the shape build_record writes (RecordSchema): every
    command that reads it then reads only the types it expects."""
    from pydantic import ValidationError

    from ..read.files import load_json

    path = Path(path)
    if path.is_dir():
        path = path / RECORD_NAME
    if not path.is_file():
        return None
    record = load_json(path, "conversion record", MAX_RECORD_BYTES)
    if not isinstance(record, dict) or record.get("record_version") != RECORD_VERSION:
        raise ConversionError(f"{path}: not a wan2diffusers conversion record (record_version "
                              f"{str(record.get('record_version'))[:20] if isinstance(record, dict) else '?'})")
    try:
        RecordSchema.model_validate(record)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConversionError(f"{path}: not a valid conversion record ({where}: {err['msg']})") from None
    return record


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class RecordFile(_Open):
    name: str
    size: int = Field(ge=0)
    sha256: Optional[str] = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    sha256_from: Optional[str] = None


class RecordComponent(_Open):
    component: str
    table: str
    variant: Optional[str] = None
    size: Optional[str] = None
    source_files: list[RecordFile]
    source_tensors: int = Field(ge=0)
    target_tensors: int = Field(ge=0)
    converted: int = Field(ge=0)
    dropped: list[dict[str, Any]]
    coverage: str
    dtypes: list[str]
    bytes: int = Field(ge=0)
    original_config: Optional[dict[str, Any]] = None
    class_: str = Field(alias="class")


class RecordPipeline(_Open):
    class_: str = Field(alias="class")
    family: Optional[str] = None
    complete: bool = False
    missing: list[str] = []
    flow_shift: Optional[float] = None
    config: Optional[dict[str, Any]] = None


class RecordSource(_Open):
    repo_id: Optional[str] = None
    revision: Optional[str] = None
    path: str
    name: str
    card: Optional[dict[str, Any]] = None


class RecordSchema(_Open):
    """What build_record writes (extra fields allowed: later versions add some)."""
    record_version: int
    tool: dict[str, str]
    libraries: dict[str, Optional[str]]
    created: str
    source: RecordSource
    dtype: str
    tables: dict[str, dict[str, Any]]
    components: list[RecordComponent]
    pipeline: Optional[RecordPipeline] = None
    derived_from: Optional[dict[str, Any]] = None


def hash_sources(record: dict, source: Path | None, progress: bool = True) -> list[str]:
    """Fill in the sha256 of every recorded source file that has none, streamed from `source`
    (default: the recorded source path).  Returns the files hashed.  Sizes must match the record."""
    root = Path(source) if source is not None else Path(record["source"]["path"])
    if root.is_file():
        root = root.parent
    hashed = []
    for comp in record["components"]:
        for f in comp["source_files"]:
            if f.get("sha256"):
                continue
            path = root / f["name"]
            if not path.is_file():
                raise ConversionError(f"{path}: source file not found; pass the original folder with --source "
                                      f"to hash it, or publish without --hash-sources")
            if path.stat().st_size != f["size"]:
                raise ConversionError(f"{path}: {path.stat().st_size} bytes, but the conversion read "
                                      f"{f['size']}: not the file that was converted")
            f["sha256"], f["sha256_from"] = file_sha256(path, progress), FROM_PUBLISH
            hashed.append(f["name"])
    return hashed
