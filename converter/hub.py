"""SRC given as a Hub repo id (e.g. Wan-AI/Wan2.1-T2V-14B): download only the files the chosen
components need, with huggingface_hub (its cache, resumable downloads, HF_TOKEN / stored login)."""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

from .errors import ConversionError
from .mapping.tables import load_table, table_names
from .write.naming import index_name, shard_glob

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def looks_like_repo_id(src: str) -> bool:
    """`ORG/NAME` that is not a local path. A path whose first part is a local folder
    (`examples/Wan2.1-T2V-tin`) is a mistyped local path, not a repo id: it is refused by
    `missing_local_path` with the names that do exist."""
    return (not os.path.lexists(src) and REPO_ID.fullmatch(str(src)) is not None
            and not Path(str(src).split("/")[0]).is_dir())


def missing_local_path(src: str) -> str:
    """One line for a local path that does not exist, naming the closest entries of its folder."""
    path = Path(src)
    parent = path.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    try:
        names = sorted(p.name for p in parent.iterdir())
    except OSError:
        names = []
    close = difflib.get_close_matches(path.name, names, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(str(parent / n) for n in close)}?)" if close else ""
    return f"{src}: no such file or folder{hint}"


def allow_patterns(only: list[str] | None) -> list[str]:
    """The files of an original repo the chosen components (default: all) need."""
    from .pipeline import load_pipeline_table

    patterns = []
    folders = sorted({sub for lay in load_pipeline_table().transformer_layouts for sub in lay.instances.values()})
    for name in table_names():
        if only and name not in only:
            continue
        src = load_table(name).source
        if src.weights_name:  # at the root, or in each transformer instance's folder (Wan 2.2 A14B experts)
            files = ["config.json", src.weights_name, index_name(src.weights_name), shard_glob(src.weights_name)]
            patterns += [f if sub == "." else f"{sub}/{f}" for sub in folders for f in files]
        patterns += list(src.file_names)
    patterns.append("README.md")  # license and tags for the model card (publish)
    if not only or "tokenizer" in only or "text_encoder" in only:
        patterns.append(f"{load_pipeline_table().tokenizer.source_folder}/*")
    return list(dict.fromkeys(patterns))


def diffusers_patterns(only: list[str] | None) -> list[str]:
    """The files of a Diffusers repo (e.g. Wan-AI/Wan2.1-T2V-14B-Diffusers) the chosen components
    need, for `--to original|comfyui`: each component folder's config, weights and index, the
    tokenizer with the text encoder, model_index.json and a conversion record."""
    from .pipeline import load_pipeline_table
    from .write.workfiles import RECORD_NAME

    folders = []
    instances = sorted({i for lay in load_pipeline_table().transformer_layouts for i in lay.instances})
    for name in table_names():
        if only and name not in only:
            continue
        out = load_table(name).output
        folders += instances if name == "transformer" else [out.folder]
        if name == "text_encoder":
            folders.append("tokenizer")
    return ["model_index.json", RECORD_NAME, "README.md", *(f"{f}/*" for f in folders)]


def download(repo_id: str, only: list[str] | None, revision: str | None = None,
             patterns: list[str] | None = None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, revision=revision,
                                      allow_patterns=patterns if patterns is not None else allow_patterns(only)))
    except GatedRepoError:
        raise ConversionError(f"{repo_id}: gated repository; accept its terms on the Hub and log in "
                              f"(hf auth login) or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ConversionError(f"{repo_id}: no such repository on the Hub (or no access to it)") from None
    except RevisionNotFoundError:
        raise ConversionError(f"{repo_id}: no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        raise ConversionError(f"{repo_id}: no local folder of that name, and it cannot be downloaded as a Hub "
                              f"repo id: no network (or HF_HUB_OFFLINE is set) and not in the local Hub "
                              f"cache") from None
    except Exception as e:  # noqa: BLE001 - network failures come in many types
        raise ConversionError(f"{repo_id}: download failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
