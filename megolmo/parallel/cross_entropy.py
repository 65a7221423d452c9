"""Cross-entropy and logsumexp over vocabulary-split logits, without gathering the logits.

The max and the sum of exponentials are reduced across the TP group; columns past the true
vocabulary (padding) are excluded from the softmax on every rank, so the loss does not depend
on how much padding the TP size needs.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megolmo.parallel.mappings import Group, all_reduce_sum, group_size


# Elements of fp32 work per chunk of rows: the fp32 temporaries stay near 1 GiB whatever the token count.
CHUNK_ELEMENTS = 1 << 28


def _row_chunks(rows: int, cols: int, chunk_elements: int) -> list[slice]:
    step = max(1, chunk_elements // max(cols, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _minus(chunk: torch.Tensor, per_row: torch.Tensor) -> torch.Tensor:
    """``chunk - per_row[:, None]`` as a new fp32 tensor (casting first, then subtracting in place, is
    the faster way from bf16; fp32 input must not be written)."""
    if chunk.dtype == torch.float32:
        return chunk - per_row.unsqueeze(-1)
    return chunk.float().sub_(per_row.unsqueeze(-1))


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Never a second logits-sized fp32 tensor. bf16 (or unconsumable) logits: forward keeps only the
    logits and one fp32 logsumexp per token, and backward recomputes the softmax, ``chunk_elements`` of
    fp32 work at a time (at 16k tokens x 100k vocabulary in bf16: 3.3 GB kept for backward instead of
    a 6.6 GB fp32 softmax). fp32 logits that nothing else reads (``consume_logits``) are turned into
    the softmax in place and become the gradient: no copy and no recompute. Padding columns are
    sliced off."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, valid_cols: int,
                group: Group, chunk_elements: int, consume_logits: bool) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = logits.shape
        in_place = consume_logits and logits.dtype == torch.float32
        chunks = _row_chunks(rows, cols, chunk_elements)
        real = logits[:, :valid_cols]
        local_targets = targets - vocab_start
        in_range = (local_targets >= 0) & (local_targets < valid_cols)
        safe_targets = local_targets.masked_fill(~in_range, 0).unsqueeze(-1)
        row_max = torch.full((rows,), float("-inf"), dtype=torch.float32, device=logits.device)
        if valid_cols > 0:
            row_max = real.amax(dim=-1).float()  # a max is exact in any dtype: no fp32 copy needed
        if group_size(group) > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        # One all-reduce for both per-token sums: the exponentials and the target logit (which only
        # the rank holding the target's column contributes).
        sums = torch.zeros(2, rows, dtype=torch.float32, device=logits.device)
        if valid_cols > 0:
            for c in chunks:
                shifted = real[c].sub_(row_max[c].unsqueeze(-1)) if in_place else _minus(real[c], row_max[c])
                sums[1, c] = shifted.gather(-1, safe_targets[c]).squeeze(-1).masked_fill(~in_range[c], 0.0)
                sums[0, c] = shifted.exp_().sum(dim=-1)
        all_reduce_sum(sums, group)
        if in_place:
            real.div_(sums[0].unsqueeze(-1))  # the logits buffer now holds the softmax
        log_sum_exp = sums[0].log()
        lse = log_sum_exp + row_max
        ctx.save_for_backward(logits, safe_targets, in_range, lse)
        ctx.valid_cols, ctx.chunks, ctx.in_place = valid_cols, chunks, in_place
        return log_sum_exp - sums[1], lse

    @staticmethod
    def backward(ctx, grad_ce: torch.Tensor, grad_lse: torch.Tensor):
        logits, safe_targets, in_range, lse = ctx.saved_tensors
        valid = ctx.valid_cols
        scale = (grad_ce + grad_lse).unsqueeze(-1)
        target_grad = (-grad_ce * in_range).unsqueeze(-1)
        if ctx.in_place:
            grad = logits  # the softmax, computed in forward
            if valid > 0:  # a TP rank may hold padding columns only
                grad[:, :valid].mul_(scale).scatter_add_(-1, safe_targets, target_grad)
            grad[:, valid:] = 0.0
            return grad, None, None, None, None, None, None
        grad = torch.zeros_like(logits) if valid < logits.shape[-1] else torch.empty_like(logits)
        if valid > 0:
            for c in ctx.chunks:
                probs = _minus(logits[c, :valid], lse[c]).exp_()
                probs.mul_(scale[c]).scatter_add_(-1, safe_targets[c], target_grad[c])
                grad[c, :valid] = probs
        return grad, None, None, None, None, None, None


def single_rank_loss_sums(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor, valid_cols: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked sums of the cross-entropy and of logsumexp^2 when one rank holds the whole vocabulary,
    written as plain tensor operations so that ``torch.compile`` fuses them into a few passes over
    the logits, in their own dtype, instead of materialising fp32 copies (``trainer.compile``)."""
    x = logits[..., :valid_cols].float()
    lse = torch.logsumexp(x, dim=-1)
    ce = lse - x.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mask = loss_mask.to(ce.dtype)
    return (ce * mask).sum(), (lse.square() * mask).sum()


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int = 0,
                                 valid_cols: int | None = None, group: Group = None,
                                 chunk_elements: int = CHUNK_ELEMENTS, consume_logits: bool = False
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy and logsumexp (both fp32) from this rank's ``[tokens, columns]`` slice of the
    logits. ``vocab_start`` is the global id of local column 0; ``valid_cols`` how many local columns are
    real vocabulary (the rest is padding). ``consume_logits`` lets fp32 logits that nothing else reads be
    overwritten (see ``_VocabParallelCrossEntropy``)."""
    valid = logits.shape[-1] if valid_cols is None else valid_cols
    return _VocabParallelCrossEntropy.apply(logits, targets, vocab_start, valid, group, chunk_elements,
                                            consume_logits)
