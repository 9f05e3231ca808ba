"""Failure patterns found by bench/zoo.py (torchvision and timm), as small models.

The automatic leaf fallback: where a submodule defeats both torch.fx and torch.export, the rest of
the model is traced and that submodule is kept as one opaque ``call_module`` operation, recorded
in ``graph.leaves`` with the reason. torchvision and timm are used only when installed.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import archir
from archir.errors import TraceError
from archir.passes.base import PassManager
from archir.passes.edge_choice import EdgeChoice, valid_choices


class ValueGate(nn.Module):
    """Branches on tensor values: neither tracer can follow it."""

    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        y = self.conv(x)
        if y.mean() > 0:
            return y * 2
        return y - 1


class Block(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.pre = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        self.gate = ValueGate(c)

    def forward(self, x):
        return x + self.gate(self.pre(x))


class Net(nn.Module):
    """Two blocks, each with a value-dependent submodule: two automatic leaves."""

    def __init__(self, c=4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(Block(c), Block(c))
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class HelperCall(nn.Module):
    """The parent calls a method of the failing submodule other than forward: keeping the
    submodule opaque does not help, so the parent is kept opaque instead."""

    def __init__(self):
        super().__init__()
        self.inner = ValueGate(4)
        self.lin = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.lin(self.inner.forward(x))


class HelperNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.part = HelperCall()

    def forward(self, x):
        x = self.stem(x)
        return self.part(x) + x


class TwoInputGate(nn.Module):
    def forward(self, a, b):
        if (a * b).sum() > 0:
            return a + b
        return a - b


class TwoInputNet(nn.Module):
    """An opaque submodule taking two tensors: a join of kind 'other'."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.mix = TwoInputGate()

    def forward(self, x):
        return self.mix(self.a(x), self.b(x)).relu()


class RootValueBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        return y if y.sum() > 0 else -y


def _check_roundtrip(model, x, modes=("eval", "train")):
    graph = archir.trace(model, x)
    graph.verify()
    lowered = graph.to_module()
    for mode in modes:
        model.train(mode == "train")
        lowered.train(mode == "train")
        for seed in (0, 1):
            xs = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
            with torch.no_grad():
                assert torch.equal(model(xs), lowered(xs))
    model.eval()
    return graph


def test_auto_leaf_keeps_only_the_failing_submodules_opaque():
    torch.manual_seed(0)
    model = Net().eval()
    graph = _check_roundtrip(model, torch.randn(2, 3, 6, 6))
    assert graph.frontend == "fx"
    assert sorted(graph.leaves) == ["blocks.0.gate", "blocks.1.gate"]
    reason = graph.leaves["blocks.0.gate"]
    assert "torch.fx" in reason and "torch.export" in reason and "test_zoo_patterns.py" in reason
    called = {op.target for e in graph.edges.values() for op in e.ops if op.kind == "call_module"}
    assert {"blocks.0.gate", "blocks.0.pre.0", "blocks.0.pre.1", "stem", "head"} <= called
    assert "blocks.0.gate.conv" not in called  # inside the opaque leaf


def test_auto_leaf_edge_can_take_none_or_identity_and_edgechoice_starts_exact():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 6, 6)
    graph = archir.trace(model, x, granularity="block")
    leaf_edges = [e for e in graph.edges.values() if any(op.target == "blocks.0.gate" for op in e.ops)]
    assert len(leaf_edges) == 1
    assert set(valid_choices(graph, leaf_edges[0])) == {"none", "identity", "same"}
    PassManager([EdgeChoice("full")])(graph)
    with torch.no_grad():
        assert torch.equal(graph.to_module().eval()(x), model(x))


def test_auto_leaf_falls_back_to_the_enclosing_module():
    torch.manual_seed(0)
    graph = _check_roundtrip(HelperNet().eval(), torch.randn(2, 3, 5, 5))
    assert list(graph.leaves) == ["part"]


def test_auto_leaf_with_two_tensor_inputs_is_an_other_join():
    torch.manual_seed(0)
    graph = _check_roundtrip(TwoInputNet().eval(), torch.randn(3, 6))
    assert list(graph.leaves) == ["mix"]
    joins = [j for j in graph.junctions.values() if j.combine is not None]
    assert [j.combine.kind for j in joins] == ["other"]


def test_failure_in_the_root_still_raises_trace_error():
    with pytest.raises(TraceError) as info:
        archir.trace(RootValueBranch(), torch.randn(2, 4))
    assert "test_zoo_patterns.py" in (info.value.location or "")


def test_no_auto_leaves_with_an_explicit_frontend():
    with pytest.raises(TraceError):
        archir.trace(Net(), torch.randn(2, 3, 6, 6), frontend="fx")


def test_emitter_refuses_an_opaque_custom_leaf_clearly(tmp_path):
    """Documented limit: model.py may import only torch, so a user-defined module kept opaque
    cannot be written out; the error names the module."""
    from archir.backends.standalone import StandaloneError, emit_standalone

    graph = archir.trace(Net().eval(), torch.randn(2, 3, 6, 6))
    with pytest.raises(StandaloneError, match="gate"):
        emit_standalone(graph.to_module(), tmp_path)


def test_user_given_leaf_is_recorded_as_requested():
    graph = archir.trace(Net().eval(), torch.randn(2, 3, 6, 6), leaf_modules=["blocks.0.gate"])
    assert graph.leaves["blocks.0.gate"] == "requested"
    assert list(graph.leaves) == ["blocks.0.gate", "blocks.1.gate"]


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm2d subclass outside torch.nn (so traced through) calling
    F.batch_norm, then an in-place activation module."""

    def __init__(self, c):
        super().__init__(c)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        x = nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                     self.training, self.momentum, self.eps)
        return self.act(x)


class ShapeAssertBNAct(nn.Module):
    """timm bat_resnext26ts: a shape check defeats torch.fx; under torch.export the in-place
    activation then reads item 0 of batch norm's ATen tuple, which is not a view."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = BatchNormAct(4)

    def forward(self, x):
        torch._assert(x.shape[-1] % 2 == 0, "even width")
        if x.shape[-1] > 4:
            x = x[..., ::2]
        return self.bn(self.conv(x))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_export_inplace_activation_after_functional_batch_norm(mode):
    torch.manual_seed(0)
    model = ShapeAssertBNAct().train(mode == "train")
    x = torch.randn(2, 3, 6, 6)
    graph = archir.trace(model, x)
    assert graph.frontend == "export" and not graph.leaves
    lowered = graph.to_module().train(mode == "train")
    ref = ShapeAssertBNAct().train(mode == "train")
    ref.load_state_dict(model.state_dict())
    assert torch.equal(lowered(x), ref(x))


class FlattenInplaceDropout(nn.Module):
    """torchvision EfficientNet's head: Dropout(inplace=True) on torch.flatten's view; nothing
    else reads the flattened value, so making the dropout out of place keeps the function."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.5, inplace=True), nn.Linear(4, 3))

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.conv(x)), 1))


class ViewReadAfterInplace(nn.Module):
    """The base of the updated view is read afterwards: must not be made out of place by fx."""

    def forward(self, x):
        y = x * 2
        v = y.view(-1)
        v.relu_()
        return y + 1


def test_inplace_on_an_unshared_view_stays_with_fx():
    torch.manual_seed(0)
    model = FlattenInplaceDropout()
    x = torch.randn(4, 3, 6, 6)
    graph = archir.trace(model, x)
    assert graph.frontend == "fx" and not graph.leaves
    lowered = graph.to_module()
    for mode in (False, True):
        model.train(mode), lowered.train(mode)
        torch.manual_seed(1)
        a = model(x)
        torch.manual_seed(1)
        assert torch.equal(a, lowered(x))


def test_inplace_on_a_view_whose_base_is_read_later_goes_to_export():
    model = ViewReadAfterInplace()
    x = torch.randn(3, 4)
    graph = archir.trace(model, x)
    assert graph.frontend == "export"
    assert torch.equal(graph.to_module()(x), model(x))


class OptionalMask(nn.Module):
    """timm's ViTs: ``forward(x, attn_mask=None)`` and a flag with a default; only x is given."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, attn_mask=None, pre_logits: bool = False):
        y = self.lin(x)
        if attn_mask is not None:
            y = y + attn_mask
        return y if pre_logits else y.relu()


def test_forward_arguments_not_given_are_traced_at_their_defaults():
    model = OptionalMask()
    x = torch.randn(2, 4)
    graph = archir.trace(model, x)
    assert graph.frontend == "fx" and len(graph.inputs) == 1
    assert torch.equal(graph.to_module()(x), model(x))


# ---- stochastic depth (torchvision.ops.StochasticDepth, timm DropPath) ---------------------------

def _reference_drop_path(x, p, training, scale_by_keep=True):
    """timm's drop_path and torchvision's stochastic_depth(mode="row"), written out."""
    if p == 0.0 or not training:
        return x
    keep = 1 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    if keep > 0.0 and scale_by_keep:
        mask.div_(keep)
    return x * mask


class DropPath(nn.Module):
    """Stands in for timm's class in CI (timm is not installed there): same module path, same
    attributes, same forward. With timm installed, the real class is tested below too."""

    def __init__(self, drop_prob=0.0, scale_by_keep=True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x):
        return _reference_drop_path(x, self.drop_prob, self.training, self.scale_by_keep)


DropPath.__module__ = "timm.layers.drop"


class DropPathNet(nn.Module):
    def __init__(self, drop_path=DropPath):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.drop = drop_path(0.3)

    def forward(self, x):
        return x + self.drop(self.conv(x))


def _same_under_seed(a, b, x, seed=5):
    torch.manual_seed(seed)
    ya = a(x)
    torch.manual_seed(seed)
    return torch.equal(ya, b(x))


@pytest.mark.parametrize("traced_in", ["train", "eval"])
def test_drop_path_follows_train_and_eval_after_tracing(traced_in, tmp_path):
    """fx would bake ``self.training`` into the graph; archir keeps a StochasticDepth module."""
    from archir.layers import StochasticDepth

    model = DropPathNet().train(traced_in == "train")
    x = torch.randn(8, 3, 6, 6)
    graph = archir.trace(model, x)
    gm = graph.to_module()
    kinds = [type(m) for name, m in gm.named_modules() if name]
    assert StochasticDepth in kinds and DropPath not in kinds
    for mode in (True, False):
        model.train(mode)
        gm.train(mode)
        assert _same_under_seed(model, gm, x)  # same random mask in training, identity in eval
    model.train()
    gm.train()
    torch.manual_seed(0)
    assert not torch.equal(gm(x), gm(x))  # it really drops in training
    emitted = archir.transform(model, x, epochs=0, onnx=False, out=tmp_path / "o", progress=False)
    src = (tmp_path / "o" / "model.py").read_text()
    assert "class StochasticDepth(torch.nn.Module):" in src
    imports = [ln for ln in src.splitlines() if ln.lstrip().startswith(("import ", "from "))]
    assert imports and not [ln for ln in imports if "archir" in ln]
    import importlib.util
    spec = importlib.util.spec_from_file_location("emitted_dp", tmp_path / "o" / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    slim = mod.load_model()
    for mode in (True, False):
        slim.train(mode)
        emitted.module.train(mode)
        assert _same_under_seed(emitted.module, slim, x)


def test_functional_torchvision_stochastic_depth_becomes_a_module():
    from archir.frontends.normalize import dropout_to_modules
    from archir.layers import StochasticDepth

    def stochastic_depth(input, p, mode, training=True):  # torchvision's signature and module
        return _reference_drop_path(input, p, training)

    stochastic_depth.__module__ = "torchvision.ops.stochastic_depth"
    root = nn.Module().train()
    g = torch.fx.Graph()
    g.output(g.call_function(stochastic_depth, (g.placeholder("x"), 0.2, "row", True)))
    assert dropout_to_modules(g, root) == 1
    (layer,) = root.children()
    assert isinstance(layer, StochasticDepth) and layer.p == 0.2 and layer.mode == "row"


def test_stochastic_depth_batch_mode_and_bad_arguments():
    from archir.layers import StochasticDepth

    layer = StochasticDepth(0.5, "batch").train()
    torch.manual_seed(1)
    y = layer(torch.ones(16, 4))
    assert len(set(y.flatten().tolist())) == 1  # one draw for the whole batch
    with pytest.raises(ValueError, match="drop probability"):
        StochasticDepth(1.5)
    with pytest.raises(ValueError, match="mode"):
        StochasticDepth(0.1, "col")


# ---- a forward that fills a cache on the module (timm's attention_bias_cache) ----------------------

class CachedBias(nn.Module):
    """In eval mode timm's LeViT/EfficientFormer attention caches a tensor in a dict attribute."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(4))
        self.cache = {}

    def forward(self, x):
        if self.training:
            return x + self.bias
        if "b" not in self.cache:
            self.cache["b"] = self.bias * 2
        return x + self.cache["b"]


def test_tracing_never_writes_into_the_users_module_caches():
    model = CachedBias().eval()
    x = torch.randn(2, 4)
    first = archir.trace(model, x)
    assert model.cache == {}  # fx stored a proxy in the copy's cache, not in the user's
    second = archir.trace(model, x)  # before the fix: "referenced nonexistent value"
    for g in (first, second):
        assert torch.equal(g.to_module().eval()(x), model(x))


# ---- EdgeChoice at batch 1 on channels-last activations ----------------------------------------

class ChannelsLastBlock(nn.Module):
    """LayerNorm over channels by permuting: the activations are channels-last from then on."""

    def __init__(self, c=8):
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.pw = nn.Conv2d(c, c, 1, bias=False)
        self.reduce = nn.Conv2d(c, c, 3, stride=2, padding=1, bias=False)

    def forward(self, x):
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        y = nn.functional.gelu(self.dw(x))
        y = y * torch.sigmoid(y.mean((2, 3), keepdim=True))
        return self.reduce(self.pw(y) + x)


def test_edgechoice_keeps_memory_format_so_batch_one_is_exact():
    """A pass-through that restrides the size-1 batch dimension changes the memory format a
    conv downstream picks, and with it the rounding (gcvit, focalnet in the timm sweep)."""
    torch.manual_seed(0)
    model = ChannelsLastBlock().eval()
    x = torch.randn(1, 8, 16, 16)
    graph = archir.trace(model, x)
    PassManager([EdgeChoice("cell")])(graph)
    with torch.no_grad():
        assert torch.equal(graph.to_module().eval()(x), model(x))


# ---- the real zoos, when installed (not in CI) ---------------------------------------------------

def test_torchvision_resnet18_roundtrip():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    graph = archir.trace(model, x)
    with torch.no_grad():
        assert torch.equal(graph.to_module().eval()(x), model(x))


def test_timm_attention_model_roundtrip():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("botnet26t_256", pretrained=False).eval()
    x = torch.randn(1, 3, 256, 256)
    graph = archir.trace(model, x)
    with torch.no_grad():
        assert torch.equal(graph.to_module().eval()(x), model(x))


def test_torchvision_stochastic_depth_and_swin_helpers_emit(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.swin_t(weights=None).eval()  # stochastic depth 0.2 by default
    x = torch.randn(1, 3, 64, 64)
    res = archir.transform(model, x, epochs=0, onnx=False, out=tmp_path / "o", progress=False)
    src = (tmp_path / "o" / "model.py").read_text()
    assert "StochasticDepth(p=" in src and "# inlined from torchvision.models.swin_transformer" in src
    with torch.no_grad():
        assert torch.equal(res.module.eval()(x), model(x))


def test_timm_drop_path_is_replaced():
    timm = pytest.importorskip("timm")
    from archir.layers import StochasticDepth

    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False, drop_path_rate=0.2).train()
    x = torch.randn(2, 3, 64, 64)
    gm = archir.trace(model, x).to_module()
    assert any(isinstance(m, StochasticDepth) for m in gm.modules())
    assert _same_under_seed(model, gm, x)
