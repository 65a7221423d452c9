"""Which files a run reads (megolmo.data.sources), their sidecars and dtype refusals, the filter in the loader."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from tokenizers import Tokenizer

from megolmo.data import prepare
from megolmo.data.loader import build_loader
from megolmo.data.prepare import prepare_data
from megolmo.data.sidecar import TokenFileInfo, read_sidecar, sidecar_path, write_sidecar
from megolmo.data.sources import MIX_DIR, resolve_sources
from megolmo.errors import MegolmoConfigError
from tests.test_data import one_line, raises_naming, write
from tests.test_prepare_data import DOCS, make_tokenizer

SEQ = 16
TRAINER = {"global_batch_size": 4, "micro_batch_size": 2}


def mix_files(name: str) -> list[str]:
    """The mix's relative paths in order, read from its YAML independently of resolve_sources."""
    mix = yaml.safe_load((MIX_DIR / f"{name}.yaml").read_text(encoding="utf-8"))
    return [p for source in mix["sources"] for p in source["paths"]]


def touch(root: Path, relative: str, size: int = 0) -> str:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00" * size)
    return str(path)


def write_mix(mix_dir: Path, name: str, sources: list[dict], dtype: str = "uint16") -> Path:
    mix_dir.mkdir(parents=True, exist_ok=True)
    path = mix_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "dtype": dtype, "sources": sources}), encoding="utf-8")
    return path


# --- named mixes -------------------------------------------------------------------------------------


def test_dolmino_mix_missing_files_in_one_error(tmp_path):
    relative = mix_files("dolmino-mix-1124")
    assert len(relative) == len(set(relative)) == 576
    root = tmp_path / "root"
    cfg = {"mix": "dolmino-mix-1124", "root": str(root)}
    with raises_naming("data.mix=dolmino-mix-1124", f"576 of 576 files missing under data.root={root}") as e:
        resolve_sources(cfg)
    message = one_line(e)
    first_five = [os.path.join(root, p) for p in relative[:5]]
    assert message.endswith(": " + ", ".join(first_five) + ", ... (571 more)")
    assert message.count(".npy") == 5

    absent = {17, 400}
    for i, p in enumerate(relative):
        if i not in absent:
            touch(root, p)
    with raises_naming(f"2 of 576 files missing under data.root={root}") as e:
        resolve_sources(cfg)
    message = one_line(e)
    assert message.endswith(": " + ", ".join(os.path.join(root, relative[i]) for i in sorted(absent)))
    assert message.count(".npy") == 2 and "more" not in message

    for i in absent:
        touch(root, relative[i])
    sources = resolve_sources(OmegaConf.create(cfg))
    assert sources.paths == [os.path.join(root, p) for p in relative]
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in sources.paths)
    assert sources.relative_paths == relative
    assert sources.dtype == "uint32"
    assert sources.weights is None and sources.label_mask_paths is None


def test_olmo_mix_parses_with_its_repeats(tmp_path):
    relative = mix_files("olmo-mix-1124")
    assert len(relative) == 1122 and len(set(relative)) == 1117
    cfg = {"mix": "olmo-mix-1124", "root": str(tmp_path)}
    with raises_naming(f"1117 of 1117 files missing under data.root={tmp_path}", "(1112 more)") as e:
        resolve_sources(cfg)
    one_line(e)
    for p in set(relative):
        touch(tmp_path, p)
    sources = resolve_sources(cfg)
    assert len(sources.paths) == 1122 and len(set(sources.paths)) == 1117
    assert sources.relative_paths == relative
    assert sources.dtype == "uint32" and sources.weights is None


def test_source_weights_split_over_files_by_size(tmp_path):
    mix_dir, root = tmp_path / "mixes", tmp_path / "root"
    write_mix(mix_dir, "tiny", [
        {"name": "a", "weight": 3.0, "paths": ["a/1.npy", "a/2.npy"]},
        {"name": "b", "weight": 1.0, "paths": ["b/1.npy"]},
    ])
    touch(root, "a/1.npy", 100)
    touch(root, "a/2.npy", 300)
    touch(root, "b/1.npy", 50)
    sources = resolve_sources({"mix": "tiny", "root": str(root)}, mix_dir)
    assert sources.dtype == "uint16"
    np.testing.assert_allclose(sources.weights, [3.0 * 100 / 400, 3.0 * 300 / 400, 1.0])
    assert sum(sources.weights[:2]) / sources.weights[2] == pytest.approx(3.0)  # source a : source b = 3 : 1


def test_sources_with_equal_weights_keep_their_own_shares(tmp_path):
    """Two sources of weight 1 each get half the mixture, whatever their sizes."""
    mix_dir, root = tmp_path / "mixes", tmp_path / "root"
    write_mix(mix_dir, "even", [
        {"name": "small", "weight": 1.0, "paths": ["s/1.npy"]},
        {"name": "large", "weight": 1.0, "paths": ["l/1.npy", "l/2.npy"]},
    ])
    touch(root, "s/1.npy", 100)
    touch(root, "l/1.npy", 300)
    touch(root, "l/2.npy", 100)
    sources = resolve_sources({"mix": "even", "root": str(root)}, mix_dir)
    np.testing.assert_allclose(sources.weights, [1.0, 0.75, 0.25])


def test_weighted_mix_sets_dataset_proportions(tmp_path):
    mix_dir, root = tmp_path / "mixes", tmp_path / "root"
    write_mix(mix_dir, "mixed", [
        {"name": "a", "weight": 1.0, "paths": ["a.npy"]},
        {"name": "b", "weight": 3.0, "paths": ["b.npy"]},
    ])
    root.mkdir()
    write(root / "a.npy", np.arange(40 * 8) % 100)
    write(root / "b.npy", 100 + np.arange(40 * 8) % 100)
    cfg = {"mix": "mixed", "root": str(root), "seq_len": 8, "seed": 0}
    loader = build_loader(cfg, TRAINER, 1000, 0, 1, sources=resolve_sources(cfg, mix_dir))
    assert loader.dataset.counts == [20, 60]


def test_mix_with_some_weights_refused(tmp_path):
    mix_dir, root = tmp_path / "mixes", tmp_path / "root"
    path = write_mix(mix_dir, "partial", [
        {"name": "a", "weight": 2.0, "paths": ["a.npy"]},
        {"name": "b", "paths": ["b.npy"]},
    ])
    touch(root, "a.npy", 8)
    touch(root, "b.npy", 8)
    with raises_naming(str(path), "every source a weight") as e:
        resolve_sources({"mix": "partial", "root": str(root)}, mix_dir)
    one_line(e)


def test_mix_with_a_bad_dtype_refused(tmp_path):
    path = write_mix(tmp_path, "odd", [{"name": "a", "paths": ["a.npy"]}], dtype="int8")
    with raises_naming(str(path), "dtype='int8'"):
        resolve_sources({"mix": "odd", "root": str(tmp_path)}, tmp_path)


@pytest.mark.parametrize(
    "extra,parts",
    [
        ({"paths": ["x.npy"]}, ["data.paths", "data.mix=dolmino-mix-1124"]),
        ({"label_mask_paths": ["x.mask"]}, ["data.label_mask_paths", "data.mix=dolmino-mix-1124"]),
        ({"weights": [1.0]}, ["data.weights", "data.mix=dolmino-mix-1124"]),
        ({"root": None}, ["data.mix=dolmino-mix-1124", "data.root"]),
        ({"mix": "no-such-mix"}, ["data.mix=no-such-mix", "dolmino-mix-1124, olmo-mix-1124"]),
    ],
)
def test_refused_mix_combinations_name_the_key(tmp_path, extra, parts):
    cfg = {"mix": "dolmino-mix-1124", "root": str(tmp_path)} | extra
    with raises_naming(*parts) as e:
        resolve_sources(cfg)
    one_line(e)


def test_data_dtype_against_the_mix(tmp_path):
    write_mix(tmp_path / "mixes", "small", [{"name": "a", "paths": ["a.npy"]}], dtype="uint16")
    touch(tmp_path, "a.npy", 64)
    cfg = {"mix": "small", "root": str(tmp_path)}
    with raises_naming("data.dtype=uint32", "small", "uint16") as e:
        resolve_sources({**cfg, "dtype": "uint32"}, tmp_path / "mixes")
    one_line(e)
    assert resolve_sources({**cfg, "dtype": "uint16"}, tmp_path / "mixes").dtype == "uint16"
    assert resolve_sources(cfg, tmp_path / "mixes").dtype == "uint16"


# --- data.paths --------------------------------------------------------------------------------------


def test_paths_relative_to_root(tmp_path):
    root = tmp_path / "root"
    a = touch(root, "sub/a.npy", 8)
    mask = touch(root, "sub/a.mask", 4)
    elsewhere = touch(tmp_path, "outside/b.npy", 8)
    sources = resolve_sources({"root": str(root), "paths": ["sub/a.npy", elsewhere],
                               "label_mask_paths": ["sub/a.mask", elsewhere]})
    assert sources.paths == [a, elsewhere]
    assert sources.label_mask_paths == [mask, elsewhere]
    assert sources.relative_paths == ["sub/a.npy", elsewhere]
    assert sources.dtype == "uint32" and sources.weights is None


def test_missing_paths_in_one_error(tmp_path):
    touch(tmp_path, "a.npy", 8)
    with raises_naming("data.paths: 2 of 3 files missing", f"data.root={tmp_path}",
                       str(tmp_path / "b.npy"), str(tmp_path / "c.npy")) as e:
        resolve_sources({"root": str(tmp_path), "paths": ["a.npy", "b.npy", "c.npy"]})
    assert "more" not in one_line(e)
    with raises_naming("data.paths: no such file", str(tmp_path / "z.npy")):
        resolve_sources({"paths": str(tmp_path / "z.npy")})
    with raises_naming("data.label_mask_paths", str(tmp_path / "a.mask")):
        resolve_sources({"root": str(tmp_path), "paths": ["a.npy"], "label_mask_paths": ["a.mask"]})
    with raises_naming("data.paths"):
        resolve_sources({"root": str(tmp_path), "paths": []})


def info(dtype: str, num_tokens: int = 32) -> TokenFileInfo:
    return TokenFileInfo(dtype, num_tokens, 1, 300, 0, "0" * 64)


def test_dtype_from_sidecars(tmp_path):
    a = touch(tmp_path, "a.npy", 64)
    b = touch(tmp_path, "b.npy", 64)
    c = touch(tmp_path, "c.npy", 64)
    paths = {"paths": [a, b, c]}
    assert resolve_sources(paths).dtype == "uint32"  # no sidecar: the default
    write_sidecar(b, info("uint16"))
    assert resolve_sources(paths).dtype == "uint16"  # one sidecar speaks for the run
    assert resolve_sources({**paths, "dtype": "uint32"}).dtype == "uint32"  # set: taken as given here
    write_sidecar(a, info("uint16"))
    assert resolve_sources(paths).dtype == "uint16"
    write_sidecar(c, info("uint32"))
    with raises_naming(a, "uint16", c, "uint32", "different dtypes") as e:
        resolve_sources(paths)
    one_line(e)


# --- sidecars and dtype refusals with prepare_data's files -------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> str:
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json", ["<|pad|>", "<|endoftext|>"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"{i}: {d}"}) + "\n" for i, d in enumerate(DOCS * 3)))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer_facts(tokenizer_path) -> tuple[int, int]:
    tokenizer = Tokenizer.from_file(tokenizer_path)
    return tokenizer.get_vocab_size(), tokenizer.token_to_id("<|endoftext|>")


MODEL_VOCAB = 400


def prepared(tmp_path, tokenizer_path, corpus, dtype) -> str:
    path = prepare_data([corpus], tokenizer_path, str(tmp_path / dtype), dtype=dtype, progress=False)
    assert os.path.getsize(path) // np.dtype(dtype).itemsize >= 8 * SEQ  # several instances
    return path


def loader_for(path: str, dtype: str | None, vocab: int = MODEL_VOCAB, eos: int | None = 1):
    cfg = {"paths": [path], "seq_len": SEQ, "seed": 0} | ({"dtype": dtype} if dtype else {})
    return build_loader(cfg, TRAINER, vocab, 0, 1, eos_token_id=eos)


@pytest.mark.parametrize("written,read", [("uint32", "uint16"), ("uint16", "uint32")])
def test_wrong_dtype_refused_with_and_without_sidecar(tmp_path, tokenizer_path, corpus, tokenizer_facts,
                                                      written, read):
    vocab, eos = tokenizer_facts
    assert vocab <= MODEL_VOCAB and eos == 1
    path = prepared(tmp_path, tokenizer_path, corpus, written)
    loader_for(path, written).read_step(0)  # the right dtype reads
    with raises_naming(path, f"written as {written}", f"data.dtype={read}") as e:
        loader_for(path, read)
    one_line(e)

    os.remove(sidecar_path(path))
    if read == "uint16":
        with raises_naming(path, "every other uint16 id", "data.dtype=uint32") as e:
            loader_for(path, read)
        one_line(e)
    else:
        n = os.path.getsize(path) // 2
        with open(path, "r+b") as f:  # an even count: the uint32 ids are out of range at open
            f.truncate(2 * (n - n % 2))
        with raises_naming(path, "out of range", f"model.vocab_size={MODEL_VOCAB}", "data.dtype=uint32") as e:
            loader_for(path, read)
        one_line(e)
        with open(path, "ab") as f:  # an odd count: not whole uint32 tokens
            f.write(b"\x05\x00")
        with raises_naming(path, "not a whole number of uint32 tokens") as e:
            loader_for(path, read)
        one_line(e)


def test_sidecar_contradictions_name_the_file(tmp_path, tokenizer_path, corpus, tokenizer_facts):
    vocab, eos = tokenizer_facts
    path = prepared(tmp_path, tokenizer_path, corpus, "uint16")
    recorded = read_sidecar(path)
    assert recorded.dtype == "uint16" and recorded.vocab_size == vocab and recorded.eos_token_id == eos
    assert recorded.num_tokens == os.path.getsize(path) // 2 and recorded.num_documents == 3 * len(DOCS)
    loader_for(path, None)  # consistent

    with raises_naming(path, "EOS id 1", "model.eos_token_id=2") as e:
        loader_for(path, None, eos=2)
    one_line(e)
    with raises_naming(path, f"{vocab} ids", f"model.vocab_size={vocab - 1}") as e:
        loader_for(path, None, vocab=vocab - 1)
    one_line(e)

    with open(path, "ab") as f:
        f.write(np.array([5, 6, 7], dtype=np.uint16).tobytes())
    with raises_naming(path, f"records {recorded.num_tokens} tokens", f"holds {recorded.num_tokens + 3}") as e:
        loader_for(path, "uint16")
    one_line(e)

    for damaged in ("{not json", json.dumps({"format": "something-else", "dtype": "uint16"})):
        Path(sidecar_path(path)).write_text(damaged)
        for dtype in (None, "uint16"):  # found while resolving the dtype, and when opening the file
            with raises_naming(sidecar_path(path), "unreadable") as e:
                loader_for(path, dtype)
            one_line(e)


def test_no_sidecar_dtype_that_cannot_hold_the_model_ids(tmp_path):
    path = write(tmp_path / "t.npy", np.arange(SEQ * 4) % 100)
    cfg = {"paths": [path], "seq_len": SEQ, "seed": 0, "dtype": "uint16"}
    build_loader(cfg, TRAINER, 50_000, 0, 1, eos_token_id=0)
    with raises_naming(path, "model.vocab_size=100352", "data.dtype=uint16") as e:
        build_loader(cfg, TRAINER, 100_352, 0, 1)
    one_line(e)
    with raises_naming(path, "model.eos_token_id=100257", "data.dtype=uint16") as e:
        build_loader(cfg, TRAINER, 50_000, 0, 1, eos_token_id=100_257)
    one_line(e)


def test_dtype_unset_takes_the_sidecars(tmp_path, tokenizer_path, corpus):
    path = prepared(tmp_path, tokenizer_path, corpus, "uint16")
    loader = loader_for(path, None)
    assert loader.dataset.files[0].dtype == "uint16"
    tokens = np.fromfile(path, dtype=np.uint16)
    instances = {tuple(tokens[k * SEQ : (k + 1) * SEQ].tolist()) for k in range(len(tokens) // SEQ)}
    seen = set()
    for step in range(len(loader.dataset) // TRAINER["global_batch_size"]):
        for batch in loader.read_step(step).micro_batches:
            seen |= {tuple(row.tolist()) for row in batch["input_ids"]}
    assert seen <= instances and len(seen) == len(loader.dataset) // 4 * 4


def test_prepare_main_prints_the_figures(tmp_path, tokenizer_path, corpus, tokenizer_facts, capsys):
    vocab, eos = tokenizer_facts
    out = tmp_path / "cli"
    assert prepare.main(["--tokenizer", tokenizer_path, "--output", str(out), corpus]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    path = str(out / "tokens.npy")
    num_tokens = os.path.getsize(path) // 2
    assert lines[0] == path
    for figure in (f"{num_tokens:,} uint16 tokens", f"{3 * len(DOCS):,} documents", f"vocabulary {vocab:,}",
                   f"EOS id {eos}", sidecar_path(path)):
        assert figure in lines[1], figure


# --- the repeated n-gram filter in the loader --------------------------------------------------------

FILTER = {"enabled": True, "min_period": 1, "max_period": 13, "max_count": 32}
LONG = 128


def filtered_file(tmp_path) -> tuple[str, set[int]]:
    """30 instances of 128 tokens; every third one starts with (1, 2, 3) repeated 40 times."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(10, 1000, 30 * LONG)
    repeated = set(range(0, 30, 3))
    for k in repeated:
        tokens[k * LONG : k * LONG + 120] = np.tile([1, 2, 3], 40)
    return write(tmp_path / "rep.npy", tokens), repeated


@pytest.mark.parametrize("instance_filter", [FILTER, None, {**FILTER, "enabled": False}])
def test_instance_filter_through_build_loader(tmp_path, instance_filter):
    path, repeated = filtered_file(tmp_path)
    cfg = {"paths": [path], "seq_len": LONG, "seed": 3, "dtype": "uint16", "instance_filter": instance_filter}
    loader = build_loader(cfg, {"global_batch_size": 10, "micro_batch_size": 5}, 1000, 0, 1)
    on = bool(instance_filter and instance_filter["enabled"])
    total_masked = 0
    for step in range(3):  # one epoch
        batch = loader.read_step(step)
        rows = torch.cat([b["input_ids"] for b in batch.micro_batches])
        labels = torch.cat([b["label_mask"] for b in batch.micro_batches])
        is_repeated = [bool((row == 1).any()) for row in rows]
        for i, (row, label, rep) in enumerate(zip(rows, labels, is_repeated)):
            item = loader.dataset[step * 10 + i]
            torch.testing.assert_close(item["input_ids"], row)
            masked = on and rep
            assert bool(item["instance_mask"]) is (not masked)
            assert bool(label.any()) is (not masked) and bool(label.all()) is (not masked)
        masked = sum(is_repeated) if on else 0
        assert batch.masked_instances == masked
        assert batch.loss_tokens == (10 - masked) * (LONG - 1) + masked * LONG
        total_masked += sum(is_repeated)
    assert total_masked == len(repeated)  # the epoch saw each repeated instance once
