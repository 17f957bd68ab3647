"""Swap MegaMoE into small transformers models and compare with the untouched model.

For each family (DeepSeek-V2/V3, GLM-4.5, Qwen2/Qwen3-MoE, OLMoE, Mixtral) a tiny model is built from its config with
random weights (nothing is downloaded), deep-copied, its MoE blocks replaced by `MegaMoE`
(`mega_moe_layer.integrations.transformers.replace_moe_blocks`), and both copies run a forward
and a greedy `generate()` of 8 tokens. Printed: the max |logits difference| and rel-RMSE against
the untouched model, whether the greedy tokens agree, and the expert-load table.

    python scripts/swap_into_transformers.py                          # all families, bf16 + mxfp4/fp8
    python scripts/swap_into_transformers.py --family mixtral --formats mxfp4/fp4/fp8

Needs the `transformers` extra (`pip install -e ".[transformers]"`).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import List, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mega_moe_layer.integrations.transformers import expert_counts, replace_moe_blocks  # noqa: E402
from mega_moe_layer.stats import format_table  # noqa: E402

FAMILIES = ("deepseek_v3", "qwen3_moe", "mixtral", "glm4_moe", "deepseek_v2", "qwen2_moe", "olmoe")
VOCAB = 1000


def tiny_config(family: str, num_layers: int = 2):
    """A transformers config of `family` small enough for a CPU (hidden 256, 16 or 8 experts)."""
    import transformers as tf
    common = dict(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=num_layers, num_attention_heads=4,
                  max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "deepseek_v3":
        return tf.DeepseekV3Config(**common, intermediate_size=512, moe_intermediate_size=128,
                                   num_key_value_heads=4, n_shared_experts=1, n_routed_experts=16,
                                   n_group=4, topk_group=2, num_experts_per_tok=4, routed_scaling_factor=2.5,
                                   norm_topk_prob=True, first_k_dense_replace=0, kv_lora_rank=64,
                                   q_lora_rank=128, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, intermediate_size=512, moe_intermediate_size=128,
                                 num_key_value_heads=2, head_dim=64, num_experts=16,
                                 num_experts_per_tok=4, norm_topk_prob=True)
    if family == "mixtral":
        return tf.MixtralConfig(**common, intermediate_size=128, num_key_value_heads=2,
                                num_local_experts=8, num_experts_per_tok=2)
    if family == "glm4_moe":
        return tf.Glm4MoeConfig(**common, intermediate_size=512, moe_intermediate_size=128,
                                num_key_value_heads=2, n_shared_experts=1, n_routed_experts=16,
                                n_group=4, topk_group=2, num_experts_per_tok=4, routed_scaling_factor=2.5,
                                norm_topk_prob=True, first_k_dense_replace=0)
    if family == "deepseek_v2":
        return tf.DeepseekV2Config(**common, intermediate_size=512, moe_intermediate_size=128,
                                   num_key_value_heads=4, n_shared_experts=1, n_routed_experts=16,
                                   n_group=4, topk_group=2, topk_method="group_limited_greedy",
                                   num_experts_per_tok=4, routed_scaling_factor=1.5, first_k_dense_replace=0,
                                   kv_lora_rank=64, q_lora_rank=128, qk_rope_head_dim=16,
                                   qk_nope_head_dim=32, v_head_dim=32)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(**common, intermediate_size=512, moe_intermediate_size=128,
                                 shared_expert_intermediate_size=256, num_key_value_heads=2,
                                 num_experts=16, num_experts_per_tok=4, norm_topk_prob=False)
    if family == "olmoe":
        return tf.OlmoeConfig(**common, intermediate_size=128, num_key_value_heads=4, num_experts=16,
                              num_experts_per_tok=4, norm_topk_prob=False)
    raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")


def build_model(family: str, seed: int = 0, num_layers: int = 2):
    """A random bf16 causal LM of `family` in eval mode. DeepSeek-V3's correction biases (zero at
    init) get random values so that selection-only biasing is exercised."""
    import transformers as tf
    cls = {"deepseek_v3": tf.DeepseekV3ForCausalLM, "qwen3_moe": tf.Qwen3MoeForCausalLM,
           "mixtral": tf.MixtralForCausalLM, "glm4_moe": tf.Glm4MoeForCausalLM,
           "deepseek_v2": tf.DeepseekV2ForCausalLM, "qwen2_moe": tf.Qwen2MoeForCausalLM,
           "olmoe": tf.OlmoeForCausalLM}[family]
    torch.manual_seed(seed)
    model = cls(tiny_config(family, num_layers)).to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            bias = getattr(m, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(torch.randn(bias.shape, generator=g) * 0.05)
    return model


def parse_formats(text: str):
    out = []
    for item in text.split(","):
        parts = item.strip().split("/")
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"format {item!r}: expected WEIGHT/ACT/COMBINE, e.g. mxfp4/fp8/bf16")
        out.append(tuple(parts))
    return out


def run_family(family: str, fmt, batch: int, prompt_len: int, new_tokens: int, seed: int) -> dict:
    stock = build_model(family, seed)
    model = copy.deepcopy(stock)
    wf, af, cf = fmt
    summary = replace_moe_blocks(model, cfg_overrides=dict(weight_format=wf, act_format=af, combine_format=cf,
                                                           max_tokens_per_rank=batch * (prompt_len + new_tokens)))
    ids = torch.randint(3, VOCAB, (batch, prompt_len), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ls, lm = stock(ids, attention_mask=mask).logits.float(), model(ids, attention_mask=mask).logits.float()
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, attention_mask=mask,
               pad_token_id=0)
    with torch.no_grad():
        gs, gm = stock.generate(ids, **gen), model.generate(ids, **gen)
    counts = {n: c.tolist() for n, c in expert_counts(model, cumulative=True).items()}
    return {"family": family, "format": "/".join(fmt), "replaced": summary["classes"],
            "max_abs": float((ls - lm).abs().max()), "rel_rmse": float((ls - lm).norm() / ls.norm()),
            "logits_max": float(ls.abs().max()),
            "tokens_equal": bool(torch.equal(gs, gm)),
            "tokens_agree": float((gs[:, prompt_len:] == gm[:, prompt_len:]).float().mean()),
            "counts": counts}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", choices=FAMILIES + ("all",), default="all")
    p.add_argument("--formats", type=parse_formats, default=parse_formats("bf16/bf16/bf16,mxfp4/fp8/bf16"),
                   help="comma-separated WEIGHT/ACT/COMBINE formats (default: bf16/bf16/bf16,mxfp4/fp8/bf16)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=12)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--summary", action="store_true", help="expert-load summary only (no per-expert rows)")
    args = p.parse_args(argv)
    families = FAMILIES if args.family == "all" else (args.family,)
    rows = []
    for family in families:
        for fmt in args.formats:
            r = run_family(family, fmt, args.batch, args.prompt_len, args.new_tokens, args.seed)
            rows.append(r)
            print(f"\n## {family}, formats {r['format']}: replaced {len(r['replaced'])} blocks "
                  f"({', '.join(sorted(set(r['replaced'].values())))})")
            print(f"logits vs untouched model: max |diff| {r['max_abs']:.4g} (max |logit| {r['logits_max']:.3g}), "
                  f"rel-RMSE {r['rel_rmse']:.3e}; greedy {args.new_tokens} tokens: "
                  f"{'identical' if r['tokens_equal'] else 'differ'} ({100 * r['tokens_agree']:.0f}% agree)")
            print("expert load (cumulative pairs over forward + generate):")
            print(format_table(r["counts"], per_expert=not args.summary))
    print("\n| family | formats | max abs logits diff | rel-RMSE | greedy tokens equal |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['format']} | {r['max_abs']:.4g} | {r['rel_rmse']:.3e} | {r['tokens_equal']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
