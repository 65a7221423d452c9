"""Tokenize text into the token-file format the trainer reads (raw memmap, EOS after every document).

`.jsonl` inputs give one document per line (its `text` field); any other file is one document. Documents
are encoded without the tokenizer's own special tokens, then EOS is appended, as dolma does, so EOS is the
only separator in the stream. Order is preserved with any number of worker processes, so the output is
byte-identical for every `--workers`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from collections.abc import Iterator
from itertools import islice

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from megolmo.data.sidecar import SIDECAR_SUFFIX, TokenFileInfo, file_sha256, read_sidecar, write_sidecar
from megolmo.data.token_file import TOKEN_DTYPES
from megolmo.errors import MegolmoConfigError

EOS_TOKEN = "<|endoftext|>"
CHUNK_DOCUMENTS = 256  # documents per worker task: big enough to amortise IPC, small enough to stream

_worker_tokenizer: Tokenizer | None = None


def read_documents(path: str) -> Iterator[str]:
    """Documents of one input file; bad JSONL fails with the file and line number."""
    if not os.path.isfile(path):
        raise MegolmoConfigError(f"input {path}: no such file")
    if not path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            yield f.read()
        return
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise MegolmoConfigError(f"input {path}:{line_no}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise MegolmoConfigError(f"input {path}:{line_no}: expected a JSON object with a string 'text' field")
            yield record["text"]


def resolve_eos_id(tokenizer: Tokenizer, eos_id: int | None) -> int:
    """The explicit id, else the tokenizer's `<|endoftext|>`; no silent guess, a wrong EOS spoils the data."""
    if eos_id is not None:
        if not 0 <= eos_id < tokenizer.get_vocab_size():
            raise MegolmoConfigError(f"--eos-id {eos_id} is outside the tokenizer's vocabulary")
        return eos_id
    found = tokenizer.token_to_id(EOS_TOKEN)
    if found is None:
        raise MegolmoConfigError(f"the tokenizer has no {EOS_TOKEN} token: pass --eos-id")
    return found


def choose_dtype(vocab_size: int, dtype: str | None) -> str:
    """uint16 when every id fits (half the disk and page cache), else uint32; an explicit choice is checked."""
    if dtype is None:
        return "uint16" if vocab_size <= 2**16 else "uint32"
    if dtype not in TOKEN_DTYPES:
        raise MegolmoConfigError(f"--dtype {dtype}: expected one of {sorted(TOKEN_DTYPES)}")
    if vocab_size > np.iinfo(TOKEN_DTYPES[dtype]).max + 1:
        raise MegolmoConfigError(f"--dtype {dtype} cannot hold the tokenizer's {vocab_size} ids: use uint32")
    return dtype


def prepare_data(
    inputs: list[str],
    tokenizer_path: str,
    output_dir: str,
    dtype: str | None = None,
    workers: int = 1,
    eos_id: int | None = None,
    progress: bool = True,
) -> str:
    """Write `output_dir/tokens.npy` from the inputs, in order, and its sidecar; returns the token file's path."""
    if not os.path.isfile(tokenizer_path):
        raise MegolmoConfigError(f"tokenizer {tokenizer_path}: no such file")
    for path in inputs:
        if not os.path.isfile(path):
            raise MegolmoConfigError(f"input {path}: no such file")
    tokenizer = Tokenizer.from_file(tokenizer_path)
    eos = resolve_eos_id(tokenizer, eos_id)
    dtype = choose_dtype(tokenizer.get_vocab_size(), dtype)
    np_dtype = TOKEN_DTYPES[dtype]
    os.makedirs(output_dir, exist_ok=True)
    out_path = os.path.join(output_dir, "tokens.npy")
    tmp_path = f"{out_path}.tmp{os.getpid()}"
    chunks = _chunks(doc for path in inputs for doc in read_documents(path))
    bar = tqdm(desc="tokenizing", unit="doc", disable=not progress)
    total_docs = total_tokens = 0
    try:
        with open(tmp_path, "wb") as out:
            for ids, num_docs in _encode_all(chunks, tokenizer, tokenizer_path, eos, workers):
                out.write(ids.astype(np_dtype).tobytes())
                bar.update(num_docs)
                total_docs += num_docs
                total_tokens += len(ids)
        if total_docs == 0:
            raise MegolmoConfigError(f"inputs {' '.join(inputs)}: no documents found")
        info = TokenFileInfo(dtype, total_tokens, total_docs, tokenizer.get_vocab_size(), eos,
                             file_sha256(tokenizer_path))
        os.replace(tmp_path, out_path)
        write_sidecar(out_path, info)
    finally:
        bar.close()
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    return out_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="HF tokenizers JSON file")
    parser.add_argument("--output", required=True, help="directory for tokens.npy")
    parser.add_argument("--dtype", choices=sorted(TOKEN_DTYPES), help="default: uint16 if the vocabulary fits")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--eos-id", type=int, help=f"default: the tokenizer's {EOS_TOKEN}")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help=".jsonl (one document per line) or text files")
    args = parser.parse_args(argv)
    try:
        path = prepare_data(args.inputs, args.tokenizer, args.output, args.dtype, args.workers, args.eos_id)
    except MegolmoConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = read_sidecar(path)
    print(path)
    print(f"{info.describe()}; recorded in {path}{SIDECAR_SUFFIX}, which the trainer checks (and takes "
          "data.dtype from when it is unset)")
    return 0


def _chunks(docs: Iterator[str]) -> Iterator[list[str]]:
    while chunk := list(islice(docs, CHUNK_DOCUMENTS)):
        yield chunk


def _encode(tokenizer: Tokenizer, docs: list[str], eos: int) -> tuple[np.ndarray, int]:
    parts = []
    for encoding in tokenizer.encode_batch(docs, add_special_tokens=False):
        parts.append(np.asarray(encoding.ids, dtype=np.int64))
        parts.append(np.array([eos], dtype=np.int64))
    return np.concatenate(parts), len(docs)


def _encode_all(
    chunks: Iterator[list[str]], tokenizer: Tokenizer, tokenizer_path: str, eos: int, workers: int
) -> Iterator[tuple[np.ndarray, int]]:
    if workers <= 1:
        for chunk in chunks:
            yield _encode(tokenizer, chunk, eos)
        return
    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tokenizer_path,)) as pool:
        yield from pool.imap(_encode_in_worker, ((chunk, eos) for chunk in chunks))


def _init_worker(tokenizer_path: str) -> None:
    """Each worker loads the tokenizer once; single-threaded, since the processes are the parallelism."""
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = Tokenizer.from_file(tokenizer_path)


def _encode_in_worker(task: tuple[list[str], int]) -> tuple[np.ndarray, int]:
    docs, eos = task
    return _encode(_worker_tokenizer, docs, eos)
