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
