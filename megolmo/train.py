"""Entry point: ``python -m megolmo.train [hydra overrides]``, under torchrun, srun or mpirun alike."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from megolmo.errors import MegolmoConfigError

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def run(cfg: DictConfig) -> None:
    from megolmo.parallel.state import shutdown
    from megolmo.trainer import Trainer

    try:
        Trainer(cfg).fit()
    except MegolmoConfigError as error:
        rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
        if rank == "0":
            print(f"megolmo: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        shutdown()


@hydra.main(config_path=CONF_DIR, config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
