"""Plain-PyTorch reference of every kernel and of the whole expert computation.

These functions define the numerics of `DESIGN.md`; GPU kernels are tested against them (bitwise
where no GEMM is involved). Where the reference rounds, the docstring says so.

UE8M0 scale rule for a group of g values with quantum Q (448 for FP8 E4M3, 6 for FP4 E2M1)::

    amax = max(max|x|, 1e-4)            (float32)
    s    = amax / Q                     (float32 division, RNE)
    e    = exponent_field(s) + (mantissa(s) != 0), clamped to [1, 254]
    q    = x_f32 * 2**(127 - e)         (exact: a power-of-two multiply)
    FP8: q -> float8_e4m3fn, RNE.  FP4: q -> E2M1 by RNE (see `_e2m1_encode`).

Scale bytes of 4 consecutive groups pack little-endian into one int32: `[T, H/g/4]` (a last,
partial word padded with zero bytes: the FP8 combine's per-128 scales of an H that is not a
multiple of 512).
Inputs must be finite.

Where the GPU path may differ from these functions, and by how much (tests/utils.py TOLERANCES):
  * quantisation, pre-dispatch, dispatch / combine data movement, the combine reduce: bitwise.
  * the grouped GEMMs on the bf16 mainloop (BF16 weights or acts, `hopper_fp8_mainloop=False`,
    Blackwell's block-scaled MMA): float32 accumulation order only; rel-RMSE <= 5e-3 against
    `expert_forward` (which accumulates in float64), "gemm_rel_rmse".
  * the Hopper FP8 mainloop (`MegaMoEConfig.hopper_fp8_mainloop`, by default on for FP8 and
    MXFP4 weights): x and h are rebased where they land (`kernels/rebase.py`, bitwise
    `rebase_act`), the weights at load time (bitwise `rebase_weight`; MXFP4 kept at 4 bits is
    decoded in the K loop to those same bytes, bitwise, with the tables of
    `e2m1_to_e4m3_tables`); the rebased values differ from the exact dequantised ones only below E4M3's
    normal range at their row's base, by at most 2**-10 of that base ("rebase_rel" bounds it per
    row, with groups forced 13-40 binades below their row's maximum). Hopper's FP8 MMA then
    accumulates with ~14 mantissa bits (truncating) between promotions to float32 (L1 after every
    128-K step, L2 over all of K): h and y move by ~1e-4-1e-3, and through the requantisation
    of h and the FP8 combine the layer's output by rel-RMSE up to 1.2e-2 measured on an H200
    ("gemm_fp8_mainloop_rel_rmse", 2e-2); FP4 acts x MXFP4 weights stay bitwise. Against the
    float64 MoE the error is that of the bf16 mainloop. With MXFP4 words in the "lane" K order
    (`gemm_operands.LANE_K_ORDER`, off by default; `lane_k_order`) x and h are stored permuted
    within each 128-K chunk and the MMAs sum the same products in another order: the same
    tolerances (FP4 x MXFP4 still bitwise: its sums are exact).
"""
from __future__ import annotations

from typing import Optional

import torch

FP8_MAX = 448.0
FP4_MAX = 6.0
AMAX_FLOOR = 1e-4

__all__ = [
    "ue8m0_exponent", "exp2_from_ue8m0", "pack_ue8m0", "unpack_ue8m0",
    "per_token_cast_to_fp8", "per_token_cast_back_from_fp8",
    "per_token_cast_to_fp4", "per_token_cast_back_from_fp4",
    "e2m1_encode", "e2m1_decode", "pack_fp4", "unpack_fp4",
    "quantize_act", "dequantize_act", "expert_forward", "combine_reduce", "moe_reference",
    "e2m1_to_e4m3_tables", "rebase_rows", "rebase_act", "rebase_weight", "dequantize_rebased",
    "REBASE_HEADROOM", "lane_k_order", "to_lane_order",
]


# ---------------------------------------------------------------------------------------------
# UE8M0 scales
# ---------------------------------------------------------------------------------------------
def ue8m0_exponent(amax: torch.Tensor, quantum: float) -> torch.Tensor:
    """Biased exponent e (int32, in [1, 254]) of the power-of-two scale >= amax / quantum.

    amax: float32 tensor of group maxima (already floored at 1e-4 or not: the floor is applied here).
    """
    amax = torch.clamp_min(amax.float(), AMAX_FLOOR)
    s = amax / torch.tensor(quantum, dtype=torch.float32)
    bits = s.view(torch.int32)
    exp_field = (bits >> 23) & 0xFF
    e = exp_field + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return torch.clamp(e, 1, 254).to(torch.int32)


def exp2_from_ue8m0(e: torch.Tensor, negate: bool = False) -> torch.Tensor:
    """Exact float32 2**(e - 127) (or 2**(127 - e) with negate=True), built from the bit pattern."""
    e = e.to(torch.int32)
    p = (127 - e) if negate else (e - 127)  # the power of two wanted
    # Normal range: bits = (p + 127) << 23; subnormal (p < -126): bits = 1 << (p + 149).
    normal = ((p + 127).clamp(1, 254) << 23)
    sub = torch.ones_like(p) << (p + 149).clamp(0, 22)
    bits = torch.where(p >= -126, normal, sub)
    return bits.view(torch.float32)


def pack_ue8m0(e: torch.Tensor) -> torch.Tensor:
    """[..., G] exponents (values 0..255) -> [..., ceil(G/4)] int32, byte j of word i = group 4i+j
    (a last, partial word is padded with zero bytes)."""
    G = e.shape[-1]
    if G % 4:
        e = torch.cat([e, torch.zeros(*e.shape[:-1], 4 - G % 4, dtype=e.dtype, device=e.device)], dim=-1)
    b = e.to(torch.int64).reshape(*e.shape[:-1], e.shape[-1] // 4, 4)
    w = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    w = torch.where(w >= 2**31, w - 2**32, w)
    return w.to(torch.int32)


def unpack_ue8m0(packed: torch.Tensor) -> torch.Tensor:
    """[..., G/4] int32 -> [..., G] int32 exponents (inverse of `pack_ue8m0`)."""
    w = packed.to(torch.int64) & 0xFFFFFFFF
    parts = [(w >> (8 * j)) & 0xFF for j in range(4)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 4).to(torch.int32)


def _group_scale(x: torch.Tensor, gran_k: int, quantum: float):
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D [T, H] tensor, got shape {tuple(x.shape)}")
    T, H = x.shape
    if gran_k <= 0 or H % (4 * gran_k) != 0:
        raise ValueError(f"gran_k: H={H} must be a multiple of 4 * gran_k = {4 * gran_k}")
    xf = x.float().reshape(T, H // gran_k, gran_k)
    e = ue8m0_exponent(xf.abs().amax(dim=-1), quantum)          # [T, G]
    q = xf * exp2_from_ue8m0(e, negate=True).unsqueeze(-1)       # exact
    return q.reshape(T, H), e


# ---------------------------------------------------------------------------------------------
# FP8
# ---------------------------------------------------------------------------------------------
def per_token_cast_to_fp8(x: torch.Tensor, gran_k: int = 32):
    """x [T, H] (bf16/f32) -> (float8_e4m3fn [T, H], int32 [T, H/gran_k/4] packed UE8M0).

    Rounds once: float32 -> e4m3 by round-to-nearest-even (|q| <= 448 by construction).
    """
    q, e = _group_scale(x, gran_k, FP8_MAX)
    return q.to(torch.float8_e4m3fn), pack_ue8m0(e)


def per_token_cast_back_from_fp8(q: torch.Tensor, sf: torch.Tensor, gran_k: int = 32) -> torch.Tensor:
    """Exact inverse: float8 [T, H] + packed scales -> float32 [T, H]."""
    T, H = q.shape
    e = unpack_ue8m0(sf)[..., :H // gran_k]
    s = exp2_from_ue8m0(e)
    return (q.float().reshape(T, H // gran_k, gran_k) * s.unsqueeze(-1)).reshape(T, H)


# ---------------------------------------------------------------------------------------------
# FP4 (E2M1)
# ---------------------------------------------------------------------------------------------
_E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float32)


def e2m1_encode(q: torch.Tensor) -> torch.Tensor:
    """float32 values with |q| <= 6 -> int32 4-bit codes, round-to-nearest-even.

    Ties go to the even code: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4.
    The sign (bit 3) is set only when the magnitude code is non-zero.
    """
    a = q.abs()
    code = ((a > 0.25).to(torch.int32) + (a >= 0.75).to(torch.int32) + (a > 1.25).to(torch.int32)
            + (a >= 1.75).to(torch.int32) + (a > 2.5).to(torch.int32) + (a >= 3.5).to(torch.int32)
            + (a > 5.0).to(torch.int32))
    sign = ((q < 0) & (code != 0)).to(torch.int32) << 3
    return code | sign


def e2m1_decode(code: torch.Tensor) -> torch.Tensor:
    """int codes 0..15 -> float32 values."""
    code = code.to(torch.int64)
    mag = _E2M1_VALUES.to(code.device)[code & 7]
    return torch.where((code & 8) != 0, -mag, mag)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """[..., N] codes -> [..., N/2] int8, even column in the low nibble."""
    c = codes.to(torch.int32)
    b = (c[..., 0::2] & 0xF) | ((c[..., 1::2] & 0xF) << 4)
    return b.to(torch.uint8).view(torch.int8)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """[..., N/2] int8/uint8 -> [..., N] int32 codes."""
    b = packed.view(torch.uint8).to(torch.int32)
    return torch.stack([b & 0xF, b >> 4], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def per_token_cast_to_fp4(x: torch.Tensor, gran_k: int = 32):
    """x [T, H] -> (int8 [T, H/2] packed E2M1, int32 [T, H/gran_k/4] packed UE8M0)."""
    q, e = _group_scale(x, gran_k, FP4_MAX)
    return pack_fp4(e2m1_encode(q)), pack_ue8m0(e)


def per_token_cast_back_from_fp4(packed: torch.Tensor, sf: torch.Tensor, gran_k: int = 32) -> torch.Tensor:
    """Exact inverse: packed E2M1 [T, H/2] + packed scales -> float32 [T, H]."""
    vals = e2m1_decode(unpack_fp4(packed))
    T, H = vals.shape
    s = exp2_from_ue8m0(unpack_ue8m0(sf))
    return (vals.reshape(T, H // gran_k, gran_k) * s.unsqueeze(-1)).reshape(T, H)


# ---------------------------------------------------------------------------------------------
# Activation formats
# ---------------------------------------------------------------------------------------------
def quantize_act(x: torch.Tensor, act_format: str, gran_k: int):
    """Quantise rows per `act_format`: returns (data, packed scales or None)."""
    if act_format == "fp8":
        return per_token_cast_to_fp8(x, gran_k)
    if act_format == "fp4":
        return per_token_cast_to_fp4(x, gran_k)
    if act_format == "bf16":
        return x.to(torch.bfloat16), None
    raise ValueError(f"act_format: expected 'fp8', 'fp4' or 'bf16', got {act_format!r}")


def dequantize_act(data: torch.Tensor, sf: Optional[torch.Tensor], act_format: str, gran_k: int) -> torch.Tensor:
    """Exact float32 values of a quantised activation."""
    if act_format == "fp8":
        return per_token_cast_back_from_fp8(data, sf, gran_k)
    if act_format == "fp4":
        return per_token_cast_back_from_fp4(data, sf, gran_k)
    return data.float()


# ---------------------------------------------------------------------------------------------
# Rebasing: power-of-two group scales folded into one exponent per row (the Hopper FP8 path)
# ---------------------------------------------------------------------------------------------
#: Exponent headroom of a rebased E2M1 value: E2M1 * 2**6 <= 384 still fits E4M3 (max 448), and
#: every E2M1 magnitude times 2**(6 - d) stays exact in E4M3 down to d = 14 (0.5 * 2**-8 = 2**-9,
#: E4M3's smallest subnormal). FP8 values have no headroom (448 already is E4M3's maximum).
REBASE_HEADROOM = {"fp8": 0, "fp4": 6, "mxfp4": 6}
#: Offsets d >= this index share the last table entry (every value there rounds to 0).
REBASE_TABLE_SIZE = 64


def e2m1_to_e4m3_tables(headroom: int = 6) -> torch.Tensor:
    """int64 [64]: entry d packs the E4M3 bytes of the 8 E2M1 magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}
    times 2**(headroom - d), magnitude m in byte m (little-endian), rounded to nearest even with
    E4M3's subnormals (torch's cast). d >= 15 (headroom 6) rounds some values; d >= 19 gives 0.

    Example: entry 0 = bytes 00 60 68 6C 70 74 78 7C (0, 32, 64, 96, 128, 192, 256, 384).
    """
    d = torch.arange(REBASE_TABLE_SIZE, dtype=torch.float64)
    vals = _E2M1_VALUES.double()[None, :] * torch.exp2(headroom - d)[:, None]          # [64, 8]
    b = vals.float().to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int64)
    packed = torch.zeros(REBASE_TABLE_SIZE, dtype=torch.int64)
    for m in range(8):
        packed |= b[:, m] << (8 * m)
    return packed


def rebase_rows(values: torch.Tensor, e: torch.Tensor, group: int, headroom: int):
    """Fold power-of-two group scales into one exponent per row.

    values: float32 [n, K], the group-relative values (E4M3 or E2M1 values, |v| <= 448);
    e: int32 [n, K / group] biased exponents (the value is values * 2**(e - 127)).
    Returns (float8_e4m3fn [n, K] rebased values, int32 [n] row exponent E = max_g e).

    Rebased value: r = e4m3(v * 2**(headroom - (E - e_g))) (RNE, E4M3 subnormals), so
    v * 2**(e_g - 127) = r * 2**(E - 127 - headroom) except where r rounded: only values below
    E4M3's normal range at the row's base, i.e. with |error| <= 2**-10 * 2**(E - 127 - headroom)
    (half E4M3's smallest subnormal step at that base).
    """
    n, K = values.shape
    E = e.amax(dim=1) if e.shape[1] else torch.zeros(n, dtype=torch.int32, device=e.device)
    d = (E[:, None] - e).to(torch.float64)
    shift = torch.exp2(headroom - d).repeat_interleave(group, dim=1)                # exact powers of 2
    r = (values.double() * shift).float().to(torch.float8_e4m3fn)
    return r, E.to(torch.int32)


def rebase_act(data: torch.Tensor, sf: torch.Tensor, act_format: str, gran_k: int):
    """Quantised activations (fp8 or fp4, packed UE8M0 per `gran_k`) -> (float8_e4m3fn [n, K],
    float32 [n] row factor): the operand the Hopper FP8 GEMMs multiply (see `rebase_rows`);
    dequantised value = rebased * row factor (exactly, except where `rebase_rows` rounds)."""
    if act_format == "fp8":
        vals = data.float()
    elif act_format == "fp4":
        vals = e2m1_decode(unpack_fp4(data))
    else:
        raise ValueError(f"act_format: expected 'fp8' or 'fp4', got {act_format!r}")
    A = REBASE_HEADROOM[act_format]
    r, E = rebase_rows(vals, unpack_ue8m0(sf), gran_k, A)
    return r, exp2_from_ue8m0(E - A)


def rebase_weight(fmt: str, data: torch.Tensor, scale: torch.Tensor):
    """Expert weights [E, N, K] -> (float8_e4m3fn [E, N, K] rebased values, float32 [E, N] row
    factor) for the Hopper FP8 GEMMs: mxfp4 (UE8M0 per 32) or fp8 with power-of-two block scales
    (per 128 x 128). Same rule as `rebase_rows`, the row exponent being the largest group scale of
    the output row. (The kernels keep MXFP4 data at 4 bits and expand it to these bytes in
    registers; FP8 weights are stored rebased.)"""
    if fmt == "mxfp4":
        E_, N, K2 = data.shape
        vals = e2m1_decode(unpack_fp4(data)).reshape(E_ * N, 2 * K2)
        e = scale.to(torch.int32).reshape(E_ * N, -1)
        r, Er = rebase_rows(vals, e, 32, REBASE_HEADROOM["mxfp4"])
        return r.reshape(E_, N, 2 * K2), exp2_from_ue8m0(Er - REBASE_HEADROOM["mxfp4"]).reshape(E_, N)
    if fmt == "fp8":
        E_, N, K = data.shape
        B = 128
        s = scale.float()
        m, p = torch.frexp(s)
        if not bool(((m == 0.5) & (s > 0)).all()):
            raise ValueError("scale: rebasing needs power-of-two FP8 block scales")
        p = (p - 1).to(torch.int32)                                      # s = 2**p
        prow = p.repeat_interleave(B, dim=1)[:, :N]                      # [E, N, K/128]
        Er = prow.amax(dim=2)                                            # [E, N]
        d = (Er[:, :, None] - prow).repeat_interleave(B, dim=2)[:, :, :K]
        r = (data.double() * torch.exp2(-d.double())).float().to(torch.float8_e4m3fn)
        return r, torch.exp2(Er.double()).float()
    raise ValueError(f"weight format: expected 'mxfp4' or 'fp8', got {fmt!r}")


def lane_k_order(k: int, device=None) -> torch.Tensor:
    """The "lane" K order of the Hopper FP8 GEMMs' 4-bit weights (`gemm_operands.LANE_K_ORDER`):
    int64 [K], position p -> the column it holds. In each 128-K chunk, position
    p = 32 g + 16 h + 4 c + b (g, c in 0..3: the m64nNk32 wgmma of a K step and the thread of a
    quad in its register operand; h in 0..1, b in 0..3) holds column 32 c + 8 g + 4 h + b: each
    thread of a quad holds one 32-group of each of its rows across the step's 4 MMAs (one E2M1
    table per row instead of one per 8 weights). Runs of 4 columns stay together. A dot product
    does not care about the order of K, so the GEMMs multiply x and h rows stored in this order
    (`to_lane_order`: the writers of rebased rows, `kernels/rebase.py`, `pre_dispatch`) with
    weights laid out to match; only the MMA's float32 summation order changes."""
    if k % 128:
        raise ValueError(f"k: expected a multiple of 128, got {k}")
    p = torch.arange(k, device=device)
    g, h, c, b = (p % 128) // 32, (p % 32) // 16, (p % 16) // 4, p % 4
    return (p // 128) * 128 + 32 * c + 8 * g + 4 * h + b


def to_lane_order(x: torch.Tensor) -> torch.Tensor:
    """Rows [..., K] -> the same rows in the "lane" K order (`lane_k_order`): out[..., p] =
    x[..., lane_k_order(K)[p]]."""
    return x[..., lane_k_order(x.shape[-1], x.device)]


def dequantize_rebased(r: torch.Tensor, row_factor: torch.Tensor) -> torch.Tensor:
    """float32 values of rebased rows: r [..., K] * row_factor [...]."""
    return r.float() * row_factor.float().unsqueeze(-1)


# ---------------------------------------------------------------------------------------------
# The expert computation (DESIGN steps 2-6) and the combine (step 7)
# ---------------------------------------------------------------------------------------------
def expert_forward(x_q: torch.Tensor, x_sf: Optional[torch.Tensor], weights_f32: torch.Tensor,
                   w13_f32: torch.Tensor, w2_f32: torch.Tensor, *, act_format: str,
                   act_group_size: int, activation_clamp: Optional[float], h_group: int = 32,
                   rebase: bool = False) -> torch.Tensor:
    """Rows of one expert: quantised x -> y_k rows, bf16 [n, H].

    x_q, x_sf: quantised activations of n routed pairs (step 1 already applied);
    weights_f32: [n] float32 top-k weights; w13_f32: [2I, H], w2_f32: [H, I] exact dequantised weights.

    Where it rounds: gate/up to bf16 (step 2), h to float32 then per `act_format` along I (steps 4-5),
    y_k to bf16 (step 6). NOTE: the reference accumulates both GEMMs and SwiGLU in float64 and rounds
    once, so a row's result does not depend on which other rows share the batch (CPU BLAS picks
    different blockings for different M); the kernels accumulate in float32, which the GEMM
    tolerance covers. Everything else is bitwise the DESIGN.

    rebase=True (fp8 / fp4 activations): the operands of the Hopper FP8 path — x and the quantised
    h replaced by their rebased values (`rebase_act`; the caller passes rebased weights,
    `rebase_weight`). It differs from rebase=False only where rebasing rounds (values far below
    their row's largest group scale); the GPU path is compared against both.
    """
    if rebase and act_format != "bf16":
        x = dequantize_rebased(*rebase_act(x_q, x_sf, act_format, act_group_size)).double()
    else:
        x = dequantize_act(x_q, x_sf, act_format, act_group_size).double()
    inter = w13_f32.shape[0] // 2
    gu = (x @ w13_f32.double().t()).to(torch.bfloat16).double()  # step 2
    gate, up = gu[:, :inter], gu[:, inter:]
    if activation_clamp is not None:                              # step 3
        c = float(activation_clamp)
        gate = torch.clamp(gate, max=c)
        up = torch.clamp(up, -c, c)
    h = (gate * torch.sigmoid(gate) * up * weights_f32.double().unsqueeze(-1)).float()  # step 4
    h_q, h_sf = quantize_act(h, act_format, h_group)              # step 5
    if rebase and act_format != "bf16":
        h = dequantize_rebased(*rebase_act(h_q, h_sf, act_format, h_group)).double()
    else:
        h = dequantize_act(h_q, h_sf, act_format, h_group).double()
    return (h @ w2_f32.double().t()).to(torch.bfloat16)           # step 6


def combine_quantize(y: torch.Tensor):
    """FP8 combine trip: bf16 [n, H] (H a multiple of 128) -> (e4m3 [n, H], int32 [n, ceil(H/512)]
    packed UE8M0 per 128 columns; a partial last word is padded with zero bytes)."""
    n, H = y.shape
    if H % 128:
        raise ValueError(f"y: H={H} must be a multiple of 128 for the fp8 combine")
    yf = y.float().reshape(n, H // 128, 128)
    e = ue8m0_exponent(yf.abs().amax(dim=-1), FP8_MAX)
    q = (yf * exp2_from_ue8m0(e, negate=True).unsqueeze(-1)).reshape(n, H)
    return q.to(torch.float8_e4m3fn), pack_ue8m0(e)


def combine_dequantize(q: torch.Tensor, sf: torch.Tensor) -> torch.Tensor:
    return per_token_cast_back_from_fp8(q, sf, 128)


def combine_reduce(y_slots: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
    """Step 7: y_slots float32 [T, K, H] (rows of masked slots ignored) -> bf16 [T, H].

    Sums in float32 in ascending k; a masked slot (id -1) adds 0.
    """
    T, K, H = y_slots.shape
    acc = torch.zeros(T, H, dtype=torch.float32, device=y_slots.device)
    for k in range(K):
        valid = (topk_idx[:, k] >= 0).unsqueeze(-1)
        acc = acc + torch.where(valid, y_slots[:, k].float(), torch.zeros((), device=acc.device))
    return acc.to(torch.bfloat16)


def moe_reference(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                  w13_f32: torch.Tensor, w2_f32: torch.Tensor, *, act_format: str = "fp8",
                  combine_format: str = "bf16", act_group_size: int = 32,
                  activation_clamp: Optional[float] = None) -> torch.Tensor:
    """Single-process reference of the whole layer (steps 1-7) on one rank holding every expert.

    x bf16 [T, H]; topk_idx [T, K] (-1 masks); topk_weights float32 [T, K];
    w13_f32 float32 [E, 2I, H], w2_f32 float32 [E, H, I] (exact dequantised weights) -> bf16 [T, H].
    """
    T, H = x.shape
    K = topk_idx.shape[1]
    x_q, x_sf = quantize_act(x, act_format, act_group_size)
    y_slots = torch.zeros(T, K, H, dtype=torch.float32, device=x.device)
    idx = topk_idx.long()
    for e in torch.unique(idx[idx >= 0]).tolist():
        t, k = torch.nonzero(idx == e, as_tuple=True)
        y = expert_forward(x_q[t], None if x_sf is None else x_sf[t], topk_weights[t, k],
                           w13_f32[e], w2_f32[e], act_format=act_format,
                           act_group_size=act_group_size, activation_clamp=activation_clamp)
        if combine_format == "fp8":
            y_slots[t, k] = combine_dequantize(*combine_quantize(y))
        else:
            y_slots[t, k] = y.float()
    return combine_reduce(y_slots, idx)


def dense_moe_float64(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                      w13: torch.Tensor, w2: torch.Tensor,
                      activation_clamp: Optional[float] = None) -> torch.Tensor:
    """The unquantised MoE in float64, written independently of the quantised path.

    Dense formulation: every expert runs on every token, and a [T, E] gate matrix (the top-k
    weights scattered, duplicates summed, masked slots ignored) mixes the results.
    x [T, H]; topk_idx [T, K]; topk_weights [T, K]; w13 [E, 2I, H]; w2 [E, H, I] -> float64 [T, H].
    """
    x64 = x.double()
    E, two_i, _ = w13.shape
    inter = two_i // 2
    idx = topk_idx.long()
    gates = torch.zeros(x.shape[0], E, dtype=torch.float64, device=x.device)
    valid = idx >= 0
    gates.index_put_((torch.nonzero(valid, as_tuple=True)[0], idx[valid]),
                     topk_weights.double()[valid], accumulate=True)
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float64, device=x.device)
    for e in range(E):
        gu = x64 @ w13[e].double().t()
        gate, up = gu[:, :inter], gu[:, inter:]
        if activation_clamp is not None:
            gate = gate.clamp(max=activation_clamp)
            up = up.clamp(-activation_clamp, activation_clamp)
        h = torch.nn.functional.silu(gate) * up
        out += gates[:, e:e + 1] * (h @ w2[e].double().t())
    return out


#: Largest relative rounding error of one value in each format (half a unit in the last place of
#: a mantissa with m bits: 2**-(m+1)); FP4/FP8 values are relative to their power-of-two scale.
UNIT_ROUNDOFF = {"bf16": 2.0 ** -8, "fp8": 2.0 ** -4, "fp4": 2.0 ** -2, "mxfp4": 2.0 ** -2}


def quantisation_error_bound(weight_format: str, act_format: str, combine_format: str) -> float:
    """Bound on rel-RMSE (||y - y64|| / ||y64||) of the layer against the float64 MoE.

    Each rounding stage perturbs every value by a relative error of at most u (`UNIT_ROUNDOFF`);
    the stages' errors are independent, so they add in quadrature, and for a GEMM with random
    signs the output's relative RMS error equals the inputs' relative RMS error. Stages: x and h
    (act_format), w13 and w2 (weight_format), the FP8 combine (if on), and three bf16 roundings
    (gate/up, y_k, y). Values far below their group's scale (FP4 codes that flush to 0) break the
    per-value bound but are small, which an RMS over the output absorbs.
    """
    stages = [UNIT_ROUNDOFF["bf16"]] * 3
    if act_format != "bf16":
        stages += [UNIT_ROUNDOFF[act_format]] * 2
    if weight_format != "bf16":
        stages += [UNIT_ROUNDOFF[weight_format]] * 2
    if combine_format == "fp8":
        stages.append(UNIT_ROUNDOFF["fp8"])
    return sum(u * u for u in stages) ** 0.5
