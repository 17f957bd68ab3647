"""Reading one MoE layer's routed experts from a directory of safetensors files, as stored.

    from mega_moe_layer import checkpoints
    ck = checkpoints.read_experts("/ckpt/DeepSeek-V3", layer=3, rank=r, num_ranks=R)   # this rank's
    experts.load_quantized_weights(ck.w13, ck.w2)                                    # experts only
    # or, reading rank / world size from the module:
    checkpoints.load_experts(experts, "/ckpt/gpt-oss-120b", layer=3)

Layouts found in the wild (`LAYOUTS`; `FAMILIES` maps model families onto them):

- ``"per_expert"`` (DeepSeek-V2/V3/R1, GLM-4.5/4.6, Qwen2/Qwen3-MoE, OLMoE):
  `{prefix}.{e}.gate_proj.weight` [I, H], `up_proj.weight` [I, H], `down_proj.weight` [H, I], in
  bf16, or float8_e4m3fn with `.weight_scale_inv` float32 [ceil(N/128), ceil(K/128)] block scales
  (value = weight * scale_inv per block; DeepSeek-V3/R1). Prefix `model.layers.{L}.mlp.experts`.
- ``"mixtral"``: the same per expert with `w1` (gate) / `w3` (up) / `w2` (down), prefix
  `model.layers.{L}.block_sparse_moe.experts`.
- ``"gpt_oss"``: fused MXFP4 `{prefix}.gate_up_proj_blocks` uint8 [E, 2I, H/32, 16] (element 2j
  in the low nibble of byte j), `gate_up_proj_scales` uint8 [E, 2I, H/32] (UE8M0, bias 127),
  `down_proj_blocks` [E, H, I/32, 16], `down_proj_scales` [E, H, I/32]. Its gate and up rows are
  interleaved (row 2i gate, row 2i+1 up: `GptOssExperts` takes `gate_up[..., ::2]` /
  `[..., 1::2]`); they are permuted (bytes moved, never requantised) into this package's gate rows
  then up rows. Its biases (`*_bias`) are not read (listed in `CheckpointExperts.not_loaded`):
  this package's experts have none.

Only this rank's experts (E_local = E / num_ranks, rank r owns [r * E_local, (r + 1) * E_local))
are read. Files are opened with `safetensors.safe_open` (memory-mapped, never unpickled); each
file's header (8-byte length + JSON) is first checked against the file size, so a truncated file
names the tensors it cuts off. Errors are ValueError (missing tensor, wrong shape, truncation) or
TypeError (wrong dtype) and name the tensor and the file.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import struct
from typing import Dict, Optional, Tuple

import torch

from .formats import QuantizedWeight, cat_rows

__all__ = ["LAYOUTS", "FAMILIES", "SafetensorsCheckpoint", "CheckpointExperts", "read_experts",
           "load_experts"]

#: safetensors dtype strings -> torch dtypes (those expert weights are stored in).
_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "BF16": torch.bfloat16, "F16": torch.float16,
           "F32": torch.float32, "U8": torch.uint8, "I8": torch.int8}
_MAX_HEADER = 100 << 20


@dataclasses.dataclass(frozen=True)
class _Layout:
    prefix: str                  # experts prefix, `{layer}` substituted
    names: Tuple[str, str, str]  # gate, up, down (per expert) or the fused stems


LAYOUTS: Dict[str, _Layout] = {
    "per_expert": _Layout("model.layers.{layer}.mlp.experts", ("gate_proj", "up_proj", "down_proj")),
    "mixtral": _Layout("model.layers.{layer}.block_sparse_moe.experts", ("w1", "w3", "w2")),
    "gpt_oss": _Layout("model.layers.{layer}.mlp.experts", ("gate_up_proj", "", "down_proj")),
}

#: model family -> layout name.
FAMILIES: Dict[str, str] = {
    "deepseek_v3": "per_expert", "deepseek_v2": "per_expert", "glm4_moe": "per_expert",
    "qwen3_moe": "per_expert", "qwen2_moe": "per_expert", "olmoe": "per_expert",
    "mixtral": "mixtral", "gpt_oss": "gpt_oss",
}


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
    file: str
    dtype: str
    shape: Tuple[int, ...]


class SafetensorsCheckpoint:
    """The tensors of a directory of safetensors files (with or without `*.safetensors.index.json`).

    Only headers are read at construction; `tensor(name, ...)` opens the file memory-mapped and
    reads one tensor (or a slice of its first dimension), validating dtype and shape first.
    """

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise ValueError(f"checkpoint: {path!r} is not a directory")
        self.path = path
        self._infos: Dict[str, _TensorInfo] = {}
        self._bad: Dict[str, str] = {}            # tensor -> why it cannot be read (truncated file)
        indexes = sorted(glob.glob(os.path.join(path, "*.safetensors.index.json")))
        if indexes:
            with open(indexes[0]) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"checkpoint: {indexes[0]} has no 'weight_map' object")
            files = sorted(set(weight_map.values()))
        else:
            weight_map = None
            files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "*.safetensors")))
            if not files:
                raise ValueError(f"checkpoint: no *.safetensors files in {path!r}")
        self._files = files
        for fname in files:
            fpath = os.path.join(path, fname)
            if not os.path.isfile(fpath):
                missing = [n for n, v in weight_map.items() if v == fname][:3] if weight_map else []
                raise ValueError(f"checkpoint: file {fname!r} (holding {missing}...) listed in the "
                                 f"index is missing from {path!r}")
            self._read_header(fname, fpath)
        self._index_names = set(weight_map) if weight_map else None

    def _read_header(self, fname: str, fpath: str) -> None:
        size = os.path.getsize(fpath)
        with open(fpath, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"checkpoint: {fname} is truncated ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise ValueError(f"checkpoint: {fname} is truncated or not safetensors (header of "
                                 f"{n} bytes, file of {size})")
            header = json.loads(f.read(n))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        expected = 8 + n + max((v["data_offsets"][1] for v in tensors.values()), default=0)
        for name, meta in tensors.items():
            end = 8 + n + meta["data_offsets"][1]
            self._infos[name] = _TensorInfo(fname, meta["dtype"], tuple(meta["shape"]))
            # NOTE: safetensors refuses to open a file that is short at all, so every tensor of a
            # truncated file is unreadable, not only those the cut reaches.
            if end > size:
                self._bad[name] = (f"file {fname} is truncated: tensor {name!r} ends at byte {end}, "
                                   f"the file has {size}")
            elif expected > size:
                self._bad[name] = (f"file {fname} is truncated ({size} of {expected} bytes): tensor "
                                   f"{name!r} cannot be read")

    def has(self, name: str) -> bool:
        return name in self._infos

    def names(self):
        return self._infos.keys()

    def info(self, name: str) -> _TensorInfo:
        if name not in self._infos:
            raise ValueError(f"checkpoint {self.path!r}: tensor {name!r} not found")
        return self._infos[name]

    def tensor(self, name: str, dtype: torch.dtype, shape: Tuple[int, ...],
               rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Tensor `name` (rows [a, b) of dim 0 when `rows` is given), checked to be `dtype` and of
        full shape `shape` (None entries match anything)."""
        info = self.info(name)
        got = _DTYPES.get(info.dtype)
        if got != dtype:
            raise TypeError(f"checkpoint {info.file}: tensor {name!r} has dtype {info.dtype} "
                            f"({got}), expected {dtype}")
        if len(info.shape) != len(shape) or any(w is not None and w != g for w, g in zip(shape, info.shape)):
            want = "[" + ", ".join("?" if w is None else str(w) for w in shape) + "]"
            raise ValueError(f"checkpoint {info.file}: tensor {name!r} has shape {list(info.shape)}, "
                             f"expected {want}")
        if name in self._bad:
            raise ValueError(f"checkpoint: {self._bad[name]}")
        from safetensors import safe_open
        try:
            with safe_open(os.path.join(self.path, info.file), framework="pt") as f:
                if rows is None:
                    return f.get_tensor(name)
                return f.get_slice(name)[rows[0]:rows[1]]
        except Exception as exc:          # safetensors' own errors, with the tensor named
            raise ValueError(f"checkpoint {info.file}: cannot read tensor {name!r}: {exc}") from exc


@dataclasses.dataclass(frozen=True)
class CheckpointExperts:
    """One layer's routed experts as read: `w13` [E_local, 2I, H] (gate rows then up rows) and
    `w2` [E_local, H, I] `QuantizedWeight`s in the stored format; experts
    [first_expert, first_expert + E_local) of `num_experts`; `not_loaded`: tensors under the
    experts' prefix that were not read (e.g. gpt-oss biases)."""

    w13: QuantizedWeight
    w2: QuantizedWeight
    layout: str
    first_expert: int
    num_experts: int
    not_loaded: Tuple[str, ...]

    @property
    def format(self) -> str:
        return self.w13.format


def _detect_layout(ck: SafetensorsCheckpoint, layer: int) -> str:
    for name, lay in LAYOUTS.items():
        p = lay.prefix.format(layer=layer)
        probe = f"{p}.gate_up_proj_blocks" if name == "gpt_oss" else f"{p}.0.{lay.names[0]}.weight"
        if ck.has(probe):
            return name
    raise ValueError(f"checkpoint {ck.path!r}: no routed experts of layer {layer} found (looked for "
                     f"{[LAYOUTS[n].prefix.format(layer=layer) for n in LAYOUTS]})")


def read_experts(path, layer: int, family: str = "auto", rank: int = 0, num_ranks: int = 1,
                 prefix: Optional[str] = None, num_experts: Optional[int] = None,
                 hidden: Optional[int] = None, intermediate: Optional[int] = None) -> CheckpointExperts:
    """This rank's routed experts of decoder layer `layer`, exactly as stored.

    path: a checkpoint directory or a `SafetensorsCheckpoint`. family: a key of `FAMILIES`, a
    layout of `LAYOUTS`, or "auto" (probe the layouts' names). prefix: the experts' name prefix
    when the checkpoint nests its layers elsewhere (e.g. "model.language_model.layers.3.mlp.experts").
    num_experts / hidden / intermediate: expected sizes (checked when given).
    """
    ck = path if isinstance(path, SafetensorsCheckpoint) else SafetensorsCheckpoint(path)
    if family == "auto":
        layout = _detect_layout(ck, layer)
    elif family in FAMILIES:
        layout = FAMILIES[family]
    elif family in LAYOUTS:
        layout = family
    else:
        raise ValueError(f"family: expected 'auto' or one of {sorted(set(FAMILIES) | set(LAYOUTS))}, got {family!r}")
    lay = LAYOUTS[layout]
    pre = prefix if prefix is not None else lay.prefix.format(layer=layer)
    if layout == "gpt_oss":
        out = _read_fused_mxfp4(ck, pre, rank, num_ranks)
    else:
        out = _read_per_expert(ck, pre, lay.names, rank, num_ranks, layout)
    E = out.num_experts
    _, I2, H = out.w13.shape
    for what, want, got in (("num_experts", num_experts, E), ("hidden", hidden, H),
                            ("intermediate", intermediate, I2 // 2)):
        if want is not None and want != got:
            raise ValueError(f"checkpoint {ck.path!r}: {pre} has {what}={got}, expected {want}")
    return out


def _local_range(E: int, rank: int, num_ranks: int, where: str) -> Tuple[int, int]:
    if num_ranks <= 0 or not 0 <= rank < num_ranks:
        raise ValueError(f"rank/num_ranks: expected 0 <= rank < num_ranks, got {rank}/{num_ranks}")
    if E % num_ranks != 0:
        raise ValueError(f"{where}: {E} experts are not divisible by num_ranks={num_ranks}")
    El = E // num_ranks
    return rank * El, El


def _read_per_expert(ck, pre, names, rank, num_ranks, layout) -> CheckpointExperts:
    gate, up, down = names
    pat = re.compile(re.escape(pre) + r"\.(\d+)\." + re.escape(gate) + r"\.weight$")
    ids = sorted(int(m.group(1)) for n in ck.names() for m in [pat.match(n)] if m)
    if not ids:
        raise ValueError(f"checkpoint {ck.path!r}: tensor {pre}.0.{gate}.weight not found")
    E = ids[-1] + 1
    lo, El = _local_range(E, rank, num_ranks, pre)
    first = ck.info(f"{pre}.{lo}.{gate}.weight")
    dtype = _DTYPES.get(first.dtype)
    if dtype not in (torch.float8_e4m3fn, torch.bfloat16) or len(first.shape) != 2:
        raise TypeError(f"checkpoint {first.file}: tensor {pre}.{lo}.{gate}.weight is {first.dtype} "
                        f"{list(first.shape)}; expected a 2-D F8_E4M3 (with weight_scale_inv) or BF16 weight")
    I, H = first.shape
    fp8 = dtype == torch.float8_e4m3fn
    B = 128
    mats = {gate: [], up: [], down: []}
    scales = {gate: [], up: [], down: []}
    for e in range(lo, lo + El):
        for proj, (n, k) in ((gate, (I, H)), (up, (I, H)), (down, (H, I))):
            base = f"{pre}.{e}.{proj}"
            mats[proj].append(ck.tensor(f"{base}.weight", dtype, (n, k)))
            if fp8:
                scales[proj].append(ck.tensor(f"{base}.weight_scale_inv", torch.float32,
                                              (-(-n // B), -(-k // B))))
    loaded = {f"{pre}.{e}.{p}.{s}" for e in range(E) for p in names for s in ("weight", "weight_scale_inv")}
    not_loaded = tuple(sorted(n for n in ck.names() if n.startswith(pre + ".") and n not in loaded))

    def qw(proj):
        if fp8:
            return QuantizedWeight.fp8(torch.stack(mats[proj]), torch.stack(scales[proj]), f"{pre}.*.{proj}")
        return QuantizedWeight.bf16(torch.stack(mats[proj]), f"{pre}.*.{proj}")

    w13 = cat_rows([qw(gate), qw(up)], f"{pre}.*.{gate}+{up}")
    return CheckpointExperts(w13, qw(down), layout, lo, E, not_loaded)


def _read_fused_mxfp4(ck, pre, rank, num_ranks) -> CheckpointExperts:
    gu_b, gu_s = f"{pre}.gate_up_proj_blocks", f"{pre}.gate_up_proj_scales"
    dn_b, dn_s = f"{pre}.down_proj_blocks", f"{pre}.down_proj_scales"
    info = ck.info(gu_b)
    if len(info.shape) != 4 or info.shape[1] % 2 or info.shape[3] != 16:
        raise ValueError(f"checkpoint {info.file}: tensor {gu_b!r} has shape {list(info.shape)}, "
                         f"expected [E, 2I, H/32, 16]")
    E, I2, Hg, _ = info.shape
    I, H = I2 // 2, Hg * 32
    if I % 32:
        raise ValueError(f"checkpoint {info.file}: tensor {gu_b!r}: I={I} is not a multiple of 32")
    lo, El = _local_range(E, rank, num_ranks, pre)
    rows = (lo, lo + El)
    blocks = ck.tensor(gu_b, torch.uint8, (E, I2, Hg, 16), rows)
    scales = ck.tensor(gu_s, torch.uint8, (E, I2, Hg), rows)
    d_blocks = ck.tensor(dn_b, torch.uint8, (E, H, I // 32, 16), rows)
    d_scales = ck.tensor(dn_s, torch.uint8, (E, H, I // 32), rows)
    # NOTE: rows 2i (gate) and 2i+1 (up) -> gate rows then up rows; bytes moved, values untouched.
    blocks = torch.cat([blocks[:, 0::2], blocks[:, 1::2]], dim=1)
    scales = torch.cat([scales[:, 0::2], scales[:, 1::2]], dim=1)
    w13 = QuantizedWeight.mxfp4(blocks, scales, f"{gu_b}/{gu_s}").contiguous()
    w2 = QuantizedWeight.mxfp4(d_blocks, d_scales, f"{dn_b}/{dn_s}").contiguous()
    used = {gu_b, gu_s, dn_b, dn_s}
    not_loaded = tuple(sorted(n for n in ck.names() if n.startswith(pre + ".") and n not in used))
    return CheckpointExperts(w13, w2, "gpt_oss", lo, E, not_loaded)


def load_experts(experts, path, layer: int, family: str = "auto", prefix: Optional[str] = None,
                 convert: bool = False) -> CheckpointExperts:
    """Read `experts`' (a `MegaMoEExperts`) share of layer `layer` and load it exactly
    (`load_quantized_weights(..., convert=convert)`); the sizes are checked against its config."""
    cfg = experts.cfg
    out = read_experts(path, layer, family, rank=experts.rank, num_ranks=experts.num_ranks,
                       prefix=prefix, num_experts=cfg.num_experts, hidden=cfg.hidden,
                       intermediate=cfg.intermediate)
    experts.load_quantized_weights(out.w13, out.w2, convert=convert)
    return out
