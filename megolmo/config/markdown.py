"""``docs/config.md``: every key with its type, default and help, generated from the schema and ``conf/``
(``python -m megolmo.config --markdown > docs/config.md``; a test keeps the committed file current)."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from megolmo.config.load import CONF_DIR, load_config, natural_order, type_name
from megolmo.config.schema import MegolmoConfig, register

HEADER = """# Configuration keys

Generated from `megolmo/config/schema.py` and `conf/` by `python -m megolmo.config --markdown`; do not edit
by hand. Any key can be set on the command line (Hydra syntax), e.g.
`python -m megolmo.train model=olmo2_1b trainer.max_steps=1000`, and
`python -m megolmo.config [overrides]` prints the config a command would run. Unknown keys, `+key`
additions and values of the wrong type are refused in one line naming the key. The defaults are those of
a command without overrides; with `load_path` (or when resuming a run directory) the `model` architecture
comes from the checkpoint.
"""


def group_options(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """The options of a config group: its YAML files and the schema's defaults in Hydra's ConfigStore."""
    register()
    stored = ConfigStore.instance().repo.get(group, {})
    names = {name.removesuffix(".yaml") for name in stored} | {p.stem for p in (conf_dir / group).glob("*.yaml")}
    return sorted(names, key=natural_order)


def default_options(conf_dir: Path = CONF_DIR) -> dict[str, str]:
    """``group -> option`` as chosen by ``conf/config.yaml``'s defaults list."""
    chosen = {}
    for entry in OmegaConf.load(conf_dir / "config.yaml")["defaults"]:
        if isinstance(entry, DictConfig):
            (group, option), = dict(entry).items()
            if not group.startswith("override "):
                chosen[group] = option
    return chosen


def render_value(value: object) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def section_rows(schema: type, defaults: DictConfig, prefix: str) -> list[str]:
    hints = typing.get_type_hints(schema)
    rows = []
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[f.name]):
            if prefix:  # a subsection (data.instance_filter): its rows inside its group's table
                rows += section_rows(hints[f.name], defaults[f.name], f"{prefix}{f.name}.")
            continue
        value = OmegaConf.to_container(defaults[f.name]) if OmegaConf.is_config(defaults[f.name]) else defaults[f.name]
        choices = f.metadata.get("choices") or ()
        help_text = f.metadata.get("help", "") + (f" (one of {', '.join(f'`{c}`' for c in choices)})" if choices else "")
        kind = type_name(hints[f.name]).replace("|", "\\|")  # a pipe inside a table cell is escaped
        rows.append(f"| `{prefix}{f.name}` | `{kind}` | {render_value(value)} | {help_text} |")
    return rows


def model_options_table(conf_dir: Path = CONF_DIR) -> list[str]:
    """The named architectures side by side."""
    options = group_options("model", conf_dir)
    configs = {name: load_config([f"model={name}"], conf_dir).model for name in options}
    lines = ["| field | " + " | ".join(f"`{name}`" for name in options) + " |",
             "|---|" + "---|" * len(options)]
    for key in configs[options[0]]:
        if key != "name":
            lines.append(f"| `{key}` | " + " | ".join(render_value(configs[name][key]) for name in options) + " |")
    return lines


def generate_markdown(conf_dir: Path = CONF_DIR) -> str:
    defaults = load_config([], conf_dir)
    chosen = default_options(conf_dir)
    hints = typing.get_type_hints(MegolmoConfig)
    out = [HEADER, "## Groups", "", "| group | options | default |", "|---|---|---|"]
    for group in chosen:
        options = ", ".join(f"`{name}`" for name in group_options(group, conf_dir))
        out.append(f"| `{group}` | {options} | `{chosen[group]}` |")
    out += ["", "## Top-level keys", "", "| key | type | default | help |", "|---|---|---|---|"]
    out += section_rows(MegolmoConfig, defaults, "")
    for name, hint in hints.items():
        if dataclasses.is_dataclass(hint):
            option = f" (defaults: `{name}={chosen[name]}`)" if name in chosen else ""
            out += ["", f"## `{name}`{option}", "", "| key | type | default | help |", "|---|---|---|---|"]
            out += section_rows(hint, defaults[name], f"{name}.")
    out += ["", "## Named models", "", "Selected with `model=NAME`; fields named like transformers' `Olmo2Config`.",
            ""]
    out += model_options_table(conf_dir)
    return "\n".join(out) + "\n"
