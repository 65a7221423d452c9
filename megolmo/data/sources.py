"""Which files a run reads, at what weights and dtype: ``data.paths`` or a named mix, under ``data.root``.

A named mix (``data.mix=olmo-mix-1124``) is data, not code: ``conf/mixes/<name>.yaml`` lists its files
relative to the root they were published under, grouped in sources, in the published order (a file listed
twice counts twice, which is how OLMo's configs set proportions) and optionally with a weight per source.
Every file is looked for before anything starts, and the missing ones are named in one error.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from megolmo.data.sidecar import read_sidecar
from megolmo.data.token_file import TOKEN_DTYPES
from megolmo.errors import MegolmoConfigError

MIX_DIR = Path(__file__).resolve().parents[2] / "conf" / "mixes"
DEFAULT_DTYPE = "uint32"
MISSING_SHOWN = 5


@dataclass(frozen=True)
class DataSources:
    paths: list[str]
    label_mask_paths: list[str] | None
    weights: list[float] | None
    dtype: str
    relative_paths: list[str]  # as configured, before data.root: what a moved corpus keeps


def resolve_sources(data_cfg: Mapping[str, Any], mix_dir: Path = MIX_DIR) -> DataSources:
    """The run's files, checked to exist; ``data.dtype`` unset means the mix's, else the sidecars', else uint32."""
    root = data_cfg.get("root")
    mix_name = data_cfg.get("mix")
    paths = [str(p) for p in _as_list(data_cfg.get("paths"))]
    masks = [str(p) for p in _as_list(data_cfg.get("label_mask_paths"))]
    weights = _as_list(data_cfg.get("weights")) or None
    mix_dtype = None
    if mix_name:
        for key, given in (("paths", paths), ("label_mask_paths", masks), ("weights", weights)):
            if given:
                raise MegolmoConfigError(f"data.{key} and data.mix={mix_name} are both set: a mix names its files "
                                         "and proportions; give one or the other")
        if not root:
            raise MegolmoConfigError(f"data.mix={mix_name} needs data.root=DIR, the directory its files are under")
        paths, source_weights, mix_dtype = read_mix(mix_name, mix_dir)
    if not paths:
        raise MegolmoConfigError("data.paths is missing or empty: give at least one token file (or data.mix)")
    full = [_under(root, p) for p in paths]
    check_files_exist(full, f"data.mix={mix_name}" if mix_name else "data.paths", root)
    if masks:
        check_files_exist([_under(root, p) for p in masks], "data.label_mask_paths", root)
    if mix_name and source_weights is not None:
        weights = _per_file_weights(full, source_weights)
    dtype = _resolve_dtype(data_cfg.get("dtype"), mix_name, mix_dtype, full)
    return DataSources(full, [_under(root, p) for p in masks] or None, weights, dtype, paths)


def read_mix(name: str, mix_dir: Path = MIX_DIR) -> tuple[list[str], list[tuple[int, float]] | None, str]:
    """A mix's files in order; for each file its source's (index, weight), None when no source has a
    weight; and the files' dtype."""
    path = mix_dir / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in mix_dir.glob("*.yaml"))
        raise MegolmoConfigError(f"data.mix={name}: no such mix (choose from {', '.join(known) or 'none'})")
    mix = yaml.safe_load(path.read_text(encoding="utf-8"))
    if mix.get("dtype") not in TOKEN_DTYPES:
        raise MegolmoConfigError(f"mix file {path}: dtype={mix.get('dtype')!r}, expected one of {sorted(TOKEN_DTYPES)}")
    sources = mix["sources"]
    weighted = [source.get("weight") is not None for source in sources]
    if any(weighted) and not all(weighted):
        raise MegolmoConfigError(f"mix file {path}: give every source a weight, or none")
    files = [file for source in sources for file in source["paths"]]
    if not any(weighted):
        return files, None, mix["dtype"]
    return files, [(i, float(source["weight"])) for i, source in enumerate(sources) for _ in source["paths"]], mix["dtype"]


def check_files_exist(paths: list[str], what: str, root: str | None) -> None:
    """One error for all the missing files: how many, and the first few."""
    missing = [p for p in dict.fromkeys(paths) if not os.path.isfile(p)]
    if not missing:
        return
    under = f" under data.root={root}" if root else ""
    shown = ", ".join(missing[:MISSING_SHOWN]) + (f", ... ({len(missing) - MISSING_SHOWN} more)"
                                                  if len(missing) > MISSING_SHOWN else "")
    total = len(set(paths))
    raise MegolmoConfigError(f"{what}: {len(missing)} of {total} files missing{under}: {shown}"
                             if total > 1 else f"{what}: no such file: {shown}")


def _per_file_weights(paths: list[str], source_weights: list[tuple[int, float]]) -> list[float]:
    """A source's weight shared among its files by size, so each source gets its share of the mixture."""
    sizes = [os.path.getsize(p) for p in paths]
    totals: dict[int, int] = {}
    for (source, _), size in zip(source_weights, sizes):
        totals[source] = totals.get(source, 0) + size
    return [w * size / totals[source] for (source, w), size in zip(source_weights, sizes)]


def _resolve_dtype(configured: str | None, mix_name: str | None, mix_dtype: str | None, paths: list[str]) -> str:
    if configured is not None:
        if mix_dtype is not None and configured != mix_dtype:
            raise MegolmoConfigError(f"data.dtype={configured}, but mix {mix_name}'s files are {mix_dtype}; "
                                     "leave data.dtype unset")
        return configured
    if mix_dtype is not None:
        return mix_dtype
    found: dict[str, str] = {}
    for path in dict.fromkeys(paths):
        info = read_sidecar(path)
        if info is not None:
            found.setdefault(info.dtype, path)
    if len(found) > 1:
        (a, first), (b, second) = list(found.items())[:2]
        raise MegolmoConfigError(f"token files {first} ({a}) and {second} ({b}) have different dtypes: one run "
                                 "reads one dtype")
    return next(iter(found), DEFAULT_DTYPE)


def _under(root: str | None, path: str) -> str:
    return os.path.join(root, path) if root and not os.path.isabs(path) else path


def _as_list(value: Any) -> list:
    """Config lists arrive as ListConfig, list, a lone string, or None."""
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return [value]
    return list(value)
