"""Half-precision weight storage for float32 inference on CPU.

Decoding one token reads every weight once, so on CPU it is bound by memory bandwidth:
fp16 weights halve the bytes. Measured on a 2-core AVX2 machine without native fp16 or
bf16 arithmetic (see perf/notes_cpu_smollm2.md): torch's fp16 matrix-vector kernel
(fp16 weights converted on the fly, fp32 accumulation) is ~1.6x faster than fp32 at one
row, equal at four, while its fp16 matrix-matrix path is ~10x slower than fp32 at 64 rows,
and bf16 matrix-vector is ~80x slower than fp32. So activations and the KV cache stay
float32; products with few rows use the fp16 weights directly, larger ones (prefill) first
upcast the weight into a float32 scratch buffer shared by all layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Up to this many rows (tokens x batch) the fp16 matrix-vector path wins.
DIRECT_ROWS = 2


class HalfWeightLinear(nn.Module):
    """``nn.Linear`` with an fp16 weight and float32 arithmetic.

    Takes float32 or fp16 inputs. Returns float32, except for products of few rows (the
    fp16 kernel) without a bias, which return the kernel's fp16 output: callers promote it
    (``x + out``) or convert it (``.float()``, ``.to(dtype)``) where they need float32.
    """

    def __init__(self, linear: nn.Linear, scratch: list[torch.Tensor | None]) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().half(), requires_grad=False)
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), False)
        # One float32 buffer for the whole model, grown to the largest weight upcast.
        self._scratch = scratch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows <= DIRECT_ROWS:
            # The fp16 kernel's output stays fp16 (it is rounded to fp16 anyway): the next
            # op promotes it (a residual add, a bias) or takes it as is (the MLP's product
            # feeding down_proj), which saves a cast on either side of most products.
            x16 = x if x.dtype == torch.float16 else x.to(torch.float16)
            out = F.linear(x16, self.weight)
            return out if self.bias is None else out + self.bias
        if x.dtype != torch.float32:
            x = x.float()
        return F.linear(x, self._upcast(), self.bias)

    def _upcast(self) -> torch.Tensor:
        buf = self._scratch[0]
        if buf is None or buf.numel() < self.weight.numel():
            buf = torch.empty(self.weight.numel(), dtype=torch.float32)
            self._scratch[0] = buf
        return buf[: self.weight.numel()].view(self.weight.shape).copy_(self.weight)


def use_half_weights(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` of a float32 CPU model by a :class:`HalfWeightLinear`.

    A tied ``lm_head`` gets its own fp16 copy: the float32 embedding is only gathered from
    (one row per token), while the head is read whole every step.
    """
    scratch: list[torch.Tensor | None] = [None]
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, HalfWeightLinear(child, scratch))
    return model
