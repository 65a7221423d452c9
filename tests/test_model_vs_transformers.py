"""megolmo's OLMo 2 equals transformers' Olmo2ForCausalLM on the same weights."""
from __future__ import annotations

import pytest
import torch
from transformers import Olmo2ForCausalLM as HFOlmo2

from megolmo.model.config import ModelConfig
from megolmo.model.hf_config import hf_config
from megolmo.model.init import initialize_parameters
from megolmo.model.olmo2 import Olmo2ForCausalLM, shift_targets
from megolmo.model.params import count_parameters
from tests.conftest import GQA, PLAIN


def paired_models(cfg: ModelConfig, seed: int = 3) -> tuple[Olmo2ForCausalLM, HFOlmo2]:
    ours = Olmo2ForCausalLM(cfg)
    initialize_parameters(ours, seed, cfg.initializer_range)
    theirs = HFOlmo2(hf_config(cfg)).eval()
    theirs.load_state_dict({name: p.detach()[: cfg.vocab_size] for name, p in ours.named_parameters()}, strict=True)
    return ours, theirs


@pytest.mark.parametrize("cfg", [GQA, PLAIN], ids=["gqa", "plain"])
def test_logits_and_loss_match_transformers(cfg: ModelConfig):
    ours, theirs = paired_models(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        our_logits = ours.full_logits(ids)
        their_out = theirs(ids, labels=ids)
    assert our_logits.shape == their_out.logits.shape
    assert (our_logits - their_out.logits).abs().max().item() < 1e-4
    targets, mask = shift_targets(ids, torch.ones_like(ids, dtype=torch.bool))
    ce_sum, _ = ours.loss_sums(ids, targets, mask)
    assert ce_sum.item() / mask.sum().item() == pytest.approx(their_out.loss.item(), rel=1e-6)


def test_label_mask_matches_transformers_ignore_index():
    ours, theirs = paired_models(GQA)
    ids = torch.randint(0, GQA.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    label_mask = torch.rand(2, 33, generator=torch.Generator().manual_seed(2)) < 0.4
    labels = ids.masked_fill(~label_mask, -100)
    targets, mask = shift_targets(ids, label_mask)
    with torch.no_grad():
        ce_sum, _ = ours.loss_sums(ids, targets, mask)
        expected = theirs(ids, labels=labels).loss
    assert ce_sum.item() / mask.sum().item() == pytest.approx(expected.item(), rel=1e-6)


def test_gradients_match_transformers():
    ours, theirs = paired_models(GQA)
    theirs.train()
    ids = torch.randint(0, GQA.vocab_size, (2, 24), generator=torch.Generator().manual_seed(4))
    targets, mask = shift_targets(ids, torch.ones_like(ids, dtype=torch.bool))
    ce_sum, _ = ours.loss_sums(ids, targets, mask)
    (ce_sum / mask.sum()).backward()
    theirs(ids, labels=ids).loss.backward()
    their_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad[: GQA.vocab_size], their_params[name].grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


def test_padded_vocabulary_never_changes_the_loss():
    """The same weights with 128-row and 1-row padding multiples give the same loss and gradients."""
    padded = GQA
    unpadded = ModelConfig(**{**GQA.to_dict(), "vocab_pad_multiple": 1})
    a, b = Olmo2ForCausalLM(padded), Olmo2ForCausalLM(unpadded)
    assert a.lm_head.weight.shape[0] == 384 and b.lm_head.weight.shape[0] == 300
    initialize_parameters(a, 5, 0.02)
    initialize_parameters(b, 5, 0.02)
    ids = torch.randint(0, GQA.vocab_size, (2, 16), generator=torch.Generator().manual_seed(6))
    targets, mask = shift_targets(ids, torch.ones_like(ids, dtype=torch.bool))
    losses = []
    for model in (a, b):
        ce, z = model.loss_sums(ids, targets, mask)
        (ce + 1e-4 * z).backward()
        losses.append((ce.item(), z.item()))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    torch.testing.assert_close(a.lm_head.weight.grad[:300], b.lm_head.weight.grad)
    assert a.lm_head.weight.grad[300:].abs().max() == 0


def test_z_loss_is_logsumexp_squared():
    ours, _ = paired_models(GQA)
    ids = torch.randint(0, GQA.vocab_size, (1, 12), generator=torch.Generator().manual_seed(7))
    targets, mask = shift_targets(ids, torch.ones_like(ids, dtype=torch.bool))
    with torch.no_grad():
        _, z_sum = ours.loss_sums(ids, targets, mask)
        lse = torch.logsumexp(ours.full_logits(ids)[0, :-1], dim=-1)
    assert z_sum.item() == pytest.approx(lse.square().sum().item(), rel=1e-5)


@pytest.mark.parametrize("name", ["olmo2_1b", "olmo2_7b", "olmo2_13b", "olmo2_32b"])
def test_named_config_parameter_counts_equal_transformers(name: str):
    cfg = ModelConfig.named(name)
    with torch.device("meta"):
        theirs = HFOlmo2(hf_config(cfg))
    ours = Olmo2ForCausalLM(cfg, device="meta")
    their_count = sum(p.numel() for p in theirs.parameters())
    assert sum(p.numel() for p in ours.parameters()) == their_count
    assert count_parameters(cfg) == their_count
    assert {n: tuple(p.shape) for n, p in ours.named_parameters()} == \
        {n: tuple(p.shape) for n, p in theirs.named_parameters()}
    assert theirs.config.rope_parameters["rope_theta"] == 500000.0


def test_named_configs_have_released_sizes():
    sizes = {name: ModelConfig.named(name) for name in ("olmo2_1b", "olmo2_7b", "olmo2_13b", "olmo2_32b")}
    assert [(c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads)
            for c in sizes.values()] == [(16, 2048, 8192, 16, 16), (32, 4096, 11008, 32, 32),
                                         (40, 5120, 13824, 40, 40), (64, 5120, 27648, 40, 8)]
    assert all(c.vocab_size == 100352 and c.rope_theta == 500000.0 and c.rms_norm_eps == 1e-6
               for c in sizes.values())


def test_initialisation_is_truncated_normal_and_seeded_by_name():
    a, b = Olmo2ForCausalLM(GQA), Olmo2ForCausalLM(GQA)
    initialize_parameters(a, 11, 0.02)
    initialize_parameters(b, 11, 0.02)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    q = a.model.layers["0"].self_attn.q_proj.weight
    k = a.model.layers["0"].self_attn.k_proj.weight
    assert q.abs().max() <= 0.06 + 1e-7 and 0.015 < q.std() < 0.02
    assert not torch.equal(q[:16], k[:16])
    assert torch.equal(a.model.layers["1"].post_attention_layernorm.weight, torch.ones(GQA.hidden_size))
