"""One global batch split into 1, 2 or 4 micro-batches gives the same loss and gradients."""
from __future__ import annotations

import pytest
import torch

from megolmo.data.dataset import TokenDataset
from megolmo.data.loader import GlobalBatchLoader
from megolmo.model.init import initialize_parameters
from megolmo.model.olmo2 import Olmo2ForCausalLM
from megolmo.optim.buffers import FlatBuffers
from megolmo.step import forward_backward
from tests.conftest import GQA, write_mask, write_tokens

GLOBAL_BATCH = 8


def loss_and_grads(dataset: TokenDataset, micro_batch_size: int, step: int = 0):
    model = Olmo2ForCausalLM(GQA)
    initialize_parameters(model, 21, 0.02)
    params = list(model.parameters())
    FlatBuffers(list(model.named_parameters()), dp_size=1, bucket_size=10_000)
    loader = GlobalBatchLoader(dataset, GLOBAL_BATCH, micro_batch_size)
    tokens = loader.read_step(step).loss_tokens
    ce, z = forward_backward(model, loader.micro_batches(step), tokens, 1e-4, torch.device("cpu"))
    return ce.item() / tokens, z.item() / tokens, [p.main_grad.clone() for p in params]


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "uneven-label-masks"])
def test_micro_batch_split_is_exact(tmp_path, masked: bool):
    n = 40 * 64
    tokens = write_tokens(tmp_path / "tokens.npy", n, GQA.vocab_size)
    masks = None
    if masked:
        # density varies strongly between instances: 2% in the first half of the file, 90% in the second
        import numpy as np
        mask = np.concatenate([np.random.default_rng(0).random(n // 2) < 0.02,
                               np.random.default_rng(1).random(n - n // 2) < 0.9]).astype(np.uint8)
        mask.tofile(tmp_path / "mask.npy")
        masks = [str(tmp_path / "mask.npy")]
    dataset = TokenDataset([tokens], seq_len=64, dtype="uint16", vocab_size=GQA.vocab_size, seed=3,
                           label_mask_paths=masks)
    reference = loss_and_grads(dataset, GLOBAL_BATCH)
    for micro_batch_size in (4, 2):
        ce, z, grads = loss_and_grads(dataset, micro_batch_size)
        assert ce == pytest.approx(reference[0], rel=1e-6)
        assert z == pytest.approx(reference[1], rel=1e-6)
        for grad, expected in zip(grads, reference[2]):
            # relative to each tensor's norm: fp32 sums in another order differ in the last bits
            assert (grad - expected).norm() <= 1e-6 * expected.norm()
    if masked:
        per_instance = [int(dataset[i]["label_mask"][1:].sum()) for i in range(GLOBAL_BATCH)]
        assert max(per_instance) > 5 * max(1, min(per_instance)), per_instance


def test_loss_is_global_mean_not_mean_of_micro_batch_means(tmp_path):
    """With uneven masks, the mean of per-micro-batch means differs from the convention's value."""
    n = 16 * 32
    tokens = write_tokens(tmp_path / "t.npy", n, GQA.vocab_size)
    mask = write_mask(tmp_path / "m.npy", n, 0.5)
    dataset = TokenDataset([tokens], seq_len=32, dtype="uint16", vocab_size=GQA.vocab_size, seed=0,
                           label_mask_paths=[mask])
    loader = GlobalBatchLoader(dataset, 8, 1)
    expected = sum(int(dataset[i]["label_mask"][1:].sum()) for i in range(8))
    assert loader.read_step(0).loss_tokens == expected
