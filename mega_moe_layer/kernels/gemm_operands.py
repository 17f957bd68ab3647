"""Weight operands of the grouped GEMMs, prepared once at load time (`prepare_weight_operand`).

The Hopper GEMMs with FP8 / FP4 activations run an FP8 mainloop (e4m3 x e4m3 -> float32, nothing
touching the accumulator inside the K loop). Every scale of our formats is a power of two, so it
moves out of the K sum exactly: each output row of a weight gets one exponent (its largest group
scale) applied in the epilogue, and every group's values are re-expressed against it
(`reference.rebase_weight`). What the kernels read, per weight format:

| kind          | data                          | aux                                   | row_factor   |
|---------------|-------------------------------|---------------------------------------|--------------|
| "mxfp4"       | the E2M1 nibbles re-laid in fragment words (`fragment_words`), int8 [E, N, K/2] | uint8 [E, N, K/32] offset index d | f32 [E, N] |
| "fp8_rebased" | e4m3 [E, N, K] rebased values (FP8 weights; MXFP4 with `fp4_as_fp8`) | None | f32 [E, N] |
| "fp8_block"   | e4m3 [E, N, K] as given        | f32 [E, N/128, K/128] block scales    | None         |
| "raw"         | as given (bf16 mainloop, or Blackwell's `tl.dot_scaled`) | the format's scale | None |

MXFP4 stays at 4 bits per weight: the kernel expands a nibble to E4M3 with one byte permute from
an 8-byte table per group, `table[d]` (`reference.e2m1_to_e4m3_tables`, headroom 2**6; computed
in registers on the GPU, `l1_gemm._e2m1_table_f16`), d = row exponent - group exponent (clamped
to 63). The nibbles are re-laid once at load time (`fragment_words`, same byte count) so that
one int32 word holds the 8 values one thread of the Hopper MMA's register operand needs from one
32-group, arranged for a 7-instruction decode (`l1_gemm._fp4_frag_e4m3`), a thread's 4 groups of a
128-K chunk in one 16-byte vector, loaded straight in the MMA register operand's layout: one table
per word (two IMAD, or f16x2 products where `far_groups` > 0), no byte shuffles, no shared-memory
round trip. FP8 block scales that are not powers of two
(checkpoints from elsewhere) cannot be folded: "fp8_block" rescales each 128-K partial product
(slower: the accumulator is touched every K step).

`num_changed` counts the weight values whose rebased value differs from the stored one (only
values below E4M3's normal range at their row's base; normally 0 for MXFP4). The error of each
changed value is at most 2**-10 of its row's base scale (`reference.rebase_rows`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch

from . import reference as ref

__all__ = ["WeightOperand", "prepare_weight_operand", "uses_fp8_mma", "e2m1_table", "fragment_words", "FP4_IMAD_MAX_D",
           "fragment_codes", "LANE_K_ORDER"]


#: Largest offset index d at which every entry of an E2M1 -> E4M3 table (headroom 2**6) is a
#: normal number: magnitude 0.5 x 2**(6 - d) >= 2**-6.
FP4_IMAD_MAX_D = 11


#: Lay MXFP4 weights out in the "lane" K order (`reference.lane_k_order`; `WeightOperand.lane`):
#: each thread of the MMA's register operand holds one 32-group of a row per K step, so it builds
#: one E2M1 -> E4M3 table per row instead of one per 8 weights (sm_90a SASS, Triton 3.6: the K-step
#: loop 156 -> 141 instructions in the Gluon L1 at 16 rows, 239 -> 222 at 128 + 16, 272 -> 242 per
#: 256 K in the Triton L1 at 16 rows; docs/PERF.md, thirteenth session). x and h are then written
#: in that order where they are rebased. Off: correct on an H100 but mixed there (thirteenth session:
#: the layer -2.3% / -1.3% at T = 4096 / 128, +11% at 512, whose 32-row tiles it slows; `bench.py --lane-k`).
LANE_K_ORDER = False


def uses_fp8_mma(arch: int, weight_format: str, act_format: str) -> bool:
    """Whether the grouped GEMMs take the FP8 mainloop: FP8 / MXFP4 weights with FP8 / FP4
    activations on sm_90+ (Blackwell's MXFP4 combinations take `tl.dot_scaled` instead; BF16
    weights or activations keep a bf16 mainloop)."""
    from .gemm_heuristics import uses_dot_scaled
    return (arch >= 90 and weight_format in ("mxfp4", "fp8") and act_format in ("fp8", "fp4")
            and not uses_dot_scaled(arch, weight_format, act_format))


@functools.lru_cache(maxsize=None)
def _table_cpu() -> torch.Tensor:
    return ref.e2m1_to_e4m3_tables(ref.REBASE_HEADROOM["mxfp4"])


_TABLES = {}


def e2m1_table(device) -> torch.Tensor:
    """int64 [64] E2M1 -> E4M3 byte tables on `device` (one per device, shared)."""
    device = torch.device(device)
    key = str(device)
    if key not in _TABLES:
        _TABLES[key] = _table_cpu().to(device)
    return _TABLES[key]


@functools.lru_cache(maxsize=None)
def _inexact_lut() -> torch.Tensor:
    """bool [64 * 8]: whether magnitude m at offset d is not exact in its table entry."""
    tab = _table_cpu()
    d = torch.arange(64, dtype=torch.float64)
    exact = ref._E2M1_VALUES.double()[None, :] * torch.exp2(6 - d)[:, None]
    got = torch.stack([((tab >> (8 * m)) & 0xFF) for m in range(8)], dim=1).to(torch.uint8)
    got = got.view(torch.float8_e4m3fn).double()
    return (got != exact).reshape(-1)


# Fragment words: word (n, 16 j + 4 c + g) of a row (j: 128-K chunk, g: 32-group in it) holds the
# E2M1 codes of k = 128 j + 32 g + {4c .. 4c+3} ("lo", output bytes 0..3 of the decode) and
# 128 j + 32 g + 16 + {4c .. 4c+3} ("hi"): the 8 values of one 32-group that thread c of a quad holds
# in the m64nNk32 e4m3 wgmma's register operand, a thread's 4 groups of a chunk in one 16-byte
# vector (`l1_gemm._fp4_frag_e4m3` loads them in the operand's layout). Nibble p's low 3 bits
# are the magnitude of lo[p] (p < 4) / hi[p - 4]; its bit 3 a sign: nibbles 1, 3, 5, 7 carry lo 0..3's
# (bits 7, 15, 23, 31: the E4M3 sign bits of the lo word as they stand), nibbles 0, 2, 4, 6 hi 0..3's.
_FRAG_MAG_K = (0, 1, 2, 3, 16, 17, 18, 19)           # nibble p's magnitude: k offset (plus 4c)
_FRAG_SIGN_K = (16, 0, 17, 1, 18, 2, 19, 3)           # nibble p's sign bit: k offset (plus 4c)


def _frag_index(k: int, device):
    """(mag_k, sign_k): int64 [K/8, 8] source k of each fragment word's nibble magnitude / sign."""
    q = torch.arange(k // 8, device=device)
    base = (q // 16) * 128 + (q % 4) * 32 + ((q // 4) % 4) * 4
    mag = base[:, None] + torch.tensor(_FRAG_MAG_K, device=device)[None, :]
    sign = base[:, None] + torch.tensor(_FRAG_SIGN_K, device=device)[None, :]
    return mag, sign


def fragment_words(packed: torch.Tensor, lane: bool = False) -> torch.Tensor:
    """Packed MXFP4 bytes [..., N, K/2] (low nibble = even k) -> the same codes re-laid as fragment
    words (module comment above), returned as int8 [..., N, K/2] (the little-endian bytes of the
    int32 words). K must be a multiple of 128. lane=True: the words of the "lane" K order
    (`LANE_K_ORDER`): k above is a position of `reference.lane_k_order`, which holds that column's
    code; word 4 c + g of a chunk then holds columns 32 c + 8 g + 0..7, all of group c."""
    k = packed.shape[-1] * 2
    if k % 128:
        raise ValueError(f"packed: expected K (2 x last dim) a multiple of 128, got {k}")
    codes = ref.unpack_fp4(packed.view(torch.uint8)).to(torch.int32)            # [..., N, K]
    if lane:
        codes = codes[..., ref.lane_k_order(k, codes.device)]
    mag_k, sign_k = _frag_index(k, packed.device)
    mag = codes[..., mag_k] & 7                                                  # [..., N, K/8, 8]
    sign = (codes[..., sign_k] >> 3) & 1
    nib = mag | (sign << 3)
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    words = (nib.to(torch.int64) << shifts.to(torch.int64)).sum(dim=-1)           # [..., N, K/8]
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    return words.contiguous().view(torch.int8)


def fragment_codes(words: torch.Tensor, lane: bool = False) -> torch.Tensor:
    """Inverse of `fragment_words` (with the same `lane`): int8 [..., N, K/2] -> the E2M1 codes
    uint8 [..., N, K] in column order."""
    w = words.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF       # [..., N, K/8]
    k = w.shape[-1] * 8
    nib = (w[..., None] >> torch.arange(0, 32, 4, device=w.device)) & 15         # [..., N, K/8, 8]
    mag_k, sign_k = _frag_index(k, w.device)
    out = torch.zeros(*w.shape[:-1], k, dtype=torch.int64, device=w.device)
    flat = out.reshape(-1, k)
    flat[:, mag_k.reshape(-1)] |= (nib & 7).reshape(flat.shape[0], -1)
    flat[:, sign_k.reshape(-1)] |= ((nib >> 3) << 3).reshape(flat.shape[0], -1)
    out = flat.reshape(out.shape)
    if lane:
        out = out[..., torch.argsort(ref.lane_k_order(k, out.device))]
    return out.to(torch.uint8)


@dataclasses.dataclass(frozen=True)
class WeightOperand:
    """What a grouped GEMM reads for one weight [E, N, K] (see the module table)."""

    kind: str
    format: str
    data: torch.Tensor
    aux: Optional[torch.Tensor]
    row_factor: Optional[torch.Tensor]
    table: Optional[torch.Tensor]
    num_changed: int
    shape: tuple
    #: "mxfp4": 32-groups more than FP4_IMAD_MAX_D below their row's largest scale holding a
    #: nonzero value. Their E4M3 tables have subnormal entries: the kernels then compute every
    #: table with f16x2 products (exact at every offset) instead of two IMAD (`l1_gemm.fp4_table`).
    far_groups: int = 0
    #: "mxfp4": the words are in the "lane" K order (`LANE_K_ORDER`); the GEMMs then read x and h
    #: rows stored in that order (`reference.to_lane_order`) and index each word's table by its
    #: thread of the quad instead of its MMA.
    lane: bool = False

    @property
    def is_fp8_mma(self) -> bool:
        return self.kind in ("mxfp4", "fp8_rebased", "fp8_block")


def _is_pow2(scale: torch.Tensor) -> bool:
    m, _ = torch.frexp(scale.float())
    return bool(((m == 0.5) & (scale > 0)).all())


def prepare_weight_operand(fmt: str, data: torch.Tensor, scale: Optional[torch.Tensor], *, arch: int,
                           act_format: str, name: str = "w", fp8_mainloop: bool = True,
                           fp4_as_fp8: bool = False, lane_k: Optional[bool] = None) -> WeightOperand:
    """The operand the GEMMs read for weight `(fmt, data, scale)` (`formats.QuantizedWeight`
    layout, [E, N, K]) on `arch` with `act_format` activations. Works expert by expert on the
    weight's device (bounded temporaries); MXFP4 ("mxfp4") gets a re-laid copy of its bytes.
    fp8_mainloop=False gives the "raw" operand (the bf16 mainloop) even where the FP8 mainloop
    applies. fp4_as_fp8=True (FP8 mainloop, MXFP4): the weight expanded once to its rebased E4M3
    bytes ("fp8_rebased", `reference.rebase_weight`: exact for groups within 2**8 of their row's
    largest scale): twice the bytes of the packed weight, which the GEMMs then stream into the FP8
    MMA with nothing to decode (docs/PERF.md: as fast as 4 bits at decode, faster at prefill).
    lane_k (default `LANE_K_ORDER`): the "mxfp4" operand's words in the "lane" K order
    (`WeightOperand.lane`); other kinds ignore it."""
    if lane_k is None:
        lane_k = LANE_K_ORDER
    if not isinstance(lane_k, bool):
        raise TypeError(f"lane_k: expected a bool or None, got {type(lane_k).__name__}")
    if fmt == "mxfp4":
        E, N, K2 = data.shape
        shape = (E, N, 2 * K2)
    else:
        shape = tuple(data.shape)
    if not fp8_mainloop or not uses_fp8_mma(arch, fmt, act_format):
        return WeightOperand("raw", fmt, data, scale, None, None, 0, shape)
    if fmt == "mxfp4" and fp4_as_fp8:
        out = torch.empty(shape, dtype=torch.float8_e4m3fn, device=data.device)
        row = torch.empty(shape[0], shape[1], dtype=torch.float32, device=data.device)
        changed = 0
        for i in range(shape[0]):
            r, f = ref.rebase_weight("mxfp4", data[i:i + 1], scale[i:i + 1])
            out[i].copy_(r[0])
            row[i].copy_(f[0])
            exact = ref.e2m1_decode(ref.unpack_fp4(data[i])) * ref.exp2_from_ue8m0(
                scale[i].to(torch.int32)).repeat_interleave(32, dim=1)
            changed += int((r[0].float() * f[0][:, None] != exact).sum())
        return WeightOperand("fp8_rebased", fmt, out, None, row, None, changed, shape)
    if fmt == "mxfp4":
        e = scale.to(torch.int32)
        e_row = e.amax(dim=2)                                              # [E, N]
        didx = (e_row[:, :, None] - e).clamp(0, 63).to(torch.uint8).contiguous()
        lut = _inexact_lut().to(data.device)
        changed = far = 0
        for i in range(E):
            mag = ref.unpack_fp4(data[i]) & 7                              # [N, K]
            d = didx[i].to(torch.int64).repeat_interleave(32, dim=1)
            changed += int(lut[d * 8 + mag].sum())
            nonzero = (mag != 0).view(N, -1, 32).any(dim=2)                # [N, K/32]
            far += int((nonzero & (didx[i] > FP4_IMAD_MAX_D)).sum())
        row = ref.exp2_from_ue8m0(e_row - ref.REBASE_HEADROOM["mxfp4"]).contiguous()
        words = torch.empty_like(data, dtype=torch.int8)
        for i in range(E):
            words[i].copy_(fragment_words(data[i], lane_k))
        return WeightOperand("mxfp4", fmt, words, didx, row, e2m1_table(data.device), changed, shape, far,
                             lane_k)
    if fmt == "fp8":
        if not _is_pow2(scale):
            return WeightOperand("fp8_block", fmt, data, scale.float().contiguous(), None, None, 0, shape)
        out = torch.empty_like(data)
        row = torch.empty(shape[0], shape[1], dtype=torch.float32, device=data.device)
        changed = 0
        B = 128
        for i in range(shape[0]):
            r, f = ref.rebase_weight("fp8", data[i:i + 1], scale[i:i + 1])
            out[i].copy_(r[0])
            row[i].copy_(f[0])
            s = scale[i].float().repeat_interleave(B, 0)[:shape[1]].repeat_interleave(B, 1)[:, :shape[2]]
            changed += int((r[0].float() * f[0][:, None] != data[i].float() * s).sum())
        return WeightOperand("fp8_rebased", fmt, out, None, row, None, changed, shape)
    raise ValueError(f"{name}: no FP8-mainloop operand for weight format {fmt!r}")
