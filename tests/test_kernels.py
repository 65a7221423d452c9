"""The kernel selection point: what runs on this machine, clear refusals, and the GPU checks that a
session with a lent GPU runs (skipped here with the reason)."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from megolmo.config import load_config
from megolmo.errors import MegolmoConfigError
from megolmo.kernels import available
from megolmo.kernels.apply import apply_kernels
from megolmo.kernels.available import Availability
from megolmo.kernels.select import Fp8Settings, check_fp8_shapes, choose_kernels, decide_kernels
from megolmo.model.config import ModelConfig
from megolmo.model.init import initialize_parameters
from megolmo.model.olmo2 import Olmo2ForCausalLM
from megolmo.trainer import Trainer
from tests.conftest import write_tokens
from tests.helpers import run_entry_point
from tests.test_trainer import tiny_overrides

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
needs_fp8_gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                                   reason="needs a GPU with FP8 tensor cores (compute capability >= 8.9)")
needs_te = pytest.mark.skipif(available.transformer_engine_unavailable() is not None,
                              reason=f"needs Transformer Engine: {available.transformer_engine_unavailable()}")
needs_flash_attn = pytest.mark.skipif(available.flash_attn_unavailable() is not None,
                                      reason=f"needs flash-attn: {available.flash_attn_unavailable()}")
needs_apex = pytest.mark.skipif(available.nvidia_apex_unavailable() is not None,
                                reason=f"needs NVIDIA apex: {available.nvidia_apex_unavailable()}")


def test_cpu_resolves_to_plain_torch_and_reports_why_accelerators_are_off():
    choice = choose_kernels("auto", "bf16", CPU)
    assert (choice.backend, choice.attention, choice.norm, choice.optimizer) == ("torch", "sdpa", "torch", "reference")
    assert set(choice.accelerators.values()) == {"this process runs on cpu"}
    assert set(choice.accelerators) == {"transformer_engine", "nvidia_apex", "flash_attn", "torchao_float8",
                                        "fp8_tensor_cores"}
    if not torch.cuda.is_available():
        assert available.nvidia_apex_unavailable() == "no CUDA device is visible"
    assert choose_kernels("torch", "fp32", CPU) == choose_kernels("auto", "fp32", CPU)


# The GPU decision table, from given availabilities (what ``Availability.probe`` reads on a GPU).
ALL = Availability(None, None, None, None, None)
BARE_H100 = Availability("transformer_engine.pytorch cannot be imported", "apex.normalization cannot be imported",
                         "flash_attn cannot be imported", None, None)
A100 = replace(BARE_H100, fp8_tensor_cores="NVIDIA A100 (compute capability 8.0) has no FP8 tensor cores")


@pytest.mark.parametrize("backend, precision, recipe, can, expected", [
    ("auto", "bf16", "delayed", ALL, ("te", "te-dot-product-attention", "te", None, "apex-fused-adam")),
    ("auto", "fp8", "delayed", ALL, ("te", "te-dot-product-attention", "te", "te-delayed", "apex-fused-adam")),
    ("te", "fp8", "current", ALL, ("te", "te-dot-product-attention", "te", "te-current", "apex-fused-adam")),
    ("torch", "bf16", "delayed", ALL, ("torch", "flash-attn", "apex", None, "apex-fused-adam")),
    ("torch", "fp32", "delayed", ALL, ("torch", "flash-sdpa", "apex", None, "apex-fused-adam")),
    ("torch", "fp8", "current", ALL, ("torch", "flash-attn", "apex", "torchao-tensorwise", "apex-fused-adam")),
    ("auto", "bf16", "delayed", BARE_H100, ("torch", "flash-sdpa", "torch", None, "torch-fused-adamw")),
    ("auto", "fp8", "current", BARE_H100, ("torch", "flash-sdpa", "torch", "torchao-tensorwise",
                                            "torch-fused-adamw")),
])
def test_gpu_decision_table(backend, precision, recipe, can, expected):
    choice = decide_kernels(backend, precision, "cuda", Fp8Settings(recipe), can)
    assert (choice.backend, choice.attention, choice.norm, choice.fp8, choice.optimizer) == expected


def test_compiled_blocks_keep_our_norm_for_the_compiler_to_fuse():
    choice = decide_kernels("torch", "bf16", "cuda", Fp8Settings(), ALL, compiled=True)
    assert (choice.attention, choice.norm, choice.optimizer) == ("flash-attn", "torch", "apex-fused-adam")


@pytest.mark.parametrize("backend, precision, recipe, can, message", [
    ("te", "bf16", "delayed", BARE_H100, "model.backend=te: Transformer Engine cannot be used: "
                                         "transformer_engine.pytorch cannot be imported; use model.backend=torch"),
    ("auto", "fp8", "delayed", BARE_H100, "fp8.recipe=delayed needs Transformer Engine; without it FP8 runs "
                                          "through torchao float8, which scales dynamically: set fp8.recipe=current"),
    ("auto", "fp8", "current", A100, "precision=fp8: NVIDIA A100 (compute capability 8.0) has no FP8 tensor cores: "
                                     "use precision=bf16"),
    ("auto", "fp8", "current", replace(BARE_H100, torchao_float8="torchao.float8 cannot be imported"),
     "precision=fp8 needs Transformer Engine or torchao: transformer_engine.pytorch cannot be imported; "
     "torchao.float8 cannot be imported"),
    ("torch", "fp8", "current", replace(ALL, torchao_float8="torchao.float8 cannot be imported"),
     "precision=fp8 needs Transformer Engine or torchao: Transformer Engine is not chosen (model.backend=torch); "
     "torchao.float8 cannot be imported"),
])
def test_gpu_refusals_name_the_reason(backend, precision, recipe, can, message):
    with pytest.raises(MegolmoConfigError) as raised:
        decide_kernels(backend, precision, "cuda", Fp8Settings(recipe), can)
    assert str(raised.value) == message


@pytest.mark.parametrize("backend, precision, message", [
    ("te", "bf16", "model.backend=te: Transformer Engine cannot be used: this process runs on cpu"),
    ("auto", "fp8", "precision=fp8 needs a CUDA GPU with FP8 tensor cores; this process runs on cpu: "
                    "use precision=bf16"),
    ("torch", "fp8", "precision=fp8 needs a CUDA GPU"),
    ("cudnn", "bf16", "model.backend=cudnn: choose one of auto, te, torch"),
    ("auto", "fp16", "precision=fp16: choose one of fp32, bf16, fp8"),
])
def test_impossible_requests_are_refused_at_start_up(backend, precision, message):
    with pytest.raises(MegolmoConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        choose_kernels(backend, precision, CPU)


def test_fp8_settings_are_checked_and_name_the_bf16_blocks():
    assert Fp8Settings.from_mapping(None) == Fp8Settings("delayed", False)
    assert Fp8Settings.from_mapping({"recipe": "current", "bf16_first_last": True}).bf16_layers(16) == {0, 15}
    assert Fp8Settings().bf16_layers(16) == frozenset()
    with pytest.raises(MegolmoConfigError, match="fp8.recipe=mx: choose one of delayed, current"):
        Fp8Settings.from_mapping({"recipe": "mx"})
    with pytest.raises(MegolmoConfigError, match="fp8.margin: unknown key"):
        Fp8Settings.from_mapping({"margin": 0})


def test_fp8_gemm_shapes_are_checked_before_anything_is_built():
    cfg = ModelConfig.named("olmo2_1b")
    check_fp8_shapes(cfg, 8, 4 * 4096)
    with pytest.raises(MegolmoConfigError, match=r"trainer.micro_batch_size x data.seq_len = 4100 is not a multiple"):
        check_fp8_shapes(cfg, 1, 4100)
    with pytest.raises(MegolmoConfigError, match=r"model.intermediate_size / parallel.tensor = 8200 is not"):
        check_fp8_shapes(ModelConfig(intermediate_size=8200), 1, 4096)
    tiny_heads = ModelConfig(hidden_size=256, num_attention_heads=8, num_key_value_heads=2)  # kv width 64
    with pytest.raises(MegolmoConfigError, match=r"head_dim / parallel.tensor = 8 is not"):
        check_fp8_shapes(tiny_heads, 8, 4096)


@pytest.mark.parametrize("override, message", [
    ("precision=fp8", "precision=fp8 needs a CUDA GPU with FP8 tensor cores; this process runs on cpu"),
    ("fp8.recipe=mx", "fp8.recipe=mx: choose one of delayed, current"),
])
def test_fp8_requests_fail_in_one_line_before_training(tmp_path, override, message):
    tokens = write_tokens(tmp_path / "t.npy", 20_000, 300)
    run = run_entry_point(tiny_overrides(tmp_path, tokens, override), env={"CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 2
    assert message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_plain_torch_choice_leaves_the_model_as_built():
    """The fallback is the reference path itself: nothing is swapped, the loss is unchanged."""
    cfg = ModelConfig.named("tiny")
    model = Olmo2ForCausalLM(cfg)
    initialize_parameters(model, 3, 0.02)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    before = model.full_logits(ids)
    assert apply_kernels(model, choose_kernels("auto", "bf16", CPU), Fp8Settings()) == []
    assert torch.equal(model.full_logits(ids), before)


def test_summary_reports_the_kernels_used(tmp_path):
    tokens = write_tokens(tmp_path / "t.npy", 20_000, 300)
    trainer = Trainer(load_config(tiny_overrides(tmp_path, tokens, "trainer.max_steps=1", "optim.warmup_steps=0")))
    trainer.fit()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["kernels"] == json.loads(json.dumps(trainer.kernels.to_dict()))
    if trainer.ps.device.type == "cpu":
        assert summary["kernels"]["backend"] == "torch" and summary["kernels"]["attention"] == "sdpa"
        assert summary["kernels"]["norm"] == "torch" and summary["kernels"]["optimizer"] == "reference"
    assert summary["kernels"]["fp8"] is None


@needs_cuda
def test_gpu_bf16_loss_matches_cpu_fp32(tmp_path):
    """On the GPU (NCCL-free single rank, bf16, flash SDPA) the tiny model's losses track CPU fp32."""
    tokens = write_tokens(tmp_path / "t.npy", 60_000, 300)
    gpu = Trainer(load_config(tiny_overrides(tmp_path / "gpu", tokens, "precision=bf16", "optim.lr=1e-3")))
    assert gpu.ps.device.type == "cuda" and gpu.kernels.attention in ("flash-sdpa", "flash-attn",
                                                                      "te-dot-product-attention")
    gpu_records = gpu.fit()
    cpu = run_entry_point(tiny_overrides(tmp_path / "cpu", tokens, "optim.lr=1e-3"), env={"CUDA_VISIBLE_DEVICES": ""})
    assert cpu.returncode == 0, cpu.stderr[-2000:]
    cpu_losses = [json.loads(line)["loss"] for line in (tmp_path / "cpu" / "run" / "metrics.jsonl").open()]
    assert len(cpu_losses) == len(gpu_records)
    for a, b in zip(cpu_losses, gpu_records):
        assert b.loss == pytest.approx(a, rel=0.02)


def _finite_and_falling(records) -> None:
    losses = [r.loss for r in records]
    assert all(math.isfinite(x) for x in losses) and all(math.isfinite(r.grad_norm) for r in records)
    assert losses[-1] < 0.8 * losses[0], losses[::10]


@needs_fp8_gpu
@pytest.mark.parametrize("backend, recipe", [("auto", "delayed"), ("auto", "current"), ("torch", "current")])
def test_gpu_fp8_trains_fifty_steps_without_nan(tmp_path, backend, recipe):
    """FP8 on the tiny model (dims multiples of 16): TE's recipes when TE is installed, torchao's float8
    on the torch back-end, with the first and last blocks in BF16."""
    if backend == "auto" and recipe == "delayed" and available.transformer_engine_unavailable():
        pytest.skip(f"delayed scaling needs Transformer Engine: {available.transformer_engine_unavailable()}")
    tokens = write_tokens(tmp_path / "t.npy", 60_000, 300)
    trainer = Trainer(load_config(tiny_overrides(
        tmp_path, tokens, "precision=fp8", f"model.backend={backend}", f"fp8.recipe={recipe}",
        "fp8.bf16_first_last=true", "trainer.max_steps=50", "optim.lr=1e-3")))
    assert trainer.kernels.fp8 in ("te-delayed", "te-current", "torchao-tensorwise")
    _finite_and_falling(trainer.fit())


@needs_te
def test_gpu_transformer_engine_matches_torch_and_their_checkpoints_interchange(tmp_path):
    tokens = write_tokens(tmp_path / "t.npy", 60_000, 300)

    def run(name: str, backend: str, *extra: str):
        trainer = Trainer(load_config(tiny_overrides(tmp_path / name, tokens, "precision=bf16", "optim.lr=1e-3",
                                                        f"model.backend={backend}", "trainer.max_steps=10",
                                                        "trainer.save_interval=5", "trainer.keep_steps=[5]", *extra)))
        return trainer, trainer.fit()

    te_trainer, te_records = run("te", "te")
    assert te_trainer.kernels.backend == "te"
    names = [n for chunk in te_trainer.chunks for n, _ in chunk.named_parameters()]
    torch_trainer, torch_records = run("torch", "torch")
    assert names == [n for chunk in torch_trainer.chunks for n, _ in chunk.named_parameters()]
    for a, b in zip(te_records, torch_records):
        assert a.loss == pytest.approx(b.loss, rel=0.02)
    step5 = next((tmp_path / "te" / "run" / "checkpoints").glob("stage1-step5-*"))
    _, resumed = run("resumed", "torch", f"load_path={step5}")
    assert [r.step for r in resumed] == list(range(6, 11))
    for a, b in zip(te_records[5:], resumed):
        assert a.loss == pytest.approx(b.loss, rel=0.02)


def _swap_changes_logits_by_bf16_noise_only(check_choice) -> None:
    """The tiny GQA model (8 heads over 4 kv heads) in bf16 on the GPU, before and after the torch
    back-end's swaps: the logits move by rounding only."""
    cfg = ModelConfig.named("tiny")
    device = torch.device("cuda")
    model = Olmo2ForCausalLM(cfg, device=device)
    initialize_parameters(model, 3, 0.02)
    for p in model.parameters():
        p.data = p.data.bfloat16()
    ids = torch.randint(0, cfg.vocab_size, (2, 128), device=device)
    before = model.full_logits(ids).float()
    choice = choose_kernels("torch", "bf16", device)
    check_choice(choice)
    assert apply_kernels(model, choice, Fp8Settings())
    assert (model.full_logits(ids).float() - before).abs().max() < 0.05 * before.abs().max()


@needs_flash_attn
def test_gpu_flash_attn_core_matches_sdpa():
    def check(choice):
        assert choice.attention == "flash-attn"
    _swap_changes_logits_by_bf16_noise_only(check)


@needs_apex
def test_gpu_apex_fused_rms_norm_matches_ours():
    def check(choice):
        assert choice.norm == "apex"
    _swap_changes_logits_by_bf16_noise_only(check)


def test_fused_adamw_update_equals_the_reference_maths():
    """torch's fused AdamW kernel (the GPU default without apex; apex's kernel takes the same lists) over the
    decayed and the not-decayed ranges of every shard: same weights as the element-wise reference."""
    from megolmo.kernels.fused_adam import torch_fused_adamw
    from megolmo.optim.adamw import AdamWSettings, DistributedAdamW
    from megolmo.optim.buffers import FlatBuffers

    cfg = ModelConfig.named("tiny")
    runs = []
    for update in (None, torch_fused_adamw):
        model = Olmo2ForCausalLM(cfg)
        initialize_parameters(model, 3, 0.02)
        buffers = FlatBuffers(list(model.named_parameters()), 1, 100_000)  # several buckets
        initial = buffers.params.clone()
        optimizer = DistributedAdamW(buffers, AdamWSettings(1e-2, (0.9, 0.95), 1e-8, 0.1, 1.0), None, False, 0, [],
                                     update)
        for step in range(5):
            buffers.grads.copy_(torch.randn(buffers.grads.shape, generator=torch.Generator().manual_seed(step)))
            optimizer.step(1e-2 * (step + 1))
        assert len(buffers.buckets) > 2
        moved = {name: not torch.equal(buffers.params[slot.start:slot.end], initial[slot.start:slot.end])
                 for slot in buffers.slots for name in [slot.name]}
        assert all(moved.values()), [n for n, m in moved.items() if not m]  # decayed and not-decayed alike
        runs.append(buffers.params.clone())
    reference, fused = runs
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-7)


def test_module_swaps_carry_names_values_and_sharding_attributes():
    """The mechanism the TE, apex and flash-attn back-ends use, exercised with torch's own RMSNorm:
    every local norm replaced, the QK-norm's TP statistic irrelevant at TP=1, outputs unchanged."""
    from megolmo.kernels.swap import carry_parameter, swap_modules
    from megolmo.model.norm import RMSNorm

    cfg = ModelConfig.named("tiny")
    model = Olmo2ForCausalLM(cfg)
    initialize_parameters(model, 3, 0.02)
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight"):
            p.sequence_parallel = True  # as under SP: the flag must survive the swap
    before = {n: (p.detach().clone(), p.shard_spec) for n, p in model.named_parameters()}
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = model.full_logits(ids)

    def torch_rms_norm(old: RMSNorm) -> torch.nn.Module:
        new = torch.nn.RMSNorm(old.weight.shape[0], eps=old.eps)
        carry_parameter(old.weight, new.weight)
        return new

    swapped = swap_modules(model, lambda _, m: isinstance(m, RMSNorm), torch_rms_norm)
    assert len(swapped) == 4 * cfg.num_hidden_layers + 1
    after = dict(model.named_parameters())
    assert list(after) == list(before)
    for name, (value, spec) in before.items():
        assert torch.equal(after[name], value) and after[name].shard_spec == spec
        assert getattr(after[name], "sequence_parallel", False) == name.endswith("layernorm.weight")
    torch.testing.assert_close(model.full_logits(ids), logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"replacement parameter has shape \(3,\), expected \(128,\)"):
        carry_parameter(model.model.norm.weight, torch.nn.Parameter(torch.ones(3)))
