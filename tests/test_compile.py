"""Backends behind one interface, and `torch.compile` of models holding `MegaMoE` (CPU).

- the torch backend compiles (graph breaks at its host reads are allowed) and gives the eager
  output bitwise;
- the custom op path (`nvshmem_backend.CompiledForwardMixin`, the GPU forward's compile route)
  traces with `fullgraph=True` and no graph break: exercised here with a stand-in whose real work
  is the torch backend (the GPU forward itself: tests/test_compile_gpu.py).
"""
import inspect

import pytest
import torch
import torch.nn as nn

import mega_moe_layer as mml
from mega_moe_layer import layer as layer_mod
from mega_moe_layer.backend import ExpertsBackend
from mega_moe_layer.nvshmem_backend import CompiledForwardMixin
from mega_moe_layer.torch_backend import TorchBackend
from utils import assert_bitwise, make_inputs, make_weights


def _cfg(**kw):
    base = dict(hidden=256, intermediate=128, num_experts=8, topk=2, max_tokens_per_rank=32)
    return mml.MegaMoEConfig(**{**base, **kw})


def _model(cfg, validate=True, shared=64):
    torch.manual_seed(0)
    moe = mml.MegaMoE(cfg, device="cpu", backend="torch", shared_intermediate=shared, validate=validate)
    moe.experts.load_weights(*make_weights(cfg))
    return moe


class _Block(nn.Module):
    """A small model: a norm, the MoE layer, a residual."""

    def __init__(self, moe):
        super().__init__()
        self.norm = nn.LayerNorm(moe.cfg.hidden, dtype=torch.bfloat16)
        self.moe = moe

    def forward(self, x):
        return x + self.moe(self.norm(x))


class _OpStandIn(CompiledForwardMixin):
    """The custom-op route of the GPU forward, with the torch backend doing the work."""

    name = "op-stand-in"

    def __init__(self, inner: TorchBackend):
        self.inner, self.stats, self.error_count = inner, inner.stats, inner.error_count
        self.validate = False
        self._register()

    def prepare_weights(self, qw13, qw2):
        self.inner.prepare_weights(qw13, qw2)

    def check_errors(self):
        return None

    def _forward_impl(self, x, topk_idx, topk_weights):
        self.inner.validate = self.validate
        return self.inner.forward(x, topk_idx, topk_weights)


def test_backends_implement_the_interface_and_layer_keeps_modules():
    m = mml.MegaMoEExperts(_cfg(), device="cpu", backend="torch")
    assert isinstance(m._backend, TorchBackend) and isinstance(m._backend, ExpertsBackend)
    from mega_moe_layer.nvshmem_backend import NvshmemForward
    for cls in (TorchBackend, NvshmemForward):
        for name in ("prepare_weights", "forward", "check_errors"):
            assert callable(getattr(cls, name)), (cls, name)
    assert m._backend.needs_loaded_weights is True        # the reference reads the loaded weights
    own = [v for k, v in vars(layer_mod).items() if inspect.isclass(v) and v.__module__ == layer_mod.__name__]
    assert own and all(issubclass(c, nn.Module) for c in own), own
    m.validate = False
    assert m._backend.validate is False and m.validate is False


def test_load_weights_ends_in_install_weights(monkeypatch):
    cfg = _cfg()
    m = mml.MegaMoEExperts(cfg, device="cpu", backend="torch")
    seen = []
    orig = m._backend.prepare_weights
    monkeypatch.setattr(m._backend, "prepare_weights", lambda a, b: (seen.append((a, b)), orig(a, b)))
    m.load_weights(*make_weights(cfg))
    assert len(seen) == 1 and seen[0] == (m.w13, m.w2)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_backend_model_compiles_and_matches_eager(backend):
    torch._dynamo.reset()
    cfg = _cfg()
    block = _Block(_model(cfg))
    x = make_inputs(cfg, 13, seed=1)[0]
    with torch.no_grad():
        y_eager = block(x)
        y_comp = torch.compile(block, backend=backend)(x)
    assert_bitwise(y_comp, y_eager, f"compiled ({backend}) vs eager")


def test_custom_op_route_fullgraph_no_graph_break():
    torch._dynamo.reset()
    cfg = _cfg()
    moe = _model(cfg, validate=False)
    moe.experts._backend = _OpStandIn(moe.experts._backend)
    block = _Block(moe)
    x = make_inputs(cfg, 11, seed=2)[0]
    with torch.no_grad():
        y_eager = block(x)
        stats_eager = moe.experts.last_local_expert_recv_stats.clone()
        explain = torch._dynamo.explain(block)(x)
        assert explain.graph_break_count == 0, explain.break_reasons
        assert explain.graph_count == 1
        torch._dynamo.reset()
        compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
        before = moe.experts.cumulative_local_expert_recv_stats.clone()
        y_comp = compiled(x)
        assert_bitwise(y_comp, y_eager, "fullgraph compiled vs eager")
        # the op's declared mutations reach the layer's statistics
        assert torch.equal(moe.experts.last_local_expert_recv_stats, stats_eager)
        assert torch.equal(moe.experts.cumulative_local_expert_recv_stats - before, stats_eager)
        # new inputs, other T (dynamic or recompiled): still equal
        x2 = make_inputs(cfg, 5, seed=3)[0]
        assert_bitwise(compiled(x2), block(x2), "second shape")


def test_fake_impl_gives_y_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(7, 256, dtype=torch.bfloat16)
        idx = torch.empty(7, 2, dtype=torch.int64)
        w = torch.empty(7, 2)
        e = torch.empty(1, dtype=torch.int32)
        s = torch.empty(8, dtype=torch.int32)
        y = torch.ops.mega_moe.experts_forward(x, idx, w, e, s, s.clone(), 0)
    assert y.shape == (7, 256) and y.dtype == torch.bfloat16
