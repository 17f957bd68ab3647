"""MegaMoEConfig validation and the weight formats."""
import pytest
import torch

import mega_moe_layer as mml
from mega_moe_layer.kernels import reference as ref

BASE = dict(hidden=512, intermediate=256, num_experts=8, topk=2)


@pytest.mark.parametrize("field,value", [
    ("hidden", 0), ("hidden", 200), ("intermediate", 100), ("num_experts", -1), ("topk", 9),
    ("max_tokens_per_rank", 0), ("weight_format", "int4"), ("act_format", "fp6"),
    ("combine_format", "fp16"), ("act_group_size", 64), ("activation_clamp", -1.0),
    ("spin_timeout_s", 0),
])
def test_config_rejects(field, value):
    with pytest.raises(ValueError, match=f"MegaMoEConfig.{field}"):
        mml.MegaMoEConfig(**{**BASE, field: value})


def test_config_group_and_combine_divisibility():
    with pytest.raises(ValueError, match="hidden"):
        mml.MegaMoEConfig(**{**BASE, "hidden": 384, "act_group_size": 128})   # 384 % 512
    # The FP8 combine needs only a multiple of 128 (one scale byte per 128 columns).
    assert mml.MegaMoEConfig(**{**BASE, "hidden": 384, "combine_format": "fp8"}).hidden == 384
    cfg = mml.MegaMoEConfig(**BASE)
    assert cfg.num_local_experts(4) == 2
    with pytest.raises(ValueError, match="num_experts"):
        cfg.num_local_experts(3)
    with pytest.raises(Exception):
        cfg.hidden = 1024                                       # frozen


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "mxfp4"])
def test_weight_round_trip(fmt):
    w = (torch.randn(3, 256, 384) * 0.02).bfloat16()
    qw = mml.quantize_weight(w, fmt)
    d = qw.dequantize()
    assert d.shape == w.shape and d.dtype == torch.float32
    # Dequantised values lie on the format's grid: quantising them again changes no value.
    assert torch.equal(mml.quantize_weight(d, fmt).dequantize(), d)
    err = float((d - w.float()).norm() / w.float().norm())
    assert err <= {"bf16": 0.0, "fp8": 2 ** -4, "mxfp4": 2 ** -2}[fmt]
    if fmt == "mxfp4":
        assert qw.data.shape == (3, 256, 192) and qw.scale.shape == (3, 256, 12)
        assert qw.scale.dtype == torch.uint8 and int(qw.scale.min()) >= 1
    if fmt == "fp8":
        assert qw.scale.shape == (3, 2, 3) and qw.data.dtype == torch.float8_e4m3fn
        # power-of-two block scales: dequantisation is exact
        m, _ = torch.frexp(qw.scale)
        assert bool((m == 0.5).all())


def test_mxfp4_matches_activation_codec():
    """An MXFP4 weight row is exactly the FP4 activation codec applied per 32 along K."""
    w = torch.randn(1, 4, 256).bfloat16()
    qw = mml.quantize_weight(w, "mxfp4")
    packed, sf = ref.per_token_cast_to_fp4(w[0], 32)
    assert torch.equal(qw.data[0], packed)
    assert torch.equal(ref.pack_ue8m0(qw.scale[0].to(torch.int32)), sf)


def test_weight_bad_input():
    with pytest.raises(ValueError, match="w"):
        mml.quantize_weight(torch.zeros(4, 4), "bf16")
    with pytest.raises(ValueError, match="weight_format"):
        mml.quantize_weight(torch.zeros(1, 4, 32), "int8")
    with pytest.raises(ValueError, match="multiple of 32"):
        mml.quantize_weight(torch.zeros(1, 4, 48), "mxfp4")


def test_hopper_fp8_mainloop_auto_resolution():
    """None (default): the streamed FP8 mainloop for FP8 weights and for MXFP4 expanded to E4M3 at
    load; MXFP4 kept at 4 bits keeps the bf16 mainloop; an explicit bool wins; anything else is
    rejected naming the field."""
    base = dict(hidden=256, intermediate=128, num_experts=4, topk=2, max_tokens_per_rank=8)
    assert mml.MegaMoEConfig(**base, weight_format="fp8").fp8_mainloop is True
    assert mml.MegaMoEConfig(**base, weight_format="mxfp4").fp8_mainloop is True
    assert mml.MegaMoEConfig(**base, weight_format="mxfp4", hopper_fp8_mainloop=False).fp8_mainloop is False
    assert mml.MegaMoEConfig(**base, weight_format="bf16").fp8_mainloop is False
    assert mml.MegaMoEConfig(**base, weight_format="mxfp4", hopper_fp4_as_fp8=True).fp8_mainloop is True
    assert mml.MegaMoEConfig(**base, weight_format="fp8", hopper_fp8_mainloop=False).fp8_mainloop is False
    assert mml.MegaMoEConfig(**base, weight_format="mxfp4", hopper_fp8_mainloop=True).fp8_mainloop is True
    with pytest.raises(ValueError, match="hopper_fp8_mainloop"):
        mml.MegaMoEConfig(**base, hopper_fp8_mainloop=1)
    with pytest.raises(ValueError, match="hopper_fp4_as_fp8"):
        mml.MegaMoEConfig(**base, hopper_fp4_as_fp8="yes")
