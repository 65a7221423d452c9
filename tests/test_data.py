"""Token files, mixtures and deterministic global batches (megolmo.data)."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from megolmo.data.dataset import TokenDataset
from megolmo.data.loader import GlobalBatchLoader, build_loader
from megolmo.data.token_file import TokenFile
from megolmo.errors import MegolmoConfigError

VOCAB = 50_000


def write(path, values, dtype="uint16") -> str:
    np.asarray(values, dtype=dtype).tofile(path)
    return str(path)


@pytest.fixture
def two_files(tmp_path):
    """Tokens are `source * 10_000 + position`, so a row names its file and offset.

    File 0: 40 instances of 8 tokens plus a 5-token tail; file 1: 10 instances.
    """
    a = write(tmp_path / "a.npy", np.arange(40 * 8 + 5))
    b = write(tmp_path / "b.npy", 10_000 + np.arange(10 * 8))
    return a, b


def epoch_rows(ds: TokenDataset, epoch: int = 0) -> list[tuple[int, ...]]:
    return [tuple(ds[epoch * len(ds) + i]["input_ids"].tolist()) for i in range(len(ds))]


# --- instances ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_instance_k_is_tokens_k_times_seq_len(tmp_path, dtype):
    tokens = np.arange(103) * 7
    f = TokenFile(write(tmp_path / "t.npy", tokens, dtype), seq_len=10, dtype=dtype, vocab_size=VOCAB)
    assert len(f) == 10
    for k in range(10):
        np.testing.assert_array_equal(f.tokens(k), tokens[k * 10 : (k + 1) * 10])
    assert f.label_mask(0) is None


def test_dataset_epoch_is_a_permutation_of_all_instances(two_files):
    ds = TokenDataset(list(two_files), seq_len=8, dtype="uint16", vocab_size=VOCAB, seed=0)
    assert len(ds) == 50
    item = ds[0]
    assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == (8,)
    assert item["label_mask"].dtype == torch.bool and bool(item["label_mask"].all())
    expected = [tuple(range(k * 8, k * 8 + 8)) for k in range(40)]
    expected += [tuple(range(10_000 + k * 8, 10_000 + k * 8 + 8)) for k in range(10)]
    rows = epoch_rows(ds)
    assert sorted(rows) == sorted(expected)
    assert rows != expected  # shuffled


def test_label_mask_follows_its_instance(tmp_path):
    tokens = write(tmp_path / "t.npy", np.arange(60))
    mask = write(tmp_path / "t.mask", np.arange(60) % 3 == 0, "bool")
    ds = TokenDataset([tokens], seq_len=6, dtype="uint16", vocab_size=VOCAB, seed=1, label_mask_paths=[mask])
    for i in range(len(ds)):
        item = ds[i]
        torch.testing.assert_close(item["label_mask"], item["input_ids"] % 3 == 0)


# --- mixtures ----------------------------------------------------------------------------------------


def test_weights_3_to_1_set_proportions(tmp_path):
    a = write(tmp_path / "a.npy", np.arange(40 * 4))
    b = write(tmp_path / "b.npy", 10_000 + np.arange(40 * 4))
    ds = TokenDataset([a, b], seq_len=4, dtype="uint16", vocab_size=VOCAB, seed=0, weights=[3, 1])
    assert len(ds) == 80
    rows = epoch_rows(ds)
    by_source = Counter(r[0] // 10_000 for r in rows)
    assert by_source == {0: 60, 1: 20}
    a_counts = Counter(r for r in rows if r[0] < 10_000)
    assert len(a_counts) == 40 and sorted(set(a_counts.values())) == [1, 2]  # every instance, 20 repeated
    assert len({r for r in rows if r[0] >= 10_000}) == 20  # subsampled without repeats


def test_small_source_upsampled_evenly(tmp_path):
    a = write(tmp_path / "a.npy", np.arange(60 * 4))
    b = write(tmp_path / "b.npy", 10_000 + np.arange(4 * 4))
    ds = TokenDataset([a, b], seq_len=4, dtype="uint16", vocab_size=VOCAB, seed=3, weights=[0.5, 0.5])
    b_counts = Counter(r for r in epoch_rows(ds) if r[0] >= 10_000)
    assert list(b_counts.values()) == [8, 8, 8, 8]


def test_zero_weight_drops_a_source(two_files):
    ds = TokenDataset(list(two_files), seq_len=8, dtype="uint16", vocab_size=VOCAB, seed=0, weights=[0, 1])
    assert {r[0] // 10_000 for r in epoch_rows(ds)} == {1}


def test_order_is_deterministic_and_seeded(two_files):
    first, again, other = (TokenDataset(list(two_files), 8, "uint16", VOCAB, seed=s) for s in (5, 5, 6))
    assert epoch_rows(first) == epoch_rows(again)
    assert epoch_rows(first, 1) == epoch_rows(again, 1)
    assert epoch_rows(first) != epoch_rows(other)


def test_indexes_past_an_epoch_continue_in_a_new_order(two_files):
    ds = TokenDataset(list(two_files), seq_len=8, dtype="uint16", vocab_size=VOCAB, seed=0)
    e0, e1, e3 = epoch_rows(ds, 0), epoch_rows(ds, 1), epoch_rows(ds, 3)
    assert sorted(e0) == sorted(e1) == sorted(e3)
    assert e0 != e1 and e1 != e3
    assert epoch_rows(ds, 0) == e0  # rebuilt after eviction, still the same


# --- global batches ----------------------------------------------------------------------------------


def concat(batches: list[dict[str, torch.Tensor]], key: str) -> torch.Tensor:
    return torch.cat([b[key] for b in batches])


def test_global_batch_is_consecutive_instances(two_files):
    ds = TokenDataset(list(two_files), seq_len=8, dtype="uint16", vocab_size=VOCAB, seed=0)
    loader = GlobalBatchLoader(ds, global_batch_size=12, micro_batch_size=4)
    batches = loader.micro_batches(3)  # crosses the epoch boundary at 50
    assert len(batches) == loader.num_micro_batches == 3
    assert batches[0]["input_ids"].shape == (4, 8) and batches[0]["label_mask"].dtype == torch.bool
    expected = torch.stack([ds[i]["input_ids"] for i in range(36, 48)])
    torch.testing.assert_close(concat(batches, "input_ids"), expected)


def test_resuming_at_step_k_sees_the_same_batches(two_files):
    paths = list(two_files)
    seen = []
    loader = GlobalBatchLoader(TokenDataset(paths, 8, "uint16", VOCAB, seed=2), 8, 2)
    for step in range(6):
        seen.append(loader.micro_batches(step))
    resumed = GlobalBatchLoader(TokenDataset(paths, 8, "uint16", VOCAB, seed=2), 8, 2)
    for step in (5, 2):
        for got, want in zip(resumed.micro_batches(step), seen[step]):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dp_size,mbs", [(2, 1), (2, 3), (3, 2), (6, 1)])
def test_dp_ranks_partition_the_global_batch_in_order(two_files, dp_size, mbs):
    ds = TokenDataset(list(two_files), seq_len=8, dtype="uint16", vocab_size=VOCAB, seed=0)
    whole = GlobalBatchLoader(ds, global_batch_size=6, micro_batch_size=6)
    for step in (0, 7):
        ranks = [GlobalBatchLoader(ds, 6, mbs, dp_rank=r, dp_size=dp_size) for r in range(dp_size)]
        union = [b for loader in ranks for b in loader.micro_batches(step)]
        assert all(b["input_ids"].shape[0] == mbs for b in union)
        torch.testing.assert_close(concat(union, "input_ids"), concat(whole.micro_batches(step), "input_ids"))
        assert sum(loader.read_step(step).loss_tokens for loader in ranks) == whole.read_step(step).loss_tokens


def test_loss_tokens_count_this_ranks_masked_labels(tmp_path):
    rng = np.random.default_rng(0)
    tokens = write(tmp_path / "t.npy", rng.integers(0, 100, 16 * 5))
    mask_values = rng.random(16 * 5) < 0.6
    mask = write(tmp_path / "t.mask", mask_values, "bool")
    ds = TokenDataset([tokens], seq_len=5, dtype="uint16", vocab_size=100, seed=0, label_mask_paths=[mask])
    loader = GlobalBatchLoader(ds, global_batch_size=4, micro_batch_size=2, dp_rank=1, dp_size=2)
    for step in range(5):
        expected = sum(int(ds[i]["label_mask"][1:].sum()) for i in range(step * 4 + 2, step * 4 + 4))
        assert loader.read_step(step).loss_tokens == expected
    unmasked = GlobalBatchLoader(TokenDataset([tokens], 5, "uint16", 100, seed=0), 4, 2)
    assert unmasked.read_step(9).loss_tokens == 4 * 4


def test_build_loader_from_config(two_files):
    a, b = two_files
    data = OmegaConf.create({"paths": [a, b], "seq_len": 8, "dtype": "uint16", "seed": 0, "label_mask_paths": None})
    trainer = OmegaConf.create({"global_batch_size": 4, "micro_batch_size": 1})
    loader = build_loader(data, trainer, vocab_size=VOCAB, dp_rank=1, dp_size=2)
    reference = GlobalBatchLoader(TokenDataset([a, b], 8, "uint16", VOCAB, seed=0), 4, 1, 1, 2)
    torch.testing.assert_close(loader.micro_batches(1), reference.micro_batches(1))
    weighted = build_loader({**data, "label_mask_paths": [], "weights": [1, 1]}, trainer, VOCAB, 0, 1)
    assert len(weighted.dataset) == 50


# --- bad input ---------------------------------------------------------------------------------------


def raises_naming(*parts: str):
    return pytest.raises(MegolmoConfigError, match=".*".join(re.escape(p) for p in parts))


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_token_file(tmp_path):
    path = str(tmp_path / "nope.npy")
    with raises_naming(path, "no such file") as e:
        TokenDataset([path], 8, "uint16", VOCAB, seed=0)
    one_line(e)


def test_size_not_whole_tokens(tmp_path):
    path = tmp_path / "odd.npy"
    path.write_bytes(b"\x00" * 41)
    with raises_naming(str(path), "whole number", "uint16") as e:
        TokenFile(str(path), 4, "uint16", VOCAB)
    one_line(e)
    path.write_bytes(b"\x00" * 42)
    with raises_naming(str(path), "uint32"):
        TokenFile(str(path), 4, "uint32", VOCAB)


def test_file_shorter_than_one_instance(tmp_path):
    path = write(tmp_path / "short.npy", np.arange(7))
    with raises_naming(path, "7 tokens", "data.seq_len=8") as e:
        TokenFile(path, 8, "uint16", VOCAB)
    one_line(e)


def test_mask_length_mismatch(tmp_path):
    tokens = write(tmp_path / "t.npy", np.arange(32))
    mask = write(tmp_path / "t.mask", np.ones(31), "bool")
    with raises_naming(mask, "31", tokens, "32") as e:
        TokenDataset([tokens], 8, "uint16", VOCAB, seed=0, label_mask_paths=[mask])
    one_line(e)
    with raises_naming(str(tmp_path / "missing.mask"), "no such file"):
        TokenFile(tokens, 8, "uint16", VOCAB, label_mask_path=str(tmp_path / "missing.mask"))


def test_token_id_out_of_vocabulary(tmp_path):
    values = np.arange(32)
    values[21] = 999
    path = write(tmp_path / "t.npy", values)
    f = TokenFile(path, 8, "uint16", vocab_size=100)  # opening reads only the first instance
    f.tokens(1)
    with raises_naming(path, "token id 999", "position 21", "model.vocab_size=100") as e:
        f.tokens(2)
    one_line(e)
    ds = TokenDataset([path], 8, "uint16", vocab_size=100, seed=0)
    failures = 0
    for i in range(len(ds)):
        try:
            ds[i]
        except MegolmoConfigError:
            failures += 1
    assert failures == 1


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"label_mask_paths": ["m1", "m2", "m3"]}, "data.label_mask_paths"),
        ({"weights": [1.0]}, "data.weights"),
        ({"weights": [1.0, -1.0]}, "data.weights"),
        ({"weights": [0.0, 0.0]}, "data.weights"),
        ({"weights": [1.0, float("nan")]}, "data.weights"),
        ({"dtype": "int32"}, "data.dtype"),
        ({"seq_len": 1}, "data.seq_len"),
        ({"paths": []}, "data.paths"),
    ],
)
def test_bad_dataset_arguments_name_their_key(two_files, kwargs, key):
    args = {"paths": list(two_files), "seq_len": 8, "dtype": "uint16", "vocab_size": VOCAB, "seed": 0} | kwargs
    with raises_naming(key):
        TokenDataset(**args)


@pytest.mark.parametrize(
    "gbs,mbs,dp,key",
    [
        (6, 1, 4, "trainer.global_batch_size"),
        (8, 3, 2, "trainer.micro_batch_size"),
        (0, 1, 1, "trainer.global_batch_size"),
        (4, 0, 1, "trainer.micro_batch_size"),
    ],
)
def test_bad_batch_sizes_name_their_key(two_files, gbs, mbs, dp, key):
    ds = TokenDataset(list(two_files), 8, "uint16", VOCAB, seed=0)
    with raises_naming(key) as e:
        GlobalBatchLoader(ds, gbs, mbs, dp_rank=0, dp_size=dp)
    one_line(e)


def test_build_loader_requires_paths():
    trainer = {"global_batch_size": 1, "micro_batch_size": 1}
    with raises_naming("data.paths"):
        build_loader({"seq_len": 8, "dtype": "uint16", "seed": 0}, trainer, VOCAB, 0, 1)
