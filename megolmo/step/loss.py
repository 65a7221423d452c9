"""One optimizer step's forward and backward passes over this rank's micro-batches (no pipelining).

Each micro-batch's loss is its *sum* of token losses divided by the global batch's number of
loss-bearing tokens, so gradients summed over micro-batches and data-parallel ranks equal the
gradient of the global mean, whatever the split (DESIGN.md's loss convention).
"""
from __future__ import annotations

import torch

from megolmo.model.olmo2 import Olmo2ForCausalLM, shift_targets


def micro_batch_loss(model: Olmo2ForCausalLM, inputs: torch.Tensor, batch: dict[str, torch.Tensor],
                     loss_tokens: int, z_loss: float, device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss to backpropagate for one micro-batch (its share of the global mean, z-loss included),
    with the summed cross-entropy and logsumexp^2 (detached) for reporting. ``inputs`` are token ids, or
    the previous pipeline stage's hidden states."""
    targets, loss_mask = shift_targets(batch["input_ids"].to(device, non_blocking=True),
                                       batch["label_mask"].to(device, non_blocking=True))
    ce_sum, z_sum = model.loss_sums(inputs, targets, loss_mask)
    return (ce_sum + z_loss * z_sum) / max(loss_tokens, 1), ce_sum.detach(), z_sum.detach()


def forward_backward(model: Olmo2ForCausalLM, micro_batches: list[dict[str, torch.Tensor]], loss_tokens: int,
                     z_loss: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns this rank's summed cross-entropy and summed logsumexp^2 (both detached, fp32)."""
    ce_total = torch.zeros((), device=device)
    z_total = torch.zeros((), device=device)
    for batch in micro_batches:
        input_ids = batch["input_ids"].to(device, non_blocking=True)
        loss, ce_sum, z_sum = micro_batch_loss(model, input_ids, batch, loss_tokens, z_loss, device)
        loss.backward()
        ce_total += ce_sum
        z_total += z_sum
    return ce_total, z_total


def forward_only(model: Olmo2ForCausalLM, micro_batches: list[dict[str, torch.Tensor]], device: torch.device
                 ) -> torch.Tensor:
    """Each row's summed cross-entropy over its label tokens, micro-batches in order, without gradients."""
    rows = []
    with torch.no_grad():
        for batch in micro_batches:
            input_ids = batch["input_ids"].to(device, non_blocking=True)
            targets, loss_mask = shift_targets(input_ids, batch["label_mask"].to(device, non_blocking=True))
            rows.append(model.row_cross_entropy_sums(model(input_ids), targets, loss_mask))
    return torch.cat(rows)
