"""HF <-> megolmo conversion on real transformers models and real files.

A random GQA ``Olmo2ForCausalLM`` (sharded safetensors) is converted to a megolmo checkpoint, trained from
by the real trainer under TP=2 x PP=2 (its step-1 loss must be transformers' loss on the same batch), and
converted back (bit-identical in fp32, the bf16 cast in bf16). The trainer's own step-1 checkpoint,
written by four ranks in pieces and holding optimizer state, is exported too: its HF model must give the
trainer's step-2 loss. Bad inputs give one-line errors naming the culprit.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from megolmo.checkpoint.hf import convert_main
from megolmo.checkpoint.reader import MegolmoCheckpoint
from megolmo.data.loader import build_loader
from megolmo.model.config import ModelConfig
from megolmo.model.hf_config import hf_config
from tests.conftest import write_tokens
from tests.helpers import ROOT, run_entry_point

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

CFG = ModelConfig(name="convert-test", vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5,
                  max_position_embeddings=128, eos_token_id=0, pad_token_id=None)
SEQ_LEN, GLOBAL_BATCH = 32, 4


def load_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def hf_model(directory: Path):
    from transformers import Olmo2ForCausalLM
    return Olmo2ForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def hf_dir(work) -> Path:
    """A random GQA model, norm weights randomised too, saved in five safetensors shards with an index."""
    from transformers import Olmo2ForCausalLM
    torch.manual_seed(0)
    model = Olmo2ForCausalLM(hf_config(CFG))
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(work / "hf", max_shard_size="100KB")
    assert (work / "hf" / "model.safetensors.index.json").exists()
    assert len(list((work / "hf").glob("*.safetensors"))) > 1
    return work / "hf"


@pytest.fixture(scope="module")
def ckpt(work, hf_dir) -> Path:
    assert convert_main(["hf-to-megolmo", str(hf_dir), str(work / "ckpt")]) == 0
    return work / "ckpt"


def test_converted_checkpoint_is_an_ordinary_weights_only_checkpoint(ckpt, hf_dir):
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 0 and state["tokens"] == 0 and state["optimizer_steps"] == 0
    assert ModelConfig.from_mapping(json.loads((ckpt / "model_config.json").read_text())).rope_theta == 10000.0
    assert (ckpt / "manifest.json").exists() and [p.name for p in ckpt.glob("*.distcp")] == ["__0_0.distcp"]
    original = load_safetensors_dir(hf_dir)
    source = MegolmoCheckpoint(ckpt)
    assert list(source.shapes) == list(hf_model(hf_dir).state_dict())  # transformers' order
    meta = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    assert set(meta) == {f"model/{name}" for name in original}
    assert all(entry.properties.dtype == torch.float32 for entry in meta.values())
    for name, tensor in original.items():
        assert torch.equal(source.read(name), tensor), name


@pytest.fixture(scope="module")
def trained(work, ckpt) -> tuple[Path, list[dict], Path]:
    """Two steps of the real trainer from the converted checkpoint under TP=2 x PP=2 (4 gloo ranks)."""
    tokens = write_tokens(work / "tokens.npy", 20_000, CFG.vocab_size)
    run = work / "run"
    model = [f"model.{key}={getattr(CFG, key)}" for key in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "rope_theta", "rms_norm_eps", "max_position_embeddings")]
    result = run_entry_point([
        f"load_path={ckpt}", "reset_trainer_state=true", *model, f"data.paths=[{tokens}]", "data.dtype=uint16",
        f"data.seq_len={SEQ_LEN}", f"trainer.global_batch_size={GLOBAL_BATCH}", "trainer.micro_batch_size=1",
        "trainer.max_steps=2", "trainer.save_interval=1", "trainer.keep_last=2", "optim.lr=1e-2",
        "parallel.tensor=2", "parallel.pipeline=2", "parallel.timeout_s=60", f"trainer.run_dir={run}"], nproc=4)
    assert result.returncode == 0, result.stderr[-5000:]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return run, metrics, Path(tokens)


def global_batch(tokens: Path, step: int) -> torch.Tensor:
    """The trainer's global batch of ``step`` (its loader, one DP rank, concatenated micro-batches)."""
    loader = build_loader({"paths": [str(tokens)], "seq_len": SEQ_LEN, "dtype": "uint16", "seed": 0},
                          {"global_batch_size": GLOBAL_BATCH, "micro_batch_size": 1}, CFG.vocab_size, 0, 1)
    return torch.cat([mb["input_ids"] for mb in loader.micro_batches(step)])


@torch.no_grad()
def hf_loss(directory: Path, input_ids: torch.Tensor) -> float:
    """Mean CE over positions 1..seq-1 of every row (transformers shifts the labels itself)."""
    return hf_model(directory)(input_ids=input_ids, labels=input_ids).loss.item()


def test_trainer_under_tp2_pp2_starts_from_the_converted_weights(trained, hf_dir):
    run, metrics, tokens = trained
    assert [m["step"] for m in metrics] == [1, 2]
    expected = hf_loss(hf_dir, global_batch(tokens, 0))
    assert metrics[0]["loss"] == pytest.approx(expected, rel=1e-5)


def test_trainer_checkpoint_written_in_pieces_exports_to_hf(trained, work):
    """The step-1 checkpoint (4 ranks' pieces, with optimizer state) -> HF gives the trainer's step-2 loss."""
    run, metrics, tokens = trained
    step1 = next(p for p in (run / "checkpoints").iterdir() if p.name.startswith("stage1-step1-"))
    saved = dcp.FileSystemReader(str(step1)).read_metadata().state_dict_metadata
    assert any(key.startswith("optim/") for key in saved)
    assert convert_main(["megolmo-to-hf", str(step1), str(work / "hf-step1")]) == 0
    assert metrics[1]["loss"] == pytest.approx(hf_loss(work / "hf-step1", global_batch(tokens, 1)), rel=1e-5)
    # A run directory resolves to its latest checkpoint (step 2).
    assert convert_main(["megolmo-to-hf", str(run), str(work / "hf-latest"), "--dtype", "bf16"]) == 0
    latest = MegolmoCheckpoint(run)
    assert latest.path.name.startswith("stage1-step2-")
    exported = load_safetensors_dir(work / "hf-latest")
    assert all(torch.equal(exported[name], latest.read(name).bfloat16()) for name in latest.shapes)


def test_round_trip_back_to_hf_is_bit_identical(work, ckpt, hf_dir):
    from transformers import AutoConfig
    out = work / "back-fp32"
    assert convert_main(["megolmo-to-hf", str(ckpt), str(out), "--max-shard-size", "100KB"]) == 0
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("*.safetensors"))) > 1
    original, back = load_safetensors_dir(hf_dir), load_safetensors_dir(out)
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert back[name].dtype == torch.float32 and torch.equal(back[name], tensor), name
    skip = {"transformers_version", "_name_or_path", "dtype"}
    a, b = AutoConfig.from_pretrained(hf_dir).to_dict(), AutoConfig.from_pretrained(out).to_dict()
    assert {k: v for k, v in b.items() if k not in skip} == {k: v for k, v in a.items() if k not in skip}
    assert b["rope_parameters"]["rope_theta"] == 10000.0 and b["rms_norm_eps"] == 1e-5 and b["bos_token_id"] is None
    ids = torch.randint(0, CFG.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(hf_model(out)(ids).logits, hf_model(hf_dir)(ids).logits)


def test_bf16_export_is_the_bf16_cast_and_carries_the_tokenizer(work, ckpt, hf_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<unk>").save_pretrained(work / "tok")
    out = work / "back-bf16"
    assert convert_main(["megolmo-to-hf", str(ckpt), str(out), "--dtype", "bf16", "--tokenizer",
                         str(work / "tok")]) == 0
    assert (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists()
    original, back = load_safetensors_dir(hf_dir), load_safetensors_dir(out)
    for name, tensor in original.items():
        assert back[name].dtype == torch.bfloat16 and torch.equal(back[name], tensor.bfloat16()), name
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert hf_model(out).model.embed_tokens.weight.shape == (CFG.vocab_size, CFG.hidden_size)
    assert AutoTokenizer.from_pretrained(out)("hello world")["input_ids"] == [1, 2]


def test_tied_embeddings_are_untied(tmp_path):
    """A tied model stores no lm_head: the megolmo checkpoint gets a copy of the embedding."""
    from transformers import Olmo2Config, Olmo2ForCausalLM
    config = hf_config(CFG).to_dict()
    config["tie_word_embeddings"] = True
    model = Olmo2ForCausalLM(Olmo2Config(**{k: v for k, v in config.items() if k != "model_type"}))
    model.save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in load_safetensors_dir(tmp_path / "tied")
    assert convert_main(["hf-to-megolmo", str(tmp_path / "tied"), str(tmp_path / "ckpt")]) == 0
    source = MegolmoCheckpoint(tmp_path / "ckpt")
    assert torch.equal(source.read("lm_head.weight"), model.model.embed_tokens.weight.detach())


# -- bad inputs: one line, exit code 2, naming the culprit -------------------------------------------------

def run_cli(capsys, *args: str) -> str:
    assert convert_main([str(a) for a in args]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("megolmo: error: "), lines
    return lines[0]


def test_missing_and_wrong_inputs(capsys, tmp_path, ckpt, hf_dir):
    assert "/nonexistent/hf: no such directory" in run_cli(capsys, "hf-to-megolmo", "/nonexistent/hf", tmp_path / "o")
    assert "/nonexistent/ck: no such directory" in run_cli(capsys, "megolmo-to-hf", "/nonexistent/ck", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    assert "not a Hugging Face model directory" in run_cli(capsys, "hf-to-megolmo", tmp_path / "empty", tmp_path / "o")
    assert "manifest.json is missing" in run_cli(capsys, "megolmo-to-hf", tmp_path / "empty", tmp_path / "o")
    assert "it is a megolmo checkpoint" in run_cli(capsys, "hf-to-megolmo", ckpt, tmp_path / "o")
    assert "not a megolmo checkpoint (use hf-to-megolmo)" in run_cli(capsys, "megolmo-to-hf", hf_dir, tmp_path / "o")
    assert "already exists and is not empty" in run_cli(capsys, "hf-to-megolmo", hf_dir, ckpt)
    assert not (tmp_path / "o").exists()


def test_missing_index_shard(capsys, tmp_path, hf_dir):
    broken = shutil.copytree(hf_dir, tmp_path / "hf")
    victim = sorted(broken.glob("model-*.safetensors"))[1]
    victim.unlink()
    line = run_cli(capsys, "hf-to-megolmo", broken, tmp_path / "out")
    assert f"shard {victim} named in model.safetensors.index.json is missing" in line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


def test_truncated_safetensors_shard(capsys, tmp_path, hf_dir):
    broken = shutil.copytree(hf_dir, tmp_path / "hf")
    victim = sorted(broken.glob("model-*.safetensors"))[0]
    os.truncate(victim, victim.stat().st_size - 100)
    assert f"safetensors file {victim}: truncated" in run_cli(capsys, "hf-to-megolmo", broken, tmp_path / "out")


def test_truncated_megolmo_shard(capsys, tmp_path, ckpt):
    broken = shutil.copytree(ckpt, tmp_path / "ckpt")
    os.truncate(broken / "__0_0.distcp", 1000)
    line = run_cli(capsys, "megolmo-to-hf", broken, tmp_path / "out")
    assert f"shard {broken / '__0_0.distcp'} is truncated" in line
    (broken / "__0_0.distcp").unlink()
    assert f"shard {broken / '__0_0.distcp'} is missing" in run_cli(capsys, "megolmo-to-hf", broken, tmp_path / "o")


def test_tool_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "hf-to-megolmo", str(tmp_path / "nope"),
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"megolmo: error: Hugging Face directory {tmp_path / 'nope'}: no such directory"
