"""Reading model weights one tensor at a time, whatever the checkpoint's format.

A ``TensorSource`` names its tensors (transformers' ``Olmo2ForCausalLM`` names, in that model's order)
with their global shapes, carries the ``ModelConfig`` they belong to, and reads any one of them as a
fresh fp32 tensor. Conversions and soups are written against this interface, so they hold one tensor
(per input) at a time. This module implements it for megolmo checkpoints (torch.distributed.checkpoint
directories, whatever layout wrote them); ``hf.py`` implements it for Hugging Face directories.
"""
from __future__ import annotations

import ctypes
import json
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from megolmo.checkpoint.manager import MODEL_CONFIG, resolve_checkpoint
from megolmo.checkpoint.manifest import MANIFEST, TRAINER_STATE, verify_checkpoint, verify_checksums
from megolmo.checkpoint.state import MODEL
from megolmo.errors import MegolmoConfigError
from megolmo.model.config import ModelConfig


def return_freed_memory_promptly() -> None:
    """Make glibc serve every allocation of 1 MiB or more with its own mapping, returned to the system
    when freed. By default glibc raises that threshold as large blocks are freed (up to 32 MiB), after
    which a stream of differently sized tensors fragments its heap and a conversion's resident memory
    creeps up by hundreds of MB. A no-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (setting it also fixes it: no dynamic adjustment)
    except (OSError, AttributeError):
        pass


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight of an OLMo 2 model and its global shape, in transformers' ``state_dict`` order."""
    h, q, kv, inter = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, \
        cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "self_attn.q_norm.weight": (q,), p + "self_attn.k_norm.weight": (kv,),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "post_attention_layernorm.weight": (h,), p + "post_feedforward_layernorm.weight": (h,),
        })
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def check_tensors(where: str, found: dict[str, tuple[int, ...]], cfg: ModelConfig, described_by: str) -> None:
    """The tensors a checkpoint holds are exactly those its config describes, with the same shapes."""
    expected = expected_tensors(cfg)
    for name, shape in expected.items():
        if name not in found:
            raise MegolmoConfigError(f"{where}: tensor {name} is missing ({described_by} implies shape "
                                     f"{list(shape)})")
        if tuple(found[name]) != shape:
            raise MegolmoConfigError(f"{where}: tensor {name} has shape {list(found[name])} but {described_by} "
                                     f"implies {list(shape)}")
    extra = [name for name in found if name not in expected]
    if extra:
        raise MegolmoConfigError(f"{where}: unexpected tensor {extra[0]} (not part of the OLMo 2 model that "
                                 f"{described_by} describes)")


class TensorSource:
    """Weights readable one tensor at a time (see the module docstring)."""

    kind: str
    path: Path
    config: ModelConfig
    shapes: dict[str, tuple[int, ...]]

    def read(self, name: str) -> torch.Tensor:
        """A fresh, contiguous fp32 tensor that the caller owns (it shares storage with nothing)."""
        raise NotImplementedError

    @property
    def total_bytes_fp32(self) -> int:
        return sum(4 * torch.Size(shape).numel() for shape in self.shapes.values())


def is_megolmo_checkpoint(path: Path) -> bool:
    path = resolve_checkpoint(Path(path))
    return any((path / name).exists() for name in (MANIFEST, TRAINER_STATE, ".metadata"))


class MegolmoCheckpoint(TensorSource):
    """The model weights of a megolmo checkpoint (a checkpoint, ``checkpoints/`` or run directory),
    read tensor by tensor from its DCP files, reassembled from whatever pieces the saving layout wrote.
    Optimizer state is ignored."""

    kind = "megolmo"

    def __init__(self, path: Path):
        given = Path(path)
        if not given.exists():
            raise MegolmoConfigError(f"checkpoint {given}: no such directory")
        self.path = resolve_checkpoint(given)
        verify_checkpoint(self.path)  # manifest: every file present with its recorded size and checksum
        verify_checksums(self.path)
        config_path = self.path / MODEL_CONFIG
        if not config_path.exists():
            raise MegolmoConfigError(f"checkpoint {self.path}: {MODEL_CONFIG} is missing")
        self.config = ModelConfig.from_mapping(json.loads(config_path.read_text()))
        try:
            metadata = dcp.FileSystemReader(str(self.path)).read_metadata()
        except Exception as error:  # noqa: BLE001 - a damaged pickle raises anything
            raise MegolmoConfigError(f"checkpoint {self.path}: cannot read .metadata ({error})") from None
        saved = {key.removeprefix(MODEL): entry for key, entry in metadata.state_dict_metadata.items()
                 if key.startswith(MODEL)}
        check_tensors(f"checkpoint {self.path}", {name: tuple(entry.size) for name, entry in saved.items()},
                      self.config, MODEL_CONFIG)
        self._dtypes = {name: entry.properties.dtype for name, entry in saved.items()}
        self.shapes = {name: shape for name, shape in expected_tensors(self.config).items()}

    def read(self, name: str) -> torch.Tensor:
        tensor = torch.empty(self.shapes[name], dtype=self._dtypes[name])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load({MODEL + name: tensor}, storage_reader=dcp.FileSystemReader(str(self.path)), no_dist=True)
        return tensor if tensor.dtype == torch.float32 else tensor.float()
