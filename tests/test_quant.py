"""Weight-only int8 (`--quantization int8`) and the `--dtype auto` choice."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import engine.device as device
from engine.quant import INT8_MAX_ROWS, Int8Linear, quantize_int8, quantize_model


def test_per_channel_int8_is_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g) * torch.logspace(-3, 1, 48)[:, None]   # scales differ per row
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (48,)
    assert q.abs().amax(dim=1).eq(127).all()                # every channel uses its full range
    err = (q.float() * scales[:, None] - w).abs()
    assert (err <= scales[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [1, INT8_MAX_ROWS, INT8_MAX_ROWS + 1, 64])
def test_int8_linear_matches_its_dequantized_weight(dtype, rows):
    """Both paths (int8 kernel at few rows, dequantized GEMM at many) compute x @ (q * s)^T."""
    g = torch.Generator().manual_seed(1)
    linear = nn.Linear(64, 96, bias=True).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(96, 64, generator=g))
        linear.bias.copy_(torch.randn(96, generator=g))
    q8 = Int8Linear(linear)
    x = torch.randn(rows, 64, generator=g).to(dtype)
    ref = x.float() @ (q8.weight_int8.float() * q8.scales.float()[:, None]).T + linear.bias.float()
    tol = 1e-4 if dtype == torch.float32 else 0.1 * ref.abs().max().item() / 8
    assert (q8(x).float() - ref).abs().max().item() < tol


def test_quantize_model_replaces_every_linear_including_the_lm_head():
    model = nn.Sequential(nn.Linear(8, 8), nn.ModuleDict({"proj": nn.Linear(8, 8)}), nn.Linear(8, 32))
    quantize_model(model, "int8")
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 3
    with pytest.raises(ValueError, match="'int4'"):
        quantize_model(model, "int4")


@pytest.mark.parametrize("flags, expected", [
    ({"avx512f", "avx512_bf16"}, torch.bfloat16),
    ({"avx512f", "amx_bf16", "amx_tile"}, torch.bfloat16),
    ({"avx2", "avx512f"}, torch.float32),      # bf16 would be emulated: fp32 is faster
    (set(), torch.float32),
])
def test_dtype_auto_follows_the_cpu(monkeypatch, flags, expected):
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset(flags))
    assert device.resolve_dtype("auto", torch.device("cpu")) == expected
    assert device.resolve_dtype("float32", torch.device("cpu")) == torch.float32
