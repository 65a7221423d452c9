"""Tokenizing text into token files (megolmo.data.prepare, tools/prepare_data.py) and the demo corpus."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megolmo.data import prepare
from megolmo.data.dataset import TokenDataset
from megolmo.data.demo_corpus import build_demo_corpus
from megolmo.data.prepare import prepare_data
from megolmo.data.token_file import TokenFile
from megolmo.errors import MegolmoConfigError

REPO = Path(__file__).resolve().parents[1]
DOCS = [f"Document number {i}: the quick brown fox jumps over {i % 7} lazy dogs. Café ✓" for i in range(20)]


def make_tokenizer(path: Path, special_tokens: list[str]) -> str:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(DOCS, trainer=trainer)
    tokenizer.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> str:
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json", ["<|pad|>", "<|endoftext|>"])


@pytest.fixture
def inputs(tmp_path) -> list[str]:
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS[:-1])) + "\n")
    txt = tmp_path / "story.txt"
    txt.write_text(DOCS[-1] + "\n\nSecond paragraph, same document.\n")
    return [str(jsonl), str(txt)]


def split_documents(tokens: np.ndarray, eos: int) -> list[list[int]]:
    assert tokens[-1] == eos
    documents, start = [], 0
    for end in np.flatnonzero(tokens == eos):
        documents.append(tokens[start:end].tolist())
        start = end + 1
    return documents


def test_round_trip_jsonl_and_text(tmp_path, tokenizer_path, inputs):
    out = prepare_data(inputs, tokenizer_path, str(tmp_path / "out"), progress=False)
    assert out == str(tmp_path / "out" / "tokens.npy")
    tokenizer = Tokenizer.from_file(tokenizer_path)
    eos = tokenizer.token_to_id("<|endoftext|>")
    assert eos == 1
    tokens = np.fromfile(out, dtype=np.uint16)  # default dtype: the 400-token vocabulary fits
    documents = split_documents(tokens, eos)
    expected = DOCS[:-1] + [Path(inputs[1]).read_text()]
    assert [tokenizer.decode(d) for d in documents] == expected


def test_workers_give_identical_bytes(tmp_path, tokenizer_path, inputs, monkeypatch):
    monkeypatch.setattr(prepare, "CHUNK_DOCUMENTS", 3)  # several chunks, so order across workers matters
    one = prepare_data(inputs, tokenizer_path, str(tmp_path / "one"), workers=1, progress=False)
    two = prepare_data(inputs, tokenizer_path, str(tmp_path / "two"), workers=2, progress=False)
    assert Path(one).read_bytes() == Path(two).read_bytes()


def test_dtype_and_eos_options(tmp_path, tokenizer_path, inputs):
    out = prepare_data(inputs, tokenizer_path, str(tmp_path), dtype="uint32", eos_id=0, progress=False)
    tokens = np.fromfile(out, dtype=np.uint32)
    assert len(split_documents(tokens, 0)) == len(DOCS)
    assert not np.any(tokens == 1)
    with pytest.raises(MegolmoConfigError, match="--eos-id 400"):
        prepare_data(inputs, tokenizer_path, str(tmp_path), eos_id=400, progress=False)


def test_tokenizer_without_eos_needs_eos_id(tmp_path, inputs):
    no_eos = make_tokenizer(tmp_path / "plain.json", ["<|pad|>"])
    with pytest.raises(MegolmoConfigError, match="--eos-id"):
        prepare_data(inputs, no_eos, str(tmp_path), progress=False)


@pytest.mark.parametrize(
    "content,match",
    [
        ('{"text": "ok"}\n\n{"text": "fine"\n', r"bad\.jsonl:3: invalid JSON"),
        ('{"text": "ok"}\n{"body": "no text"}\n', r"bad\.jsonl:2: expected a JSON object with a string 'text'"),
        ('["text"]\n', r"bad\.jsonl:1: expected a JSON object"),
        ("\n", r"no documents"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, tokenizer_path, content, match):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    with pytest.raises(MegolmoConfigError, match=match):
        prepare_data([str(bad)], tokenizer_path, str(tmp_path / "out"), progress=False)
    assert not os.listdir(tmp_path / "out")  # no partial output left behind


def test_bad_input_found_while_workers_run(tmp_path, tokenizer_path, monkeypatch):
    monkeypatch.setattr(prepare, "CHUNK_DOCUMENTS", 2)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n' * 5 + "{oops\n")
    with pytest.raises(MegolmoConfigError, match=r"bad\.jsonl:6: invalid JSON"):
        prepare_data([str(bad)], tokenizer_path, str(tmp_path / "out"), workers=2, progress=False)
    assert not os.listdir(tmp_path / "out")


def test_missing_input(tmp_path, tokenizer_path):
    with pytest.raises(MegolmoConfigError, match=re.escape(f"{tmp_path}/gone.txt: no such file")):
        prepare_data([str(tmp_path / "gone.txt")], tokenizer_path, str(tmp_path), progress=False)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ""}
    cmd = [sys.executable, str(REPO / "tools" / "prepare_data.py"), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_cli_from_another_directory(tmp_path, tokenizer_path, inputs):
    ok = run_cli("--tokenizer", tokenizer_path, "--output", str(tmp_path / "cli"), *inputs, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    reference = prepare_data(inputs, tokenizer_path, str(tmp_path / "ref"), progress=False)
    assert (tmp_path / "cli" / "tokens.npy").read_bytes() == Path(reference).read_bytes()

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    failed = run_cli("--tokenizer", tokenizer_path, "--output", str(tmp_path / "x"), str(bad), cwd=tmp_path)
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines()[-1].startswith(f"error: input {bad}:2: invalid JSON")


def test_demo_corpus_is_loadable_and_idempotent(tmp_path):
    paths = build_demo_corpus(str(tmp_path))
    tokenizer = Tokenizer.from_file(paths["tokenizer.json"])
    assert tokenizer.token_to_id("<|endoftext|>") == 0
    vocab = tokenizer.get_vocab_size()
    ds = TokenDataset([paths["tokens.npy"]], seq_len=128, dtype="uint16", vocab_size=vocab, seed=0)
    assert len(ds) > 1000
    first = json.loads(Path(paths["corpus.jsonl"]).read_text().splitlines()[0])["text"]
    tokens = TokenFile(paths["tokens.npy"], 128, "uint16", vocab).tokens(0).tolist()
    assert tokenizer.decode(tokens[: tokens.index(0)]) == first

    stamps = {name: os.stat(p).st_mtime_ns for name, p in paths.items()}
    assert build_demo_corpus(str(tmp_path)) == paths
    assert {name: os.stat(p).st_mtime_ns for name, p in paths.items()} == stamps
