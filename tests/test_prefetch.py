"""The background batch reader (megolmo.data.prefetch): order, bounds, errors, shutdown, wait times."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from megolmo.data.dataset import TokenDataset
from megolmo.data.loader import GlobalBatchLoader, StepBatch
from megolmo.data.prefetch import Prefetcher
from megolmo.errors import MegolmoConfigError
from tests.test_data import write

GUARD_S = 10.0  # generous: a guard against hanging, not a timing claim


@pytest.fixture
def loader(tmp_path) -> GlobalBatchLoader:
    path = write(tmp_path / "t.npy", np.arange(30 * 8) % 1000)
    return GlobalBatchLoader(TokenDataset([path], 8, "uint16", 1000, seed=0), global_batch_size=4, micro_batch_size=2)


def tiny_batch(step: int) -> StepBatch:
    ids = torch.full((1, 4), step, dtype=torch.long)
    return StepBatch(step, [{"input_ids": ids, "label_mask": torch.ones(1, 4, dtype=torch.bool)}], 3, 0)


class Recorder:
    """A ``read`` that notes which steps were read, on which thread."""

    def __init__(self, read=tiny_batch, sleep_s: float = 0.0):
        self.inner = read
        self.sleep_s = sleep_s
        self.steps: list[int] = []
        self.threads: set[threading.Thread] = set()
        self.lock = threading.Lock()

    def __call__(self, step: int) -> StepBatch:
        with self.lock:
            self.steps.append(step)
            self.threads.add(threading.current_thread())
        if self.sleep_s:
            time.sleep(self.sleep_s)
        return self.inner(step)

    def wait_for(self, count: int) -> None:
        deadline = time.monotonic() + GUARD_S
        while len(self.steps) < count:
            assert time.monotonic() < deadline, f"only {self.steps} read"
            time.sleep(0.01)


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "megolmo-prefetch"]


def assert_same(got: StepBatch, want: StepBatch) -> None:
    assert got.step == want.step
    assert (got.loss_tokens, got.masked_instances) == (want.loss_tokens, want.masked_instances)
    assert len(got.micro_batches) == len(want.micro_batches)
    for a, b in zip(got.micro_batches, want.micro_batches):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_batches_in_order_equal_to_a_direct_read(loader, depth):
    read = Recorder(loader.read_step)
    steps = [5, 6, 7, 8, 9, 10]  # a resumed run starts past 0
    prefetcher = Prefetcher(read, steps, depth=depth, pin_memory=False)
    try:
        for step in steps:
            batch, waited = prefetcher.get(step)
            assert waited >= 0
            assert_same(batch, loader.read_step(step))
    finally:
        prefetcher.close()
    assert read.steps == steps
    if depth == 0:
        assert read.threads == {threading.current_thread()}
    else:
        assert len(read.threads) == 1 and threading.current_thread() not in read.threads


def test_asking_for_another_step_than_the_next_is_an_error():
    prefetcher = Prefetcher(tiny_batch, [0, 1, 2], depth=2, pin_memory=False)
    try:
        with pytest.raises(RuntimeError, match="prefetched step 0.*step 1"):
            prefetcher.get(1)
    finally:
        prefetcher.close()


def test_reads_stay_at_most_depth_ahead():
    depth = 2
    read = Recorder()
    prefetcher = Prefetcher(read, range(50), depth=depth, pin_memory=False)
    try:
        read.wait_for(depth + 1)  # depth queued and one read, waiting for room
        time.sleep(0.3)
        assert read.steps == [0, 1, 2]
        for taken in range(4):
            prefetcher.get(taken)
            read.wait_for(taken + depth + 2)
            time.sleep(0.3)  # room for more reads, were the queue not bounded
            assert read.steps == list(range(taken + depth + 2))  # at most step taken + depth + 1
    finally:
        prefetcher.close()


@pytest.mark.parametrize("depth", [0, 2])
@pytest.mark.parametrize("error_type", [ValueError, MegolmoConfigError])
def test_an_error_in_read_reaches_the_step_that_needs_it(depth, error_type):
    error = error_type("token file x.npy: something is wrong at step 3")

    def read(step: int) -> StepBatch:
        if step == 3:
            raise error
        return tiny_batch(step)

    prefetcher = Prefetcher(read, range(10), depth=depth, pin_memory=False)
    try:
        for step in range(3):
            batch, _ = prefetcher.get(step)
            assert int(batch.micro_batches[0]["input_ids"][0, 0]) == step
        with pytest.raises(error_type) as raised:
            prefetcher.get(3)
        assert raised.value is error
        assert str(raised.value) == "token file x.npy: something is wrong at step 3"
    finally:
        prefetcher.close()
    assert not prefetch_threads()


def test_close_while_the_producer_waits_on_a_full_queue():
    before = set(prefetch_threads())
    read = Recorder()
    prefetcher = Prefetcher(read, range(1000), depth=1, pin_memory=False)
    (thread,) = set(prefetch_threads()) - before
    read.wait_for(2)  # one queued, one held: the producer is blocked on put
    time.sleep(0.1)
    assert thread.is_alive() and len(read.steps) == 2
    closer = threading.Thread(target=prefetcher.close)
    closer.start()
    closer.join(GUARD_S)
    assert not closer.is_alive(), "close() hung"
    assert not thread.is_alive()
    assert len(read.steps) == 2


def test_close_without_a_thread_and_twice():
    prefetcher = Prefetcher(tiny_batch, range(3), depth=0, pin_memory=False)
    prefetcher.get(0)
    prefetcher.close()
    threaded = Prefetcher(tiny_batch, range(3), depth=2, pin_memory=False)
    threaded.get(0)
    threaded.close()
    threaded.close()


def test_waited_reflects_the_read():
    slow = Recorder(sleep_s=0.2)
    direct = Prefetcher(slow, range(3), depth=0, pin_memory=False)
    for step in range(3):
        _, waited = direct.get(step)
        assert waited >= 0.15
    direct.close()

    ahead = Prefetcher(Recorder(sleep_s=0.2), range(4), depth=2, pin_memory=False)
    try:
        waits = []
        for step in range(4):
            _, waited = ahead.get(step)
            waits.append(waited)
            time.sleep(0.45)  # the "training step", longer than a read
        assert waits[0] >= 0.1  # nothing was ready yet
        assert max(waits[1:]) < 0.1, waits  # read while the consumer computed
    finally:
        ahead.close()
