"""Every option the README gives a tool (`tools/*.py ... --flag`) is one that tool's --help lists."""
from __future__ import annotations

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
