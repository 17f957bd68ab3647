"""Activation codecs (DESIGN numerics) checked against independent scalar implementations."""
import math

import numpy as np
import pytest
import torch

from mega_moe_layer.kernels import reference as ref

E4M3_VALUES = sorted({float(v) for v in torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
                      if math.isfinite(float(v)) and float(v) >= 0})
E2M1_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def scale_exponent(amax: float, quantum: float) -> int:
    """Independent UE8M0 rule: smallest e with 2**(e-127) >= float32(max(amax, 1e-4) / Q)."""
    s = float(np.float32(max(np.float32(amax), np.float32(1e-4))) / np.float32(quantum))
    m, ex = math.frexp(s)          # s = m * 2**ex, m in [0.5, 1)
    e = (ex - 1 if m == 0.5 else ex) + 127
    return min(max(e, 1), 254)


def rne(value: float, grid) -> float:
    """Round |value| to the nearest grid point, ties to the point with the even index."""
    a = abs(value)
    best = min(range(len(grid)), key=lambda i: (abs(grid[i] - a), i % 2))
    return math.copysign(grid[best], value) if grid[best] != 0 else 0.0


def scalar_cast(row, gran_k, quantum, grid):
    vals, exps = [], []
    for g0 in range(0, len(row), gran_k):
        grp = row[g0:g0 + gran_k]
        e = scale_exponent(max(abs(v) for v in grp), quantum)
        exps.append(e)
        vals += [rne(float(np.float32(v) * np.float32(2.0 ** (127 - e))), grid) for v in grp]
    return vals, exps


def special_rows(H, g, quantum, grid):
    """Rows hitting zeros, every midpoint of the grid (both signs), the maximum, tiny groups."""
    rows = [torch.zeros(H)]
    mids = [(a + b) / 2 for a, b in zip(grid[:-1], grid[1:])]
    r = torch.zeros(H)
    for j in range(H // g):          # group j: scale 2**j-ish; max value = quantum pins the scale
        pts = [quantum] + mids + [-m for m in mids] + grid
        seg = torch.tensor((pts * g)[:g]) * 2.0 ** (j % 5 - 2)
        r[j * g:(j + 1) * g] = seg
    rows.append(r)
    rows.append(torch.full((H,), 3e-5))                    # amax below the 1e-4 floor
    rows.append(torch.linspace(-quantum, quantum, H))      # values reaching the maximum
    return torch.stack(rows)


@pytest.mark.parametrize("gran_k", [32, 128])
@pytest.mark.parametrize("kind", ["fp8", "fp4"])
def test_cast_matches_scalar_rule(kind, gran_k):
    H = 4 * gran_k * 2
    quantum, grid = (ref.FP8_MAX, E4M3_VALUES) if kind == "fp8" else (ref.FP4_MAX, E2M1_VALUES)
    g = torch.Generator().manual_seed(1)
    x = torch.cat([special_rows(H, gran_k, quantum, grid), torch.randn(5, H, generator=g) * 3,
                   torch.randn(2, H, generator=g) * 1e-3]).to(torch.bfloat16)   # 9 rows: odd T
    if kind == "fp8":
        q, sf = ref.per_token_cast_to_fp8(x, gran_k)
        got = q.float()
    else:
        q, sf = ref.per_token_cast_to_fp4(x, gran_k)
        got = ref.e2m1_decode(ref.unpack_fp4(q))
    exps = ref.unpack_ue8m0(sf)
    for t in range(x.shape[0]):
        vals, es = scalar_cast(x[t].float().tolist(), gran_k, quantum, grid)
        assert exps[t].tolist() == es, f"row {t}: scale exponents differ"
        assert got[t].tolist() == vals, f"row {t}: quantised values differ"


def test_e2m1_ties_and_sign():
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert ref.e2m1_encode(mids).tolist() == [0, 2, 2, 4, 4, 6, 6]
    assert ref.e2m1_encode(-mids).tolist() == [0, 10, 10, 12, 12, 14, 14]   # -0.25 -> +0 code
    assert ref.e2m1_encode(torch.tensor([-0.0, 6.0, -6.0])).tolist() == [0, 7, 15]
    codes = torch.arange(16)
    back = ref.e2m1_encode(ref.e2m1_decode(codes))
    assert back.tolist() == [c if c != 8 else 0 for c in range(16)]     # -0 encodes as +0


def test_fp4_packing_order():
    codes = torch.tensor([[1, 2, 3, 4]])
    packed = ref.pack_fp4(codes)
    assert packed.view(torch.uint8).tolist() == [[0x21, 0x43]]         # even column in the low nibble
    assert torch.equal(ref.unpack_fp4(packed), codes.to(torch.int32))


def test_scale_packing_little_endian():
    e = torch.tensor([[1, 2, 3, 254, 127, 0, 255, 9]])
    packed = ref.pack_ue8m0(e)
    assert packed.shape == (1, 2)
    assert int(packed[0, 0]) & 0xFFFFFFFF == 0xFE030201
    assert torch.equal(ref.unpack_ue8m0(packed), e.to(torch.int32))


def test_fp8_value_at_max_scale_exact():
    x = torch.zeros(1, 128)
    x[0, 0] = 448.0
    x[0, 1] = -448.0
    x[0, 2] = 1.0
    q, sf = ref.per_token_cast_to_fp8(x.bfloat16(), 32)
    assert ref.unpack_ue8m0(sf)[0, 0] == 127                            # scale exactly 1
    assert q.float()[0, :3].tolist() == [448.0, -448.0, 1.0]


@pytest.mark.parametrize("kind", ["fp8", "fp4"])
def test_round_trip_error_bounded(kind):
    x = torch.randn(33, 512).bfloat16()
    if kind == "fp8":
        back = ref.per_token_cast_back_from_fp8(*ref.per_token_cast_to_fp8(x, 32), 32)
        u = 2 ** -4
    else:
        back = ref.per_token_cast_back_from_fp4(*ref.per_token_cast_to_fp4(x, 32), 32)
        u = 2 ** -2
    # per value: |err| <= u * |x| for values in the normal range, else <= half the smallest step.
    scale = ref.exp2_from_ue8m0(ref.unpack_ue8m0(
        (ref.per_token_cast_to_fp8 if kind == "fp8" else ref.per_token_cast_to_fp4)(x, 32)[1]))
    step = scale.repeat_interleave(32, dim=1) * (2 ** -9 if kind == "fp8" else 0.5)
    err = (back - x.float()).abs()
    assert bool((err <= torch.maximum(u * x.float().abs(), step / 2 + 1e-30)).all())


def test_bad_group_size():
    with pytest.raises(ValueError, match="gran_k"):
        ref.per_token_cast_to_fp8(torch.zeros(2, 96).bfloat16(), 32)
