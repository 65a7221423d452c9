"""Module state beside the parameters (TE's FP8 scaling) in checkpoints: exact resume, interchange with
modules that keep none, and a checkpoint saved by two pipeline stages loaded by name into one process.
``tests/delayed_scaling.py`` supplies the stateful module (TE cannot be imported without CUDA)."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from megolmo.checkpoint.manager import CheckpointManager
from megolmo.checkpoint.module_state import load_module_states
from megolmo.model.config import ModelConfig
from megolmo.model.init import initialize_parameters
from megolmo.model.olmo2 import Olmo2ForCausalLM
from megolmo.optim.adamw import AdamWSettings
from megolmo.parallel.state import ParallelState
from megolmo.step import StepSettings, TrainStep, build_train_step
from tests.delayed_scaling import DelayedScalingLinear, use_delayed_scaling
from tests.helpers import ROOT, free_port

CFG = ModelConfig(name="ms", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, eos_token_id=0, pad_token_id=None)
SEQ, BATCH, LR = 32, 2, 2e-3
STATE = {"step": 3, "tokens": 0, "optimizer_steps": 3}


def half_model(stage: int) -> Olmo2ForCausalLM:
    """Blocks 2*stage and 2*stage+1 of a two-stage pipeline, with delayed scaling."""
    model = Olmo2ForCausalLM(CFG, layer_ids=range(2 * stage, 2 * stage + 2), with_embedding=stage == 0,
                             with_head=stage == 1)
    initialize_parameters(model, 5, 0.02)
    use_delayed_scaling(model)
    return model


def full_model(seed: int = 5, delayed_scaling: bool = True) -> Olmo2ForCausalLM:
    model = Olmo2ForCausalLM(CFG)
    initialize_parameters(model, seed, 0.02)
    if delayed_scaling:
        use_delayed_scaling(model)
    return model


def train_step(model: Olmo2ForCausalLM, ps: ParallelState | None = None) -> TrainStep:
    """The trainer's step around ``model`` (one process unless ``ps`` says otherwise; 1F1B needs a
    micro-batch per pipeline stage)."""
    ps = ps or ParallelState()
    settings = StepSettings(AdamWSettings(LR, (0.9, 0.95), 1e-8, 0.1, 1.0), num_micro_batches=ps.pp,
                            micro_batch_size=BATCH, seq_len=SEQ, z_loss=1e-4, bucket_size=1_000_000)
    return build_train_step(ps, settings, chunks=[model])


def train(step: TrainStep, steps: range) -> list[float]:
    losses = []
    for index in steps:
        g = torch.Generator().manual_seed(index)
        data = {"input_ids": torch.randint(0, CFG.vocab_size, (BATCH, SEQ), generator=g),
                "label_mask": torch.ones(BATCH, SEQ, dtype=torch.bool)}
        tokens = BATCH * (SEQ - 1)
        losses.append(step.run([data], tokens, LR).ce_sum / tokens)
    return losses


def histories(model: Olmo2ForCausalLM) -> dict[str, torch.Tensor]:
    return {name: m.amax_history for name, m in model.named_modules() if isinstance(m, DelayedScalingLinear)}


def saved_run(tmp_path) -> tuple[CheckpointManager, list[float]]:
    """Three steps, a checkpoint, three more: returns the manager and the last three losses."""
    model = full_model()
    step = train_step(model)
    train(step, range(3))
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save(step.optimizer, "step3", STATE, CFG.to_dict(), [model])
    return manager, train(step, range(3, 6))


def test_resume_with_module_state_is_bit_identical_and_without_it_is_not(tmp_path):
    manager, straight = saved_run(tmp_path)
    assert (manager.latest() / "module_state" / "rank0.pt").exists()

    resumed = full_model(seed=99)  # other weights and empty histories until loaded
    step = train_step(resumed)
    CheckpointManager.load(manager.latest(), step.optimizer, weights_only=False, chunks=[resumed])
    assert all(h.count_nonzero() == 3 for h in histories(resumed).values())  # three steps' amaxes each
    # TE refuses to unpickle delayed-scaling state without this opt-in; it is set only while loading.
    assert {m.pickle_opt_in_at_load for m in resumed.modules() if isinstance(m, DelayedScalingLinear)} == {"1"}
    assert "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE" not in os.environ
    assert train(step, range(3, 6)) == straight

    forgetful = full_model(seed=99)
    step = train_step(forgetful)
    CheckpointManager.load(manager.latest(), step.optimizer, weights_only=False)  # weights and moments only
    assert train(step, range(3, 6)) != straight


def test_module_state_moves_between_modules_that_keep_it_and_modules_that_do_not(tmp_path):
    manager, _ = saved_run(tmp_path)
    plain = full_model(seed=99, delayed_scaling=False)  # the torch back-end reading a TE checkpoint
    optimizer = train_step(plain).optimizer
    CheckpointManager.load(manager.latest(), optimizer, weights_only=False, chunks=[plain])
    assert load_module_states(manager.latest(), [plain]) == []

    saved_plain = CheckpointManager(tmp_path / "plain", keep_last=1).save(
        optimizer, "step3", STATE, CFG.to_dict(), [plain]).path
    assert not (saved_plain / "module_state").exists()
    stateful = full_model(seed=99)  # a TE run starting from a torch checkpoint: fresh histories
    CheckpointManager.load(saved_plain, train_step(stateful).optimizer, weights_only=True, chunks=[stateful])
    assert all(h.count_nonzero() == 0 for h in histories(stateful).values())
    assert torch.equal(stateful.model.layers["2"].mlp.up_proj.weight, plain.model.layers["2"].mlp.up_proj.weight)


def test_two_pipeline_stages_save_and_one_process_loads_every_state_by_name(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "tests.workers.module_state", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    saved = {**torch.load(tmp_path / "histories0.pt"), **torch.load(tmp_path / "histories1.pt")}
    assert len(saved) == 7 * CFG.num_hidden_layers

    model = full_model(seed=99)
    CheckpointManager.load(tmp_path / "checkpoints" / "step3", train_step(model).optimizer, weights_only=False, chunks=[model])
    loaded = histories(model)
    assert loaded.keys() == saved.keys()
    for name, history in saved.items():
        assert history.count_nonzero() == 3 and torch.equal(loaded[name], history), name


def test_trainer_saves_and_restores_module_state_for_an_exact_resume(tmp_path, monkeypatch):
    """The trainer's own save and resume, its chunks holding delayed-scaling linears (as TE's back-end
    would give them): a run stopped at step 3 and resumed equals the straight run bit for bit."""
    import megolmo.step.chunks
    from megolmo.trainer import Trainer
    from tests.conftest import write_tokens
    from megolmo.config import load_config

    prepare = megolmo.step.chunks.prepare_model

    def prepare_with_delayed_scaling(chunk, *args):
        chunk = prepare(chunk, *args)
        use_delayed_scaling(chunk)
        return chunk

    monkeypatch.setattr(megolmo.step.chunks, "prepare_model", prepare_with_delayed_scaling)
    tokens = write_tokens(tmp_path / "tokens.npy", 20_000, 300)

    def run(name: str, *extra: str) -> list[float]:
        cfg = load_config([f"data.paths=[{tokens}]", "data.dtype=uint16", "data.seq_len=32", "model.vocab_size=300",
                              "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "trainer.max_steps=6",
                              "optim.lr=2e-3", "optim.warmup_steps=2", f"trainer.run_dir={tmp_path / name}",
                              "trainer.log_interval=100", *extra])
        trainer = Trainer(cfg)
        assert any(isinstance(m, DelayedScalingLinear) for m in trainer.model.modules())
        return [record.loss for record in trainer.fit()]

    straight = run("straight")
    first = run("split", "trainer.stop_at=3")
    assert (tmp_path / "split" / "checkpoints" / "latest" / "module_state" / "rank0.pt").exists()
    assert first + run("split") == straight
