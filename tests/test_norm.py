"""RMSNorm's hand-written backward: the gradients of the fp32 formula, with a fraction of its saved memory."""
from __future__ import annotations

import pytest
import torch

from megolmo.model.norm import RMSNorm


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """OLMo 2's RMSNorm as transformers writes it, differentiated by autograd."""
    x32 = x.float()
    return (weight.float() * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)


def saved_bytes(fn) -> int:
    total = []

    def pack(t: torch.Tensor):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(total)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_gradients_equal_autograd_of_the_fp32_formula(dtype, tol):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=g).to(dtype)
    weight = (1 + 0.3 * torch.randn(64, generator=g)).to(dtype)
    upstream = torch.randn(3, 5, 64, generator=g).to(dtype)
    outputs, grads = [], []
    for use_module in (True, False):
        xi, wi = x.clone().requires_grad_(), weight.clone().requires_grad_()
        if use_module:
            norm = RMSNorm(64, 1e-6)
            norm.weight = torch.nn.Parameter(wi)
            y = norm(xi)
            wi = norm.weight
        else:
            y = reference(xi, wi, 1e-6)
        y.backward(upstream)
        outputs.append(y.float())
        grads.append((xi.grad.float(), wi.grad.float()))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    for ours, theirs in zip(grads[0], grads[1]):
        assert float((ours - theirs).norm() / theirs.norm()) < tol


def test_keeps_the_input_and_one_float_per_row_instead_of_fp32_copies():
    x = torch.randn(4, 128, 256, dtype=torch.bfloat16, requires_grad=True)
    norm = RMSNorm(256, 1e-6)
    norm.weight.data = norm.weight.data.bfloat16()
    ours = saved_bytes(lambda: norm(x))
    formula = saved_bytes(lambda: reference(x, norm.weight, 1e-6))
    rows = 4 * 128
    assert ours == x.numel() * 2 + 256 * 2 + rows * 4  # input, weight, fp32 1/rms per row
    assert formula > 4 * ours
