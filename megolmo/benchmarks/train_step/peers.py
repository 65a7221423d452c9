"""The peers: one builder per code base, each returning a ``Runner`` whose ``step()`` is that code
base's own training step on the shared batch, started from megolmo's initial weights.

Every peer uses the same AdamW settings (lr 1e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0.1
except on the embeddings, foreach) and clips gradients at 1.0, so their steps do the same work."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Iterable

import torch

from megolmo.benchmarks.train_step.settings import Variant
from megolmo.model.config import ModelConfig

if TYPE_CHECKING:
    from olmo_core.nn.transformer import TransformerConfig

    from megolmo.model.olmo2 import Olmo2ForCausalLM

LR = 1e-4
BETAS = (0.9, 0.95)
EPS = 1e-8
WEIGHT_DECAY = 0.1
CLIP = 1.0
Z_LOSS = 1e-5
NO_FP8 = "no FP8 path in this peer's plain PyTorch setup"

Batch = tuple[torch.Tensor, torch.Tensor]  # token ids and label mask, (batch, seq_len) each


class PeerUnsupported(Exception):
    """A peer that has no way to run a variant in this benchmark: skipped with this message."""


def make_batch(cfg: ModelConfig, batch: int, seq_len: int, seed: int) -> Batch:
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


@dataclass
class Runner:
    """One peer in one variant: ``step()`` runs a full training step and returns its mean CE."""

    step: Callable[[], float]
    num_params: int
    notes: list[str]
    kernels: dict | None = None  # megolmo's KernelChoice, to say which back-end was measured


def _adamw(named_params: Iterable[tuple[str, torch.nn.Parameter]], no_decay: Callable[[str], bool]
           ) -> torch.optim.AdamW:
    """torch AdamW with the shared settings, no weight decay where ``no_decay(name)`` (the embeddings)."""
    named = [(n, p) for n, p in named_params if p.requires_grad]
    groups = [{"params": [p for n, p in named if not no_decay(n)], "weight_decay": WEIGHT_DECAY},
              {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=LR, betas=BETAS, eps=EPS, foreach=True)


def reference_model(cfg: ModelConfig, seed: int) -> Olmo2ForCausalLM:
    """megolmo's fp32 model with initialised weights: the source of every peer's starting weights."""
    from megolmo.model.init import initialize_parameters
    from megolmo.model.olmo2 import Olmo2ForCausalLM

    model = Olmo2ForCausalLM(cfg)
    initialize_parameters(model, seed, cfg.initializer_range)
    return model


def _reference_state(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """megolmo's initial weights by transformers name, vocabulary padding dropped."""
    model = reference_model(cfg, seed)
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
                  batch: Batch, bucket_size: int = 40_000_000) -> Runner:
    """The trainer's own single-rank step: its kernel choice (modules and AdamW update) and the
    ``TrainStep`` its factory builds (flat parameter/fp32-gradient buffers, gradient hooks, the
    micro-batch loop, ``DistributedAdamW``) around the peers' common initial weights."""
    from megolmo.kernels.apply import prepare_model
    from megolmo.kernels.select import Fp8Settings, choose_kernels
    from megolmo.optim.adamw import AdamWSettings
    from megolmo.parallel.state import ParallelState
    from megolmo.step import StepSettings, build_train_step

    fp8 = Fp8Settings(recipe=v.fp8_recipe)
    choice = choose_kernels("auto", v.precision, device, fp8, v.compile)  # before building: fp8 on a CPU fails here
    model = reference_model(replace(cfg, activation_checkpointing=v.checkpointing), seed).to(device)
    prepare_model(model, v.dtype, choice, fp8, compile_blocks=v.compile)  # as the step factory's build_chunks does
    num_params = global_param_count(model)
    adamw = AdamWSettings(lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, clip_grad_norm=CLIP)
    train_step = build_train_step(ParallelState(device=device), StepSettings(
        adamw, z_loss=Z_LOSS, bucket_size=bucket_size, fused_optimizer=choice.optimizer), chunks=[model])
    input_ids, label_mask = (t.to(device) for t in batch)
    micro = [dict(input_ids=input_ids, label_mask=label_mask)]
    loss_tokens = int(label_mask[:, 1:].sum())

    def step() -> float:
        return train_step.run(micro, loss_tokens, LR).ce_sum / loss_tokens

    kernels = {k: val for k, val in choice.to_dict().items() if k != "accelerators"}
    notes = ["megolmo: trainer path (choose_kernels + prepare_model, the TrainStep factory: flat buffers, "
             "gradient hooks, DistributedAdamW on flat buffers), CE + 1e-5 z-loss",
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
                       batch: Batch) -> Runner:
    """transformers' ``Olmo2ForCausalLM`` with SDPA attention, cast to the variant's dtype, and torch AdamW."""
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


def olmo_core_config(cfg: ModelConfig) -> TransformerConfig:
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
                    batch: Batch) -> Runner:
    """OLMo-core's ``Transformer`` built from an equal config, cast to the variant's dtype, and torch AdamW."""
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


# Peer name -> builder; the names are settings.PEERS.
BUILDERS: dict[str, Callable[..., Runner]] = {
    "megolmo": build_megolmo, "transformers": build_transformers, "olmo_core": build_olmo_core}

