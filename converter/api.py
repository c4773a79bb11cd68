"""The Python API: what each `wan2diffusers` command does, callable from scripts and notebooks.
The CLI is a thin layer over these functions: each returns the report that `--json` prints (a
`Report`, a dict with attribute access), and an expected failure (bad input, a refused
operation, an OS error) raises `ConversionError` with the same one-line message the CLI prints.

    import wan2diffusers
    report = wan2diffusers.convert("Wan2.1-T2V-1.3B", "out/t2v", dtype="bf16")
    report.output, [c["class"] for c in report.components]
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Callable, Iterable, Literal, Mapping, Union

from .actions.common import check_size, os_errors, parse_settings, silent
from .errors import ConversionError

PathArg = Union[str, "PathLike[str]"]
Log = Callable[[str], None]
Dtype = Literal["keep", "fp32", "bf16", "fp16", "fp8_e4m3fn", "fp8_e5m2"]  # fp8: to="comfyui" only
Weights = str  # int8, float8, int4 (quanto/torchao); Q8_0 ... F32 with to="gguf"; fp8_scaled with to="comfyui"
Backend = Literal["quanto", "torchao"]

__all__ = ["Report", "ConversionError", "convert", "convert_lora", "merge", "quantize", "inspect", "verify", "repair", "publish"]


class Report(dict):
    """What an action did, exactly the dict `--json` prints; keys read as attributes too
    (`report.ok`, `report["components"]`)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _components(only: Union[str, Iterable[str], None]) -> list[str] | None:
    """--only as a list of known component names (None: all); empty or unknown names are refused."""
    from .mapping.tables import table_names

    if only is None:
        return None
    items = only.split(",") if isinstance(only, str) else list(only)
    names = [str(c).strip() for c in items]
    known = list(table_names())
    if not names or any(not n for n in names):
        raise ConversionError(f"--only {only!r}: give component names separated by commas ({', '.join(known)})")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConversionError(f"--only: unknown component(s) {unknown}; choose from {sorted(known)}")
    return list(dict.fromkeys(names))


def _settings(settings: Union[Mapping[str, Mapping], Iterable[str], None]) -> dict[str, dict]:
    """{component: {fact: value}} as given, or `COMPONENT.FACT=VALUE` strings as --set takes them."""
    if settings is None:
        return {}
    if isinstance(settings, Mapping):
        out = {}
        for component, facts in settings.items():
            if not isinstance(facts, Mapping):
                raise ConversionError(f"settings[{component!r}]: expected a mapping of fact -> value")
            out[str(component)] = dict(facts)
        return out
    return parse_settings(settings)


def convert(source: PathArg, output: PathArg, *, dtype: Dtype = "keep", quantize: Weights | None = None,
            only: Union[str, Iterable[str], None] = None, overwrite: bool = False, max_shard_size: str | None = None,
            settings: Union[Mapping[str, Mapping], Iterable[str], None] = None, override_config: bool = False,
            clip_heads: int | None = None, flow_shift: float | None = None, check_finite: bool = False,
            dry_run: bool = False, log: Log | None = None, warn: Log | None = None,
            progress: bool = True, backend: Backend | None = None,
            to: Literal["diffusers", "gguf", "original", "comfyui", "kohya"] = "diffusers",
            drop_unsupported: bool = False) -> Report:
    """Convert the original Wan weights at `source` (a repo folder, one file, or a Hub repo id)
    into a Diffusers folder `output` (`wan2diffusers convert`). `settings`: facts the weights
    cannot tell, e.g. {"transformer": {"num_heads": 12}}; a value that contradicts the source's
    config.json is refused unless `override_config`. `log`/`warn`: where the text report and
    warnings go (default: nowhere). `to`: "gguf" writes the transformer as a .gguf file
    (`quantize` a GGUF type); "original" / "comfyui" take a Diffusers `source` (a folder or a
    *-Diffusers repo id) back to the original Wan-AI layout or to ComfyUI's single files.
    Returns the report; raises ConversionError."""
    from .actions.convert import run_convert

    with os_errors(output, "; nothing was written"):
        if max_shard_size is not None:
            check_size(max_shard_size)
        return Report(run_convert(Path(source), Path(output), _components(only), max_shard_size, dtype,
                                  _settings(settings), clip_heads, flow_shift, overwrite, dry_run,
                                  say=log or silent, warn=warn or silent, progress=progress, quantize=quantize,
                                  check_finite=check_finite, override_config=override_config, backend=backend,
                                  to=to, drop_unsupported=drop_unsupported))


def merge(base: PathArg, output: PathArg, loras: Iterable[Union[str, PathArg]], *, dtype: Dtype = "keep",
          quantize: Weights | None = None, to: Literal["diffusers", "gguf", "original", "comfyui"] = "diffusers",
          only: Union[str, Iterable[str], None] = None, overwrite: bool = False, max_shard_size: str | None = None,
          settings: Union[Mapping[str, Mapping], Iterable[str], None] = None, dry_run: bool = False,
          drop_unsupported: bool = False, log: Log | None = None, progress: bool = True) -> Report:
    """`convert` with the LoRA files `loras` merged into the transformer, streamed (`wan2diffusers
    merge`): any output `convert` writes (`to`, `dtype`, `quantize`), from any base it reads (an
    original repo, a single file, a Hub id; a Diffusers folder for to="original"/"comfyui"/"gguf").
    Each item is `[EXPERT=]FILE[:STRENGTH]` (Wan 2.2 A14B: `high=...` / `low=...`). Every module a
    LoRA touches must exist with its shape, else nothing is written (`drop_unsupported`: such modules
    are left out and listed, report["loras"][i]["left_out"]); report["loras"] lists what changed."""
    from .actions.convert import run_convert
    from .actions.merge import LoraArg

    args = tuple(LoraArg.parse(str(x)) for x in loras)
    if not args:
        raise ConversionError("merge: give at least one --lora FILE")
    with os_errors(output, "; nothing was written"):
        if max_shard_size is not None:
            check_size(max_shard_size)
        return Report(run_convert(Path(base), Path(output), _components(only), max_shard_size, dtype,
                                  _settings(settings), None, None, overwrite, dry_run, say=log or silent,
                                  progress=progress, quantize=quantize, to=to, loras=args,
                                  drop_unsupported=drop_unsupported))


def convert_lora(source: PathArg, output: PathArg, *, to: Literal["diffusers", "original", "kohya", "comfyui"],
                 drop_unsupported: bool = False, overwrite: bool = False, dry_run: bool = False,
                 log: Log | None = None) -> Report:
    """Convert the Wan LoRA file `source` (any format mappings/lora.yaml reads: original/Kijai/
    lightx2v, kohya/musubi, diffusers/PEFT, DiffSynth) into one LoRA file `output` in format `to`.
    Every key is placed on a module of the Wan transformer or the conversion is refused; what `to`
    cannot hold is refused, or with `drop_unsupported` left out and listed (report["left_out"])."""
    from .actions.lora import run_convert_lora
    from .layouts import locate

    with os_errors(output, "; nothing was written"):
        if locate(source).layout != "lora":
            raise ConversionError(f"{source}: not a LoRA file (a .safetensors file of LoRA keys)")
        return Report(run_convert_lora(Path(source), Path(output), to, overwrite, dry_run, drop_unsupported,
                                       log or silent))


def quantize(source: PathArg, output: PathArg, *, weights: Weights, overwrite: bool = False,
             max_shard_size: str = "5GB", dry_run: bool = False, log: Log | None = None,
             backend: Backend | None = None, progress: bool = True) -> Report:
    """Quantize the transformer of the converted Diffusers folder `source` (a pipeline folder or a
    transformer folder) into `output` (`wan2diffusers quantize`)."""
    from .actions.quantize import run_quantize

    with os_errors(output, "; nothing was written"):
        check_size(max_shard_size)
        return Report(run_quantize(Path(source), Path(output), weights, max_shard_size, overwrite, dry_run,
                                   say=log or silent, backend=backend, progress=progress))


def inspect(path: PathArg) -> Report:
    """What `path` holds and what is wrong with it, from headers only (`wan2diffusers inspect`);
    `report.healthy` says whether anything is wrong."""
    from .diagnose.report import inspect_path

    with os_errors(path):
        from .actions.lora import inspect_lora
        from .gguf_out import inspect_gguf, inspect_gguf_folder
        from .layouts import gguf, locate

        by_layout = {  # converter/layouts: what locate says PATH is -> what reads it for inspect
            "gguf": lambda at: inspect_gguf(at.path) if at.kind == gguf.FILE else inspect_gguf_folder(at.path, list(at.files)),
            "lora": lambda at: inspect_lora(at.path)}
        located = locate(path)
        if located.layout in by_layout:
            return Report(by_layout[located.layout](located))
        return Report({"ok": True, **inspect_path(Path(path))[2]})


def verify(path: PathArg, source: PathArg | None = None, *, progress: bool = True) -> Report:
    """Keys, shapes, index and config of every component checked strictly; with `source`, every
    tensor compared through the mapping (`wan2diffusers verify`). Differences do not raise:
    `report.ok` is False and `report.differences` names them."""
    from .diagnose.verify import verify_path
    from .plan.layout_cache import bypassed

    if source is not None and not Path(source).exists():
        raise ConversionError(f"{source}: no such file or folder (--source)")
    with os_errors(path), bypassed():  # the judge builds every model itself: no cache can sway it
        from .actions.to_gguf import verify_gguf, verify_gguf_folder
        from .actions.to_original import plan_reversed
        from .layouts import gguf, locate

        src = Path(source) if source is not None else None
        located = locate(path)
        if located.layout == gguf.NAME:  # converter/layouts: a GGUF file or a folder of them
            if located.kind == gguf.FILE:
                return Report(verify_gguf(Path(path), src, progress))
            return Report(verify_gguf_folder(Path(path), list(located.files), src, progress))

        return Report(verify_path(Path(path), Path(source) if source is not None else None, progress=progress,
                                  plan_reversed=plan_reversed))


def repair(path: PathArg, *, source: PathArg | None = None, backup: PathArg | Literal["none"] | None = None,
           settings: Union[Mapping[str, Mapping], Iterable[str], None] = None, max_shard_size: str = "5GB",
           dry_run: bool = False, log: Log | None = None, progress: bool = True) -> Report:
    """Fix what `inspect` finds, in place, with a backup (`wan2diffusers repair`). Components it
    cannot fix are left as they were: `report.ok` is False and each says why in `refused`."""
    from .actions.repair import run_repair

    with os_errors(path, "; the folder was not changed"):
        check_size(max_shard_size)
        return Report(run_repair(Path(path), Path(source) if source is not None else None,
                                 None if backup is None else str(backup), _settings(settings), max_shard_size,
                                 dry_run, say=log or silent, progress=progress))


def publish(output: PathArg, repo_id: str, *, revision: str | None = None, private: bool = False,
            commit_message: str | None = None, base_model: str | None = None, source: PathArg | None = None,
            record: PathArg | None = None, hash_sources: bool = False, fixtures: PathArg | None = None,
            measure: bool = True, dry_run: bool = False, log: Log | None = None) -> Report:
    """Write the model card into `output` and upload its model files to `repo_id` (`wan2diffusers publish`)."""
    from .actions.publish import run_publish

    def opt(p):
        return Path(p) if p is not None else None

    with os_errors(output):
        return Report(run_publish(Path(output), repo_id, revision, private, commit_message, base_model, opt(source),
                                  opt(record), hash_sources, opt(fixtures), not measure, dry_run, say=log or silent))
