"""Weight-only int8 quantization of the linear layers (`--quantization int8`).

Each output channel gets a symmetric scale (max |w| / 127); activations stay in the model dtype.
At a few rows per step (decoding) a step is bound by reading weights, and torch's
`_weight_int8pack_mm` reads half the bytes of bf16. At many rows (prefill, large decode batches)
that kernel is slower than a bf16 GEMM, so those rows use the dequantized weight, computed once at
load and kept beside the int8 one (1.5x the weight memory of bf16). It has to be a stored tensor:
inductor deliberately does not constant-fold an int8 -> float conversion (it keeps weight-only
quantization patterns for its own int8 kernels), so dequantizing in the forward cost every
compiled step a full dequantization (measured: batch-32 decode 106 vs 62 ms for bf16).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import QUANTIZATIONS

INT8_MAX_ROWS = 2
"""Steps with at most this many rows use the int8 kernel, whose cost grows with rows while a bf16
GEMM's barely does. Measured on AVX-512, SmolLM2's four linear shapes (LM head included), eager,
bf16 vs int8 ms: 1 row 3.5 vs 1.8, 2 rows 3.5 vs 2.5, 4 rows 3.9 vs 2.9, 8 rows 4.4 vs 6.0; but
against the compiled forward's prepacked bf16 GEMMs int8 already loses at 4 rows (decode step 20.5
vs 18.0 ms) and wins at 1-2 (15.9 vs 18.4 ms)."""


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
        self.register_buffer("weight_dequantized", self.dequantized())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= INT8_MAX_ROWS and x.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.weight_int8, self.scales)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight_dequantized, self.bias)


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
