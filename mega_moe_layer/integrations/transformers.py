"""Swap the sparse-MoE blocks of a Hugging Face transformers model for `MegaMoE`.

    from mega_moe_layer.integrations.transformers import replace_moe_blocks, expert_counts
    summary = replace_moe_blocks(model, cfg_overrides={"weight_format": "mxfp4"}, group=None)
    model.generate(...)
    expert_counts(model)     # {layer name: int32 [E_local]} of the last call, on the layer's device

Blocks are found by class name (`SUPPORTED_BLOCKS`); nothing here imports `transformers`, so the
adapter works with whatever version built the model. Both layouts of the experts are read:

- fused 3-D parameters (transformers >= 5): `experts.gate_up_proj` [E, 2I, H] (gate rows then up
  rows; `is_transposed` / interleaved `is_concatenated=False` variants are undone) and
  `experts.down_proj` [E, H, I];
- a ModuleList of MLPs (transformers 4.x): `gate_proj` / `up_proj` / `down_proj` per expert, or
  Mixtral's `w1` (gate) / `w3` (up) / `w2` (down).

The replacement (`TransformersMegaMoE`, a `MegaMoE`) takes the block's input [B, S, H] and returns
what the stock block returns: the tensor, or `(hidden, router_logits)` where the stock forward
returns a tuple (transformers 4.x Mixtral / Qwen-MoE). The routed experts compute in bf16 (x is
cast to bf16 for them, the result back to the input dtype); router and shared experts keep the
stock dtype. Inference only: the routed experts have no backward.

Routing follows the stock routers exactly (same top-k sets for the same weights and input):
- DeepSeek-V3: logits in float32, sigmoid, correction bias for selection only, group-limited
  top-k (a group's score = sum of its top-2 biased scores), optional normalisation,
  `routed_scaling_factor`. The stock router takes `topk(sorted=False)`: the same experts, but the
  slot order may differ from ours (descending score), so only the per-row sets are equal.
  GLM-4.5/4.6 (`Glm4MoeMoE`) routes the same way.
- DeepSeek-V2 (`DeepseekV2Moe`): logits in float32, softmax, greedy or group-limited greedy (a
  group's score = its best expert), no renormalisation, `routed_scaling_factor`; unsorted top-k
  as in V3.
- Mixtral (always renormalised), Qwen3-MoE, Qwen2-MoE and OLMoE (`norm_topk_prob`): logits in the
  router weight's dtype (bf16 in a bf16 model), softmax in float32, top-k sorted. Qwen-MoE and
  OLMoE round the top-k weights to the logits' dtype; we keep them in float32 (a relative 2^-8
  difference at most). Qwen2-MoE's shared expert is scaled by sigmoid(shared_expert_gate(x)).

Refused with a ValueError naming what is missing (`UNSUPPORTED_BLOCKS`): gpt-oss (`GptOssMLP`:
expert biases, a clamped SwiGLU variant, a router bias).
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..config import MegaMoEConfig
from ..layer import MegaMoE, SharedExpert, resolve_group

__all__ = ["SUPPORTED_BLOCKS", "UNSUPPORTED_BLOCKS", "TransformersMegaMoE", "find_moe_blocks", "replace_moe_blocks",
           "convert_block", "expert_counts", "global_expert_counts"]

#: MegaMoEConfig fields fixed by the model (not overridable through `cfg_overrides`).
_SHAPE_FIELDS = ("hidden", "intermediate", "num_experts", "topk")


@dataclasses.dataclass(frozen=True)
class _BlockFamily:
    """How one stock block class routes: `router_kwargs(model_config)` -> TopKRouter kwargs."""

    name: str
    router_kwargs: Callable[[object], dict]
    shared_attr: Optional[str]       # attribute of the shared SwiGLU MLP, None: no shared expert
    shared_gate_attr: Optional[str] = None   # Linear(H, 1) whose sigmoid scales the shared expert


def _deepseek_v3_router(c) -> dict:
    n_group = getattr(c, "n_group", None)
    return dict(scoring="sigmoid", norm_topk_prob=bool(getattr(c, "norm_topk_prob", True)),
                n_group=n_group, topk_group=getattr(c, "topk_group", None) if n_group else None,
                routed_scaling_factor=float(getattr(c, "routed_scaling_factor", 1.0)),
                use_correction_bias=True, logits_dtype=torch.float32)


def _qwen3_moe_router(c) -> dict:
    return dict(scoring="softmax", norm_topk_prob=bool(getattr(c, "norm_topk_prob", False)),
                logits_dtype=None)


def _mixtral_router(c) -> dict:
    return dict(scoring="softmax", norm_topk_prob=True, logits_dtype=None)


def _deepseek_v2_router(c) -> dict:
    # NOTE: the stock router never renormalises (it ignores `norm_topk_prob`); its
    # group_limited_greedy zeroes the other groups' softmax scores, which selects as -inf does.
    method = getattr(c, "topk_method", "greedy") or "greedy"
    if method not in ("greedy", "group_limited_greedy"):
        raise ValueError(f"DeepseekV2 topk_method={method!r}: expected 'greedy' or 'group_limited_greedy'")
    grouped = method == "group_limited_greedy"
    return dict(scoring="softmax", norm_topk_prob=False,
                n_group=c.n_group if grouped else None, topk_group=c.topk_group if grouped else None,
                group_score="max", routed_scaling_factor=float(getattr(c, "routed_scaling_factor", 1.0)),
                logits_dtype=torch.float32)


_DEEPSEEK_V2 = _BlockFamily("deepseek_v2", _deepseek_v2_router, "shared_experts")

#: Stock block class name -> its family. Detection is by class name only.
SUPPORTED_BLOCKS: Dict[str, _BlockFamily] = {
    "DeepseekV3MoE": _BlockFamily("deepseek_v3", _deepseek_v3_router, "shared_experts"),
    "Glm4MoeMoE": _BlockFamily("glm4_moe", _deepseek_v3_router, "shared_experts"),  # V3 routing
    "DeepseekV2Moe": _DEEPSEEK_V2,
    "DeepseekV2MoE": _DEEPSEEK_V2,            # the spelling of DeepSeek's own remote code
    "Qwen3MoeSparseMoeBlock": _BlockFamily("qwen3_moe", _qwen3_moe_router, None),
    "Qwen2MoeSparseMoeBlock": _BlockFamily("qwen2_moe", _qwen3_moe_router, "shared_expert",
                                           "shared_expert_gate"),
    "OlmoeSparseMoeBlock": _BlockFamily("olmoe", _qwen3_moe_router, None),
    "MixtralSparseMoeBlock": _BlockFamily("mixtral", _mixtral_router, None),
}

#: Stock MoE blocks recognised but refused, with what the kernels lack to compute their experts.
UNSUPPORTED_BLOCKS: Dict[str, str] = {
    "GptOssMLP": ("gpt-oss experts need expert biases (gate_up_proj_bias, down_proj_bias), its "
                  "clamped SwiGLU variant (gate * sigmoid(alpha * gate) * (up + 1) with alpha=1.702 "
                  "and swiglu_limit) and a router bias, none of which MegaMoE experts compute; its "
                  "MXFP4 expert bytes can still be read with mega_moe_layer.checkpoints"),
}


class TransformersMegaMoE(MegaMoE):
    """`MegaMoE` speaking a transformers MoE block's interface.

    forward(hidden_states [..., H]) -> [..., H] in the input dtype, or `(hidden, router_logits
    [T, E])` when `return_router_logits` (the stock block returned a tuple). Any leading shape
    works, including an empty batch [1, 0, H] (an idle rank still takes part in the collectives).
    """

    def __init__(self, cfg: MegaMoEConfig, *, group=None, device=None, backend: Optional[str] = None,
                 router_kwargs: Optional[dict] = None, shared_intermediate: Optional[int] = None,
                 shared_dtype: torch.dtype = torch.bfloat16, return_router_logits: bool = False,
                 source_class: str = "", validate: bool = True, shared_gate: bool = False):
        super().__init__(cfg, group=group, device=device, backend=backend, router_kwargs=router_kwargs,
                         shared_intermediate=shared_intermediate, validate=validate)
        if shared_intermediate and shared_dtype != torch.bfloat16:
            self.shared_experts = SharedExpert(cfg.hidden, shared_intermediate,
                                               device=self.experts.device, dtype=shared_dtype)
        # Qwen2-MoE: the shared expert's output is scaled by sigmoid(shared_expert_gate(x)).
        self.shared_expert_gate = (nn.Linear(cfg.hidden, 1, bias=False, device=self.experts.device,
                                             dtype=shared_dtype) if shared_gate else None)
        self.return_router_logits = return_router_logits
        self.source_class = source_class

    def forward(self, hidden_states: torch.Tensor):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        topk_idx, topk_weights, logits = self.router(x, return_logits=True)
        y = self.experts(x.to(torch.bfloat16).contiguous(), topk_idx, topk_weights)
        y = y.to(hidden_states.dtype).view(shape)
        if self.shared_experts is not None:   # NOTE: stock order: routed + shared, in the block dtype
            shared = self.shared_experts(hidden_states)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(hidden_states)) * shared
            y = y + shared
        return (y, logits) if self.return_router_logits else y

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"source={self.source_class}, E={c.num_experts}, E_local={self.experts.num_local_experts}, "
                f"topk={c.topk}, formats={c.weight_format}/{c.act_format}/{c.combine_format}")


# ------------------------------------------------------------------------------------------ reading
def _returns_tuple(block: nn.Module) -> bool:
    """Whether the stock block's forward returns a tuple (transformers 4.x Mixtral / Qwen-MoE return
    `(hidden, router_logits)`), read from its source: no forward is run."""
    try:
        src = textwrap.dedent(inspect.getsource(type(block).forward))
        tree = ast.parse(src)
    except (OSError, TypeError, SyntaxError):
        return False
    return any(isinstance(n, ast.Return) and isinstance(n.value, ast.Tuple) for n in ast.walk(tree))


def _expert_weights(experts: nn.Module, lo: int, num: int, where: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """bf16 w13 [num, 2I, H] (gate rows then up rows) and w2 [num, H, I] of experts lo..lo+num-1."""
    sel = slice(lo, lo + num)
    gate_up = getattr(experts, "gate_up_proj", None)
    if isinstance(gate_up, torch.Tensor) and gate_up.dim() == 3:              # fused layout
        if getattr(experts, "has_bias", False) or getattr(experts, "gate_up_proj_bias", None) is not None:
            raise ValueError(f"{where}: experts with biases are not supported")
        if getattr(experts, "has_gate", True) is False:
            raise ValueError(f"{where}: experts without a gate projection are not supported")
        gu, down = gate_up[sel], experts.down_proj[sel]
        if getattr(experts, "is_transposed", False):                          # [E, H, 2I], [E, I, H]
            gu, down = gu.transpose(1, 2), down.transpose(1, 2)
        if not getattr(experts, "is_concatenated", True):                     # rows g0, u0, g1, u1, ...
            gu = torch.cat([gu[:, 0::2], gu[:, 1::2]], dim=1)
        return gu.to(torch.bfloat16).contiguous(), down.to(torch.bfloat16).contiguous()
    if isinstance(experts, nn.ModuleList):                                     # one MLP per expert
        w13, w2 = [], []
        for mlp in list(experts)[sel]:
            if hasattr(mlp, "gate_proj"):
                g, u, d = mlp.gate_proj, mlp.up_proj, mlp.down_proj
            elif hasattr(mlp, "w1"):                                           # Mixtral 4.x
                g, u, d = mlp.w1, mlp.w3, mlp.w2
            else:
                raise ValueError(f"{where}: unknown expert MLP layout {type(mlp).__name__}")
            if any(getattr(m, "bias", None) is not None for m in (g, u, d)):
                raise ValueError(f"{where}: experts with biases are not supported")
            w13.append(torch.cat([g.weight, u.weight], dim=0))
            w2.append(d.weight)
        return torch.stack(w13).to(torch.bfloat16), torch.stack(w2).to(torch.bfloat16)
    raise ValueError(f"{where}: unknown experts layout {type(experts).__name__} (expected fused "
                     f"gate_up_proj/down_proj parameters or a ModuleList of MLPs)")


def _num_experts(experts: nn.Module) -> int:
    gate_up = getattr(experts, "gate_up_proj", None)
    if isinstance(gate_up, torch.Tensor) and gate_up.dim() == 3:
        return gate_up.shape[0]
    return len(experts)


def _text_config(model: nn.Module):
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        return cfg.get_text_config()
    return cfg


# ------------------------------------------------------------------------------------------ public
def find_moe_blocks(model: nn.Module) -> Dict[str, nn.Module]:
    """{qualified name: module} of every supported stock sparse-MoE block in `model`."""
    return {n: m for n, m in model.named_modules() if type(m).__name__ in SUPPORTED_BLOCKS}


def convert_block(block: nn.Module, model_config, cfg_overrides: Optional[dict] = None, group=None,
                  backend: Optional[str] = None, name: str = "", **kw) -> TransformersMegaMoE:
    """A `TransformersMegaMoE` with the weights of one stock block (this rank's experts only).

    model_config: the model's (text) config, read for the routing constants and `hidden_act`.
    cfg_overrides: `MegaMoEConfig` fields other than the shapes (formats, `max_tokens_per_rank`,
    ...). kw: `device` (default: the block's) and `validate`, passed to `MegaMoE`.
    """
    cls = type(block).__name__
    where = name or cls
    if cls in UNSUPPORTED_BLOCKS:
        raise ValueError(f"{where}: {cls} is not supported: {UNSUPPORTED_BLOCKS[cls]}")
    family = SUPPORTED_BLOCKS.get(cls)
    if family is None:
        raise ValueError(f"{where}: {cls} is not a supported MoE block ({sorted(SUPPORTED_BLOCKS)})")
    overrides = dict(cfg_overrides or {})
    bad = [k for k in overrides if k in _SHAPE_FIELDS]
    if bad:
        raise ValueError(f"cfg_overrides: {bad} come from the model and cannot be overridden")
    act = getattr(model_config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{where}: hidden_act={act!r}; MegaMoE experts are SwiGLU (silu) only")
    gate, experts = block.gate, block.experts
    router_w = gate.weight                                   # [E, H] (TopKRouter or nn.Linear)
    E, H = _num_experts(experts), router_w.shape[1]
    if router_w.shape[0] != E:
        raise ValueError(f"{where}: router has {router_w.shape[0]} experts, experts hold {E}")
    topk = int(getattr(gate, "top_k", None) or getattr(block, "top_k", None)
               or model_config.num_experts_per_tok)
    w13_probe, _ = _expert_weights(experts, 0, 1, where)
    inter = w13_probe.shape[1] // 2
    try:
        cfg = MegaMoEConfig(hidden=H, intermediate=inter, num_experts=E, topk=topk, **overrides)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from exc
    group, rank, num_ranks = resolve_group(group)
    num_local = cfg.num_local_experts(num_ranks)
    device = kw.pop("device", None) or router_w.device
    router_kwargs = family.router_kwargs(model_config)
    router_kwargs["dtype"] = router_w.dtype
    shared = getattr(block, family.shared_attr) if family.shared_attr else None
    shared_gate = getattr(block, family.shared_gate_attr) if family.shared_gate_attr else None
    if shared is not None and any(getattr(getattr(shared, p), "bias", None) is not None
                                  for p in ("gate_proj", "up_proj", "down_proj")):
        raise ValueError(f"{where}: shared experts with biases are not supported")
    if shared_gate is not None and (getattr(shared_gate, "bias", None) is not None
                                    or tuple(shared_gate.weight.shape) != (1, H)):
        raise ValueError(f"{where}: expected a bias-free Linear({H}, 1) shared expert gate")
    moe = TransformersMegaMoE(
        cfg, group=group, device=device, backend=backend, router_kwargs=router_kwargs,
        shared_intermediate=shared.gate_proj.out_features if shared is not None else None,
        shared_dtype=shared.gate_proj.weight.dtype if shared is not None else torch.bfloat16,
        return_router_logits=_returns_tuple(block), source_class=cls,
        shared_gate=shared_gate is not None, **kw)
    with torch.no_grad():
        moe.router.weight.copy_(router_w)
        bias = getattr(gate, "e_score_correction_bias", None)
        if moe.router.e_score_correction_bias is not None and bias is not None:
            moe.router.e_score_correction_bias.copy_(bias.float())
        if shared is not None:
            for p in ("gate_proj", "up_proj", "down_proj"):
                getattr(moe.shared_experts, p).weight.copy_(getattr(shared, p).weight)
        if shared_gate is not None:
            moe.shared_expert_gate.weight.copy_(shared_gate.weight)
        moe.experts.load_weights(*_expert_weights(experts, rank * num_local, num_local, where))
    return moe.train(block.training)


def replace_moe_blocks(model: nn.Module, cfg_overrides: Optional[dict] = None, group=None,
                       backend: Optional[str] = None, **kw) -> dict:
    """Replace every supported sparse-MoE block of `model` (in place) by a `TransformersMegaMoE`.

    cfg_overrides: `MegaMoEConfig` fields other than the shapes, e.g. {"weight_format": "bf16",
    "act_format": "bf16"} (closest to the stock numerics) or the config defaults (mxfp4 weights,
    fp8 activations) when None. group: the expert-parallel process group (None: WORLD when
    torch.distributed is initialised, else one rank); each rank keeps only its E / world experts,
    and every rank must then call the model's forward the same number of times (an idle rank
    feeds an empty batch to the MoE blocks). backend, kw (`device`, `validate`): see `MegaMoE`.

    Returns {"replaced": [names], "classes": {name: stock class}, "layers": {name: MegaMoE}}.
    Raises ValueError when the model holds no supported block.
    """
    model_config = _text_config(model)
    blocks = find_moe_blocks(model)
    if not blocks:
        refused = {n: type(m).__name__ for n, m in model.named_modules()
                   if type(m).__name__ in UNSUPPORTED_BLOCKS}
        if refused:
            name, cls = next(iter(refused.items()))
            raise ValueError(f"{type(model).__name__}: {name} ({cls}) is not supported: "
                             f"{UNSUPPORTED_BLOCKS[cls]}")
        raise ValueError(f"{type(model).__name__}: no supported MoE block found "
                         f"(looked for {sorted(SUPPORTED_BLOCKS)})")
    layers, classes = {}, {}
    for name, block in blocks.items():
        moe = convert_block(block, model_config, cfg_overrides, group=group, backend=backend,
                            name=name, **dict(kw))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, moe)
        layers[name], classes[name] = moe, type(block).__name__
    return {"replaced": list(layers), "classes": classes, "layers": layers}


def _megamoe_layers(model: nn.Module) -> Dict[str, MegaMoE]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MegaMoE)}


def expert_counts(model: nn.Module, cumulative: bool = False) -> Dict[str, torch.Tensor]:
    """{layer name: int32 [E_local] on the layer's device}: (token, slot) pairs each local expert
    received in the last call (SGLang's per-layer expert-distribution shape) or over all calls.

    The tensors are the layers' live buffers, updated in place by every call: clone to keep one.
    """
    return {n: (m.experts.cumulative_local_expert_recv_stats if cumulative
                else m.experts.last_local_expert_recv_stats) for n, m in _megamoe_layers(model).items()}


def global_expert_counts(model: nn.Module, cumulative: bool = False) -> Dict[str, torch.Tensor]:
    """{layer name: int64 [E]} over the whole group (collective: every rank calls it)."""
    return {n: m.experts.global_expert_counts(cumulative=cumulative)
            for n, m in _megamoe_layers(model).items()}
