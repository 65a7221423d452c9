"""Puts a ``KernelChoice`` into a built model chunk, before its parameters go into the flat buffers.
The back-end modules are imported here only, and only when chosen."""
from __future__ import annotations

import torch

from megolmo.kernels.select import Fp8Settings, KernelChoice
from megolmo.model.olmo2 import Olmo2ForCausalLM
from megolmo.parallel.cross_entropy import single_rank_loss_sums
from megolmo.parallel.mappings import Group, prepare_for_compile


def apply_kernels(model: Olmo2ForCausalLM, choice: KernelChoice, fp8: Fp8Settings, amax_group: Group = None
                  ) -> list[str]:
    """Swap in the chosen back-end's modules; returns the names of the modules replaced."""
    bf16_layers = fp8.bf16_layers(model.cfg.num_hidden_layers)
    if choice.backend == "te":
        from megolmo.kernels.te import apply_transformer_engine
        recipe = choice.fp8.removeprefix("te-") if choice.fp8 else None
        return apply_transformer_engine(model, recipe, amax_group, bf16_layers)
    swapped: list[str] = []
    if choice.attention == "flash-attn":
        from megolmo.kernels.flash import apply_flash_attn
        swapped += apply_flash_attn(model)
    if choice.norm == "apex":
        from megolmo.kernels.apex import apply_fused_rms_norm
        swapped += apply_fused_rms_norm(model)
    if choice.fp8 == "torchao-tensorwise":
        from megolmo.kernels.float8 import convert_to_float8
        swapped += convert_to_float8(model, bf16_layers)
    return swapped


def prepare_model(model: Olmo2ForCausalLM, dtype: torch.dtype, choice: KernelChoice, fp8: Fp8Settings,
                  amax_group: Group = None, compile_blocks: bool = False) -> Olmo2ForCausalLM:
    """A freshly initialised chunk made ready to train: parameters in the compute dtype (RoPE's tables
    stay fp32), the chosen kernels swapped in, and each block compiled by ``torch.compile`` when asked
    (``trainer.compile``: it fuses the memory-bound norm, RoPE and SwiGLU work; blocks share their
    structure, so one compilation serves them all), and at TP=1 the loss too (no fp32 logits copies)."""
    for param in model.parameters():
        param.data = param.data.to(dtype)
    apply_kernels(model, choice, fp8, amax_group)
    if compile_blocks:
        prepare_for_compile()
        for block in model.model.layers.values():
            block.compile()
        if model.has_head and model.tp.size == 1:
            model.compiled_loss_sums = torch.compile(single_rank_loss_sums)
    return model
