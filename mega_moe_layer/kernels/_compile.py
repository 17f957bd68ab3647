"""Compile-only checks of Triton kernels for GPUs that are not present (sm_90a, sm_100a).

`compile_ptx` runs Triton's full pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin with the bundled
ptxas) for a chosen architecture on any machine, GPU or not, so CPU tests can prove that a kernel
builds for Hopper and Blackwell and inspect the generated code. `ptxas_usage` re-assembles the PTX
with `ptxas -v` and parses registers and spills, which the PTX does not show (spills are ptxas's).

Interpreter mode: when `TRITON_INTERPRET=1` was set before Triton was imported (the CPU test
session does that), `triton.jit` returns interpreter objects — and so do Triton's own library
functions (`tl.max`, ...) — which cannot be compiled in that process. `compile_ptx` /
`compile_ptx_batch` then compile in one child Python process without the variable; the kernel must
be a module-level attribute of an importable module, and constexpr values JSON-serialisable.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

__all__ = ["compile_ptx", "compile_ptx_batch", "compile_kernel", "ptxas_usage", "CompileUnavailable",
           "ptx_target", "ptx_entries", "CompileJob", "wgmma_register_hazards"]


class CompileUnavailable(RuntimeError):
    """The compile check cannot run here (no NVIDIA backend, no ptxas, child process failed to start)."""


def _arg_names(kernel_fn) -> List[str]:
    names = getattr(kernel_fn, "arg_names", None)
    if names is None:
        raise TypeError(f"kernel_fn: expected a triton.jit kernel, got {type(kernel_fn).__name__}")
    return list(names)


def _is_jit_function(kernel_fn) -> bool:
    import triton

    return isinstance(kernel_fn, triton.runtime.jit.JITFunction)


def _with_defaults(kernel_fn, signature: Mapping[str, str], constexprs: Mapping[str, Any]) -> Dict[str, Any]:
    """constexprs plus the default of every parameter given neither a type nor a value (e.g. a
    `PDL: tl.constexpr = False` switch), as a launch without that argument would use."""
    import inspect

    fn = getattr(kernel_fn, "fn", kernel_fn)
    out = dict(constexprs)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return out
    for name, prm in params.items():
        if name not in signature and name not in out and prm.default is not inspect.Parameter.empty:
            out[name] = prm.default
    return out


def _full_signature(kernel_fn, signature: Mapping[str, str], constexprs: Mapping[str, Any]) -> Dict[str, str]:
    """Validated {parameter: type} in parameter order, constexprs marked "constexpr"."""
    names = _arg_names(kernel_fn)
    name = getattr(kernel_fn, "__name__", "kernel")
    unknown = (set(signature) | set(constexprs)) - set(names)
    if unknown:
        raise ValueError(f"signature/constexprs: {sorted(unknown)} are not parameters of {name}")
    sig: Dict[str, str] = {}
    for p in names:
        if p in constexprs:
            sig[p] = "constexpr"
        elif p in signature:
            sig[p] = signature[p]
        else:
            raise ValueError(f"signature: missing a type for parameter {p!r} of {name}")
    return sig


def compile_kernel(kernel_fn, signature: Mapping[str, str], constexprs: Optional[Mapping[str, Any]],
                   arch: int, divisible_by_16: Optional[Iterable[str]] = None, **options):
    """Compile a `triton.jit` kernel in this process for CUDA compute capability `arch` (90, 100,
    ...); returns Triton's CompiledKernel (`.asm` holds "ttir", "ttgir", "llir", "ptx", "cubin").

    signature: parameter name -> Triton type string ("*bf16", "*i32", "i32", "fp32", ...) for every
        runtime parameter; parameters in `constexprs` may be left out (typed "constexpr" here).
    constexprs: parameter name -> value for `tl.constexpr` parameters and for arguments passed as
        None (Triton specialises those as constexpr None).
    divisible_by_16: parameters the launcher would specialise as multiples of 16 (16-byte aligned
        pointers, ints divisible by 16), which is what lets Triton vectorise memory accesses.
        None (default) = every pointer parameter, as at run time with tensors from PyTorch's
        allocator; pass () to compile without any alignment assumption.
    options: compiler options such as num_warps=4, num_stages=2, enable_fp_fusion=False.

    Raises CompileUnavailable for an interpreter-mode kernel (use `compile_ptx`, which handles it).
    """
    import triton
    from triton.backends.compiler import GPUTarget

    if not _is_jit_function(kernel_fn):
        raise CompileUnavailable(f"{getattr(kernel_fn, '__name__', kernel_fn)!r} is an interpreter object "
                                 "(TRITON_INTERPRET=1): compile it with compile_ptx / compile_ptx_batch")
    constexprs = _with_defaults(kernel_fn, signature, constexprs or {})
    sig = _full_signature(kernel_fn, signature, constexprs)
    if divisible_by_16 is None:
        divisible_by_16 = [k for k, v in sig.items() if v.startswith("*")]
    attrs = {}
    for p in divisible_by_16:
        if sig.get(p, "constexpr") == "constexpr":
            raise ValueError(f"divisible_by_16: {p!r} is not a runtime parameter of {kernel_fn.__name__}")
        attrs[(kernel_fn.arg_names.index(p),)] = [["tt.divisibility", 16]]
    src_cls = triton.compiler.ASTSource
    if getattr(kernel_fn, "is_gluon", lambda: False)():      # a `gluon.jit` kernel (Triton's Gluon dialect)
        from triton.experimental.gluon._runtime import GluonASTSource as src_cls
    src = src_cls(fn=kernel_fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", int(arch), 32), options=dict(options))


class CompileJob(dict):
    """One kernel compilation for `compile_ptx_batch`: the arguments of `compile_ptx` by name."""

    def __init__(self, kernel_fn, signature: Mapping[str, str], constexprs: Optional[Mapping[str, Any]],
                 arch: int, divisible_by_16: Optional[Iterable[str]] = None, **options):
        super().__init__(kernel_fn=kernel_fn, signature=dict(signature),
                         constexprs=_with_defaults(kernel_fn, signature, constexprs or {}),
                         arch=int(arch), divisible_by_16=None if divisible_by_16 is None else list(divisible_by_16),
                         options=dict(options))


def compile_ptx(kernel_fn, signature: Mapping[str, str], constexprs: Optional[Mapping[str, Any]],
                arch: int, divisible_by_16: Optional[Iterable[str]] = None, **options) -> str:
    """PTX text of `kernel_fn` compiled for compute capability `arch` (arguments: `compile_kernel`).

    Works in interpreter mode too (see the module docstring). Example::

        ptx = compile_ptx(my_kernel, {"x_ptr": "*bf16", "n": "i32"}, {"BLOCK": 128}, arch=100)
        assert ptx_target(ptx) == "sm_100a"
    """
    return compile_ptx_batch([CompileJob(kernel_fn, signature, constexprs, arch, divisible_by_16, **options)])[0]


def compile_ptx_batch(jobs: Sequence[CompileJob]) -> List[str]:
    """PTX of several compilations; in interpreter mode all of them share one child process."""
    for job in jobs:  # validate here, in the caller's process, for clear errors
        _full_signature(job["kernel_fn"], job["signature"], job["constexprs"])
    # NOTE: with TRITON_INTERPRET=1 in this process Triton's semantic layer is the interpreter's
    # even for kernels that are still JIT functions (a `gluon.jit` kernel): compile in a child.
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and all(_is_jit_function(job["kernel_fn"]) for job in jobs):
        return [compile_kernel(j["kernel_fn"], j["signature"], j["constexprs"], j["arch"], j["divisible_by_16"],
                               **j["options"]).asm["ptx"] for j in jobs]
    return _compile_in_child(jobs)


def _compile_in_child(jobs: Sequence[CompileJob]) -> List[str]:
    specs = []
    for job in jobs:
        fn = job["kernel_fn"]
        py_fn = getattr(fn, "fn", fn)
        spec = {k: v for k, v in job.items() if k != "kernel_fn"}
        spec.update(module=py_fn.__module__, name=py_fn.__name__)
        specs.append(spec)
        mod = importlib.import_module(spec["module"])
        if getattr(mod, spec["name"], None) is not fn:
            raise CompileUnavailable(f"{spec['name']} is not a module-level attribute of {spec['module']}: "
                                     "it cannot be compiled in a child process")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    # The child must import the same packages (this one and the kernel's module) first.
    roots = []
    for spec in specs:
        top = sys.modules[spec["module"].split(".")[0]]
        if getattr(top, "__file__", None):
            path = os.path.abspath(top.__file__)
            # a package: the folder above it; a plain module (e.g. a script's): its own folder
            is_pkg = os.path.basename(path) == "__init__.py"
            roots.append(os.path.dirname(os.path.dirname(path)) if is_pkg else os.path.dirname(path))
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(roots + [env.get("PYTHONPATH", "")]).keys()).strip(os.pathsep)
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = os.path.join(tmp, "jobs.json")
        with open(spec_path, "w") as f:
            json.dump({"jobs": specs, "out_dir": tmp}, f)
        try:
            proc = subprocess.run([sys.executable, "-m", __name__, spec_path], env=env, capture_output=True,
                                  text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CompileUnavailable(f"compile child process failed to run: {exc}") from exc
        if proc.returncode != 0:
            raise RuntimeError(f"compile child process failed ({proc.returncode}):\n{proc.stderr[-8000:]}")
        out = []
        for i in range(len(specs)):
            with open(os.path.join(tmp, f"{i}.ptx")) as f:
                out.append(f.read())
        return out


def _child_main(spec_path: str) -> None:
    with open(spec_path) as f:
        payload = json.load(f)
    for i, spec in enumerate(payload["jobs"]):
        fn = getattr(importlib.import_module(spec["module"]), spec["name"])
        ptx = compile_kernel(fn, spec["signature"], spec["constexprs"], spec["arch"], spec["divisible_by_16"],
                             **spec["options"]).asm["ptx"]
        with open(os.path.join(payload["out_dir"], f"{i}.ptx"), "w") as f:
            f.write(ptx)


def ptx_target(ptx: str) -> str:
    """The `.target` of a PTX module, e.g. "sm_90a"."""
    m = re.search(r"^\s*\.target\s+(\S+?)\s*(?:,|$)", ptx, re.MULTILINE)
    if not m:
        raise ValueError("ptx: no .target directive")
    return m.group(1)


def ptx_entries(ptx: str) -> list:
    """Names of the `.entry` (kernel) functions of a PTX module."""
    return re.findall(r"\.entry\s+([A-Za-z_$][\w$]*)\s*\(", ptx)


_REG = re.compile(r"%[a-z]+\d+")


def _ptx_blocks(ptx: str):
    """The instructions of a single-kernel PTX module as basic blocks: (blocks, successors), each
    block a list of (line number, instruction text). Labels inside inline-assembly braces are
    scoped to their braces (the same name recurs in every `mbarrier.try_wait` loop)."""
    insts, labels, scopes, fresh = [], {}, [], 0
    for no, raw in enumerate(ptx.splitlines(), 1):
        line = raw.split("//", 1)[0].strip()
        if not line:
            continue
        if line.startswith(".entry") or line.startswith(".visible") or line.startswith(".func"):
            insts, labels, scopes = [], {}, []                      # one kernel per module: start over
            continue
        if line == "{":                      # a scope (the kernel's body, an inline-assembly block)
            fresh += 1
            scopes.append(fresh)
            continue
        if line == "}":
            scopes.pop()
            continue
        m = re.match(r"^([$\w]+):\s*(.*)$", line)
        if m:
            labels[(scopes[-1] if len(scopes) > 1 else 0, m.group(1))] = len(insts)
            line = m.group(2)
        for stmt in (x.strip() for x in line.split(";")):
            if stmt and not stmt.startswith("."):                 # not .reg / .loc / .maxnreg ...
                insts.append((no, stmt, tuple(scopes[1:])))
    starts = {0} | set(labels.values())
    for i, (_, stmt, _) in enumerate(insts):
        if re.match(r"^(@!?%?\w+\s+)?(bra|ret|exit)\b", stmt):
            starts.add(i + 1)
    order = sorted(s for s in starts if s < len(insts))
    index = {s: b for b, s in enumerate(order)}
    blocks, succ = [], []
    for b, s in enumerate(order):
        end = order[b + 1] if b + 1 < len(order) else len(insts)
        blocks.append([(no, stmt) for no, stmt, _ in insts[s:end]])
        no, last, sc = insts[end - 1]
        m = re.match(r"^(@!?%?\w+\s+)?(bra(?:\.uni)?)\s+([$\w]+)$", last)
        nxt = [index[end]] if end in index else []
        if m:
            key = next(((x, m.group(3)) for x in list(reversed(sc)) + [0] if (x, m.group(3)) in labels), None)
            if key is None:
                raise ValueError(f"ptx line {no}: branch to an unknown label {m.group(3)!r}")
            target = [index[labels[key]]]
            succ.append(target + (nxt if m.group(1) else []))
        elif re.match(r"^(@!?%?\w+\s+)?(ret|exit)\b", last):
            succ.append(nxt if re.match(r"^@", last) else [])
        else:
            succ.append(nxt)
    return blocks, succ


def wgmma_register_hazards(ptx: str, max_states: int = 64) -> List[str]:
    """Where `ptx` touches a register of an unfinished `wgmma.mma_async`: PTX leaves it undefined to
    access the accumulator or the register A operand of a wgmma before a `wgmma.wait_group` that
    retires its group (other wgmmas of the chain excepted), and ptxas does not repair it: a register
    A operand redefined for the next K step while the last step's MMA runs is overwritten under it.

    A data-flow pass over the basic blocks: the state is the committed groups still pending (their
    registers, oldest first) and the open group; `commit_group` closes the open group,
    `wait_group N` keeps the N newest. Paths are not told apart (a branch taken on one iteration
    and not the next is a path too), so a report may name an infeasible path. Returns one line per
    hazard ("line N: instruction ... touches %r... of an unfinished wgmma"), empty when none."""
    blocks, succ = _ptx_blocks(ptx)
    found: Dict[int, str] = {}
    seen = [set() for _ in blocks]
    work = [(0, ((), frozenset()))] if blocks else []
    while work:
        b, state = work.pop()
        if state in seen[b] or len(seen[b]) >= max_states:
            continue
        seen[b].add(state)
        groups, open_ = state
        for no, stmt in blocks[b]:
            body = re.sub(r"^@!?%?\w+\s+", "", stmt)
            if body.startswith("wgmma.mma_async"):
                lists = re.findall(r"\{([^}]*)\}", body)
                open_ = open_ | frozenset(r for lst in lists[:2] for r in _REG.findall(lst))
            elif body.startswith("wgmma.commit_group"):
                groups, open_ = groups + (open_,), frozenset()
            elif body.startswith("wgmma.wait_group"):
                n = int(re.search(r"(\d+)\s*$", body).group(1))
                groups = groups[len(groups) - n:] if n < len(groups) else groups
            elif groups or open_:
                pending = open_.union(*groups)
                hit = sorted(set(_REG.findall(body)) & pending)
                if hit and no not in found:
                    found[no] = f"line {no}: {body} touches {', '.join(hit[:4])} of an unfinished wgmma"
        for s in succ[b]:
            work.append((s, (groups, open_)))
    return [found[k] for k in sorted(found)]


def ptxas_usage(ptx: str, arch: int) -> Dict[str, int]:
    """Assemble `ptx` with Triton's bundled `ptxas -v` for sm_`arch`a; parse its resource report.

    Returns {"registers", "spill_stores", "spill_loads", "stack_bytes"} (spills and stack in
    bytes). Raises CompileUnavailable when no ptxas can be found.
    """
    path = _ptxas_path(arch)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([path, "-v", f"--gpu-name=sm_{arch}a", src, "-o", os.path.join(tmp, "k.o")],
                              capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed ({proc.returncode}):\n{log}")

    def grab(pattern: str) -> int:
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return {
        "registers": grab(r"Used (\d+) registers"),
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
        "stack_bytes": grab(r"(\d+) bytes stack frame"),
    }


def _ptxas_path(arch: int) -> str:
    try:
        from triton.backends.nvidia import compiler as nv
    except Exception as exc:  # pragma: no cover - depends on the installed Triton
        raise CompileUnavailable(f"Triton's NVIDIA backend is unavailable: {exc}") from exc
    get = getattr(nv, "get_ptxas", None)
    if get is None:
        raise CompileUnavailable("this Triton has no get_ptxas()")
    try:
        tool = get(arch)
    except TypeError:  # older Triton: get_ptxas() without an arch
        tool = get()
    path = getattr(tool, "path", tool)
    if not path or not os.path.exists(path):
        raise CompileUnavailable(f"ptxas not found ({path!r})")
    return path


if __name__ == "__main__":
    _child_main(sys.argv[1])
