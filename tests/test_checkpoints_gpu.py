"""The new transformers families and checkpoint-loaded experts on the GPU path (1 GPU, nvshmem).

    pytest -m gpu tests/test_checkpoints_gpu.py

One swapped-model test per family added with the checkpoint work (GLM-4.5, DeepSeek-V2, Qwen2-MoE,
OLMoE), same models, inputs and bounds as the CPU tests (the GPU GEMMs add float32
accumulation-order differences, <= 5e-3 rel-RMSE, far below them); and the DeepSeek-V3 FP8 and
gpt-oss MXFP4 checkpoints of `test_checkpoints.py` loaded onto the GPU layer, against the
reference on the same (dequantised) weights within the GEMM tolerance.
"""
import copy
import os

import pytest
import torch

WORLD_SIZE = int(os.environ.get("WORLD_SIZE", "1"))
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"),
              pytest.mark.skipif(WORLD_SIZE > 1, reason="1-GPU test")]

transformers = pytest.importorskip("transformers") if torch.cuda.is_available() else None

import mega_moe_layer as mml  # noqa: E402
from mega_moe_layer import checkpoints  # noqa: E402
from mega_moe_layer.comm import workspace as wsm  # noqa: E402
from mega_moe_layer.integrations import transformers as mtf  # noqa: E402
from test_checkpoints import (LAYER, _cfg, deepseek_fp8_experts, gpt_oss_experts,  # noqa: E402
                              reference_output, write_deepseek_fp8, write_gpt_oss)
from test_transformers_integration import BF16, bf16_vs_stock_bound, block_input, swap_script  # noqa: E402
from utils import TOLERANCES, assert_rel_rmse, init_gpu_process_group, make_inputs  # noqa: E402

NEW_FAMILIES = ("glm4_moe", "deepseek_v2", "qwen2_moe", "olmoe")


@pytest.fixture(scope="module")
def one_rank():
    init_gpu_process_group()
    yield
    wsm.destroy_all_workspaces()


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_new_family_on_gpu_matches_stock(one_rank, family):
    stock = swap_script.build_model(family, 0).cuda()
    model = copy.deepcopy(stock)
    wsm.destroy_all_workspaces()            # each family's config sizes its own workspace
    summary = mtf.replace_moe_blocks(model, cfg_overrides=dict(BF16, max_tokens_per_rank=256),
                                     backend="nvshmem")
    layer = summary["layers"]["model.layers.0.mlp"]
    assert layer.experts.backend == "nvshmem"
    bound = bf16_vs_stock_bound(family, layer.cfg.topk)
    x = block_input(256).cuda()
    for name in summary["replaced"]:
        with torch.no_grad():
            y_s, y_m = stock.get_submodule(name)(x), model.get_submodule(name)(x)
        err = assert_rel_rmse(y_m, y_s, bound, f"{family} {name} (GPU) vs stock")
        print(f"\n[checkpoints-gpu] {family} {name}: rel-RMSE {err:.2e} (bound {bound:.2e})")
    with torch.no_grad():                   # the whole model runs (attention + swapped blocks)
        model(torch.randint(3, 1000, (2, 6), device="cuda"))


@pytest.mark.parametrize("layout", ["deepseek_fp8", "gpt_oss_mxfp4"])
def test_checkpoint_experts_on_gpu(one_rank, tmp_path, layout):
    if layout == "deepseek_fp8":
        fmt, (q13, q2) = "fp8", deepseek_fp8_experts()
        path = write_deepseek_fp8(str(tmp_path / "ck"), q13, q2)
    else:
        fmt, (q13, q2) = "mxfp4", gpt_oss_experts()
        path = write_gpt_oss(str(tmp_path / "ck"), q13, q2)
    cfg = _cfg(fmt)
    wsm.destroy_all_workspaces()
    m = mml.MegaMoEExperts(cfg, backend="nvshmem")
    checkpoints.load_experts(m, path, LAYER)
    # The loaded copy stays on the device only where the GEMMs read it (not on the FP8 mainloop,
    # whose operands hold what they read: the device holds the experts once).
    assert m.w13.data.is_cuda == m._backend.needs_loaded_weights
    assert torch.equal(m.w13.data.cpu().view(torch.uint8), q13.data.view(torch.uint8))
    x, idx, w = make_inputs(cfg, 40, seed=7)
    y = m(x.cuda(), idx.cuda(), w.cuda())
    y_ref = reference_output(cfg, q13, q2, (x, idx, w))
    # DeepSeek's FP8 experts take the streamed FP8 mainloop by default on Hopper ("fp8_block": its
    # block scales are not powers of two), which has its own tolerance entry.
    key = "gemm_fp8_mainloop_rel_rmse" if getattr(m._backend, "streamed", False) else "gemm_rel_rmse"
    err = assert_rel_rmse(y.cpu(), y_ref, TOLERANCES[key], f"{layout} (GPU) vs reference")
    print(f"\n[checkpoints-gpu] {layout}: rel-RMSE {err:.2e}")
