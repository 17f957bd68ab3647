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

__all__ = ["QuantizedWeight", "quantize_weight", "dequantize_weight", "convert_weight", "cat_rows"]

#: dtype of `QuantizedWeight.data` per format (MXFP4 bytes are int8; uint8 is accepted on input).
DATA_DTYPES = {"mxfp4": torch.int8, "fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16}


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

    # ------------------------------------------------------------ constructors (exact: no copy of
    # values, no requantisation; only views and, for gpt-oss, a byte reinterpretation)
    @classmethod
    def fp8(cls, data: torch.Tensor, scale: torch.Tensor, name: str = "weight") -> "QuantizedWeight":
        """FP8 block-scaled weights as DeepSeek-V3/R1 ship them (`weight` + `weight_scale_inv`).

        data: float8_e4m3fn [E, N, K]; scale: float32 [E, ceil(N/128), ceil(K/128)], any positive
        value (power-of-two scales, as in later DeepSeek releases, are the same layout); the value
        of element (n, k) is data * scale[n // 128, k // 128].
        """
        if not isinstance(data, torch.Tensor) or data.dim() != 3:
            raise ValueError(f"{name}: expected a 3-D float8_e4m3fn tensor [E, N, K], got {_describe(data)}")
        qw = cls("fp8", data, scale, tuple(data.shape))
        qw.check(name)
        return qw

    @classmethod
    def mxfp4(cls, blocks: torch.Tensor, scales: torch.Tensor, name: str = "weight") -> "QuantizedWeight":
        """MXFP4 (OCP): packed E2M1, element 2j in the low nibble of byte j, and UE8M0 scales (bias
        127) per 32 consecutive elements along K.

        blocks: int8/uint8 [E, N, K/2] (this package's layout) or uint8 [E, N, K/32, 16] (gpt-oss
        `*_blocks`, the same bytes grouped per scale); scales: uint8 [E, N, K/32]. The bytes are
        reinterpreted (a view), never requantised.
        """
        if not isinstance(blocks, torch.Tensor) or blocks.dim() not in (3, 4):
            raise ValueError(f"{name}: expected packed E2M1 bytes [E, N, K/2] or [E, N, K/32, 16], "
                             f"got {_describe(blocks)}")
        if blocks.dtype not in (torch.int8, torch.uint8):
            raise TypeError(f"{name}: expected uint8/int8 packed E2M1 bytes, got {blocks.dtype}")
        if blocks.dim() == 4:
            if blocks.shape[-1] != MXFP4_BLOCK // 2:
                raise ValueError(f"{name}: expected {MXFP4_BLOCK // 2} bytes per block in the last "
                                 f"dimension of [E, N, K/32, 16], got {tuple(blocks.shape)}")
            blocks = blocks.flatten(2)
        E, N, half_k = blocks.shape
        qw = cls("mxfp4", blocks.view(torch.int8), scales, (E, N, 2 * half_k))
        qw.check(name)
        return qw

    @classmethod
    def bf16(cls, w: torch.Tensor, name: str = "weight") -> "QuantizedWeight":
        """bf16 [E, N, K] weights (kept as they are; no copy)."""
        if not isinstance(w, torch.Tensor) or w.dim() != 3:
            raise ValueError(f"{name}: expected a 3-D bfloat16 tensor [E, N, K], got {_describe(w)}")
        qw = cls("bf16", w, None, tuple(w.shape))
        qw.check(name)
        return qw

    def check(self, name: str = "weight", shape: Optional[tuple] = None) -> None:
        """Validate format, dtypes, shapes, scale shape and devices (ValueError / TypeError naming
        `name`). shape: the expected logical (E, N, K), an E of None accepting any count."""
        if self.format not in WEIGHT_FORMATS:
            raise ValueError(f"{name}: format expected one of {WEIGHT_FORMATS}, got {self.format!r}")
        d, s = self.data, self.scale
        if not isinstance(d, torch.Tensor):
            raise TypeError(f"{name}.data: expected a torch.Tensor, got {type(d).__name__}")
        if len(self.shape) != 3 or not all(isinstance(v, int) and v > 0 for v in self.shape):
            raise ValueError(f"{name}.shape: expected a logical (E, N, K) of positive ints, got {self.shape}")
        E, N, K = self.shape
        if shape is not None:
            want = tuple(self.shape[0] if v is None else v for v in shape)
            if tuple(self.shape) != want:
                raise ValueError(f"{name}: expected logical shape {_fmt_shape(shape)}, got {tuple(self.shape)}")
        if d.dtype != DATA_DTYPES[self.format]:
            raise TypeError(f"{name}.data: expected {DATA_DTYPES[self.format]} for {self.format}, got {d.dtype}")
        data_shape = {"mxfp4": (E, N, K // 2), "fp8": (E, N, K), "bf16": (E, N, K)}[self.format]
        if self.format == "mxfp4" and K % MXFP4_BLOCK != 0:
            raise ValueError(f"{name}: K={K} must be a multiple of {MXFP4_BLOCK} for mxfp4")
        if tuple(d.shape) != data_shape:
            raise ValueError(f"{name}.data: expected shape {data_shape} for {self.format} of logical "
                             f"shape {tuple(self.shape)}, got {tuple(d.shape)}")
        if self.format == "bf16":
            if s is not None:
                raise ValueError(f"{name}.scale: bf16 weights have no scale, got {_describe(s)}")
            return
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"{name}.scale: expected a torch.Tensor for {self.format}, got {type(s).__name__}")
        B = FP8_WEIGHT_BLOCK
        scale_shape, scale_dtype = {"mxfp4": ((E, N, K // MXFP4_BLOCK), torch.uint8),
                                    "fp8": ((E, -(-N // B), -(-K // B)), torch.float32)}[self.format]
        if s.dtype != scale_dtype:
            raise TypeError(f"{name}.scale: expected {scale_dtype} for {self.format}, got {s.dtype}")
        if tuple(s.shape) != scale_shape:
            raise ValueError(f"{name}.scale: expected shape {scale_shape} for {self.format} of logical "
                             f"shape {tuple(self.shape)}, got {tuple(s.shape)}")
        if s.device != d.device:
            raise ValueError(f"{name}: data on {d.device} but scale on {s.device}")

    def contiguous(self) -> "QuantizedWeight":
        return QuantizedWeight(self.format, self.data.contiguous(),
                               None if self.scale is None else self.scale.contiguous(), self.shape)

    def narrow_experts(self, start: int, length: int) -> "QuantizedWeight":
        """The slice of experts [start, start + length) (views, no copy)."""
        return QuantizedWeight(self.format, self.data.narrow(0, start, length),
                               None if self.scale is None else self.scale.narrow(0, start, length),
                               (length,) + tuple(self.shape[1:]))


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


def _fmt_shape(shape) -> str:
    return "[" + ", ".join("E" if v is None else str(v) for v in shape) + "]"


def cat_rows(parts, name: str = "weight") -> QuantizedWeight:
    """Concatenate `QuantizedWeight`s of one format along N (e.g. gate rows then up rows -> w13),
    exactly: data and scales are concatenated as they are. FP8 needs every part but the last to
    hold a multiple of 128 rows (a scale block cannot straddle two parts)."""
    parts = list(parts)
    fmt = parts[0].format
    E, _, K = parts[0].shape
    for i, p in enumerate(parts):
        if p.format != fmt or p.shape[0] != E or p.shape[2] != K:
            raise ValueError(f"{name}: part {i} is {p.format} {tuple(p.shape)}, expected {fmt} [{E}, N, {K}]")
        if fmt == "fp8" and i < len(parts) - 1 and p.shape[1] % FP8_WEIGHT_BLOCK != 0:
            raise ValueError(f"{name}: part {i} has N={p.shape[1]} rows, not a multiple of "
                             f"{FP8_WEIGHT_BLOCK}: its fp8 scale blocks cannot be concatenated exactly")
    data = torch.cat([p.data for p in parts], dim=1)
    scale = None if fmt == "bf16" else torch.cat([p.scale for p in parts], dim=1)
    return QuantizedWeight(fmt, data, scale, (E, sum(p.shape[1] for p in parts), K))


def convert_weight(qw: QuantizedWeight, fmt: str, name: str = "w") -> QuantizedWeight:
    """`qw` in format `fmt`: dequantised to float32 and requantised, in chunks of experts.

    NOTE: lossy unless `qw` is bf16 (then it equals `quantize_weight` on the same bf16 values,
    i.e. what `load_weights` does) or `fmt == qw.format` (returned as it is). FP8 -> bf16 rounds
    each value once to bf16; anything -> mxfp4 / fp8 requantises with this package's scales.
    """
    if fmt == qw.format:
        return qw
    E = qw.shape[0]
    parts = _chunks(E, qw.shape[1] * qw.shape[2])
    src = torch.bfloat16 if qw.format == "bf16" else torch.float32
    qs = [quantize_weight(qw.dequantize(slice(a, b), dtype=src), fmt, name) for a, b in parts]
    if len(qs) == 1:
        return qs[0]
    return QuantizedWeight(fmt, torch.cat([q.data for q in qs]),
                           None if qs[0].scale is None else torch.cat([q.scale for q in qs]), tuple(qw.shape))


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
