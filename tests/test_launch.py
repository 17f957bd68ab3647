"""`kernels._launch.Launcher`: bound launches. CPU: the interpreter (plain path); GPU (`-m gpu`):
the fast path is taken and launches what `kernel[grid](...)` launches, also inside a CUDA graph."""
import pytest
import torch
import triton
import triton.language as tl

from mega_moe_layer.kernels._launch import Launcher, _int_type, fast_path_supported
from mega_moe_layer.kernels.sync import pdl_enter


@triton.jit(do_not_specialize=["scale"])
def _axpb_kernel(x_ptr, y_ptr, n, scale, BLOCK: tl.constexpr, ADD: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=m) * scale + ADD, mask=m)


@triton.jit
def _shift_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """y[i] = x[i - 1] + 1 (reads what the previous launch wrote): a PDL chain link."""
    if PDL:
        pdl_enter()
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    tl.store(y_ptr + i, tl.load(x_ptr + i - 1, mask=m & (i > 0), other=0) + 1, mask=m)


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _case(n=300, dev=None):
    dev = dev or _dev()
    x = torch.arange(n, dtype=torch.int32, device=dev)
    y = torch.zeros(n, dtype=torch.int32, device=dev)
    return x, y


def test_plain_path_on_cpu_and_rebinding():
    if torch.cuda.is_available():
        pytest.skip("CPU interpreter check")
    x, y = _case()
    n = x.numel()
    launch = Launcher(_axpb_kernel, (triton.cdiv(n, 128),), (x, y, n, 3), dict(BLOCK=128, ADD=1))
    launch()
    assert torch.equal(y, x * 3 + 1)
    launch.set("scale", 5)
    launch()
    assert torch.equal(y, x * 5 + 1)
    y2 = torch.zeros_like(y)
    launch.set("y_ptr", y2)
    launch.set("ADD", 2)
    launch()
    assert torch.equal(y2, x * 5 + 2)
    assert launch.num_plain == 3 and launch.num_fast == 0 and not launch.is_fast
    with pytest.raises(KeyError):
        launch.set("nope", 1)
    # setter: several arguments at once (no fast path here: each goes through `set`)
    update = launch.setter("y_ptr", "scale")
    y3 = torch.zeros_like(y)
    update(y3, 4)
    launch()
    assert torch.equal(y3, x * 4 + 2) and launch.args[1] is y3 and launch.args[3] == 4
    with pytest.raises(KeyError):
        launch.setter("nope")
    with pytest.raises(ValueError):
        Launcher(_axpb_kernel, (), ())


def _scale_fn(x_ptr, y_ptr, n, scale, BLOCK: tl.constexpr):
    pass


def test_int_type_is_tritons():
    """`_int_type` gives an int the type Triton's specialisation gives it (i32 / i64 / u64)."""
    try:
        from triton.runtime.jit import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:
        pytest.skip(f"Triton {triton.__version__}: no native_specialize_impl")
    for v in (0, 1, 7, 2 ** 31 - 1, 2 ** 31, -2 ** 31, -2 ** 31 - 1, 0x7F3C_D599_4BF0, 2 ** 63 - 1, 2 ** 63):
        assert _int_type(v) == native_specialize_impl(BaseBackend, v, False, False, True)[0], v


def test_int_rebinding_keeps_the_compiled_type():
    """A `do_not_specialize` int is rewritten in the fast path only within its Triton type: a launch
    compiled with 0 there (i32) and then given an address (i64) is rebuilt, never handed a value
    its C launcher rejects (OverflowError: the layer's pre-dispatch, first called with no tokens,
    had y's address 0). Checked on a JIT function's bound launch, the fast path as `_build_fast`
    leaves it (no launch: CPU)."""
    kernel = triton.runtime.jit.JITFunction(_scale_fn, do_not_specialize=["scale"])
    x, y = _case(dev="cpu")

    def bound(scale):
        launch = Launcher(kernel, (1,), (x, y, x.numel(), scale), dict(BLOCK=128))
        values = [x.data_ptr(), y.data_ptr(), x.numel(), scale, 128]
        launch._fast = (None, None, None, 1, 1, 1, None, None, values)
        return launch, values

    launch, values = bound(0)
    launch.set("scale", 7)                       # i32 -> i32: in place
    assert launch.is_fast and values[3] == 7
    launch.set("scale", 0x7F3C_D599_4BF0)        # i32 -> i64: rebuilt by the next launch
    assert not launch.is_fast and launch.args[3] == 0x7F3C_D599_4BF0
    launch, values = bound(0)
    update = launch.setter("y_ptr", "scale")
    update(y, 9)
    assert launch.is_fast and values[3] == 9
    update(y, 1 << 40)
    assert not launch.is_fast and launch.args[3] == 1 << 40
    launch, values = bound(1 << 40)              # i64 -> i64: in place
    update = launch.setter("scale")
    update(1 << 41)
    assert launch.is_fast and values[3] == 1 << 41
    update(3)
    assert not launch.is_fast


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_fast_path_matches_plain_and_is_taken():
    assert fast_path_supported(), f"Triton {triton.__version__}: no fast path"
    x, y = _case(5000)
    n = x.numel()
    ref = torch.zeros_like(y)
    _axpb_kernel[(triton.cdiv(n, 256),)](x, ref, n, 7, BLOCK=256, ADD=3)
    launch = Launcher(_axpb_kernel, (triton.cdiv(n, 256),), (x, y, n, 7), dict(BLOCK=256, ADD=3))
    launch()                                   # plain, builds the fast path
    assert launch.is_fast
    y.zero_()
    launch()
    torch.cuda.synchronize()
    assert launch.num_fast == 1 and launch.num_plain == 1
    assert torch.equal(y, ref)
    # cheap rebinding: a new output of the same alignment, a do_not_specialize scalar
    y2 = torch.zeros_like(y)
    launch.set("y_ptr", y2)
    launch.set("scale", 2)
    assert launch.is_fast
    launch()
    torch.cuda.synchronize()
    assert torch.equal(y2, x * 2 + 3) and launch.num_fast == 2
    # a specialised argument change drops to the plain path once, then fast again
    launch.set("ADD", 4)
    assert not launch.is_fast
    launch()
    launch()
    torch.cuda.synchronize()
    assert torch.equal(y2, x * 2 + 4) and launch.num_plain == 2 and launch.num_fast == 3
    # setter: a new tensor of the same alignment and a do_not_specialize int stay on the fast path;
    # a tensor of another dtype (a new specialisation) takes the plain path once
    update = launch.setter("y_ptr", "scale")
    y4 = torch.zeros_like(y)
    update(y4, 6)
    assert launch.is_fast and launch.args[1] is y4
    launch()
    torch.cuda.synchronize()
    assert torch.equal(y4, x * 6 + 4) and launch.num_fast == 4
    x64, y64 = x.to(torch.int64), torch.zeros(n, dtype=torch.int64, device=x.device)
    launch.set("x_ptr", x64)
    update(y64, 6)
    assert not launch.is_fast
    launch()
    torch.cuda.synchronize()
    assert torch.equal(y64, x64 * 6 + 4) and launch.num_plain == 3
    launch.set("x_ptr", x)
    update(y2, 2)
    launch()
    launch()
    torch.cuda.synchronize()
    assert torch.equal(y2, x * 2 + 4) and launch.is_fast
    # on a side stream and inside a CUDA graph
    y2.zero_()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        launch()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        launch()
    x.add_(1)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y2, x * 2 + 4)


def test_enable_pdl_binds_only_where_it_applies():
    """enable_pdl binds PDL / launch_pdl for a compiled kernel with a PDL parameter; a kernel
    without one, or Triton's interpreter, is left as it was."""
    x, y = _case(64)
    plain = Launcher(_axpb_kernel, (1,), (x, y, 64, 2), dict(BLOCK=64, ADD=0)).enable_pdl()
    assert not plain.pdl and "PDL" not in plain.kwargs
    chained = Launcher(_shift_kernel, (1,), (x, y, 64), dict(BLOCK=64)).enable_pdl()
    if torch.cuda.is_available():
        assert chained.pdl and chained.kwargs["PDL"] is True
    else:                       # the interpreter: no griddepcontrol there
        assert not chained.pdl and "PDL" not in chained.kwargs
        chained()
        assert torch.equal(y[1:], x[:-1] + 1) and int(y[0]) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_pdl_chain_in_a_cuda_graph():
    """Eight dependent launches with programmatic dependent launch, each reading the previous
    one's output, direct and replayed from a CUDA graph: every link sees the whole previous
    result (y = x shifted by 8, plus 8)."""
    n, block = 1 << 16, 1024
    bufs = [torch.arange(n, dtype=torch.int32, device="cuda")] + [torch.zeros(n, dtype=torch.int32, device="cuda")
                                                                   for _ in range(8)]
    links = [Launcher(_shift_kernel, (n // block,), (bufs[i], bufs[i + 1], n), dict(BLOCK=block)).enable_pdl()
             for i in range(8)]
    assert all(l.pdl for l in links)
    expect = torch.arange(n, dtype=torch.int32, device="cuda") - 8 + 8
    expect[:8] = torch.arange(1, 9, dtype=torch.int32, device="cuda")
    for _ in range(2):                     # plain, then fast
        for b in bufs[1:]:
            b.zero_()
        for l in links:
            l()
        torch.cuda.synchronize()
        assert torch.equal(bufs[-1], expect)
    assert all(l.is_fast for l in links)
    g = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        g.capture_begin()
        for l in links:
            l()
        g.capture_end()
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(3):
        for b in bufs[1:]:
            b.zero_()
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(bufs[-1], expect)
