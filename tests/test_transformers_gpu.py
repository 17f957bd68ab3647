"""Swapped transformers MoE blocks on the GPU path (`backend="nvshmem"`, 1 GPU) vs the stock blocks.

    pytest -m gpu tests/test_transformers_gpu.py

Same models, inputs and bounds as the CPU test (`test_transformers_integration.py`); only the
backend differs, so the bounds carry over (the GPU GEMMs add float32 accumulation-order
differences, <= 5e-3 rel-RMSE, far below them).
"""
import copy
import math

import pytest
import torch
import torch.distributed as dist

import os  # noqa: E402

WORLD_SIZE = int(os.environ.get("WORLD_SIZE", "1"))
_no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
gpu = [pytest.mark.gpu, _no_cuda, pytest.mark.skipif(WORLD_SIZE > 1, reason="1-GPU test")]
multigpu = [pytest.mark.multigpu, _no_cuda, pytest.mark.skipif(WORLD_SIZE < 2, reason="needs torchrun")]


def _marks(marks):
    def deco(fn):
        for m in marks:
            fn = m(fn)
        return fn
    return deco

transformers = pytest.importorskip("transformers") if torch.cuda.is_available() else None

from mega_moe_layer.comm import workspace as wsm  # noqa: E402
from mega_moe_layer.integrations import transformers as mtf  # noqa: E402
from mega_moe_layer.kernels import reference as ref  # noqa: E402
from test_transformers_integration import (BF16, FAMILIES, bf16_vs_stock_bound, block_input,  # noqa: E402
                                           swap_script)
from utils import assert_rel_rmse, init_gpu_process_group  # noqa: E402


@pytest.fixture(scope="module")
def one_rank():
    init_gpu_process_group()
    yield
    wsm.destroy_all_workspaces()


@_marks(gpu)
@pytest.mark.parametrize("fmt_name", ["bf16", "mxfp4_fp8"])
@pytest.mark.parametrize("family", FAMILIES)
def test_block_on_gpu_matches_stock(one_rank, family, fmt_name):
    fmt = dict(BF16) if fmt_name == "bf16" else dict(weight_format="mxfp4", act_format="fp8",
                                                     combine_format="bf16")
    fmt["max_tokens_per_rank"] = 256
    stock = swap_script.build_model(family, 0).cuda()
    model = copy.deepcopy(stock)
    wsm.destroy_all_workspaces()            # each family's config sizes its own workspace
    summary = mtf.replace_moe_blocks(model, cfg_overrides=fmt, backend="nvshmem")
    layer = summary["layers"]["model.layers.0.mlp"]
    assert layer.experts.backend == "nvshmem"
    bound = bf16_vs_stock_bound(family, layer.cfg.topk)
    if fmt_name != "bf16":
        bound = math.hypot(ref.quantisation_error_bound("mxfp4", "fp8", "bf16"), bound)
    x = block_input(256).cuda()
    for name in summary["replaced"]:
        with torch.no_grad():
            y_s = stock.get_submodule(name)(x)
            y_m = model.get_submodule(name)(x)
        y_s = y_s[0] if isinstance(y_s, tuple) else y_s
        y_m = y_m[0] if isinstance(y_m, tuple) else y_m
        err = assert_rel_rmse(y_m, y_s, bound, f"{family} {name} {fmt_name} (GPU) vs stock")
        print(f"\n[transformers-gpu] {family} {name} {fmt_name}: rel-RMSE {err:.2e} (bound {bound:.2e})")
    counts = mtf.expert_counts(model)
    assert all(c.dtype == torch.int32 and c.is_cuda for c in counts.values())
    assert sum(int(c.sum()) for c in counts.values()) == len(summary["replaced"]) * 256 * layer.cfg.topk


@_marks(multigpu)
@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_expert_parallel_with_idle_rank(one_rank, family):
    """Every rank swaps the same model with group=WORLD (E_local = E / R); the last rank is idle
    ([1, 0, H]); the busy ranks' outputs match the stock block within the bf16 bound."""
    rank, R = dist.get_rank(), dist.get_world_size()
    fmt = dict(BF16, max_tokens_per_rank=256)
    stock = swap_script.build_model(family, 0).cuda()
    model = copy.deepcopy(stock)
    wsm.destroy_all_workspaces()
    summary = mtf.replace_moe_blocks(model, cfg_overrides=fmt, group=dist.group.WORLD, backend="nvshmem")
    layer = summary["layers"]["model.layers.0.mlp"]
    assert layer.experts.num_local_experts == layer.cfg.num_experts // R
    idle = rank == R - 1
    x = (torch.empty(1, 0, 256, dtype=torch.bfloat16) if idle else block_input(256, seed=5 + rank)).cuda()
    bound = bf16_vs_stock_bound(family, layer.cfg.topk)
    for name in summary["replaced"]:
        with torch.no_grad():
            y_m = model.get_submodule(name)(x)
            y_m = y_m[0] if isinstance(y_m, tuple) else y_m
            assert y_m.shape == x.shape
            if not idle:
                y_s = stock.get_submodule(name)(x)
                y_s = y_s[0] if isinstance(y_s, tuple) else y_s
                err = assert_rel_rmse(y_m, y_s, bound, f"rank {rank} {family} {name} (EP{R}) vs stock")
                print(f"\n[transformers-ep{R}] rank {rank} {family} {name}: rel-RMSE {err:.2e} "
                      f"(bound {bound:.2e})")
    total = torch.stack([c.to(torch.int64) for c in mtf.expert_counts(model).values()])
    dist.all_reduce(total)
    assert total.sum(dim=1).tolist() == [(R - 1) * 256 * layer.cfg.topk] * len(summary["replaced"])
