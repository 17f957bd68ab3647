"""CPU tests of the workspace layout, the CPU workspace, sharing rules and the bootstrap's CPU side."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from mega_moe_layer.comm import bootstrap
from mega_moe_layer.comm import workspace as wsm
from mega_moe_layer.comm.workspace import (
    ALIGN_BYTES,
    CPUWorkspace,
    SLOT_ROLES,
    SymmetricWorkspace,
    WorkspaceRegistry,
    workspace_layout,
    workspace_nbytes,
)
from mega_moe_layer.config import MegaMoEConfig

from utils import parallel_launch

REPO = Path(__file__).resolve().parents[1]
WORLD_SIZES = (1, 2, 4, 8)
SLOT_NAMES = ("signals", "counters", "counts", "x", "x_sf", "topk_idx", "topk_weights", "recv_x",
              "recv_x_sf", "recv_topk_idx", "recv_topk_weights", "recv_src", "pair_rows", "h", "h_sf",
              "combine", "combine_sf")


def C(**kw) -> MegaMoEConfig:
    base = dict(hidden=512, intermediate=256, num_experts=16, topk=4, max_tokens_per_rank=8,
                weight_format="bf16")
    base.update(kw)
    return MegaMoEConfig(**base)


CONFIGS = [
    C(),
    C(act_format="fp4"),
    C(act_format="bf16"),
    C(act_format="fp8", act_group_size=128),
    C(act_format="fp4", act_group_size=128, combine_format="fp8"),
    C(act_format="bf16", combine_format="fp8"),
    C(topk=8, num_experts=8, max_tokens_per_rank=3),          # K > E_local at 2+ ranks
    C(topk=1, num_experts=64, max_tokens_per_rank=1),
    C(hidden=7168, intermediate=2048, num_experts=256, topk=8, max_tokens_per_rank=128),
    C(hidden=1024, intermediate=384, num_experts=32, topk=6, max_tokens_per_rank=33,
      activation_clamp=7.0),
]


def _expected(cfg: MegaMoEConfig, R: int):
    """Independent restatement of the docstring table: name -> (dtype, shape)."""
    T, H, I, K, E, g = (cfg.max_tokens_per_rank, cfg.hidden, cfg.intermediate, cfg.topk,
                        cfg.num_experts, cfg.act_group_size)
    El = E // R
    P = R * T * min(K, El) + 128 * El

    def act(rows, cols):
        return {"fp8": (torch.float8_e4m3fn, (rows, cols)), "fp4": (torch.int8, (rows, cols // 2)),
                "bf16": (torch.bfloat16, (rows, cols))}[cfg.act_format]

    def sf(rows, cols, grp):
        return (torch.int32, (rows, 0 if cfg.act_format == "bf16" else cols // grp // 4))

    fp8c = cfg.combine_format == "fp8"
    return {
        "signals": (torch.int64, (R, 8)),
        "counters": (torch.int32, (64,)),
        "counts": (torch.int32, (R, El)),
        "x": act(T, H),
        "x_sf": sf(T, H, g),
        "topk_idx": (torch.int32, (T, K)),
        "topk_weights": (torch.float32, (T, K)),
        "recv_x": act(R * T, H),
        "recv_x_sf": sf(R * T, H, g),
        "recv_topk_idx": (torch.int32, (R * T, K)),
        "recv_topk_weights": (torch.float32, (R * T, K)),
        "recv_src": (torch.int32, (R * T,)),
        "pair_rows": (torch.int32, (P,)),
        "h": act(P, I),
        "h_sf": sf(P, I, 32),
        "combine": (torch.float8_e4m3fn if fp8c else torch.bfloat16, (T, K, H)),
        "combine_sf": (torch.int32, (T, K, H // 128 // 4 if fp8c else 0)),
    }


def _layout_cases():
    for i, cfg in enumerate(CONFIGS):
        for R in WORLD_SIZES:
            if cfg.num_experts % R == 0:
                yield pytest.param(cfg, R, id=f"cfg{i}-R{R}")


# ------------------------------------------------------------------------------------------------
# Layout
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg,R", list(_layout_cases()))
def test_layout_shapes_offsets(cfg, R):
    layout = workspace_layout(cfg, R)
    assert layout.names == SLOT_NAMES
    assert set(SLOT_ROLES) == set(SLOT_NAMES)
    exp = _expected(cfg, R)
    for s in layout:
        dtype, shape = exp[s.name]
        assert (s.dtype, s.shape) == (dtype, shape), s.name
        assert s.nbytes == s.numel * torch.empty((), dtype=s.dtype).element_size(), s.name
        assert s.offset % ALIGN_BYTES == 0, s.name
        assert 0 <= s.offset and s.end <= layout.nbytes, s.name
    # No overlap: address order, each slot ends before the next starts.
    for a, b in zip(layout.slots, layout.slots[1:]):
        assert a.end <= b.offset, (a.name, b.name)
    assert layout.nbytes % ALIGN_BYTES == 0
    assert layout.nbytes == workspace_nbytes(cfg, R)
    assert layout.nbytes - layout.slots[-1].end < ALIGN_BYTES  # no slack beyond alignment
    assert layout.num_ranks == R and layout.cfg is cfg


def test_control_slots_same_offsets_for_every_config():
    # A layer with another config over the same bytes finds signals/counters where it left them.
    for R in WORLD_SIZES:
        offs = {(workspace_layout(c, R)["signals"].offset, workspace_layout(c, R)["counters"].offset)
                for c in CONFIGS if c.num_experts % R == 0}
        assert offs == {(0, -(-64 * R // ALIGN_BYTES) * ALIGN_BYTES)}


def test_layout_grows_with_tokens_and_is_pure():
    sizes = [workspace_nbytes(C(max_tokens_per_rank=t), 4) for t in (1, 2, 8, 64, 512)]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    assert workspace_layout(C(), 2) == workspace_layout(C(), 2)


def test_deepseek_v3_size_pinned():
    cfg = MegaMoEConfig(hidden=7168, intermediate=2048, num_experts=256, topk=8,
                        max_tokens_per_rank=128)
    assert workspace_nbytes(cfg, 8) == 49_276_672
    assert workspace_layout(cfg, 8)["combine_sf"].nbytes == 0


def test_docs_table_matches_script():
    spec = importlib.util.spec_from_file_location("workspace_sizes", REPO / "scripts" / "workspace_sizes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    doc = (REPO / "docs" / "WORKSPACE.md").read_text()
    for line in mod.size_table().splitlines():
        assert line in doc, f"docs/WORKSPACE.md is stale (re-run scripts/workspace_sizes.py): {line}"
    # DeepEP's low-latency buffer for DeepSeek-V3 at 128 tokens per rank: about 1.9 GB.
    assert 1.85e9 < mod.deepep_low_latency_bytes(128, 7168, 256) < 1.95e9


# ------------------------------------------------------------------------------------------------
# Bad configs
# ------------------------------------------------------------------------------------------------
def test_too_big_for_int32_raises():
    cfg = C(hidden=7168, intermediate=2048, num_experts=256, topk=8, max_tokens_per_rank=40_000)
    with pytest.raises(ValueError, match="int32"):
        workspace_layout(cfg, 8)
    workspace_layout(C(hidden=7168, intermediate=2048, num_experts=256, topk=8,
                       max_tokens_per_rank=8192), 8)  # the largest documented shape fits


@pytest.mark.parametrize("R", [0, -1, 3, True, 2.0, "2"])
def test_bad_world_size(R):
    with pytest.raises(ValueError):
        workspace_layout(C(), R)


def test_not_a_config():
    with pytest.raises(TypeError):
        workspace_layout({"hidden": 512}, 1)


# ------------------------------------------------------------------------------------------------
# CPUWorkspace
# ------------------------------------------------------------------------------------------------
def fill_patterns_and_check(ws) -> None:
    """Write a distinct byte into every slot through its view; check each slot kept its own byte,
    padding stayed zero, views alias the allocation where the layout says. CPU or CUDA."""
    layout = ws.layout
    buf = ws.buffer
    assert buf.dtype == torch.uint8 and buf.numel() == ws.nbytes >= layout.nbytes
    assert int(buf.count_nonzero()) == 0, "a new workspace starts zeroed"
    expected = torch.zeros_like(buf)
    for i, s in enumerate(layout):
        v = ws.view(s.name)
        assert v.dtype == s.dtype and tuple(v.shape) == s.shape, s.name
        assert v.is_contiguous() and v.device == buf.device, s.name
        if s.nbytes:  # a zero-size tensor reports data_ptr 0
            assert v.data_ptr() == buf.data_ptr() + s.offset, s.name
        assert ws.view(s.name) is v, "views are cached"
        if s.nbytes:
            pattern = (i % 250) + 1
            v.view(torch.uint8).fill_(pattern)
            expected[s.offset:s.end] = pattern
    # Every slot kept its own pattern (no overlap) and padding between slots was never touched.
    assert torch.equal(buf, expected)
    for i, s in enumerate(layout):
        if s.nbytes:
            assert bool((ws.view(s.name).view(torch.uint8) == (i % 250) + 1).all()), s.name
    # Typed writes land where the layout says.
    idx = ws.view("topk_idx")
    ref = torch.arange(idx.numel(), dtype=torch.int32, device=buf.device)
    idx.copy_(ref.view(idx.shape))
    s = layout["topk_idx"]
    assert torch.equal(buf[s.offset:s.end].view(torch.int32), ref)
    assert set(ws.views()) == set(SLOT_NAMES)


@pytest.mark.parametrize("cfg,R", [(CONFIGS[0], 1), (CONFIGS[1], 2), (CONFIGS[2], 4),
                                   (CONFIGS[4], 8), (CONFIGS[6], 8), (CONFIGS[9], 2)])
def test_cpu_views_writable_and_disjoint(cfg, R):
    ws = CPUWorkspace(cfg, R)
    fill_patterns_and_check(ws)
    ws.destroy()
    ws.destroy()  # idempotent
    assert ws.is_destroyed
    with pytest.raises(RuntimeError, match="destroyed"):
        ws.view("x")


def test_cpu_workspace_larger_allocation_and_overlay():
    small, big = C(max_tokens_per_rank=4), C(max_tokens_per_rank=16, act_format="bf16")
    ws_big = CPUWorkspace(big, 2)
    ws_small = ws_big.with_config(small)
    assert ws_small.shares_allocation(ws_big) and ws_small.nbytes == ws_big.nbytes
    assert ws_small.layout == workspace_layout(small, 2)
    # Control slots alias across configs.
    ws_small.view("counters")[3] = 7
    assert int(ws_big.view("counters")[3]) == 7
    with pytest.raises(ValueError, match="requires"):
        CPUWorkspace(small, 2).with_config(big)
    ws_big.destroy()
    assert ws_small.is_destroyed
    assert CPUWorkspace(small, 2, nbytes=10_000_000).nbytes == 10_000_000


# ------------------------------------------------------------------------------------------------
# Sharing rules (the registry logic is backend-independent; "cpu" exercises it without a GPU)
# ------------------------------------------------------------------------------------------------
SMALL, BIG = C(max_tokens_per_rank=4), C(max_tokens_per_rank=32)


def test_registry_first_config_sizes_it():
    reg = WorkspaceRegistry("cpu")
    a = reg.get(BIG)
    assert a.nbytes == workspace_nbytes(BIG, 1)
    assert reg.get(BIG) is a
    b = reg.get(SMALL)
    assert b is reg.get(SMALL) and b.shares_allocation(a)
    assert b.layout == workspace_layout(SMALL, 1)
    assert b.buffer.data_ptr() == a.buffer.data_ptr()
    reg.destroy_all()
    assert a.is_destroyed and b.is_destroyed


def test_registry_too_small_error_gives_both_sizes():
    reg = WorkspaceRegistry("cpu")
    reg.get(SMALL)
    need, have = workspace_nbytes(BIG, 1), workspace_nbytes(SMALL, 1)
    with pytest.raises(ValueError) as ei:
        reg.get(BIG)
    assert str(need) in str(ei.value) and str(have) in str(ei.value)
    assert "reserve" in str(ei.value)
    with pytest.raises(ValueError, match=str(need)):
        reg.reserve([BIG])
    assert reg.reserve([SMALL]) == have  # fits: fine after creation
    reg.destroy()
    assert reg.get(BIG).nbytes == need  # re-created after destroy
    reg.destroy_all()


def test_registry_reserve_before_creation():
    reg = WorkspaceRegistry("cpu")
    assert reg.reserve([SMALL, BIG]) == workspace_nbytes(BIG, 1)
    s = reg.get(SMALL)
    assert s.nbytes == workspace_nbytes(BIG, 1)
    b = reg.get(BIG)
    assert b.shares_allocation(s)
    # A handle destroyed directly: the next get re-creates the allocation, still reserved.
    b.destroy()
    s2 = reg.get(SMALL)
    assert not s2.is_destroyed and s2.nbytes == workspace_nbytes(BIG, 1)
    assert reg.get(BIG).shares_allocation(s2)
    # destroy() forgets the reservation.
    reg.destroy()
    assert reg.get(SMALL).nbytes == workspace_nbytes(SMALL, 1)
    reg.destroy_all()


def test_module_level_sharing_functions_cpu():
    try:
        wsm.reserve([SMALL, BIG], backend="cpu")
        a = wsm.get_workspace(SMALL, backend="cpu")
        b = wsm.get_workspace(BIG, backend="cpu")
        assert isinstance(a, CPUWorkspace) and a.shares_allocation(b)
    finally:
        wsm.destroy_workspace(backend="cpu")
    assert a.is_destroyed
    with pytest.raises(ValueError):
        wsm.get_workspace(SMALL, backend="tpu")
    with pytest.raises(ValueError):
        WorkspaceRegistry("tpu")


def _registry_two_ranks(ctx):
    # Layouts are computed for the group's size; each rank owns its CPU allocation.
    reg = WorkspaceRegistry("cpu")
    ws = reg.get(SMALL, ctx.group)
    assert ws.num_ranks == 2 and ws.layout == workspace_layout(SMALL, 2)
    reg.destroy_all()
    uid = bootstrap.exchange_unique_id(ctx.group, ctx.rank, ctx.world_size, "gloo")
    return bytes(uid._data.tobytes())


def test_two_rank_gloo_uid_exchange_and_group_size():
    nvshmem = pytest.importorskip("nvshmem.core")
    try:
        nvshmem.get_unique_id()
    except Exception as e:  # no NVSHMEM host library on this machine
        pytest.skip(f"nvshmem get_unique_id unavailable: {e!r}")
    uids = parallel_launch(2, _registry_two_ranks, timeout=120)
    assert uids[0] == uids[1] and any(uids[0])


# ------------------------------------------------------------------------------------------------
# Bootstrap, CPU side
# ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error path")
def test_bootstrap_without_cuda_raises_clearly():
    before = os.environ.get("NVSHMEM_SYMMETRIC_SIZE")
    with pytest.raises(RuntimeError, match="CUDA"):
        bootstrap.ensure_initialized(None, symmetric_size=1 << 20)
    with pytest.raises(RuntimeError, match="CUDA"):
        SymmetricWorkspace(C(), None)
    with pytest.raises(RuntimeError, match="CUDA"):
        wsm.get_workspace(C())
    assert not bootstrap.is_initialized() and bootstrap.get_context() is None
    assert os.environ.get("NVSHMEM_SYMMETRIC_SIZE") == before
    bootstrap.finalize()  # no-op when not initialised


def test_required_heap_bytes():
    GiB, MiB = 1 << 30, 1 << 20
    assert bootstrap.required_heap_bytes(0) == GiB
    prev = 0
    for n in (0, 1, 500 * MiB, 768 * MiB, 769 * MiB, 2_607_564_544, 3 * GiB):
        h = bootstrap.required_heap_bytes(n)
        assert h % (512 * MiB) == 0 and h >= GiB
        assert h >= n + max(256 * MiB, n // 8)
        assert h >= prev
        prev = h
    with pytest.raises(ValueError):
        bootstrap.required_heap_bytes(-1)


@pytest.mark.parametrize("text,value", [("1073741824", 1 << 30), ("20m", 20971520), ("3.1M", 3250586),
                                        (".5m", 524288), ("2G", 2 << 30), ("20kk", 20480),
                                        ("1t", 1 << 40), ("abc", None), (None, None), ("", None)])
def test_parse_nvshmem_size(text, value):
    assert bootstrap.parse_nvshmem_size(text) == value


def test_group_must_span_world():
    bootstrap.validate_group_ranks((0, 1, 2, 3), 4)
    for ranks in [(0,), (0, 1), (1, 0, 2, 3), (0, 2)]:
        with pytest.raises(ValueError, match="WORLD"):
            bootstrap.validate_group_ranks(ranks, 4)


def test_cuda_core_device_import_path():
    pytest.importorskip("cuda")
    try:
        Device = bootstrap.import_cuda_core_device()
    except RuntimeError:
        pytest.skip("cuda-python's cuda.core is not installed")
    assert hasattr(Device, "set_current")


def test_shared_scratch_is_shared_by_key_and_freed_with_its_last_holder():
    import gc
    from mega_moe_layer.comm.workspace import shared_scratch
    a = shared_scratch("t_rebased_h", (6, 4), torch.float8_e4m3fn, "cpu")
    b = shared_scratch("t_rebased_h", (6, 4), torch.float8_e4m3fn, "cpu")
    assert a.data_ptr() == b.data_ptr() and a.shape == (6, 4) and a.dtype == torch.float8_e4m3fn
    for other in (shared_scratch("t_rebased_h", (6, 5), torch.float8_e4m3fn, "cpu"),
                  shared_scratch("t_rebased_x", (6, 4), torch.float8_e4m3fn, "cpu"),
                  shared_scratch("t_rebased_h", (6, 4), torch.int8, "cpu")):
        assert other.data_ptr() != a.data_ptr()
    from mega_moe_layer.comm import workspace as wsm
    key = ("t_rebased_h", (6, 4), torch.float8_e4m3fn, "cpu")
    assert key in wsm._SCRATCH
    del a, b
    gc.collect()
    assert key not in wsm._SCRATCH, "a buffer nobody holds is freed"
