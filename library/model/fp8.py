"""Frozen base weights stored in a narrow dtype (fp8 for ``--fp8_base``, fp16 on a CPU asked for fp16) and
computed in the compute dtype.

The up-cast happens per layer inside a custom autograd function: forward casts the stored weight, uses
it and drops it; backward casts it again to compute the input gradient. Nothing but the stored weight
(and, for conv, the input's shape) is kept for backward, so peak memory falls with the storage dtype instead
of rising as it does when the up-cast copy is kept alive by autograd. Base weights are frozen: no weight
gradient is ever computed. Norms and embeddings are not touched (the loader gives them the compute dtype).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
"""The storage dtype of `--fp8_base` / `--fp8_base_unet` (sd-scripts' too)."""


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        ctx.save_for_backward(weight)
        ctx.input_dtype = x.dtype
        return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = grad_out @ weight.to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        return (None if grad_x is None else grad_x.to(ctx.input_dtype)), None, None, None


class _Fp8Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dtype, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.conf = (x.shape, x.dtype, stride, padding, dilation, groups)
        return F.conv2d(
            x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), stride, padding, dilation, groups
        )

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (weight,) = ctx.saved_tensors
        shape, input_dtype, stride, padding, dilation, groups = ctx.conf
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(
                shape, weight.to(grad_out.dtype), grad_out, stride, padding, dilation, groups
            ).to(input_dtype)
        return grad_x, None, None, None, None, None, None, None


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _Fp8Linear.apply(x, self.weight, self.bias, self.fp8_compute_dtype)


def _conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if self.padding_mode != "zeros":
        raise NotImplementedError("fp8 conv supports zero padding only")
    return _Fp8Conv2d.apply(
        x, self.weight, self.bias, self.fp8_compute_dtype, self.stride, self.padding, self.dilation, self.groups
    )


def store_weights(model: nn.Module, storage_dtype: torch.dtype, compute_dtype: torch.dtype) -> int:
    """Store every Linear/Conv2d weight of a frozen model in `storage_dtype` (a no-op cast when the loader
    already did) and compute those layers in `compute_dtype`. Biases are kept in `compute_dtype`.
    Returns the number of layers converted."""
    converted = 0
    for module in model.modules():
        if type(module) not in (nn.Linear, nn.Conv2d):
            continue
        module.weight.requires_grad_(False)
        module.weight.data = module.weight.data.to(storage_dtype)
        if module.bias is not None:
            module.bias.requires_grad_(False)
            module.bias.data = module.bias.data.to(compute_dtype)
        module.fp8_compute_dtype = compute_dtype
        forward = _linear_forward if isinstance(module, nn.Linear) else _conv_forward
        module.forward = types.MethodType(forward, module)
        converted += 1
    return converted


def store_weights_in_fp8(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """`store_weights` in float8_e4m3fn (``--fp8_base``)."""
    return store_weights(model, FP8_DTYPE, compute_dtype)
