"""The OLMo 2 recipe configs (``+recipe=...``): they compose, ask for what only the user knows, hold the
published values, fit their stated layout on 8-GPU H100 nodes, and name real evaluation tasks."""
from __future__ import annotations

import math

import olmo_eval
import pytest

from megolmo.config import load_config
from megolmo.config.load import CONF_DIR, compose_config
from megolmo.errors import MegolmoConfigError
from megolmo.memory_estimate import estimate, parameters_per_rank
from megolmo.model.config import ModelConfig
from megolmo.trainer import Trainer
from tests.conftest import write_tokens

SIZES = {  # size: stage-1 peak LR, warmup steps, global batch, horizon tokens, ranks; SFT LR, batch, ranks
    "1b": (4e-4, 4000, 512, 5e12, 32, 3e-5, 128, 8),
    "7b": (3e-4, 2000, 1024, 5e12, 64, 2e-5, 128, 64),
    "13b": (9e-4, 1000, 2048, 5e12, 128, 5e-6, 64, 64),
    "32b": (6e-4, 2000, 2048, 6.5e12, 256, 4e-6, 256, 64),
}
INGREDIENT_TOKENS = {"1b": 50e9, "7b": 50e9, "13b": 100e9, "32b": 100e9}
H100_GB = 80


def compose(name: str):
    return compose_config([f"+recipe={name}"], CONF_DIR)


def check_layout(cfg, ranks: int) -> None:
    """What the trainer would refuse at start-up, checked for the recipe's cluster."""
    model, p, t = ModelConfig.from_mapping(cfg.model), cfg.parallel, cfg.trainer
    assert p.tensor <= 8 and ranks % (p.tensor * p.pipeline) == 0  # TP inside a node
    dp = ranks // (p.tensor * p.pipeline)
    assert t.global_batch_size % (dp * t.micro_batch_size) == 0
    for dim in (model.num_attention_heads, model.num_key_value_heads, model.intermediate_size, cfg.data.seq_len):
        assert dim % p.tensor == 0
    assert model.num_hidden_layers % p.pipeline == 0
    if p.pipeline > 1:
        assert t.global_batch_size // dp // t.micro_batch_size >= p.pipeline  # 1F1B needs M >= PP
    assert estimate(cfg, ranks).total < H100_GB


@pytest.mark.parametrize("size", SIZES)
def test_stage1_holds_the_published_recipe_and_fits_its_nodes(size):
    lr, warmup, batch, horizon, ranks, *_ = SIZES[size]
    cfg = compose(f"olmo2_{size}_stage1")
    assert cfg.model.name == f"olmo2_{size}" and cfg.precision == "bf16"
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.trainer.global_batch_size) == (lr, warmup, batch)
    assert cfg.optim.schedule == "cosine" and cfg.optim.final_lr_ratio == 0.1
    assert abs(cfg.trainer.max_steps * batch * 4096 - horizon) < batch * 4096
    assert (list(cfg.optim.betas), cfg.optim.eps, cfg.optim.weight_decay) == ([0.9, 0.95], 1e-8, 0.1)
    assert (cfg.optim.clip_grad_norm, cfg.optim.z_loss, cfg.data.seq_len) == (1.0, 1e-5, 4096)
    assert cfg.data.mix == "olmo-mix-1124" and cfg.eval.interval == 1000
    assert cfg.data.instance_filter.enabled == (size != "32b") and cfg.optim.skip_step.enabled == (size == "32b")
    check_layout(cfg, ranks)


@pytest.mark.parametrize("size", SIZES)
def test_stage2_continues_stage1_with_its_moments_and_lr(size):
    cfg = compose(f"olmo2_{size}_stage2")
    stage1 = compose(f"olmo2_{size}_stage1")
    assert cfg.reset_trainer_state and not cfg.reset_optimizer_state and cfg.optim.lr_from_load_path
    assert (cfg.optim.schedule, cfg.optim.warmup_steps, cfg.trainer.stage) == ("linear", 0, 2)
    tokens = cfg.trainer.max_steps * cfg.trainer.global_batch_size * 4096
    assert abs(tokens - INGREDIENT_TOKENS[size]) < cfg.trainer.global_batch_size * 4096
    assert cfg.parallel == stage1.parallel and cfg.trainer.global_batch_size == stage1.trainer.global_batch_size


@pytest.mark.parametrize("size", SIZES)
def test_sft_holds_the_tulu3_recipe_and_fits_its_nodes(size):
    *_, lr, batch, ranks = SIZES[size]
    cfg = compose(f"olmo2_{size}_sft")
    assert (cfg.optim.lr, cfg.trainer.global_batch_size, cfg.optim.schedule) == (lr, batch, "linear")
    assert (cfg.optim.weight_decay, cfg.optim.clip_grad_norm, cfg.data.seq_len) == (0.0, 0.0, 4096)
    assert cfg.reset_trainer_state and cfg.reset_optimizer_state
    check_layout(cfg, ranks)


@pytest.mark.parametrize("name, missing", [
    ("olmo2_7b_stage1", "data.root, eval.tokenizer"),
    ("olmo2_7b_stage2", "data.root, eval.tokenizer, load_path, data.seed, trainer.ingredient"),
    ("olmo2_13b_stage2", "data.root, eval.tokenizer, load_path, data.seed, trainer.ingredient, data.paths"),
    ("olmo2_1b_sft", "load_path, data.paths, data.label_mask_paths, trainer.max_steps, optim.warmup_steps"),
])
def test_what_only_the_user_knows_is_asked_for_by_name(name, missing):
    with pytest.raises(MegolmoConfigError, match=f"^{missing}: the recipe leaves them to you; give "):
        load_config([f"+recipe={name}"])
    values = {"data.paths": "[a.npy]", "data.label_mask_paths": "[m.npy]"}
    load_config([f"+recipe={name}", *(f"{key}={values.get(key, 1)}" for key in missing.split(", "))])  # given


def test_the_evaluations_are_real_olmo_eval_tasks_and_olmo_cores_sets():
    cfg = compose("olmo2_7b_stage1")
    known = set(olmo_eval.list_tasks())
    assert set(cfg.eval.downstream.tasks) <= known and len(cfg.eval.downstream.tasks) == 15
    assert len(cfg.eval.lm.sets) == 11 and "c4_en-validation" in cfg.eval.lm.sets


def test_a_recipe_names_its_mix_files_under_data_root(tmp_path):
    """The recipe reaches the trainer: every one of the mix's files is looked for under data.root."""
    with pytest.raises(MegolmoConfigError, match=r"data.mix=olmo-mix-1124: 1117 of 1117 files missing under "
                                                 rf"data.root={tmp_path}"):
        Trainer(load_config(["+recipe=olmo2_1b_stage1", f"data.root={tmp_path}", f"eval.tokenizer={tmp_path}/t.json",
                             "model=tiny", f"trainer.run_dir={tmp_path / 'run'}"]))


def test_the_estimate_counts_the_trainers_own_buffers(tmp_path):
    """Weights, gradients and optimizer state as the start-up block reports them (one rank, bf16)."""
    tokens = write_tokens(tmp_path / "tokens.npy", 4_000, 300)
    cfg = load_config(["model=tiny", "model.vocab_size=300", f"data.paths=[{tokens}]", "data.dtype=uint16",
                       "data.seq_len=32", "precision=bf16", f"trainer.run_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg)
    got = estimate(cfg, 1)
    buffers = trainer.step_fn.buffers
    assert parameters_per_rank(trainer.model_cfg, 1, 1) == sum(p.numel() for p in trainer.model.parameters())
    assert math.isclose(got.weights * 1e9, buffers.param_bytes, rel_tol=1e-9)
    assert math.isclose(got.grads * 1e9, buffers.grad_bytes, rel_tol=1e-9)
    assert math.isclose(got.optimizer * 1e9, trainer.step_fn.optimizer.state_bytes(), rel_tol=1e-9)


@pytest.mark.parametrize("stage", ["stage1", "stage2", "sft"])
def test_recipes_survive_faults(stage):
    """Long multi-node jobs: saves in the background, and a hang ends in a restart rather than a wait."""
    cfg = compose(f"olmo2_7b_{stage}")
    assert cfg.trainer.async_save and cfg.trainer.step_timeout_s == 1800
