"""``loss.png`` and ``eval_<metric>.png`` in the run directory when training ends (``megolmo.plots``), so a
finished run comes with its pictures; ``tools/plot.py`` draws several runs on one figure."""
from __future__ import annotations

from megolmo.callbacks.base import Callback, Trainer


class LossPlots(Callback):
    def on_end(self, trainer: Trainer) -> None:
        path = trainer.run_dir.path
        if trainer.ps.is_main and (path / "metrics.jsonl").exists():  # a run of no steps has nothing to draw
            from megolmo.plots import plot_runs  # matplotlib: half a second of imports, on rank 0 at the end only

            written = plot_runs([path], path)
            trainer.log("plots: " + ", ".join(str(png) for png in written))
