"""Functional dropout follows ``.train()``/``.eval()`` under the torch.fx tracer, as under export.

fx symbolic tracing reads ``self.training`` at trace time, so ``F.dropout(x, p,
training=self.training)`` and ``F.scaled_dot_product_attention(..., dropout_p=p if self.training
else 0.)`` (timm's ``Attention``) would stay at the traced mode. archir traces the modules that
read it in both modes and makes the dropout a module of the caller
(:mod:`archir.frontends.mode_dropout`). The oracle: the original model, the same seed before
each call, in each mode, whatever mode the model was traced in.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import archir
from archir.layers import StochasticDepth, TrainingDropoutAttention
from model_patterns import (FunctionalBatchStats, FunctionalDropoutMlp, PreNormBlock, same_outputs_in_both_modes,
                            same_under_seed)

pytestmark = pytest.mark.usefixtures("one_thread")


class TimmAttention(nn.Module):
    """timm's fused ``Attention``: the probability is read from a Dropout module's ``p``."""

    def __init__(self, d=16, heads=2, p=0.3):
        super().__init__()
        self.qkv, self.proj, self.heads = nn.Linear(d, 3 * d), nn.Linear(d, d), heads
        self.attn_drop = nn.Dropout(p)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj(a.transpose(1, 2).reshape(b, n, d))


class ConstantDropout(nn.Module):
    """Dropout whose flags are constants, not the mode: the traced graph keeps them as they are."""

    def __init__(self, d=16):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        y = F.dropout(self.lin(x), 0.4, training=False)  # never drops
        return F.dropout(y, 0.2) * torch.tensor(2.0)  # always drops (training=True by default)


class ScaledDropout(nn.Module):
    """A tensor made in ``forward`` (fx stores it on the root as a constant) next to the dropout."""

    def __init__(self, d=16, p=0.3):
        super().__init__()
        self.lin, self.p = nn.Linear(d, d), p

    def forward(self, x):
        scale = torch.linspace(0.5, 1.5, x.shape[-1])
        return F.dropout(self.lin(x) * scale, self.p, self.training)


def stochastic_depth(input, p, mode, training=True):
    """torchvision's ``stochastic_depth`` (its signature and module), mode "row" written out."""
    if p == 0.0 or not training:
        return input
    keep = 1.0 - p
    mask = torch.empty([input.shape[0]] + [1] * (input.ndim - 1), dtype=input.dtype).bernoulli_(keep)
    return input * mask.div_(keep)


stochastic_depth.__module__ = "torchvision.ops.stochastic_depth"
torch.fx.wrap("stochastic_depth")  # as torchvision does: fx records the call, not its body


class FunctionalDepth(nn.Module):
    def __init__(self, d=16, p=0.3):
        super().__init__()
        self.lin, self.p = nn.Linear(d, d), p

    def forward(self, x):
        return stochastic_depth(self.lin(x), self.p, "row", self.training)


class TorchDropoutMlp(nn.Module):
    """``torch.dropout(x, p, train)``: the function F.dropout calls, called directly."""

    def __init__(self, d=16, p=0.3):
        super().__init__()
        self.lin, self.p = nn.Linear(d, d), p

    def forward(self, x):
        return torch.dropout(self.lin(x), self.p, self.training)


def _added(gm) -> dict[str, nn.Module]:
    return {n.target: gm.get_submodule(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and "._archir_" in f".{n.target}"}


@pytest.mark.parametrize("inner, layer", [(TimmAttention, TrainingDropoutAttention),
                                          (FunctionalDropoutMlp, nn.Dropout),
                                          (TorchDropoutMlp, nn.Dropout),
                                          (FunctionalDepth, StochasticDepth)])
@pytest.mark.parametrize("traced_in", ["eval", "train"])
def test_fx_makes_functional_dropout_follow_train_and_eval(inner, layer, traced_in):
    torch.manual_seed(0)
    model = PreNormBlock(inner()).train(traced_in == "train")
    x = torch.randn(3, 5, 16)
    graph = archir.trace(model, x, frontend="fx")
    gm = graph.to_module()
    added = _added(gm)
    assert graph.frontend == "fx" and list(added) == [f"inner._archir_{'attention' if inner is TimmAttention else 'dropout'}0"]
    (module,) = added.values()
    assert type(module) is layer and module.p == 0.3 and module.training == (traced_in == "train")
    same_outputs_in_both_modes(model, gm, x)


@pytest.mark.parametrize("traced_in", ["eval", "train"])
def test_fx_attention_and_dropout_in_one_model_emit(traced_in, tmp_path):
    """Both patterns in one model, then the emitted model.py (archir's layer copied in)."""
    from archir.backends.standalone import emit_standalone
    from test_zoo_patterns import _load_emitted

    torch.manual_seed(0)
    model = nn.Sequential(PreNormBlock(TimmAttention()), PreNormBlock(FunctionalDropoutMlp())).train(traced_in == "train")
    x = torch.randn(2, 5, 16)
    gm = archir.trace(model, x).to_module()
    assert sorted(_added(gm)) == ["0.inner._archir_attention0", "1.inner._archir_dropout0"]
    same_outputs_in_both_modes(model, gm, x)
    files = emit_standalone(gm, tmp_path / "o", example_inputs=(x,))
    same_outputs_in_both_modes(model, _load_emitted(files.model_py, f"fx_dropout_{traced_in}"), x)


def test_fx_dropout_follows_its_own_module_not_the_root():
    """Each dropout is a child of the module whose code calls it, so it takes that module's mode."""
    torch.manual_seed(0)
    model = nn.Sequential(PreNormBlock(TimmAttention()), PreNormBlock(FunctionalDropoutMlp())).eval()
    x = torch.randn(2, 5, 16)
    gm = archir.trace(model, x).to_module()
    for path in ("0.inner", "1.inner"):
        model.eval(), gm.eval()
        model.get_submodule(path).train(), gm.get_submodule(path).train()
        assert same_under_seed(model, gm, x)


def test_fx_keeps_the_traced_mode_where_training_changes_more_than_dropout(caplog):
    """A module whose training mode also changes batch statistics keeps its own traced mode (a
    warning gives the reason); the other module's dropout still follows the mode."""
    torch.manual_seed(0)
    model = nn.Sequential(PreNormBlock(FunctionalBatchStats()), PreNormBlock(FunctionalDropoutMlp())).eval()
    x = torch.randn(2, 5, 16)
    with caplog.at_level("WARNING", logger="archir.frontends.mode_dropout"):
        graph = archir.trace(model, x, frontend="fx")
    gm = graph.to_module()
    assert "'0.inner' keeps the traced mode" in caplog.text and "batch_norm" in caplog.text
    assert list(_added(gm)) == ["1.inner._archir_dropout0"]
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    model[0].eval(), gm.train()  # the first block stays at eval, as traced
    model[1].train()
    assert same_under_seed(model, gm, x)


@pytest.mark.parametrize("traced_in", ["eval", "train"])
def test_fx_keeps_dropout_whose_flags_are_constants(traced_in):
    """``training=False`` written in the code never drops, a dropout without ``training`` always
    does: neither follows the mode."""
    torch.manual_seed(0)
    model = PreNormBlock(ConstantDropout()).train(traced_in == "train")
    x = torch.randn(2, 5, 16)
    gm = archir.trace(model, x, frontend="fx").to_module()
    assert _added(gm) == {}
    for mode in (True, False):
        model.train(mode), gm.train(mode)
        assert same_under_seed(model, gm, x)


@pytest.mark.parametrize("traced_in", ["eval", "train"])
def test_fx_constants_survive_the_second_trace(traced_in):
    torch.manual_seed(0)
    model = PreNormBlock(ScaledDropout()).train(traced_in == "train")
    x = torch.randn(2, 5, 16)
    graph = archir.trace(model, x, frontend="fx")
    gm = graph.to_module()
    assert list(_added(gm)) == ["inner._archir_dropout0"]
    same_outputs_in_both_modes(model, gm, x)


@pytest.mark.parametrize("p, traces", [(0.0, 1), (0.3, 2)])
def test_fx_traces_twice_only_where_training_draws_random_numbers(p, traces, monkeypatch):
    from archir.frontends import capture

    calls = []
    fx_trace = capture.fx_trace
    monkeypatch.setattr(capture, "fx_trace", lambda *a, **k: calls.append(1) or fx_trace(*a, **k))
    archir.trace(PreNormBlock(FunctionalDropoutMlp(p=p)).eval(), torch.randn(2, 5, 16), frontend="fx")
    assert len(calls) == traces
