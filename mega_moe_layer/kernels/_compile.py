"""Compile-only checks of Triton kernels for GPUs that are not present (sm_90a, sm_100a).

`compile_ptx` runs Triton's full pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin with the bundled
ptxas) for a chosen architecture on any machine, GPU or not, so CPU tests can prove a kernel builds
for Hopper and Blackwell and inspect the generated code. `ptxas_usage` re-assembles the PTX with
`ptxas -v` and parses registers and spills, which PTX alone does not show (spills are ptxas's).

Works with a `triton.jit` kernel; a kernel created while `TRITON_INTERPRET=1` was set cannot be
compiled (Triton's own library functions are then interpreter objects too): `CompileUnavailable`.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from typing import Any, Dict, Mapping, Optional

__all__ = ["compile_ptx", "compile_kernel", "ptxas_usage", "CompileUnavailable", "ptx_target", "ptx_entries"]


class CompileUnavailable(RuntimeError):
    """The compile check cannot run in this process (interpreter mode, no ptxas, ...)."""


def _jit_function(kernel_fn):
    import triton

    if isinstance(kernel_fn, triton.runtime.jit.JITFunction):
        return kernel_fn
    raise CompileUnavailable(
        f"{getattr(kernel_fn, '__name__', kernel_fn)!r} is not a triton.jit JITFunction (was it defined "
        "with TRITON_INTERPRET=1 set? compile checks need the interpreter off)")


def compile_kernel(kernel_fn, signature: Mapping[str, str], constexprs: Optional[Mapping[str, Any]],
                   arch: int, **options):
    """Compile `kernel_fn` for CUDA compute capability `arch` (90, 100, ...); returns Triton's
    CompiledKernel (`.asm` holds "ttir", "ttgir", "llir", "ptx", "cubin").

    signature: every parameter name -> Triton type string ("*bf16", "*i32", "i32", "fp32", ...);
        parameters listed in `constexprs` get "constexpr" (filled in here when missing).
    constexprs: parameter name -> value for `tl.constexpr` parameters (and for arguments passed as
        None, which Triton treats as constexpr).
    options: compiler options such as num_warps=4, num_stages=2, enable_fp_fusion=False.
    """
    import triton
    from triton.backends.compiler import GPUTarget

    fn = _jit_function(kernel_fn)
    constexprs = dict(constexprs or {})
    sig: Dict[str, str] = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in signature:
            sig[name] = signature[name]
        else:
            raise ValueError(f"signature: missing a type for parameter {name!r} of {fn.__name__}")
    unknown = (set(signature) | set(constexprs)) - set(fn.arg_names)
    if unknown:
        raise ValueError(f"signature/constexprs: {sorted(unknown)} are not parameters of {fn.__name__}")
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", int(arch), 32), options=dict(options))


def compile_ptx(kernel_fn, signature: Mapping[str, str], constexprs: Optional[Mapping[str, Any]],
                arch: int, **options) -> str:
    """PTX text of `kernel_fn` compiled for compute capability `arch` (see `compile_kernel`).

    Example::

        ptx = compile_ptx(my_kernel, {"x_ptr": "*bf16", "n": "i32"}, {"BLOCK": 128}, arch=100)
        assert ptx_target(ptx) == "sm_100a"
    """
    return compile_kernel(kernel_fn, signature, constexprs, arch, **options).asm["ptx"]


def ptx_target(ptx: str) -> str:
    """The `.target` of a PTX module, e.g. "sm_90a"."""
    m = re.search(r"^\s*\.target\s+(\S+?)\s*(?:,|$)", ptx, re.MULTILINE)
    if not m:
        raise ValueError("ptx: no .target directive")
    return m.group(1)


def ptx_entries(ptx: str) -> list:
    """Names of the `.entry` (kernel) functions of a PTX module."""
    return re.findall(r"\.entry\s+([A-Za-z_$][\w$]*)\s*\(", ptx)


def ptxas_usage(ptx: str, arch: int) -> Dict[str, int]:
    """Assemble `ptx` with Triton's bundled `ptxas -v` for sm_`arch`a; parse its resource report.

    Returns {"registers", "spill_stores", "spill_loads", "stack_bytes"} (bytes for spills and
    stack). Raises CompileUnavailable when no ptxas can be found.
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
