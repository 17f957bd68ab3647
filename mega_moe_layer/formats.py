"""Expert weight containers and the bf16 -> MXFP4 / FP8 / BF16 quantisers.

Layouts (DESIGN "Numerics"), for a weight of logical shape [E, N, K] (K the reduction dim):

| format | data                              | scale                                   |
|--------|-----------------------------------|-----------------------------------------|
| mxfp4  | int8 [E, N, K/2] packed E2M1      | uint8 [E, N, K/32] UE8M0 (OCP MX)       |
| fp8    | float8_e4m3fn [E, N, K]           | float32 [E, ceil(N/128), ceil(K/128)]   |
| bf16   | bfloat16 [E, N, K]                | None                                    |

The quantisers use the package's UE8M0 rule (scale = smallest power of two >= amax / Q), so every
dequantisation here is exact in float32. FP8 block scales produced here are powers of two; the
container accepts any positive float32 scales (checkpoints from elsewhere), whose dequantisation
then rounds once per element in float32.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .config import FP8_WEIGHT_BLOCK, MXFP4_BLOCK, WEIGHT_FORMATS
from .kernels import reference as ref

__all__ = ["QuantizedWeight", "quantize_weight", "dequantize_weight"]


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """Expert weights [E, N, K] in one of the formats of the table above."""

    format: str
    data: torch.Tensor
    scale: Optional[torch.Tensor]
    shape: tuple  # logical (E, N, K)

    @property
    def num_experts(self) -> int:
        return self.shape[0]

    def dequantize(self, experts: Optional[slice] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_weight(self, experts, dtype)

    def to(self, device) -> "QuantizedWeight":
        return QuantizedWeight(self.format, self.data.to(device),
                               None if self.scale is None else self.scale.to(device), self.shape)

    def narrow_experts(self, start: int, length: int) -> "QuantizedWeight":
        """The slice of experts [start, start + length) (views, no copy)."""
        return QuantizedWeight(self.format, self.data.narrow(0, start, length),
                               None if self.scale is None else self.scale.narrow(0, start, length),
                               (length,) + tuple(self.shape[1:]))


def _check_weight(w: torch.Tensor, name: str) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 3:
        raise ValueError(f"{name}: expected a 3-D [E, N, K] tensor, got "
                         f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor (bf16), got {w.dtype}")


#: Experts quantised / dequantised at a time (bounds the float32 temporaries for large layers).
_CHUNK_BYTES = 1 << 30


def _chunks(E: int, per_expert_elems: int):
    step = max(1, _CHUNK_BYTES // max(1, 4 * per_expert_elems))
    return [(i, min(E, i + step)) for i in range(0, E, step)]


def quantize_weight(w: torch.Tensor, fmt: str, name: str = "w") -> QuantizedWeight:
    """bf16 (or float) [E, N, K] -> `QuantizedWeight` in `fmt` (in chunks of experts)."""
    _check_weight(w, name)
    E, N, K = w.shape
    parts = _chunks(E, N * K)
    if len(parts) > 1 and fmt in ("mxfp4", "fp8"):
        qs = [_quantize(w[a:b], fmt, name) for a, b in parts]
        return QuantizedWeight(fmt, torch.cat([q.data for q in qs]), torch.cat([q.scale for q in qs]),
                               (E, N, K))
    return _quantize(w, fmt, name)


def _quantize(w: torch.Tensor, fmt: str, name: str) -> QuantizedWeight:
    E, N, K = w.shape
    if fmt == "bf16":
        return QuantizedWeight("bf16", w.to(torch.bfloat16).contiguous(), None, (E, N, K))
    if fmt == "mxfp4":
        if K % MXFP4_BLOCK != 0:
            raise ValueError(f"{name}: K={K} must be a multiple of {MXFP4_BLOCK} for mxfp4")
        g = w.float().reshape(E, N, K // MXFP4_BLOCK, MXFP4_BLOCK)
        e = ref.ue8m0_exponent(g.abs().amax(dim=-1), ref.FP4_MAX)
        q = g * ref.exp2_from_ue8m0(e, negate=True).unsqueeze(-1)
        data = ref.pack_fp4(ref.e2m1_encode(q.reshape(E, N, K)))
        return QuantizedWeight("mxfp4", data.contiguous(), e.to(torch.uint8).contiguous(), (E, N, K))
    if fmt == "fp8":
        B = FP8_WEIGHT_BLOCK
        nb, kb = -(-N // B), -(-K // B)
        wp = torch.zeros(E, nb * B, kb * B, dtype=torch.float32, device=w.device)
        wp[:, :N, :K] = w.float()
        blocks = wp.reshape(E, nb, B, kb, B)
        e = ref.ue8m0_exponent(blocks.abs().amax(dim=(2, 4)), ref.FP8_MAX)   # [E, nb, kb]
        q = blocks * ref.exp2_from_ue8m0(e, negate=True)[:, :, None, :, None]
        data = q.reshape(E, nb * B, kb * B)[:, :N, :K].to(torch.float8_e4m3fn).contiguous()
        return QuantizedWeight("fp8", data, ref.exp2_from_ue8m0(e).contiguous(), (E, N, K))
    raise ValueError(f"weight_format: expected one of {WEIGHT_FORMATS}, got {fmt!r}")


def dequantize_weight(qw: QuantizedWeight, experts: Optional[slice] = None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`QuantizedWeight` -> [E, N, K] in `dtype` (float32: exact for the scales this module
    produces; bfloat16 too for mxfp4 and power-of-two fp8 scales). Works in chunks of experts."""
    if experts is None:
        experts = slice(0, qw.shape[0])
    a, b, _ = experts.indices(qw.shape[0])
    parts = _chunks(b - a, qw.shape[1] * qw.shape[2])
    if len(parts) > 1:
        return torch.cat([_dequantize(qw, slice(a + i, a + j)).to(dtype) for i, j in parts])
    return _dequantize(qw, experts).to(dtype)


def _dequantize(qw: QuantizedWeight, experts: slice) -> torch.Tensor:
    data = qw.data[experts]
    scale = None if qw.scale is None else qw.scale[experts]
    if qw.format == "bf16":
        return data.float()
    if qw.format == "mxfp4":
        vals = ref.e2m1_decode(ref.unpack_fp4(data))                          # [E, N, K]
        E, N, K = vals.shape
        s = ref.exp2_from_ue8m0(scale.to(torch.int32))                       # [E, N, K/32]
        return (vals.reshape(E, N, K // MXFP4_BLOCK, MXFP4_BLOCK) * s.unsqueeze(-1)).reshape(E, N, K)
    if qw.format == "fp8":
        B = FP8_WEIGHT_BLOCK
        E, N, K = data.shape
        s = scale.repeat_interleave(B, dim=1)[:, :N].repeat_interleave(B, dim=2)[:, :, :K]
        return data.float() * s
    raise ValueError(f"unknown weight format {qw.format!r}")
