"""Tensor and sequence parallelism on real gloo ranks, against single-process megolmo and transformers.

One 4-rank torchrun launch (tests/workers/tensor_parallel.py) runs every multi-rank case; the
tests here compare what it wrote with single-process references computed in this process.
Bad layouts are launched through the real entry point.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from collections import Counter

import pytest
import torch

from megolmo.benchmarks.tensor_parallel import analytic_block_collectives, analytic_step_collectives
from megolmo.config import load_config
from megolmo.model.init import initialize_parameters
from megolmo.model.olmo2 import Olmo2ForCausalLM, shift_targets
from megolmo.errors import MegolmoConfigError
from megolmo.trainer import Trainer, check_model_layout
from tests.conftest import write_tokens
from tests.helpers import ROOT, free_port
from tests.workers.tensor_parallel import (CFG, HF_BATCH, SEQ_LEN, STEPS, TRAIN_LAYOUTS, Z_WEIGHT,
                                           bf16_float8_model, hf_batch, load_global, random_global_weights,
                                           train_overrides)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp")
    write_tokens(path / "tokens.npy", 40_000, CFG.vocab_size)
    return path


@pytest.fixture(scope="module")
def results(workdir) -> dict:
    """Run every multi-rank case in one 4-rank launch (60 s process-group timeout: a bug fails, never hangs)."""
    out = workdir / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port", str(free_port()),
           "-m", "tests.workers.tensor_parallel", str(out), str(workdir / "tokens.npy")]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=280)
    assert proc.returncode == 0, proc.stderr[-6000:]
    data = json.loads((out / "results.json").read_text())
    data["dir"] = out
    return data


@pytest.fixture(scope="module")
def reference(workdir) -> list:
    """TP=1, one process: the trainer on the same config, seed and data."""
    trainer = Trainer(load_config(train_overrides(str(workdir / "tokens.npy"), str(workdir / "ref"), 1, False)))
    return [trainer.train_step(step) for step in range(STEPS)]


def _tally(rows) -> Counter:
    return Counter({(kind, numel, elem): count for kind, numel, elem, count in rows})


# -- 1. layout parity ------------------------------------------------------------------------------
@pytest.mark.parametrize("tp, sp", TRAIN_LAYOUTS, ids=[f"tp{t}-sp{int(s)}" for t, s in TRAIN_LAYOUTS])
def test_ten_steps_match_single_process(results, reference, tp, sp):
    run = results["train"][f"{tp}_{int(sp)}"]
    assert run["dp"] == 4 // tp  # TP=1 and 2 also exercise data parallelism beside TP
    assert run["padded_rows"] % (128 * tp) == 0 and run["padded_rows"] > CFG.vocab_size
    ref_loss = [r.loss for r in reference]
    assert run["loss"][0] == pytest.approx(ref_loss[0], rel=1e-5)
    for step, (ours, ref) in enumerate(zip(run["loss"], ref_loss), start=1):
        assert ours == pytest.approx(ref, rel=1e-4), f"step {step}"
    assert run["grad_norm"] == pytest.approx([r.grad_norm for r in reference], rel=1e-4)
    assert run["z_loss"] == pytest.approx([r.z_loss for r in reference], rel=1e-4)
    assert ref_loss[-1] < ref_loss[0] - 0.05  # it trains


def test_bf16_tp2_with_sp_tracks_single_process_bf16(results, workdir, reference):
    """bf16 sums in another order across TP ranks, so the match is to bf16 accuracy, not 1e-4."""
    single = Trainer(load_config(train_overrides(str(workdir / "tokens.npy"), str(workdir / "ref_bf16"), 1, False)
                                    + ["precision=bf16"]))
    single_losses = [single.train_step(step).loss for step in range(STEPS)]
    run = results["train_bf16"]
    assert run["loss"][0] == pytest.approx(single_losses[0], rel=2e-3)
    assert run["loss"] == pytest.approx(single_losses, rel=1e-2)
    assert run["loss"] == pytest.approx([r.loss for r in reference], rel=2e-2)  # and bf16 stays near fp32


def test_initial_weights_do_not_depend_on_tp(results):
    single = Olmo2ForCausalLM(CFG)
    initialize_parameters(single, 7, CFG.initializer_range)  # trainer.seed=7 in the worker's config
    expected = {name: p.detach().narrow(0, 0, p.shard_spec.global_shape[0]) if p.shard_spec.padded_size else p.detach()
                for name, p in single.named_parameters()}
    for key in ("2_0", "2_1", "4_0", "4_1"):
        gathered = torch.load(results["dir"] / f"init_{key}.pt")
        assert gathered.keys() == expected.keys()
        for name, value in expected.items():
            assert torch.equal(gathered[name], value), f"TP layout {key}: {name}"


# -- 3. transformers at TP=2 -----------------------------------------------------------------------
def _hf_model():
    from transformers import Olmo2ForCausalLM as HFOlmo2

    from megolmo.model.hf_config import hf_config
    hf = HFOlmo2(hf_config(CFG)).eval()
    hf.load_state_dict(random_global_weights(CFG), strict=True)
    return hf


@pytest.mark.parametrize("sp", [False, True], ids=["sp0", "sp1"])
def test_tp2_loss_matches_transformers(results, sp):
    ours = results["hf"][f"sp{int(sp)}"]
    ids = hf_batch()
    with torch.no_grad():
        out = _hf_model()(ids, labels=ids)
    assert ours["ce"] == pytest.approx(out.loss.item(), rel=1e-5)
    assert ours["ce"] > 4.0  # non-trivial weights: not the uniform log(300) = 5.70 of a near-zero init
    lse = torch.logsumexp(out.logits[:, :-1].double(), dim=-1)
    n = HF_BATCH[0] * (HF_BATCH[1] - 1)
    assert ours["z"] == pytest.approx(lse.square().sum().item() / n, rel=1e-5)
    saved = torch.load(results["dir"] / f"hf_sp{int(sp)}.pt")
    torch.testing.assert_close(saved["logits"], out.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sp", [False, True], ids=["sp0", "sp1"])
def test_tp2_gradients_match_single_process(results, sp):
    """Gradients of CE + z-loss gathered from TP=2 (QK-norm's cross-rank statistic, vocab-parallel loss,
    SP norm-weight sums included) equal one process's; padding rows of embedding and head get none."""
    single = Olmo2ForCausalLM(CFG)
    load_global(single, random_global_weights(CFG))
    ids = hf_batch()
    targets, mask = shift_targets(ids, torch.ones_like(ids, dtype=torch.bool))
    ce, z = single.loss_sums(ids, targets, mask)
    ((ce + Z_WEIGHT * z) / mask.sum()).backward()
    saved = torch.load(results["dir"] / f"hf_sp{int(sp)}.pt")["grads"]
    for name, p in single.named_parameters():
        grad = p.grad[: CFG.vocab_size] if p.shard_spec.padded_size else p.grad
        torch.testing.assert_close(saved[name], grad, rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert results["hf"][f"sp{int(sp)}"]["padding_grad_max"] == 0.0


# -- 2. communication ------------------------------------------------------------------------------
@pytest.mark.parametrize("tp, sp", [(2, False), (2, True), (4, False), (4, True)],
                         ids=["tp2-sp0", "tp2-sp1", "tp4-sp0", "tp4-sp1"])
def test_block_collectives(results, tp, sp):
    """Per block and pass: two hidden-size all-reduces (SP: two all-gathers + two reduce-scatters) and the
    two QK-norm statistic all-reduces of batch x seq fp32 elements (q's and k's)."""
    b, s, h = 2, SEQ_LEN, CFG.hidden_size
    if sp:
        expected = Counter({("all_gather", b * s * h, 4): 2, ("reduce_scatter", b * s * h, 4): 2,
                            ("all_reduce", b * s, 4): 2})
    else:
        expected = Counter({("all_reduce", b * s * h, 4): 2, ("all_reduce", b * s, 4): 2})
    counted = results["block"][f"{tp}_{int(sp)}"]
    assert counted["other_groups"] == 0
    for phase in ("forward", "backward"):
        assert _tally(counted[phase]) == expected, phase
        assert _tally(counted[phase]) == analytic_block_collectives(CFG, b, s, tp, sp)


@pytest.mark.parametrize("tp, sp", [(2, False), (2, True), (4, False), (4, True)],
                         ids=["tp2-sp0", "tp2-sp1", "tp4-sp0", "tp4-sp1"])
def test_training_step_collectives(results, tp, sp):
    """A whole training step: blocks as above, plus embedding, LM head input, the vocab-parallel loss's
    max and sums (never the logits), the SP norm-weight gradient sums and the grad-norm scalar."""
    run = results["train"][f"{tp}_{int(sp)}"]
    measured = _tally(run["tp_collectives"])
    expected = analytic_step_collectives(CFG, 2, SEQ_LEN, run["micro_batches"], tp, sp)
    if run["dp"] == 1:  # the TP group is the world: the step's guard agreement (two flags, float64) runs on it
        expected[("all_reduce_max", 2, 8)] += 1
    assert measured == expected
    padded_vocab = run["padded_rows"]
    assert all(numel < 2 * SEQ_LEN * padded_vocab // tp for _, numel, _ in measured)  # no logits gathered
    b, s, h, L, m = 2, SEQ_LEN, CFG.hidden_size, CFG.num_hidden_layers, run["micro_batches"]
    hidden = ("reduce_scatter", b * s * h, 4) if sp else ("all_reduce", b * s * h, 4)
    assert expected[hidden] == m * (4 * L + 2)


# -- 4. bad layouts --------------------------------------------------------------------------------
def tiny(tmp_path, tokens: str, *extra: str) -> list[str]:
    return [f"data.paths=[{tokens}]", "data.dtype=uint16", "data.seq_len=64", "model.vocab_size=300",
            "trainer.global_batch_size=8", "trainer.micro_batch_size=4", "trainer.max_steps=3",
            f"trainer.run_dir={tmp_path / 'run'}", "parallel.timeout_s=60", *extra]


BAD_LAYOUTS = {  # launched as real ranks: a bad world size (found at start-up) and a bad model (by the trainer)
    "world": (["parallel.tensor=4"], "world size 2 is not divisible by parallel.tensor=4"),
    "heads": (["parallel.tensor=2", "model.hidden_size=96", "model.num_attention_heads=3",
               "model.num_key_value_heads=3"], "model.num_attention_heads=3 is not divisible by parallel.tensor=2"),
}
MODEL_LAYOUT_ERRORS = {  # the trainer's other TP rules, which the "heads" launch shows it checks on every rank
    "kv-heads": ({"num_key_value_heads": 1}, False, 64,
                 "model.num_key_value_heads=1 is not divisible by parallel.tensor=2"),
    "intermediate": ({"intermediate_size": 383}, False, 64,
                     "model.intermediate_size=383 is not divisible by parallel.tensor=2"),
    "seq-len": ({}, True, 63, "data.seq_len=63 is not divisible by parallel.tensor=2"),
}


@pytest.mark.parametrize("name", list(MODEL_LAYOUT_ERRORS))
def test_model_layout_rules_name_the_key(name):
    changes, sequence_parallel, seq_len, message = MODEL_LAYOUT_ERRORS[name]
    with pytest.raises(MegolmoConfigError, match=re.escape(message)):
        check_model_layout(dataclasses.replace(CFG, **changes), 2, seq_len, sequence_parallel)


@pytest.fixture(scope="module")
def bad_layout_runs(tmp_path_factory) -> dict:
    """Every bad layout launched at once, two ranks each, started by hand (as srun or mpirun would) so
    that each rank's own exit status is seen."""
    root = tmp_path_factory.mktemp("bad")
    tokens = write_tokens(root / "tokens.npy", 5_000, 300)
    procs = {}
    for name, (overrides, _) in BAD_LAYOUTS.items():
        port = str(free_port())
        for rank in range(2):
            env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "WORLD_SIZE": "2",
                   "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
            cmd = [sys.executable, "-m", "megolmo.train", *tiny(root / name, tokens, *overrides)]
            procs[name, rank] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                                 stderr=subprocess.PIPE, text=True)
    outputs = {key: p.communicate(timeout=180) for key, p in procs.items()}
    return {"root": root, "runs": {key: (procs[key].returncode, err) for key, (_, err) in outputs.items()}}


@pytest.mark.parametrize("name", list(BAD_LAYOUTS))
def test_bad_layout_is_one_line_and_every_rank_exits(bad_layout_runs, name):
    """Each rank detects the bad layout itself, before creating a process group or allocating the
    model, and exits with status 2; rank 0 prints the one-line reason."""
    message = BAD_LAYOUTS[name][1]
    runs = [bad_layout_runs["runs"][name, rank] for rank in range(2)]
    assert [code for code, _ in runs] == [2, 2], [err[-2000:] for _, err in runs]
    errors = [line for _, err in runs for line in err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("megolmo: error:") and message in errors[0], errors
    assert not (bad_layout_runs["root"] / name / "run").exists()  # failed before anything was written


def test_vocab_parallel_loss_math_single_process():
    """The vocab-parallel CE at one rank equals torch's cross-entropy and logsumexp, padding excluded."""
    from megolmo.parallel.cross_entropy import vocab_parallel_cross_entropy
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 12, generator=g, requires_grad=True)
    targets = torch.randint(0, 9, (10,), generator=g)
    ce, lse = vocab_parallel_cross_entropy(logits, targets, 0, 9)
    ref_ce = torch.nn.functional.cross_entropy(logits[:, :9], targets, reduction="none")
    torch.testing.assert_close(ce, ref_ce)
    torch.testing.assert_close(lse, torch.logsumexp(logits[:, :9], -1))
    (ce.sum() + 0.1 * lse.square().sum()).backward()
    ref = logits.detach().clone().requires_grad_()
    ref_loss = torch.nn.functional.cross_entropy(ref[:, :9], targets, reduction="sum") + \
        0.1 * torch.logsumexp(ref[:, :9], -1).square().sum()
    ref_loss.backward()
    torch.testing.assert_close(logits.grad, ref.grad)
    assert math.isfinite(ce.sum().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_parallel_loss_in_chunks_equals_one_chunk_and_saves_no_fp32_logits(dtype):
    """Rows are processed a chunk at a time (fp32 work bounded by ``chunk_elements``): the result does not
    depend on the chunking, and backward keeps the logits in their own dtype, not an fp32 softmax."""
    from megolmo.parallel.cross_entropy import vocab_parallel_cross_entropy
    g = torch.Generator().manual_seed(2)
    logits = (3 * torch.randn(37, 20, generator=g)).to(dtype)
    targets = torch.randint(0, 17, (37,), generator=g)
    results, saved = [], []
    for chunk_elements in (10_000, 45):  # one chunk; chunks of 2 rows (the last one short)
        x = logits.clone().requires_grad_()
        sizes = []

        def pack(t):
            sizes.append((t.dtype, t.numel()))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ce, lse = vocab_parallel_cross_entropy(x, targets, 0, 17, chunk_elements=chunk_elements)
        (ce.sum() + 0.1 * lse.square().sum()).backward()
        assert torch.equal(x.detach(), logits)  # the input is never written
        results.append((ce, lse, x.grad))
        saved.append(sizes)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    assert results[0][2][:, 17:].abs().max() == 0
    logits_sized = [t for t, n in saved[1] if n == logits.numel()]
    assert logits_sized == [dtype]  # only the logits themselves, in their dtype


def test_consumed_fp32_logits_become_the_softmax_and_give_the_same_loss():
    """fp32 logits that nothing else reads are overwritten instead of copied: same results as the
    recomputing path, padding gradient zero."""
    from megolmo.parallel.cross_entropy import vocab_parallel_cross_entropy
    g = torch.Generator().manual_seed(3)
    logits = 3 * torch.randn(37, 20, generator=g)
    targets = torch.randint(0, 17, (37,), generator=g)
    results = []
    for consume in (False, True):
        x = logits.clone().requires_grad_()
        y = x * 1.0  # the head's output: a fresh tensor the loss may consume
        ce, lse = vocab_parallel_cross_entropy(y, targets, 0, 17, consume_logits=consume)
        (ce.sum() + 0.1 * lse.square().sum()).backward()
        results.append((ce, lse, x.grad))
    torch.testing.assert_close(results[0], results[1])
    assert results[1][2][:, 17:].abs().max() == 0


def test_single_rank_loss_sums_equal_the_vocab_parallel_loss():
    """The plain-ops loss that ``trainer.compile`` compiles at TP=1: same masked sums and gradients,
    padding columns excluded (their gradient is exactly zero)."""
    from megolmo.parallel.cross_entropy import single_rank_loss_sums, vocab_parallel_cross_entropy
    g = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(40, 16, generator=g)
    targets = torch.randint(0, 13, (40,), generator=g)
    mask = torch.rand(40, generator=g) < 0.6
    plain = logits.clone().requires_grad_()
    ce_sum, z_sum = single_rank_loss_sums(plain, targets, mask, 13)
    (ce_sum + 0.1 * z_sum).backward()
    ref = logits.clone().requires_grad_()
    ce, lse = vocab_parallel_cross_entropy(ref, targets, 0, 13)
    ref_ce, ref_z = (ce * mask).sum(), (lse.square() * mask).sum()
    (ref_ce + 0.1 * ref_z).backward()
    torch.testing.assert_close((ce_sum, z_sum), (ref_ce, ref_z))
    torch.testing.assert_close(plain.grad, ref.grad)
    assert plain.grad[:, 13:].abs().max() == 0


def test_analytic_scheme_bytes_and_table():
    """The benchmark's formula: SP moves the same wire bytes as the all-reduces it replaces, and the
    table prints measured/analytic ratios."""
    from megolmo.benchmarks.tensor_parallel import format_table, tally_bytes, wire_bytes
    assert wire_bytes("all_reduce", 100, 4) == 150 and wire_bytes("all_gather", 100, 4) == 75
    assert wire_bytes("reduce_scatter", 100, 1) == 0
    plain = analytic_step_collectives(CFG, 2, SEQ_LEN, 3, 4, False)
    seq = analytic_step_collectives(CFG, 2, SEQ_LEN, 3, 4, True)
    norm_grads = wire_bytes("all_reduce", 4 * CFG.hidden_size, 4) * (2 * CFG.num_hidden_layers + 1)
    assert tally_bytes(seq, 4)[1] == pytest.approx(tally_bytes(plain, 4)[1] + norm_grads)
    assert analytic_step_collectives(CFG, 2, SEQ_LEN, 3, 1, True) == Counter()
    result = {"tp": 2, "sequence_parallel": True, "step_s": 0.5, "calls": 64, "analytic_calls": 64,
              "measured_payload_bytes": 2e6, "analytic_payload_bytes": 2e6, "payload_ratio": 1.0,
              "measured_wire_bytes": 1e6, "analytic_wire_bytes": 1e6, "wire_ratio": 1.0, "losses": [5.0]}
    base = {**result, "tp": 1, "sequence_parallel": False, "step_s": 1.0, "payload_ratio": None, "wire_ratio": None}
    table = format_table({"settings": {"model": CFG.to_dict(), "micro_batch": 2, "seq_len": 48, "global_batch": 2,
                                       "precision": "fp32", "threads": 1, "steps": 3}, "results": [base, result]})
    assert "64/64" in table and table.splitlines()[-1].split()[:4] == ["2", "on", "0.500", "0.50"]


# -- FP8 GEMMs (torchao float8) inside the tensor-parallel sublayers -----------------------------------
@pytest.mark.parametrize("sp", [False, True], ids=["sp0", "sp1"])
def test_tp2_float8_matches_single_process_float8(results, sp):
    """Each rank scales its own shards, so TP=2 is not bit-equal to TP=1 in FP8, but it must agree to FP8
    accuracy, and far better than FP8 agrees with nothing (the gradients of another batch)."""
    ids = hf_batch()
    targets, mask = shift_targets(ids, torch.ones_like(ids, dtype=torch.bool))
    model = bf16_float8_model(None, random_global_weights(CFG))
    ce_sum, _ = model.loss_sums(ids, targets, mask)
    (ce_sum / mask.sum()).backward()
    assert results["float8"][f"sp{int(sp)}"] == pytest.approx((ce_sum / mask.sum()).item(), rel=2e-3)
    saved = torch.load(results["dir"] / f"float8_sp{int(sp)}.pt")
    for name, p in model.named_parameters():
        spec = p.shard_spec
        grad = p.grad.float() if spec.dim is None else p.grad.float().narrow(spec.dim, 0, spec.global_shape[spec.dim])
        cosine = torch.nn.functional.cosine_similarity(saved[name].flatten(), grad.flatten(), dim=0)
        assert cosine > 0.9, name
