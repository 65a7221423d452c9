"""Weights & Biases logging (``logging.wandb.project``): each step's numbers, the same values
``metrics.jsonl`` holds (that file stays the source of truth), at ``step=record.step``.

The run id is made once and kept in ``<run_dir>/wandb_run_id``, so a resumed or requeued job continues
the same W&B run (``resume="allow"``) instead of starting a new one; ``WANDB_MODE=offline`` writes the run
under ``<run_dir>/wandb`` with no network (``wandb sync`` uploads it later). Only global rank 0 talks to
W&B. ``wandb`` is imported when the run starts, so megolmo imports without it.
"""
from __future__ import annotations

import importlib.util
import secrets
import string

from omegaconf import OmegaConf

from megolmo.callbacks.base import Callback, StepRecord
from megolmo.errors import MegolmoConfigError

RUN_ID_FILE = "wandb_run_id"


def new_run_id() -> str:
    """Eight lowercase letters and digits, like the ids W&B makes itself."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def require(module: str, key: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise MegolmoConfigError(f"{key} needs the {module} package: pip install 'megolmo[{extra}]'")


class WandbLog(Callback):
    def __init__(self, project: str, entity: str | None = None, name: str | None = None, group: str | None = None,
                 tags: list[str] | tuple[str, ...] = ()):
        require("wandb", f"logging.wandb.project={project}", "wandb")
        self.project, self.entity, self.run_name, self.group, self.tags = project, entity, name, group, list(tags)
        self.run = None

    def on_start(self, trainer) -> None:
        if not trainer.run_dir.is_writer:
            return
        import wandb

        run_dir = trainer.run_dir.path
        id_file = run_dir / RUN_ID_FILE
        if not id_file.exists():
            id_file.write_text(new_run_id() + "\n")
        self.run = wandb.init(project=self.project, entity=self.entity, name=self.run_name or run_dir.name,
                              group=self.group, tags=self.tags, id=id_file.read_text().strip(), resume="allow",
                              dir=str(run_dir), config=OmegaConf.to_container(trainer.cfg, resolve=True))

    def on_step_end(self, trainer, record: StepRecord) -> None:
        if self.run is not None:
            values = record.numbers()
            step = values.pop("step")
            self.run.log(values, step=step)

    def on_end(self, trainer) -> None:
        self.finish(0)

    def on_failure(self, trainer, error: BaseException) -> None:
        self.finish(1)

    def finish(self, exit_code: int) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            run.finish(exit_code=exit_code)
