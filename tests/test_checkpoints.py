"""`mega_moe_layer.checkpoints` + `MegaMoEExperts.load_quantized_weights` (CPU, CI).

Tiny checkpoints are written here in the layouts found in the wild: DeepSeek-V3 FP8 (per-expert
`weight` + `weight_scale_inv`, sharded with an index json), gpt-oss MXFP4 (fused, interleaved
gate/up rows, with biases), Qwen3-MoE bf16 (one file, no index). What is read must be the bytes
written, bitwise, and the layer built from them must compute what `load_weights` computes on the
dequantised weights.
"""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import mega_moe_layer as mml
from mega_moe_layer import checkpoints
from mega_moe_layer.formats import QuantizedWeight
from mega_moe_layer.kernels import reference as ref
from utils import assert_bitwise, assert_rel_rmse, make_inputs, make_weights, parallel_launch

E, H, I, K = 8, 256, 128, 3
LAYER = 3
DS = f"model.layers.{LAYER}.mlp.experts"


def _cfg(fmt, **kw):
    return mml.MegaMoEConfig(hidden=H, intermediate=I, num_experts=E, topk=K, max_tokens_per_rank=64,
                             weight_format=fmt, act_format="bf16", **kw)


# ------------------------------------------------------------------------------ checkpoint writers
def deepseek_fp8_experts(seed=0, pow2=False):
    """(gate, up, down) fp8 QuantizedWeights the way DeepSeek-V3 quantises: scale_inv = amax / 448
    per 128 x 128 block (not a power of two), or this package's power-of-two scales."""
    cfg = _cfg("bf16")
    w13, w2 = make_weights(cfg, seed)
    if pow2:
        q13, q2 = mml.quantize_weight(w13, "fp8"), mml.quantize_weight(w2, "fp8")
    else:
        q13, q2 = (_ds_quant(w) for w in (w13, w2))
    return q13, q2


def _ds_quant(w):
    Ex, N, Kx = w.shape
    blocks = w.float().reshape(Ex, N // 128, 128, Kx // 128, 128)
    s = blocks.abs().amax(dim=(2, 4)) / 448.0
    q = (blocks / s[:, :, None, :, None]).reshape(Ex, N, Kx).to(torch.float8_e4m3fn)
    return QuantizedWeight.fp8(q, s.float())


def write_deepseek_fp8(path, q13, q2, num_files=2):
    """Per-expert DeepSeek-V3 names over `num_files` shards + model.safetensors.index.json."""
    os.makedirs(path, exist_ok=True)
    shards = [{} for _ in range(num_files)]
    for e in range(E):
        d = shards[e * num_files // E]
        for proj, data, scale in (("gate_proj", q13.data[e, :I], q13.scale[e, :I // 128]),
                                  ("up_proj", q13.data[e, I:], q13.scale[e, I // 128:]),
                                  ("down_proj", q2.data[e], q2.scale[e])):
            d[f"{DS}.{e}.{proj}.weight"] = data.contiguous()
            d[f"{DS}.{e}.{proj}.weight_scale_inv"] = scale.contiguous()
    d = shards[0]
    d[f"model.layers.{LAYER}.mlp.gate.weight"] = torch.zeros(E, H, dtype=torch.bfloat16)
    weight_map = {}
    for i, d in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{num_files:05d}.safetensors"
        save_file(d, os.path.join(path, fname))
        weight_map.update({n: fname for n in d})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return path


def gpt_oss_experts(seed=0):
    """Random MXFP4 experts in this package's layout: every nibble code (incl. -0), scales near 127."""
    g = torch.Generator().manual_seed(seed)
    b13 = torch.randint(0, 256, (E, 2 * I, H // 2), generator=g, dtype=torch.uint8)
    s13 = torch.randint(118, 125, (E, 2 * I, H // 32), generator=g, dtype=torch.uint8)
    b2 = torch.randint(0, 256, (E, H, I // 2), generator=g, dtype=torch.uint8)
    s2 = torch.randint(118, 125, (E, H, I // 32), generator=g, dtype=torch.uint8)
    return QuantizedWeight.mxfp4(b13, s13), QuantizedWeight.mxfp4(b2, s2)


def interleave_rows(t):
    """gate rows then up rows -> gpt-oss's g0, u0, g1, u1, ... along dim 1."""
    return torch.stack([t[:, :I], t[:, I:]], dim=2).flatten(1, 2)


def write_gpt_oss(path, q13, q2):
    os.makedirs(path, exist_ok=True)
    p = f"model.layers.{LAYER}.mlp.experts"
    d = {f"{p}.gate_up_proj_blocks": interleave_rows(q13.data.view(torch.uint8)).reshape(E, 2 * I, H // 32, 16).contiguous(),
         f"{p}.gate_up_proj_scales": interleave_rows(q13.scale).contiguous(),
         f"{p}.gate_up_proj_bias": torch.zeros(E, 2 * I, dtype=torch.bfloat16),
         f"{p}.down_proj_blocks": q2.data.view(torch.uint8).reshape(E, H, I // 32, 16).contiguous(),
         f"{p}.down_proj_scales": q2.scale.contiguous(),
         f"{p}.down_proj_bias": torch.zeros(E, H, dtype=torch.bfloat16),
         f"model.layers.{LAYER}.mlp.router.weight": torch.zeros(E, H, dtype=torch.bfloat16)}
    save_file(d, os.path.join(path, "model.safetensors"))
    return path


def write_qwen3_bf16(path, w13, w2):
    os.makedirs(path, exist_ok=True)
    d = {}
    for e in range(E):
        d[f"{DS}.{e}.gate_proj.weight"] = w13[e, :I].contiguous()
        d[f"{DS}.{e}.up_proj.weight"] = w13[e, I:].contiguous()
        d[f"{DS}.{e}.down_proj.weight"] = w2[e].contiguous()
    save_file(d, os.path.join(path, "model.safetensors"))
    return path


def layer_output(m, seed=7, T=40):
    x, idx, w = make_inputs(m.cfg, T, seed=seed)
    return m(x, idx, w), (x, idx, w)


def reference_output(cfg, q13, q2, inputs):
    return ref.moe_reference(*inputs, q13.dequantize(), q2.dequantize(), act_format=cfg.act_format,
                             combine_format=cfg.combine_format, act_group_size=cfg.act_group_size)


# ------------------------------------------------------------------------------------- DeepSeek FP8
@pytest.mark.parametrize("pow2", [False, True])
def test_deepseek_fp8_loaded_exactly(tmp_path, pow2):
    q13, q2 = deepseek_fp8_experts(pow2=pow2)
    path = write_deepseek_fp8(str(tmp_path / "ds"), q13, q2)
    ck = checkpoints.read_experts(path, LAYER)                       # family auto-detected
    assert (ck.layout, ck.format, ck.first_expert, ck.num_experts) == ("per_expert", "fp8", 0, E)
    assert ck.not_loaded == ()
    assert_bitwise(ck.w13.data, q13.data, "w13 fp8 bytes")
    assert_bitwise(ck.w13.scale, q13.scale, "w13 scale_inv")
    assert_bitwise(ck.w2.data, q2.data, "w2 fp8 bytes")
    assert_bitwise(ck.w2.scale, q2.scale, "w2 scale_inv")

    cfg = _cfg("fp8")
    m = mml.MegaMoEExperts(cfg)
    checkpoints.load_experts(m, path, LAYER, family="deepseek_v3")
    assert_bitwise(m.w13.data, q13.data, "installed w13")
    y, inputs = layer_output(m)
    # The layer computes on the exactly dequantised checkpoint weights: bitwise the reference.
    assert_bitwise(y, reference_output(cfg, q13, q2, inputs), "layer vs reference on the checkpoint")
    # load_weights on the dequantised weights (rounded to bf16) requantises with power-of-two
    # scales: the same bytes (so bitwise the same layer) exactly when the checkpoint's scales are
    # powers of two; DeepSeek's amax/448 scales give other bytes, within the FP8 weight bound.
    b = mml.MegaMoEExperts(cfg)
    b.load_weights(q13.dequantize(dtype=torch.bfloat16), q2.dequantize(dtype=torch.bfloat16))
    y_b = b(*inputs)
    if pow2:
        assert_bitwise(b.w13.data, q13.data, "requantised bytes")
        assert_bitwise(y, y_b, "layer vs load_weights(dequantised)")
    else:
        assert_rel_rmse(y, y_b, ref.quantisation_error_bound("fp8", "bf16", "bf16"), "vs load_weights")


# ----------------------------------------------------------------------------------- gpt-oss MXFP4
def test_gpt_oss_mxfp4_loaded_exactly(tmp_path):
    q13, q2 = gpt_oss_experts()
    path = write_gpt_oss(str(tmp_path / "oss"), q13, q2)
    ck = checkpoints.read_experts(path, LAYER)
    assert (ck.layout, ck.format, ck.num_experts) == ("gpt_oss", "mxfp4", E)
    assert ck.not_loaded == (f"{DS}.down_proj_bias", f"{DS}.gate_up_proj_bias")
    assert_bitwise(ck.w13.data, q13.data, "w13 packed E2M1 (de-interleaved)")
    assert_bitwise(ck.w13.scale, q13.scale, "w13 UE8M0")
    assert_bitwise(ck.w2.data, q2.data, "w2 packed E2M1")
    assert_bitwise(ck.w2.scale, q2.scale, "w2 UE8M0")

    cfg = _cfg("mxfp4")
    m = mml.MegaMoEExperts(cfg)
    checkpoints.load_experts(m, path, LAYER, family="gpt_oss")
    y, inputs = layer_output(m)
    assert_bitwise(y, reference_output(cfg, q13, q2, inputs), "layer vs reference")
    # MXFP4 values are exact in bf16 and requantise to the same values (a block whose largest
    # code is below 6 gets a smaller scale, same values), so load_weights gives the same layer.
    b = mml.MegaMoEExperts(cfg)
    b.load_weights(q13.dequantize(dtype=torch.bfloat16), q2.dequantize(dtype=torch.bfloat16))
    # Equal values; not bitwise: the checkpoint's E2M1 code 8 is -0, which this package's
    # quantiser writes as +0 (DESIGN: the sign only when the code is non-zero).
    assert torch.equal(b._backend._w13_f32, m._backend._w13_f32) and torch.equal(b._backend._w2_f32, m._backend._w2_f32)
    assert_bitwise(b(*inputs), y, "layer vs load_weights(dequantised)")


def test_gpt_oss_nibble_order_and_rows_match_transformers(tmp_path):
    """Independent check against transformers' own gpt-oss MXFP4 decoder: its dequantised
    `gate_up_proj` [E, H, 2I] (x @ it, gate = [..., ::2]) must equal ours, transposed and
    de-interleaved. And one hand-made byte: 0x21 is element 0 = code 1 (0.5), element 1 = code 2 (1.0)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    q13, q2 = gpt_oss_experts(seed=3)
    data = q13.data.clone()
    data[0, 0, 0] = 0x21
    scale = q13.scale.clone()
    scale[0, 0, 0] = 127
    q13 = QuantizedWeight.mxfp4(data, scale)
    path = write_gpt_oss(str(tmp_path / "oss"), q13, q2)
    ck = checkpoints.read_experts(path, LAYER, family="gpt_oss")
    ours = ck.w13.dequantize()
    assert ours[0, 0, :2].tolist() == [0.5, 1.0]
    p = f"model.layers.{LAYER}.mlp.experts"
    from safetensors import safe_open
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        theirs = convert_moe_packed_tensors(f.get_tensor(f"{p}.gate_up_proj_blocks"),
                                            f.get_tensor(f"{p}.gate_up_proj_scales"), dtype=torch.float32)
        theirs_down = convert_moe_packed_tensors(f.get_tensor(f"{p}.down_proj_blocks"),
                                                 f.get_tensor(f"{p}.down_proj_scales"), dtype=torch.float32)
    theirs = theirs.transpose(1, 2)                                   # [E, 2I, H], rows interleaved
    assert_bitwise(ours, torch.cat([theirs[:, 0::2], theirs[:, 1::2]], dim=1), "w13 vs transformers")
    assert_bitwise(ck.w2.dequantize(), theirs_down.transpose(1, 2).contiguous(), "w2 vs transformers")


# ------------------------------------------------------------------------------------- Qwen3 bf16
def test_qwen3_bf16_and_explicit_conversion(tmp_path):
    cfg = _cfg("bf16")
    w13, w2 = make_weights(cfg, seed=2)
    path = write_qwen3_bf16(str(tmp_path / "qwen"), w13, w2)         # one file, no index
    ck = checkpoints.read_experts(path, LAYER, family="qwen3_moe", num_experts=E, hidden=H, intermediate=I)
    assert ck.format == "bf16"
    assert_bitwise(ck.w13.data, w13, "w13 bf16")
    assert_bitwise(ck.w2.data, w2, "w2 bf16")
    m = mml.MegaMoEExperts(cfg)
    checkpoints.load_experts(m, path, LAYER)
    b = mml.MegaMoEExperts(cfg)
    b.load_weights(w13, w2)
    y, inputs = layer_output(m)
    assert_bitwise(y, b(*inputs), "bf16 checkpoint vs load_weights")

    # Another format only on request; bf16 -> mxfp4 then equals load_weights exactly.
    cfg4 = _cfg("mxfp4")
    m4 = mml.MegaMoEExperts(cfg4)
    with pytest.raises(ValueError, match=r"w13: format 'bf16' differs from cfg.weight_format='mxfp4'"):
        checkpoints.load_experts(m4, path, LAYER)
    checkpoints.load_experts(m4, path, LAYER, convert=True)
    b4 = mml.MegaMoEExperts(cfg4)
    b4.load_weights(w13, w2)
    assert_bitwise(m4.w13.data, b4.w13.data, "converted bytes")
    assert_bitwise(m4(*inputs), b4(*inputs), "converted layer vs load_weights")


# -------------------------------------------------------------------------- only this rank's experts
def test_other_ranks_experts_are_never_read(tmp_path):
    """Experts 4..7 live in the second shard, which is cut short: rank 0 of 2 loads, rank 1 gets
    an error naming its first tensor."""
    q13, q2 = deepseek_fp8_experts()
    path = write_deepseek_fp8(str(tmp_path / "ds"), q13, q2, num_files=2)
    shard = os.path.join(path, "model-00002-of-00002.safetensors")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 100)
    ck = checkpoints.read_experts(path, LAYER, rank=0, num_ranks=2)
    assert ck.w13.shape == (E // 2, 2 * I, H) and ck.first_expert == 0
    assert_bitwise(ck.w13.data, q13.data[:E // 2], "rank 0 bytes")
    with pytest.raises(ValueError, match=r"model-00002-of-00002.safetensors is truncated .*tensor 'model\.layers\.3\.mlp\.experts\.4\.gate_proj\.weight'"):
        checkpoints.read_experts(path, LAYER, rank=1, num_ranks=2)


def _two_rank_worker(ctx, paths):
    out = []
    for fmt, path, (q13, q2) in paths:
        cfg = _cfg(fmt)
        m = mml.MegaMoEExperts(cfg, group=ctx.group)
        ck = checkpoints.load_experts(m, path, LAYER)
        El = E // ctx.world_size
        assert ck.first_expert == ctx.rank * El and m.w13.shape[0] == El
        assert_bitwise(m.w13.data, q13.data[ctx.rank * El:(ctx.rank + 1) * El], f"rank {ctx.rank} {fmt} w13")
        assert_bitwise(m.w2.scale, q2.scale[ctx.rank * El:(ctx.rank + 1) * El], f"rank {ctx.rank} {fmt} w2 sf")
        x, idx, w = make_inputs(cfg, 5 + 7 * ctx.rank, seed=11 + ctx.rank)
        assert_bitwise(m(x, idx, w), reference_output(cfg, q13, q2, (x, idx, w)), f"rank {ctx.rank} {fmt}")
        out.append(ck.first_expert)
    return out


def test_two_ranks_load_their_experts(tmp_path):
    ds = deepseek_fp8_experts()
    oss = gpt_oss_experts()
    paths = [("fp8", write_deepseek_fp8(str(tmp_path / "ds"), *ds), ds),
             ("mxfp4", write_gpt_oss(str(tmp_path / "oss"), *oss), oss)]
    assert parallel_launch(2, _two_rank_worker, paths, timeout=120) == [[0, 0], [4, 4]]


# ----------------------------------------------------------------------------------------- bad files
def _rewrite(path, fname, edit):
    from safetensors.torch import load_file
    f = os.path.join(path, fname)
    d = load_file(f)
    edit(d)
    save_file(d, f)


@pytest.mark.parametrize("fault", ["missing", "shape", "dtype", "scale_dtype", "truncated"])
def test_bad_checkpoint_names_the_tensor(tmp_path, fault):
    q13, q2 = deepseek_fp8_experts()
    path = write_deepseek_fp8(str(tmp_path / "ds"), q13, q2, num_files=1)
    fname = "model-00001-of-00001.safetensors"
    name = f"{DS}.5.up_proj.weight"
    if fault == "missing":
        _rewrite(path, fname, lambda d: d.pop(name))
        err, pat = ValueError, rf"tensor '{name}' not found"
    elif fault == "shape":
        _rewrite(path, fname, lambda d: d.__setitem__(name, d[name][:64].contiguous()))
        err, pat = ValueError, rf"tensor '{name}' has shape \[64, 256\], expected \[128, 256\]"
    elif fault == "dtype":
        _rewrite(path, fname, lambda d: d.__setitem__(name, d[name].to(torch.bfloat16)))
        err, pat = TypeError, rf"tensor '{name}' has dtype BF16"
    elif fault == "scale_dtype":
        name = f"{DS}.6.down_proj.weight_scale_inv"
        _rewrite(path, fname, lambda d: d.__setitem__(name, d[name].to(torch.bfloat16)))
        err, pat = TypeError, rf"tensor '{name}' has dtype BF16 \(torch.bfloat16\), expected torch.float32"
    else:
        f = os.path.join(path, fname)
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) - 10)
        err, pat = ValueError, rf"is truncated .*tensor '{DS}.4.gate_proj.weight'"
    if fault == "missing":   # the index still lists it: drop it there too, as a real writer would
        with open(os.path.join(path, "model.safetensors.index.json")) as fh:
            idx = json.load(fh)
        idx["weight_map"].pop(name)
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
            json.dump(idx, fh)
    with pytest.raises(err, match=pat):
        checkpoints.read_experts(path, LAYER, rank=1, num_ranks=2)


def test_bad_checkpoint_sizes_and_family(tmp_path):
    q13, q2 = gpt_oss_experts()
    path = write_gpt_oss(str(tmp_path / "oss"), q13, q2)
    with pytest.raises(ValueError, match="has hidden=256, expected 512"):
        checkpoints.read_experts(path, LAYER, hidden=512)
    with pytest.raises(ValueError, match="not divisible by num_ranks=3"):
        checkpoints.read_experts(path, LAYER, num_ranks=3)
    with pytest.raises(ValueError, match="no routed experts of layer 0"):
        checkpoints.read_experts(path, 0)
    with pytest.raises(ValueError, match="family: expected"):
        checkpoints.read_experts(path, LAYER, family="llama")
    with pytest.raises(ValueError, match="no \\*.safetensors files"):
        checkpoints.read_experts(str(tmp_path), LAYER)


# ------------------------------------------------------------------- load_quantized_weights checks
def test_load_quantized_weights_validation():
    cfg = _cfg("fp8")
    q13, q2 = deepseek_fp8_experts()
    m = mml.MegaMoEExperts(cfg)
    with pytest.raises(TypeError, match="w13: expected a QuantizedWeight, got Tensor"):
        m.load_quantized_weights(q13.data, q2)
    with pytest.raises(ValueError, match=r"w2: expected logical shape \[8 or 8, 256, 128\]"):
        m.load_quantized_weights(q13, q13)
    with pytest.raises(ValueError, match=r"w13: expected logical shape \[8 or 8, 256, 256\], got \(4, 256, 256\)"):
        m.load_quantized_weights(q13.narrow_experts(0, 4), q2)
    bad_scale = QuantizedWeight("fp8", q13.data, q13.scale[:, :1], q13.shape)
    with pytest.raises(ValueError, match=r"w13.scale: expected shape \(8, 2, 2\)"):
        m.load_quantized_weights(bad_scale, q2)
    bad_dtype = QuantizedWeight("fp8", q13.data.view(torch.uint8), q13.scale, q13.shape)
    with pytest.raises(TypeError, match="w13.data: expected torch.float8_e4m3fn for fp8, got torch.uint8"):
        m.load_quantized_weights(bad_dtype, q2)
    bad_sdtype = QuantizedWeight("fp8", q13.data, q13.scale.double(), q13.shape)
    with pytest.raises(TypeError, match="w13.scale: expected torch.float32"):
        m.load_quantized_weights(bad_sdtype, q2)
    bad_dev = QuantizedWeight("fp8", q13.data, torch.empty(q13.scale.shape, device="meta"), q13.shape)
    with pytest.raises(ValueError, match="w13: data on cpu but scale on meta"):
        m.load_quantized_weights(bad_dev, q2)
    with pytest.raises(ValueError, match="w2: format 'mxfp4' differs"):
        m.load_quantized_weights(q13, gpt_oss_experts()[1])
    with pytest.raises(ValueError, match="16 bytes per block"):
        QuantizedWeight.mxfp4(torch.zeros(2, 4, 8, 8, dtype=torch.uint8), torch.zeros(2, 4, 8, dtype=torch.uint8))
    # Local-only experts (E_local == E on one rank) and FP8 -> bf16 on request (lossy: one rounding).
    mb = mml.MegaMoEExperts(_cfg("bf16"))
    mb.load_quantized_weights(q13, q2, convert=True)
    assert_bitwise(mb.w13.data, q13.dequantize(dtype=torch.bfloat16), "fp8 -> bf16")
