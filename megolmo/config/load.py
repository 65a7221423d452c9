"""Compose megolmo's config from ``conf/`` and Hydra overrides, against the typed schema; every mistake is
one line naming the key (and, for a typo, the closest valid key).

Hydra types every value but lets ``+key=value`` add keys the schema lacks, which the run would then
silently ignore; ``check_known_keys`` refuses them, as it refuses unknown keys in YAML files. Only fields
typed as a dict (named collections such as eval sets) take new keys.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Sequence

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, ListConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from megolmo.config.checkpoint_model import take_model_from_checkpoint
from megolmo.config.schema import MegolmoConfig, register
from megolmo.errors import MegolmoConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def load_config(overrides: Sequence[str], conf_dir: Path = CONF_DIR) -> DictConfig:
    """The run's config: composed, typed, free of unknown keys, its model taken from the checkpoint it
    starts from unless given explicitly."""
    overrides = list(overrides)
    cfg = compose_config(overrides, conf_dir)
    check_known_keys(cfg, MegolmoConfig)
    check_given(cfg, overrides)
    check_choices(cfg, MegolmoConfig)
    take_model_from_checkpoint(cfg, overrides)
    return cfg


def compose_config(overrides: list[str], conf_dir: Path) -> DictConfig:
    register()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
            return compose(config_name="config", overrides=[assignable(o) for o in overrides])
    except (HydraException, OmegaConfBaseException) as error:
        raise MegolmoConfigError(describe_composition_error(error, overrides, conf_dir)) from None


def describe_composition_error(error: BaseException, overrides: list[str], conf_dir: Path) -> str:
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and "/" in error.missing_cfg_file:
        group, option = error.missing_cfg_file.rsplit("/", 1)
        return f"{group}={option}: no such option{suggestion(option, error.options or ())}" + (
            f" (choose from {', '.join(sorted(error.options, key=natural_order))})" if error.options else "")
    culprit = innermost_config_error(error)
    if isinstance(culprit, (ConfigAttributeError, ConfigKeyError)) and culprit.full_key:
        return unknown_key_message(culprit.full_key)
    if isinstance(culprit, ValidationError) and culprit.full_key:
        reason = first_line(str(culprit))
        expected = field_type_name(culprit.full_key)
        return f"{culprit.full_key}: {reason}" + (f" (expected {expected})" if expected else "")
    if culprit is not None and culprit.full_key:
        return f"{culprit.full_key}: {first_line(str(culprit))}"
    bad = unparsable_override(overrides)
    if bad is not None:
        return f"cannot parse the override {bad!r}: {first_line(str(error))}"
    return first_line(str(error))


def assignable(override: str) -> str:
    """``eval.lm.sets={name: [...]}`` or ``eval.lm.sets.name=[...]`` as ``++...``: Hydra merges a plain
    assignment into the struct-locked dict, refusing its new keys, while a dict-typed field is meant to
    take them."""
    key, sep, _ = override.partition("=")
    if not sep or key[:1] in "+~" or "/" in key:
        return override
    parts = key.split(".")
    for i in range(len(parts)):
        schema = section_schema(".".join(parts[:i]))
        if schema is None:
            break
        if typing.get_origin(typing.get_type_hints(schema).get(parts[i])) is dict:
            return f"++{override}"
    return override


def innermost_config_error(error: BaseException) -> OmegaConfBaseException | None:
    """The deepest OmegaConf error that names a key: Hydra wraps it in messages that do not."""
    found = None
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OmegaConfBaseException) and getattr(error, "full_key", None):
            found = error
        error = error.__cause__ or error.__context__
    return found


def unparsable_override(overrides: list[str]) -> str | None:
    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except HydraException:
            return override
    return None


def natural_order(name: str) -> list:
    """``olmo2_7b`` before ``olmo2_13b``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text)


# -- the schema's keys ------------------------------------------------------------------------------------
def schema_fields(schema: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(schema)}


def section_schema(path: str) -> type | None:
    """The dataclass behind a dotted section path (``""`` is the root), or None."""
    schema: type = MegolmoConfig
    for part in filter(None, path.split(".")):
        hint = typing.get_type_hints(schema).get(part)
        if not dataclasses.is_dataclass(hint):
            return None
        schema = hint
    return schema


def field_type_name(full_key: str) -> str | None:
    path, _, name = full_key.split("[")[0].rpartition(".")
    schema = section_schema(path)
    if schema is None or name not in schema_fields(schema):
        return None
    return type_name(typing.get_type_hints(schema)[name])


def type_name(hint: Any) -> str:
    if dataclasses.is_dataclass(hint):
        return "section"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) in (list, dict):
        return f"{typing.get_origin(hint).__name__}[{', '.join(type_name(a) for a in typing.get_args(hint))}]"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def suggestion(word: str, candidates: typing.Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.75)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def unknown_key_message(full_key: str) -> str:
    path, _, name = full_key.rpartition(".")
    schema = section_schema(path)
    known = schema_fields(schema) if schema is not None else {}
    where = f"in {path}" if path else "at the top level"
    return f"{full_key}: unknown key {where}{suggestion(name, known, f'{path}.' if path else '')}"


def check_given(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """The keys a recipe lists as ``required`` (e.g. ``data.root``) must be given on the command line."""
    given = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    missing = [key for key in cfg.get("required", []) if key not in given]
    if missing:
        raise MegolmoConfigError(f"{', '.join(missing)}: the recipe leaves {'them' if len(missing) > 1 else 'it'} "
                                 f"to you; give {' '.join(key + '=...' for key in missing)}")


def check_known_keys(node: DictConfig, schema: type, path: str = "") -> None:
    """Refuse keys the schema does not name (``+key=`` additions, extra keys in YAML files)."""
    fields = schema_fields(schema)
    hints = typing.get_type_hints(schema)
    for key in node.keys():
        full_key = f"{path}{key}"
        if key not in fields:
            raise MegolmoConfigError(unknown_key_message(full_key))
        value = node._get_node(key)
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, DictConfig):
            check_known_keys(value, hints[key], f"{full_key}.")


def check_choices(node: DictConfig, schema: type, path: str = "") -> None:
    """String settings with a fixed set of values (precision, schedules, dtypes) are checked at once."""
    hints = typing.get_type_hints(schema)
    for name, f in schema_fields(schema).items():
        value = node[name]
        if dataclasses.is_dataclass(hints[name]):
            check_choices(value, hints[name], f"{path}{name}.")
        elif f.metadata.get("choices") and value is not None and not isinstance(value, (DictConfig, ListConfig)) \
                and value not in f.metadata["choices"]:
            choices = f.metadata["choices"]
            raise MegolmoConfigError(f"{path}{name}={value}: choose one of {', '.join(choices)}"
                                     f"{suggestion(str(value), choices)}")
