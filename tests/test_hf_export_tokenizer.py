"""A Hugging Face export that works as OLMo 2's release does: with the real dolma2 tokenizer file given as
``--tokenizer``, ``megolmo-to-hf`` and ``soup.py --format hf`` write tokenizer.json, tokenizer_config.json,
special_tokens_map.json and generation_config.json, and the model card's usage (AutoTokenizer,
AutoModelForCausalLM, apply_chat_template, batched generate with padding) runs on the directory.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from megolmo.checkpoint.hf import convert_main
from megolmo.checkpoint.soup import main as soup_main
from megolmo.checkpoint.writer import write_megolmo
from megolmo.data.sft import OLMO2_CHAT_TEMPLATE, render
from megolmo.evaluation.assets import dolma2_tokenizer
from megolmo.model.config import ModelConfig
from tests.test_soup import RandomWeights

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

EOS, PAD = 100257, 100277
CFG = ModelConfig(name="tokenizer-export-test", vocab_size=100352, hidden_size=32, intermediate_size=48,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  eos_token_id=EOS, pad_token_id=PAD)
RELEASED_SPECIAL_TOKENS = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>",
                           "unk_token": "<|endoftext|>"}  # allenai/OLMo-2-1124-7B's special_tokens_map.json
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 12345 + 1?"},
            {"role": "assistant", "content": "12346."}, {"role": "user", "content": "And 99 + 1?"}]
PROMPTS = [[{"role": "user", "content": "Hi"}],
           [{"role": "user", "content": "Tell me, in many more words than the other prompt, about tokenizers."}]]
NEW_TOKENS = 3
# dolma2 splits digits in threes and keeps "\n\n\n" whole; GPT-2's pre-tokenizer would not.
DIGITS, DIGIT_IDS = "1234567 a\n\n\nb", [4513, 10961, 22, 264, 1432, 65]


@pytest.fixture(scope="module")
def tokenizer_file() -> Path:
    return dolma2_tokenizer()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf-tokenizer")


@pytest.fixture(scope="module")
def ingredients(work) -> list[Path]:
    return [write_megolmo(RandomWeights(CFG, seed), work / f"ckpt{seed}") for seed in (1, 2)]


def run_ok(main, *args) -> None:
    assert main([str(a) for a in args]) == 0


@pytest.fixture(scope="module", params=["megolmo-to-hf", "soup"])
def instruct(request, work, ingredients, tokenizer_file) -> Path:
    out = work / f"instruct-{request.param}"
    tokenizer = ("--tokenizer", tokenizer_file, "--chat-template", "olmo2")
    if request.param == "soup":
        run_ok(soup_main, "--output", out, "--format", "hf", *tokenizer, *ingredients)
    else:
        run_ok(convert_main, "megolmo-to-hf", ingredients[0], out, *tokenizer)
    return out


def test_files_are_as_olmo2_releases_them(instruct, tokenizer_file):
    assert (instruct / "tokenizer.json").read_bytes() == tokenizer_file.read_bytes()
    assert not (instruct / tokenizer_file.name).exists()
    assert json.loads((instruct / "special_tokens_map.json").read_text()) == RELEASED_SPECIAL_TOKENS
    config = json.loads((instruct / "tokenizer_config.json").read_text())
    assert {k: config[k] for k in RELEASED_SPECIAL_TOKENS} == RELEASED_SPECIAL_TOKENS
    assert config["model_max_length"] == 4096 and config["chat_template"] == OLMO2_CHAT_TEMPLATE
    generation = json.loads((instruct / "generation_config.json").read_text())
    assert generation == {"bos_token_id": None, "eos_token_id": EOS, "pad_token_id": PAD}


def test_model_card_usage(instruct, tokenizer_file):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(instruct)
    model = AutoModelForCausalLM.from_pretrained(instruct)
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id) == (EOS, PAD, EOS)
    assert model.generation_config.eos_token_id == EOS and model.generation_config.pad_token_id == PAD

    raw = Tokenizer.from_file(str(tokenizer_file))
    assert raw.encode(DIGITS, add_special_tokens=False).ids == DIGIT_IDS
    assert tokenizer(DIGITS)["input_ids"] == DIGIT_IDS
    inputs = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt")
    input_ids = inputs["input_ids"] if hasattr(inputs, "keys") else inputs  # transformers 5 / 4
    ours = raw.encode(render(MESSAGES)[0] + "<|assistant|>\n", add_special_tokens=False).ids
    assert input_ids.tolist() == [ours]

    tokenizer.padding_side = "left"  # for generation
    prompts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in PROMPTS]
    batch = tokenizer(prompts, padding=True, return_tensors="pt", return_token_type_ids=False)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths[0] < lengths[1] and batch["input_ids"][0, : lengths[1] - lengths[0]].eq(PAD).all()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
        alone = model.generate(**tokenizer(prompts[0], return_tensors="pt", return_token_type_ids=False),
                               max_new_tokens=NEW_TOKENS, do_sample=False)
    width = batch["input_ids"].shape[1]
    assert out.shape[0] == 2 and width < out.shape[1] <= width + NEW_TOKENS
    new, expected = out[0, width:].tolist(), alone[0, lengths[0]:].tolist()
    assert new[: len(expected)] == expected and all(t == PAD for t in new[len(expected):])  # padded rows agree
    assert isinstance(tokenizer.batch_decode(out, skip_special_tokens=True)[1], str)


def test_base_model_has_no_chat_template(work, ingredients, tokenizer_file):
    from transformers import AutoTokenizer
    run_ok(convert_main, "megolmo-to-hf", ingredients[0], work / "base", "--tokenizer", tokenizer_file)
    assert "chat_template" not in json.loads((work / "base" / "tokenizer_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(work / "base")
    assert tokenizer.chat_template is None
    with pytest.raises(ValueError):
        tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    batch = tokenizer(["a", "a longer text"], padding=True, return_tensors="pt")  # padding works on a base model
    assert batch["input_ids"].shape == (2, 3) and batch["input_ids"][0, -1] == PAD


def test_directory_tokenizer_is_copied_and_every_export_has_a_generation_config(work, ingredients, instruct):
    from transformers import AutoTokenizer
    tokdir = work / f"tokdir-{instruct.name}"
    tokdir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(instruct / name, tokdir / name)
    config = json.loads((tokdir / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tokdir / "tokenizer_config.json").write_text(json.dumps(config))
    # The tokenizer files alone (no olmo2 config.json beside them) load dolma2's pre-tokenizer too.
    assert AutoTokenizer.from_pretrained(tokdir)(DIGITS)["input_ids"] == DIGIT_IDS
    plain, chat, bare = (work / f"{kind}-{instruct.name}" for kind in ("dir", "dir-chat", "bare"))
    run_ok(convert_main, "megolmo-to-hf", ingredients[0], plain, "--tokenizer", tokdir)
    assert (plain / "tokenizer_config.json").read_bytes() == (tokdir / "tokenizer_config.json").read_bytes()
    run_ok(convert_main, "megolmo-to-hf", ingredients[0], chat, "--tokenizer", tokdir, "--chat-template", "olmo2")
    assert AutoTokenizer.from_pretrained(chat).chat_template == OLMO2_CHAT_TEMPLATE
    run_ok(convert_main, "megolmo-to-hf", ingredients[0], bare)
    assert not list(bare.glob("tokenizer*"))
    for directory in (plain, chat, bare):
        generation = json.loads((directory / "generation_config.json").read_text())
        assert generation == {"bos_token_id": None, "eos_token_id": EOS, "pad_token_id": PAD}


def one_error_line(capsys, main, *args) -> str:
    assert main([str(a) for a in args]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("megolmo: error: "), lines
    return lines[0]


@pytest.mark.parametrize("change, culprit", [
    ({"eos_token_id": 0}, "eos_token '<|endoftext|>' is id 100257 there, but {config} has eos_token_id 0"),
    ({"pad_token_id": 1}, "pad_token '<|pad|>' is id 100277 there, but {config} has pad_token_id 1"),
    ({"vocab_size": 1000}, "100278 tokens, more than vocab_size 1000 in {config}"),
], ids=["eos", "pad", "vocab"])
def test_model_config_that_disagrees_with_the_tokenizer(capsys, tmp_path, tokenizer_file, change, culprit):
    ckpt = write_megolmo(RandomWeights(ModelConfig(**{**CFG.to_dict(), **change}), 3), tmp_path / "ckpt")
    expected = f"--tokenizer {tokenizer_file}: " + culprit.format(config=ckpt / "model_config.json")
    args = ("--tokenizer", tokenizer_file)
    assert expected in one_error_line(capsys, convert_main, "megolmo-to-hf", ckpt, tmp_path / "out", *args)
    assert expected in one_error_line(capsys, soup_main, "--output", tmp_path / "out", "--format", "hf", *args,
                                      ckpt, ckpt)
    assert not (tmp_path / "out").exists()


def test_bad_tokenizer_options(capsys, tmp_path, ingredients):
    ckpt, out = ingredients[0], tmp_path / "out"
    assert "--chat-template olmo2: needs --tokenizer" in one_error_line(
        capsys, convert_main, "megolmo-to-hf", ckpt, out, "--chat-template", "olmo2")
    (tmp_path / "junk.json").write_text("{}")
    assert f"--tokenizer {tmp_path / 'junk.json'}: not a tokenizer.json file" in one_error_line(
        capsys, convert_main, "megolmo-to-hf", ckpt, out, "--tokenizer", tmp_path / "junk.json")
    assert f"--tokenizer {tmp_path / 'nope'}: no such file or directory" in one_error_line(
        capsys, convert_main, "megolmo-to-hf", ckpt, out, "--tokenizer", tmp_path / "nope")
    assert "--tokenizer: only for --format hf" in one_error_line(
        capsys, soup_main, "--output", out, "--tokenizer", tmp_path / "junk.json", ckpt, ckpt)
    assert not out.exists()


@pytest.mark.parametrize("main, args", [(convert_main, ["megolmo-to-hf", "--help"]), (soup_main, ["--help"])])
def test_help_names_the_options(capsys, main, args):
    with pytest.raises(SystemExit):
        main(args)
    text = " ".join(capsys.readouterr().out.split())
    assert "--tokenizer FILE|DIR" in text and "--chat-template {olmo2}" in text and "allenai_dolma2.json" in text
