"""The IR core: golden text, the verifier's invariants, pictures, mutators and the pass manager."""
from __future__ import annotations

from pathlib import Path

import networkx as nx
import pytest
import torch

import archir
from archir.errors import IRError
from archir.ir import Edge, JunctionRef
from archir.passes.base import Pass, PassManager, PassResult
from model_patterns import MODELS, load_example

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def resnet20():
    ex = load_example("resnet20")
    torch.manual_seed(0)
    return ex.build_model(), ex.example_input()


@pytest.mark.parametrize("granularity", ["layer", "block"])
def test_resnet20_golden_text(resnet20, granularity):
    """Regenerate with: python -c "..." (see tests/golden/README)."""
    model, x = resnet20
    text = str(archir.trace(model, x, granularity)) + "\n"
    assert text == (GOLDEN / f"resnet20_{granularity}.txt").read_text()


def _graph(name="residual"):
    ctor, make_input = MODELS[name]
    torch.manual_seed(0)
    return archir.trace(ctor(), make_input())


def _sum_junction(g):
    return next(j for j in g.junctions.values() if j.combine is not None and j.combine.kind == "sum")


def test_verify_accepts_traced_graphs():
    for name in MODELS:
        _graph(name).verify()


@pytest.mark.parametrize("breakage, invariant", [
    ("dangling_endpoint", "edge endpoints exist"),
    ("cycle", "acyclic"),
    ("sum_shapes", "shapes agree at sum joins"),
    ("unreachable_output", "outputs reachable from an input"),
    ("dead_junction", "no dead junctions"),
    ("two_inputs_into_plain", "one incoming edge per plain junction"),
    ("missing_target", "targets exist in the root module"),
    ("bad_operand_order", "join operands numbered 0..n-1"),
])
def test_verify_names_the_broken_invariant(breakage, invariant):
    g = _graph()
    s = _sum_junction(g)
    a, b = g.in_edges(s.id)
    if breakage == "dangling_endpoint":
        g.edges[a.id].dst = "j999"
    elif breakage == "cycle":
        out = g.output_junctions()[0]
        g.add_edge(Edge("ecycle", out, g.in_edges(s.id)[0].src, [], in_meta=g.junctions[out].meta))
    elif breakage == "sum_shapes":
        from archir.ir import TensorMeta
        a.out_meta = TensorMeta((1, 2, 3), torch.float32)
    elif breakage == "unreachable_output":  # a source that no input feeds
        from archir.ir import Combine, Junction, Op
        src = Junction("jsrc", a.out_meta, Combine("other", Op("call_function", torch.zeros, ((1,),)), 0))
        g.add_junction(src)
        g.output = JunctionRef("jsrc")
    elif breakage == "dead_junction":
        from archir.ir import Junction
        g.add_junction(Junction("jdead", a.out_meta))
        g.add_edge(Edge("edead", a.src, "jdead", list(a.ops), in_meta=a.in_meta, out_meta=a.out_meta))
    elif breakage == "two_inputs_into_plain":
        plain = next(j for j in g.junctions.values() if j.combine is None and not j.is_input)
        src = g.in_edges(plain.id)[0].src
        g.add_edge(Edge("eextra", src, plain.id, [], in_meta=g.junctions[src].meta,
                        out_meta=g.junctions[src].meta))
    elif breakage == "missing_target":
        e = next(e for e in g.edges.values() if e.ops and e.ops[0].kind == "call_module")
        e.ops[0] = e.ops[0].replace(target="no.such.module")
    elif breakage == "bad_operand_order":
        a.dst_index = 5
    with pytest.raises(IRError, match=invariant):
        g.verify()


def test_mutators_refuse_to_leave_dangling_uses():
    g = _graph()
    s = _sum_junction(g)
    with pytest.raises(IRError, match="still use it"):
        g.remove_junction(s.id)
    with pytest.raises(IRError, match="not in the graph"):
        g.add_edge(Edge("ex", "j0", "nope", []))


def test_replace_junction_uses_moves_edges_and_outputs():
    g = _graph("residual")
    out = g.output_junctions()[0]
    (last,) = g.in_edges(out)
    g.replace_junction_uses(out, last.src)
    assert g.output_junctions() == [last.src]
    assert isinstance(g.output, JunctionRef)


def test_copy_is_independent():
    g = _graph()
    c = g.copy()
    e = next(iter(c.edges.values()))
    e.labels["changed"] = True
    c.remove_edge(next(iter(c.edges)))
    assert "changed" not in next(iter(g.edges.values())).labels
    g.verify()
    assert c.root is g.root


def test_networkx_and_dot(resnet20):
    model, x = resnet20
    g = archir.trace(model, x)
    nxg = g.to_networkx()
    assert nx.is_directed_acyclic_graph(nxg)
    assert nxg.number_of_edges() == len(g.edges) and nxg.number_of_nodes() == len(g.junctions)
    e = g.edges["e3"]
    e.labels.update(changed=True, decision="none")
    dot = g.to_dot()
    assert dot.startswith('digraph "ResNet"')
    changed = [line for line in dot.splitlines() if '"j1" -> "j3"' in line]
    assert changed and 'color="red"' in changed[0] and "[none]" in changed[0]
    plain = [line for line in dot.splitlines() if '"j0" -> "j1"' in line]
    assert "red" not in plain[0] and "conv1" in plain[0] and "f32[2,16,32,32]" in plain[0]


def test_matplotlib_svg_without_graphviz(tmp_path, resnet20):
    from archir.drawing import write_svg
    model, x = resnet20
    path = tmp_path / "g.svg"
    assert write_svg(archir.trace(model, x), path, force_matplotlib=True) == "matplotlib"
    assert path.read_text().lstrip().startswith("<?xml")


class _RenameOutput(Pass):
    """A deliberately broken pass: points the output at a junction that does not exist."""

    def run(self, graph):
        graph.output = JunctionRef("j404")
        return PassResult(graph, True)


class _NoOp(Pass):
    def run(self, graph):
        return PassResult(graph, False)


def test_pass_manager_names_the_pass_that_broke_the_graph():
    g = _graph()
    with pytest.raises(IRError, match=r"after pass _RenameOutput \(passes run: _NoOp, _RenameOutput\)"):
        PassManager([_NoOp(), _RenameOutput()])(g)
    assert PassManager([_NoOp()])(_graph()).modified is False


class _Boom(Pass):
    def run(self, graph):
        raise ValueError("no such edge")


class _SilentModuleAdder(Pass):
    """Adds a module to the root but claims it changed nothing (a broken promise)."""

    def run(self, graph):
        graph.root.add_module("extra", torch.nn.Identity())
        return PassResult(graph, False)


def test_pass_manager_names_the_pass_chain_for_any_exception():
    from archir.passes import PassError

    with pytest.raises(PassError, match=r"in pass _Boom \(passes run: _NoOp, _Boom\): ValueError: no such edge"):
        PassManager([_NoOp(), _Boom()])(_graph())


def test_a_pass_must_report_root_changes_as_modified():
    with pytest.raises(IRError, match="_SilentModuleAdder changed the root module.*modified=False"):
        PassManager([_SilentModuleAdder()])(_graph())


def test_edge_choice_without_choices_leaves_the_root_alone():
    from archir.passes import EdgeChoice

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    g = archir.trace(model, torch.randn(2, 3), granularity="block")
    names = {n for n, _ in g.root.named_modules()}
    assert PassManager([EdgeChoice()])(g).modified is False
    assert {n for n, _ in g.root.named_modules()} == names


def test_ir_core_imports_no_application_layer():
    import ast
    from pathlib import Path

    core = Path(archir.__file__).parent / "ir"
    for path in core.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                name = node.module if node.level == 0 else f"archir.ir.{node.module}"
                assert not name.startswith(("archir.passes", "archir.frontends", "archir.backends",
                                            "archir.pipeline", "archir.methods", "archir.search")), (path, name)


def test_costs(resnet20):
    model, x = resnet20
    g = archir.trace(model, x)
    assert g.total_params() == sum(p.numel() for p in model.parameters())
    stem = g.edges["e0"]
    assert g.edge_params(stem) == 16 * 3 * 9 + 2 * 16
    assert stem.flops == 32 * 32 * 16 * 3 * 9  # per example
    assert 40e6 < g.total_flops() < 42e6  # ResNet20: about 41M multiply-adds
