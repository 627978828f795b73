"""Weight-only int8 quantization of the linear layers (`--quantization int8`).

Each output channel gets a symmetric scale (max |w| / 127); activations stay in the model dtype.
At a few rows per step (decoding) a step is bound by reading weights, and torch's
`_weight_int8pack_mm` reads half the bytes of bf16. At many rows (prefill) that kernel is slower
than a bf16 GEMM, so those rows use the dequantized weight instead: under torch.compile with
freezing the dequantization is folded into a constant at compile time (then prepacked for
oneDNN), so prefill runs at bf16 speed, at the cost of keeping that copy in memory too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import QUANTIZATIONS

INT8_MAX_ROWS = 8
"""Steps with at most this many rows use the int8 kernel (measured crossover on AVX-512: at 8
rows int8 and bf16 take about the same time; beyond, bf16 GEMMs win)."""


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float weight -> (int8 weight [out, in], fp32 scales [out]) with w ~ q * scale."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        q, scales = quantize_int8(linear.weight.detach())
        dtype = linear.weight.dtype
        self.register_buffer("weight_int8", q)
        self.register_buffer("scales", scales.to(dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= INT8_MAX_ROWS and x.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.weight_int8, self.scales)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.dequantized(), self.bias)


def quantize_model(model: nn.Module, method: str) -> nn.Module:
    """Replace every nn.Linear of `model` (projections and LM head) in place."""
    if method not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {method!r}; choose from {QUANTIZATIONS}")
    if method == "none":
        return model
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8Linear(child))
    return model
