"""One pre-tokenized file (dolma / OLMo-core format) cut into fixed-length, non-overlapping instances.

The file is a raw 1-D memmap of token ids (no header, despite the usual `.npy` name), documents already
separated by EOS. An optional label-mask file holds one byte per token (nonzero = the token is a label).
Everything that can be checked from file sizes, the sidecar ``prepare_data`` writes (``sidecar.py``) and the
first instance is checked on open, so a bad path, a truncated file or a wrong ``data.dtype`` fails at
start-up with one line naming the file instead of deep inside the training loop, or never.
"""

from __future__ import annotations

import os

import numpy as np

from megolmo.data.sidecar import check_against_run, read_sidecar
from megolmo.errors import MegolmoConfigError

TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
PROBE_TOKENS = 4096  # read on open without a sidecar, to recognise a uint32 file read as uint16


class TokenFile:
    """Instances `[k * seq_len, (k + 1) * seq_len)` of one token file; the tail shorter than seq_len is dropped."""

    def __init__(
        self,
        path: str,
        seq_len: int,
        dtype: str,
        vocab_size: int,
        label_mask_path: str | None = None,
        eos_token_id: int | None = None,
    ) -> None:
        if dtype not in TOKEN_DTYPES:
            raise MegolmoConfigError(f"data.dtype={dtype!r} for {path}: expected one of {sorted(TOKEN_DTYPES)}")
        self.path = path
        self.seq_len = seq_len
        self.dtype = dtype
        self.vocab_size = vocab_size
        self.label_mask_path = label_mask_path
        np_dtype = np.dtype(TOKEN_DTYPES[dtype])
        num_bytes = _file_size(path, "token file")
        info = read_sidecar(path)
        if info is not None and info.dtype != dtype:  # before the size check, which would only half-explain it
            check_against_run(path, info, dtype, 0, vocab_size, eos_token_id)
        if num_bytes % np_dtype.itemsize:
            raise MegolmoConfigError(
                f"token file {path}: size {num_bytes} bytes is not a whole number of {dtype} tokens "
                f"({np_dtype.itemsize} bytes each); wrong data.dtype or a truncated file?"
            )
        self.num_tokens = num_bytes // np_dtype.itemsize
        if self.num_tokens < seq_len:
            raise MegolmoConfigError(
                f"token file {path}: {self.num_tokens} tokens, too short for one instance of "
                f"data.seq_len={seq_len} tokens"
            )
        self.num_instances = self.num_tokens // seq_len
        self._tokens = np.memmap(path, dtype=np_dtype, mode="r", shape=(self.num_tokens,))
        if info is not None:
            check_against_run(path, info, dtype, self.num_tokens, vocab_size, eos_token_id)
        else:
            self._check_dtype_without_sidecar(dtype, eos_token_id)
        self._check_ids(0, self._head(seq_len))  # a wrong dtype fails here, not at some step
        self._mask: np.memmap | None = None
        if label_mask_path is not None:
            mask_bytes = _file_size(label_mask_path, "label mask file")
            if mask_bytes != self.num_tokens:
                raise MegolmoConfigError(
                    f"label mask file {label_mask_path}: {mask_bytes} entries but its token file {path} "
                    f"has {self.num_tokens} tokens (one byte per token expected)"
                )
            self._mask = np.memmap(label_mask_path, dtype=np.uint8, mode="r", shape=(self.num_tokens,))

    def __len__(self) -> int:
        return self.num_instances

    def tokens(self, k: int) -> np.ndarray:
        """Token ids of instance k (a copy), checked against the vocabulary: the max is cheap next to the read."""
        start = k * self.seq_len
        ids = np.array(self._tokens[start : start + self.seq_len])
        self._check_ids(start, ids)
        return ids

    def _head(self, count: int) -> np.ndarray:
        """The file's first ``count`` ids, read rather than mapped: probing hundreds of files maps no pages."""
        return np.fromfile(self.path, dtype=self._tokens.dtype, count=min(count, self.num_tokens))

    def _check_ids(self, start: int, ids: np.ndarray) -> None:
        if int(ids.max()) >= self.vocab_size:
            offset = int(np.argmax(ids >= self.vocab_size))
            raise MegolmoConfigError(
                f"token file {self.path}: token id {int(ids[offset])} at position {start + offset} is out of "
                f"range for model.vocab_size={self.vocab_size} (is data.dtype={self.dtype} the file's dtype?)"
            )

    def _check_dtype_without_sidecar(self, dtype: str, eos_token_id: int | None) -> None:
        """What can be told without a sidecar: ids the dtype cannot hold, and a uint32 file's zero high halves."""
        limit = int(np.iinfo(TOKEN_DTYPES[dtype]).max)
        if eos_token_id is not None and eos_token_id > limit:
            raise MegolmoConfigError(f"token file {self.path}: model.eos_token_id={eos_token_id} cannot be stored "
                                     f"as data.dtype={dtype} (ids up to {limit}); the file is likely uint32")
        if self.vocab_size - 1 > limit:
            raise MegolmoConfigError(f"token file {self.path}: model.vocab_size={self.vocab_size} has ids that "
                                     f"data.dtype={dtype} cannot store (up to {limit}); the file is likely uint32")
        if dtype == "uint16":
            probe = self._head(PROBE_TOKENS)
            if len(probe) >= 64 and not probe[1::2].any() and probe[0::2].any():
                raise MegolmoConfigError(
                    f"token file {self.path}: every other uint16 id of its first {len(probe)} is 0, as when a "
                    "uint32 file is read with data.dtype=uint16; set data.dtype=uint32")

    def label_mask(self, k: int) -> np.ndarray | None:
        """Label mask of instance k as bools, or None when the file has no mask (every token is a label)."""
        if self._mask is None:
            return None
        start = k * self.seq_len
        return self._mask[start : start + self.seq_len] != 0


def _file_size(path: str, what: str) -> int:
    if not os.path.exists(path):
        raise MegolmoConfigError(f"{what} {path}: no such file")
    if not os.path.isfile(path):
        raise MegolmoConfigError(f"{what} {path}: not a regular file")
    return os.path.getsize(path)
