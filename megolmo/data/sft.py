"""Tülu-format chat JSONL into packed SFT instances: ``input_ids.npy`` (uint32) and ``label_mask.npy`` (one byte
per token), the files OLMo 2's model card names, both raw memmaps of ``instances * seq_len`` entries.

Rendering is OLMo 2 Instruct's chat template (``OLMO2_CHAT_TEMPLATE``; ``render`` writes the same text, which
the tests hold equal to transformers' ``apply_chat_template``). Each conversation is tokenized once, as one
string: tokenizing turn by turn would differ, since the tokenizer's pre-split merges across the template's
seams (``"?"`` + ``"\\n"`` is one token, as is the header's ``">\\n"`` with a reply's leading newlines).

Labels (open-instruct's and the model card's rule): the assistant replies and the EOS that closes each, nothing
else (BOS, the ``<|system|>``/``<|user|>``/``<|assistant|>`` headers, system and user text, the ``"\\n"`` after a
non-final reply's EOS, padding). Exactly: a token is a label iff its first character lies in a reply or its EOS;
so the one token the header's ``">\\n"`` makes with a reply's leading line breaks (``">\\n\\n\\n"``) is not one.

Packing is greedy in input order: a conversation goes into the current instance if it fits, else it starts the
next, so no conversation that fits one instance is split; the rest of an instance is ``<|pad|>`` with mask 0.
One longer than ``seq_len`` is cut to its first ``seq_len`` tokens (``truncate``) or left out (``drop``).
Conversations in one instance attend to each other (the trainer has no document masking), as when packing
pretraining documents; each starts with BOS, which is never a label.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from megolmo.data.sidecar import TokenFileInfo, file_sha256, write_sidecar
from megolmo.errors import MegolmoConfigError

OLMO2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<|system|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'assistant' %}"
    "{% if not loop.last %}{{ '<|assistant|>\n'  + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ '<|assistant|>\n'  + message['content'] + eos_token }}{% endif %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}"
)
BOS_TOKEN = EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
ROLES = ("system", "user", "assistant")
TOO_LONG = ("truncate", "drop")
TOKEN_DTYPE = np.uint32
CHUNK_CONVERSATIONS = 256  # conversations per encode_batch call

Messages = list[dict[str, str]]


@dataclass
class PackStats:
    """What the summary line reports; ``conversations`` are those written, truncated ones included."""

    conversations: int = 0
    instances: int = 0
    tokens: int = 0  # conversation tokens written, padding excluded
    label_tokens: int = 0
    truncated: int = 0
    dropped: int = 0

    def summary(self, seq_len: int) -> str:
        padding = self.instances * seq_len - self.tokens
        return (f"{self.conversations:,} conversations in {self.instances:,} instances of {seq_len} tokens: "
                f"{self.tokens:,} tokens (+{padding:,} padding), {self.label_tokens:,} label tokens; "
                f"{self.truncated:,} truncated, {self.dropped:,} dropped (longer than {seq_len})")


def read_conversations(path: str) -> Iterator[Messages]:
    """The ``messages`` of each line of a JSONL file; anything else fails with the file and line number."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                yield _messages(line, f"input {path}:{line_no}")


def _messages(line: str, where: str) -> Messages:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise MegolmoConfigError(f"{where}: invalid JSON ({e.msg})") from None
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise MegolmoConfigError(f"{where}: expected a JSON object with a non-empty 'messages' list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise MegolmoConfigError(f"{where}: message {i} is not a JSON object")
        if message.get("role") not in ROLES:
            raise MegolmoConfigError(f"{where}: message {i} has role {message.get('role')!r}; expected one of "
                                     f"{', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise MegolmoConfigError(f"{where}: message {i} ({message['role']}) has no string 'content'")
    return messages


def render(messages: Messages) -> tuple[str, list[tuple[int, int]]]:
    """``OLMO2_CHAT_TEMPLATE``'s text for the conversation (no generation prompt), and the character spans
    ``[start, end)`` of the labels: each assistant reply with its closing EOS."""
    parts, spans, length = [BOS_TOKEN], [], len(BOS_TOKEN)
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role == "assistant":
            header, after = "<|assistant|>\n", "" if i == len(messages) - 1 else "\n"
            start = length + len(header)
            spans.append((start, start + len(content) + len(EOS_TOKEN)))
            text = header + content + EOS_TOKEN + after
        else:
            text = f"<|{role}|>\n{content}\n"
        parts.append(text)
        length += len(text)
    return "".join(parts), spans


def label_mask(token_starts: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """True for the tokens whose first character is in a span: with the spans' bounds in one sorted list,
    a start inside ``[a_i, b_i)`` is inserted (to the right) at the odd index ``2i + 1``."""
    bounds = np.asarray(spans, dtype=np.int64).reshape(-1)
    return np.searchsorted(bounds, token_starts, side="right") % 2 == 1


def encode(tokenizer: Tokenizer, conversations: list[Messages]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Token ids and label mask of each conversation: the rendered string tokenized once, the mask from the
    tokens' character offsets."""
    rendered = [render(messages) for messages in conversations]
    encodings = tokenizer.encode_batch([text for text, _ in rendered], add_special_tokens=False)
    return [(np.asarray(encoding.ids, dtype=TOKEN_DTYPE),
             label_mask(np.array([start for start, _ in encoding.offsets], dtype=np.int64), spans))
            for encoding, (_, spans) in zip(encodings, rendered)]


def pack(conversations: Iterable[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int, too_long: str,
         stats: PackStats) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Instances ``(ids, mask)`` of exactly ``seq_len`` tokens, filled greedily in order (module docstring)."""
    ids, mask, used = _empty_instance(seq_len, pad_id)
    for conv_ids, conv_mask in conversations:
        if len(conv_ids) > seq_len:
            if too_long == "drop":
                stats.dropped += 1
                continue
            conv_ids, conv_mask = conv_ids[:seq_len], conv_mask[:seq_len]
            stats.truncated += 1
        if used + len(conv_ids) > seq_len:
            yield ids, mask
            ids, mask, used = _empty_instance(seq_len, pad_id)
        ids[used : used + len(conv_ids)] = conv_ids
        mask[used : used + len(conv_ids)] = conv_mask
        used += len(conv_ids)
        stats.conversations += 1
        stats.tokens += len(conv_ids)
        stats.label_tokens += int(conv_mask.sum())
    if used:
        yield ids, mask


def _empty_instance(seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, int]:
    return np.full(seq_len, pad_id, dtype=TOKEN_DTYPE), np.zeros(seq_len, dtype=np.bool_), 0


def prepare_sft(inputs: list[str], tokenizer_path: str, output_dir: str, seq_len: int, too_long: str = "truncate",
                progress: bool = True) -> PackStats:
    """Write ``output_dir/input_ids.npy`` (with its sidecar) and ``output_dir/label_mask.npy``. Every input
    line is checked before anything is written, so a bad line leaves no output behind."""
    tokenizer = _load_and_check(inputs, tokenizer_path, seq_len, too_long)
    total = sum(1 for path in inputs for _ in read_conversations(path))  # the validation pass
    if total == 0:
        raise MegolmoConfigError(f"inputs {' '.join(inputs)}: no conversations found")
    eos_id, pad_id = tokenizer.token_to_id(EOS_TOKEN), tokenizer.token_to_id(PAD_TOKEN)
    os.makedirs(output_dir, exist_ok=True)
    ids_path, mask_path = os.path.join(output_dir, "input_ids.npy"), os.path.join(output_dir, "label_mask.npy")
    tmp_ids, tmp_mask = f"{ids_path}.tmp{os.getpid()}", f"{mask_path}.tmp{os.getpid()}"
    stats = PackStats()
    conversations = (messages for path in inputs for messages in read_conversations(path))
    bar = tqdm(total=total, desc="tokenizing", unit="conv", disable=not progress)
    try:
        with open(tmp_ids, "wb") as ids_out, open(tmp_mask, "wb") as mask_out:
            for ids, mask in pack(_encoded(tokenizer, conversations, bar), seq_len, pad_id, too_long, stats):
                ids_out.write(ids.tobytes())
                mask_out.write(mask.astype(np.uint8).tobytes())
                stats.instances += 1
        if stats.instances == 0:
            raise MegolmoConfigError(f"all {stats.dropped} conversations are longer than --seq-len {seq_len}: "
                                     "nothing to write (use --too-long truncate or a longer --seq-len)")
        os.replace(tmp_mask, mask_path)
        os.replace(tmp_ids, ids_path)
        write_sidecar(ids_path, TokenFileInfo("uint32", stats.instances * seq_len, stats.conversations,
                                              tokenizer.get_vocab_size(), eos_id, file_sha256(tokenizer_path)))
    finally:
        bar.close()
        for path in (tmp_ids, tmp_mask):
            if os.path.exists(path):
                os.remove(path)
    return stats


def _load_and_check(inputs: list[str], tokenizer_path: str, seq_len: int, too_long: str) -> Tokenizer:
    if seq_len < 2:
        raise MegolmoConfigError(f"--seq-len {seq_len}: expected an integer >= 2")
    if too_long not in TOO_LONG:
        raise MegolmoConfigError(f"--too-long {too_long}: expected one of {', '.join(TOO_LONG)}")
    for path in [tokenizer_path, *inputs]:
        if not os.path.isfile(path):
            raise MegolmoConfigError(f"{'tokenizer' if path == tokenizer_path else 'input'} {path}: no such file")
    tokenizer = Tokenizer.from_file(tokenizer_path)
    for token in (EOS_TOKEN, PAD_TOKEN):
        if tokenizer.token_to_id(token) is None:
            raise MegolmoConfigError(f"tokenizer {tokenizer_path}: no {token} token (OLMo 2's chat format needs it)")
    return tokenizer


def _encoded(tokenizer: Tokenizer, conversations: Iterator[Messages], bar: tqdm
             ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    while chunk := list(islice(conversations, CHUNK_CONVERSATIONS)):
        yield from encode(tokenizer, chunk)
        bar.update(len(chunk))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Pack Tülu-format chat JSONL into SFT instances: "
                                                 "input_ids.npy and label_mask.npy")
    parser.add_argument("--tokenizer", required=True, help="HF tokenizers JSON file (dolma2)")
    parser.add_argument("--output", required=True, help="directory for input_ids.npy and label_mask.npy")
    parser.add_argument("--seq-len", type=int, required=True, help="tokens per instance; train with this data.seq_len")
    parser.add_argument("--too-long", choices=TOO_LONG, default="truncate",
                        help="a conversation longer than --seq-len: cut to its first --seq-len tokens, or left out")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="JSONL, one {'messages': [...]} per line")
    args = parser.parse_args(argv)
    try:
        stats = prepare_sft(args.inputs, args.tokenizer, args.output, args.seq_len, args.too_long)
    except MegolmoConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.output}: {stats.summary(args.seq_len)}")
    return 0
