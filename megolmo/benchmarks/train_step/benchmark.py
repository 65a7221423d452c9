"""The benchmark itself: for each group (precision x activation checkpointing) build every peer, time
them in alternation, turn the times into rows, free the group; the matmul rate of each parameter dtype
is measured before its first group and after its last, so a busy machine shows."""
from __future__ import annotations

import platform
from dataclasses import asdict
from typing import Callable

import torch

from megolmo.benchmarks.train_step.peers import BUILDERS, Batch, PeerUnsupported, make_batch
from megolmo.benchmarks.train_step.report import closing_notes, finish_rows, group_rows, record_mm
from megolmo.benchmarks.train_step.settings import PRECISIONS, BenchSettings, Variant, default_threads
from megolmo.benchmarks.train_step.timing import PeerRun, allocated, measure_mm_flops, release
from megolmo.errors import MegolmoConfigError
from megolmo.flops import device_peak_flops, training_flops_per_token
from megolmo.kernels.select import FP8_RECIPES
from megolmo.model.config import ModelConfig


def _reason(exc: BaseException) -> str:
    """One line: our own errors already say what is wrong; others get their type in front."""
    own = isinstance(exc, (PeerUnsupported, MegolmoConfigError))
    text = (str(exc) if own else f"{type(exc).__name__}: {exc}").strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _skip(result: dict, peer: str, v: Variant, reason: str, log: Callable[[str], None]) -> None:
    """Record and log a peer that cannot take part in group ``v``."""
    result["skipped"].append({"peer": peer, "precision": v.precision, "activation_checkpointing": v.checkpointing,
                              "reason": reason})
    log(f"[{v.label}] {peer}: skipped ({reason})")


def build_group(cfg: ModelConfig, v: Variant, s: BenchSettings, device: torch.device, batch: Batch, result: dict,
                log: Callable[[str], None]) -> dict[str, PeerRun]:
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


def _check_settings(s: BenchSettings) -> None:
    """Refuse settings the run could not finish, before anything is built."""
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
    """Every group of ``s``: the result dict (settings, model, environment, matmul rates, rows, skipped
    peers, notes) that ``format_table`` prints and ``--json`` writes. ``log`` gets the progress lines."""
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
    result["notes"] += closing_notes(result)
    return result
