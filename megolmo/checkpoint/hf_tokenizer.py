"""The tokenizer side of a Hugging Face export: ``tokenizer.json``, ``tokenizer_config.json``,
``special_tokens_map.json`` and ``generation_config.json``, so that ``AutoTokenizer.from_pretrained`` and
``model.generate`` work on the exported directory as they do on OLMo 2's release.

``--tokenizer FILE`` (one ``tokenizer.json``-style file, e.g. OLMo 2's ``allenai_dolma2.json``) is written
as ``tokenizer.json`` with the configs OLMo 2's release has; ``--tokenizer DIR`` copies the tokenizer files
found there. ``--chat-template olmo2`` sets OLMo 2 Instruct's chat template (default: none, a base model).
Everything is checked before any weights are written: the tokenizer's special tokens must have the ids the
model config names, and fit in its vocabulary.

Released values (allenai/OLMo-2-1124-7B on the Hugging Face Hub):
- special_tokens_map.json: {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token":
  "<|pad|>", "unk_token": "<|endoftext|>"} (confirmed from the file).
- generation_config.json: {"_from_model_config": true, "eos_token_id": 100257, "pad_token_id": 100277,
  "transformers_version": ...} (confirmed; it has no bos_token_id, which is null, as here).
- tokenizer_config.json: the same four tokens (confirmed only through special_tokens_map.json);
  ``tokenizer_class`` "GPT2Tokenizer" and ``model_max_length`` 4096 could not be confirmed from the file
  itself. ``model_max_length`` here is the model's max_position_embeddings (4096 for OLMo 2). The class is
  "PreTrainedTokenizerFast", not "GPT2Tokenizer": transformers 5 loads tokenizer.json as it is for the
  former, but a GPT2Tokenizer loaded from the tokenizer files alone (without an olmo2 config.json beside
  them, which makes it use its own class) rebuilds GPT-2's pre-tokenizer instead of dolma2's (cl100k-style,
  digits in groups of three), and its ids differ. transformers 4 (not tested here) reads tokenizer.json
  into PreTrainedTokenizerFast as well.
- The Instruct chat template is ``OLMO2_CHAT_TEMPLATE`` (megolmo/data/sft.py, held equal to
  ``apply_chat_template`` by its tests); that it is the Instruct release's string, byte for byte, could not
  be confirmed here.
"""
from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megolmo.checkpoint.manager import MODEL_CONFIG
from megolmo.checkpoint.reader import TensorSource
from megolmo.data.sft import BOS_TOKEN, EOS_TOKEN, OLMO2_CHAT_TEMPLATE, PAD_TOKEN
from megolmo.errors import MegolmoConfigError

GENERATION_CONFIG = "generation_config.json"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, "added_tokens.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")  # would override tokenizer_config's
CHAT_TEMPLATES = {"olmo2": OLMO2_CHAT_TEMPLATE}
OLMO2_SPECIAL_TOKENS = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN,
                        "unk_token": EOS_TOKEN}
TOKENIZER_CLASS = "PreTrainedTokenizerFast"  # see the module docstring
HF_CONFIG = "config.json"
CONFIG_FILES = {"megolmo": MODEL_CONFIG, "hf": HF_CONFIG}


def add_tokenizer_arguments(parser: argparse.ArgumentParser) -> None:
    """``--tokenizer`` and ``--chat-template``, the same on every tool that writes an HF directory."""
    parser.add_argument("--tokenizer", type=Path, default=None, metavar="FILE|DIR",
                        help="a tokenizer.json-style FILE (e.g. OLMo 2's allenai_dolma2.json): written as "
                             "tokenizer.json with tokenizer_config.json and special_tokens_map.json as OLMo 2's "
                             "release sets them (bos/eos/unk <|endoftext|>, pad <|pad|>), checked against the "
                             "model's eos/pad ids; or a DIR whose tokenizer files are copied")
    parser.add_argument("--chat-template", choices=sorted(CHAT_TEMPLATES), default=None,
                        help="write this chat template into tokenizer_config.json (olmo2: OLMo 2 Instruct's); "
                             "needs --tokenizer; default none, as for a base model")


def model_config_file(source: TensorSource) -> Path:
    """The file the source's token ids come from (a soup's: its first ingredient's)."""
    while hasattr(source, "sources"):
        source = source.sources[0]
    return Path(source.path) / CONFIG_FILES.get(source.kind, HF_CONFIG)


@dataclass
class TokenizerExport:
    """What an HF export writes besides the weights, checked by ``prepare`` before anything is written."""

    tokenizer: Path | None
    chat_template: str | None
    eos_token_id: int | None
    pad_token_id: int | None
    max_length: int
    copied: list[str] = field(default_factory=list)

    @classmethod
    def prepare(cls, source: TensorSource, tokenizer: Path | None = None,
                chat_template: str | None = None) -> "TokenizerExport":
        cfg = source.config
        if chat_template is not None and chat_template not in CHAT_TEMPLATES:
            raise MegolmoConfigError(f"--chat-template {chat_template}: expected one of {', '.join(CHAT_TEMPLATES)}")
        if chat_template is not None and tokenizer is None:
            raise MegolmoConfigError(f"--chat-template {chat_template}: needs --tokenizer (the template goes "
                                     f"into {TOKENIZER_CONFIG})")
        export = cls(None if tokenizer is None else Path(tokenizer), chat_template, cfg.eos_token_id,
                     cfg.pad_token_id, cfg.max_position_embeddings)
        if export.tokenizer is None:
            return export
        if export.tokenizer.is_file():
            export._check_file(source)
        elif export.tokenizer.is_dir():
            export.copied = [name for name in TOKENIZER_FILES if (export.tokenizer / name).is_file()]
            if not export.copied:
                raise MegolmoConfigError(f"--tokenizer {export.tokenizer}: no tokenizer files in it (looked for "
                                         f"{', '.join(TOKENIZER_FILES[:3])}, ...)")
        else:
            raise MegolmoConfigError(f"--tokenizer {export.tokenizer}: no such file or directory")
        return export

    def _check_file(self, source: TensorSource) -> None:
        """OLMo 2's special tokens must be in the file, at the ids the model config has (where it has them:
        a missing pad id is taken from the tokenizer), and the file must fit the model's vocabulary."""
        from tokenizers import Tokenizer
        try:
            tok = Tokenizer.from_file(str(self.tokenizer))
        except Exception as error:  # the Rust library raises plain Exceptions
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise MegolmoConfigError(f"--tokenizer {self.tokenizer}: not a tokenizer.json file ({first})") from None
        where, cfg = model_config_file(source), source.config
        size = tok.get_vocab_size(with_added_tokens=True)
        if size > cfg.vocab_size:
            raise MegolmoConfigError(f"--tokenizer {self.tokenizer}: {size} tokens, more than vocab_size "
                                     f"{cfg.vocab_size} in {where}")
        for role, token in OLMO2_SPECIAL_TOKENS.items():
            if tok.token_to_id(token) is None:
                raise MegolmoConfigError(f"--tokenizer {self.tokenizer}: no token {token!r} (OLMo 2's {role})")
        for role, wanted in (("eos_token", cfg.eos_token_id), ("pad_token", cfg.pad_token_id)):
            token = OLMO2_SPECIAL_TOKENS[role]
            found = tok.token_to_id(token)
            if wanted is not None and found != wanted:
                raise MegolmoConfigError(f"--tokenizer {self.tokenizer}: {role} {token!r} is id {found} there, but "
                                         f"{where} has {role}_id {wanted}")
            setattr(self, f"{role}_id", found)

    def generation_config(self) -> dict[str, Any]:
        # As the release's generation_config.json (module docstring), bos_token_id null as in config.json.
        return {"bos_token_id": None, "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id}

    def tokenizer_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"tokenizer_class": TOKENIZER_CLASS, **OLMO2_SPECIAL_TOKENS,
                                  "model_max_length": self.max_length, "clean_up_tokenization_spaces": False}
        return self._with_chat_template(config)

    def _with_chat_template(self, config: dict[str, Any]) -> dict[str, Any]:
        if self.chat_template is not None:
            config["chat_template"] = CHAT_TEMPLATES[self.chat_template]
        return config

    def write(self, directory: Path) -> list[str]:
        """generation_config.json and the tokenizer files into ``directory``; the names written."""
        directory = Path(directory)
        _write_json(directory / GENERATION_CONFIG, self.generation_config())
        if self.tokenizer is None:
            return [GENERATION_CONFIG]
        if self.tokenizer.is_file():
            shutil.copy2(self.tokenizer, directory / TOKENIZER_JSON)
            _write_json(directory / TOKENIZER_CONFIG, self.tokenizer_config())
            _write_json(directory / SPECIAL_TOKENS_MAP, dict(OLMO2_SPECIAL_TOKENS))
            return [GENERATION_CONFIG, TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP]
        names = [n for n in self.copied if self.chat_template is None or n not in CHAT_TEMPLATE_FILES]
        for name in names:
            shutil.copy2(self.tokenizer / name, directory / name)
        if self.chat_template is not None:
            path = directory / TOKENIZER_CONFIG
            config = json.loads(path.read_text()) if path.is_file() else {}
            _write_json(path, self._with_chat_template(config))
            names = list(dict.fromkeys([*names, TOKENIZER_CONFIG]))
        return [GENERATION_CONFIG, *names]


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
