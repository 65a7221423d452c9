"""``python -m megolmo.ladder run`` (issue 19): the commands of each launcher, the batch fitted to the layout, and
a real local ladder that, run again, skips its finished run and resumes the unfinished one."""
from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml
from beaker import BeakerExperimentSpec

from megolmo.config import load_config
from megolmo.ladder.__main__ import main
from megolmo.ladder.plan import plan_custom, plan_run
from megolmo.ladder.run import SBATCH_SCRIPT, Launcher, beaker_argv, prepare
from megolmo.launch.beaker import plan as beaker_plan
from tests.conftest import write_tokens
from tests.helpers import ROOT

DATA = ["data.mix=olmo-mix-1124", "data.root=/data"]
SHAPES = {"a": {"hidden_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1, "vocab_size": 300},
          "b": {"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 1, "vocab_size": 300}}
TINY = ["--shapes", json.dumps(SHAPES), "--base-model", "tiny", "--multipliers", "0.02", "--seq-len", "64",
        "--batch", "8", "--lr", "3e-3", "--evals", "2", "--no-downstream"]


def commands(out: str) -> list[list[str]]:
    return [shlex.split(line) for line in out.splitlines() if not line.startswith(("#", "ladder:"))]


def test_the_olmo_batch_is_rounded_to_the_layout_and_keeps_its_tokens():
    run = plan_run("190M", 1.0, 4096)
    assert run.batch == 117
    job = prepare(run, ROOT / "runs", Launcher("slurm", 1, 8), DATA)  # 8 data-parallel ranks x micro-batch 4
    assert job.run.batch == 128 and "batch 117 -> 128 sequences (data-parallel 8 x micro-batch 4 x 4)" in job.batch_note
    assert 0 <= job.run.tokens - 20 * run.n < 128 * 4096 and job.run.warmup_steps == round(run.n / (128 * 4096))
    tp2 = prepare(run, ROOT / "runs", Launcher("slurm", 1, 8), [*DATA, "parallel.tensor=2",
                                                                  "trainer.micro_batch_size=2"])
    assert tp2.run.batch == 120  # 4 data-parallel ranks x 2
    cfg = load_config(tp2.training)
    assert (cfg.trainer.global_batch_size, cfg.trainer.max_steps, cfg.data.mix) == (120, tp2.run.max_steps,
                                                                                   "olmo-mix-1124")


def test_dry_run_local_and_slurm_commands(tmp_path, capsys):
    assert main(["run", *TINY, "--root", str(tmp_path), "--nproc-per-node", "2", "--override", "trainer.seed=7",
                 "--dry-run", "--", "data.paths=[/x.npy]"]) == 0
    out = capsys.readouterr().out
    local = commands(out)
    runs = plan_custom(SHAPES, [0.02], 64, "tiny", 8, 3e-3, False, 2)
    assert [c[:6] for c in local] == [[sys.executable, "-m", "torch.distributed.run", "--standalone",
                                       "--nproc-per-node=2", "-m"]] * 2
    assert [c[-1] for c in local] == [f"trainer.run_dir={tmp_path / r.name}" for r in runs]
    assert local[0][7:-1] == [*runs[0].overrides(), "trainer.seed=7", "data.paths=[/x.npy]"]
    assert "# a-0.02xC: starts; batch 8 sequences (data-parallel 2 x micro-batch 4 x 1)" in out
    assert not tmp_path.joinpath("a-0.02xC").exists()  # a dry run creates nothing

    assert main(["run", "--sizes", "190M", "--multipliers", "1", "--root", str(tmp_path), "--launcher", "slurm",
                 "--nodes", "2", "--launcher-args=--partition=gpu --time=48:00:00", "--dry-run", "--", *DATA]) == 0
    (sbatch,) = commands(capsys.readouterr().out)
    run_dir = tmp_path / "190M-1xC"
    assert sbatch[:10] == ["env", f"RUN_DIR={run_dir}", "sbatch", "--job-name=190M-1xC", "--nodes=2",
                           "--ntasks-per-node=8", "--gpus-per-node=8", f"--output={run_dir}/slurm-%j.out",
                           "--partition=gpu", "--time=48:00:00"]
    assert sbatch[10] == str(SBATCH_SCRIPT) and sbatch[-2:] == DATA
    assert "trainer.global_batch_size=128" in sbatch  # 117 on 16 ranks of 4: the nearest multiple of 64


def test_dry_run_beaker_prints_a_spec_per_run(capsys):
    args = "--cluster ai2/jupiter --image beaker://me/megolmo --mount weka://bucket:/weka/bucket --preemptible"
    assert main(["run", "--sizes", "190M", "--multipliers", "0.5,1", "--root", "/weka/bucket/ladder", "--launcher",
                 "beaker", "--nodes", "2", f"--launcher-args={args}", "--dry-run", "--", *DATA]) == 0
    out = capsys.readouterr().out
    documents = [d for d in re.split(r"(?m)^(?=# Beaker experiment spec)", out) if d.startswith("# Beaker")]
    assert len(documents) == 2
    specs = [BeakerExperimentSpec.from_json(yaml.safe_load(d)) for d in documents]
    assert [s.tasks[0].replicas for s in specs] == [2, 2]
    assert specs[1].description == "megolmo ladder run 190M-1xC (/weka/bucket/ladder/190M-1xC)"
    assert "trainer.run_dir=/weka/bucket/ladder/190M-1xC" in specs[1].tasks[0].command[-1]
    launcher = Launcher("beaker", 2, 8, tuple(shlex.split(args)))
    job = prepare(plan_run("190M", 1.0, 4096), Path("/weka/bucket/ladder"), launcher, DATA)
    submission, _ = beaker_plan(beaker_argv(job, launcher))
    stored = yaml.safe_load(next(v.value for v in submission.spec.tasks[0].env_vars if v.name == "MEGOLMO_CONFIG_YAML"))
    assert stored["trainer"]["global_batch_size"] == 128 and stored["data"]["mix"] == "olmo-mix-1124"


@pytest.mark.parametrize("bad, named", [
    (["--", "trainer.run_dir=/x"], "trainer.run_dir"),
    (["--", "trainer.max_step=3"], "trainer.max_step: unknown key"),
    (["--nproc-per-node", "3", "--", "parallel.tensor=2"], "--nodes 1 x --nproc-per-node 3: world size 3"),
    (["--nodes", "2"], "--nodes 2: --launcher local"),
    (["--sizes", "a"], "--sizes and --shapes"),
    (["--shapes", "{\"c\": {\"hidden_size\": 30, \"num_attention_heads\": 4}}"], "ladder size 'c': model.hidden_size")])
def test_a_bad_option_is_one_line_naming_it(tmp_path, capsys, bad, named):
    assert main(["run", *TINY, "--root", str(tmp_path), "--dry-run", *bad]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"megolmo: error: {named}"), err


def test_a_rerun_skips_the_finished_run_and_resumes_the_other(tmp_path, capsys, monkeypatch):
    """Run a stops at its last step (finished); b stops early at the same step (trainer.stop_at). Run again."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    a, b = plan_custom(SHAPES, [0.02], 64, "tiny", 8, 3e-3, False, 2)
    assert a.max_steps < b.max_steps
    tokens = write_tokens(tmp_path / "tokens.npy", 40_000, 300)
    root = tmp_path / "ladder"
    argv = ["run", *TINY, "--root", str(root), "--", f"data.paths=[{tokens}]", "data.dtype=uint16",
            "trainer.plots=false", "trainer.micro_batch_size=8"]
    assert main([*argv, f"trainer.stop_at={a.max_steps}"]) == 0
    out = capsys.readouterr().out
    assert f"# {a.name}: starts" in out and f"# {b.name}: starts" in out
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"# {a.name}: finished, skipped ({root / a.name})" in out
    assert f"# {b.name}: resumes from step {a.max_steps};" in out and len(commands(out)) == 1
    steps = [json.loads(line)["step"] for line in (root / b.name / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, b.max_steps + 1))
    assert (root / a.name / "launch.log").read_text().count("done:") == 1
    assert main(argv) == 0 and "starts" not in capsys.readouterr().out  # everything finished now
