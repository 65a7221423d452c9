"""``python -m megolmo.config [overrides]`` prints the config a training command would run (composed,
checked, its model taken from the checkpoint it starts from); ``--markdown`` prints ``docs/config.md``."""
from __future__ import annotations

import sys

from omegaconf import OmegaConf

from megolmo.config.load import load_config
from megolmo.config.markdown import generate_markdown
from megolmo.errors import MegolmoConfigError


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["--markdown"]:
            sys.stdout.write(generate_markdown())
        else:
            sys.stdout.write(OmegaConf.to_yaml(load_config(argv)))
    except MegolmoConfigError as error:
        print(f"megolmo: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
