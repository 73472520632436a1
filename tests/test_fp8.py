"""fp8 base weights: stored as float8_e4m3fn, computed in the compute dtype, up-cast never kept for backward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from library.model import fp8
from library.model.fp8 import FP8_DTYPE, UpcastBuffers, store_weights_in_fp8, upcast, upcast_rows, uses_table


def _dequantized(weight: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return weight.to(FP8_DTYPE).to(dtype)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_linear_and_conv_store_fp8_and_match_dequantized_math(compute_dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    conv = nn.Conv2d(4, 6, 3, padding=1)
    reference = copy.deepcopy(model), copy.deepcopy(conv)
    assert store_weights_in_fp8(model, compute_dtype) == 2
    assert store_weights_in_fp8(conv, compute_dtype) == 1
    assert model[0].weight.dtype == FP8_DTYPE and model[2].weight.dtype == FP8_DTYPE
    assert conv.weight.dtype == FP8_DTYPE and conv.bias.dtype == compute_dtype

    x = torch.randn(5, 16, requires_grad=True)
    y = model(x)
    assert y.dtype == compute_dtype
    ref_model = reference[0]
    x_ref = x.detach().clone().requires_grad_(True)
    h = F.linear(
        x_ref.to(compute_dtype), _dequantized(ref_model[0].weight, compute_dtype), ref_model[0].bias.to(compute_dtype)
    )
    y_ref = F.linear(F.gelu(h), _dequantized(ref_model[2].weight, compute_dtype), ref_model[2].bias.to(compute_dtype))
    assert torch.allclose(y.float(), y_ref.float(), atol=1e-6 if compute_dtype == torch.float32 else 2e-2)
    y.float().sum().backward()
    y_ref.float().sum().backward()
    assert x.grad.dtype == torch.float32
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5 if compute_dtype == torch.float32 else 5e-2)

    image = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = conv(image)
    image_ref = image.detach().clone().requires_grad_(True)
    out_ref = F.conv2d(
        image_ref.to(compute_dtype),
        _dequantized(reference[1].weight, compute_dtype),
        reference[1].bias.to(compute_dtype),
        padding=1,
    )
    assert torch.allclose(out.float(), out_ref.float(), atol=1e-5 if compute_dtype == torch.float32 else 5e-2)
    out.float().square().sum().backward()
    out_ref.float().square().sum().backward()
    assert torch.allclose(image.grad, image_ref.grad, rtol=1e-4, atol=1e-4 if compute_dtype == torch.float32 else 0.5)


def test_fp8_output_stays_close_to_full_precision():
    torch.manual_seed(0)
    layer = nn.Linear(256, 256)
    x = torch.randn(64, 256)
    full = layer(x)
    store_weights_in_fp8(layer, torch.float32)
    relative = (layer(x) - full).norm() / full.norm()
    assert 0 < relative < 0.05  # e4m3 keeps 3 mantissa bits: a few percent, not more


def test_upcast_weight_is_not_saved_for_backward():
    """Only fp8 tensors (and nothing of the weight's size in the compute dtype) are kept for backward."""
    torch.manual_seed(0)
    layer = nn.Linear(128, 128, bias=False)
    conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    store_weights_in_fp8(layer, torch.float32)
    store_weights_in_fp8(conv, torch.float32)
    saved: list[torch.Tensor] = []
    x = torch.randn(4, 128, requires_grad=True)
    image = torch.randn(1, 8, 16, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
        z = conv(image)
    assert saved, "the function keeps at least the fp8 weight"
    assert all(t.dtype == FP8_DTYPE for t in saved), [(t.dtype, tuple(t.shape)) for t in saved]
    (y.sum() + z.sum()).backward()
    assert x.grad is not None and image.grad is not None
    assert layer.weight.grad is None and conv.weight.grad is None


@pytest.mark.slow
def test_fp8_unet_trains_lora_in_fp32(tiny_models):
    from networks.lora import create_network

    unet = copy.deepcopy(tiny_models.unet)
    converted = store_weights_in_fp8(unet, torch.float32)
    linears = sum(1 for m in unet.modules() if type(m) in (nn.Linear, nn.Conv2d))
    assert converted == linears
    norms = [m for m in unet.modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)
    network = create_network(1.0, 4, 1.0, None, [], unet)
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    assert all(p.dtype == torch.float32 for p in network.parameters())
    g = torch.Generator().manual_seed(0)
    added = {"text_embeds": torch.randn(1, 64, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    sample = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    loss = unet(sample, torch.tensor([500]), context, added_cond_kwargs=added).sample.square().mean()
    loss.backward()
    grads = [m.lora_up.weight.grad for m in network.unet_loras]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


# --- The CPU up-cast by table, chunk by chunk -----------------------------------------------------------------------
_BITS = {4: torch.int32, 2: torch.int16}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(_BITS[tensor.element_size()])


@pytest.mark.parametrize("storage", [FP8_DTYPE, torch.float8_e5m2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_table_upcast_is_bit_exact_for_every_code(storage, dtype):
    """Every one of the 256 codes (NaNs, infinities, subnormals, both zeros) in both places of a byte pair, and an
    odd-sized tensor (up-cast a byte at a time), give the same bits as `.to`."""
    codes = torch.arange(256, dtype=torch.uint8)
    pairs = torch.stack(torch.meshgrid(codes, codes, indexing="ij"), -1).reshape(-1).view(storage)
    assert uses_table(pairs, dtype)
    expected = pairs.to(dtype)
    assert int(torch.isnan(expected).sum()) > 0  # NaN codes are in the comparison
    assert torch.equal(_bits(upcast(pairs, dtype)), _bits(expected))
    assert torch.equal(_bits(upcast(pairs[:255], dtype)), _bits(expected[:255]))
    matrix = pairs[: 256 * 17].view(256, 17)  # rows of odd length, as a layer's chunks may be
    chunks = [rows.clone() for _, _, rows in upcast_rows(matrix, dtype, UpcastBuffers())]
    assert torch.equal(_bits(torch.cat(chunks)), _bits(matrix.to(dtype)))


def test_the_table_is_for_cpu_fp8_only():
    weight = torch.zeros(4, 4, dtype=FP8_DTYPE)
    assert uses_table(weight, torch.float32)
    assert not uses_table(weight.to(torch.float16), torch.float32)  # fp16 storage: .to is fast already
    assert not uses_table(torch.zeros(4, 4, dtype=FP8_DTYPE, device="meta"), torch.float32)  # not a CPU: `.to`


def _pair(module: nn.Module, compute_dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    """The module stored in fp8 twice: up-cast by table (chunked) and by `.to` (the reference)."""
    table, cast = copy.deepcopy(module), copy.deepcopy(module)
    store_weights_in_fp8(table, compute_dtype)
    store_weights_in_fp8(cast, compute_dtype, upcast="cast")
    return table, cast


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_chunked_layers_match_the_cast_path(monkeypatch, compute_dtype):
    """Linear (2-D and 3-D input) and Conv2d computed a few rows at a time (here 3-4 chunks, the last one short)
    give the output and input gradient of the plain up-cast, and leave nothing fp32 of the weight's size for
    backward."""
    for name in ("CHUNK_ELEMENTS", "ONE_THREAD_CHUNK_ELEMENTS", "CONV_CHUNK_ELEMENTS"):
        monkeypatch.setattr(fp8, name, 1000)
    monkeypatch.setattr(fp8, "UPCAST_PIECE", 300)  # several lookups per chunk (with more than one thread)
    monkeypatch.setattr(fp8, "MIN_CHUNKED_ELEMENTS", 0)
    torch.manual_seed(0)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if compute_dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for module, shape in (
        (nn.Linear(96, 40), (3, 96)),
        (nn.Linear(96, 40, bias=False), (2, 5, 96)),
        (nn.Conv2d(16, 20, 3, padding=1), (2, 16, 6, 6)),
        (nn.Conv2d(16, 20, 3, stride=2, bias=False), (1, 16, 9, 9)),
    ):
        table, cast = _pair(module, compute_dtype)
        x = torch.randn(shape, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_(True)
        out, out_ref = table(x), cast(x_ref)
        assert out.shape == out_ref.shape and out.is_contiguous() and out.dtype == compute_dtype
        assert torch.allclose(out.float(), out_ref.float(), **tolerance), (module, (out - out_ref).abs().max())
        grad = torch.randn(out.shape)
        out.backward(grad.to(out.dtype))
        out_ref.backward(grad.to(out.dtype))
        assert torch.allclose(x.grad, x_ref.grad, **tolerance), (module, (x.grad - x_ref.grad).abs().max())
