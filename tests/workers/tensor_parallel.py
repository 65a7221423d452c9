"""The multi-rank half of tests/test_tensor_parallel.py: run by torchrun with 4 real gloo ranks, it runs
every tensor-parallel case in one launch (a launch costs seconds) and writes what it saw into OUTDIR;
the pytest side compares that with single-process megolmo and transformers.

    python -m torch.distributed.run --nproc-per-node 4 -m tests.workers.tensor_parallel OUTDIR

Cases (ranks 0..3; TP=2 runs on the pairs {0,1} and {2,3}, TP=4 on all four):
* ``hf``: TP=2, sequence parallelism off and on, the model holding given global weights: loss, z-loss,
  full logits and the gathered gradients on one batch.
* ``float8``: TP=2, SP off and on, the same weights in BF16 with torchao float8 GEMMs: loss and the
  gathered gradients on one batch.
* ``block``: the collectives of one block's forward and backward, TP=2 and 4, SP off and on.
* ``train_bf16``: the real Trainer for 10 steps with TP=2, SP on, in bf16.
* ``train``: the real Trainer for 10 steps with TP=1 (DP=4), TP=2 (DP=2) and TP=4, SP off and on: losses,
  grad norms, the gathered initial weights and the tensor-parallel collectives of the first step.

No pytest functions live here; the module name only follows the suite's naming.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megolmo.benchmarks.tensor_parallel import CollectiveCounter, tally
from megolmo.model.config import ModelConfig
from megolmo.model.init import initialize_parameters, local_slice_of
from megolmo.model.olmo2 import Olmo2ForCausalLM, shift_targets
from megolmo.parallel.layers import TensorParallel

# GQA (8 query heads in 4 groups of 2), vocabulary 300: not a multiple of 128 x TP for any TP.
CFG = ModelConfig(name="tp-test", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=4, eos_token_id=0, pad_token_id=None)
SEQ_LEN = 48
STEPS = 10
TRAIN_LAYOUTS = [(1, False), (2, False), (2, True), (4, False), (4, True)]
BLOCK_LAYOUTS = [(2, False), (2, True), (4, False), (4, True)]
HF_BATCH = (2, 24)
Z_WEIGHT = 1e-2  # a large z-loss weight, so the logsumexp gradient is visible in the gradient check


def train_overrides(tokens: str, run_dir: str, tp: int, sp: bool) -> list[str]:
    """The layout-parity training run (also run by the pytest process as the single-process reference)."""
    c = CFG
    return [f"model.vocab_size={c.vocab_size}", f"model.hidden_size={c.hidden_size}",
            f"model.intermediate_size={c.intermediate_size}", f"model.num_hidden_layers={c.num_hidden_layers}",
            f"model.num_attention_heads={c.num_attention_heads}",
            f"model.num_key_value_heads={c.num_key_value_heads}", f"data.paths=[{tokens}]", "data.dtype=uint16",
            f"data.seq_len={SEQ_LEN}", "trainer.global_batch_size=8", "trainer.micro_batch_size=2",
            f"trainer.max_steps={STEPS}", "trainer.seed=7", "optim.lr=3e-3", "optim.warmup_steps=2",
            f"trainer.run_dir={run_dir}", f"parallel.tensor={tp}", f"parallel.sequence_parallel={str(sp).lower()}",
            "parallel.timeout_s=60"]


def random_global_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Global (unpadded) weights with visibly non-trivial values: matrices ~ N(0, 0.1), norm weights
    ~ 1 + N(0, 0.2), so QK-norm and residual norm weights differ per channel."""
    reference = Olmo2ForCausalLM(cfg, device="meta")
    out = {}
    for i, (name, p) in enumerate(reference.named_parameters()):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        shape = p.shard_spec.global_shape
        value = torch.randn(shape, generator=g)
        out[name] = 1.0 + 0.2 * value if len(shape) == 1 else 0.1 * value
    return out


def hf_batch() -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, HF_BATCH, generator=torch.Generator().manual_seed(11))


@torch.no_grad()
def load_global(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        p.copy_(local_slice_of(weights[name], p.shard_spec))


def gather_global(model: torch.nn.Module, tp: TensorParallel, grads: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter's (or gradient's) global tensor, padding rows removed."""
    out = {}
    for name, p in model.named_parameters():
        t = (p.main_grad if hasattr(p, "main_grad") else p.grad) if grads else p
        t = t.detach().float().contiguous()
        spec = p.shard_spec
        if spec.dim is not None and tp.size > 1:
            parts = [torch.empty_like(t) for _ in range(tp.size)]
            dist.all_gather(parts, t, group=tp.group)
            t = torch.cat(parts, dim=spec.dim)
        if spec.dim is not None:
            t = t.narrow(spec.dim, 0, spec.global_shape[spec.dim])
        out[name] = t.clone()
    return out


def padding_grad_max(model: Olmo2ForCausalLM) -> float:
    """Largest gradient on a padding row of the embedding or head (should be exactly zero)."""
    worst = 0.0
    for module in (model.model.embed_tokens, model.lm_head):
        w = module.weight
        start = module.vocab_start
        valid = max(0, min(w.shape[0], CFG.vocab_size - start))
        if valid < w.shape[0]:
            worst = max(worst, w.grad[valid:].abs().max().item())
    return worst


def tp_groups(world: int, rank: int) -> dict[int, TensorParallel]:
    """Group handles per TP size (every rank creates every group, as torch requires)."""
    groups = {1: None}
    for size in (2, 4):
        if size > world:
            continue
        for first in range(0, world, size):
            g = dist.new_group(list(range(first, first + size)))
            if first <= rank < first + size:
                groups[size] = g
    return groups


def loss_and_full_gradients(model: Olmo2ForCausalLM, tp: TensorParallel, z_weight: float
                            ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Mean CE and z-loss on ``hf_batch()``, and every parameter's global gradient after backward."""
    ids = hf_batch()
    targets, mask = shift_targets(ids, torch.ones_like(ids, dtype=torch.bool))
    ce_sum, z_sum = model.loss_sums(ids, targets, mask)
    n = mask.sum()
    ((ce_sum + z_weight * z_sum) / n).backward()
    grads = gather_global(model, tp, grads=True)
    # Norm weights saw only a sequence shard under SP: sum their gradients as the trainer does.
    for name, p in model.named_parameters():
        if getattr(p, "sequence_parallel", False):
            dist.all_reduce(grads[name], group=tp.group)
    return ce_sum / n, z_sum / n, grads


def case_hf(groups, rank: int, out: Path) -> dict:
    result = {}
    weights = random_global_weights(CFG)
    for sp in (False, True):
        tp = TensorParallel(groups[2], sp)
        model = Olmo2ForCausalLM(CFG, tp)
        load_global(model, weights)
        ce, z, grads = loss_and_full_gradients(model, tp, Z_WEIGHT)
        with torch.no_grad():
            logits = model.full_logits(hf_batch())
        if rank == 0:
            torch.save({"grads": grads, "logits": logits}, out / f"hf_sp{int(sp)}.pt")
        result[f"sp{int(sp)}"] = {"ce": ce.item(), "z": z.item(), "padding_grad_max": padding_grad_max(model)}
    return result


def bf16_float8_model(tp: TensorParallel, weights: dict[str, torch.Tensor]) -> Olmo2ForCausalLM:
    """The model in BF16 with torchao float8 GEMMs in every block (the torch back-end's FP8 path)."""
    from megolmo.kernels.float8 import convert_to_float8

    model = Olmo2ForCausalLM(CFG, tp)
    load_global(model, weights)
    for p in model.parameters():
        p.data = p.data.bfloat16()
    convert_to_float8(model, frozenset())
    return model


def case_float8(groups, rank: int, out: Path) -> dict:
    """TP=2, SP off and on, float8 GEMMs on each rank's shards: loss and gathered gradients."""
    result = {}
    weights = random_global_weights(CFG)
    for sp in (False, True):
        tp = TensorParallel(groups[2], sp)
        ce, _, grads = loss_and_full_gradients(bf16_float8_model(tp, weights), tp, 0.0)
        if rank == 0:
            torch.save(grads, out / f"float8_sp{int(sp)}.pt")
        result[f"sp{int(sp)}"] = ce.item()
    return result


def case_block(groups, rank: int) -> dict:
    result = {}
    one_layer = ModelConfig(**{**CFG.to_dict(), "num_hidden_layers": 1})
    batch = 2
    for size, sp in BLOCK_LAYOUTS:
        tp = TensorParallel(groups[size], sp)
        model = Olmo2ForCausalLM(one_layer, tp)
        initialize_parameters(model, 3, 0.02)
        block = model.model.layers["0"]
        seq = SEQ_LEN // size if sp else SEQ_LEN
        x = torch.randn(batch, seq, CFG.hidden_size, generator=torch.Generator().manual_seed(tp.rank),
                        requires_grad=True)
        counter = CollectiveCounter()
        with counter:
            with counter.label("forward"):
                y = block(x)
            with counter.label("backward"):
                y.backward(torch.ones_like(y))
        ranks = tuple(dist.get_process_group_ranks(tp.group))
        result[f"{size}_{int(sp)}"] = {
            phase: [[*k, c] for k, c in tally(counter.select(ranks, phase)).items()]
            for phase in ("forward", "backward")}
        result[f"{size}_{int(sp)}"]["other_groups"] = len(counter.records) - len(counter.select(ranks))
    return result


def case_train_bf16(out: Path, tokens: str) -> dict:
    """TP=2 with SP (DP=2) in bf16: the layout GPU runs use, against the bf16 single-process run."""
    from megolmo.trainer import Trainer
    from megolmo.config import load_config

    trainer = Trainer(load_config(train_overrides(tokens, str(out / "run_bf16"), 2, True) + ["precision=bf16"]))
    records = [trainer.train_step(step) for step in range(STEPS)]
    return {"loss": [r.loss for r in records], "grad_norm": [r.grad_norm for r in records]}


def case_train(rank: int, out: Path, tokens: str) -> dict:
    from megolmo.trainer import Trainer
    from megolmo.config import load_config

    result = {}
    for size, sp in TRAIN_LAYOUTS:
        key = f"{size}_{int(sp)}"
        trainer = Trainer(load_config(train_overrides(tokens, str(out / f"run_{key}"), size, sp)))
        model = trainer.chunks[0]  # PP=1: one chunk holding the whole model
        tp = model.tp
        initial = gather_global(model, tp)
        if rank == 0 and size > 1:
            torch.save(initial, out / f"init_{key}.pt")
        tp_ranks = tuple(dist.get_process_group_ranks(tp.group)) if tp.size > 1 else (rank,)
        records, first_step = [], []
        for step in range(STEPS):
            if step == 0:
                with CollectiveCounter() as counter:
                    records.append(trainer.train_step(step))
                first_step = [[*k, c] for k, c in tally(counter.select(tp_ranks)).items()]
            else:
                records.append(trainer.train_step(step))
        result[key] = {"loss": [r.loss for r in records], "grad_norm": [r.grad_norm for r in records],
                       "z_loss": [r.z_loss for r in records], "tp_collectives": first_step,
                       "dp": trainer.ps.dp, "micro_batches": trainer.loader.num_micro_batches,
                       "padded_rows": model.lm_head.weight.shape[0] * size}
    return result


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    tokens = argv[1]
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    groups = tp_groups(world, rank)
    results = {"hf": case_hf(groups, rank, out), "float8": case_float8(groups, rank, out),
               "block": case_block(groups, rank),
               "train": case_train(rank, out, tokens), "train_bf16": case_train_bf16(out, tokens)}
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
