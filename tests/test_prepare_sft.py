"""Chat JSONL into packed SFT files (megolmo.data.sft, tools/prepare_sft.py): the ids are transformers'
``apply_chat_template`` with OLMo 2's template, the labels are the assistant replies and their EOS, packing keeps
conversations whole, and the trainer's loss over the files counts the label tokens only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from megolmo.config import load_config
from megolmo.data.sft import OLMO2_CHAT_TEMPLATE, PackStats, encode, main, pack, prepare_sft
from megolmo.evaluation.assets import dolma2_tokenizer
from megolmo.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
BOS = EOS = 100257
PAD = 100277
SEQ_LEN = 64


def chat(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


CONVERSATIONS = [
    chat(("user", "What is 2 + 2?"), ("assistant", "4."), ("user", "And 3 + 3?"), ("assistant", "6, of course!")),
    chat(("system", "You are terse."), ("user", "Say hi."), ("assistant", "Hi.")),
    chat(("user", "Café? ✓ 🎉"), ("assistant", "Oui: café ☕ 🎉"), ("user", "merci  ")),  # ends on a user turn
    chat(("user", "Empty reply?"), ("assistant", ""), ("user", "Spaces?"), ("assistant", "  two spaces, then\n")),
    chat(("user", "A poem."), ("assistant", "\n\nRoses are red.")),  # the header's ">\n" merges with "\n\n"
]
LONG = chat(("user", "Count."), ("assistant", " ".join(str(i) for i in range(100))))


@pytest.fixture(scope="module")
def tokenizer_path() -> str:
    return str(dolma2_tokenizer())


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path) -> Tokenizer:
    return Tokenizer.from_file(tokenizer_path)


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_path) -> PreTrainedTokenizerFast:
    hf = PreTrainedTokenizerFast(tokenizer_file=tokenizer_path, bos_token="<|endoftext|>",
                                 eos_token="<|endoftext|>", pad_token="<|pad|>")
    hf.chat_template = OLMO2_CHAT_TEMPLATE
    return hf


def write_jsonl(path: Path, conversations: list) -> str:
    path.write_text("".join(json.dumps({"id": i, "messages": c}) + "\n" for i, c in enumerate(conversations)))
    return str(path)


def label_runs(tokenizer: Tokenizer, ids: np.ndarray, mask: np.ndarray) -> list[str]:
    """The text of each maximal run of label tokens."""
    edges = np.flatnonzero(np.diff(mask.astype(np.int8), prepend=0, append=0))
    return [tokenizer.decode(ids[a:b].tolist(), skip_special_tokens=False) for a, b in zip(edges[::2], edges[1::2])]


def read_outputs(out: Path) -> tuple[np.ndarray, np.ndarray]:
    ids = np.fromfile(out / "input_ids.npy", dtype=np.uint32)
    mask = np.fromfile(out / "label_mask.npy", dtype=np.uint8)
    assert len(ids) == len(mask) and len(ids) % SEQ_LEN == 0
    return ids.reshape(-1, SEQ_LEN), mask.reshape(-1, SEQ_LEN)


@pytest.mark.parametrize("index", range(len(CONVERSATIONS) + 1))
def test_ids_are_apply_chat_template_and_labels_are_each_reply_with_its_eos(tokenizer, hf_tokenizer, index):
    messages = [*CONVERSATIONS, LONG][index]
    (ids, mask), = encode(tokenizer, [messages])
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert ids.tolist() == list(expected)
    replies = [m["content"] + "<|endoftext|>" for m in messages if m["role"] == "assistant"]
    if messages[-1]["content"].startswith("\n\n"):  # that newline pair is in the header's token ">\n\n\n"
        assert ">\n\n\n" in [tokenizer.decode([t]) for t in ids[~mask].tolist()]
        replies[-1] = replies[-1][2:]
    assert label_runs(tokenizer, ids, mask) == replies
    assert ids[0] == BOS and not mask[0]


def test_packing_keeps_conversations_whole_in_order_and_pads(tmp_path, tokenizer, tokenizer_path):
    conversations = CONVERSATIONS * 3
    stats = prepare_sft([write_jsonl(tmp_path / "chat.jsonl", conversations)], tokenizer_path, str(tmp_path / "out"),
                        SEQ_LEN, progress=False)
    ids, mask = read_outputs(tmp_path / "out")
    encoded = encode(tokenizer, conversations)
    tokens, labels = sum(len(c) for c, _ in encoded), sum(int(m.sum()) for _, m in encoded)
    assert stats == PackStats(conversations=len(conversations), instances=len(ids), tokens=tokens, label_tokens=labels)
    remaining = list(encoded)
    for row, (row_ids, row_mask) in enumerate(zip(ids, mask)):
        used = 0
        while remaining and used + len(remaining[0][0]) <= SEQ_LEN:  # greedy: every one that fits goes in
            conv_ids, conv_mask = remaining.pop(0)
            assert row_ids[used : used + len(conv_ids)].tolist() == conv_ids.tolist(), row
            assert row_mask[used : used + len(conv_ids)].tolist() == conv_mask.tolist(), row
            used += len(conv_ids)
        assert used > 0 and (row_ids[used:] == PAD).all() and not row_mask[used:].any()
    assert not remaining
    assert (tmp_path / "out" / "input_ids.npy.meta.json").exists()


@pytest.mark.parametrize("too_long", ["truncate", "drop"])
def test_over_long_conversations_are_truncated_or_dropped_and_counted(tmp_path, capsys, tokenizer, tokenizer_path,
                                                                      too_long):
    conversations = [CONVERSATIONS[1], LONG, CONVERSATIONS[4], LONG]  # 26 + 20 tokens fit one instance
    path = write_jsonl(tmp_path / "chat.jsonl", conversations)
    assert main(["--tokenizer", tokenizer_path, "--output", str(tmp_path / "out"), "--seq-len", str(SEQ_LEN),
                 "--too-long", too_long, path]) == 0
    summary = capsys.readouterr().out.splitlines()
    ids, mask = read_outputs(tmp_path / "out")
    (long_ids, long_mask), = encode(tokenizer, [LONG])
    assert len(long_ids) > SEQ_LEN
    if too_long == "truncate":
        assert len(summary) == 1 and "4 conversations" in summary[0] and "2 truncated, 0 dropped" in summary[0]
        for row in (1, 3):  # each truncated one fills an instance of its own with its first SEQ_LEN tokens
            assert ids[row].tolist() == long_ids[:SEQ_LEN].tolist()
            assert mask[row].tolist() == long_mask[:SEQ_LEN].tolist()
        assert len(ids) == 4
    else:
        assert len(summary) == 1 and "2 conversations" in summary[0] and "0 truncated, 2 dropped" in summary[0]
        assert len(ids) == 1 and LONG[0]["content"] not in tokenizer.decode(ids[0].tolist())
    assert f"in {len(ids)} instances of {SEQ_LEN} tokens" in summary[0]


def test_a_reply_cut_by_truncation_keeps_its_labels_up_to_the_cut():
    stats = PackStats()
    ids, mask = np.arange(10, dtype=np.uint32), np.arange(10) >= 6
    (row_ids, row_mask), = pack([(ids, mask)], 8, PAD, "truncate", stats)
    assert row_ids.tolist() == list(range(8)) and row_mask.tolist() == [False] * 6 + [True] * 2
    assert (stats.truncated, stats.label_tokens, stats.tokens) == (1, 2, 8)


BAD_LINES = [
    ("{not json", "invalid JSON"),
    (json.dumps({"text": "no messages"}), "'messages' list"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]}),
     "message 1 has role 'tool'"),
    (json.dumps({"messages": [{"role": "user"}]}), "message 0 (user) has no string 'content'"),
]


@pytest.mark.parametrize("line, reason", BAD_LINES, ids=["json", "messages", "role", "content"])
def test_bad_input_stops_with_one_line_naming_the_file_and_line_before_writing(tmp_path, capsys, tokenizer_path,
                                                                               line, reason):
    good = write_jsonl(tmp_path / "good.jsonl", CONVERSATIONS[:1])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": CONVERSATIONS[1]}) + "\n\n" + line + "\n")
    code = main(["--tokenizer", tokenizer_path, "--output", str(tmp_path / "out"), "--seq-len", "64", good, str(bad)])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: input {bad}:3: ") and reason in err[0]
    assert not (tmp_path / "out").exists()


def test_the_tool_runs_from_a_checkout(tmp_path, tokenizer_path):
    path = write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS)
    result = subprocess.run([sys.executable, str(REPO / "tools" / "prepare_sft.py"), "--tokenizer", tokenizer_path,
                             "--output", str(tmp_path / "out"), "--seq-len", str(SEQ_LEN), path],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    instances = len(read_outputs(tmp_path / "out")[0])
    assert line.startswith(f"{tmp_path / 'out'}: {len(CONVERSATIONS)} conversations in {instances} instances of "
                           f"{SEQ_LEN} tokens: ") and line.endswith("0 truncated, 0 dropped (longer than 64)")


MODEL = ["model.vocab_size=100352", "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
         "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.eos_token_id=100257",
         "model.pad_token_id=100277", "trainer.plots=false"]


def test_fine_tuning_on_the_files_divides_by_the_label_tokens_only(tmp_path, tokenizer_path):
    """Step 1 of a run from a checkpoint logs the mean cross-entropy of the starting weights over the label
    targets alone; the mean over every target would differ."""
    out = tmp_path / "sft"
    stats = prepare_sft([write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS * 2)], tokenizer_path, str(out), SEQ_LEN,
                        progress=False)
    ids_path, mask_path = out / "input_ids.npy", out / "label_mask.npy"
    batch = [f"data.seq_len={SEQ_LEN}", f"trainer.global_batch_size={stats.instances}", "trainer.micro_batch_size=1",
             "trainer.max_steps=1"]
    Trainer(load_config([*MODEL, *batch, f"data.paths=[{ids_path}]", f"trainer.run_dir={tmp_path / 'base'}"])).fit()
    sft = Trainer(load_config([*MODEL, *batch, f"data.paths=[{ids_path}]", f"data.label_mask_paths=[{mask_path}]",
                               f"load_path={tmp_path / 'base' / 'checkpoints' / 'latest'}", "reset_trainer_state=true",
                               f"trainer.run_dir={tmp_path / 'run'}"]))
    ids, mask = read_outputs(out)  # the step's batch is every instance, so its mean is independent of the order
    input_ids = torch.from_numpy(ids.astype(np.int64))
    with torch.no_grad():
        logits = sft.chunks[0].full_logits(input_ids)[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), input_ids[:, 1:].flatten(), reduction="none")
    labels = torch.from_numpy(mask[:, 1:].astype(bool)).flatten()  # position t predicts token t+1, if it is a label
    assert int(labels.sum()) < labels.numel() // 2
    sft.fit()
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert logged["step"] == 1
    assert logged["loss"] == pytest.approx(ce[labels].mean().item(), rel=1e-5)
    assert logged["loss"] != pytest.approx(ce.mean().item(), rel=5e-3)  # they differ by about 1% here
