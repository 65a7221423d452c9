"""Every option the README gives a tool (`tools/*.py ... --flag`) is one that tool's --help lists."""
from __future__ import annotations

import functools
import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT

README = (ROOT / "README.md").read_text()
# One command: from `tools/NAME.py` to the end of its code span or line (a `\` continues the line).
COMMANDS = re.findall(r"tools/(\w+)\.py((?:[^`\n\\]|\\\n)*)", README)
USES = sorted({(tool, sub, flag)
               for tool, rest in COMMANDS
               for sub in [(re.match(r"\s+([a-z][\w-]*-to-[\w-]+)", rest) or [None, ""])[1]]
               for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", rest)})


@functools.cache  # a tool's --help costs seconds of imports; the README names several options of each
def help_text(tool: str, sub: str) -> str:
    proc = subprocess.run([sys.executable, f"tools/{tool}.py", *([sub] if sub else []), "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_readme_names_tool_options():
    assert {tool for tool, _, _ in USES} >= {"convert_checkpoint", "soup", "prepare_data"}


@pytest.mark.parametrize(("tool", "sub", "flag"), USES, ids=[" ".join(filter(None, u)) for u in USES])
def test_tool_option_exists(tool, sub, flag):
    assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text(tool, sub)), \
        f"README: tools/{tool}.py {sub} has no option {flag}"


def training_commands() -> list[list[str]]:
    """The overrides of every ``megolmo.train`` and ``slurm/train.sbatch`` command in the README's code blocks, less placeholders
    (``...``, shell variables) that only a user can fill in."""
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    commands = []
    for block in blocks:
        for command in block.replace("\\\n", " ").splitlines():
            parts = re.split(r"megolmo\.train|slurm/train\.sbatch", command.split("#", 1)[0], maxsplit=1)
            if len(parts) < 2:
                continue
            words = parts[1].split()
            commands.append([w for w in words if "=" in w and "..." not in w and "$" not in w and "(" not in w])
    return commands


def test_the_readme_training_commands_are_valid_configs():
    from megolmo.config import load_config

    commands = training_commands()
    assert len(commands) >= 6
    for overrides in commands:
        load_config(overrides)  # raises a one-line MegolmoConfigError naming a stale key
