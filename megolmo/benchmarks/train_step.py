"""Single-process training-step throughput: megolmo vs transformers' ``Olmo2ForCausalLM`` vs OLMo-core.

Every peer trains the same OLMo 2 architecture on the same batch with the same AdamW settings
(lr 1e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 except on the embeddings, foreach) and
gradient clipping at 1.0. A step is zero-grad + forward + backward + clip + optimizer step.
Starting weights are megolmo's, copied into the peers, so the first-step losses agree and show
that the three models compute the same function.

Precision, as each code base is normally run in one process:

* megolmo: the trainer's own path, bf16 parameters + fp32 grad buffer + fp32 master weights
  (``FlatBuffers`` + ``DistributedAdamW``); fp32 is plain fp32. Loss: cross-entropy + 1e-5 z-loss.
* transformers: ``model.to(bfloat16)`` and torch AdamW on the bf16 parameters; loss via
  ``labels=`` (transformers has no z-loss). Attention: SDPA.
* OLMo-core: ``model.to(bfloat16)`` and torch AdamW on the bf16 parameters; loss from its LM
  head (sum reduction divided by the loss-token count, z-loss 1e-5), as its train module does.

Peers are timed in alternation (one step each, rotating who goes first) so machine drift hits all
of them alike; a peer's time is its median step. FLOP/s are divided by the rate of one large
``torch.mm`` of the same dtype measured in this run (the "matmul rate"): on CPUs that stands in
for a hardware peak when computing MFU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from megolmo.flops import device_peak_flops, training_flops_per_token
from megolmo.model.config import ModelConfig

PEERS = ("megolmo", "transformers", "olmo_core")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
LR = 1e-4
BETAS = (0.9, 0.95)
EPS = 1e-8
WEIGHT_DECAY = 0.1
CLIP = 1.0
Z_LOSS = 1e-5


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
    peers: tuple[str, ...] = PEERS
    threads: int | None = None
    device: str = "cpu"
    seed: int = 1234
    mm_size: int | None = None


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------- timing helpers

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


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
    """One peer at one precision: ``step()`` runs a full training step and returns its mean CE."""

    step: Callable[[], float]
    num_params: int
    notes: list[str]


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


def build_megolmo(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int,
                  batch: tuple[torch.Tensor, torch.Tensor], bucket_size: int = 40_000_000) -> Runner:
    """The trainer's own single-rank step: flat parameter/fp32-gradient buffers, the gradient
    synchronizer's hooks, ``forward_backward`` and ``DistributedAdamW`` (dp = 1)."""
    from megolmo.optim.adamw import AdamWSettings, DistributedAdamW
    from megolmo.optim.buffers import FlatBuffers
    from megolmo.optim.grad_sync import GradientSynchronizer
    from megolmo.step import forward_backward

    model = _megolmo_reference(cfg, seed).to(device=device, dtype=dtype)
    num_params = global_param_count(model)
    buffers = FlatBuffers(list(model.named_parameters()), 1, bucket_size)
    grad_sync = GradientSynchronizer(buffers, None, 1, reduce_scatter=False, overlap=True)
    opt = DistributedAdamW(buffers, AdamWSettings(lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                                                  clip_grad_norm=CLIP), None, False, 0, [])
    input_ids, label_mask = (t.to(device) for t in batch)
    micro = [dict(input_ids=input_ids, label_mask=label_mask)]
    loss_tokens = int(label_mask[:, 1:].sum())

    def step() -> float:
        grad_sync.start_step()
        ce, _ = forward_backward(model, micro, loss_tokens, z_loss=Z_LOSS, device=device)
        grad_sync.finish()
        opt.step(LR)
        return float(ce) / loss_tokens

    notes = ["megolmo: trainer path (FlatBuffers, GradientSynchronizer, forward_backward, DistributedAdamW "
             "on flat buffers), CE + 1e-5 z-loss"]
    if dtype != torch.float32:
        notes.append("megolmo bf16: bf16 params, fp32 grad buffer + fp32 master weights and Adam state")
    return Runner(step, num_params, notes)


def build_transformers(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int,
                       batch: tuple[torch.Tensor, torch.Tensor]) -> Runner:
    from transformers import Olmo2ForCausalLM as HFOlmo2

    from megolmo.model.hf_config import hf_config

    hf_cfg = hf_config(cfg)
    hf_cfg._attn_implementation = "sdpa"
    model = HFOlmo2(hf_cfg)
    model.load_state_dict(_reference_state(cfg, seed), strict=True)
    model = model.to(device=device, dtype=dtype).train()
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
             "loss via labels= (CE only: transformers has no z-loss)"]
    if dtype != torch.float32:
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


def build_olmo_core(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int,
                    batch: tuple[torch.Tensor, torch.Tensor]) -> Runner:
    import logging

    logging.getLogger("olmo_core").setLevel(logging.ERROR)
    model = olmo_core_config(cfg).build(init_device="cpu")
    model.init_weights(device=torch.device("cpu"), max_seq_len=max(batch[0].shape[1], 1))
    model.load_state_dict({olmo_core_name(k): v for k, v in _reference_state(cfg, seed).items()}, strict=True)
    model = model.to(device=device, dtype=dtype).train()
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

    backend = type(model.blocks["0"].attention.backend).__name__ if hasattr(model, "blocks") else "?"
    notes = [f"olmo_core: LM-head loss (sum / loss tokens) + 1e-5 z-loss, attention backend {backend}"]
    if dtype != torch.float32:
        notes.append("olmo_core bf16: model.to(bfloat16), torch AdamW on bf16 params/state (its trainer would "
                     "use FSDP mixed precision; no FSDP in one process)")
    return Runner(step, sum(p.numel() for p in model.parameters()), notes)


BUILDERS: dict[str, Callable[..., Runner]] = {
    "megolmo": build_megolmo, "transformers": build_transformers, "olmo_core": build_olmo_core}


# ----------------------------------------------------------------------------- the benchmark

def _reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:300]


def run_benchmark(s: BenchSettings, log: Callable[[str], None] = lambda _: None) -> dict:
    unknown = [p for p in s.peers if p not in BUILDERS]
    if unknown:
        raise ValueError(f"unknown peer(s) {unknown}; choices: {', '.join(BUILDERS)}")
    bad = [p for p in s.precisions if p not in PRECISIONS]
    if bad:
        raise ValueError(f"unknown precision(s) {bad}; choices: {', '.join(PRECISIONS)}")
    if s.steps < 1 or s.warmup < 0:
        raise ValueError("steps must be >= 1 and warmup >= 0")
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

    def mm_rate(prec: str) -> float:
        return measure_mm_flops(PRECISIONS[prec], device, mm_n)

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

    for prec in s.precisions:
        dtype = PRECISIONS[prec]
        before = mm_rate(prec)
        runners: dict[str, Runner] = {}
        for peer in s.peers:
            try:
                runners[peer] = BUILDERS[peer](cfg, dtype, device, s.seed, batch)
            except Exception as exc:  # a peer that cannot be imported or built is skipped, not fatal
                result["skipped"].append({"peer": peer, "precision": prec, "reason": _reason(exc)})
                log(f"[{prec}] {peer}: skipped ({_reason(exc)})")
                continue
            result["param_counts"][peer] = runners[peer].num_params
            for note in runners[peer].notes:
                if note not in result["notes"]:
                    result["notes"].append(note)
        counts = {p: r.num_params for p, r in runners.items()}
        if len(set(counts.values())) > 1:
            raise RuntimeError(f"peers do not build the same model: parameter counts {counts}")

        times: dict[str, list[float]] = {p: [] for p in runners}
        cpu_times: dict[str, list[float]] = {p: [] for p in runners}
        losses: dict[str, list[float]] = {p: [] for p in runners}

        def one_step(peer: str, record: bool) -> None:
            try:
                cpu_start = time.process_time()
                elapsed, loss = timed(runners[peer].step, device)
                cpu = time.process_time() - cpu_start
            except Exception as exc:
                result["skipped"].append({"peer": peer, "precision": prec, "reason": "step failed: " + _reason(exc)})
                log(f"[{prec}] {peer}: step failed ({_reason(exc)})")
                del runners[peer]
                return
            losses[peer].append(loss)
            if record:
                times[peer].append(elapsed)
                cpu_times[peer].append(cpu)
            log(f"[{prec}] {peer}: step {len(losses[peer])} {'timed' if record else 'warmup'} "
                f"{elapsed:.3f}s (process CPU {cpu:.3f}s) loss {loss:.4f}")

        for i in range(s.warmup + s.steps):
            order = list(runners)
            k = i % len(order) if order else 0
            for peer in order[k:] + order[:k]:  # rotate who goes first, step after step
                if peer in runners:
                    one_step(peer, record=i >= s.warmup)
        after = mm_rate(prec)
        mm = max(before, after)
        result["mm_flops"][prec] = {"best": mm, "before": before, "after": after}
        if min(before, after) < 0.75 * mm:
            result["notes"].append(f"WARNING: the {prec} torch.mm rate moved {before / 1e12:.3f} -> {after / 1e12:.3f} "
                                   "TFLOP/s during the run: the machine is busy and wall-clock timings are "
                                   "unreliable (compare the process CPU seconds, cpu s)")
        log(f"[{prec}] torch.mm {mm_n}^3: {before / 1e12:.3f} TFLOP/s before, {after / 1e12:.3f} after")
        for peer, ts in times.items():
            if not ts or peer not in runners:
                continue
            step_s = statistics.median(ts)
            achieved = flops_token * tokens / step_s
            result["results"].append({
                "peer": peer, "precision": prec, "step_s": step_s, "step_times": ts,
                "cpu_s": statistics.median(cpu_times[peer]), "cpu_times": cpu_times[peer],
                "tokens_per_s": tokens / step_s, "flops_per_s": achieved, "mm_fraction": achieved / mm,
                "mfu_device_peak": achieved / result["device_peak_bf16_flops"]
                if result["device_peak_bf16_flops"] and prec == "bf16" else None,
                "first_loss": losses[peer][0], "losses": losses[peer]})
        runners.clear()  # free this precision's models before building the next

    for row in result["results"]:
        ours = next((r for r in result["results"] if r["peer"] == "megolmo" and r["precision"] == row["precision"]),
                    None)
        row["ratio_megolmo"] = ours["tokens_per_s"] / row["tokens_per_s"] if ours else None
    result["notes"].append("step s = median timed step (tokens/s, ratio and FLOP/s use it), min s = fastest, cpu s = median process CPU seconds per step (all threads, spin-waits included; steadier than wall-clock on a shared machine); ratio = "
                           "megolmo tokens/s / peer tokens/s (> 1: megolmo faster); of mm rate = achieved FLOP/s / "
                           "FLOP/s of one large torch.mm of the same dtype measured in this run (best of before/after)")
    return result


def format_table(result: dict) -> str:
    head = ("peer", "precision", "step s", "min s", "cpu s", "tokens/s", "megolmo/peer", "TFLOP/s", "of mm rate")
    rows = [head]
    for r in result["results"]:
        ratio = "-" if r["ratio_megolmo"] is None else f"{r['ratio_megolmo']:.3f}"
        rows.append((r["peer"], r["precision"], f"{r['step_s']:.3f}", f"{min(r['step_times']):.3f}", f"{r['cpu_s']:.2f}",
                     f"{r['tokens_per_s']:.1f}", ratio,
                     f"{r['flops_per_s'] / 1e12:.4f}", f"{100 * r['mm_fraction']:.1f}%"))
    for sk in result["skipped"]:
        rows.append((sk["peer"], sk["precision"], "skipped", "", "", "", "", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
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
    first = [f"{r['peer']}/{r['precision']} {r['first_loss']:.4f}" for r in result["results"]]
    if first:
        out.append("first-step CE (same weights, same batch): " + ", ".join(first))
    for sk in result["skipped"]:
        out.append(f"skipped {sk['peer']} ({sk['precision']}): {sk['reason']}")
    out.extend("note: " + n for n in result["notes"])
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="bench", help="a named config (conf/model/*.yaml) or 'bench'")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (one micro-batch)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per peer and precision")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset of the default")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; None: all usable cores")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: synchronized timing")
    p.add_argument("--seed", type=int, default=1234, help="weights and batch")
    p.add_argument("--mm-size", type=int, default=None, help="n of the n^3 reference torch.mm; "
                   "None: 4096 on CPU, 8192 on CUDA")
    p.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON here")
    return p.parse_args(argv)


def _split(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for flag, given, known in (("--peers", _split(args.peers), BUILDERS), ("--precisions", _split(args.precisions),
                                                                            PRECISIONS)):
        unknown = [x for x in given if x not in known]
        if unknown or not given:
            print(f"bench_train: {flag}: unknown or empty {unknown or given} (choices: {', '.join(known)})",
                  file=sys.stderr)
            return 2
    settings = BenchSettings(model=resolve_model(args.model), seq_len=args.seq_len, batch=args.batch,
                             steps=args.steps, warmup=args.warmup, precisions=_split(args.precisions),
                             peers=_split(args.peers), threads=args.threads, device=args.device, seed=args.seed,
                             mm_size=args.mm_size)
    result = run_benchmark(settings, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["results"] else 1


if __name__ == "__main__":
    sys.exit(main())
