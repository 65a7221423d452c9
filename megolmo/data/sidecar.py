"""What a token file is, written beside it by ``prepare_data``: ``<file>.meta.json``.

A token file is a headerless memmap, so nothing in it says whether its ids are uint16 or uint32 or which
tokenizer wrote them: a uint32 file read as uint16 trains "fine" on ids that are every other one 0. The
sidecar records the dtype, the token and document counts, and the tokenizer's vocabulary size, EOS id and
file hash, and the trainer refuses a file whose sidecar contradicts the run (``check_against_run``).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

from megolmo.errors import MegolmoConfigError

SIDECAR_SUFFIX = ".meta.json"
FORMAT = "megolmo-token-file-1"


@dataclass(frozen=True)
class TokenFileInfo:
    dtype: str
    num_tokens: int
    num_documents: int
    vocab_size: int  # the tokenizer's, before the model pads it
    eos_token_id: int
    tokenizer_sha256: str

    def describe(self) -> str:
        return (f"{self.num_tokens:,} {self.dtype} tokens in {self.num_documents:,} documents; tokenizer "
                f"vocabulary {self.vocab_size:,}, EOS id {self.eos_token_id}, sha256 {self.tokenizer_sha256[:12]}")


def sidecar_path(token_path: str) -> str:
    return token_path + SIDECAR_SUFFIX


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_sidecar(token_path: str, info: TokenFileInfo) -> str:
    path = sidecar_path(token_path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"format": FORMAT, **asdict(info)}, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_sidecar(token_path: str) -> TokenFileInfo | None:
    """The file's sidecar, or None when it has none (files from other tools); a damaged one is an error."""
    path = sidecar_path(token_path)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        if record.pop("format", None) != FORMAT:
            raise ValueError(f"not a {FORMAT} sidecar")
        return TokenFileInfo(**record)
    except (OSError, ValueError, TypeError) as error:
        raise MegolmoConfigError(f"token file sidecar {path}: unreadable ({error}); rewrite it with "
                                 "tools/prepare_data.py or delete it") from None


def check_against_run(token_path: str, info: TokenFileInfo, dtype: str, num_tokens: int, vocab_size: int,
                      eos_token_id: int | None) -> None:
    """One line naming the file and the first contradiction between its sidecar and the run."""
    where = f"token file {token_path} (its {os.path.basename(sidecar_path(token_path))})"
    if info.dtype != dtype:
        raise MegolmoConfigError(f"{where}: written as {info.dtype} but data.dtype={dtype}; set "
                                 f"data.dtype={info.dtype} (or leave it unset to take the sidecar's)")
    if info.num_tokens != num_tokens:
        raise MegolmoConfigError(f"{where}: records {info.num_tokens} tokens but the file holds {num_tokens}: "
                                 "truncated or overwritten since it was written")
    if info.vocab_size > vocab_size:
        raise MegolmoConfigError(f"{where}: its tokenizer has {info.vocab_size} ids, more than "
                                 f"model.vocab_size={vocab_size}")
    if eos_token_id is not None and info.eos_token_id != eos_token_id:
        raise MegolmoConfigError(f"{where}: documents end with EOS id {info.eos_token_id} but "
                                 f"model.eos_token_id={eos_token_id}: a different tokenizer?")
