"""Loss and evaluation pictures from synthetic ``metrics.jsonl`` files: the right lines, valid PNGs, one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from matplotlib.image import imread

from megolmo.callbacks.plots import LossPlots
from megolmo.errors import MegolmoConfigError
from megolmo.plots import eval_figure, format_tokens, loss_figure, main, plot_runs, read_run

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVAL_KEYS = ["eval/c4_en/CE", "eval/c4_en/PPL", "eval/downstream/hellaswag/len_norm_v1"]


def row(step: int, loss: float, **extra) -> dict:
    return {"step": step, "loss": loss, "z_loss": 0.0, "grad_norm": 1.0, "lr": 1e-3, "tokens": step * 2_000_000,
            "tokens_per_sec": 1e5, "mfu": None, "data_wait_s": 0.0, "masked_instances": 0, **extra}


def write_metrics(run_dir: Path, rows: list[dict]) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


@pytest.fixture
def runs(tmp_path) -> tuple[Path, Path]:
    evaluated = [row(s, 10.0 - s) for s in range(1, 7)]
    for r in (evaluated[2], evaluated[5]):  # evaluation ran at steps 3 and 6
        r.update({"eval/c4_en/CE": r["loss"] + 0.5, "eval/c4_en/PPL": 100.0 / r["step"],
                  "eval/downstream/hellaswag/len_norm_v1": 0.1 * r["step"],
                  "eval/downstream/hellaswag/soft_v2": 0.2, "eval/seconds": 1.5})  # not drawn
    # resumed after step 3 from the checkpoint of step 2: step 3 was recomputed and re-appended
    resumed = [row(1, 9.0), row(2, 8.0), row(3, 7.5), row(3, 7.0), row(4, 6.0)]
    return write_metrics(tmp_path / "run-a", evaluated), write_metrics(tmp_path / "run-b", resumed)


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width = imread(path).shape[:2]
    assert 300 <= height <= 2000 and 300 <= width <= 2000


def test_loss_figure_has_one_line_per_run_and_the_later_row_wins(runs):
    fig = loss_figure([read_run(d) for d in runs])
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["run-a", "run-b"]
    assert list(lines[0].get_xdata()) == [s * 2_000_000 for s in range(1, 7)]
    assert list(lines[0].get_ydata()) == [10.0 - s for s in range(1, 7)]
    assert list(lines[1].get_xdata()) == [2e6, 4e6, 6e6, 8e6]
    assert list(lines[1].get_ydata()) == [9.0, 8.0, 7.0, 6.0]


def test_eval_figure_plots_only_the_evaluated_rows_with_markers(runs):
    fig = eval_figure([read_run(d) for d in runs], "eval/c4_en/CE")
    (line,) = fig.axes[0].get_lines()  # run-b has no evaluations
    assert line.get_label() == "run-a" and line.get_marker() == "o"
    assert list(line.get_xdata()) == [6e6, 12e6] and list(line.get_ydata()) == [7.5, 4.5]


def test_plot_runs_writes_loss_and_one_png_per_eval_key(runs, tmp_path):
    written = plot_runs(list(runs), tmp_path / "out")
    names = ["loss.png", "eval_c4_en_CE.png", "eval_c4_en_PPL.png", "eval_downstream_hellaswag_len_norm_v1.png"]
    assert sorted(written) == sorted(tmp_path / "out" / name for name in names)
    for path in written:
        assert_png(path)


def test_cli_defaults_to_the_first_run_dir(runs):
    done = subprocess.run([sys.executable, str(REPO / "tools" / "plot.py"), *map(str, runs)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    printed = [Path(line) for line in done.stdout.splitlines()]
    assert Path(runs[0] / "loss.png") in printed and len(printed) == 1 + len(EVAL_KEYS)
    for path in printed:
        assert_png(path)


def test_missing_and_malformed_metrics_are_one_line_errors_naming_the_file(tmp_path, runs, capsys):
    with pytest.raises(MegolmoConfigError, match=r"empty[/\\]metrics\.jsonl") as missing:
        plot_runs([runs[0], tmp_path / "empty"], tmp_path / "out")
    bad = runs[1] / "metrics.jsonl"
    bad.write_text(bad.read_text() + '{"step": 5, "loss": 5.0, "tok\n')
    with pytest.raises(MegolmoConfigError, match=rf"{bad.name}:6: ") as malformed:
        plot_runs([runs[1]], tmp_path / "out")
    assert str(bad) in str(malformed.value)
    for error in (missing, malformed):
        assert "\n" not in str(error.value)
    assert main([str(runs[1])]) == 2  # tools/plot.py's entry point, in-process
    assert capsys.readouterr().err.splitlines() == [f"error: {malformed.value}"]


def test_tick_labels_are_readable():
    assert [format_tokens(x) for x in (0, 5e5, 2.5e8, 1e9, 1.5e10)] == ["0", "500K", "250M", "1B", "15B"]


def test_loss_plots_callback_draws_on_global_rank_0_only(runs):
    logged = []
    for is_main in (False, True):
        trainer = SimpleNamespace(ps=SimpleNamespace(is_main=is_main), run_dir=SimpleNamespace(path=runs[1]),
                                  log=logged.append)
        LossPlots().on_end(trainer)
        assert (runs[1] / "loss.png").exists() == is_main
    assert len(logged) == 1 and "loss.png" in logged[0]
