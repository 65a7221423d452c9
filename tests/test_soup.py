"""Model soups on real checkpoint files: megolmo and HF inputs, megolmo and HF outputs, refusals."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megolmo.checkpoint.hf import HFCheckpoint, write_hf
from megolmo.checkpoint.reader import MegolmoCheckpoint, TensorSource, expected_tensors
from megolmo.checkpoint.soup import main as soup_main
from megolmo.checkpoint.writer import write_megolmo
from megolmo.model.config import ModelConfig
from tests.helpers import ROOT

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

CFG = ModelConfig(name="soup-test", vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, eos_token_id=0, pad_token_id=None)


class RandomWeights(TensorSource):
    """Seeded random weights for a config, held in memory (what a training run would have produced)."""

    kind = "random"

    def __init__(self, cfg: ModelConfig, seed: int):
        self.config, self.path = cfg, Path(f"random-{seed}")
        self.shapes = expected_tensors(cfg)
        generator = torch.Generator().manual_seed(seed)
        self.tensors = {name: torch.randn(shape, generator=generator) for name, shape in self.shapes.items()}

    def read(self, name: str) -> torch.Tensor:
        return self.tensors[name].clone()


@pytest.fixture(scope="module")
def ingredients(tmp_path_factory) -> tuple[list[Path], list[RandomWeights]]:
    base = tmp_path_factory.mktemp("soup")
    sources = [RandomWeights(CFG, seed) for seed in (1, 2, 3)]
    paths = [write_megolmo(source, base / f"ingredient{i}") for i, source in enumerate(sources)]
    return paths, sources


def soup(capsys, *args) -> tuple[int, str]:
    code = soup_main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_uniform_soup_is_the_mean(capsys, tmp_path, ingredients):
    paths, sources = ingredients
    assert soup(capsys, "--output", tmp_path / "out", *paths)[0] == 0
    result = MegolmoCheckpoint(tmp_path / "out")
    assert list(result.shapes) == list(expected_tensors(CFG))
    for name in result.shapes:
        expected = torch.stack([s.tensors[name] for s in sources]).mean(0)
        torch.testing.assert_close(result.read(name), expected, rtol=1e-6, atol=1e-6)


def test_weighted_soup_and_hf_output(capsys, tmp_path, ingredients):
    from transformers import Olmo2ForCausalLM
    paths, sources = ingredients
    assert soup(capsys, "--output", tmp_path / "hf", "--format", "hf", "--weights", "1", "2", "1", *paths)[0] == 0
    model = Olmo2ForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    state = model.state_dict()
    for name in expected_tensors(CFG):
        expected = 0.25 * sources[0].tensors[name] + 0.5 * sources[1].tensors[name] + 0.25 * sources[2].tensors[name]
        torch.testing.assert_close(state[name], expected, rtol=1e-6, atol=1e-6)
    assert model.config.num_key_value_heads == 2 and model.config.tie_word_embeddings is False


def test_hf_and_megolmo_inputs_mix(capsys, tmp_path, ingredients):
    paths, _ = ingredients
    hf = write_hf(MegolmoCheckpoint(paths[0]), tmp_path / "ingredient0-hf", max_shard_size="20KB")
    assert len(list(hf.glob("*.safetensors"))) > 1
    assert soup(capsys, "--output", tmp_path / "mixed", hf, paths[1], paths[2])[0] == 0
    assert soup(capsys, "--output", tmp_path / "pure", *paths)[0] == 0
    mixed, pure = MegolmoCheckpoint(tmp_path / "mixed"), MegolmoCheckpoint(tmp_path / "pure")
    for name in pure.shapes:  # HF fp32 round-trips exactly, so the soups agree bit for bit
        assert torch.equal(mixed.read(name), pure.read(name)), name
    # HF output of an all-HF soup.
    assert soup(capsys, "--output", tmp_path / "hf-soup", "--format", "hf", "--dtype", "bf16", hf, hf)[0] == 0
    out = HFCheckpoint(tmp_path / "hf-soup")
    assert torch.equal(out.read("lm_head.weight"), MegolmoCheckpoint(paths[0]).read("lm_head.weight").bfloat16().float())


@pytest.mark.parametrize("change, culprit", [
    ({"intermediate_size": 64}, "tensor model.layers.0.mlp.gate_proj.weight has shape [48, 32] in {a} but [64, 32] "
                                "in {b}"),
    ({"num_hidden_layers": 1}, "tensor model.layers.1.self_attn.q_proj.weight (shape [32, 32] in {a}) is missing "
                               "from {b}"),
    ({"num_attention_heads": 2, "num_key_value_heads": 1}, "model num_attention_heads is 4 in {a} but 2 in {b}"),
    ({"rope_theta": 10000.0}, "model rope_theta is 500000.0 in {a} but 10000.0 in {b}"),
])
def test_different_architectures_are_refused(capsys, tmp_path, ingredients, change, culprit):
    paths, _ = ingredients
    other = write_megolmo(RandomWeights(ModelConfig(**{**CFG.to_dict(), **change}), 7), tmp_path / "other")
    code, err = soup(capsys, "--output", tmp_path / "out", paths[0], other)
    assert code == 2 and err.count("\n") == 1 and err.startswith("megolmo: error: cannot soup")
    assert culprit.format(a=paths[0], b=other) in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("weights, culprit", [
    (["1", "-1", "1"], "--weights: -1.0 is not allowed"),
    (["0", "0", "0"], "the weights sum to zero"),
    (["1", "2"], "--weights: 2 weights for 3 input checkpoints"),
])
def test_bad_weights(capsys, tmp_path, ingredients, weights, culprit):
    paths, _ = ingredients
    code, err = soup(capsys, "--output", tmp_path / "out", "--weights", *weights, *paths)
    assert code == 2 and err.count("\n") == 1 and culprit in err


def test_bad_inputs(capsys, tmp_path, ingredients):
    paths, _ = ingredients
    code, err = soup(capsys, "--output", tmp_path / "out", paths[0], tmp_path / "missing")
    assert code == 2 and err == f"megolmo: error: input {tmp_path / 'missing'}: no such directory\n"
    (tmp_path / "junk").mkdir()
    code, err = soup(capsys, "--output", tmp_path / "out", paths[0], tmp_path / "junk")
    assert code == 2 and "neither a megolmo checkpoint" in err and str(tmp_path / "junk") in err
    code, err = soup(capsys, "--output", tmp_path / "out", paths[0])
    assert code == 2 and "at least two input checkpoints" in err


def test_tool_end_to_end(tmp_path, ingredients):
    paths, sources = ingredients
    proc = subprocess.run([sys.executable, "tools/soup.py", "--output", str(tmp_path / "out"), "--weights", "3", "1",
                           str(paths[0]), str(paths[1])], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = MegolmoCheckpoint(tmp_path / "out").read("model.norm.weight")
    expected = 0.75 * sources[0].tensors["model.norm.weight"] + 0.25 * sources[1].tensors["model.norm.weight"]
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
