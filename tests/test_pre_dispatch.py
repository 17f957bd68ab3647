"""Pre-dispatch kernel on the CPU: Triton's interpreter, bitwise against the reference codecs, plus
sm_90a / sm_100a compile checks and the launch heuristics.

In the interpreter (which mis-rounds float -> fp8/bf16 casts) the kernel encodes with exact float32
additions and integer operations; on a GPU, FP8 uses the hardware conversion instead (checked
bitwise by test_pre_dispatch_gpu.py, on the same inputs). CPU tensors run it in the interpreter;
shapes stay small because the interpreter pays ~20 ms of Python per program.
"""
from __future__ import annotations

import math

import pytest
import torch

import mega_moe_layer as mml
from mega_moe_layer.kernels import heuristics
from mega_moe_layer.kernels import reference as ref
from mega_moe_layer.kernels.heuristics import PreDispatchConfig, pre_dispatch_config
from mega_moe_layer.kernels.pre_dispatch import _launch_pre_dispatch, _pre_dispatch_kernel, mega_moe_pre_dispatch
from utils import assert_bitwise

POISON = 0x7F  # byte every output buffer starts as; rows the kernel must not touch keep it

# ------------------------------------------------------------------------------------------------
# Inputs with the special values of the DESIGN numerics (also used by test_pre_dispatch_gpu.py)
# ------------------------------------------------------------------------------------------------
_E4M3_FINITE = sorted({float(v) for v in torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
                       if math.isfinite(float(v)) and float(v) >= 0})
#: Midpoints between consecutive non-negative E4M3 values (ties of RNE), 2**-10 ... 432.
E4M3_MIDPOINTS = [(a + b) / 2 for a, b in zip(_E4M3_FINITE[:-1], _E4M3_FINITE[1:])]
#: Midpoints between consecutive E2M1 magnitudes.
E2M1_MIDPOINTS = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
BF16_MAX = float(torch.finfo(torch.bfloat16).max)
NUM_SPECIAL_KINDS = 8


def make_x(T: int, H: int, g: int, quantum: float, seed: int, special: bool = True,
           device="cpu") -> torch.Tensor:
    """bf16 [T, H] on `device`: random groups; with `special`, each group is one of 8 kinds
    (vectorised, so GPU tests can build 4096 x 7168 inputs quickly):

    0 all zeros (every third -0.0): amax floored to 1e-4;  1 amax < 1e-4 with bf16 subnormals;
    2 amax exactly Q * 2**k (a negative element): scaled values reach FP8 448 / FP4 6;
    3 every RNE tie of the target format (E4M3 or E2M1 midpoints) at scale 2**k;
    4 amax one bf16 step above Q * 2**k (the mantissa != 0 branch of the ceiling rule);
    5 +-bf16 max next to 1e-30 values;  6 wide dynamic range inside a group;  7 plain random.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    if not special:
        return (torch.randn(T, H, generator=gen, device=device) * 4).to(torch.bfloat16)
    G = T * H // g
    f32 = dict(dtype=torch.float32, device=device)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, **f32) * 2 - 1

    kind = torch.randint(0, NUM_SPECIAL_KINDS, (G, 1), generator=gen, device=device)
    kind[: min(G, NUM_SPECIAL_KINDS), 0] = torch.arange(min(G, NUM_SPECIAL_KINDS), device=device)
    scale = torch.pow(2.0, torch.randint(-60, 60, (G, 1), generator=gen, device=device).float())
    pos = torch.arange(g, device=device)[None, :]
    mids = torch.tensor(E2M1_MIDPOINTS if quantum == ref.FP4_MAX else E4M3_MIDPOINTS, **f32)
    ties = mids[torch.randint(0, mids.numel(), (G, g), generator=gen, device=device)]
    ties = torch.where(pos % 2 == 1, -ties, ties)
    ties = torch.where(pos == 0, torch.full_like(ties, quantum), ties) * scale
    zeros = torch.where(pos % 3 == 1, -torch.zeros(G, g, **f32), torch.zeros(G, g, **f32))
    tiny = rand(G, g) * 9e-5
    tiny = torch.where(pos == 0, 1e-40, torch.where(pos == 1, -3e-39, tiny))
    at_q = rand(G, g) * quantum * scale
    hit = torch.randint(0, g, (G, 1), generator=gen, device=device)
    at_q = torch.where(pos == hit, -quantum * scale, at_q)
    next_above_q = quantum + 2.0 ** (math.floor(math.log2(quantum)) - 7)   # next bf16 after Q
    above = torch.where(pos == 0, next_above_q * scale, rand(G, g) * quantum * scale)
    extremes = torch.where(pos == 0, BF16_MAX, torch.where(pos == 1, -BF16_MAX, rand(G, g) * 1e-30))
    wide = rand(G, g) * torch.pow(2.0, torch.randint(-40, 10, (G, g), generator=gen, device=device).float())
    plain = torch.randn(G, g, generator=gen, **f32) * scale
    x = plain
    for k, v in enumerate((zeros, tiny, at_q, ties, above, extremes, wide)):
        x = torch.where(kind == k, v, x)
    xb = x.reshape(T, H).to(torch.bfloat16)
    assert bool(torch.isfinite(xb.float()).all()), "special inputs must stay finite in bf16"
    return xb


def make_topk(T: int, K: int, dtype: torch.dtype, seed: int, num_experts: int = 64, device="cpu"):
    """(ids [T, K] of `dtype` in [-1, num_experts), float32 weights [T, K]) on `device`."""
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    ids = torch.randint(-1, num_experts, (T, K), generator=gen, device=device).to(dtype)
    w = torch.randn(T, K, generator=gen, device=device)
    if T > 0:
        w[0, 0] = -0.0  # bit-exact copy keeps the sign of zero
    return ids, w


def make_buffers(rows_x: int, rows_topk: int, H: int, K: int, g: int, use_fp4: bool, idx_dtype: torch.dtype,
                 device="cpu"):
    """Output buffers, every byte poisoned with POISON."""
    def poisoned(shape, dtype):
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        return torch.full((nbytes,), POISON, dtype=torch.uint8, device=device).view(dtype).reshape(shape)

    buf_x = poisoned((rows_x, H // 2), torch.int8) if use_fp4 else poisoned((rows_x, H), torch.float8_e4m3fn)
    buf_sf = poisoned((rows_x, H // g // 4), torch.int32)
    buf_idx = poisoned((rows_topk, K), idx_dtype)
    buf_w = poisoned((rows_topk, K), torch.float32)
    return buf_x, buf_sf, buf_idx, buf_w


def check_outputs(x, ids, w, n, g, use_fp4, buf_x, buf_sf, buf_idx, buf_w):
    """Rows < n equal the reference; x/sf rows >= n untouched; top-k rows >= n padded."""
    cast = ref.per_token_cast_to_fp4 if use_fp4 else ref.per_token_cast_to_fp8
    want_q, want_sf = cast(x[:n], g)   # on x's device
    assert_bitwise(buf_x[:n], want_q, "buf_x")
    assert_bitwise(buf_sf[:n], want_sf, "buf_x_sf")
    assert bool((buf_x[n:].contiguous().view(torch.uint8) == POISON).all()), "buf_x rows >= num_tokens were written"
    assert bool((buf_sf[n:].contiguous().view(torch.uint8) == POISON).all()), "buf_x_sf rows >= num_tokens were written"
    assert_bitwise(buf_idx[:n], ids[:n].to(buf_idx.dtype), "buf_topk_idx")
    assert_bitwise(buf_w[:n], w[:n], "buf_topk_weights")
    assert bool((buf_idx[n:] == -1).all()), "buf_topk_idx pad rows are not -1"
    pad_w = buf_w[n:].contiguous().view(torch.int32)
    assert bool((pad_w == 0).all()), "buf_topk_weights pad rows are not +0.0"


# ------------------------------------------------------------------------------------------------
# Interpreter: bitwise
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_fp4", [False, True], ids=["fp8", "fp4"])
@pytest.mark.parametrize("g", [32, 64, 128])
def test_bitwise_special_values(use_fp4, g):
    T, H, K = 13, 512, 6   # odd token count; 16 / 8 / 4 groups per row cycle through every kind
    quantum = ref.FP4_MAX if use_fp4 else ref.FP8_MAX
    x = make_x(T, H, g, quantum, seed=g + use_fp4)
    ids, w = make_topk(T, K, torch.int64, seed=g)
    bufs = make_buffers(T + 3, T + 5, H, K, g, use_fp4, torch.int32)
    mega_moe_pre_dispatch(x, ids, w, *bufs, T, group_size=g, use_fp4_acts=use_fp4)
    check_outputs(x, ids, w, T, g, use_fp4, *bufs)
    # The inputs really reach the format's extremes: +-Q codes and -0.
    codes = bufs[0][:T].view(torch.uint8)
    if use_fp4:
        nibbles = torch.cat([codes & 0xF, codes >> 4])
        assert {7, 15} <= set(nibbles.unique().tolist())
    else:
        assert {0x7E, 0xFE, 0x80} <= set(codes.unique().tolist())


def check_rebased(x, ids, w, n, g, buf_x, buf_sf, buf_e, buf_idx, buf_w, lane_k=False):
    """The REBASE staging (`_launch_pre_dispatch(..., rebase_out=)`): rows < n are the reference's
    FP8 quantisation rebased to one exponent per row (`reference.rebase_act`), bitwise, with the
    row exponents; no scale byte and no row >= n written; the top-k rows as usual. lane_k: the
    rows in the GEMMs' lane K order (`reference.to_lane_order` of the rebased rows)."""
    q, sf = ref.per_token_cast_to_fp8(x[:n], g)
    want_r, want_f = ref.rebase_act(q, sf, "fp8", g)
    if lane_k:
        q, want_r = ref.to_lane_order(q), ref.to_lane_order(want_r)
    assert_bitwise(buf_x[:n], want_r, "lane-ordered rebased buf_x" if lane_k else "rebased buf_x")
    e = buf_e[:n].long()
    assert_bitwise(torch.exp2((e - 127).double()).float(), want_f.float(), "row exponents")
    assert bool((buf_x[n:].contiguous().view(torch.uint8) == POISON).all()), "buf_x rows >= num_tokens were written"
    assert bool((buf_sf.contiguous().view(torch.uint8) == POISON).all()), "scale bytes were written"
    assert bool((buf_e[n:].view(torch.uint8) == POISON).all()), "exponents of rows >= num_tokens were written"
    assert_bitwise(buf_idx[:n], ids[:n].to(buf_idx.dtype), "buf_topk_idx")
    assert_bitwise(buf_w[:n], w[:n], "buf_topk_weights")
    # the rebasing really moved values: some group sits below its row's largest scale
    assert bool((q.view(torch.uint8) != buf_x[:n].view(torch.uint8)).any()), "no group was rebased"


def run_rebased(T: int, H: int, g: int, seed: int, device="cpu", lane_k: bool = False, config=None):
    x = make_x(T, H, g, ref.FP8_MAX, seed=seed, device=device)
    ids, w = make_topk(T, 8, torch.int32, seed=seed, device=device)
    buf_x, buf_sf, buf_idx, buf_w = make_buffers(T + 3, T + 5, H, 8, g, False, torch.int32, device=device)
    buf_e = torch.full((T + 3,), POISON * 0x01010101, dtype=torch.int32, device=device)
    extra = dict(lane_k=True) if lane_k else {}   # the default call stays as it was
    _launch_pre_dispatch(x, ids, w, buf_x, buf_sf, buf_idx, buf_w, T, group_size=g, rebase_out=buf_e,
                         config=config, **extra)
    check_rebased(x, ids, w, T, g, buf_x, buf_sf, buf_e, buf_idx, buf_w, lane_k=lane_k)


@pytest.mark.parametrize("g", [32, 128])
def test_rebased_staging_matches_the_reference(g):
    """The layer's Hopper FP8 staging: x quantised, then rebased to one exponent per row in the
    same program (special values: zeros, ties, extremes, wide ranges within and across groups)."""
    run_rebased(5, 1536, g, seed=g)


# H = 640 (g 32: 5 scale words, a tile of 8) and 1536 (g 128: 3 words, a tile of 4) leave a masked
# tail of whole 128-column chunks after the row; H = 768 at g 64 (3 words of 256 columns) too.
LANE_K_SHAPES = [(32, 256), (32, 640), (64, 768), (128, 512), (128, 1536)]


@pytest.mark.parametrize("g,H", LANE_K_SHAPES, ids=[f"g{g}-H{H}" for g, H in LANE_K_SHAPES])
def test_lane_k_staging_matches_the_reference(g, H):
    """lane_k: the rebased rows written in the GEMMs' lane K order, bitwise
    `reference.to_lane_order(reference.rebase_act(...))`, exponents as without it, rows >= n and
    the scale bytes untouched (5 rows in an 8-row interpreter tile: masked rows too)."""
    run_rebased(5, H, g, seed=g + H, lane_k=True)


@pytest.mark.parametrize("g,H", [(32, 640), (128, 1536)], ids=["g32-H640", "g128-H1536"])
@pytest.mark.parametrize("block_m", [1, 2])
def test_lane_k_staging_in_gpu_tilings(g, H, block_m):
    """The GPU's whole-row tiles (`pre_dispatch_config(..., whole_rows=True)`: one row per program,
    BLOCK_W the next power of two of the row's scale words), and two rows per program."""
    words = H // (4 * g)
    cfg = PreDispatchConfig(block_m=block_m, block_w=heuristics.next_power_of_2(words), num_col_blocks=1,
                            topk_block_rows=4, num_warps=4)
    run_rebased(3, H, g, seed=block_m + H, lane_k=True, config=cfg)


def test_lane_k_order_is_not_the_natural_order():
    """On random data the lane-ordered rows differ from the natural-order ones and are exactly
    their lane permutation (an identity or a wrong permutation fails here); exponents equal; a
    count on the device as well."""
    T, H, g = 4, 640, 32
    x = make_x(T, H, g, ref.FP8_MAX, seed=11, special=False)
    ids, w = make_topk(T, 3, torch.int32, seed=11)
    out = {}
    for lane_k in (False, True):
        bx, bsf, bi, bw = make_buffers(T, T, H, 3, g, False, torch.int32)
        be = torch.full((T,), POISON * 0x01010101, dtype=torch.int32)
        count = torch.tensor([T], dtype=torch.int32) if lane_k else T
        _launch_pre_dispatch(x, ids, w, bx, bsf, bi, bw, count, group_size=g, rebase_out=be, lane_k=lane_k)
        out[lane_k] = bx.view(torch.uint8), be
    (nat, e_nat), (lane, e_lane) = out[False], out[True]
    assert_bitwise(e_lane, e_nat, "row exponents")
    assert_bitwise(lane, ref.to_lane_order(nat), "lane order of the natural-order rows")
    assert bool((lane != nat).any()), "lane_k wrote the natural order"
    assert (lane != nat).float().mean().item() > 0.5, "lane_k moved too few bytes"
    # the 128-column chunks stay themselves: the same bytes, only moved within each
    assert torch.equal(lane.reshape(T, -1, 128).sort(-1).values, nat.reshape(T, -1, 128).sort(-1).values)


def test_lane_k_rejects_bad_arguments():
    x = torch.zeros(2, 512, dtype=torch.bfloat16)
    ids, w = make_topk(2, 2, torch.int32, 0)
    bufs = make_buffers(2, 2, 512, 2, 32, False, torch.int32)
    e = torch.zeros(2, dtype=torch.int32)
    snapshot = [b.clone().view(torch.uint8) for b in bufs]
    with pytest.raises(ValueError, match="^lane_k: .*rebase_out"):
        _launch_pre_dispatch(x, ids, w, *bufs, 2, lane_k=True)
    for bad in (1, "yes", None, torch.tensor(True)):
        with pytest.raises(TypeError, match="^lane_k: expected a bool"):
            _launch_pre_dispatch(x, ids, w, *bufs, 2, rebase_out=e, lane_k=bad)
    x192 = torch.zeros(2, 192, dtype=torch.bfloat16)       # H % 128 != 0
    with pytest.raises(ValueError, match="^x: hidden size H = 192 must be a multiple of 128 with lane_k"):
        _launch_pre_dispatch(x192, ids, w, *bufs, 2, rebase_out=e, lane_k=True)
    fp4 = make_buffers(2, 2, 512, 2, 32, True, torch.int32)
    with pytest.raises(ValueError, match="FP8"):
        _launch_pre_dispatch(x, ids, w, *fp4, 2, use_fp4_acts=True, rebase_out=e, lane_k=True)
    for b, before in zip(bufs, snapshot):   # nothing was launched
        assert torch.equal(b.view(torch.uint8), before)
    assert bool((e == 0).all())


def test_rebased_staging_rejects_bad_arguments():
    x = torch.zeros(2, 512, dtype=torch.bfloat16)
    ids, w = make_topk(2, 2, torch.int32, 0)
    bufs = make_buffers(2, 2, 512, 2, 32, False, torch.int32)
    with pytest.raises(TypeError, match="rebase_out"):
        _launch_pre_dispatch(x, ids, w, *bufs, 2, rebase_out=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="rebase_out"):
        _launch_pre_dispatch(x, ids, w, *bufs, 2, rebase_out=torch.zeros(1, dtype=torch.int32))
    fp4 = make_buffers(2, 2, 512, 2, 32, True, torch.int32)
    with pytest.raises(ValueError, match="FP8"):
        _launch_pre_dispatch(x, ids, w, *fp4, 2, use_fp4_acts=True, rebase_out=torch.zeros(2, dtype=torch.int32))
    split = PreDispatchConfig(block_m=1, block_w=1, num_col_blocks=4, topk_block_rows=8, num_warps=4)
    with pytest.raises(ValueError, match="whole rows"):
        _launch_pre_dispatch(x, ids, w, *bufs, 2, config=split, rebase_out=torch.zeros(2, dtype=torch.int32))


def test_worked_example_of_the_docstring():
    """The numbers quoted in the kernel docstring."""
    x = torch.zeros(1, 128, dtype=torch.bfloat16)
    x[0, 0], x[0, 1] = 3.0, -0.3
    ids, w = make_topk(1, 2, torch.int32, 0)
    bufs = make_buffers(1, 1, 128, 2, 32, False, torch.int32)
    mega_moe_pre_dispatch(x, ids, w, *bufs, 1, group_size=32)
    assert bufs[0].view(torch.uint8)[0, :2].tolist() == [0x7C, 0xE2]
    assert bufs[1][0, 0].item() & 0xFF == 120
    bufs = make_buffers(1, 1, 128, 2, 32, True, torch.int32)
    mega_moe_pre_dispatch(x, ids, w, *bufs, 1, group_size=32, use_fp4_acts=True)
    assert bufs[0].view(torch.uint8)[0, 0].item() == 0x97
    assert bufs[1][0, 0].item() & 0xFF == 126


@pytest.mark.parametrize("use_fp4", [False, True], ids=["fp8", "fp4"])
def test_every_bf16_value_encodes_like_the_reference(use_fp4):
    check_every_bf16_value(use_fp4)


def check_every_bf16_value(use_fp4: bool, device="cpu"):
    """Every bf16 value |v| <= Q as a quantised value (scale pinned to 1 by an anchor = Q per
    group): the encoder on every input it can see, including all ties and subnormals."""
    quantum = ref.FP4_MAX if use_fp4 else ref.FP8_MAX
    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)
    vals = bits.view(torch.bfloat16)
    vals = vals[torch.isfinite(vals.float()) & (vals.float().abs() <= quantum)]
    g, H = 32, 512
    per_group = g - 1
    n_groups = -(-vals.numel() // per_group)
    body = torch.zeros(n_groups * per_group, dtype=torch.bfloat16)
    body[:vals.numel()] = vals
    groups = torch.cat([torch.full((n_groups, 1), quantum, dtype=torch.bfloat16),
                        body.reshape(n_groups, per_group)], dim=1).reshape(-1)
    T = -(-groups.numel() // H)
    x = torch.zeros(T * H, dtype=torch.bfloat16)
    x[:groups.numel()] = groups
    x = x.reshape(T, H).to(device)
    ids, w = make_topk(T, 2, torch.int32, 0, device=device)
    bufs = make_buffers(T, T, H, 2, g, use_fp4, torch.int32, device=device)
    mega_moe_pre_dispatch(x, ids, w, *bufs, T, group_size=g, use_fp4_acts=use_fp4)
    check_outputs(x, ids, w, T, g, use_fp4, *bufs)
    assert bool((ref.unpack_ue8m0(bufs[1])[: n_groups // (H // g)] == 127).all())  # the scale really is 1


@pytest.mark.parametrize("use_fp4", [False, True], ids=["fp8", "fp4"])
def test_every_bf16_amax_gives_the_reference_scale(use_fp4):
    check_every_bf16_amax(use_fp4)


def check_every_bf16_amax(use_fp4: bool, device="cpu"):
    """One group per positive finite bf16 value as its amax: the UE8M0 ceiling rule everywhere."""
    quantum = ref.FP4_MAX if use_fp4 else ref.FP8_MAX
    amax = torch.arange(1, 0x7F80, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    g, H = 32, 512
    gen = torch.Generator().manual_seed(7)
    frac = (torch.rand(amax.numel(), g, generator=gen) * 2 - 1)
    x = (frac * amax.float()[:, None]).to(torch.bfloat16)
    x = torch.where(x.float().abs() > amax.float()[:, None], amax[:, None].expand(-1, g), x)
    x[:, 5] = -amax  # the amax itself (negative)
    n_rows = -(-x.numel() // H)
    flat = torch.zeros(n_rows * H, dtype=torch.bfloat16)
    flat[:x.numel()] = x.reshape(-1)
    x = flat.reshape(n_rows, H).to(device)
    ids, w = make_topk(n_rows, 1, torch.int32, 0, device=device)
    bufs = make_buffers(n_rows, n_rows, H, 1, g, use_fp4, torch.int32, device=device)
    mega_moe_pre_dispatch(x, ids, w, *bufs, n_rows, group_size=g, use_fp4_acts=use_fp4)
    check_outputs(x, ids, w, n_rows, g, use_fp4, *bufs)


@pytest.mark.parametrize("idx_in,idx_out", [(torch.int32, torch.int32), (torch.int32, torch.int64),
                                            (torch.int64, torch.int32), (torch.int64, torch.int64)],
                         ids=["i32-i32", "i32-i64", "i64-i32", "i64-i64"])
def test_topk_dtypes_and_pad_rows(idx_in, idx_out):
    T, H, K, g = 5, 256, 8, 32
    x = make_x(T, H, g, ref.FP8_MAX, seed=3)
    ids, w = make_topk(T, K, idx_in, seed=3, num_experts=300)
    ids[1, 2] = -1
    bufs = make_buffers(T, 70, H, K, g, False, idx_out)   # pad rows span two top-k programs
    mega_moe_pre_dispatch(x, ids, w, *bufs, T, group_size=g)
    check_outputs(x, ids, w, T, g, False, *bufs)


@pytest.mark.parametrize("use_fp4", [False, True], ids=["fp8", "fp4"])
def test_num_tokens_zero_only_pads(use_fp4):
    H, K, g = 256, 6, 32
    x = torch.empty(0, H, dtype=torch.bfloat16)
    ids, w = torch.empty(0, K, dtype=torch.int64), torch.empty(0, K)
    bufs = make_buffers(4, 9, H, K, g, use_fp4, torch.int64)
    mega_moe_pre_dispatch(x, ids, w, *bufs, 0, group_size=g, use_fp4_acts=use_fp4)
    check_outputs(x, ids, w, 0, g, use_fp4, *bufs)


def test_num_tokens_zero_with_empty_buffers_is_a_no_op():
    H, K = 256, 6
    bufs = make_buffers(0, 0, H, K, 32, False, torch.int32)
    mega_moe_pre_dispatch(torch.empty(0, H, dtype=torch.bfloat16), torch.empty(0, K, dtype=torch.int32),
                          torch.empty(0, K), *bufs, 0)


def test_num_tokens_below_rows_of_x():
    """Only the first num_tokens rows of a larger x are read and written."""
    T, H, K, g = 9, 256, 4, 64
    x = make_x(T, H, g, ref.FP8_MAX, seed=5)
    ids, w = make_topk(T, K, torch.int32, seed=5)
    bufs = make_buffers(T, T, H, K, g, False, torch.int32)
    mega_moe_pre_dispatch(x, ids, w, *bufs, 4, group_size=g)
    check_outputs(x, ids, w, 4, g, False, *bufs)


@pytest.mark.parametrize("value,expect", [(6, 6), (0, 0), (-3, 0), (100, 11)], ids=["6", "0", "neg", "over"])
def test_num_tokens_as_device_tensor(value, expect):
    """A 1-element int32 tensor count (CUDA-graph replay); out-of-range values clamp to [0, T]."""
    T, H, K, g = 11, 256, 6, 32
    x = make_x(T, H, g, ref.FP4_MAX, seed=9)
    ids, w = make_topk(T, K, torch.int64, seed=9)
    bufs = make_buffers(T + 2, T + 4, H, K, g, True, torch.int64)
    mega_moe_pre_dispatch(x, ids, w, *bufs, torch.tensor([value], dtype=torch.int32), group_size=g,
                          use_fp4_acts=True)
    check_outputs(x, ids, w, expect, g, True, *bufs)


@pytest.mark.parametrize("use_fp4", [False, True], ids=["fp8", "fp4"])
@pytest.mark.parametrize("block_m,block_w", [(1, 1), (2, 2), (4, 4), (4, 8)])
def test_gpu_tilings_in_the_interpreter(use_fp4, block_m, block_w):
    """The GPU's tile shapes (not the interpreter's default): row tails, several column blocks
    and a masked tail of scale words (H = 768 has 6 words of 4 x 32 columns)."""
    T, H, K, g = 7, 768, 6, 32
    words = H // (4 * g)
    cfg = PreDispatchConfig(block_m=block_m, block_w=block_w, num_col_blocks=-(-words // block_w),
                            topk_block_rows=4, num_warps=4)
    x = make_x(T, H, g, ref.FP4_MAX if use_fp4 else ref.FP8_MAX, seed=block_m * 10 + block_w)
    ids, w = make_topk(T, K, torch.int32, seed=1)
    bufs = make_buffers(T + 1, T + 6, H, K, g, use_fp4, torch.int32)
    _launch_pre_dispatch(x, ids, w, *bufs, T, group_size=g, use_fp4_acts=use_fp4, config=cfg)
    check_outputs(x, ids, w, T, g, use_fp4, *bufs)


def test_exported_from_the_package():
    assert mml.kernels.mega_moe_pre_dispatch is mega_moe_pre_dispatch


# ------------------------------------------------------------------------------------------------
# Bad inputs: clear errors naming the argument, raised before anything is written
# ------------------------------------------------------------------------------------------------
def _good(use_fp4=False, T=4, H=256, K=4, g=32):
    x = make_x(T, H, g, ref.FP8_MAX, seed=0, special=False)
    ids, w = make_topk(T, K, torch.int32, 0)
    bx, bsf, bi, bw = make_buffers(T, T + 2, H, K, g, use_fp4, torch.int32)
    return dict(x=x, topk_idx=ids, topk_weights=w, buf_x=bx, buf_x_sf=bsf, buf_topk_idx=bi,
                buf_topk_weights=bw, num_tokens=T, group_size=g, use_fp4_acts=use_fp4)


def _noncontig(t):
    return t.t().contiguous().t() if t.dim() == 2 and t.shape[0] > 1 and t.shape[1] > 1 else t[::2]


BAD_INPUTS = [
    # (changed arguments, exception, message start)
    (dict(x=[[1.0]]), TypeError, "x:"),
    (dict(x=torch.zeros(4, 256)), TypeError, "x:"),
    (dict(x=torch.zeros(4 * 256, dtype=torch.bfloat16)), ValueError, "x:"),
    (dict(x=torch.zeros(4, 192, dtype=torch.bfloat16)), ValueError, "x:"),          # H % (4 * g)
    (dict(x="noncontig"), ValueError, "x:"),
    (dict(topk_idx=torch.zeros(4, 4, dtype=torch.int16)), TypeError, "topk_idx:"),
    (dict(topk_idx=torch.zeros(4, 4)), TypeError, "topk_idx:"),
    (dict(topk_idx=torch.zeros(3, 4, dtype=torch.int32)), ValueError, "topk_idx:"),
    (dict(topk_idx=torch.zeros(4, 0, dtype=torch.int32)), ValueError, "topk_idx:"),
    (dict(topk_idx="noncontig"), ValueError, "topk_idx:"),
    (dict(topk_weights=torch.zeros(4, 4, dtype=torch.bfloat16)), TypeError, "topk_weights:"),
    (dict(topk_weights=torch.zeros(4, 5)), ValueError, "topk_weights:"),
    (dict(buf_x=torch.zeros(4, 256, dtype=torch.int8)), TypeError, "buf_x:"),         # int8 in FP8 mode
    (dict(buf_x=torch.zeros(4, 256, dtype=torch.uint8)), TypeError, "buf_x:"),
    (dict(buf_x=torch.zeros(4, 128, dtype=torch.float8_e4m3fn)), ValueError, "buf_x:"),
    (dict(buf_x=torch.zeros(3, 256, dtype=torch.float8_e4m3fn)), ValueError, "buf_x: too small"),
    (dict(buf_x=torch.zeros(4, 512, dtype=torch.float8_e4m3fn)[:, :256]), ValueError, "buf_x:"),
    (dict(buf_x_sf=torch.zeros(4, 2, dtype=torch.int64)), TypeError, "buf_x_sf:"),
    (dict(buf_x_sf=torch.zeros(4, 1, dtype=torch.int32)), ValueError, "buf_x_sf:"),
    (dict(buf_x_sf=torch.zeros(2, 2, dtype=torch.int32)), ValueError, "buf_x_sf: too small"),
    (dict(buf_x_sf="noncontig"), ValueError, "buf_x_sf:"),
    (dict(buf_topk_idx=torch.zeros(6, 4)), TypeError, "buf_topk_idx:"),
    (dict(buf_topk_idx=torch.zeros(6, 3, dtype=torch.int32)), ValueError, "buf_topk_idx:"),
    (dict(buf_topk_idx=torch.zeros(3, 4, dtype=torch.int32), buf_topk_weights=torch.zeros(3, 4)),
     ValueError, "buf_topk_idx: too small"),
    (dict(buf_topk_weights=torch.zeros(6, 4, dtype=torch.float64)), TypeError, "buf_topk_weights:"),
    (dict(buf_topk_weights=torch.zeros(5, 4)), ValueError, "buf_topk_weights:"),
    (dict(buf_topk_weights="noncontig"), ValueError, "buf_topk_weights:"),
    (dict(topk_weights=torch.zeros(4, 4, device="meta")), ValueError, "topk_weights:"),
    (dict(group_size=16), ValueError, "group_size:"),
    (dict(group_size=256), ValueError, "group_size:"),
    (dict(group_size=True), ValueError, "group_size:"),
    (dict(group_size="32"), ValueError, "group_size:"),
    (dict(use_fp4_acts=1), TypeError, "use_fp4_acts:"),
    (dict(num_tokens=-1), ValueError, "num_tokens:"),
    (dict(num_tokens=5), ValueError, "num_tokens:"),
    (dict(num_tokens=2.0), TypeError, "num_tokens:"),
    (dict(num_tokens=True), TypeError, "num_tokens:"),
    (dict(num_tokens=torch.tensor([2], dtype=torch.int64)), TypeError, "num_tokens:"),
    (dict(num_tokens=torch.tensor([2, 2], dtype=torch.int32)), ValueError, "num_tokens:"),
    (dict(num_tokens=torch.tensor([2], dtype=torch.int32, device="meta")), ValueError, "num_tokens:"),
]


@pytest.mark.parametrize("change,exc,msg", BAD_INPUTS, ids=[f"{i}-{m.split(':')[0]}" for i, (_, _, m) in
                                                            enumerate(BAD_INPUTS)])
def test_bad_inputs_raise_before_launch(change, exc, msg):
    args = _good()
    for k, v in change.items():
        args[k] = _noncontig(args[k]) if isinstance(v, str) and v == "noncontig" else v
    snapshot = {k: v.clone() for k, v in args.items() if k.startswith("buf_") and v.device.type == "cpu"}
    with pytest.raises(exc, match="^" + msg):
        mega_moe_pre_dispatch(**args)
    for k, v in snapshot.items():   # nothing was launched
        assert torch.equal(args[k].view(torch.uint8) if v.element_size() == 1 else args[k],
                           v.view(torch.uint8) if v.element_size() == 1 else v), k


def test_bad_fp4_buffers():
    args = _good(use_fp4=True)
    args["buf_x"] = torch.zeros(4, 256, dtype=torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="^buf_x: expected dtype torch.int8"):
        mega_moe_pre_dispatch(**args)
    args["buf_x"] = torch.zeros(4, 256, dtype=torch.int8)       # H columns instead of H/2
    with pytest.raises(ValueError, match=r"^buf_x: expected shape \[rows, 128\]"):
        mega_moe_pre_dispatch(**args)


def test_views_at_odd_offsets_are_rejected():
    """x is read as int32 pairs and the FP8 buffer written as int16 pairs: odd starts cannot be."""
    args = _good()
    args["x"] = torch.zeros(1 + 4 * 256, dtype=torch.bfloat16)[1:].view(4, 256)
    with pytest.raises(ValueError, match="^x: cannot be read as bf16 pairs"):
        mega_moe_pre_dispatch(**args)
    args = _good()
    args["buf_x"] = torch.zeros(1 + 4 * 256, dtype=torch.float8_e4m3fn)[1:].view(4, 256)
    with pytest.raises(ValueError, match="^buf_x: cannot be written as byte pairs"):
        mega_moe_pre_dispatch(**args)


def test_device_count_needs_buffers_for_all_rows_of_x():
    args = _good()
    args["buf_x"] = args["buf_x"][:3]
    args["num_tokens"] = torch.tensor([2], dtype=torch.int32)   # fits, but the host cannot know
    with pytest.raises(ValueError, match="^buf_x: too small"):
        mega_moe_pre_dispatch(**args)


# ------------------------------------------------------------------------------------------------
# Heuristics (pure)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("H,g", [(H, g) for H in (256, 512, 768, 1024, 2048, 4096, 5120, 7168)
                                  for g in (32, 64, 128) if H % (4 * g) == 0])
@pytest.mark.parametrize("T", [0, 1, 7, 128, 512, 4096, 8192])
def test_heuristic_tiles_cover_the_row(T, H, g):
    words = H // (4 * g)
    for interp, use_fp4 in ((False, False), (False, True), (True, False)):
        c = pre_dispatch_config(T, H, g, interpreter=interp, use_fp4=use_fp4)
        assert c.block_w & (c.block_w - 1) == 0 and c.block_m & (c.block_m - 1) == 0
        assert c.num_col_blocks * c.block_w >= words > (c.num_col_blocks - 1) * c.block_w
        assert c.num_x_programs(T) * c.block_m >= T * c.num_col_blocks
        if not interp:
            assert c.block_w * 4 * g <= 1024
            if words * 4 * g >= 1024:
                assert c.block_w * 4 * g == 1024  # full 1024-element column blocks at large H


def test_heuristic_branches():
    for use_fp4 in (False, True):
        assert pre_dispatch_config(128, 7168, 32, use_fp4=use_fp4).block_m == 1    # decode: all SMs stream one row
    assert pre_dispatch_config(4096, 7168, 32).block_m == 2      # prefill, FP8 (bandwidth-bound): 2 rows
    assert pre_dispatch_config(4096, 7168, 32, use_fp4=True).block_m == 4   # FP4 (issue-bound): fatter
    assert pre_dispatch_config(4096, 7168, 32).num_col_blocks == 7
    assert pre_dispatch_config(4096, 7168, 128).num_col_blocks == 7
    assert pre_dispatch_config(200, 7168, 32, num_sms=8, use_fp4=True).block_m == 4
    assert pre_dispatch_config(12, 7168, 32, num_sms=8, use_fp4=True).block_m == 2
    assert pre_dispatch_config(0, 7168, 32).num_x_programs(0) == 0
    assert pre_dispatch_config(0, 7168, 32).num_topk_programs(65) == 2
    with pytest.raises(ValueError, match="^group_size"):
        pre_dispatch_config(1, 1024, 48)
    with pytest.raises(ValueError, match="^hidden"):
        pre_dispatch_config(1, 1000, 32)
    assert heuristics.next_power_of_2(1) == 1 and heuristics.next_power_of_2(6) == 8
    assert heuristics.cdiv(7, 4) == 2 and heuristics.cdiv(0, 4) == 0


# ------------------------------------------------------------------------------------------------
# Compile checks: the kernel builds for Hopper and Blackwell
# ------------------------------------------------------------------------------------------------
def _compile_args(use_fp4: bool, idx_in: str, idx_out: str, on_device: bool, H=7168, g=32, K=8, rebase=False,
                  lane_k=False):
    cfg = pre_dispatch_config(4096, H, g, use_fp4=use_fp4, whole_rows=rebase)
    sig = {"x_ptr": "*i32", "topk_idx_ptr": f"*{idx_in}", "topk_w_ptr": "*i32",
           "out_x_ptr": "*i8" if use_fp4 else "*i16", "out_sf_ptr": "*i8", "out_idx_ptr": f"*{idx_out}",
           "out_w_ptr": "*i32", "num_tokens": "i32", "max_tokens": "i32", "num_topk_rows": "i32",
           "num_topk_programs": "i32", "num_experts": "i32", "y_addr": "i64"}
    constexprs = dict(HIDDEN=H, GROUP=g, TOPK=K, TOPK_PAD=heuristics.next_power_of_2(K), USE_FP4=use_fp4,
                      HW_CVT=True, NUM_TOKENS_ON_DEVICE=on_device, BLOCK_M=cfg.block_m, BLOCK_W=cfg.block_w,
                      TOPK_BLOCK_ROWS=cfg.topk_block_rows, CHECK_IDS=False, COPY_BF16=False,
                      WRITE_CALL_INFO=False, bad_row_ptr=None, call_info_ptr=None, out_e_ptr=None)
    if on_device:
        sig["num_tokens_ptr"] = "*i32"
    else:
        constexprs["num_tokens_ptr"] = None
    if rebase:
        del constexprs["out_e_ptr"]
        sig["out_e_ptr"] = "*i32"
        constexprs["REBASE"] = True
    if lane_k:
        constexprs["LANE_K"] = True
    return sig, constexprs, cfg.num_warps


COMPILE_VARIANTS = {  # name -> (use_fp4, topk_idx dtype, buffer dtype, count on device[, rebase[, lane_k]])
    "fp8": (False, "i64", "i32", False),
    "fp4-devcount": (True, "i32", "i64", True),
    "fp8-rebase": (False, "i32", "i32", False, True),   # the layer's Hopper FP8 staging, whole rows
    "fp8-rebase-lane": (False, "i32", "i32", True, True, True),   # ... in the GEMMs' lane K order
}
ARCHS = (90, 100)


@pytest.fixture(scope="module")
def compiled_ptx():
    """PTX of every (variant, arch), compiled in one batch (one child process in interpreter mode)."""
    from mega_moe_layer.kernels import _compile

    keys, jobs = [], []
    for name, (use_fp4, idx_in, idx_out, on_device, *extra) in COMPILE_VARIANTS.items():
        rebase, lane_k = (tuple(extra) + (False, False))[:2]
        for arch in ARCHS:
            sig, constexprs, num_warps = _compile_args(use_fp4, idx_in, idx_out, on_device, rebase=rebase,
                                                       lane_k=lane_k)
            keys.append((name, arch))
            jobs.append(_compile.CompileJob(_pre_dispatch_kernel, sig, constexprs, arch, num_warps=num_warps,
                                            enable_fp_fusion=False))
    try:
        return dict(zip(keys, _compile.compile_ptx_batch(jobs)))
    except _compile.CompileUnavailable as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("arch", ARCHS, ids=["sm_90a", "sm_100a"])
@pytest.mark.parametrize("variant", list(COMPILE_VARIANTS))
def test_compiles_for_hopper_and_blackwell(compiled_ptx, variant, arch):
    from mega_moe_layer.kernels import _compile

    ptx = compiled_ptx[(variant, arch)]
    assert _compile.ptx_target(ptx) == f"sm_{arch}a"
    assert _compile.ptx_entries(ptx) == ["_pre_dispatch_kernel"]
    assert ".local" not in ptx, "local memory in the PTX"
    assert "ld.global.v4.b32" in ptx, "x should be read with 16-byte vector loads"
    assert "div." not in ptx, "no division"
    use_fp4 = COMPILE_VARIANTS[variant][0]
    assert ("cvt.rn.satfinite.e4m3x2.f32" in ptx) != use_fp4, "FP8 uses the hardware conversion (FP4 has none)"
    try:
        usage = _compile.ptxas_usage(ptx, arch)
    except _compile.CompileUnavailable as exc:
        pytest.skip(str(exc))
    assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0, usage
    assert 0 < usage["registers"] <= 128, usage


def test_compile_helper_rejects_bad_signatures():
    from mega_moe_layer.kernels import _compile

    sig, constexprs, _ = _compile_args(False, "i32", "i32", False)
    del sig["x_ptr"]
    with pytest.raises(ValueError, match="x_ptr"):
        _compile.compile_ptx(_pre_dispatch_kernel, sig, constexprs, 90)
    sig["x_ptr"], sig["bogus"] = "*i32", "i32"
    with pytest.raises(ValueError, match="bogus"):
        _compile.compile_ptx(_pre_dispatch_kernel, sig, constexprs, 90)
