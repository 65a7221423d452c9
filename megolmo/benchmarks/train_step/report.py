"""Turning timed groups into results: one row per peer and group, the ratios and fractions that need
every group done, megolmo against the issue's goals, and the printed table."""
from __future__ import annotations

import statistics
from typing import Callable

from megolmo.benchmarks.train_step.settings import BenchSettings, Variant
from megolmo.benchmarks.train_step.timing import PeerRun

# OLMo-core's published training throughput per H100 at sequence 4096 (tokens/s per GPU).
PUBLISHED_TOKENS_PER_S = {("olmo2_1b", "bf16"): 55_000, ("olmo2_1b", "fp8"): 65_000,
                          ("olmo2_7b", "bf16"): 10_000, ("olmo2_7b", "fp8"): 13_000,
                          ("olmo2_13b", "bf16"): 4_600, ("olmo2_13b", "fp8"): 5_500}
PUBLISHED_SEQ_LEN = 4096
MM_GOAL = 0.6  # the goal: megolmo at >= 60% of the measured bf16 matmul rate
GIB = 2 ** 30


def published_tokens_per_s(model_name: str, precision: str, device: str, seq_len: int) -> int | None:
    """OLMo-core's figure for this run, where one applies (a GPU, sequence 4096, a published model)."""
    if not device.startswith("cuda") or seq_len != PUBLISHED_SEQ_LEN:
        return None
    return PUBLISHED_TOKENS_PER_S.get((model_name, precision))


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
    """One dtype's matmul rate, the best of before and after its groups; a warning if it moved a lot."""
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


def closing_notes(result: dict) -> list[str]:
    """The notes that explain the table's columns (and how fp8 rows are compared)."""
    notes = []
    if any(r["precision"] == "fp8" for r in result["results"]):
        notes.append("fp8 rows: MFU against the dense BF16 peak and of mm rate against the bf16 torch.mm "
                     "rate, as OLMo-core and Megatron report FP8 runs")
    notes.append("step s = median timed step (tokens/s, ratio and FLOP/s use it; on CUDA timed by CUDA events), "
                 "min s = fastest, cpu s = median process CPU seconds per step (all threads, spin-waits included; "
                 "steadier than wall-clock on a shared machine); ratio = megolmo tokens/s / peer tokens/s in the "
                 "same precision and ckpt (> 1: megolmo faster); of mm rate = achieved FLOP/s / FLOP/s of one "
                 "large torch.mm of the parameter dtype measured in this run (best of before/after); MFU = "
                 "achieved FLOP/s / the GPU's dense BF16 peak; peak GiB = resident (model, grads, optimizer "
                 "state) + a step's transient peak, what the peer needs alone (CUDA only)")
    return notes


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

