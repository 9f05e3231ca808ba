"""Trace -> verify -> lower must give bit-identical outputs, in train and eval modes."""
from __future__ import annotations

import pytest
import torch

import archir
from archir.errors import TraceError
from model_patterns import EXAMPLE_NAMES, MODELS, ValueBranch, assert_same, call, load_example, random_like


def _roundtrip(model, inputs, frontend="auto", granularity="layer", mode="eval"):
    model = model.train(mode == "train")
    graph = archir.trace(model, inputs, granularity, frontend=frontend)
    graph.verify()
    lowered = graph.to_module().train(mode == "train")
    for seed in (0, 1):
        x = random_like(inputs, seed)
        torch.manual_seed(seed)
        expected = call(model, x)
        torch.manual_seed(seed)
        got = call(lowered, x)
        assert_same(expected, got)
    return graph


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_models_roundtrip_bit_identical(name, mode):
    ctor, make_input = MODELS[name]
    torch.manual_seed(0)
    graph = _roundtrip(ctor(), make_input(), mode=mode)
    assert graph.frontend == ("export" if name in ("shape_branch", "setitem") else "fx")


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
@pytest.mark.parametrize("granularity", ["layer", "block"])
def test_examples_roundtrip_bit_identical(name, granularity):
    ex = load_example(name)
    torch.manual_seed(0)
    _roundtrip(ex.build_model(), ex.example_input(), granularity=granularity)


@pytest.mark.parametrize("name", ["residual", "transformer", "squeeze_excite", "two_in_dict_out"])
def test_export_frontend_roundtrip(name):
    """The fallback frontend alone gives the same function, in both modes."""
    ctor, make_input = MODELS[name]
    torch.manual_seed(0)
    for mode in ("eval", "train"):
        _roundtrip(ctor(), make_input(), frontend="export", mode=mode)


def test_export_fallback_follows_train_and_eval():
    """BatchNorm and Dropout must switch modes after the torch.export fallback."""
    ctor, make_input = MODELS["shape_branch"]
    torch.manual_seed(0)
    model = ctor()
    graph = archir.trace(model.train(), make_input())
    assert graph.frontend == "export"
    lowered = graph.to_module()
    x = torch.randn(4, 3, 8, 8)
    lowered.eval()
    model.eval()
    assert torch.equal(lowered(x), model(x))
    assert torch.equal(lowered(x), lowered(x))  # eval: no dropout randomness
    lowered.train()
    a, b = lowered(x), lowered(x)
    assert not torch.equal(a, b)  # train: dropout is active
    bn = [m for m in lowered.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    before = bn.running_mean.clone()
    lowered(x)
    assert not torch.equal(before, bn.running_mean)  # train: running statistics update


def test_export_fallback_keeps_user_names():
    graph = archir.trace(MODELS["shape_branch"][0](), torch.randn(2, 3, 8, 8))
    modules = {m for e in graph.edges.values() for m in e.modules}
    assert {"conv", "bn", "drop", "fc"} <= modules


def test_export_fallback_dynamic_batch():
    model = MODELS["shape_branch"][0]().eval()
    lowered = archir.trace(model, torch.randn(2, 3, 8, 8)).to_module().eval()
    x = torch.randn(5, 3, 8, 8)
    assert torch.equal(lowered(x), model(x))


def test_value_branch_raises_trace_error_with_location():
    with pytest.raises(TraceError) as info:
        archir.trace(ValueBranch(), torch.randn(2, 4))
    err = info.value
    assert err.location is not None and err.location.startswith(str(__import__("model_patterns").__file__))
    line = int(err.location.rsplit(":", 1)[1])
    source = open(__import__("model_patterns").__file__).read().splitlines()[line - 1]
    assert "y.sum() > 0" in source
    assert "torch.fx" in str(err) and "torch.export" in str(err)


def test_user_model_is_not_modified():
    model = MODELS["residual"][0]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = archir.trace(model.train(), torch.randn(2, 3, 8, 8))
    graph.to_module().train()(torch.randn(2, 3, 8, 8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.relu.inplace is True


def test_shared_module_called_twice_shares_parameters():
    model = MODELS["two_in_dict_out"][0]()
    graph = archir.trace(model, (torch.randn(3, 6), torch.randn(3, 6)))
    users = [e.id for e in graph.edges.values() if "enc" in e.modules]
    assert len(users) == 2
    assert graph.total_params() == sum(p.numel() for p in model.parameters())
    lowered = graph.to_module()
    assert sum(p.numel() for p in lowered.parameters()) == sum(p.numel() for p in model.parameters())


def test_junction_kinds():
    kinds = lambda g: sorted({j.combine.kind for j in g.junctions.values() if j.combine})  # noqa: E731
    assert kinds(archir.trace(MODELS["dense"][0](), torch.randn(2, 3, 8, 8))) == ["concat"]
    se = archir.trace(MODELS["squeeze_excite"][0](), torch.randn(2, 3, 8, 8))
    assert kinds(se) == ["product"]
    concat = [j for j in archir.trace(MODELS["dense"][0](), torch.randn(2, 3, 8, 8)).junctions.values()
              if j.combine]
    assert all(j.combine.dim == 1 for j in concat)
    tr = archir.trace(MODELS["transformer"][0](), torch.randn(2, 5, 16))
    assert "other" in kinds(tr) and "sum" in kinds(tr)


def test_sizes_do_not_make_junctions():
    """``x.view(x.size(0), -1)`` stays one operation on one edge."""

    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return y.view(y.size(0), -1).relu()

    g = archir.trace(Flat(), torch.randn(2, 3, 5, 5))
    assert len(g.junctions) == 2 and len(g.edges) == 1
    assert "view(x.size(0), -1)" in str(g)


def test_chunk_makes_indexed_multi_output_junction():
    g = archir.trace(MODELS["chunk_split"][0](), torch.randn(2, 8))
    multi = [j for j in g.junctions.values() if isinstance(j.meta, tuple)]
    assert len(multi) >= 2
    firsts = [e.ops[0].render() for j in multi for e in g.out_edges(j.id)]
    assert "getitem(0)" in firsts and "getitem(1)" in firsts


def test_layer_granularity_splits_after_activation():
    ex = load_example("resnet20")
    layer = archir.trace(ex.build_model(), ex.example_input(), "layer")
    block = archir.trace(ex.build_model(), ex.example_input(), "block")
    assert len(layer.edges) > len(block.edges)
    first_block = [e.render_ops() for e in layer.edges.values() if e.scope == "layer1.0"]
    assert "layer1.0.conv1 · layer1.0.bn1 · relu" in first_block
    assert "layer1.0.conv2 · layer1.0.bn2" in first_block


def test_cell_groups_share_keys_across_repeated_blocks():
    ex = load_example("resnet20")
    g = archir.trace(ex.build_model(), ex.example_input())
    groups: dict[str, list[str]] = {}
    for e in g.edges.values():
        groups.setdefault(e.group, []).append(e.scope)
    conv1 = [k for k in groups if k.startswith("BasicBlock#") and k.endswith(":conv1·bn1·relu")]
    assert conv1 and len(groups[conv1[0]]) == 7  # 9 blocks, 2 of them with a projection shortcut
    assert all(e.group == e.id for e in g.edges.values() if e.scope == "")


def test_bad_inputs():
    with pytest.raises(archir.UserInputError):
        archir.trace(MODELS["residual"][0](), [1, 2])
    with pytest.raises(archir.UserInputError):
        archir.trace(MODELS["residual"][0](), torch.randn(2, 3, 8, 8), granularity="cell")
