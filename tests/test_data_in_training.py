"""The data path inside real runs: a resume that would read other data is refused, a new stage is not
checked, a data error on one rank stops every rank with its one line, a wrong dtype stops before step 1,
and the loop records how long it waited for data."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from megolmo.config import load_config
from megolmo.data.dataset import TokenDataset
from megolmo.errors import MegolmoConfigError
from megolmo.trainer import Trainer
from tests.conftest import write_tokens
from tests.helpers import run_entry_point, torchrun_root_cause

MODEL = ["model.vocab_size=300", "model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2",
         "model.num_attention_heads=4", "model.num_key_value_heads=2"]


def overrides(run, *extra: str) -> list[str]:
    return [*MODEL, "data.dtype=uint16", "data.seq_len=32", "trainer.global_batch_size=4",
            "trainer.micro_batch_size=2", "trainer.max_steps=4", "trainer.save_interval=2", f"trainer.run_dir={run}",
            *extra]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A run stopped at step 2, reading ``tokens.npy`` relative to ``data.root``; plus a copy of the corpus
    on another root and a second file."""
    base = tmp_path_factory.mktemp("resume")
    for root in ("root_a", "root_b"):
        (base / root).mkdir()
    write_tokens(base / "root_a" / "tokens.npy", 8_000, 300)
    shutil.copy(base / "root_a" / "tokens.npy", base / "root_b" / "tokens.npy")
    write_tokens(base / "root_a" / "other.npy", 6_000, 300, seed=1)
    data = [f"data.root={base / 'root_a'}", "data.paths=[tokens.npy]"]
    Trainer(load_config(overrides(base / "run", *data, "trainer.stop_at=2"))).fit()
    return base


@pytest.mark.parametrize("change, named", [
    (["data.seed=1"], "data.seed (0 then, 1 now)"),
    (["trainer.global_batch_size=8", "trainer.micro_batch_size=4"], "trainer.global_batch_size (4 then, 8 now)"),
    (["data.paths=[tokens.npy,other.npy]"], "data.paths (1 files then, 2 now)"),
    (["data.paths=[other.npy]"], "data.paths (the same 1 files by count, but other paths or sizes)"),
    (["data.seq_len=16"], "data.seq_len (32 then, 16 now)"),
], ids=["seed", "global-batch", "more-files", "other-file", "seq-len"])
def test_resuming_with_other_data_is_refused_naming_the_key(corpus, change, named):
    data = [f"data.root={corpus / 'root_a'}", "data.paths=[tokens.npy]"]
    with pytest.raises(MegolmoConfigError) as error:
        Trainer(load_config(overrides(corpus / "run", *data, *change)))
    message = str(error.value)
    assert "\n" not in message and named in message and "different data order" in message
    assert str(corpus / "run") in message and "reset_trainer_state=true" in message


def test_a_corpus_on_another_root_resumes_and_a_new_stage_takes_new_data(corpus, tmp_path):
    shutil.copytree(corpus / "run", tmp_path / "run", symlinks=True)  # the other tests keep the run at step 2
    moved = Trainer(load_config(overrides(tmp_path / "run", f"data.root={corpus / 'root_b'}", "data.paths=[tokens.npy]")))
    assert moved.start_step == 2 and [r.step for r in moved.fit()] == [3, 4]
    checkpoint = sorted((corpus / "run" / "checkpoints").glob("stage1-step2-*"))[0]
    stage2 = Trainer(load_config(overrides(
        tmp_path / "stage2", f"load_path={checkpoint}", "reset_trainer_state=true", "data.seed=7",
        f"data.root={corpus / 'root_a'}", "data.paths=[other.npy]", "trainer.global_batch_size=8",
        "trainer.micro_batch_size=4", "trainer.max_steps=1")))
    records = stage2.fit()
    assert [r.step for r in records] == [1] and np.isfinite(records[0].loss)
    metrics = [json.loads(line) for line in (tmp_path / "stage2" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["data_wait_s"] >= 0 and metrics[0]["masked_instances"] == 0


def test_load_path_is_a_resume_within_its_stage_and_a_new_stage_beyond_it(corpus, tmp_path):
    """Stage 2 keeps stage 1's optimizer and step (``load_path`` without a reset) on new data; the same
    ``load_path`` within stage 1 continues that run, so its data must not change."""
    checkpoint = sorted((corpus / "run" / "checkpoints").glob("stage1-step2-*"))[0]
    new_data = [f"load_path={checkpoint}", f"data.root={corpus / 'root_a'}", "data.paths=[other.npy]", "data.seed=3",
                "trainer.max_steps=3"]
    with pytest.raises(MegolmoConfigError, match=r"different data order: data\.paths .*; data\.seed \(0 then, 3 now\)"):
        Trainer(load_config(overrides(tmp_path / "same-stage", *new_data)))
    stage2 = Trainer(load_config(overrides(tmp_path / "stage2", *new_data, "trainer.stage=2", "trainer.ingredient=1")))
    assert stage2.start_step == 2 and [r.step for r in stage2.fit()] == [3]


def test_a_bad_token_read_by_one_rank_stops_every_rank_with_its_line(tmp_path):
    """Data-parallel rank 1 alone reads the bad instance, in step 4, on the prefetch thread; rank 0, which
    prints config errors, stops with the same line, after three whole steps."""
    path = write_tokens(tmp_path / "tokens.npy", 20_000, 300)
    dataset = TokenDataset([path], 32, "uint16", vocab_size=300, seed=0)
    index = next(i for i in (14, 15) if dataset.locate(i)[1] != 0)  # rows 14, 15: step 3's second half
    tokens = np.memmap(path, dtype=np.uint16, mode="r+")
    tokens[dataset.locate(index)[1] * 32 + 5] = 999
    tokens.flush()
    result = run_entry_point(overrides(tmp_path / "run", f"data.paths=[{path}]", "trainer.save_interval=100",
                                       "parallel.timeout_s=60"), nproc=2, timeout=240)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("megolmo: error:")]
    assert len(errors) == 1 and "token id 999" in errors[0] and "model.vocab_size=300" in errors[0], result.stderr
    assert torchrun_root_cause(result.stderr) == errors[0]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3


def test_a_uint32_file_read_as_uint16_stops_before_step_1(tmp_path):
    path = write_tokens(tmp_path / "tokens.npy", 4_000, 300, dtype=np.uint32)
    with pytest.raises(MegolmoConfigError) as error:
        Trainer(load_config(overrides(tmp_path / "run", f"data.paths=[{path}]")))
    assert str(error.value) == (f"token file {path}: every other uint16 id of its first 4096 is 0, as when a uint32 "
                                "file is read with data.dtype=uint16; set data.dtype=uint32")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
