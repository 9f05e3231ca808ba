"""Failure patterns found by bench/zoo.py (torchvision and timm), as small models.

The automatic leaf fallback: where a submodule defeats both torch.fx and torch.export, the rest of
the model is traced and that submodule is kept as one opaque ``call_module`` operation, recorded
in ``graph.leaves`` with the reason. torchvision and timm are used only when installed.
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import archir
from archir.errors import TraceError
from archir.passes.base import PassManager
from archir.passes.edge_choice import EdgeChoice, valid_choices
from model_patterns import (FunctionalBatchStats, FunctionalDropoutMlp, PreNormBlock, SdpaDropoutAttention,
                            assert_same, same_outputs_in_both_modes, same_under_seed)

pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_opaque_custom_leaf_is_emitted_with_its_class_source(tmp_path):
    """A user-defined module kept opaque (torchvision's detection heads in the sweep): model.py
    holds a copy of its class, built without its ``__init__``; outputs equal in eval and train."""
    import importlib.util

    from archir.backends.standalone import emit_standalone

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 6, 6)
    graph = archir.trace(model, x)
    files = emit_standalone(graph.to_module(), tmp_path, example_inputs=(x,))
    src = files.model_py.read_text()
    assert "class ValueGate(nn.Module):" in src and "import torch.nn as nn" in src
    assert "test_zoo_patterns" not in src.replace("# copied from test_zoo_patterns.ValueGate", "")
    spec = importlib.util.spec_from_file_location("emitted_opaque", files.model_py)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    emitted = mod.load_model()
    for train in (False, True):
        emitted.train(train), model.train(train)
        with torch.no_grad():
            assert torch.equal(emitted(x), model(x))


_OUTSIDE = [2.0]  # not a literal model.py could copy


class ReadsOutside(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # neither tracer follows this: kept opaque
            return x * _OUTSIDE[0]
        return x


def test_opaque_leaf_reading_an_outside_object_is_refused_clearly(tmp_path):
    from archir.backends.standalone import StandaloneError, emit_standalone

    model = nn.Sequential(nn.Conv2d(3, 3, 1), ReadsOutside())
    graph = archir.trace(model, torch.randn(1, 3, 4, 4), leaf_modules=["1"], frontend="fx")
    with pytest.raises(StandaloneError, match=r"submodule '1'.*uses '_OUTSIDE' \(list\)"):
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
        assert same_under_seed(model, gm, x)  # same random mask in training, identity in eval
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
        assert same_under_seed(emitted.module, slim, x)


def test_drop_path_survives_an_eval_mode_export():
    """Under torch.export an eval-mode drop path is the identity and left nothing behind; it is
    exported in training mode and becomes the StochasticDepth module again."""
    from archir.layers import StochasticDepth

    torch.manual_seed(0)
    model = DropPathNet().eval()
    x = torch.randn(8, 3, 6, 6)
    gm = archir.trace(model, x, frontend="export").to_module()
    assert any(isinstance(m, StochasticDepth) for m in gm.modules())
    for mode in (True, False):
        model.train(mode), gm.train(mode)
        assert same_under_seed(model, gm, x)


def test_functional_torchvision_stochastic_depth_becomes_a_module():
    """A call marked to follow the mode (tests/test_fx_dropout.py traces whole models)."""
    from archir.frontends.mode_dropout import FOLLOW, dropout_to_modules
    from archir.layers import StochasticDepth

    def stochastic_depth(input, p, mode, training=True):  # torchvision's signature and module
        return _reference_drop_path(input, p, training)

    stochastic_depth.__module__ = "torchvision.ops.stochastic_depth"
    root = nn.Module().train()
    g = torch.fx.Graph()
    call = g.call_function(stochastic_depth, (g.placeholder("x"), 0.2, "row", True))
    call.meta[FOLLOW] = ""  # the root's code calls it
    g.output(call)
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


# ---- a wrapped helper that mutates its list argument (torchvision's video Swin) ------------------

def _clip_window(window: list, size: list) -> list:
    for i in range(len(window)):
        if size[i] <= window[i]:
            window[i] = size[i]  # mutates its argument, as torchvision's _get_window_and_shift_size
    return window


torch.fx.wrap("_clip_window")


class ClippedWindowPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        k = _clip_window([4, 4], [x.shape[2], x.shape[3]])
        return nn.functional.avg_pool2d(self.conv(x), k)


def test_wrapped_helper_may_mutate_its_list_argument():
    model = ClippedWindowPool().eval()
    x = torch.randn(1, 3, 3, 8)
    graph = archir.trace(model, x)
    assert graph.frontend == "fx"
    with torch.no_grad():
        assert torch.equal(graph.to_module()(x), model(x))


def _pad_amount(size: int, window: int) -> int:
    return (window - size % window) % window


def _pad_to_window(x: torch.Tensor, window: int) -> torch.Tensor:
    """Calls another plain function of its module, as torchvision's video Swin's
    ``shifted_window_attention_3d`` calls ``_compute_attention_mask_3d``."""
    return nn.functional.pad(x, (0, _pad_amount(x.shape[-1], window)))


torch.fx.wrap("_pad_to_window")


class PadToWindow(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return _pad_to_window(self.conv(x), 4)


def test_inlined_helper_takes_the_functions_it_calls_along(tmp_path):
    from archir.backends.standalone import emit_standalone

    x = torch.randn(1, 3, 4, 6)
    gm = archir.trace(PadToWindow().eval(), x).to_module()
    files = emit_standalone(gm, tmp_path, example_inputs=(x,))  # verified on x
    src = files.model_py.read_text()
    assert "def _pad_amount(size, window):" in src and "(called by test_zoo_patterns._pad_to_window)" in src


# ---- Hugging Face transformers' patterns, in torch only -----------------------------------------

class CacheLayer:
    """A layer of Hugging Face's ``DynamicCache``: a plain object, not a pytree type."""

    def __init__(self, keys, values):
        self.keys, self.values, self.is_initialized = keys, values, True


class KVCache:
    def __init__(self):
        self.layers = []


class TinyDecoderLayer(nn.Module):
    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.drop = nn.Dropout(0.25)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x, allowed, cache):
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        cache.layers.append(CacheLayer(k, v))
        a = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, n, d)))  # residual: a sum junction
        return x + self.drop(self.mlp(self.ln2(x)))


class TinyDecoder(nn.Module):
    """GPT-2 / Llama in miniature: token ids and an attention mask (integers) in; a dict out
    holding logits and a cache *object* (torch.fx cannot return it; torch.export needs it flattened)."""

    def __init__(self, vocab=50, d=16, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(TinyDecoderLayer(d) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask):
        n = input_ids.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=input_ids.device).tril()
        allowed = causal[None, None] & attention_mask[:, None, None, :].bool()
        x, cache = self.embed(input_ids), KVCache()
        for layer in self.layers:
            x = layer(x, allowed, cache)
        return {"logits": self.head(x), "past_key_values": cache}


def _decoder_inputs():
    ids = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, 6, dtype=torch.long)
    mask[0, -2:] = 0  # right padding
    return ids, mask


def _flat(out):
    from archir.frontends.capture import OBJECT_NODES  # noqa: F401 - (the classes it registered)

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flat(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flat(v)]
    if hasattr(out, "__dict__"):
        return [t for v in vars(out).values() for t in _flat(v)]
    return []


def test_output_object_holding_tensors_is_flattened_into_a_dict():
    torch.manual_seed(0)
    model = TinyDecoder().eval()
    x = _decoder_inputs()
    graph = archir.trace(model, x)
    graph.verify()
    assert graph.frontend == "export" and not graph.leaves
    out = graph.to_module().eval()(*x)
    assert list(out) == ["logits", "past_key_values"]
    assert list(out["past_key_values"]) == ["layers"] and list(out["past_key_values"]["layers"][0]) == \
        ["keys", "values"]
    with torch.no_grad():
        ref = model(*x)
    want, got = _flat(ref), _flat(out)
    assert len(want) == len(got) == 5 and all(torch.equal(a, b) for a, b in zip(want, got))


def test_export_keeps_dropout_modules_following_train_and_eval():
    """Traced in eval mode, an ``nn.Dropout`` call leaves no operation under torch.export; it is
    exported in training mode so that the traced model still drops out when trained."""
    torch.manual_seed(0)
    model = TinyDecoder().eval()
    x = _decoder_inputs()
    lowered = archir.trace(model, x).to_module()
    calls = [n for n in lowered.graph.nodes if n.op == "call_module"
             and isinstance(lowered.get_submodule(n.target), nn.Dropout)]
    assert len(calls) == 4  # each layer's module, called twice
    assert not any(lowered.get_submodule(n.target).training for n in calls)  # as the model was
    model.train(), lowered.train()
    for seed in (1, 2):
        torch.manual_seed(seed)
        want = model(*x)["logits"]
        torch.manual_seed(seed)
        assert torch.equal(lowered(*x)["logits"], want)
    torch.manual_seed(1)
    assert not torch.equal(model.eval()(*x)["logits"], want)  # dropout did act in training


@pytest.mark.parametrize("inner, layer", [(SdpaDropoutAttention, "TrainingDropoutAttention"),
                                          (FunctionalDropoutMlp, "Dropout")])
@pytest.mark.parametrize("traced_in", ["eval", "train"])
def test_export_makes_functional_dropout_follow_train_and_eval(inner, layer, traced_in, tmp_path):
    """torch.export fixes ``self.training`` at the traced mode; archir exports the modules that
    read it in both modes, checks that only dropout differs, and makes that dropout a module of
    the caller (``nn.Dropout``, or attention whose dropout acts in training only)."""
    from archir.backends.standalone import emit_standalone

    torch.manual_seed(0)
    model = PreNormBlock(inner()).train(traced_in == "train")
    x = torch.randn(2, 5, 16)
    gm = archir.trace(model, x, frontend="export").to_module()
    calls = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    added = [m for m in calls if type(m).__name__ == layer]
    assert len(added) == 1 and added[0].p == 0.3 and added[0].training == (traced_in == "train")
    same_outputs_in_both_modes(model, gm, x)
    files = emit_standalone(gm, tmp_path / "o", example_inputs=(x,))
    src = files.model_py.read_text()  # archir's layer is copied in: model.py needs only torch
    assert layer == "Dropout" or f"class {layer}(torch.nn.Module):" in src
    assert not [ln for ln in src.splitlines() if ln.startswith(("import ", "from ")) and "archir" in ln]
    same_outputs_in_both_modes(model, _load_emitted(files.model_py, f"emitted_{layer}_{traced_in}"), x)


def test_export_keeps_the_traced_mode_where_training_changes_more_than_dropout(caplog):
    """A module whose training mode also changes batch statistics is exported in its own mode
    (today's behaviour, with a warning giving the reason); the other module's dropout still
    follows the mode."""
    torch.manual_seed(0)
    model = nn.Sequential(PreNormBlock(FunctionalBatchStats()), PreNormBlock(FunctionalDropoutMlp())).eval()
    x = torch.randn(2, 5, 16)
    with caplog.at_level("WARNING", logger="archir.frontends.mode_dropout"):
        gm = archir.trace(model, x, frontend="export").to_module()
    assert "'0.inner' keeps the traced mode" in caplog.text and "batch_norm" in caplog.text
    added = [n.target for n in gm.graph.nodes if n.op == "call_module" and "_archir_dropout" in n.target]
    assert added == ["1.inner._archir_dropout0"]
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    model[0].eval(), gm.train()  # the first block stays at eval, as traced
    model[1].train()
    assert same_under_seed(model, gm, x)


@pytest.mark.parametrize("p, exports", [(0.0, 1), (0.3, 2)])
def test_export_runs_twice_only_where_training_draws_random_numbers(p, exports, monkeypatch):
    """A module reading ``self.training`` costs a second export only when an eager run in
    training mode draws random numbers inside it (Llama's attention dropout is 0)."""
    from archir.frontends import capture

    calls = []
    export = capture._export
    monkeypatch.setattr(capture, "_export", lambda *a: calls.append(1) or export(*a))
    archir.trace(PreNormBlock(FunctionalDropoutMlp(p=p)).eval(), torch.randn(2, 5, 16), frontend="export")
    assert len(calls) == exports


def test_exported_views_become_reshapes():
    """torch.export lowers ``reshape`` to ``view`` when the example's strides allow it; a kernel
    may lay its result out otherwise at run time (Hugging Face T5), so the graph keeps reshape."""
    model = TinyDecoder().eval()
    gm = archir.trace(model, _decoder_inputs()).to_module()
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.reshape.default in targets and torch.ops.aten.view.default not in targets


class ReshapeAfterTranspose(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        return x + self.lin(x).transpose(1, 2).reshape(x.shape[0], 4, 6)  # a copy, then a view


def test_exported_unsafe_views_become_reshapes():
    """A reshape that must copy exports as ``clone`` + ``_unsafe_view`` (timm SAM-ViT), which no
    ONNX exporter maps: the graph keeps ``reshape``, with the same values."""
    model, x = ReshapeAfterTranspose().eval(), torch.randn(2, 4, 6)
    gm = archir.trace(model, (x,), frontend="export").to_module()
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten._unsafe_view.default not in targets and torch.ops.aten.reshape.default in targets
    assert torch.equal(gm(x), model(x))


@pytest.mark.parametrize("method", ["dnat", "dso"])
def test_transformer_residuals_are_searchable_and_start_exact(method, tmp_path):
    """A transformer's residual adds are sum junctions: the attention and MLP branches become
    searchable edges, the supernet starts at the original, and so does the emitted model.py."""
    torch.manual_seed(0)
    model = TinyDecoder().eval()
    x = _decoder_inputs()
    with torch.no_grad():
        want = _flat(model(*x))
    s = archir.search(model, x, method)
    assert len(s.arch_weights()) >= 4
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(want, _flat(s.supernet.eval()(*x))))
    if method == "dnat":  # derive at initialisation keeps every edge as it was
        files = s.emit(tmp_path / "o", onnx=False)
        with torch.no_grad():
            got = _flat(_load_emitted(files["model.py"], "emitted_decoder").eval()(*x))
        assert len(got) == 5 and all(torch.equal(a, b) for a, b in zip(want, got))
    s.close()


def _load_emitted(model_py, name: str) -> nn.Module:
    """The model an emitted ``model.py`` loads (with its weights)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, model_py)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.load_model()


# ---- sizes threaded through every block (torchvision's video MViT) -------------------------------

class SizeBlock(nn.Module):
    """Takes the ``(T, H, W)`` sizes from the previous block and hands on the next ones, each
    computed from several of the previous (MViT's pooled ``thw``)."""

    def __init__(self, c=4):
        super().__init__()
        self.lin = nn.Linear(c, c)

    def forward(self, x, thw):
        t, h, w = thw
        b, n, c = x.shape
        y = self.lin(x).reshape(b, t, h, w, c).reshape(b, n, c)
        return x + y, ((t + h) // 2 + (w - h), (h + w) // 2 + (t - t), (w + t) // 2 + (h - h))


class SizeThreading(nn.Module):
    """As an fx graph the sizes after block k are a DAG of depth k; written out as an expression
    tree, each has about 6^k nodes."""

    def __init__(self, depth=30, c=4):
        super().__init__()
        self.blocks = nn.ModuleList(SizeBlock(c) for _ in range(depth))

    def forward(self, x):
        b, c, t, h, w = x.shape
        thw = (t, h, w)
        x = x.flatten(2).transpose(1, 2)
        for blk in self.blocks:
            x, thw = blk(x, thw)
        return x.reshape(b, thw[0], thw[1], thw[2], c).mean((1, 2, 3))


def test_sizes_threaded_through_many_blocks_stay_a_dag(tmp_path):
    """The IR shares a size computation wherever the traced node was used, and lowering, the text
    form, the supernet and the emitted model.py each compute it once: 30 blocks trace in well
    under a second (as a tree, 6^30 nodes) and every step is exact."""
    torch.manual_seed(0)
    model = SizeThreading().eval()
    x = torch.randn(1, 4, 2, 2, 2)
    graph = _check_roundtrip(model, x)
    lowered = graph.to_module()
    assert len(lowered.graph.nodes) < 1000  # each size node once, not once per path to it
    assert len(str(graph)) < 300_000  # shared parts named: (floordiv_3 := ...), floordiv_3
    assert "floordiv" in str(graph) and ":=" in str(graph)
    again = pickle.loads(pickle.dumps(graph))  # pickling keeps the sharing (and the depth fits)
    with torch.no_grad():
        assert torch.equal(again.to_module()(x), model(x))
    s = archir.search(model, x, "dnat")
    with torch.no_grad():
        want = model(x)
        assert torch.equal(s.supernet.eval()(x), want)
        files = s.emit(tmp_path / "o", onnx=False)
        assert torch.equal(_load_emitted(files["model.py"], "emitted_sizes").eval()(x), want)
    s.close()


# ---- helpers returning a tensor with a plain value, or changing an argument in place (MViT) -----

def _unsqueeze_to(x: torch.Tensor, ndim: int) -> tuple[torch.Tensor, int]:
    """Returns the tensor and a Python int, as torchvision's MViT ``_unsqueeze``."""
    dim = x.dim()
    return x.reshape((1,) * (ndim - dim) + tuple(x.shape)), dim


def _add_tail(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Adds into ``x`` in place and returns it, as torchvision's MViT ``_add_shortcut``."""
    x[:, 1:] += y[:, 1:]
    return x


torch.fx.wrap("_unsqueeze_to")
torch.fx.wrap("_add_tail")


class TupleAndInplaceHelpers(nn.Module):
    def __init__(self, c=6):
        super().__init__()
        self.a = nn.Linear(c, c)
        self.b = nn.Linear(c, c)
        self.out = nn.Linear(c, c)

    def forward(self, x):
        x, dim = _unsqueeze_to(x, 3)
        x = x.flatten(0, 3 - dim)  # back to the input's rank: reads the plain value
        y = self.a(x)
        _add_tail(y, self.b(x))  # the result is dropped; y is read on, changed
        return self.out(y) + y


def test_helper_results_with_plain_values_and_in_place_arguments():
    """``(tensor, int)`` is a tuple value (before: not dataflow, so the whole model ended up
    inside the output expression), and a helper's in-place change of its argument is kept
    (before: the call's result was unused, so it was dropped) and stays exact under EdgeChoice,
    whose extra paths read the same value."""
    torch.manual_seed(0)
    model = TupleAndInplaceHelpers().eval()
    x = torch.randn(4, 6)
    graph = _check_roundtrip(model, x)
    assert graph.frontend == "fx"
    called = {op.target for e in graph.edges.values() for op in e.ops if op.kind == "call_module"}
    assert {"a", "b", "out"} <= called  # on edges, not inlined into the output
    assert any(op.name == "clone" for e in graph.edges.values() for op in e.ops)
    PassManager([EdgeChoice("full")])(graph)
    with torch.no_grad():
        assert torch.equal(graph.to_module().eval()(x), model(x))


class ImageBatch:
    """Like torchvision's ``ImageList``: a batch tensor and each image's size, not a tensor."""

    def __init__(self, tensors, image_sizes):
        self.tensors, self.image_sizes = tensors, image_sizes


class ToBatch(nn.Module):
    """Like ``GeneralizedRCNNTransform``: a list of images in, an ImageBatch out; branches on values."""

    def forward(self, images):
        if images[0].abs().max() > 10:  # a value condition: no tracer follows it
            images = [i / 255 for i in images]
        batch = torch.stack([nn.functional.interpolate(i[None], size=(8, 8))[0] for i in images])
        return ImageBatch(batch, [tuple(i.shape[-2:]) for i in images])


class KeepConfident(nn.Module):
    """Like the RPN and ROI heads: a data-dependent number of detections per image, as dicts."""

    def forward(self, features, batch):
        out = []
        for i in range(len(batch.image_sizes)):
            scores = features[i].mean(0).flatten()
            n = int((scores > 0).sum())  # how many depends on the data
            out.append({"scores": scores.topk(max(n, 1)).values, "size": torch.tensor(batch.image_sizes[i])})
        return out


class DetectorGlue(nn.Module):
    """A detector's own forward: Python glue around opaque parts. It reads each image's size,
    unpacks what the opaque parts return and writes into their output (the postprocess); its
    backbone is residual and searchable. ``by_mode``: in training mode it returns a loss, as a
    torchvision detector does."""

    def __init__(self, by_mode=False):
        super().__init__()
        self.by_mode = by_mode
        self.transform = ToBatch()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.heads = KeepConfident()

    def forward(self, images):
        original_sizes = []
        for img in images:
            size = img.shape[-2:]
            torch._assert(len(size) == 2, "images are (C, H, W)")
            original_sizes.append((size[0], size[1]))
        batch = self.transform(images)
        x = torch.relu(self.stem(batch.tensors))
        x = x + self.block(x)
        detections = self.heads(x, batch)
        if self.by_mode and self.training:
            return {"loss": sum(d["scores"].sum() for d in detections)}
        for d, (h, w) in zip(detections, original_sizes):
            d["scores"] = d["scores"] * (h / 8) + w  # back to the input's scale
        return detections


def _glue_images(*sizes):
    return [torch.randn(3, h, w) for h, w in sizes]


def test_detector_glue_traces_whole_with_its_opaque_parts_and_follows_the_input_size():
    torch.manual_seed(0)
    model = DetectorGlue().eval()
    images = _glue_images((12, 10), (9, 14))
    g = archir.trace(model, (images,))
    g.verify()
    assert set(g.leaves) == {"transform", "heads"}
    assert "ImageBatch" in str(g)  # the batch object is a junction between the opaque parts
    lowered = g.to_module().eval()
    with torch.no_grad():
        for xs in (images, _glue_images((20, 6), (7, 7))):  # other sizes: nothing fixed at the example's
            assert_same(model(xs), lowered(xs))
        lowered.train()
        model.train()
        for xs in (images, _glue_images((5, 11), (16, 8))):
            assert_same(model(xs), lowered(xs))


@pytest.mark.parametrize("method", ["dnat", "dso"])
def test_detector_glue_search_starts_exact_in_both_modes(method):
    torch.manual_seed(0)
    model = DetectorGlue().eval()
    images = _glue_images((12, 10), (9, 14))
    s = archir.search(model, (images,), method=method)
    assert s.decisions()  # the backbone's residual branch is searchable
    with torch.no_grad():
        assert_same(model(images), s.supernet.eval()(images))
        assert_same(model(images), s.derive().eval()(images))
        expected = copy.deepcopy(model).train()(images)
        assert_same(expected, copy.deepcopy(s.supernet).train()(images))


def test_detector_glue_that_returns_a_loss_in_training_mode_is_one_graph_for_both_modes():
    """Traced in each mode, the two graphs share all but their ends (mode_split.ByMode)."""
    torch.manual_seed(0)
    model = DetectorGlue(by_mode=True).eval()
    images = _glue_images((12, 10), (9, 14))
    g = archir.trace(model, (images,))
    g.verify()
    assert "other<archir_by_mode>" in str(g)
    lowered = g.to_module()
    with torch.no_grad():
        for training in (False, True):  # detections, then the loss
            model.train(training)
            lowered.train(training)
            for xs in (images, _glue_images((20, 6), (7, 7))):
                assert_same(model(xs), lowered(xs))
    assert isinstance(model.train()(images), dict)
    s = archir.search(model.eval(), (images,), method="dnat")
    with torch.no_grad():
        assert_same(model(images), s.supernet.eval()(images))
        assert_same(copy.deepcopy(model).train()(images), copy.deepcopy(s.supernet).train()(images))


class NeedsTargets(DetectorGlue):
    """Fails in training mode without targets, as a torchvision detector does."""

    def forward(self, images):
        if self.training:
            raise RuntimeError("give targets in training mode")
        return super().forward(images)


def test_a_graph_that_cannot_be_checked_in_training_mode_is_refused_with_the_reason():
    with pytest.raises(TraceError, match=r"Tracing it with values with 2 submodule\(s\) opaque got through, "
                                         r"but NeedsTargets itself fails in training mode on the example inputs "
                                         r"\(RuntimeError: give targets in training mode\)"):
        archir.trace(NeedsTargets().eval(), (_glue_images((12, 10), (9, 14)),))


def test_transform_searches_inside_a_part_where_model_py_cannot_hold_the_whole_graph(tmp_path):
    """The whole detector traces, but its opaque parts are the user's own classes, which model.py
    cannot rebuild: archir.transform searches inside its largest part (before any training)."""
    torch.manual_seed(0)
    model = DetectorGlue().eval()
    images = _glue_images((12, 10), (9, 14))
    res = archir.transform(model, (images,), "dnat", epochs=0, onnx=False, progress=False, out=tmp_path / "out")
    sub = res.report["submodule"]
    assert sub["path"] == "block", sub
    assert "DetectorGlue traces whole, but model.py could not hold it" in sub["automatic"]
    assert (tmp_path / "out" / "model.py").exists()
    with torch.no_grad():
        assert_same(model(images), res.whole.eval()(images))


class HeadsWithTargets(KeepConfident):
    """Like torchvision's RPN and ROI heads: in training mode they read the targets, return no
    detections and their losses; in eval mode detections and no losses."""

    def forward(self, features, batch, targets):
        if self.training:
            loss = features.square().mean() + sum(((t["boxes"] - 1) ** 2).mean() for t in targets)
            return [], {"loss": loss}
        return super().forward(features, batch), {}


class DetectorWithTargets(DetectorGlue):
    """A torchvision detector's forward: it checks its targets (in training mode, and that no box
    is degenerate: checks, kept as run-time guards), passes them to its heads and returns the
    losses in training mode, the detections in eval mode."""

    def __init__(self):
        super().__init__()
        self.heads = HeadsWithTargets()

    def forward(self, images, targets):
        if self.training:
            for target in targets:
                boxes = target["boxes"]
                if isinstance(boxes, torch.Tensor):
                    torch._assert(len(boxes.shape) == 2 and boxes.shape[-1] == 4, "boxes are N x 4")
                else:
                    torch._assert(False, "boxes are a tensor")
        original_sizes = [(img.shape[-2], img.shape[-1]) for img in images]
        batch = self.transform(images)
        for target in targets:
            degenerate = target["boxes"][:, 2:] <= target["boxes"][:, :2]
            if degenerate.any():
                torch._assert(False, "a box has no area")
        x = torch.relu(self.stem(batch.tensors))
        x = x + self.block(x)
        detections, losses = self.heads(x, batch, targets)
        if self.training:
            return losses
        for d, (h, w) in zip(detections, original_sizes):
            d["scores"] = d["scores"] * (h / 8) + w
        return detections


def _assert_exact_in_both_modes(model, nets, inputs):
    """Each of ``nets`` gives ``model``'s outputs on each of ``inputs`` in eval and in training
    mode (copies: training updates BatchNorm statistics; the same seed before each call)."""
    for training in (False, True):
        for net in nets:
            for xs in inputs:
                torch.manual_seed(0)
                expected = copy.deepcopy(model).train(training)(*xs)
                torch.manual_seed(0)
                with torch.no_grad():
                    assert_same(expected, copy.deepcopy(net).train(training)(*xs))


def _glue_targets(*counts):
    out = []
    for n in counts:
        corner = torch.rand(n, 2) * 4
        out.append({"boxes": torch.cat([corner, corner + 1 + torch.rand(n, 2)], 1), "labels": torch.arange(n)})
    return out


def test_a_detector_in_training_mode_is_traced_from_its_own_state_in_each_mode():
    """A model as built (training mode): tracing it with values runs it, and in training mode that
    moved BatchNorm's running statistics, so the eval-mode trace and check started from other
    statistics than the model's, and kept how many detections those gave (torchvision's Faster
    R-CNN given to ``archir transform`` as built: refused, "differs from it in eval mode"). Each
    trace and check now starts from the model's own state, which tracing leaves as it was."""
    torch.manual_seed(0)
    model = DetectorWithTargets()
    model.block[1].running_mean.fill_(0.3)  # statistics a training-mode run would move
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = (_glue_images((12, 10), (9, 14)), _glue_targets(2, 3))
    g = archir.trace(model, args)
    g.verify()
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    other = (_glue_images((20, 6), (7, 7)), _glue_targets(4, 1))
    _assert_exact_in_both_modes(model, (g.to_module(),), (args, other))


def test_a_detector_that_checks_its_targets_traces_whole_for_both_modes():
    """Checks on the targets are guards; the heads' output (detections in one mode, none in the
    other) reaches each mode's end whole; training mode is traced too and merged."""
    torch.manual_seed(0)
    model = DetectorWithTargets().eval()
    args = (_glue_images((12, 10), (9, 14)), _glue_targets(2, 3))
    g = archir.trace(model, args)
    g.verify()
    assert set(g.leaves) == {"transform", "heads"}
    assert "other<archir_by_mode>" in str(g)
    from archir.ir.guards import graph_guards

    checks = [w for w in graph_guards(g) if "own check" in w]
    assert len(checks) == 4  # two targets: the shape check (training) and the degenerate one
    other = (_glue_images((20, 6), (7, 7)), _glue_targets(4, 1))
    s = archir.search(model, args, method="dnat")
    assert s.decisions()
    bad = _glue_targets(2, 3)
    bad[1]["boxes"][0, 2] = 0.0  # x2 <= x1
    nets = (g.to_module(), s.supernet, s.derive())
    _assert_exact_in_both_modes(model, nets, (args, other))
    for training in (False, True):
        for net in nets:
            with pytest.raises(RuntimeError, match="own check .*a box has no area"):
                copy.deepcopy(net).train(training)(args[0], bad)


class Matcher:
    """Like torchvision's ``Matcher``: a plain object (not a module) that writes into a tensor."""

    def __call__(self, quality):
        matches = quality.argmax(0)
        matches[quality.max(0).values < 0.5] = -1
        return matches


class SingleShot(nn.Module):
    """Like torchvision's SSD, RetinaNet and FCOS: the root's own forward matches targets (a
    branch on their number of boxes, an in-place write), and its own methods compute the loss
    (a branch on the data) and post-process (iterating a tensor); the methods are kept opaque."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Conv2d(4, 5, 1)  # 4 box coordinates and a score per position
        self.matcher = Matcher()

    def forward(self, images, targets):
        x = torch.relu(self.stem(images))
        x = x + self.block(x)
        out = self.head(x).flatten(2)
        if not self.training:
            return self.postprocess(out)
        matched = []
        for t in targets:
            if t["boxes"].numel() == 0:  # the example's sizes decide: a guard
                matched.append(torch.full((out.shape[-1],), -1))
                continue
            quality = t["boxes"][:, :1] * torch.sigmoid(out[0, 4:]).detach()
            matched.append(self.matcher(quality))
        return self.compute_loss(out, matched)

    def compute_loss(self, out, matched):
        loss = out.new_zeros(())
        for i, m in enumerate(matched):
            if (m >= 0).any():
                loss = loss + out[i, :4, m >= 0].square().mean()
        return {"loss": loss}

    def postprocess(self, out):
        return [{"scores": scores.topk(max(int((scores > 0).sum()), 1)).values} for scores in out[:, 4]]


def test_a_detectors_own_methods_are_kept_opaque_and_the_rest_searched():
    torch.manual_seed(0)
    model = SingleShot().eval()
    args = (torch.rand(2, 3, 6, 6), _glue_targets(2, 3))
    g = archir.trace(model, args)
    g.verify()
    assert {":postprocess", ":compute_loss"} <= set(g.leaves)
    from archir.frontends.opaque_methods import MethodCall

    lowered = g.to_module()  # a copy shares the root its methods are called on, not a second model
    owners = [[m.owner for m in net.modules() if isinstance(m, MethodCall)] for net in (lowered, copy.deepcopy(lowered))]
    assert len(owners[0]) == 2 and all(a is b for a, b in zip(*owners))
    from archir.ir.guards import graph_guards

    assert any("numel() == 0" in w and "another branch" in w for w in graph_guards(g))
    s = archir.search(model, args, method="dnat")
    assert s.decisions()
    other = (torch.rand(2, 3, 5, 7), _glue_targets(1, 4))
    _assert_exact_in_both_modes(model, (g.to_module(), s.supernet, s.derive()), (args, other))
    empty = _glue_targets(2, 3)
    empty[0] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    model.train()(args[0], empty)  # the model takes the other branch
    with pytest.raises(RuntimeError, match="another branch at .*numel"):
        g.to_module().train()(args[0], empty)
    # the post-process returns one item per image: the graph reads two, and refuses three
    with pytest.raises(RuntimeError, match=r"SingleShot.postprocess, called at .* returns a list of another length"):
        g.to_module().eval()(torch.rand(3, 3, 6, 6), _glue_targets(1, 1))
    # the graph reads the targets by position: a list of another length is refused up front
    with pytest.raises(ValueError, match=r"targets has 3 items; the model was traced on an example where it has 2"):
        g.to_module().eval()(torch.rand(3, 3, 6, 6), _glue_targets(1, 1, 1))


class RescalesInPlace(nn.Module):
    """Like torchvision's ``resize_keypoints`` (in ``transform.postprocess``): a method writes in
    place into a copy through views, which the graph cannot make out of place: kept opaque."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x, ratio):
        if (x.abs() > 1e6).any():
            raise ValueError("x is out of range")
        return self.rescale(self.conv(x).flatten(2).transpose(1, 2), ratio)

    def rescale(self, points, ratio):
        out = points.clone()
        out[..., 0] *= ratio[0]
        out[..., 1] *= ratio[1]
        return out


def test_a_method_that_writes_through_views_is_kept_opaque():
    torch.manual_seed(0)
    model = RescalesInPlace()
    args = (torch.randn(2, 3, 4, 4), torch.tensor([2.0, 3.0]))
    g = archir.trace(model, args)
    assert set(g.leaves) == {":rescale"} and "updates a view" in g.leaves[":rescale"]
    with torch.no_grad():
        for xs in (args, (torch.randn(3, 3, 5, 2), torch.tensor([0.5, 4.0]))):
            assert_same(model(*xs), g.to_module()(*xs))


class PostprocessWithParameters(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.post(x)

    def post(self, x):
        return [self.lin(row) for row in x[x.sum(1) > 0]]  # iterates the data, runs a parametrised module


def test_a_method_that_runs_parametrised_modules_is_not_kept_opaque():
    with pytest.raises(TraceError, match="runs Linear, which has parameters"):
        archir.trace(PostprocessWithParameters(), (torch.randn(2, 3),))


def test_value_tracing_refuses_what_depends_on_the_data():
    from archir.frontends.value_trace import value_trace

    class IterTensor(nn.Module):
        def forward(self, x):
            return sum(row for row in x)  # as many rows as the input has: refused

    with pytest.raises(Exception, match="depends on the data"):
        value_trace(IterTensor(), lambda p, m: False, {}, [torch.randn(3, 4)])


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
    assert same_under_seed(model, gm, x)


class LossInTraining(nn.Module):
    """A model that torch.fx and torch.export follow whole, whose own forward returns its loss in
    training mode (given targets) and its predictions in eval mode: both tracers read
    ``self.training`` once, at trace time."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4, 2)

    def forward(self, x, target):
        h = torch.relu(self.stem(x))
        out = self.head((h + self.block(h)).mean((2, 3)))
        if self.training:
            return {"loss": (out - target).square().mean()}
        return {"pred": out.softmax(-1)}


class AuxHeadInTraining(nn.Module):
    """Like GoogLeNet and Inception v3: an auxiliary head that runs in training mode only."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.aux = nn.Linear(4, 2)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.stem(x)).mean((2, 3))
        if self.training:
            return self.head(h), self.aux(h)
        return self.head(h)


@pytest.mark.parametrize("traced_in", ["eval", "train"])
def test_a_forward_that_branches_on_the_mode_is_one_graph_for_both_modes_under_any_tracer(traced_in):
    """A graph traced by fx (or export) in one mode used to compute that mode's function in the
    other too: the loss in eval mode, or the predictions while training. Checked against the
    model in both modes, it is traced in each and the two merged."""
    torch.manual_seed(0)
    model = getattr(LossInTraining(), traced_in)()
    args = (torch.randn(2, 3, 6, 6), torch.randn(2, 2))
    g = archir.trace(model, args)
    g.verify()
    assert "other<archir_by_mode>" in str(g)
    s = archir.search(model, args, method="dnat")
    nets = (g.to_module(), s.supernet, s.derive())
    _assert_exact_in_both_modes(model, nets, (args, (torch.randn(3, 3, 8, 8), torch.randn(3, 2))))


def test_a_mode_branch_that_does_not_merge_keeps_the_traced_mode_and_says_so(caplog):
    torch.manual_seed(0)
    model = AuxHeadInTraining().eval()
    x = torch.randn(2, 3, 6, 6)
    with caplog.at_level("WARNING", logger="archir.frontends.mode_dropout"):
        lowered = archir.trace(model, x).to_module()
    assert ("AuxHeadInTraining is traced in eval mode, and its graph computes that mode's function in "
            "training mode too") in caplog.text, caplog.text
    assert "the train-mode end of the forward calls the module aux" in caplog.text, caplog.text
    with torch.no_grad():
        assert torch.equal(lowered(x), model(x))
