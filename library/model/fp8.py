"""Frozen base weights stored in a narrow dtype (fp8 for ``--fp8_base``, fp16 on a CPU asked for fp16) and
computed in the compute dtype.

The up-cast happens per layer inside a custom autograd function: forward casts the stored weight, uses
it and drops it; backward casts it again to compute the input gradient. Nothing but the stored weight
(and, for conv, the input's shape) is kept for backward, so peak memory falls with the storage dtype instead
of rising as it does when the up-cast copy is kept alive by autograd. Base weights are frozen: no weight
gradient is ever computed. Norms and embeddings are not touched (the loader gives them the compute dtype).

On a CPU, fp8 weights are up-cast by table and a few rows at a time (`upcast_rows`): PyTorch's own fp8 `.to`
converts about 200-300 M elements/s there, a 65,536-entry table indexed by pairs of fp8 bytes (same bits: the table
is made by `.to` itself) about 2 G/s per thread, and a layer computed chunk by chunk through one small reused buffer
never writes its whole fp32 weight to memory nor faults in fresh pages for it. CUDA and fp16 storage keep `.to`.
bench/step_overhead.py measures the step against fp32 (section fp8).
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
"""The storage dtype of `--fp8_base` / `--fp8_base_unet` (sd-scripts' too)."""

TABLE_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
"""Storage dtypes up-cast by table on a CPU (one byte per element: 256 codes)."""

UPCAST_PIECE = 1 << 15
"""Elements up-cast by one table lookup on a CPU. Below PyTorch's parallel grain (32,768) each lookup runs on one
thread: with several threads on a busy machine, every parallel region waits for a thread that is not running.
Measured on a 1280x5120 layer, forward and input gradient, 4 tokens, this project's 2-core CPU shared with other
jobs, two threads: 11.2 ms in pieces of 2^15, 1,284 ms of 2^17, 203 ms of 2^20 (fp32 weights 16.6 ms, `.to` 70 ms);
one thread: 10-11.5 ms for all three (fp32 3.3 ms, `.to` 53-64 ms)."""

CHUNK_ELEMENTS = UPCAST_PIECE
"""Weight elements a Linear layer multiplies with at a time: the product of so few rows also runs on one thread."""

ONE_THREAD_CHUNK_ELEMENTS = 1 << 18
"""The same when PyTorch runs one thread (no parallel regions to wait on): fewer calls. Summed over the full SDXL
UNet's Linear layers at 64 px, one thread: fp32 2.2 s, chunks of 2^15 6.0 s, of 2^18 about 3.9 s."""

CONV_CHUNK_ELEMENTS = 1 << 20
"""The same for Conv2d (4 MiB in fp32): a convolution call costs far more than a matrix product, so fewer, larger
chunks."""

MIN_CHUNKED_ELEMENTS = 1 << 16
"""Smaller weights are up-cast by `.to`: one call, where per-call overhead outweighs the table's speed."""

UPCASTS = ("table", "cast")
"""How a CPU up-casts stored weights: "table" (chunked, by table: the default) or "cast" (`.to`, as before)."""

_WIDER_INT = {1: torch.int16, 2: torch.int32, 4: torch.int64}
"""An integer dtype twice as wide as a compute dtype of this many bytes: one pair-table entry holds two values."""


@functools.cache
def byte_table(storage: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
    """`dtype` value of each of the 256 codes of the one-byte `storage` dtype, made by `.to` (NaN codes included)."""
    return torch.arange(256, dtype=torch.uint8).view(storage).to(dtype)


@functools.cache
def pair_table(storage: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
    """Entry k holds the `dtype` values of the two codes whose bytes, read as one native uint16, are k: the two
    values side by side in memory, as one integer twice as wide as `dtype`."""
    codes = torch.arange(65536, dtype=torch.int32).view(torch.uint8).view(65536, 4)
    pairs = codes[:, :2] if sys.byteorder == "little" else codes[:, 2:]  # the bytes of uint16 k, in memory order
    values = byte_table(storage, dtype)[pairs.long()].contiguous()
    return values.view(_WIDER_INT[values.element_size()]).view(65536)


def uses_table(weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether `upcast` reads a table for this weight: one-byte storage on a CPU, to a dtype a pair fits in."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in TABLE_DTYPES
        and dtype.is_floating_point
        and torch.empty((), dtype=dtype).element_size() in _WIDER_INT
    )


def upcast_into(weight: torch.Tensor, out: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """`weight` (one-byte floats on a CPU, contiguous) converted into `out` (same number of elements), bit for bit
    what `weight.to(out.dtype)` gives; `index` is int32 scratch of at least half as many elements (made if None)."""
    count = weight.numel()
    if count > UPCAST_PIECE and count % 2 == 0 and torch.get_num_threads() > 1:  # each lookup on one thread
        flat_in, flat_out = weight.reshape(-1), out.reshape(-1)
        for start in range(0, count, UPCAST_PIECE):
            stop = min(count, start + UPCAST_PIECE)
            upcast_into(flat_in[start:stop], flat_out[start:stop], index)
        return out
    flat = weight.reshape(-1).view(torch.uint8)
    if count % 2 == 0:
        pairs = count // 2
        index = torch.empty(pairs, dtype=torch.int32) if index is None else index[:pairs]
        index.copy_(flat.view(torch.uint16))
        table = pair_table(weight.dtype, out.dtype)
        torch.index_select(table, 0, index, out=out.reshape(-1).view(table.dtype))
    else:  # odd sizes: a byte at a time (the uint16 view needs pairs)
        index = torch.empty(count, dtype=torch.int32) if index is None else index[:count]
        index.copy_(flat)
        torch.index_select(byte_table(weight.dtype, out.dtype), 0, index, out=out.reshape(-1))
    return out


def upcast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The stored weight in the compute dtype, as `weight.to(dtype)` gives it (by table where `uses_table`)."""
    if weight.dtype == dtype:
        return weight
    if not uses_table(weight, dtype) or not weight.is_contiguous():
        return weight.to(dtype)
    return upcast_into(weight, torch.empty(weight.shape, dtype=dtype))


class UpcastBuffers:
    """The scratch one model's layers up-cast their chunks into, made once and reused: a fresh buffer per layer
    would fault in new pages each time. Layers run one at a time (forward, then backward), so one is enough."""

    def __init__(self) -> None:
        self._values: dict[torch.dtype, torch.Tensor] = {}
        self._index = torch.empty(0, dtype=torch.int32)

    def take(self, count: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A `dtype` buffer of `count` elements and int32 index scratch for it."""
        values = self._values.get(dtype)
        if values is None or values.numel() < count:
            values = self._values[dtype] = torch.empty(count, dtype=dtype)
        if self._index.numel() < count:
            self._index = torch.empty(count, dtype=torch.int32)
        return values[:count], self._index


def upcast_rows(
    weight: torch.Tensor, dtype: torch.dtype, buffers: UpcastBuffers, chunk: int | None = None
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(start, stop, weight[start:stop] up-cast) over the first dimension, about `chunk` elements at a time (by
    default `CHUNK_ELEMENTS`, `ONE_THREAD_CHUNK_ELEMENTS` with one torch thread), each chunk written over the previous
    one in `buffers`: use a chunk before taking the next."""
    rows = weight.shape[0]
    per_row = weight[0].numel()
    if chunk is None:
        chunk = CHUNK_ELEMENTS if torch.get_num_threads() > 1 else ONE_THREAD_CHUNK_ELEMENTS
    step = max(1, chunk // per_row)
    values, index = buffers.take(min(rows, step) * per_row, dtype)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        chunk = values[: (stop - start) * per_row].view(stop - start, *weight.shape[1:])
        yield start, stop, upcast_into(weight[start:stop], chunk, index)


def _chunked(weight: torch.Tensor, dtype: torch.dtype, upcast_mode: str) -> bool:
    """Whether this layer computes chunk by chunk (CPU, table dtypes, not a small weight, outside torch.compile's
    tracing, where inductor generates its own conversion)."""
    return (
        upcast_mode == "table"
        and weight.numel() >= MIN_CHUNKED_ELEMENTS
        and uses_table(weight, dtype)
        and weight.is_contiguous()
        and not torch.compiler.is_compiling()
    )


def _upcast_whole(weight: torch.Tensor, dtype: torch.dtype, upcast_mode: str) -> torch.Tensor:
    table = upcast_mode == "table" and weight.numel() >= MIN_CHUNKED_ELEMENTS and not torch.compiler.is_compiling()
    return upcast(weight, dtype) if table else weight.to(dtype)


def _linear_chunked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, buffers: UpcastBuffers):
    """F.linear with the weight up-cast a few rows at a time: out^T[rows] = W[rows] @ x^T."""
    x2 = x.reshape(-1, x.shape[-1])
    out_t = torch.empty(weight.shape[0], x2.shape[0], dtype=x.dtype)
    for start, stop, rows in upcast_rows(weight, x.dtype, buffers):
        torch.mm(rows, x2.t(), out=out_t[start:stop])
    out = out_t.t().contiguous().view(*x.shape[:-1], weight.shape[0])  # contiguous, as F.linear's output
    return out if bias is None else out.add_(bias)


def _linear_input_grad_chunked(grad_out: torch.Tensor, weight: torch.Tensor, buffers: UpcastBuffers):
    """grad_out @ W, summed over row chunks of W."""
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    grad_x = torch.empty(g2.shape[0], weight.shape[1], dtype=grad_out.dtype)
    for start, stop, rows in upcast_rows(weight, grad_out.dtype, buffers):
        if start == 0:
            torch.mm(g2[:, start:stop], rows, out=grad_x)
        else:
            grad_x.addmm_(g2[:, start:stop], rows)
    return grad_x.view(*grad_out.shape[:-1], weight.shape[1])


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dtype, upcast_mode, buffers):
        ctx.save_for_backward(weight)
        ctx.input_dtype = x.dtype
        ctx.upcast = (upcast_mode, buffers)
        x = x.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        if _chunked(weight, dtype, upcast_mode):
            return _linear_chunked(x, weight, bias, buffers)
        return F.linear(x, _upcast_whole(weight, dtype, upcast_mode), bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (weight,) = ctx.saved_tensors
        upcast_mode, buffers = ctx.upcast
        grad_x = None
        if ctx.needs_input_grad[0]:
            if _chunked(weight, grad_out.dtype, upcast_mode):
                grad_x = _linear_input_grad_chunked(grad_out, weight, buffers)
            else:
                grad_x = grad_out @ _upcast_whole(weight, grad_out.dtype, upcast_mode)
            grad_x = grad_x.to(ctx.input_dtype)
        return grad_x, None, None, None, None, None


class _Fp8Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dtype, stride, padding, dilation, groups, upcast_mode, buffers):
        ctx.save_for_backward(weight)
        ctx.conf = (x.shape, x.dtype, stride, padding, dilation, groups)
        ctx.upcast = (upcast_mode, buffers)
        x = x.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        if groups == 1 and _chunked(weight, dtype, upcast_mode):
            outs = [
                F.conv2d(x, rows, None, stride, padding, dilation)
                for _, _, rows in upcast_rows(weight, dtype, buffers, CONV_CHUNK_ELEMENTS)
            ]
            out = torch.cat(outs, 1)
            return out if bias is None else out.add_(bias.view(1, -1, 1, 1))
        return F.conv2d(x, _upcast_whole(weight, dtype, upcast_mode), bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (weight,) = ctx.saved_tensors
        shape, input_dtype, stride, padding, dilation, groups = ctx.conf
        upcast_mode, buffers = ctx.upcast
        grad_x = None
        if ctx.needs_input_grad[0]:
            dtype = grad_out.dtype
            if groups == 1 and _chunked(weight, dtype, upcast_mode):
                for start, stop, rows in upcast_rows(weight, dtype, buffers, CONV_CHUNK_ELEMENTS):
                    part = torch.nn.grad.conv2d_input(shape, rows, grad_out[:, start:stop], stride, padding, dilation)
                    grad_x = part if grad_x is None else grad_x.add_(part)
            else:
                full = _upcast_whole(weight, dtype, upcast_mode)
                grad_x = torch.nn.grad.conv2d_input(shape, full, grad_out, stride, padding, dilation, groups)
            grad_x = grad_x.to(input_dtype)
        return grad_x, None, None, None, None, None, None, None, None, None


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _Fp8Linear.apply(x, self.weight, self.bias, self.fp8_compute_dtype, self.fp8_upcast, self.fp8_buffers)


def _conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if self.padding_mode != "zeros":
        raise NotImplementedError("fp8 conv supports zero padding only")
    return _Fp8Conv2d.apply(
        x,
        self.weight,
        self.bias,
        self.fp8_compute_dtype,
        self.stride,
        self.padding,
        self.dilation,
        self.groups,
        self.fp8_upcast,
        self.fp8_buffers,
    )


def store_weights(
    model: nn.Module, storage_dtype: torch.dtype, compute_dtype: torch.dtype, *, upcast: str = "table"
) -> int:
    """Store every Linear/Conv2d weight of a frozen model in `storage_dtype` (a no-op cast when the loader
    already did) and compute those layers in `compute_dtype`. Biases are kept in `compute_dtype`. `upcast`
    is one of `UPCASTS` ("cast": plain `.to` everywhere, the reference the benchmark compares against).
    Call it once per model: the layers of one call share one `UpcastBuffers` (8 MiB at most on a CPU).
    Returns the number of layers converted."""
    if upcast not in UPCASTS:
        raise ValueError(f"upcast must be one of {UPCASTS}, not {upcast!r}")
    buffers = UpcastBuffers()
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
        module.fp8_upcast = upcast
        module.fp8_buffers = buffers
        forward = _linear_forward if isinstance(module, nn.Linear) else _conv_forward
        module.forward = types.MethodType(forward, module)
        converted += 1
    return converted


def store_weights_in_fp8(model: nn.Module, compute_dtype: torch.dtype, *, upcast: str = "table") -> int:
    """`store_weights` in float8_e4m3fn (``--fp8_base``)."""
    return store_weights(model, FP8_DTYPE, compute_dtype, upcast=upcast)
