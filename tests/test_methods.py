"""The Method interface: a second, deliberately small method defined here, in one file, with no
edit anywhere else in archir, goes through search, the user's loop, derive, emit and the CLI."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import archir
from archir import methods
from archir.cli import main
from archir.ir import IN, Graph, Op, fetch_attr
from archir.options import option
from archir.passes import Pass, PassResult
from archir.passes.derive import remove_unused_attributes

MIX, THETA = "act_mix", "act_theta"


class ActivationMix(nn.Module):
    """(θ_relu·relu(x) + θ_gelu·gelu(x)) / Σθ; exactly relu(x) at θ = (1, 0)."""

    def forward(self, relu_x, gelu_x, *, theta):
        w = theta / theta.sum().clamp_min(1e-12)
        return relu_x * w[0] + gelu_x * w[1]


def _is_relu(graph: Graph, op: Op) -> bool:
    if op.kind == "call_module":
        return isinstance(fetch_attr(graph.root, op.target), nn.ReLU)
    return op.kind == "call_function" and op.target in (F.relu, torch.relu)


def _is_relu_edge(graph: Graph, e) -> bool:
    return any(_is_relu(graph, op) for op in e.ops)


class ActivationChoice(Pass):
    """Every edge with a ReLU chooses its operations as they are or with each ReLU a GELU."""

    def __init__(self, gelu_init: float):
        self.gelu_init = gelu_init

    def run(self, graph):
        thetas, mixers = nn.ParameterDict(), nn.ModuleDict()
        for e in graph.edges_in_order():
            if not _is_relu_edge(graph, e):
                continue
            thetas[e.id] = nn.Parameter(torch.tensor([1.0, self.gelu_init]))
            mixers[e.id] = ActivationMix()
            gelu = tuple(Op("call_function", F.gelu, (IN,), meta=dict(op.meta)) if _is_relu(graph, op) else op
                         for op in e.ops)
            e.ops = [Op("choice", f"{MIX}.{e.id}", (tuple(e.ops), gelu),
                        {"theta": Op("get_attr", f"{THETA}.{e.id}")}, meta={"out": e.out_meta})]
            e.labels.update(choices="relu,gelu", param=e.id)
        if not thetas:
            return PassResult(graph, False)
        graph.root.add_module(THETA, thetas)
        graph.root.add_module(MIX, mixers)
        return PassResult(graph, True)


class PickActivation(Pass):
    def run(self, graph):
        changed = False
        for e in graph.edges.values():
            if e.ops and e.ops[0].kind == "choice" and e.ops[0].target.startswith(MIX):
                theta = getattr(graph.root, THETA)[e.id].detach()
                gelu = bool(theta[1] > theta[0])
                e.ops = list(e.ops[0].args[1 if gelu else 0])
                weights = dict(zip(("relu", "gelu"), (theta / theta.sum()).tolist()))
                e.labels.update(decision="gelu" if gelu else "same", changed=gelu, weights=weights)
                changed = True
        return PassResult(graph, remove_unused_attributes(graph) or changed)


@dataclass
class ReluOrGeluOptions:
    gelu_init: float = option(0.0, "Initial weight of GELU on every ReLU edge.", minimum=0.0)


@methods.register
class ReluOrGelu(methods.Method):
    name = "relu-or-gelu"
    summary = "every edge with a ReLU chooses ReLU or GELU"
    Options = ReluOrGeluOptions

    def search_passes(self):
        return [ActivationChoice(self.options.gelu_init)]

    def arch_parameters(self, graph):
        return list(getattr(graph.root, THETA).values()) if hasattr(graph.root, THETA) else []

    def after_arch_step(self, graph):
        torch._foreach_clamp_min_(self.arch_parameters(graph), 0.0)

    def arch_weights(self, graph):
        return {eid: dict(zip(("relu", "gelu"), (t / t.sum()).tolist()))
                for eid, t in getattr(graph.root, THETA).items()}

    def derive_passes(self):
        return [PickActivation()]

    def candidates(self, graph):
        return f"{sum(_is_relu_edge(graph, e) for e in graph.edges.values())} ReLU edges could become GELU"


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(8, 16), nn.Linear(16, 3), nn.ReLU()

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_small_method_is_registered_and_exact_at_initialisation():
    assert "relu-or-gelu" in methods.available() and "dnat" in methods.available()
    torch.manual_seed(0)
    model, x = TwoLayer().eval(), torch.randn(4, 8)
    s = archir.search(model, x, method="relu-or-gelu")
    assert len(s.arch_parameters()) == 1
    assert torch.equal(s.supernet.eval()(x), model(x))
    s.graph.verify()


def test_users_loop_keeps_the_methods_step_and_derives_gelu():
    torch.manual_seed(0)
    model, x = TwoLayer(), torch.randn(32, 8)
    target = torch.randn(32, 3)
    s = archir.search(model, x, method="relu-or-gelu", gelu_init=0.5)
    opt = torch.optim.SGD(s.arch_parameters(), lr=50.0)  # large steps: θ would go negative unprojected
    for _ in range(10):
        loss = F.mse_loss(s.supernet(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert all(float(p.detach().min()) >= 0.0 for p in s.arch_parameters())
    with torch.no_grad():
        s.arch_parameters()[0].copy_(torch.tensor([0.2, 0.8]))
    slim = s.derive()
    assert any(n.target is F.gelu for n in slim.graph.nodes)
    with torch.no_grad():  # the slim network is the supernet with the choice made one-hot
        s.arch_parameters()[0].copy_(torch.tensor([0.0, 1.0]))
        assert torch.allclose(slim(x), s.supernet(x), atol=1e-6)
    assert s.recorded_decisions and next(iter(s.recorded_decisions.values()))["decision"] == "gelu"


def test_small_method_through_the_cli(tmp_path):
    model_py = tmp_path / "two_layer.py"
    model_py.write_text(
        "import torch\nfrom torch import nn\n"
        "class TwoLayer(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc1, self.fc2, self.act = nn.Linear(8, 16), nn.Linear(16, 3), nn.ReLU()\n"
        "    def forward(self, x):\n"
        "        return self.fc2(self.act(self.fc1(x)))\n"
        "def build_model():\n    return TwoLayer()\n"
        "def example_input():\n    return torch.randn(2, 8)\n"
        "def data():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x = torch.randn(64, 8, generator=g)\n"
        "    ds = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())\n"
        "    return ds, ds\n")
    runner = CliRunner()
    help_text = runner.invoke(main, ["transform", "--help"]).output
    assert "--gelu-init" in help_text and "--share" in help_text and "relu-or-gelu" in help_text
    out = tmp_path / "out"
    r = runner.invoke(main, ["transform", str(model_py), "--method", "relu-or-gelu", "--gelu-init", "0.3",
                             "--epochs", "2", "--arch-epochs", "1", "--batch-size", "16", "--no-onnx",
                             "--quiet", "--out", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "relu-or-gelu" and report["method_options"] == {"gelu_init": 0.3}
    assert (out / "model.py").is_file() and (out / "arch.png").is_file()
    # an option of another method is refused with one line
    r = runner.invoke(main, ["transform", str(model_py), "--method", "relu-or-gelu", "--share", "full",
                             "--out", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "--share is an option of dnat, dso" in r.output
    assert "not of --method relu-or-gelu" in r.output
    r = runner.invoke(main, ["inspect", str(model_py), "--method", "relu-or-gelu"])
    assert r.exit_code == 0 and "1 ReLU edges could become GELU (relu-or-gelu)" in r.output


def test_unknown_method_and_options_are_one_line_errors():
    model, x = TwoLayer(), torch.randn(2, 8)
    with pytest.raises(archir.UserInputError, match="unknown method 'nope'; available: .*dnat"):
        archir.search(model, x, method="nope")
    with pytest.raises(archir.UserInputError, match="unknown option.*shar.*takes: share"):
        archir.search(model, x, method="dnat", shar="full")
    with pytest.raises(archir.UserInputError, match="--share must be one of cell, full"):
        archir.search(model, x, method="dnat", share="half")
    with pytest.raises(archir.UserInputError, match="--gelu-init must be >= 0.0"):
        archir.search(model, x, method="relu-or-gelu", gelu_init=-1.0)
