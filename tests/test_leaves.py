"""Opaque leaves that hold parameters: nn.LSTM / nn.GRU / nn.MultiheadAttention kept whole, and
user modules kept opaque with ``leaf_modules``. They count their parameters (and FLOPs where
known), lower, train, derive, emit and export; what the emitter cannot write is refused before
any training (``check_emittable``)."""
from __future__ import annotations

import importlib.util
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import archir
from archir.backends.onnx_export import OnnxExportError, check_onnx_exportable, ort_session
from archir.backends.standalone import StandaloneError, check_emittable
from archir.errors import ArchirError
from archir.passes import Derive, FoldIdentities, PassManager, Prune

T, B = 7, 2


class SeqNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.lstm = nn.LSTM(16, 32, batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, x):  # x: (B, T, 8)
        h, _ = self.lstm(torch.relu(self.proj(x)))
        return self.head(h[:, -1])


class ResGRU(nn.Module):
    """The LSTM's output feeds a residual sum, then a two-layer bidirectional GRU."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.gru = nn.GRU(16, 24, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(48, 5)

    def forward(self, x):
        z = torch.relu(self.proj(x))
        h, _ = self.lstm(z)
        g, _ = self.gru(h + z)
        return self.head(g[:, -1])


class StateNet(nn.Module):
    """The first LSTM's state (a nested tuple) starts the second one."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.LSTM(8, 16, batch_first=True)
        self.l2 = nn.LSTM(16, 16, batch_first=True)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h, state = self.l1(x)
        h2, _ = self.l2(h, state)
        return self.head(h2[:, -1])


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        z = self.proj(x)
        a, _ = self.attn(z, z, z, need_weights=False)
        return self.head((a + z).mean(1))


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.scale = nn.Parameter(torch.ones(16))
        self.register_buffer("shift", torch.zeros(16))

    def forward(self, x):
        return torch.sigmoid(self.lin(x)) * x * self.scale + self.shift


class UserLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.gate = Gate()
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.gate(torch.relu(self.proj(x))).mean(1))


MODELS = {"seqnet": (SeqNet, {}), "res_gru": (ResGRU, {}), "state": (StateNet, {}), "attn": (Attn, {}),
          "user_leaf": (UserLeaf, {"leaf_modules": ["gate"]})}


def _x(seed=0, batch=B):
    return torch.randn(batch, T, 8, generator=torch.Generator().manual_seed(seed))


def _model(name):
    torch.manual_seed(0)
    cls, kw = MODELS[name]
    return cls().eval(), kw


def _numel(module):
    return sum(p.numel() for p in module.parameters())


def _edge_with(graph, target):
    return next(e for e in graph.edges.values() if any(op.target == target for op in e.ops))


@pytest.mark.parametrize("name", list(MODELS))
def test_every_parameter_of_a_leaf_counts(name):
    model, kw = _model(name)
    for frontend in ("fx", "export"):
        graph = archir.trace(model, _x(), leaf_modules=kw.get("leaf_modules", ()), frontend=frontend)
        assert graph.total_params() == _numel(model), frontend
        assert torch.equal(graph.to_module().eval()(_x(1)), model(_x(1)))
    graph = archir.trace(model, _x(), **kw)
    if name in ("seqnet", "res_gru"):
        assert graph.edge_params(_edge_with(graph, "lstm")) == _numel(model.lstm)
    if name == "user_leaf":  # the leaf's own parameters and its submodule's, once
        assert graph.edge_params(_edge_with(graph, "gate")) == _numel(model.gate) + _numel(model.head)
    if name == "attn":  # nn.MultiheadAttention(q, k, v) is a join's call
        (jid,) = [j.id for j in graph.junctions.values() if j.combine is not None and j.combine.kind == "other"]
        assert graph.junction_params(jid) == _numel(model.attn)


def test_recurrent_flops_by_hand():
    model, _ = _model("res_gru")
    graph = archir.trace(model, _x())
    # G · H · (I + H) · T per direction and layer: LSTM 4 gates; GRU 3 gates, layer 2 reads 2·24
    assert _edge_with(graph, "lstm").flops == 4 * 16 * (16 + 16) * T
    assert _edge_with(graph, "gru").flops == (2 * 3 * 24 * (16 + 24) + 2 * 3 * 24 * (48 + 24)) * T
    seq, _ = _model("seqnet")
    g = archir.trace(seq, _x())
    assert _edge_with(g, "lstm").flops == 4 * 32 * (16 + 32) * T
    # torch.export keeps aten.lstm whole: the same count from its weight list
    g = archir.trace(seq, _x(), frontend="export")
    (lstm_edge,) = [e for e in g.edges.values() if "self.lstm.weight_ih_l0" in e.render_ops()]
    assert lstm_edge.flops == 4 * 32 * (16 + 32) * T
    # a user-defined leaf counts what it ran (its Linear(16, 16) at every step); nn.MultiheadAttention:
    # projections + attention
    leaf, kw = _model("user_leaf")
    for frontend in ("fx", "export"):
        g = archir.trace(leaf, _x(), frontend=frontend, **kw)
        gate = next(op for e in g.edges.values() for op in e.ops if op.target == "gate")
        assert gate.meta["flops"] == T * 16 * 16, frontend
    attn, _ = _model("attn")
    g = archir.trace(attn, _x())
    (j,) = [j for j in g.junctions.values() if j.combine is not None and j.combine.kind == "other"]
    e = 16
    assert j.combine.op.meta["flops"] == 3 * T * e * e + T * T * 2 * e + T * e * e


@pytest.mark.parametrize("name", list(MODELS))
def test_search_parity_and_the_leaf_trains(name):
    model, kw = _model(name)
    x = _x()
    s = archir.search(model, x, **kw)
    assert torch.equal(s.supernet.eval()(x), model(x))
    leaf = {"seqnet": "lstm", "res_gru": "gru", "state": "l2", "attn": "attn", "user_leaf": "gate"}[name]
    mod = s.graph.root.get_submodule(leaf)
    if isinstance(mod, nn.RNNBase):  # its forward reads these: they must be its own parameters
        assert all(w is p for w, p in zip(mod._flat_weights, mod.parameters()))
    before = {k: v.detach().clone() for k, v in mod.named_parameters()}
    opt = torch.optim.SGD(s.weight_parameters(), lr=0.1)
    s.supernet.train()
    for i in range(3):
        loss = s.supernet(_x(10 + i, batch=4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    # (a bidirectional GRU read at its last step gives weight_hh_l*_reverse no gradient)
    moved = {k for k, v in mod.named_parameters() if not torch.equal(before[k], v)}
    assert moved >= {k for k in before if "_hh_" not in k or "reverse" not in k}, "the leaf was not trained"
    user = dict(model.named_parameters())  # the user's model is untouched
    assert all(torch.equal(user[f"{leaf}.{k}"], v) for k, v in before.items())


def _load(path):
    spec = importlib.util.spec_from_file_location(f"_leaves_{uuid.uuid4().hex}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trained_lstm_derives_emits_and_exports(tmp_path):
    model, _ = _model("seqnet")
    x = _x()
    s = archir.search(model, x)
    check_emittable(s.supernet)  # nothing to refuse
    opt = torch.optim.SGD(s.weight_parameters(), lr=0.1)
    for i in range(3):
        loss = s.supernet(_x(20 + i, batch=4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    s.supernet.eval()
    slim = s.derive().eval()
    trained = dict(s.graph.root.lstm.named_parameters())
    assert all(torch.equal(trained[k], v) for k, v in slim.lstm.named_parameters())
    assert not torch.equal(trained["weight_hh_l0"], model.lstm.weight_hh_l0)
    assert torch.equal(slim(x), s.supernet(x))
    files = s.emit(tmp_path, onnx=True, module=slim)
    source = (tmp_path / "model.py").read_text()
    assert "torch.nn.LSTM(16, 32, batch_first=True)" in source
    imports = {line.split()[1].split(".")[0] for line in source.splitlines() if line.startswith(("import ", "from "))}
    assert imports <= {"torch", "pathlib"}
    emitted = _load(files["model.py"]).load_model().eval()
    x2 = _x(5, batch=5)
    with torch.no_grad():
        assert torch.equal(emitted(x2), slim(x2))
        ref = slim(x2).numpy()
    session = ort_session(files["model.onnx"], ["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x2.numpy()})
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_pruning_a_recurrent_branch_drops_its_parameters():
    model, _ = _model("res_gru")
    s = archir.search(model, _x(), share="full")
    graph = s.graph.copy(share_root=False)
    (into_sum,) = [e for e in graph.edges.values() if e.labels.get("choices", "").startswith("none")
                   and "getitem" in str(e.ops[0].args[-1])]
    choices = {e.id: "same" for e in graph.edges.values() if "choices" in e.labels}
    choices[into_sum.id] = "none"
    PassManager([Derive(choices), Prune(), FoldIdentities()])(graph)
    assert not hasattr(graph.root, "lstm")  # dead with its only use
    assert graph.total_params() == _numel(model) - _numel(model.lstm)
    x = _x(3)
    z = torch.relu(model.proj(x))
    g, _ = model.gru(z)
    assert torch.allclose(graph.to_module().eval()(x), model.head(g[:, -1]))


def test_user_leaf_is_emitted_with_a_copy_of_its_class(tmp_path):
    model, kw = _model("user_leaf")
    s = archir.search(model, _x(), **kw)
    check_emittable(s.original.to_module())
    files = s.emit(tmp_path / "out", onnx=False)
    assert "class Gate(nn.Module):" in Path(files["model.py"]).read_text()
    emitted = _load(files["model.py"]).load_model().eval()
    with torch.no_grad():
        assert torch.equal(emitted(_x(4)), model.eval()(_x(4)))


_TABLE = [0.5]  # a module-level object that model.py cannot copy


class TableGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        return self.lin(x) * _TABLE[0]


def test_check_emittable_refuses_an_uncopyable_user_leaf_before_training(tmp_path, monkeypatch):
    model, kw = _model("user_leaf")
    model.gate = TableGate()
    s = archir.search(model, _x(), **kw)
    monkeypatch.chdir(tmp_path)
    for module in (s.supernet, s.original.to_module()):
        with pytest.raises(StandaloneError) as info:
            check_emittable(module)
        message = str(info.value)
        assert isinstance(info.value, ArchirError)
        assert "\n" not in message
        assert "'gate'" in message and "Gate" in message and "user-defined" in message
        assert "leaf_modules" in message  # what to do
    assert not list(tmp_path.iterdir())  # nothing written
    # the same model traced through the module is emittable
    check_emittable(archir.search(model, _x()).supernet)


def test_attention_and_recurrent_variants_emit(tmp_path):
    for name in ("attn", "state"):
        model, kw = _model(name)
        s = archir.search(model, _x(), **kw)
        check_emittable(s.supernet)
        files = s.emit(tmp_path / name, onnx=False)
        emitted = _load(files["model.py"]).load_model().eval()
        assert torch.equal(emitted(_x(4)), model(_x(4)))


def test_lstm_with_projection_is_refused_by_onnx_before_export(tmp_path):
    model = nn.Sequential(nn.LSTM(4, 8, proj_size=2))
    with pytest.raises(OnnxExportError, match=r"nn.LSTM '0' has proj_size=2.*--no-onnx"):
        check_onnx_exportable(model)
    check_onnx_exportable(nn.LSTM(4, 8, num_layers=2, bidirectional=True))


def test_time_major_lstm_exports_with_a_fixed_leading_axis(tmp_path):
    """batch_first=False: axis 0 is time, which the LSTM export fixes (torch 2.14 declares it
    symbolic on a process's first export but hard-codes it inside; ONNX Runtime then fails at
    another size, and the export is redone with the axis fixed)."""
    from archir.backends.onnx_export import export_onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.LSTM(8, 16)).eval()

    class First(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return self.net(x)[0]

    report = export_onnx(First().eval(), _x(), tmp_path / "m.onnx")
    assert report.passed and not report.dynamic_batch, report.notes
    assert (tmp_path / "m.onnx").exists() and not (tmp_path / "m.unverified.onnx").exists()
