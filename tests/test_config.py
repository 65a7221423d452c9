"""The typed config: unknown keys, typos (with or without ``+``), wrong types and unknown options are one
line naming the key; ``docs/config.md`` is current; the model comes from the checkpoint a run starts from."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing

import pytest
import yaml

from megolmo.config import CONF_DIR, MegolmoConfig, load_config
from megolmo.config.load import compose_config
from megolmo.config.markdown import generate_markdown, group_options
from megolmo.errors import MegolmoConfigError
from tests.conftest import write_tokens
from tests.helpers import ROOT, run_entry_point, torchrun_root_cause

@pytest.mark.parametrize("overrides, message", [
    (["trainer.max_step=10"], "trainer.max_step: unknown key in trainer; did you mean trainer.max_steps?"),
    (["+trainer.max_step=10"], "trainer.max_step: unknown key in trainer; did you mean trainer.max_steps?"),
    (["+trainer.max_steps_=10"], "trainer.max_steps_: unknown key in trainer; did you mean trainer.max_steps?"),
    (["+lr=1e-3"], "lr: unknown key at the top level"),
    (["modle=tiny"], "modle: unknown key at the top level; did you mean model?"),
    (["model.hidden_sise=64"], "model.hidden_sise: unknown key in model; did you mean model.hidden_size?"),
    (["trainer.max_steps=ten"], "trainer.max_steps: Value 'ten' of type 'str' could not be converted to Integer "
                                "(expected int)"),
    (["trainer.profile_steps=[a]"], "trainer.profile_steps[0]: Value 'a' of type 'str' could not be converted to "
                                    "Integer (expected list[int])"),
    (["parallel.sequence_parallel=maybe"], "parallel.sequence_parallel: Value 'maybe' is not a valid bool"),
    (["model=olmo2_1bb"], "model=olmo2_1bb: no such option; did you mean olmo2_1b? (choose from olmo2_1b, olmo2_7b, "
                        "olmo2_13b, olmo2_32b, tiny)"),
    (["trainer=dem"], "trainer=dem: no such option; did you mean demo?"),
    (["precision=bf61"], "precision=bf61: choose one of fp32, bf16, fp8; did you mean bf16?"),
    (["parallel.pipeline_schedule=zb"], "parallel.pipeline_schedule=zb: choose one of 1f1b,"),
    (["trainer.max_steps=[1"], "cannot parse the override 'trainer.max_steps=[1'"),
])
def test_a_bad_override_is_one_line_naming_the_key(overrides, message):
    with pytest.raises(MegolmoConfigError) as raised:
        load_config(overrides)
    assert str(raised.value).startswith(message), str(raised.value)
    assert "\n" not in str(raised.value)


def test_values_are_typed_and_defaults_come_from_the_schema():
    cfg = load_config(["trainer.max_steps=7", "optim.lr=1e-3", "parallel.pipeline_layers=[3,1]", "load_path=42"])
    assert (cfg.trainer.max_steps, cfg.optim.lr, list(cfg.parallel.pipeline_layers)) == (7, 1e-3, [3, 1])
    assert cfg.load_path == "42" and cfg.parallel.timeout_s == MegolmoConfig().parallel.timeout_s
    demo = load_config(["trainer=demo", "optim=demo"])  # options extend the schema's defaults
    assert (demo.trainer.max_steps, demo.trainer.keep_last, demo.optim.lr, demo.optim.z_loss) == (200, 2, 3e-3, 1e-5)


def test_docs_config_md_is_generated_from_the_schema():
    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == generate_markdown(), "docs/config.md is stale: python -m megolmo.config --markdown > docs/config.md"
    for key in schema_keys(MegolmoConfig):
        assert f"| `{key}` |" in committed, key


def schema_keys(schema: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(schema)
    keys = []
    for f in dataclasses.fields(schema):
        nested = hints[f.name]
        keys += schema_keys(nested, f"{prefix}{f.name}.") if dataclasses.is_dataclass(nested) else [prefix + f.name]
    return keys


def dotted_keys(tree: dict, known: set[str], prefix: str = ""):
    """A nested config's keys as dotted paths, down to the schema's own keys (dict-typed values stay whole)."""
    for key, value in tree.items():
        path = prefix + key
        if isinstance(value, dict) and path not in known:
            yield from dotted_keys(value, known, path + ".")
        else:
            yield path


def test_every_key_in_conf_is_in_the_schema_and_every_option_composes():
    known = set(schema_keys(MegolmoConfig))
    files = sorted(p for p in CONF_DIR.glob("*/*.yaml") if p.parent.name != "mixes")  # mixes: data (data.mix)
    assert len(files) >= 9
    for path in files:
        group = path.parent.name
        content = {k: v for k, v in (yaml.safe_load(path.read_text()) or {}).items() if k != "defaults"}
        if group == "recipe":  # global package: keys from the root; they compose, their required keys given later
            for key in dotted_keys(content, known):
                assert key in known, f"{path}: {key}"
            assert compose_config([f"+recipe={path.stem}"], CONF_DIR) is not None
            continue
        for key in content:
            assert f"{group}.{key}" in known, f"{path}: {key}"
        assert load_config([f"{group}={path.stem}"])[group] is not None
    for group in ("data", "optim", "parallel", "trainer"):  # the schema's own options
        assert group_options(group)


def test_the_config_command_prints_the_config_and_errors_in_one_line():
    ok = subprocess.run([sys.executable, "-m", "megolmo.config", "trainer.max_steps=5"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and yaml.safe_load(ok.stdout)["trainer"]["max_steps"] == 5
    bad = subprocess.run([sys.executable, "-m", "megolmo.config", "+trainer.max_step=5"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.splitlines() == [
        "megolmo: error: trainer.max_step: unknown key in trainer; did you mean trainer.max_steps?"]


@pytest.mark.parametrize("override, nproc, message", [
    ("trainer.max_step=10", 4, "trainer.max_step: unknown key in trainer; did you mean trainer.max_steps?"),
    ("+trainer.max_step=10", 2, "trainer.max_step: unknown key in trainer; did you mean trainer.max_steps?"),
    ("trainer.max_steps=ten", 2, "trainer.max_steps: Value 'ten' of type 'str' could not be converted"),
    ("model=olmo3", 2, "model=olmo3: no such option"),
])
def test_config_errors_under_torchrun_are_printed_once_and_named_as_root_cause(override, nproc, message):
    result = run_entry_point([override], nproc=nproc, timeout=180)
    assert result.returncode != 0
    ours = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("megolmo:")]
    assert len(ours) == 1 and ours[0].startswith(f"megolmo: error: {message}"), ours  # rank 0 alone prints it
    assert torchrun_root_cause(result.stderr) == ours[0]


# -- the model from the checkpoint --------------------------------------------------------------------------
SMALL = ["model.hidden_size=64", "model.intermediate_size=160", "model.num_hidden_layers=3",
         "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.vocab_size=300", "model.name=small"]


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A trained checkpoint of an architecture no named config has."""
    work = tmp_path_factory.mktemp("small")
    tokens = write_tokens(work / "tokens.npy", 20_000, 300)
    data = [f"data.paths=[{tokens}]", "data.dtype=uint16", "data.seq_len=32", "trainer.global_batch_size=2",
            "trainer.micro_batch_size=2"]
    result = run_entry_point([*SMALL, *data, "trainer.max_steps=2", f"trainer.run_dir={work / 'pretrain'}"])
    assert result.returncode == 0, result.stderr
    return work / "pretrain" / "checkpoints" / "latest", data, work


def test_fine_tuning_takes_the_architecture_from_the_checkpoint(small_checkpoint):
    checkpoint, data, work = small_checkpoint
    result = run_entry_point([*data, f"load_path={checkpoint}", "reset_trainer_state=true", "trainer.max_steps=2",
                              f"trainer.run_dir={work / 'sft'}", "model.activation_checkpointing=true"])
    assert result.returncode == 0, result.stderr
    used = yaml.safe_load((work / "sft" / "config.yaml").read_text())["model"]
    saved = json.loads((checkpoint / "model_config.json").read_text())
    assert {k: used[k] for k in saved if k not in ("activation_checkpointing", "backend")} == {
        k: v for k, v in saved.items() if k not in ("activation_checkpointing", "backend")}
    assert used["activation_checkpointing"] is True and used["name"] == "small"


def test_a_contradicting_model_override_names_every_differing_field(small_checkpoint):
    checkpoint, data, work = small_checkpoint
    with pytest.raises(MegolmoConfigError) as raised:
        load_config([*data, f"load_path={checkpoint}", "model.hidden_size=128", "model.num_hidden_layers=3"])
    assert str(raised.value) == (
        f"load_path={checkpoint}: the checkpoint's model_config.json differs from the model.* overrides in "
        "hidden_size (checkpoint 64, given 128); leave the model settings out to use the checkpoint's")
    with pytest.raises(MegolmoConfigError, match=r"differs from model=olmo2_1b in vocab_size \(checkpoint 300, given "
                                                 r"100352\), hidden_size \(checkpoint 64, given 2048\), "):
        load_config([*data, f"load_path={checkpoint}", "model=olmo2_1b"])
    agreeing = load_config([*data, f"load_path={checkpoint}", *SMALL[:3]])
    assert agreeing.model.num_key_value_heads == 2  # the rest from the checkpoint
    resumed = load_config([*data, f"trainer.run_dir={checkpoint.parents[1]}"])  # resuming its own run directory
    assert (resumed.model.hidden_size, resumed.model.name) == (64, "small")


def test_a_hugging_face_directory_as_load_path_names_the_converter(small_checkpoint):
    checkpoint, data, work = small_checkpoint
    hf_dir = work / "hf"
    converted = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "megolmo-to-hf", str(checkpoint),
                                str(hf_dir)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert converted.returncode == 0, converted.stderr
    with pytest.raises(MegolmoConfigError) as raised:
        load_config([*data, f"load_path={hf_dir}"])
    assert str(raised.value) == (
        f"load_path={hf_dir} is a Hugging Face directory, not a megolmo checkpoint; convert it once with "
        f"`python tools/convert_checkpoint.py hf-to-megolmo {hf_dir} {hf_dir}-megolmo` and pass "
        f"load_path={hf_dir}-megolmo")
