"""Hugging Face ``Olmo2ForCausalLM`` directories: read, write, and convert to and from megolmo checkpoints.

Everything streams tensor by tensor (see ``reader.py``, ``writer.py`` and ``safetensors_stream.py``), so
converting a model needs memory for about one tensor, not the model.

    python tools/convert_checkpoint.py hf-to-megolmo HF_DIR CKPT_DIR
    python tools/convert_checkpoint.py megolmo-to-hf CKPT_DIR HF_DIR [--dtype bf16|fp32] [--tokenizer FILE|DIR]
        [--chat-template olmo2]

The tokenizer side (``--tokenizer``, ``--chat-template``, generation_config.json) is ``hf_tokenizer.py``'s.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from megolmo.checkpoint.hf_tokenizer import TokenizerExport, add_tokenizer_arguments
from megolmo.checkpoint.reader import MegolmoCheckpoint, TensorSource, check_tensors, expected_tensors, \
    is_megolmo_checkpoint, return_freed_memory_promptly
from megolmo.checkpoint.safetensors_stream import SafetensorsWriter, TensorInfo, nbytes, parse_size, plan_shards, \
    read_header, read_tensor
from megolmo.checkpoint.writer import finish_output, prepare_output, write_megolmo
from megolmo.errors import MegolmoConfigError
from megolmo.model.hf_config import from_hf_config_dict, to_hf_config_dict

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
IGNORED_TENSORS = ("rotary_emb.inv_freq",)  # buffers some exporters save; not weights


def is_hf_dir(path: Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def _check_supported(path: Path, hf: dict[str, Any]) -> None:
    """Refuse configs whose model megolmo does not implement (it would silently compute something else)."""
    if hf.get("model_type") != "olmo2":
        raise MegolmoConfigError(f"{path / CONFIG}: model_type is {hf.get('model_type')!r}; only 'olmo2' "
                                 "(Olmo2ForCausalLM) is supported")
    for key, fine in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(key, fine) != fine:
            raise MegolmoConfigError(f"{path / CONFIG}: {key}={hf[key]!r} is not supported (OLMo 2 uses {fine!r})")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise MegolmoConfigError(f"{path / CONFIG}: RoPE scaling {rope} is not supported (only the default RoPE)")


class HFCheckpoint(TensorSource):
    """An ``Olmo2ForCausalLM`` directory: ``config.json`` and ``model.safetensors``, or shards listed in
    ``model.safetensors.index.json``."""

    kind = "hf"

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_dir():
            what = "not a directory" if self.path.exists() else "no such directory"
            raise MegolmoConfigError(f"Hugging Face directory {self.path}: {what}")
        if not is_hf_dir(self.path):
            hint = " (it is a megolmo checkpoint)" if is_megolmo_checkpoint(self.path) else ""
            raise MegolmoConfigError(f"{self.path}: not a Hugging Face model directory (no {CONFIG}){hint}")
        try:
            self.hf_config = json.loads((self.path / CONFIG).read_text())
        except json.JSONDecodeError as e:
            raise MegolmoConfigError(f"{self.path / CONFIG}: invalid JSON ({e.msg})") from None
        _check_supported(self.path, self.hf_config)
        self.config = from_hf_config_dict(self.hf_config, name=self.path.name)
        self.locations = self._locate_tensors()
        if "lm_head.weight" not in self.locations and self.hf_config.get("tie_word_embeddings") \
                and "model.embed_tokens.weight" in self.locations:
            self.locations["lm_head.weight"] = self.locations["model.embed_tokens.weight"]  # untie: same values
        found = {name: loc[1].shape for name, loc in self.locations.items() if not name.endswith(IGNORED_TENSORS)}
        check_tensors(f"Hugging Face directory {self.path}", found, self.config, CONFIG)
        self.shapes = expected_tensors(self.config)

    def _locate_tensors(self) -> dict[str, tuple[Path, TensorInfo]]:
        index, single = self.path / INDEX, self.path / SINGLE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise MegolmoConfigError(f"{index}: not a safetensors index (no weight_map)") from None
            headers: dict[str, dict[str, TensorInfo]] = {}
            for shard in dict.fromkeys(weight_map.values()):
                if not (self.path / shard).is_file():
                    raise MegolmoConfigError(f"{self.path}: safetensors shard {self.path / shard} named in {INDEX} "
                                             "is missing")
                headers[shard] = read_header(self.path / shard)
            locations = {}
            for name, shard in weight_map.items():
                if name not in headers[shard]:
                    raise MegolmoConfigError(f"{self.path / shard}: tensor {name} (listed in {INDEX}) is not in it")
                locations[name] = (self.path / shard, headers[shard][name])
            return locations
        if single.exists():
            return {name: (single, info) for name, info in read_header(single).items()}
        if list(self.path.glob("*.bin")) or list(self.path.glob("*.pt")):
            raise MegolmoConfigError(f"{self.path}: only safetensors weights are supported (found PyTorch .bin/.pt "
                                     "files; re-save with save_pretrained(..., safe_serialization=True))")
        raise MegolmoConfigError(f"{self.path}: no {SINGLE} or {INDEX}")

    def read(self, name: str) -> torch.Tensor:
        path, info = self.locations[name]
        tensor = read_tensor(path, info)
        return tensor if tensor.dtype == torch.float32 else tensor.float()


def open_checkpoint(path: Path) -> TensorSource:
    """A megolmo checkpoint (checkpoint, ``checkpoints/`` or run directory) or a Hugging Face directory,
    told apart by their contents."""
    path = Path(path)
    if not path.exists():
        raise MegolmoConfigError(f"input {path}: no such directory")
    if is_megolmo_checkpoint(path):
        return MegolmoCheckpoint(path)
    if is_hf_dir(path):
        return HFCheckpoint(path)
    raise MegolmoConfigError(f"input {path}: neither a megolmo checkpoint (no manifest.json, .metadata) nor a "
                             f"Hugging Face model directory (no {CONFIG})")


def hf_config_json(source: TensorSource, dtype: torch.dtype) -> dict[str, Any]:
    """Every ``Olmo2Config`` field at the model's true value, for transformers 4.x and 5.x alike."""
    return {**to_hf_config_dict(source.config), "torch_dtype": DTYPE_NAMES[dtype], "dtype": DTYPE_NAMES[dtype]}


def write_hf(source: TensorSource, directory: Path, dtype: torch.dtype = torch.float32,
             max_shard_size: str | int = "5GB", tokenizer: Path | None = None,
             chat_template: str | None = None) -> Path:
    """An ``Olmo2ForCausalLM`` directory: config.json, generation_config.json, safetensors (one file, or
    shards named as transformers names them plus their index), and the tokenizer files if given (see
    ``hf_tokenizer.py``: a tokenizer.json file gets OLMo 2's configs, ``chat_template`` its chat template)."""
    directory = Path(directory)
    max_bytes = parse_size(max_shard_size)
    extras = TokenizerExport.prepare(source, tokenizer, chat_template)  # checked before anything is written
    tmp = prepare_output(directory)
    return_freed_memory_promptly()
    try:
        entries = [(name, dtype, shape) for name, shape in source.shapes.items()]
        shards = plan_shards(entries, max_bytes)
        names = [SINGLE] if len(shards) == 1 else \
            [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for shard_name, shard in zip(names, shards):
            with SafetensorsWriter(tmp / shard_name, shard) as writer:
                for name, _, _ in shard:
                    tensor = source.read(name)
                    writer.write(name, tensor if tensor.dtype == dtype else tensor.to(dtype))
                    del tensor
        if len(shards) > 1:
            total = sum(nbytes(shape, dtype) for _, _, shape in entries)
            index = {"metadata": {"total_size": total, "total_parameters": total // dtype.itemsize},
                     "weight_map": {name: file for file, shard in zip(names, shards) for name, _, _ in shard}}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / CONFIG).write_text(json.dumps(hf_config_json(source, dtype), indent=2) + "\n")
        extras.write(tmp)  # generation_config.json, and the tokenizer's files
        finish_output(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def hf_to_megolmo(hf_dir: Path, ckpt_dir: Path) -> TensorSource:
    source = HFCheckpoint(Path(hf_dir))
    write_megolmo(source, Path(ckpt_dir), {"converted_from": {"format": "hf", "path": str(Path(hf_dir).resolve())}})
    return source


def megolmo_to_hf(ckpt: Path, hf_dir: Path, dtype: str = "fp32", tokenizer: Path | None = None,
                  max_shard_size: str | int = "5GB", chat_template: str | None = None) -> TensorSource:
    if dtype not in DTYPES:
        raise MegolmoConfigError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    ckpt = Path(ckpt)
    if ckpt.exists() and not is_megolmo_checkpoint(ckpt) and is_hf_dir(ckpt):
        raise MegolmoConfigError(f"checkpoint {ckpt}: this is a Hugging Face directory, not a megolmo checkpoint "
                                 "(use hf-to-megolmo)")
    source = MegolmoCheckpoint(ckpt)
    write_hf(source, Path(hf_dir), DTYPES[dtype], max_shard_size, tokenizer, chat_template)
    return source


def convert_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="convert_checkpoint.py",
                                     description="Convert between Hugging Face Olmo2ForCausalLM directories and "
                                                 "megolmo checkpoints, streaming one tensor at a time.")
    sub = parser.add_subparsers(dest="command", required=True)
    to_megolmo = sub.add_parser("hf-to-megolmo", help="HF directory -> weights-only megolmo checkpoint (fp32)")
    to_megolmo.add_argument("hf_dir", type=Path)
    to_megolmo.add_argument("ckpt_dir", type=Path)
    to_hf = sub.add_parser("megolmo-to-hf", help="megolmo checkpoint (or run / checkpoints dir) -> HF directory "
                           "(with generation_config.json, and the tokenizer given by --tokenizer)")
    to_hf.add_argument("ckpt_dir", type=Path)
    to_hf.add_argument("hf_dir", type=Path)
    to_hf.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="safetensors dtype (default fp32)")
    to_hf.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    add_tokenizer_arguments(to_hf)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        if args.command == "hf-to-megolmo":
            source = hf_to_megolmo(args.hf_dir, args.ckpt_dir)
            out = args.ckpt_dir
        else:
            source = megolmo_to_hf(args.ckpt_dir, args.hf_dir, args.dtype, args.tokenizer, args.max_shard_size,
                                   args.chat_template)
            out = args.hf_dir
    except MegolmoConfigError as error:
        print(f"megolmo: error: {error}", file=sys.stderr, flush=True)
        return 2
    print(f"wrote {out} ({len(source.shapes)} tensors, {sum(torch.Size(s).numel() for s in source.shapes.values()):,} "
          f"parameters) in {time.perf_counter() - started:.1f}s")
    return 0
