"""The data index at OLMo 2 scale: about 100B tokens in a few hundred sparse files build and serve a far
step's batch in seconds and little memory (a guard against O(instances) structures, not a benchmark)."""
from __future__ import annotations

from collections import Counter

from megolmo.benchmarks.data_index import measure_corpus
from megolmo.data.permutation import Permutation


def test_permutations_are_bijections_for_awkward_sizes():
    for n in (1, 2, 3, 5, 64, 65, 1000, 4097):
        values = [Permutation(n, [7, n])[i] for i in range(n)]
        assert sorted(values) == list(range(n)), n
    assert [Permutation(1000, [1])[i] for i in range(10)] != [Permutation(1000, [2])[i] for i in range(10)]
    # roughly uniform: where the first 2000 of 10**6 land, in tenths of the range
    spread = Counter(Permutation(10**6, [3])[i] // 100_000 for i in range(2000))
    assert min(spread.values()) > 120, spread


def test_a_100b_token_corpus_starts_in_seconds_and_small_memory(tmp_path):
    figures = measure_corpus(tmp_path / "corpus", total_tokens=100 * 10**9, files=300, step=10**6, global_batch=512)
    assert figures["total_s"] < 10 and figures["memory_mb"] < 200, figures
