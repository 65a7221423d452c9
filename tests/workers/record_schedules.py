"""Every pipeline schedule's p2p traffic from one 4-rank launch, for replay under NCCL's rules.

``torchrun --nproc-per-node 4 tests/workers/record_schedules.py OUTDIR``: for each case of ``CASES``
(P = 4, and P = 2 with two data-parallel pipelines) the real ``TrainStep`` runs one step of 8
micro-batches with every p2p call recorded; each rank writes ``OUTDIR/<case>/rank{R}.json``.
"""
from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch

from megolmo.kernels.select import Fp8Settings, choose_kernels
from megolmo.model.config import ModelConfig
from megolmo.optim.adamw import AdamWSettings
from megolmo.parallel.state import initialize, shutdown
from megolmo.pipeline.layout import chunk_layer_ranges
from megolmo.step import ChunkSettings, StepSettings, build_train_step
from tests.nccl_p2p import Recorder

SCHEDULE_VIRTUAL = [("1f1b", 1), ("gpipe", 1), ("interleaved_1f1b", 2), ("interleaved_zero_bubble", 1),
                    ("interleaved_zero_bubble", 2), ("zbv", 2)]
CASES = [(schedule, p, v) for p in (2, 4) for schedule, v in SCHEDULE_VIRTUAL]
CFG = ModelConfig(name="record", vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=2, eos_token_id=0, pad_token_id=None)
GLOBAL_MICRO_BATCHES, SEQ = 8, 16


def case_name(schedule: str, pipeline: int, virtual: int) -> str:
    return f"{schedule}-p{pipeline}-v{virtual}"


def record(recorder: Recorder, out: Path, schedule: str, pipeline: int, virtual: int) -> None:
    ps = initialize(1, pipeline, 60)
    fp8 = Fp8Settings.from_mapping(None)
    kernels = choose_kernels(CFG.backend, "fp32", ps.device, fp8, False)
    chunks = ChunkSettings(CFG, torch.float32, kernels, fp8, 3, tuple(chunk_layer_ranges(8, pipeline, virtual)))
    micro_batches = GLOBAL_MICRO_BATCHES // ps.dp
    settings = StepSettings(AdamWSettings(1e-3), micro_batches, 1, SEQ, schedule=schedule, virtual=virtual)
    step = build_train_step(ps, settings, chunks)
    g = torch.Generator().manual_seed(ps.dp_rank)
    batches = [{"input_ids": torch.randint(0, CFG.vocab_size, (1, SEQ), generator=g),
                "label_mask": torch.ones(1, SEQ, dtype=torch.bool)} for _ in range(micro_batches)]
    recorder.restart(out / case_name(schedule, pipeline, virtual) / f"rank{ps.rank}.json")
    step.run(batches, GLOBAL_MICRO_BATCHES * (SEQ - 1), 1e-3)
    recorder.dump()


if __name__ == "__main__":
    torch.set_num_threads(1)
    recorder = Recorder(Path(sys.argv[1]) / "unused.json").install()  # before any P2POp is built
    for case in CASES:
        record(recorder, Path(sys.argv[1]), *case)
    gc.collect()
    shutdown()
