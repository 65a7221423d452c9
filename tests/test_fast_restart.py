"""Restarts that cost seconds: a job that loads a checkpoint draws no initial weights, and a fresh start
draws today's values faster, the same global weights under TP 1, 2 and 4 (issue 14, acceptance 6).

The same TP guarantee end to end, on real gloo ranks through the trainer: tests/test_tensor_parallel.py
``test_initial_weights_do_not_depend_on_tp``."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from megolmo.benchmarks import restart
from megolmo.benchmarks.restart import SimulatedRank, previous_initialize_parameters
from megolmo.config import load_config
from megolmo.model.config import ModelConfig
from megolmo.model.init import initialize_parameters, truncated_normal, zero_padding_rows
from megolmo.model.olmo2 import Olmo2ForCausalLM
from megolmo.trainer import Trainer
from tests.conftest import write_tokens

# Vocabulary 300 pads to 384 rows at TP 1 and 2, to 512 at TP 4: TP rank 3 then holds padding only.
CFG = ModelConfig(name="restart-test", vocab_size=300, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=4, eos_token_id=0, pad_token_id=None)
SEED = 5


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> str:
    return write_tokens(tmp_path_factory.mktemp("restart-data") / "tokens.npy", 20_000, 300)


def overrides(run_dir: Path, tokens: str, *extra: str) -> list[str]:
    return [f"data.paths=[{tokens}]", "data.dtype=uint16", "data.seq_len=32", "model.vocab_size=300",
            "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "trainer.max_steps=4",
            "trainer.save_interval=2", "optim.lr=2e-3", "optim.warmup_steps=1", f"trainer.run_dir={run_dir}",
            "trainer.log_interval=100", *extra]


@pytest.fixture
def draws(monkeypatch) -> list[int]:
    """Counts the generator calls that draw initial weights (``normal_`` is the sampler's only draw)."""
    calls = [0]
    original = torch.Tensor.normal_

    def counting(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "normal_", counting)
    return calls


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in trainer.model.named_parameters()}


def test_a_resumed_job_draws_no_initial_weights_and_continues_bit_for_bit(tmp_path, tokens, draws):
    straight = Trainer(load_config(overrides(tmp_path / "straight", tokens)))
    assert draws[0] > 0  # the counter sees a fresh start's draws
    straight_losses = [record.loss for record in straight.fit()]
    Trainer(load_config(overrides(tmp_path / "run", tokens, "trainer.stop_at=2"))).fit()
    draws[0] = 0
    resumed = Trainer(load_config(overrides(tmp_path / "run", tokens)))
    assert draws[0] == 0 and resumed.start_step == 2
    assert [record.loss for record in resumed.fit()] == straight_losses[2:]
    assert weights(resumed).keys() == weights(straight).keys()
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed).values(), weights(straight).values()))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_weights_only_start_draws_nothing_and_takes_master_weights_from_the_checkpoint(tmp_path, tokens, draws,
                                                                                         precision):
    source = Trainer(load_config(overrides(tmp_path / "source", tokens, "trainer.stop_at=2",
                                           f"precision={precision}")))
    source.fit()
    saved_masters = [master.clone() for master in source.optimizer.master]
    draws[0] = 0
    started = Trainer(load_config(overrides(tmp_path / "run", tokens, f"load_path={tmp_path / 'source'}",
                                            "reset_trainer_state=true", "reset_optimizer_state=true",
                                            f"precision={precision}")))
    assert draws[0] == 0 and started.start_step == 0 and started.optimizer.step_count == 0
    assert all(torch.equal(a, b) for a, b in zip(started.optimizer.master, saved_masters))
    assert all(torch.equal(a, b) for a, b in zip(weights(started).values(), weights(source).values()))
    head = started.chunks[0].lm_head.weight.detach()
    assert head.shape[0] > CFG.vocab_size and not head[CFG.vocab_size:].any()  # padding rows zero, as when fresh
    assert not started.chunks[0].model.embed_tokens.weight.detach()[CFG.vocab_size:].any()


@pytest.mark.parametrize("tp", [1, 4])
def test_weights_left_for_a_checkpoint_have_only_their_padding_rows_set(tp):
    """Checkpoints never hold the vocabulary padding rows, so those are zeroed; nothing else is touched."""
    for model in simulated_ranks(tp):
        with torch.no_grad():
            for param in model.parameters():
                param.fill_(float("nan"))  # uninitialised storage may hold anything
        zero_padding_rows(model)
        for name, param in model.named_parameters():
            spec = param.shard_spec
            valid = param.shape[0] if spec.padded_size is None else \
                max(0, min(param.shape[0], CFG.vocab_size - spec.local_slice().start))
            assert param[:valid].isnan().all() and not param[valid:].any(), f"TP {tp} rank {spec.rank}: {name}"


def simulated_ranks(tp: int) -> list[Olmo2ForCausalLM]:
    return [Olmo2ForCausalLM(CFG, SimulatedRank(world=tp, index=rank)) for rank in range(tp)]


def global_weights(ranks: list[Olmo2ForCausalLM]) -> dict[str, torch.Tensor]:
    """Every parameter's global tensor from the ranks' slices, padding rows dropped."""
    out = {}
    for name, first in ranks[0].named_parameters():
        spec = first.shard_spec
        parts = [dict(model.named_parameters())[name].detach() for model in ranks]
        whole = parts[0] if spec.dim is None else torch.cat(parts, dim=spec.dim)
        out[name] = whole.narrow(0, 0, spec.global_shape[0])
    return out


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_a_fresh_start_keeps_the_previous_initial_values(tp):
    """Bit for bit what every rank drew before restarts stopped drawing (the golden runs depend on them)."""
    for now, before in zip(simulated_ranks(tp), simulated_ranks(tp)):
        initialize_parameters(now, SEED, CFG.initializer_range)
        previous_initialize_parameters(before, SEED, CFG.initializer_range)
        for (name, a), b in zip(now.named_parameters(), before.parameters()):
            assert torch.equal(a, b), f"TP {tp} rank {now.tp.rank}: {name}"


def test_a_fresh_start_under_tp_1_2_and_4_begins_from_the_same_global_weights():
    layouts = {}
    for tp in (1, 2, 4):
        ranks = simulated_ranks(tp)
        for model in ranks:
            initialize_parameters(model, SEED, CFG.initializer_range)
        layouts[tp] = global_weights(ranks)
    for tp in (2, 4):
        assert layouts[tp].keys() == layouts[1].keys()
        for name, value in layouts[1].items():
            assert torch.equal(layouts[tp][name], value), f"TP {tp}: {name}"


@pytest.mark.parametrize("shape", [(5,), (3, 5), (16, 16), (33, 17), (700, 300)])
def test_truncated_normal_is_torchs_trunc_normal_bit_for_bit(shape):
    """torch's rejection sampler's values, and its generator left where torch leaves it."""
    ours, theirs = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    expected = nn.init.trunc_normal_(torch.empty(shape), mean=0.0, std=0.02, a=-0.06, b=0.06, generator=theirs)
    assert torch.equal(truncated_normal(shape, 0.02, ours), expected)
    assert torch.equal(ours.get_state(), theirs.get_state())


def test_the_restart_benchmark_runs_and_checks_the_values(capsys):
    restart.main(["--model", "tiny", "--tensor", "4", "--pipeline", "2", "--stage", "1", "--tp-rank", "3"])
    out = capsys.readouterr().out
    assert "stage 1 of TP4 x PP2 (layers 2-3, the final norm and the head) as TP rank 3" in out
    assert "weights bit-identical to before" in out and "after, resumed" in out
