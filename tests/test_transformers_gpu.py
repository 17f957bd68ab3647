"""Swapped transformers MoE blocks on the GPU path (`backend="nvshmem"`, 1 GPU) vs the stock blocks.

    pytest -m gpu tests/test_transformers_gpu.py

Same models, inputs and bounds as the CPU test (`test_transformers_integration.py`); only the
backend differs, so the bounds carry over (the GPU GEMMs add float32 accumulation-order
differences, <= 5e-3 rel-RMSE, far below them).
"""
import copy
import math
import socket

import pytest
import torch
import torch.distributed as dist

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]

transformers = pytest.importorskip("transformers") if torch.cuda.is_available() else None

from mega_moe_layer.comm import workspace as wsm  # noqa: E402
from mega_moe_layer.integrations import transformers as mtf  # noqa: E402
from mega_moe_layer.kernels import reference as ref  # noqa: E402
from test_transformers_integration import (BF16, FAMILIES, bf16_vs_stock_bound, block_input,  # noqa: E402
                                           swap_script)
from utils import assert_rel_rmse  # noqa: E402


@pytest.fixture(scope="module")
def one_rank():
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.cuda.set_device(0)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    wsm.destroy_all_workspaces()


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
