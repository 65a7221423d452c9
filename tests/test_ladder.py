"""Task-scaling ladders (issue 19): N counting, the plan's rules, both fit steps on synthetic ladders with
known parameters, OLMo's CSV export and megolmo run directories as inputs, and the CLI round trip."""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from megolmo.errors import MegolmoConfigError
from megolmo.ladder.__main__ import main
from megolmo.ladder.fit import fit_ladder, fit_step1, step1_loss, step2_accuracy, step2_points
from megolmo.ladder.inputs import LadderRun, read_input
from megolmo.ladder.plan import plan, plan_run
from megolmo.ladder.sizes import LADDER_SHAPES, ladder_config, ladder_params, target_config
from megolmo.units import parse_count
from megolmo.ladder.tasks import TASKS, eval_labels
from tests.helpers import ROOT

SAMPLE = ROOT / "tests" / "data" / "ladder" / "190M-1xC.csv"  # OLMo's 190M ladder run at 1 x Chinchilla
TRUE_STEP1 = np.array([800.0, 0.35, 2000.0, 0.35, 0.6])  # A, alpha, B, beta, E: bpb from ~4 down to ~1.1
TRUE_STEP2 = np.array([0.73, -4.0, 1.3, 0.27])  # a, k, L0, b: the ladder sits mostly on the lower half
TARGET_N, TARGET_D = 6_887_575_552, 4e12  # OLMo 2 7B at 4T: beyond every ladder run in N and D


def test_ladder_n_reproduces_olmo_published_counts():
    published = [190_354_176, 371_262_464, 597_382_464, 758_220_288, 1_279_395_840, 3_169_537_280]
    assert [ladder_params(ladder_config(size)) for size in LADDER_SHAPES] == published
    assert ladder_params(target_config("7B")) == 6_887_575_552
    assert ladder_params(target_config("13B")) == 13_202_396_160


def test_batch_lr_warmup_and_duration_rules():
    run = plan_run("190M", 1.0, 2048)
    assert run.batch == round(160 * (190_354_176 / 108e6) ** (2 / 3)) == 233
    assert run.lr == pytest.approx(0.0047 * (190_354_176 / 108e6) ** (-1 / 3))
    at_4096 = plan_run("190M", 1.0, 4096)
    assert at_4096.batch == 117  # half the sequences, the same tokens per step
    assert at_4096.lr == pytest.approx(0.000972728518721015, rel=1e-9)  # OLMo's published 190M peak LR
    assert at_4096.warmup_steps == round(190_354_176 / (117 * 4096))  # N tokens
    assert 0 <= at_4096.tokens - 20 * 190_354_176 < 117 * 4096  # 20 N k tokens, whole steps
    assert plan_run("1B", 5.0, 4096).tokens >= 5 * 20 * 1_279_395_840
    with pytest.raises(MegolmoConfigError, match="seq_len=1024"):
        plan_run("190M", 1.0, 1024)
    with pytest.raises(MegolmoConfigError, match="'5B'"):
        plan_run("5B", 1.0, 4096)


def test_planned_overrides_are_a_valid_megolmo_config():
    from megolmo.config import load_config

    run = plan_run("370M", 2.0, 4096)
    cfg = load_config(run.overrides("tok.json"))
    assert (cfg.model.hidden_size, cfg.model.num_hidden_layers, cfg.model.intermediate_size) == (1024, 16, 4096)
    assert (cfg.trainer.global_batch_size, cfg.trainer.max_steps, cfg.data.seq_len) == (run.batch, run.max_steps, 4096)
    assert cfg.optim.lr == pytest.approx(run.lr, rel=1e-5) and cfg.optim.final_lr_ratio == 0.1
    assert cfg.optim.warmup_steps == run.warmup_steps and cfg.optim.schedule == "cosine"
    assert list(cfg.eval.downstream.tasks) == eval_labels() and cfg.eval.interval == run.max_steps // 40


def test_eval_labels_are_olmo_eval_tasks():
    """Read from olmo_eval's task table without importing it (torchmetrics takes seconds to import)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None:
        pytest.skip("olmo_eval is not installed (the eval extra)")
    table = (Path(spec.origin).parent / "tasks.py").read_text()
    assert [label for label in eval_labels() if f'"{label}": (' not in table] == []
    assert len(eval_labels()) == 11 and sorted(TASKS) == sorted(
        "mmlu hellaswag arc_challenge arc_easy piqa csqa socialiqa openbookqa".split())


def test_plan_for_7b_at_4t(capsys):
    assert main(["plan", "--target", "7B", "--tokens", "4T"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + 30 + 1 and lines[1].split()[0] == "190M-0.5xC" and lines[-2].split()[0] == "3B-10xC"
    total = sum(6 * r.n * r.tokens for r in plan())
    assert f"{total:.3g} FLOPs = {total / (6 * 6_887_575_552 * 4e12):.2%} of the target" in lines[-1]
    assert "17.18%" in lines[-1]


def test_counts_parse_with_suffixes():
    assert [parse_count(t) for t in ("4T", "100B", "190M", "1.5e9", "12345")] == [
        4 * 10 ** 12, 10 ** 11, 190 * 10 ** 6, 1_500_000_000, 12345]
    with pytest.raises(MegolmoConfigError, match="'4 trillion'"):
        parse_count("4 trillion")


def true_step2(task: str) -> np.ndarray:
    """TRUE_STEP2 with its floor b raised to the task's chance level (and a + b = 1 kept)."""
    b = max(TRUE_STEP2[3], TASKS[task].chance)
    return np.array([1 - b, *TRUE_STEP2[1:3], b])


def synthetic_runs(loss_noise: float, accuracy_noise: float, seed: int = 0, sizes: list[str] | None = None,
                   multipliers: list[float] | None = None, evaluations: int = 40,
                   step2: np.ndarray | None = None) -> list[LadderRun]:
    """The plan's runs, each evaluated ``evaluations`` times, losses on TRUE_STEP1 and accuracies on
    ``step2`` (default: ``true_step2`` of each task), with relative (loss) and absolute (accuracy) Gaussian
    noise."""
    rng = np.random.default_rng(seed)
    runs = []
    for planned in plan(sizes, multipliers):
        tokens = np.linspace(planned.tokens / evaluations, planned.tokens, evaluations)
        clean = step1_loss(TRUE_STEP1, planned.n, tokens)
        run = LadderRun(planned.name, planned.n, tokens.tolist())
        for task in TASKS:
            run.loss[task] = (clean * (1 + loss_noise * rng.standard_normal(evaluations))).tolist()
            run.accuracy[task] = (step2_accuracy(true_step2(task) if step2 is None else step2, clean)
                                  + accuracy_noise * rng.standard_normal(evaluations)).tolist()
        runs.append(run)
    return runs


def one_task(runs: list[LadderRun], task: str = "hellaswag") -> list[LadderRun]:
    for run in runs:
        run.loss, run.accuracy = {task: run.loss[task]}, {task: run.accuracy[task]}
    return runs


def test_fit_recovers_known_parameters_and_predicts_a_held_out_target_at_low_noise():
    loss_noise, accuracy_noise = 2e-4, 2e-3
    fit = fit_ladder(one_task(synthetic_runs(loss_noise, accuracy_noise)), draws=4).tasks["hellaswag"]
    assert np.abs(fit.step1 / TRUE_STEP1 - 1).max() < 0.05, fit.step1
    assert np.abs(fit.step2 / TRUE_STEP2 - 1).max() < 0.05, fit.step2
    predicted, true_loss = fit.predict(TARGET_N, TARGET_D), step1_loss(TRUE_STEP1, TARGET_N, TARGET_D)
    # within the noise: no further from the truth than a noisy evaluation of the target would be (3 sigma)
    assert abs(predicted["task_loss"] / true_loss - 1) < 3 * loss_noise
    assert abs(predicted["accuracy"] - step2_accuracy(TRUE_STEP2, true_loss)) < 3 * accuracy_noise


def test_held_out_target_lies_within_the_bootstrap_interval_at_moderate_noise():
    fit = fit_ladder(one_task(synthetic_runs(1e-2, 1e-2, seed=1)), draws=20).tasks["hellaswag"]
    predicted, true_loss = fit.predict(TARGET_N, TARGET_D), step1_loss(TRUE_STEP1, TARGET_N, TARGET_D)
    true_accuracy = step2_accuracy(TRUE_STEP2, true_loss)
    assert abs(predicted["task_loss"] / true_loss - 1) < 3e-2 and abs(predicted["accuracy"] - true_accuracy) < 3e-2
    low, high = predicted["task_loss_ci95"]
    assert low <= true_loss <= high and predicted["task_loss_std"] > 0
    low, high = predicted["accuracy_ci95"]
    assert low <= true_accuracy <= high


def test_step1_is_not_fooled_by_a_wrong_exponent():
    """The fit follows the data: the same ladder with alpha 0.5 gives alpha 0.5, not the true 0.35."""
    other = TRUE_STEP1 * [1, 0.5 / 0.35, 1, 1, 1] * [100, 1, 1, 1, 1]
    runs = plan()
    n, d = np.array([r.n for r in runs], float), np.array([r.tokens for r in runs], float)
    assert fit_step1(n, d, step1_loss(other, n, d))[1] == pytest.approx(0.5, rel=1e-3)


def test_step2_accuracy_floor_is_the_chance_level():
    runs = one_task(synthetic_runs(2e-4, 2e-3, sizes=["190M", "370M", "600M"], step2=TRUE_STEP2), "piqa")
    assert TASKS["piqa"].chance > TRUE_STEP2[3]  # the data's floor is below chance: the fit's is not
    assert fit_ladder(runs, draws=2).tasks["piqa"].step2[3] >= TASKS["piqa"].chance


def test_olmo_csv_maps_to_the_fit_inputs():
    run = read_input(SAMPLE)
    assert (run.name, run.n, len(run.tokens)) == ("190M-1xC", 190_354_176, 37)
    assert run.tokens[19] == 2_097_152_000 and run.final_tokens == 3_812_622_336
    # MMLU at _step 4000 (row 20), by hand from the four test categories' columns:
    # bpb stem 2.468977212905884, humanities 1.1284208297729492, social 1.3501241207122803, other 1.7230478525161743
    assert run.loss["mmlu"][19] == pytest.approx(
        0.215 * 2.468977212905884 + 0.335 * 1.1284208297729492 + 0.219 * 1.3501241207122803
        + 0.231 * 1.7230478525161743, rel=1e-12)
    assert run.accuracy["mmlu"][-1] == pytest.approx(
        0.215 * 0.25414180755615234 + 0.335 * 0.2569606900215149 + 0.219 * 0.2882677912712097
        + 0.231 * 0.29179519414901733, rel=1e-12)
    assert run.loss["hellaswag"][-1] == 0.9800465703010559 and run.accuracy["piqa"][-1] == 0.6115342974662781
    loss, accuracy = step2_points(run, "arc_easy")
    assert len(loss) == 34  # the three evaluations before 10% of 3.81B tokens are dropped
    # the fifth kept point (_step 1600) averages arc_easy_test's len_norm at _steps 800..1600
    assert accuracy[4] == pytest.approx((0.32996633648872375 + 0.34638047218322754 + 0.3539562225341797
                                         + 0.3762626349925995 + 0.3724747598171234) / 5, rel=1e-12)


def test_olmo_csv_errors_name_the_culprit(tmp_path):
    unknown = tmp_path / "190X-1xC.csv"
    unknown.write_text(SAMPLE.read_text())
    with pytest.raises(MegolmoConfigError, match="190X-1xC.csv: unknown size prefix '190X'"):
        read_input(unknown)
    with open(SAMPLE, newline="") as f:
        rows = list(csv.DictReader(f))
    column = "eval/downstream/piqa_val_rc_5shot_len_norm"
    missing = tmp_path / "370M-2xC.csv"
    with open(missing, "w", newline="") as f:
        writer = csv.DictWriter(f, [k for k in rows[0] if k != column], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(MegolmoConfigError, match=f"370M-2xC.csv: no column '{column}'"):
        read_input(missing)


def test_run_directory_maps_to_the_fit_inputs(tmp_path):
    run_dir = tmp_path / "ladder-370M-1xC"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps({"model": ladder_config("370M").to_dict()}))
    rows = [{"step": 1, "tokens": 100, "loss": 9.0}]
    for step, scale in ((10, 1.0), (20, 0.9)):
        row = {"step": step, "tokens": step * 100, "loss": 3.0, "eval/c4_en/CE": 3.5 * scale,
               "eval/c4_en/PPL": 33.0}
        for task in TASKS.values():
            for i, (label, _) in enumerate(task.labels):
                row[f"eval/downstream/{label}/bpb_v1"] = scale * (1 + i)
                row[f"eval/downstream/{label}/len_norm_v1"] = 0.3 + 0.01 * i
        rows.append(row)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    run = read_input(run_dir)
    assert (run.n, run.tokens) == (371_262_464, [1000.0, 2000.0])
    assert run.loss["c4_en"] == [3.5, 3.5 * 0.9] and "c4_en" not in run.accuracy
    assert run.loss["mmlu"][1] == pytest.approx(0.9 * (0.215 + 0.335 * 2 + 0.219 * 3 + 0.231 * 4))
    assert run.accuracy["mmlu"][0] == pytest.approx(0.3 + 0.01 * (0.335 + 0.219 * 2 + 0.231 * 3))
    assert run.loss["csqa"] == [1.0, 0.9]


def write_csv(path, run: LadderRun) -> None:
    """A run in OLMo's export format (MMLU's four categories each carrying the task's value)."""
    columns = ["_step", "throughput/total_tokens"] + [f"eval/downstream{kind}/{label}_{metric}"
                                                      for task in TASKS.values() for label, _ in task.labels
                                                      for kind, metric in (("_bpb", "bpb"), ("", "len_norm"))]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for i, tokens in enumerate(run.tokens):
            values = [v for task in TASKS.values() for _ in task.labels
                      for v in (run.loss[task.name][i], run.accuracy[task.name][i])]
            writer.writerow([i + 1, tokens, *values])


def test_cli_fit_then_predict_round_trip(tmp_path, capsys):
    runs = synthetic_runs(2e-4, 2e-3, sizes=["190M", "600M", "1B"], multipliers=[0.5, 2.0, 10.0], evaluations=20)
    held_out = synthetic_runs(2e-4, 2e-3, seed=1, sizes=["3B"], multipliers=[5.0], evaluations=20)[0]
    for run in [*runs, held_out]:
        write_csv(tmp_path / f"{run.name}.csv", run)
    inputs = [str(tmp_path / f"{run.name}.csv") for run in runs]
    assert main(["fit", *inputs, "--output", str(tmp_path / "fit.json"), "--plots", str(tmp_path / "plots"),
                 "--holdout", str(tmp_path / "3B-5xC.csv"), "--bootstrap", "3"]) == 0
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "predicted_vs_actual.png", "step1.png", "step2.png"]
    saved = json.loads((tmp_path / "fit.json").read_text())
    assert saved["holdout"]["tasks"]["mmlu"]["actual"]["task_loss"] == pytest.approx(held_out.loss["mmlu"][-1])
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "fit.json"), "--target", "7B", "--tokens", "4T", "--json"]) == 0
    predicted = json.loads(capsys.readouterr().out)
    true_loss = step1_loss(TRUE_STEP1, TARGET_N, TARGET_D)
    assert sorted(predicted) == sorted(TASKS)
    for task, p in predicted.items():
        assert abs(p["task_loss"] / true_loss - 1) < 1e-2, task  # 3 sizes up to 1B, extrapolated to 7B
        assert abs(p["accuracy"] - step2_accuracy(true_step2(task), true_loss)) < 2e-2, task
        assert {"task_loss_std", "task_loss_ci95", "accuracy_std", "accuracy_ci95"} <= set(p)
    assert main(["predict", str(tmp_path / "fit.json"), "--n", "7B", "--tokens", "4T"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("mmlu ")


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["plan", "--target", "70B", "--tokens", "4T"]) == 2
    assert capsys.readouterr().err == "megolmo: error: target '70B': unknown (targets: 1B, 7B, 13B, 32B; or give --n)\n"
    assert main(["fit", str(SAMPLE), "--output", str(tmp_path / "fit.json")]) == 2
    assert "needs at least 5 runs of at least 2 sizes" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert main(["predict", str(tmp_path / "bad.json"), "--n", "1B", "--tokens", "1T"]) == 2
    assert "bad.json: not a ladder fit" in capsys.readouterr().err
