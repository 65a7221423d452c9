"""The OLMo 2 causal LM, read top to bottom: embed -> blocks -> final norm -> LM head -> loss.

Parameter names equal transformers' ``Olmo2ForCausalLM`` names, so conversion is a rename-free
copy. A model may hold a contiguous range of the layers, with or without the embedding and the
head: that is how a pipeline stage is built, without the model knowing it is pipelined.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megolmo.model.block import Block
from megolmo.model.config import ModelConfig
from megolmo.model.norm import RMSNorm
from megolmo.model.rope import RotaryEmbedding
from megolmo.parallel.collectives import all_gather
from megolmo.parallel.cross_entropy import vocab_parallel_cross_entropy
from megolmo.parallel.layers import TensorParallel, VocabParallelEmbedding, VocabParallelHead


class LayerExecution:
    """How the blocks run: plain calls, recomputed in backward under activation checkpointing.
    Kernel back-ends replace it (``megolmo/kernels``), e.g. to run the layers inside an FP8 autocast."""

    def __init__(self, checkpointing: bool):
        self.checkpointing = checkpointing

    def stack(self) -> AbstractContextManager:
        """Entered once around all of a chunk's blocks."""
        return nullcontext()

    def run(self, layer_id: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)


class Olmo2Body(nn.Module):
    """``embed_tokens``, ``layers`` and ``norm``: the part transformers calls ``model``."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, layer_ids: Iterable[int], with_embedding: bool,
                 with_final_norm: bool, device=None):
        super().__init__()
        self.cfg = cfg
        self.tp = tp
        rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings)
        if device is not None:
            rope = rope.to(device)
        if with_embedding:
            self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp, cfg.vocab_pad_multiple,
                                                       device=device)
        self.layers = nn.ModuleDict({str(i): Block(cfg, tp, rope, device=device) for i in layer_ids})
        self.execution = LayerExecution(cfg.activation_checkpointing)
        if with_final_norm:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device=device)
            self.norm.weight.sequence_parallel = tp.sequence_parallel and tp.size > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "embed_tokens"):
            x = self.embed_tokens(x)
        with self.execution.stack():
            for layer_id, block in self.layers.items():
                x = self.execution.run(int(layer_id), block, x)
        if hasattr(self, "norm"):
            x = self.norm(x)
        return x


class Olmo2ForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel | None = None, layer_ids: Iterable[int] | None = None,
                 with_embedding: bool = True, with_head: bool = True, device=None):
        super().__init__()
        self.cfg = cfg
        self.tp = tp or TensorParallel()
        layer_ids = range(cfg.num_hidden_layers) if layer_ids is None else layer_ids
        self.model = Olmo2Body(cfg, self.tp, layer_ids, with_embedding, with_head, device)
        # A compiled ``single_rank_loss_sums`` when kernels ask for it (``trainer.compile`` at TP=1).
        self.compiled_loss_sums = None
        if with_head:
            self.lm_head = VocabParallelHead(cfg.hidden_size, cfg.vocab_size, self.tp, cfg.vocab_pad_multiple,
                                             device=device)

    @property
    def has_head(self) -> bool:
        return hasattr(self, "lm_head")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (or the previous stage's hidden states) to this rank's slice of the logits
        (or hidden states when this model holds no head)."""
        h = self.model(x)
        return self.lm_head(h) if self.has_head else h

    def loss_sums(self, x: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sums over loss-bearing tokens of the cross-entropy and of logsumexp^2 (the z-loss term).

        Sums, not means: the caller divides by the global number of loss-bearing tokens, which
        makes the loss identical for every micro-batch split and data-parallel layout.
        """
        return self.loss_sums_from_logits(self(x), targets, loss_mask)

    def loss_sums_from_logits(self, logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """``loss_sums`` from this rank's logits (consumed: they become the softmax in place); a pipeline
        schedule calls it on the output of the stage that holds the head."""
        if self.compiled_loss_sums is not None:
            return self.compiled_loss_sums(logits, targets, loss_mask, self.lm_head.valid_rows)
        ce, lse = vocab_parallel_cross_entropy(logits.flatten(0, -2), targets.flatten(),
                                               self.lm_head.vocab_start, self.lm_head.valid_rows, self.tp.group,
                                               consume_logits=True)
        mask = loss_mask.flatten().to(ce.dtype)
        return (ce * mask).sum(), (lse.square() * mask).sum()

    def row_cross_entropy_sums(self, logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor
                               ) -> torch.Tensor:
        """Each row's summed cross-entropy over its loss-bearing tokens, vocab-parallel (evaluation: a held-out
        set sums the rows, a downstream task scores each row's continuation). Consumes ``logits``."""
        ce, _ = vocab_parallel_cross_entropy(logits.flatten(0, -2), targets.flatten(), self.lm_head.vocab_start,
                                             self.lm_head.valid_rows, self.tp.group, consume_logits=True)
        return (ce.view(targets.shape) * loss_mask.to(ce.dtype)).sum(-1)

    def full_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits over the true vocabulary, gathered across TP ranks: for tests and evaluation."""
        logits = self(input_ids)
        if self.tp.size > 1:
            parts = [torch.empty_like(logits) for _ in range(self.tp.size)]
            all_gather(parts, logits.contiguous(), self.tp.group)
            logits = torch.cat(parts, dim=-1)
        return logits[..., : self.cfg.vocab_size]


def shift_targets(input_ids: torch.Tensor, label_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and loss mask aligned with every input position: position t predicts token t+1;
    the last position predicts nothing. Keeping all positions keeps shapes even for sequence parallelism."""
    targets = torch.zeros_like(input_ids)
    targets[:, :-1] = input_ids[:, 1:]
    loss_mask = torch.zeros_like(label_mask, dtype=torch.bool)
    loss_mask[:, :-1] = label_mask[:, 1:]
    return targets, loss_mask

