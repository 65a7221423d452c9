"""Single-process training-step throughput: megolmo vs transformers' ``Olmo2ForCausalLM`` vs OLMo-core.

Every peer trains the same OLMo 2 architecture on the same batch with the same AdamW settings
(lr 1e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 except on the embeddings, foreach) and
gradient clipping at 1.0. A step is zero-grad + forward + backward + clip + optimizer step.
Starting weights are megolmo's, copied into the peers, so the first-step losses agree and show
that the three models compute the same function.

Each (precision, activation checkpointing) pair is one group (``--precisions fp32,bf16,fp8``,
``--activation-checkpointing off,on``); the peers of a group are built, timed and freed together.
Precision, as each code base is normally run in one process:

* megolmo: the trainer's own path, bf16 parameters + fp32 grad buffer + fp32 master weights
  (``FlatBuffers`` + ``DistributedAdamW``); fp32 is plain fp32; fp8 is bf16 parameters with the
  GEMMs in FP8 (``--fp8-recipe delayed|current``). Kernels are chosen as the trainer does
  (``choose_kernels("auto", ...)`` + ``apply_kernels``): Transformer Engine where installed on a
  GPU, so that is what gets measured. fp8 on a CPU is skipped with the trainer's one-line reason.
  Loss: cross-entropy + 1e-5 z-loss. Checkpointing: ``ModelConfig.activation_checkpointing``.
* transformers: ``model.to(bfloat16)`` and torch AdamW on the bf16 parameters; loss via
  ``labels=`` (transformers has no z-loss). Attention: SDPA. Checkpointing:
  ``gradient_checkpointing_enable`` (non-reentrant). No fp8 (skipped).
* OLMo-core: ``model.to(bfloat16)`` and torch AdamW on the bf16 parameters; loss from its LM
  head (sum reduction divided by the loss-token count, z-loss 1e-5), as its train module does.
  Checkpointing: ``apply_activation_checkpointing(full)``. No fp8 (skipped).

Peers are timed in alternation (one step each, rotating who goes first) so machine drift hits all
of them alike; a peer's time is its median step. FLOP/s (model FLOPs, attention included) are
divided by the rate of one large ``torch.mm`` of the parameter dtype measured in this run (the
"matmul rate"; bf16 for fp8 rows): on CPUs that stands in for a hardware peak. On known GPUs MFU is
also given against the dense BF16 peak (989 TFLOP/s on an H100 SXM), fp8 rows included, as
OLMo-core and Megatron report FP8 runs. On CUDA each row has its memory: ``resident_bytes`` (model,
gradients and optimizer state, after the first step), ``peak_step_bytes`` (a step's transient on top)
and their sum ``peak_bytes_alone`` (what the peer needs on its own); megolmo rows at sequence 4096
are compared with OLMo-core's published per-GPU tokens/s (``PUBLISHED_TOKENS_PER_S``).

The run for the issue's goals (55k tokens/s bf16, 65k fp8, 60% of the bf16 matmul rate), on one H100:

    python tools/bench_train.py --device cuda --model olmo2_1b --seq-len 4096 --batch 4 \\
        --precisions bf16,fp8 --activation-checkpointing off,on --peers megolmo --json bench_gpu.json

and again with ``--compile`` (every peer's blocks through ``torch.compile``, as OLMo-core's published
figures are taken). Peers of a group stay resident together on the one GPU, so the default peer set may
not fit at olmo2_1b: run the peers separately (``--peers transformers``, ``--peers olmo_core``).
``tools/gpu_validate.sh`` runs all of this on a lent GPU machine.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch

from megolmo.errors import MegolmoConfigError
from megolmo.flops import device_peak_flops, training_flops_per_token
from megolmo.kernels.select import FP8_RECIPES
from megolmo.model.config import ModelConfig

PEERS = ("megolmo", "transformers", "olmo_core")
# Parameter dtype per precision: fp8 keeps bf16 parameters and runs the GEMMs in FP8 inside the model.
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
CHECKPOINTING = {"off": False, "on": True}
LR = 1e-4
BETAS = (0.9, 0.95)
EPS = 1e-8
WEIGHT_DECAY = 0.1
CLIP = 1.0
Z_LOSS = 1e-5
# OLMo-core's published training throughput per H100 at sequence 4096 (tokens/s per GPU).
PUBLISHED_TOKENS_PER_S = {("olmo2_1b", "bf16"): 55_000, ("olmo2_1b", "fp8"): 65_000,
                          ("olmo2_7b", "bf16"): 10_000, ("olmo2_7b", "fp8"): 13_000,
                          ("olmo2_13b", "bf16"): 4_600, ("olmo2_13b", "fp8"): 5_500}
PUBLISHED_SEQ_LEN = 4096
MM_GOAL = 0.6  # the goal: megolmo at >= 60% of the measured bf16 matmul rate
NO_FP8 = "no FP8 path in this peer's plain PyTorch setup"
GIB = 2 ** 30


def bench_model_config() -> ModelConfig:
    """The default benchmark shape: OLMo 2's full vocabulary and a small trunk (about 130M
    parameters, two thirds of them embedding and LM head, as in a real OLMo 2 1B's share at short
    context). A step takes seconds on a couple of CPU cores."""
    return ModelConfig(name="bench", vocab_size=100352, hidden_size=512, intermediate_size=1536,
                       num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                       eos_token_id=0, pad_token_id=None).validate()


def resolve_model(name: str) -> ModelConfig:
    return bench_model_config() if name == "bench" else ModelConfig.named(name)


@dataclass
class BenchSettings:
    model: ModelConfig = field(default_factory=bench_model_config)
    seq_len: int = 512
    batch: int = 4
    steps: int = 6
    warmup: int = 2
    precisions: tuple[str, ...] = ("fp32", "bf16")
    checkpointing: tuple[bool, ...] = (False,)
    fp8_recipe: str = "delayed"
    compile: bool = False
    peers: tuple[str, ...] = PEERS
    threads: int | None = None
    device: str = "cpu"
    seed: int = 1234
    mm_size: int | None = None


@dataclass(frozen=True)
class Variant:
    """What every peer of one group runs: a precision, activation checkpointing on or off, and whether
    each peer's transformer blocks go through ``torch.compile`` (as OLMo-core's published figures do)."""

    precision: str
    checkpointing: bool
    fp8_recipe: str = "delayed"
    compile: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    @property
    def mm_key(self) -> str:
        """The matmul rate this group is measured against: that of its parameter dtype."""
        return DTYPE_NAMES[self.dtype]

    @property
    def label(self) -> str:
        return f"{self.precision} ckpt={'on' if self.checkpointing else 'off'}"


class PeerUnsupported(Exception):
    """A peer that has no way to run a variant in this benchmark: skipped with this message."""


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def published_tokens_per_s(model_name: str, precision: str, device: str, seq_len: int) -> int | None:
    """OLMo-core's figure for this run, where one applies (a GPU, sequence 4096, a published model)."""
    if not device.startswith("cuda") or seq_len != PUBLISHED_SEQ_LEN:
        return None
    return PUBLISHED_TOKENS_PER_S.get((model_name, precision))


# ----------------------------------------------------------------------------- timing and memory helpers

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def allocated(device: torch.device) -> int | None:
    """Bytes of CUDA memory held by tensors once queued work is done; None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)


def measure_mm_flops(dtype: torch.dtype, device: torch.device, n: int, repeats: int = 5) -> float:
    """FLOP/s of an n x n x n ``torch.mm`` in ``dtype``: the best of a few runs after a warm-up."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    torch.mm(a, b)
    best = min(timed(lambda: torch.mm(a, b), device)[0] for _ in range(repeats))
    return 2.0 * n ** 3 / best


# ----------------------------------------------------------------------------- the batch

def make_batch(cfg: ModelConfig, batch: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids (never the pad id) and an all-true label mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=gen)
    if cfg.pad_token_id is not None:
        ids = ids.masked_fill(ids == cfg.pad_token_id, (cfg.pad_token_id + 1) % cfg.vocab_size)
    return ids, torch.ones(batch, seq_len, dtype=torch.bool)


def shifted_labels(input_ids: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
    """OLMo-core style labels: the next token, -100 where no loss is taken (and at the last position)."""
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:].masked_fill(~label_mask[:, 1:], -100)
    return labels


# ----------------------------------------------------------------------------- peers

@dataclass
class Runner:
    """One peer in one variant: ``step()`` runs a full training step and returns its mean CE."""

    step: Callable[[], float]
    num_params: int
    notes: list[str]
    kernels: dict | None = None  # megolmo's KernelChoice, to say which back-end was measured


def _adamw(named_params, no_decay: Callable[[str], bool]) -> torch.optim.AdamW:
    named = [(n, p) for n, p in named_params if p.requires_grad]
    groups = [{"params": [p for n, p in named if not no_decay(n)], "weight_decay": WEIGHT_DECAY},
              {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=LR, betas=BETAS, eps=EPS, foreach=True)


def _megolmo_reference(cfg: ModelConfig, seed: int):
    """megolmo's fp32 model with initialised weights: the source of every peer's starting weights."""
    from megolmo.model.init import initialize_parameters
    from megolmo.model.olmo2 import Olmo2ForCausalLM

    model = Olmo2ForCausalLM(cfg)
    initialize_parameters(model, seed, cfg.initializer_range)
    return model


def _reference_state(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """megolmo's initial weights by transformers name, vocabulary padding dropped."""
    model = _megolmo_reference(cfg, seed)
    state = {}
    for name, param in model.named_parameters():
        state[name] = param.detach()[: cfg.vocab_size] if name.endswith(("embed_tokens.weight", "lm_head.weight")) \
            else param.detach()
    return state


def global_param_count(model: torch.nn.Module) -> int:
    """Parameters of the logical model: megolmo's padded vocabulary rows are not counted."""
    total = 0
    for p in model.parameters():
        spec = getattr(p, "shard_spec", None)
        total += math.prod(spec.global_shape) if spec is not None else p.numel()
    return total


def build_megolmo(cfg: ModelConfig, v: Variant, device: torch.device, seed: int,
                  batch: tuple[torch.Tensor, torch.Tensor], bucket_size: int = 40_000_000) -> Runner:
    """The trainer's own single-rank step: its kernel choice (modules and AdamW update), flat
    parameter/fp32-gradient buffers, the gradient synchronizer's hooks, ``forward_backward`` and
    ``DistributedAdamW`` (dp = 1)."""
    from megolmo.kernels.apply import prepare_model
    from megolmo.kernels.fused_adam import UPDATES
    from megolmo.kernels.select import Fp8Settings, choose_kernels
    from megolmo.optim.adamw import AdamWSettings, DistributedAdamW
    from megolmo.optim.buffers import FlatBuffers
    from megolmo.optim.grad_sync import GradientSynchronizer
    from megolmo.step import forward_backward

    fp8 = Fp8Settings(recipe=v.fp8_recipe)
    choice = choose_kernels("auto", v.precision, device, fp8, v.compile)  # before building: fp8 on a CPU fails here
    model = _megolmo_reference(replace(cfg, activation_checkpointing=v.checkpointing), seed).to(device)
    prepare_model(model, v.dtype, choice, fp8, compile_blocks=v.compile)  # as the trainer's build_chunks does
    num_params = global_param_count(model)
    buffers = FlatBuffers(list(model.named_parameters()), 1, bucket_size)
    grad_sync = GradientSynchronizer(buffers, None, 1, reduce_scatter=False, overlap=True)
    opt = DistributedAdamW(buffers, AdamWSettings(lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                                                  clip_grad_norm=CLIP), None, False, 0, [],
                           UPDATES.get(choice.optimizer))
    input_ids, label_mask = (t.to(device) for t in batch)
    micro = [dict(input_ids=input_ids, label_mask=label_mask)]
    loss_tokens = int(label_mask[:, 1:].sum())

    def step() -> float:
        grad_sync.start_step()
        ce, _ = forward_backward(model, micro, loss_tokens, z_loss=Z_LOSS, device=device)
        grad_sync.finish()
        opt.step(LR)
        return float(ce) / loss_tokens

    kernels = {k: val for k, val in choice.to_dict().items() if k != "accelerators"}
    notes = ["megolmo: trainer path (choose_kernels + apply_kernels, FlatBuffers, GradientSynchronizer, "
             "forward_backward, DistributedAdamW on flat buffers), CE + 1e-5 z-loss",
             f"megolmo {v.precision}: kernels {json.dumps(choice.to_dict())}"]
    if v.dtype != torch.float32:
        notes.append(f"megolmo {v.precision}: bf16 params, fp32 grad buffer + fp32 master weights and Adam state"
                     + (f"; GEMMs in FP8 ({choice.fp8})" if v.precision == "fp8" else ""))
    return Runner(step, num_params, notes, kernels)


def _enable_hf_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant recomputation of every decoder layer: ``activation_checkpointing_enable`` in newer
    transformers, which deprecate the older ``gradient_checkpointing_enable``."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_transformers(cfg: ModelConfig, v: Variant, device: torch.device, seed: int,
                       batch: tuple[torch.Tensor, torch.Tensor]) -> Runner:
    if v.precision == "fp8":
        raise PeerUnsupported(NO_FP8)
    from transformers import Olmo2ForCausalLM as HFOlmo2

    from megolmo.model.hf_config import hf_config

    hf_cfg = hf_config(cfg)
    hf_cfg._attn_implementation = "sdpa"
    model = HFOlmo2(hf_cfg)
    model.load_state_dict(_reference_state(cfg, seed), strict=True)
    model = model.to(device=device, dtype=v.dtype).train()
    if v.checkpointing:
        _enable_hf_checkpointing(model)
    if v.compile:
        for layer in model.model.layers:
            layer.compile()
    opt = _adamw(model.named_parameters(), lambda n: "embed_tokens" in n)
    params = [p for p in model.parameters() if p.requires_grad]
    input_ids, label_mask = (t.to(device) for t in batch)
    labels = input_ids.masked_fill(~label_mask, -100)  # transformers shifts labels itself

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=input_ids, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP, foreach=True)
        opt.step()
        return float(loss.detach())

    notes = [f"transformers: attn_implementation={model.config._attn_implementation}, "
             "loss via labels= (CE only: transformers has no z-loss); checkpointing non-reentrant, every layer"]
    if v.dtype != torch.float32:
        notes.append("transformers bf16: model.to(bfloat16), torch AdamW on bf16 params/state (no master weights)")
    return Runner(step, sum(p.numel() for p in model.parameters()), notes)


def olmo_core_config(cfg: ModelConfig):
    """An OLMo-core ``TransformerConfig`` equal to ``cfg``: reordered-norm blocks, full-width QK-norm,
    RMSNorm eps, rope theta, untied embeddings and the exact MLP hidden size."""
    from olmo_core.nn.feed_forward import FeedForwardConfig
    from olmo_core.nn.transformer import TransformerBlockType, TransformerConfig

    return TransformerConfig.llama_like(
        d_model=cfg.hidden_size, vocab_size=cfg.vocab_size, n_layers=cfg.num_hidden_layers,
        n_heads=cfg.num_attention_heads, n_kv_heads=cfg.num_key_value_heads,
        block_name=TransformerBlockType.reordered_norm, qk_norm=True, use_head_qk_norm=False,
        rope_theta=int(cfg.rope_theta), layer_norm_eps=cfg.rms_norm_eps,
        feed_forward=FeedForwardConfig(hidden_size=cfg.intermediate_size, bias=False),
        tie_word_embeddings=False)


def olmo_core_name(hf_name: str) -> str:
    """transformers/megolmo parameter name -> OLMo-core parameter name."""
    if hf_name == "model.embed_tokens.weight":
        return "embeddings.weight"
    if hf_name == "model.norm.weight":
        return "lm_head.norm.weight"
    if hf_name == "lm_head.weight":
        return "lm_head.w_out.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    rest = (rest.replace("self_attn.q_proj", "attention.w_q").replace("self_attn.k_proj", "attention.w_k")
            .replace("self_attn.v_proj", "attention.w_v").replace("self_attn.o_proj", "attention.w_out")
            .replace("self_attn.q_norm", "attention.q_norm").replace("self_attn.k_norm", "attention.k_norm")
            .replace("post_attention_layernorm", "attention_norm").replace("post_feedforward_layernorm",
                                                                          "feed_forward_norm")
            .replace("mlp.gate_proj", "feed_forward.w1").replace("mlp.up_proj", "feed_forward.w3")
            .replace("mlp.down_proj", "feed_forward.w2"))
    return f"blocks.{layer}.{rest}"


def build_olmo_core(cfg: ModelConfig, v: Variant, device: torch.device, seed: int,
                    batch: tuple[torch.Tensor, torch.Tensor]) -> Runner:
    if v.precision == "fp8":
        raise PeerUnsupported(NO_FP8)
    import logging

    from olmo_core.nn.transformer import TransformerActivationCheckpointingMode

    logging.getLogger("olmo_core").setLevel(logging.ERROR)
    model = olmo_core_config(cfg).build(init_device="cpu")
    model.init_weights(device=torch.device("cpu"), max_seq_len=max(batch[0].shape[1], 1))
    model.load_state_dict({olmo_core_name(k): t for k, t in _reference_state(cfg, seed).items()}, strict=True)
    model = model.to(device=device, dtype=v.dtype).train()
    backend = type(model.blocks["0"].attention.backend).__name__ if hasattr(model, "blocks") else "?"
    if v.checkpointing:
        model.apply_activation_checkpointing(TransformerActivationCheckpointingMode.full)
    if v.compile:
        model.apply_compile()  # after checkpointing, as OLMo-core requires
    opt = _adamw(model.named_parameters(), lambda n: n.startswith("embeddings."))
    params = [p for p in model.parameters() if p.requires_grad]
    input_ids, label_mask = (t.to(device) for t in batch)
    labels = shifted_labels(input_ids, label_mask)
    loss_tokens = max(int((labels != -100).sum()), 1)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        out = model(input_ids, labels=labels, loss_reduction="sum", z_loss_multiplier=Z_LOSS,
                    loss_div_factor=float(loss_tokens), return_logits=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP, foreach=True)
        opt.step()
        return float(out.ce_loss)

    notes = [f"olmo_core: LM-head loss (sum / loss tokens) + 1e-5 z-loss, attention backend {backend}; "
             "checkpointing via apply_activation_checkpointing(full)"]
    if v.dtype != torch.float32:
        notes.append("olmo_core bf16: model.to(bfloat16), torch AdamW on bf16 params/state (its trainer would "
                     "use FSDP mixed precision; no FSDP in one process)")
    return Runner(step, sum(p.numel() for p in model.parameters()), notes)


BUILDERS: dict[str, Callable[..., Runner]] = {
    "megolmo": build_megolmo, "transformers": build_transformers, "olmo_core": build_olmo_core}


# ----------------------------------------------------------------------------- the benchmark

def _reason(exc: BaseException) -> str:
    """One line: our own errors already say what is wrong; others get their type in front."""
    own = isinstance(exc, (PeerUnsupported, MegolmoConfigError))
    text = (str(exc) if own else f"{type(exc).__name__}: {exc}").strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


@dataclass
class PeerRun:
    """One peer's record within a group: its step losses, timings and CUDA memory."""

    runner: Runner
    build_bytes: int | None  # CUDA memory the builder left allocated; None off CUDA
    losses: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    resident_bytes: int | None = None
    peak_step_bytes: int | None = None

    def step(self, device: torch.device) -> tuple[float, float, float]:
        """One training step: wall seconds, process CPU seconds and the loss."""
        before = allocated(device)
        if before is not None:
            torch.cuda.reset_peak_memory_stats(device)
        cpu_start = time.process_time()
        elapsed, loss = timed(self.runner.step, device)
        cpu = time.process_time() - cpu_start
        if before is not None:
            self._track_memory(before, device)
        self.losses.append(loss)
        return elapsed, cpu, loss

    def _track_memory(self, before: int, device: torch.device) -> None:
        """The step's transient peak on top of what was allocated before it; the resident memory once,
        after the first step, because torch AdamW creates its state there."""
        peak = torch.cuda.max_memory_allocated(device) - before
        self.peak_step_bytes = max(self.peak_step_bytes or 0, peak)
        if self.resident_bytes is None:
            self.resident_bytes = self.build_bytes + allocated(device) - before


def _skip(result: dict, peer: str, v: Variant, reason: str, log: Callable[[str], None]) -> None:
    result["skipped"].append({"peer": peer, "precision": v.precision, "activation_checkpointing": v.checkpointing,
                              "reason": reason})
    log(f"[{v.label}] {peer}: skipped ({reason})")


def build_group(cfg: ModelConfig, v: Variant, s: BenchSettings, device: torch.device,
                batch: tuple[torch.Tensor, torch.Tensor], result: dict, log: Callable[[str], None]
                ) -> dict[str, PeerRun]:
    """Every peer that can be built for ``v``; the others are recorded as skipped, not fatal."""
    runs: dict[str, PeerRun] = {}
    for peer in s.peers:
        before = allocated(device)
        try:
            runner = BUILDERS[peer](cfg, v, device, s.seed, batch)
        except Exception as exc:
            _skip(result, peer, v, _reason(exc), log)
            continue
        runs[peer] = PeerRun(runner, None if before is None else allocated(device) - before)
        result["param_counts"][peer] = runner.num_params
        result["notes"].extend(n for n in runner.notes if n not in result["notes"])
    counts = {p: r.runner.num_params for p, r in runs.items()}
    if len(set(counts.values())) > 1:
        raise RuntimeError(f"peers do not build the same model: parameter counts {counts}")
    return runs


def time_group(runs: dict[str, PeerRun], v: Variant, s: BenchSettings, device: torch.device, result: dict,
               log: Callable[[str], None]) -> None:
    """Warm-up then timed steps, one step per peer in turn, rotating who goes first so that machine
    drift hits all peers alike. A peer whose step fails is dropped and recorded as skipped."""
    for i in range(s.warmup + s.steps):
        order = list(runs)
        k = i % len(order) if order else 0
        for peer in order[k:] + order[:k]:
            if peer not in runs:
                continue
            try:
                elapsed, cpu, loss = runs[peer].step(device)
            except Exception as exc:
                _skip(result, peer, v, "step failed: " + _reason(exc), log)
                del runs[peer]
                continue
            if i >= s.warmup:
                runs[peer].times.append(elapsed)
                runs[peer].cpu_times.append(cpu)
            log(f"[{v.label}] {peer}: step {len(runs[peer].losses)} {'timed' if i >= s.warmup else 'warmup'} "
                f"{elapsed:.3f}s (process CPU {cpu:.3f}s) loss {loss:.4f}")


def group_rows(runs: dict[str, PeerRun], v: Variant, flops_step: float, tokens: int, peak: float | None
               ) -> list[dict]:
    """Result rows of one group; ``mm_fraction``, ``ratio_megolmo`` and ``vs_published`` come later."""
    rows = []
    for peer, run in runs.items():
        step_s = statistics.median(run.times)
        achieved = flops_step / step_s
        rows.append({
            "peer": peer, "precision": v.precision, "activation_checkpointing": v.checkpointing,
            "step_s": step_s, "step_times": run.times,
            "cpu_s": statistics.median(run.cpu_times), "cpu_times": run.cpu_times,
            "tokens_per_s": tokens / step_s, "flops_per_s": achieved, "mm_dtype": v.mm_key,
            # fp8 too against the BF16 peak, as OLMo-core and Megatron report FP8 MFU
            "mfu_device_peak": achieved / peak if peak and v.mm_key == "bf16" else None,
            "resident_bytes": run.resident_bytes, "peak_step_bytes": run.peak_step_bytes,
            "peak_bytes_alone": None if run.resident_bytes is None else run.resident_bytes + run.peak_step_bytes,
            "first_loss": run.losses[0], "losses": run.losses, "kernels": run.runner.kernels})
    return rows


def record_mm(result: dict, key: str, before: float, after: float, n: int, log: Callable[[str], None]) -> None:
    best = max(before, after)
    result["mm_flops"][key] = {"best": best, "before": before, "after": after}
    if min(before, after) < 0.75 * best:
        result["notes"].append(f"WARNING: the {key} torch.mm rate moved {before / 1e12:.3f} -> {after / 1e12:.3f} "
                               "TFLOP/s during the run: the machine is busy and wall-clock timings are "
                               "unreliable (compare the process CPU seconds, cpu s)")
    log(f"[{key}] torch.mm {n}^3: {before / 1e12:.3f} TFLOP/s before, {after / 1e12:.3f} after")


def finish_rows(result: dict, s: BenchSettings, model_name: str) -> None:
    """What needs every group done: the matmul fraction, megolmo's ratio within its (precision,
    checkpointing) group, and megolmo against OLMo-core's published figure."""
    rows = result["results"]
    for row in rows:
        row["mm_fraction"] = row["flops_per_s"] / result["mm_flops"][row["mm_dtype"]]["best"]
        ours = next((r for r in rows if r["peer"] == "megolmo" and r["precision"] == row["precision"]
                     and r["activation_checkpointing"] == row["activation_checkpointing"]), None)
        row["ratio_megolmo"] = ours["tokens_per_s"] / row["tokens_per_s"] if ours else None
        published = published_tokens_per_s(model_name, row["precision"], s.device, s.seq_len) \
            if row["peer"] == "megolmo" else None
        row["vs_published"] = row["tokens_per_s"] / published if published else None


def release(device: torch.device) -> None:
    """Free a finished group's models before the next is built (hooks keep them in reference cycles)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _check_settings(s: BenchSettings) -> None:
    unknown = [p for p in s.peers if p not in BUILDERS]
    if unknown:
        raise ValueError(f"unknown peer(s) {unknown}; choices: {', '.join(BUILDERS)}")
    bad = [p for p in s.precisions if p not in PRECISIONS]
    if bad:
        raise ValueError(f"unknown precision(s) {bad}; choices: {', '.join(PRECISIONS)}")
    if not s.checkpointing:
        raise ValueError("checkpointing: give at least one of False, True")
    if s.fp8_recipe not in FP8_RECIPES:
        raise ValueError(f"fp8_recipe {s.fp8_recipe}: choose one of {', '.join(FP8_RECIPES)}")
    if s.steps < 1 or s.warmup < 0:
        raise ValueError("steps must be >= 1 and warmup >= 0")


def run_benchmark(s: BenchSettings, log: Callable[[str], None] = lambda _: None) -> dict:
    _check_settings(s)
    device = torch.device(s.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: CUDA is not available")
    threads = s.threads or default_threads()
    torch.set_num_threads(threads)
    cfg = s.model.validate()
    if s.seq_len > cfg.max_position_embeddings:
        raise ValueError(f"seq_len {s.seq_len} > max_position_embeddings {cfg.max_position_embeddings}")
    tokens = s.batch * s.seq_len
    flops_token = training_flops_per_token(cfg, s.seq_len)
    mm_n = s.mm_size or (8192 if device.type == "cuda" else 4096)
    batch = make_batch(cfg, s.batch, s.seq_len, s.seed)

    result: dict = {
        "settings": {**{k: v for k, v in asdict(s).items() if k != "model"}, "threads": threads,
                     "mm_size": mm_n, "tokens_per_step": tokens},
        "model": cfg.to_dict(),
        "flops_per_token": flops_token,
        "flops_per_step": flops_token * tokens,
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "machine": platform.machine(), "processor": platform.processor(),
                        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"},
        "device_peak_bf16_flops": device_peak_flops(device),
        "mm_flops": {}, "param_counts": {}, "results": [], "skipped": [], "notes": [],
    }
    log(f"model {cfg.name}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, MLP {cfg.intermediate_size}, "
        f"heads {cfg.num_attention_heads}/{cfg.num_key_value_heads}, vocab {cfg.vocab_size}; batch {s.batch} x "
        f"seq {s.seq_len} = {tokens} tokens/step; {flops_token / 1e9:.3f} GFLOP/token; {threads} threads, {device}")

    groups = [Variant(p, c, s.fp8_recipe, s.compile) for p in s.precisions for c in s.checkpointing]
    last_use = {v.mm_key: i for i, v in enumerate(groups)}
    mm_before: dict[str, float] = {}  # one matmul rate per parameter dtype, before its first group and after its last
    for i, v in enumerate(groups):
        runs = build_group(cfg, v, s, device, batch, result, log)
        if runs and v.mm_key not in mm_before:
            mm_before[v.mm_key] = measure_mm_flops(v.dtype, device, mm_n)
        time_group(runs, v, s, device, result, log)
        result["results"] += group_rows(runs, v, flops_token * tokens, tokens, result["device_peak_bf16_flops"])
        runs.clear()
        release(device)
        if last_use[v.mm_key] == i and v.mm_key in mm_before:
            record_mm(result, v.mm_key, mm_before[v.mm_key], measure_mm_flops(v.dtype, device, mm_n), mm_n, log)
    finish_rows(result, s, cfg.name)

    if any(r["precision"] == "fp8" for r in result["results"]):
        result["notes"].append("fp8 rows: MFU against the dense BF16 peak and of mm rate against the bf16 torch.mm "
                               "rate, as OLMo-core and Megatron report FP8 runs")
    result["notes"].append("step s = median timed step (tokens/s, ratio and FLOP/s use it), min s = fastest, cpu s = "
                           "median process CPU seconds per step (all threads, spin-waits included; steadier than "
                           "wall-clock on a shared machine); ratio = megolmo tokens/s / peer tokens/s in the same "
                           "precision and ckpt (> 1: megolmo faster); of mm rate = achieved FLOP/s / FLOP/s of one "
                           "large torch.mm of the parameter dtype measured in this run (best of before/after); MFU = "
                           "achieved FLOP/s / the GPU's dense BF16 peak; peak GiB = resident (model, grads, optimizer "
                           "state) + a step's transient peak, what the peer needs alone (CUDA only)")
    return result


# ----------------------------------------------------------------------------- output

def _opt(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _ckpt(on: bool) -> str:
    return "on" if on else "off"


def goal_lines(result: dict) -> list[str]:
    """megolmo against the issue's goals: OLMo-core's published tokens/s, 60% of the bf16 matmul rate."""
    lines = []
    for r in result["results"]:
        if r["peer"] != "megolmo":
            continue
        label = f"megolmo {r['precision']} ckpt={_ckpt(r['activation_checkpointing'])}"
        if r["vs_published"] is not None:
            published = r["tokens_per_s"] / r["vs_published"]
            lines.append(f"{label}: {r['tokens_per_s']:,.0f} tokens/s = {r['vs_published']:.2f}x OLMo-core's "
                         f"published {published / 1000:g}k")
        if r["mm_dtype"] == "bf16":
            verdict = "meets" if r["mm_fraction"] >= MM_GOAL else "misses"
            lines.append(f"{label}: {100 * r['mm_fraction']:.1f}% of the bf16 mm rate ({verdict} the "
                         f"{100 * MM_GOAL:.0f}% goal)")
    return lines


def format_table(result: dict) -> str:
    head = ("peer", "precision", "ckpt", "step s", "min s", "cpu s", "tokens/s", "megolmo/peer", "TFLOP/s",
            "of mm rate", "MFU", "peak GiB")
    rows = [head]
    for r in result["results"]:
        alone = None if r["peak_bytes_alone"] is None else r["peak_bytes_alone"] / GIB
        mfu = None if r["mfu_device_peak"] is None else 100 * r["mfu_device_peak"]
        rows.append((r["peer"], r["precision"], _ckpt(r["activation_checkpointing"]), f"{r['step_s']:.3f}",
                     f"{min(r['step_times']):.3f}", f"{r['cpu_s']:.2f}", f"{r['tokens_per_s']:.1f}",
                     _opt(r["ratio_megolmo"], ".3f"), f"{r['flops_per_s'] / 1e12:.4f}",
                     f"{100 * r['mm_fraction']:.1f}%", _opt(mfu, ".1f") + ("%" if mfu is not None else ""),
                     _opt(alone, ".2f")))
    for sk in result["skipped"]:
        rows.append((sk["peer"], sk["precision"], _ckpt(sk["activation_checkpointing"]), "skipped")
                    + ("",) * (len(head) - 4))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    out = ["\n".join(lines)]
    mm = ", ".join(f"{p} {v['best'] / 1e12:.3f} TFLOP/s" for p, v in result["mm_flops"].items())
    counts = set(result["param_counts"].values())
    out.append(f"torch.mm {result['settings']['mm_size']}^3 rate: {mm}")
    out.append(f"parameters: {', '.join(f'{k} {v:,}' for k, v in result['param_counts'].items())}"
               + (" (equal)" if len(counts) == 1 else " (DIFFER)"))
    out.append(f"training FLOPs/token {result['flops_per_token'] / 1e9:.4f} G, "
               f"{result['settings']['tokens_per_step']} tokens/step")
    first = [f"{r['peer']}/{r['precision']}/ckpt={_ckpt(r['activation_checkpointing'])} {r['first_loss']:.4f}"
             for r in result["results"]]
    if first:
        out.append("first-step CE (same weights, same batch): " + ", ".join(first))
    out.extend(goal_lines(result))
    for sk in result["skipped"]:
        out.append(f"skipped {sk['peer']} ({sk['precision']}, ckpt={_ckpt(sk['activation_checkpointing'])}): "
                   f"{sk['reason']}")
    out.extend("note: " + n for n in result["notes"])
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="bench", help="a named config (conf/model/*.yaml) or 'bench'")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (one micro-batch)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per peer and group")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16, fp8 (fp8: megolmo only, "
                   "on a GPU with FP8 tensor cores)")
    p.add_argument("--activation-checkpointing", default="off", help="comma-separated: off, on (each one a group)")
    p.add_argument("--fp8-recipe", choices=FP8_RECIPES, default="delayed", help="megolmo's FP8 scaling recipe")
    p.add_argument("--compile", action="store_true", help="torch.compile every peer's transformer blocks")
    p.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset of the default")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; None: all usable cores")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: synchronized timing, memory, MFU")
    p.add_argument("--seed", type=int, default=1234, help="weights and batch")
    p.add_argument("--mm-size", type=int, default=None, help="n of the n^3 reference torch.mm; "
                   "None: 4096 on CPU, 8192 on CUDA")
    p.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON here")
    return p.parse_args(argv)


def _split(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for flag, given, known in (("--peers", _split(args.peers), BUILDERS),
                               ("--precisions", _split(args.precisions), PRECISIONS),
                               ("--activation-checkpointing", _split(args.activation_checkpointing), CHECKPOINTING)):
        unknown = [x for x in given if x not in known]
        if unknown or not given:
            print(f"bench_train: {flag}: unknown or empty {unknown or given} (choices: {', '.join(known)})",
                  file=sys.stderr)
            return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_train: --device cuda: no CUDA device is visible to this torch "
              f"({torch.__version__})", file=sys.stderr)
        return 2
    settings = BenchSettings(model=resolve_model(args.model), seq_len=args.seq_len, batch=args.batch,
                             steps=args.steps, warmup=args.warmup, precisions=_split(args.precisions),
                             checkpointing=tuple(CHECKPOINTING[x] for x in _split(args.activation_checkpointing)),
                             fp8_recipe=args.fp8_recipe, compile=args.compile, peers=_split(args.peers),
                             threads=args.threads, device=args.device, seed=args.seed, mm_size=args.mm_size)
    result = run_benchmark(settings, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["results"] else 1


if __name__ == "__main__":
    sys.exit(main())
