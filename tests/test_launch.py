"""`kernels._launch.Launcher`: bound launches. CPU: the interpreter (plain path); GPU (`-m gpu`):
the fast path is taken and launches what `kernel[grid](...)` launches, also inside a CUDA graph."""
import pytest
import torch
import triton
import triton.language as tl

from mega_moe_layer.kernels._launch import Launcher, fast_path_supported


@triton.jit(do_not_specialize=["scale"])
def _axpb_kernel(x_ptr, y_ptr, n, scale, BLOCK: tl.constexpr, ADD: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=m) * scale + ADD, mask=m)


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
