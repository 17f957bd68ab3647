"""`Launcher`: a Triton kernel launch with every argument bound, re-issued with little Python work.

`kernel[grid](*args, **kwargs)` costs 20-40 us of host time per call in `JITFunction.run`: it binds
the arguments, computes each one's specialisation key (dtype, 16-byte alignment, ...), looks the
compiled kernel up and only then launches. A layer issuing the same launches with the same buffers
on every call can skip all of that after the first time:

    launch = Launcher(_my_kernel, (num_programs,), (buf_a, buf_b, n), dict(BLOCK=128, num_warps=4))
    launch()        # first call: the ordinary kernel[grid](...) (compiles, returns the CompiledKernel)
    launch()        # later calls: CompiledKernel.run(...) straight away, on the current CUDA stream

Fast path (Triton 3.6 - 3.9, read from `JITFunction.run` of both): after the first call, a launch is
`compiled.run(grid_0, grid_1, grid_2, stream, compiled.function, compiled.packed_metadata,
launch_metadata, enter_hook, exit_hook, *values)`, `values` being every kernel parameter in
declaration order (constexprs included; the launcher skips them) with tensors replaced by their
data pointers (the C launcher accepts a Python int for a pointer). The plain `kernel[grid](...)`
call is used instead whenever that is not available: Triton's CPU interpreter, another Triton
version, a launch hook installed (e.g. a profiler's), or arguments changed in a way that may change
the specialisation (`set` below).

NOTE: tensors are bound by object and their data pointer is read once, when the fast path is built:
a bound tensor must keep its storage (no `resize_`, no `set_`) for as long as the launcher is used.
The launcher holds a reference, so the memory is not freed under it. Replace a tensor with `set`.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
import triton

__all__ = ["Launcher", "fast_path_supported"]

_JIT = getattr(triton.runtime.jit, "JITFunction", None)


def _triton_version() -> tuple:
    try:
        return tuple(int(p) for p in triton.__version__.split(".")[:2])
    except ValueError:
        return (0, 0)


#: Triton versions whose `JITFunction.run` -> `CompiledKernel.run` call this module reproduces
#: (read in the sources of 3.6.0 and 3.9.0; the launch convention is the same in both).
_FAST_VERSIONS = ((3, 6), (3, 7), (3, 8), (3, 9))


def _runtime_knobs():
    knobs = getattr(triton, "knobs", None)
    return getattr(knobs, "runtime", None)


def fast_path_supported() -> bool:
    """Whether this Triton's compiled kernels can be launched directly (see the module doc)."""
    return _JIT is not None and _triton_version() in _FAST_VERSIONS and _runtime_knobs() is not None


def _int_type(v: int) -> str:
    """The type Triton gives an int argument, even a `do_not_specialize` one (its
    `specialize_impl`): i32 when it fits, else i64 (u64 past it). A bound int may be rewritten in
    place only with one of the same type: a launch compiled for i32 cannot take an address (the C
    launcher raises OverflowError), as one whose first call saw 0 for it would otherwise be given."""
    return "i32" if -2 ** 31 <= v < 2 ** 31 else ("i64" if v < 2 ** 63 else "u64")


def _no_hooks(rt) -> bool:
    """True when no launch enter/exit hook is installed (an installed hook needs the metadata that
    only `JITFunction.run` builds: take the ordinary path then)."""
    for h in (rt.launch_enter_hook, rt.launch_exit_hook):
        if h is None:
            continue
        calls = getattr(h, "calls", None)
        if calls is None or calls:
            return False
    return True


class Launcher:
    """One kernel launch with its grid and arguments bound (see the module docstring).

    Args:
        kernel: a `triton.jit` function (or an interpreter object: then always the plain call).
        grid: tuple of 1-3 ints.
        args: positional kernel arguments.
        kwargs: keyword kernel arguments (constexprs by name) and launch options (num_warps, ...).

    Attributes:
        num_fast: launches that took the fast path (for tests and profiling).
        num_plain: launches through `kernel[grid](...)`.
    """

    __slots__ = ("kernel", "grid", "args", "kwargs", "num_fast", "num_plain", "_fast", "_names",
                 "_dns", "_rt", "_is_jit", "_index")

    def __init__(self, kernel, grid: Sequence[int], args: Sequence[Any] = (),
                 kwargs: Optional[Dict[str, Any]] = None):
        self.kernel = kernel
        self.grid = tuple(int(g) for g in grid)
        if not 1 <= len(self.grid) <= 3:
            raise ValueError(f"grid: expected 1 to 3 dimensions, got {grid!r}")
        self.args = list(args)
        self.kwargs = dict(kwargs or {})
        self.num_fast = 0
        self.num_plain = 0
        self._fast = None      # (run, function, packed_metadata, g0, g1, g2, get_stream, device, values)
        self._rt = _runtime_knobs()
        self._is_jit = _JIT is not None and isinstance(kernel, _JIT)
        names = getattr(kernel, "arg_names", None)
        if names is None and hasattr(kernel, "fn"):       # an interpreter object
            import inspect
            names = list(inspect.signature(kernel.fn).parameters)
        self._names = list(names) if names is not None else None
        self._index = {n: i for i, n in enumerate(self._names)} if self._names is not None else None
        self._dns = ({p.name for p in kernel.params if getattr(p, "do_not_specialize", False)}
                     if self._is_jit else set())

    def enable_pdl(self) -> "Launcher":
        """Launch with programmatic dependent launch (Hopper+): the kernel must take a `PDL`
        constexpr and call `sync.pdl_enter()` first when it is set; this binds PDL=True and the
        launch option launch_pdl=True (cuLaunchKernelEx with programmatic stream serialisation;
        captured into CUDA graphs as programmatic edges). A no-op for the interpreter or a kernel
        without the parameter. Call before the first launch (the fast path is built from it)."""
        if self._is_jit and self._names is not None and "PDL" in self._names and self._fast is None:
            self.kwargs.update(PDL=True, launch_pdl=True)
        return self

    @property
    def pdl(self) -> bool:
        return bool(self.kwargs.get("launch_pdl", False))

    # ------------------------------------------------------------------ launching
    def __call__(self) -> None:
        f = self._fast
        if f is not None and _no_hooks(self._rt):
            run, function, packed, g0, g1, g2, get_stream, device, values = f
            run(g0, g1, g2, get_stream(device), function, packed, None, None, None, *values)
            self.num_fast += 1
            return
        self._plain()

    def _plain(self) -> None:
        compiled = self.kernel[self.grid](*self.args, **self.kwargs)
        self.num_plain += 1
        if self._fast is None and self._is_jit and fast_path_supported():
            self._fast = self._build_fast(compiled)

    def _build_fast(self, compiled):
        if hasattr(compiled, "result"):          # an async-compile future (Triton 3.6)
            compiled = compiled.result()
        run = getattr(compiled, "run", None)
        function = getattr(compiled, "function", None)
        packed = getattr(compiled, "packed_metadata", None)
        if run is None or function is None or packed is None:
            return None
        try:
            bound = self.kernel.signature.bind(
                *self.args, **{k: v for k, v in self.kwargs.items() if k in self._names})
        except TypeError:
            return None
        bound.apply_defaults()
        values = [v.data_ptr() if isinstance(v, torch.Tensor) else v for v in bound.arguments.values()]
        if len(values) != len(self._names):
            return None
        from triton.runtime import driver
        active = driver.active
        device = active.get_current_device()
        g = self.grid + (1,) * (3 - len(self.grid))
        return (run, function, packed, g[0], g[1], g[2], active.get_current_stream, device, values)

    # ------------------------------------------------------------------ rebinding
    def set(self, name: str, value) -> None:
        """Replace the bound argument `name` (a kernel parameter).

        Cheap (the fast path stays) for a tensor of the same dtype whose data pointer has the same
        16-byte alignment, and for an int parameter declared `do_not_specialize` whose Triton type
        (i32 / i64, `_int_type`) stays the same; anything else
        may change the compiled specialisation, so the next launch takes the ordinary path (which
        finds or compiles the right kernel) and rebuilds the fast path from it. Setting the value
        already bound (the same tensor object, an equal scalar) does nothing.
        """
        if name in self.kwargs:
            old = self.kwargs[name]
            if old is value:
                return
            self.kwargs[name] = value
        else:
            i = self._index.get(name) if self._index is not None else None
            if i is None or i >= len(self.args):
                raise KeyError(f"{name!r} is not a bound argument of {getattr(self.kernel, '__name__', self.kernel)}")
            old = self.args[i]
            if old is value or (type(value) is int and type(old) is int and old == value):
                return
            self.args[i] = value
        f = self._fast
        if f is None:
            return
        i = self._index[name]
        if isinstance(value, torch.Tensor) and isinstance(old, torch.Tensor):
            p, q = value.data_ptr(), old.data_ptr()
            if value.dtype == old.dtype and (p & 15 == 0) == (q & 15 == 0):
                f[8][i] = p
                return
        elif name in self._dns and type(value) is int and type(old) is int and _int_type(value) == _int_type(old):
            f[8][i] = value
            return
        self._fast = None

    def setter(self, *names: str):
        """A function `update(*values)` that `set`s the arguments `names` (in this order) at the
        least host cost: a tensor whose dtype and 16-byte alignment class equal the bound one's,
        or a `do_not_specialize` int of the bound one's type, is written straight into the fast path; anything else goes
        through `set`. For the few arguments a caller changes on every launch."""
        idx = [self._index[n] for n in names]
        if any(i >= len(self.args) for i in idx):
            raise KeyError(f"{names!r}: not all bound positionally")
        dns = [n in self._dns for n in names]
        setv = self.set

        def update(*values):
            f = self._fast
            args = self.args
            for name, i, d, v in zip(names, idx, dns, values):
                old = args[i]
                if old is v:
                    continue
                if f is not None:
                    if type(v) is int:
                        if d and type(old) is int and _int_type(v) == _int_type(old):
                            args[i] = v
                            f[8][i] = v
                            continue
                    elif isinstance(v, torch.Tensor) and isinstance(old, torch.Tensor) and v.dtype == old.dtype:
                        p = v.data_ptr()
                        if (p & 15 == 0) == (old.data_ptr() & 15 == 0):
                            args[i] = v
                            f[8][i] = p
                            continue
                setv(name, v)
                f = self._fast
        return update

    def set_grid(self, grid: Sequence[int]) -> None:
        """Replace the grid (never part of the specialisation: the fast path stays)."""
        if grid == self.grid:
            return
        self.grid = tuple(int(g) for g in grid)
        f = self._fast
        if f is not None:
            g = self.grid + (1,) * (3 - len(self.grid))
            self._fast = f[:3] + (g[0], g[1], g[2]) + f[6:]

    @property
    def is_fast(self) -> bool:
        """Whether the next launch takes the fast path (no hook installed assumed)."""
        return self._fast is not None
