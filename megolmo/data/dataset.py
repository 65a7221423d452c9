"""A weighted, shuffled mixture of token files whose order depends only on the seed.

Instance `i` of the dataset is a pure function of (files, seq_len, weights, seed, i): no state is carried
between steps, so any step can be resumed, on any parallel layout, by indexing directly. The epoch's
shuffle and each source's subset are pseudo-random permutations evaluated per index
(``permutation.Permutation``), so the dataset holds O(files) state whatever the corpus size.
"""

from __future__ import annotations

import numpy as np
import torch

from megolmo.data.instance_filter import RepetitionFilter
from megolmo.data.permutation import Permutation
from megolmo.data.token_file import TOKEN_DTYPES, TokenFile
from megolmo.errors import MegolmoConfigError

_SELECT_TAG = 0x5E1EC7  # keeps the per-source selection keys apart from the shuffle keys
_SHUFFLE_TAG = 0x5F0FF1E


class TokenDataset:
    """Fixed-length instances from several token files, mixed by weight, reshuffled every epoch.

    One epoch holds round(w_i / sum(w) * total_instances) instances of source i: all of them when the
    weights are the default (each file's instance count), repeats for an upsampled source, a seeded subset
    for a downsampled one. Indexes past the end of an epoch continue into the next, differently shuffled.
    """

    def __init__(
        self,
        paths: list[str],
        seq_len: int,
        dtype: str,
        vocab_size: int,
        seed: int,
        label_mask_paths: list[str] | None = None,
        weights: list[float] | None = None,
        eos_token_id: int | None = None,
        instance_filter: RepetitionFilter | None = None,
    ) -> None:
        paths = list(paths)
        _validate(paths, seq_len, dtype, vocab_size, seed, label_mask_paths, weights)
        masks = list(label_mask_paths) if label_mask_paths else [None] * len(paths)
        self.files = [TokenFile(p, seq_len, dtype, vocab_size, m, eos_token_id) for p, m in zip(paths, masks)]
        self.seq_len = seq_len
        self.seed = seed
        self.has_label_masks = bool(label_mask_paths)
        self.instance_filter = instance_filter
        sizes = np.array([len(f) for f in self.files], dtype=np.int64)
        w = sizes.astype(np.float64) if weights is None else np.asarray(weights, dtype=np.float64)
        self.counts = [int(round(wi / w.sum() * int(sizes.sum()))) for wi in w]
        self.epoch_len = sum(self.counts)
        if self.epoch_len == 0:
            raise MegolmoConfigError(f"data.weights={list(w)}: every source rounds to zero instances per epoch")
        self._count_offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self._permutations: dict[tuple[int, ...], Permutation] = {}  # a few integers each, per epoch (and source)

    def __len__(self) -> int:
        """Instances in one epoch; `__getitem__` accepts any non-negative index."""
        return self.epoch_len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        file, k = self.locate(index)
        tokens = file.tokens(k)
        kept = self.instance_filter is None or self.instance_filter.keeps(tokens)
        mask = file.label_mask(k)
        if not kept:
            label_mask = torch.zeros(self.seq_len, dtype=torch.bool)
        else:
            label_mask = torch.ones(self.seq_len, dtype=torch.bool) if mask is None else torch.from_numpy(mask)
        return {"input_ids": torch.from_numpy(tokens.astype(np.int64)), "label_mask": label_mask,
                "instance_mask": torch.tensor(kept)}

    def locate(self, index: int) -> tuple[TokenFile, int]:
        """Epoch ``e`` lays the sources out one after another (source i's ``counts[i]`` instances: whole
        repeats of its file, then a seeded subset), then shuffles that layout."""
        if index < 0:
            raise IndexError(f"dataset index {index} is negative")
        epoch, pos = divmod(int(index), self.epoch_len)
        slot = self._shuffle(epoch)[pos]
        source = int(np.searchsorted(self._count_offsets, slot, side="right")) - 1
        j = slot - int(self._count_offsets[source])
        n = len(self.files[source])
        whole = self.counts[source] // n * n
        k = j % n if j < whole else self._subset(epoch, source)[j - whole]
        return self.files[source], k

    def _shuffle(self, epoch: int) -> Permutation:
        return self._permutation(self.epoch_len, epoch, _SHUFFLE_TAG)

    def _subset(self, epoch: int, source: int) -> Permutation:
        """Its first ``counts % n`` values pick the instances a partial repeat of the source takes."""
        return self._permutation(len(self.files[source]), epoch, _SELECT_TAG, source)

    def _permutation(self, n: int, *key: int) -> Permutation:
        if key not in self._permutations:
            self._permutations[key] = Permutation(n, [self.seed, *key])
        return self._permutations[key]


def _validate(
    paths: list[str],
    seq_len: int,
    dtype: str,
    vocab_size: int,
    seed: int,
    label_mask_paths: list[str] | None,
    weights: list[float] | None,
) -> None:
    if not paths:
        raise MegolmoConfigError("data.paths is empty: give at least one token file")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise MegolmoConfigError(
            f"data.seq_len={seq_len!r}: expected an integer >= 2 (an instance predicts its tokens 1..seq_len-1)"
        )
    if dtype not in TOKEN_DTYPES:
        raise MegolmoConfigError(f"data.dtype={dtype!r}: expected one of {sorted(TOKEN_DTYPES)}")
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise MegolmoConfigError(f"model.vocab_size={vocab_size!r}: expected a positive integer")
    if not isinstance(seed, int) or seed < 0:
        raise MegolmoConfigError(f"data.seed={seed!r}: expected a non-negative integer")
    if label_mask_paths and len(label_mask_paths) != len(paths):
        raise MegolmoConfigError(
            f"data.label_mask_paths has {len(label_mask_paths)} entries but data.paths has {len(paths)}: "
            "give one mask file per token file, or none"
        )
    if weights is not None:
        weights = list(weights)
        if len(weights) != len(paths):
            raise MegolmoConfigError(f"data.weights has {len(weights)} entries but data.paths has {len(paths)}")
        try:
            values = np.asarray(weights, dtype=np.float64)
        except (TypeError, ValueError):
            values = np.array([np.nan])
        if not np.all(np.isfinite(values)) or np.any(values < 0) or values.sum() <= 0:
            raise MegolmoConfigError(
                f"data.weights={weights}: expected finite non-negative numbers with a positive sum"
            )
