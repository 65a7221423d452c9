"""OLMo's downstream tasks (real ``olmo_eval`` tasks, the real dolma2 tokenizer): the same metrics under every
layout, and the same as ``olmo_eval``'s own metric from transformers' logits on the exported weights."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import olmo_eval
import pytest
import torch

from megolmo.checkpoint.hf import megolmo_to_hf
from megolmo.config import load_config
from megolmo.errors import MegolmoConfigError
from megolmo.evaluation.assets import dolma2_tokenizer
from megolmo.trainer import Trainer
from tests.conftest import write_tokens
from tests.helpers import run_jobs

SEQ = 64
LIMIT = 8  # documents per task
# acc (copa), len_norm (arc_challenge), fast multiple choice: one position, a row per choice (5-shot, truncated)
TASKS = ["copa", "arc_challenge", "arc_easy_val_mc_5shot_fast"]
LAYOUT_TASKS = TASKS[:2]  # the layouts score the same rows the same way; the 5-shot task costs each rank seconds
MODEL = ["model.vocab_size=100352", "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=4",
         "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.eos_token_id=100257",
         "model.pad_token_id=100277"]
LAYOUTS = {  # name: (ranks, overrides)
    "tp2-sp": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "pp2": (2, ["parallel.pipeline=2"]),
    "pp2-interleaved": (2, ["parallel.pipeline=2", "parallel.virtual_pipeline=2"]),
    "dp2": (2, []),
    # the compositions, two axes at a time (a launch of 8 ranks costs ~30 s more here: each imports olmo_eval)
    "tp2-pp2-sp": (4, ["parallel.tensor=2", "parallel.pipeline=2", "parallel.sequence_parallel=true"]),
    "pp2-dp2": (4, ["parallel.pipeline=2"]),
    "tp2-sp-dp2": (4, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
}


@pytest.fixture(scope="module")
def tokenizer() -> Path:
    return dolma2_tokenizer()


@pytest.fixture(scope="module")
def job(tmp_path_factory, tokenizer) -> list[str]:
    base = tmp_path_factory.mktemp("downstream")
    tokens = write_tokens(base / "tokens.npy", 30_000, 100_278, dtype=np.uint32)
    held = write_tokens(base / "held.npy", 9 * SEQ, 100_278, seed=3, dtype=np.uint32)
    return [*MODEL, f"data.paths=[{tokens}]", "data.dtype=uint32", f"data.seq_len={SEQ}",
            "trainer.global_batch_size=8", "trainer.micro_batch_size=2", "trainer.max_steps=2", "optim.lr=3e-3",
            f"eval.tokenizer={tokenizer}", f"eval.downstream.tasks=[{','.join(TASKS)}]", f"eval.downstream.limit={LIMIT}",
            f"eval.lm.sets={{held: [{held}]}}", "parallel.timeout_s=60"]


def evaluations(run_dir: Path) -> dict[str, float]:
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    return {key: value for key, value in last.items() if key.startswith("eval/") and key != "eval/seconds"}


@pytest.fixture(scope="module")
def single(tmp_path_factory, job) -> Path:
    run_dir = tmp_path_factory.mktemp("downstream-single") / "run"
    Trainer(load_config([*job, f"trainer.run_dir={run_dir}", "trainer.plots=false"])).fit()
    return run_dir


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, job) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("downstream-layouts")
    run_jobs({name: (ranks, [*job, f"trainer.run_dir={base / name}", *extra,
                             f"eval.downstream.tasks=[{','.join(LAYOUT_TASKS)}]"])
              for name, (ranks, extra) in LAYOUTS.items()}, timeout_per_job=300)
    return {name: base / name for name in LAYOUTS}


def hf_metrics(hf_dir: Path, tokenizer: Path) -> dict[str, float]:
    """olmo_eval's own way: its collate, transformers' logits, ``ICLMetric.update`` and ``compute``."""
    from transformers import Olmo2ForCausalLM

    model = Olmo2ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tok = olmo_eval.HFTokenizer(str(tokenizer), eos_token_id=100257, pad_token_id=100277)
    results = {}
    for name in TASKS:
        task = olmo_eval.build_task(name, tok, model_ctx_len=SEQ - 1)
        samples = [s for s in task.samples if s["doc_id"] < LIMIT]
        metric = olmo_eval.ICLMetric(metric_type=task.metric_type)
        for start in range(0, len(samples), 6):
            batch = task.collate_fn(samples[start:start + 6])
            with torch.no_grad():
                metric.update(batch, model(input_ids=batch["input_ids"]).logits)
        results.update({f"eval/downstream/{name}/{k}": float(v) for k, v in metric.compute().items()})
    return results


def assert_same_metrics(got: dict[str, float], want: dict[str, float], label: str) -> None:
    assert sorted(got) == sorted(want), label
    for key, value in want.items():
        if key.rsplit("/", 1)[-1].startswith(("acc", "len_norm")):
            assert got[key] == value, f"{label}: {key}"
        else:
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), f"{label}: {key}"


def test_metrics_equal_olmo_evals_own_from_transformers_logits(single, tokenizer, tmp_path):
    megolmo_to_hf(single / "checkpoints" / "latest", tmp_path / "hf")
    ours = {k: v for k, v in evaluations(single).items() if k.startswith("eval/downstream/")}
    assert {k.split("/")[2] for k in ours} == set(TASKS)
    assert "eval/downstream/copa/acc_v1" in ours and "eval/downstream/arc_challenge/len_norm_v1" in ours
    assert_same_metrics(ours, hf_metrics(tmp_path / "hf", tokenizer), "transformers")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_gives_the_one_process_metrics(single, layouts, layout):
    want = {k: v for k, v in evaluations(single).items() if not k.startswith("eval/downstream/") or
            k.split("/")[2] in LAYOUT_TASKS}
    assert "eval/held/CE" in want and len(want) > 15
    assert_same_metrics(evaluations(layouts[layout]), want, layout)


def test_the_offline_evaluator_gives_the_in_loop_numbers(single, tokenizer, tmp_path, capsys):
    from megolmo.evaluation.offline import main

    output = tmp_path / "eval.json"
    assert main([str(single), "--tasks", *TASKS, "--tokenizer", str(tokenizer), "--limit", str(LIMIT),
                 "--output", str(output), "--", f"data.seq_len={SEQ}", "trainer.global_batch_size=4",
                 "trainer.micro_batch_size=4"]) == 0
    got = json.loads(output.read_text())["metrics"]
    want = {k: v for k, v in evaluations(single).items() if k.startswith("eval/downstream/")}
    assert_same_metrics(got, want, "offline")
    assert any(line.startswith("downstream/copa ") and " acc_v1 " in line for line in capsys.readouterr().out.splitlines())


@pytest.mark.parametrize("setting, message", [
    (["eval.downstream.tasks=[no_such_task]"], "eval.downstream.tasks: 'no_such_task' is not an olmo_eval task"),
    (["eval.tokenizer=null"], "eval.downstream.tasks needs eval.tokenizer"),
    (["eval.tokenizer=/nowhere/tokenizer.json"], "eval.tokenizer=/nowhere/tokenizer.json: no such file"),
    (["model.vocab_size=50000"], "has 100278 tokens, more than model.vocab_size=50000"),
])
def test_bad_settings_fail_at_start_up_naming_the_setting(job, tmp_path, setting, message):
    with pytest.raises(MegolmoConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Trainer(load_config([*job, f"trainer.run_dir={tmp_path}", *setting]))
