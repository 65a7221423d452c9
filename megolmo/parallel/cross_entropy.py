"""Cross-entropy and logsumexp over vocabulary-split logits, without gathering the logits.

The max and the sum of exponentials are reduced across the TP group; columns past the true
vocabulary (padding) are excluded from the softmax on every rank, so the loss does not depend
on how much padding the TP size needs.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megolmo.parallel.mappings import Group, all_reduce_sum, group_size


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, valid_cols: int,
                group: Group, consume_logits: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x = logits.float()
        if x is logits and not consume_logits:
            x = x.clone()
        if valid_cols < x.shape[-1]:
            x[..., valid_cols:] = float("-inf")
        col_max = x.amax(dim=-1)
        if group_size(group) > 1:
            dist.all_reduce(col_max, op=dist.ReduceOp.MAX, group=group)
        shifted = x.sub_(col_max.unsqueeze(-1))
        local_targets = targets - vocab_start
        in_range = (local_targets >= 0) & (local_targets < valid_cols)
        safe_targets = local_targets.masked_fill(~in_range, 0).unsqueeze(-1)
        target_logit = shifted.gather(-1, safe_targets).squeeze(-1).masked_fill(~in_range, 0.0)
        probs = shifted.exp_()
        # One all-reduce for both per-token sums: the exponentials and the target logit (which only
        # the rank holding the target's column contributes).
        sums = all_reduce_sum(torch.stack([probs.sum(dim=-1), target_logit]), group)
        sum_exp, target_logit = sums[0], sums[1]
        log_sum_exp = sum_exp.log()
        probs.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(probs, safe_targets, in_range)
        ctx.logits_dtype = logits.dtype
        return log_sum_exp - target_logit, log_sum_exp + col_max

    @staticmethod
    def backward(ctx, grad_ce: torch.Tensor, grad_lse: torch.Tensor):
        probs, safe_targets, in_range = ctx.saved_tensors
        grad = probs.mul_((grad_ce + grad_lse).unsqueeze(-1))
        grad.scatter_add_(-1, safe_targets, (-grad_ce * in_range).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None, None, None


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
                                 consume_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy and logsumexp (both fp32) from this rank's slice of the logits.

    ``vocab_start`` is the global id of local column 0; ``valid_cols`` how many local columns are
    real vocabulary (the rest is padding). ``consume_logits`` lets fp32 logits that nothing else reads
    be overwritten, saving a logits-sized temporary, the largest allocation of a training step.
    """
    valid = logits.shape[-1] if valid_cols is None else valid_cols
    return _VocabParallelCrossEntropy.apply(logits, targets, vocab_start, valid, group, consume_logits)
