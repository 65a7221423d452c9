"""What fixes the data order, recorded in each checkpoint so a resume cannot silently read other data.

Step ``s`` reads instances ``[s*G, (s+1)*G)`` of an order set by the files, their sizes and weights, the
dtype, ``seq_len`` and ``data.seed``: change any of them, or the global batch size ``G``, and a resumed run
maps its remaining steps onto other instances (repeating some, skipping others) without an error.
Files are recorded by their paths as configured, before ``data.root``, so a corpus moved to another
mount resumes; a new stage (``reset_trainer_state=true``) is not a resume and is not checked.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from megolmo.data.sources import DataSources
from megolmo.errors import MegolmoConfigError

FINGERPRINT_KEY = "data_fingerprint"


def data_fingerprint(sources: DataSources, seq_len: int, seed: int, global_batch_size: int) -> dict[str, Any]:
    files = [[rel, os.path.getsize(full)] for rel, full in zip(sources.relative_paths, sources.paths)]
    return {"data.paths": {"files": len(files), "sha256": _digest(files)},
            "data.dtype": sources.dtype, "data.seq_len": seq_len, "data.seed": seed,
            "data.weights": None if sources.weights is None else _digest([float(w) for w in sources.weights]),
            "trainer.global_batch_size": global_batch_size}


def check_same_data(saved: dict[str, Any] | None, current: dict[str, Any], checkpoint: str) -> None:
    """One line naming every key whose value changed since ``checkpoint`` was saved (older checkpoints,
    which record none, are not checked)."""
    if saved is None:
        return
    changed = [_describe(key, saved.get(key), value) for key, value in current.items() if saved.get(key) != value]
    if changed:
        raise MegolmoConfigError(
            f"resuming {checkpoint} with a different data order: {'; '.join(changed)}. Its remaining steps would "
            "read other instances: restore these settings, or start a new stage from it with "
            "load_path=... reset_trainer_state=true")


def _describe(key: str, saved: Any, now: Any) -> str:
    if key == "data.paths" and isinstance(saved, dict):
        counts = f"{saved['files']} files then, {now['files']} now" if saved["files"] != now["files"] else (
            f"the same {now['files']} files by count, but other paths or sizes")
        return f"data.paths ({counts})"
    if key == "data.weights":
        return "data.weights (other mixture weights)"
    return f"{key} ({saved} then, {now} now)"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()
