"""Cell-sharing groups (``Edge.group``): keys on repeated cells, explicit groups, ``inspect --groups``."""
from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

import archir
from archir.cli import main
from archir.frontends.build import assign_groups
from archir.passes.base import PassManager
from archir.passes.edge_choice import EdgeChoice, arch_parameters
from model_patterns import EXAMPLES, load_example


def _trace(name, **kwargs):
    ex = load_example(name)
    torch.manual_seed(0)
    return archir.trace(ex.build_model(), ex.example_input(), **kwargs)


@pytest.fixture(scope="module")
def graphs():
    return {name: _trace(name) for name in ("resnet20", "mobilenetv2", "darts_cell", "mbconv")}


def _groups(g) -> dict[str, list]:
    out: dict[str, list] = defaultdict(list)
    for e in g.edges_in_order():
        out[e.group].append(e)
    return dict(out)


def _shared(g) -> dict[str, list]:
    return {k: es for k, es in _groups(g).items() if len(es) >= 2}


def _in(e, path: str) -> bool:
    return e.scope == path or e.scope.startswith(path + ".")


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2", "darts_cell", "mbconv"])
def test_a_group_holds_one_edge_per_cell_and_one_position(graphs, name):
    for key, es in _shared(graphs[name]).items():
        scopes = [e.scope for e in es]
        assert all(scopes) and len(set(scopes)) == len(scopes), key  # one edge per cell call
        cls = key.split("#")[0]
        assert cls not in ("Sequential", "ModuleList", "ModuleDict"), key
        # same position: the same operations relative to the cell
        rel = {tuple(m[len(e.scope) + 1:] for m in e.modules) for e in es}
        assert len(rel) == 1, (key, rel)


def test_edges_outside_cells_keep_their_own_id(graphs):
    g = graphs["resnet20"]
    top = [e for e in g.edges.values() if e.scope == ""]
    assert top and all(e.group == e.id for e in top)
    assert graphs["mobilenetv2"].edges["e0"].group == "e0"  # the stem: a bare nn.Sequential


def test_resnet20_blocks_share_by_structure(graphs):
    g = graphs["resnet20"]
    shared = _shared(g)
    identity = ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1", "layer3.2"]
    down = ["layer2.0", "layer3.0"]
    by_scope = defaultdict(list)
    for e in g.edges_in_order():
        by_scope[e.scope].append(e)
    # all 7 blocks with an identity shortcut are one cell (sizes differ, structure does not) ...
    keys = [e.group for e in by_scope["layer1.0"]]
    assert len(keys) == 4 and keys[0] == "BasicBlock#1/0:conv1·bn1·relu"
    assert all({e.scope for e in shared[k]} == set(identity) for k in keys[:3])
    # ... also the last one, whose closing relu runs on into the head: that edge alone is its own
    assert {e.scope for e in shared[keys[3]]} == set(identity) - {"layer3.2"}
    assert [e.group for e in by_scope["layer3.2"]] == keys[:3]
    # ... the 2 blocks with a strided projection shortcut another
    down_keys = [e.group for e in by_scope["layer2.0"]]
    assert all({e.scope for e in shared[k]} == set(down) for k in down_keys)
    assert not set(keys) & set(down_keys)
    assert any(k.endswith(":shortcut.0·shortcut.1") for k in down_keys)


def _depthwise(g, e) -> bool:
    for m in e.modules:
        mod = g.root.get_submodule(m)
        if isinstance(mod, nn.Conv2d) and mod.groups > 1 and mod.groups == mod.in_channels:
            return True
    return False


def test_mobilenetv2_depthwise_edges_do_not_collapse(graphs):
    g = graphs["mobilenetv2"]
    dw = [e for e in g.edges_in_order() if _depthwise(g, e)]
    assert len(dw) == 17
    keys = {e.group for e in dw}
    assert len(keys) >= 4  # before: one group (every nn.Sequential was the same "cell")
    # a group never mixes a depthwise edge with another kind of edge
    for k in keys:
        assert all(_depthwise(g, e) for e in _groups(g)[k])
    group = {e.scope: e.group for e in dw}
    # the inverted residuals of one stage share ...
    assert group["features.4"] == group["features.5"] == group["features.6"]
    assert group["features.8"] == group["features.9"] == group["features.10"]
    # ... a stride-2 block is another cell than a residual one, and t=1 (no expansion) is alone
    assert group["features.7"] == group["features.14"] != group["features.8"]
    assert next(e.group == e.id for e in dw if e.scope == "features.1")


def test_darts_cells_share_by_position_and_reduction_cells_apart(graphs):
    g = graphs["darts_cell"]
    cells = {f"cells.{i}": [e for e in g.edges_in_order() if _in(e, f"cells.{i}")] for i in range(5)}
    assert all(e.scope == f"cells.{i}" for i in range(5) for e in cells[f"cells.{i}"])  # Cell, not SepConv
    # normal cells 2 and 4 (both after a reduction cell) share every edge position
    assert [e.group for e in cells["cells.2"]] == [e.group for e in cells["cells.4"]]
    assert len(set(e.group for e in cells["cells.2"])) == len(cells["cells.2"])  # one key per position
    # reduction cells 1 and 3 share theirs, with a key of their own
    assert [e.group for e in cells["cells.1"]] == [e.group for e in cells["cells.3"]]
    assert not {e.group for e in cells["cells.1"]} & {e.group for e in cells["cells.2"]}
    # cell 0 reads the stem through a ReLUConvBN, not a FactorizedReduce: another structure, alone
    assert all(e.group == e.id for e in cells["cells.0"])
    # the sep_conv edges of one cell are different positions: they never share among themselves
    for k, es in _shared(g).items():
        assert len({e.scope for e in es}) == len(es)


def test_mbconv_blocks_share_only_where_the_structure_repeats(graphs):
    g = graphs["mbconv"]
    shared = _shared(g)
    # blocks 0 and 4: kernel 3, stride 1, no squeeze-excite, residual (the expand ratio, 3 or 6,
    # is a channel count); every other MBConv is a cell of its own, squeeze-excite included
    assert shared and all({e.scope for e in es} == {"blocks.0", "blocks.4"} for es in shared.values())
    assert all(e.group == e.id for e in g.edges.values() if _in(e, "blocks.2"))


class Mixed(nn.Module):
    """A 1x1 and a 3x3 branch, two different nn.Sequential, concatenated."""

    def __init__(self, c):
        super().__init__()
        self.b1 = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.ReLU())
        self.b3 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.fuse = nn.Conv2d(2 * c, c, 1)

    def forward(self, x):
        return x + self.fuse(torch.cat([self.b1(x), self.b3(x)], 1))


class Branches(nn.Module):
    def __init__(self, repeat: int):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.b3 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(*[Mixed(16) for _ in range(repeat)])
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.b1(x), self.b3(x)], 1)
        return self.head(self.blocks(x).mean((2, 3)))


def test_two_sequential_branches_never_share():
    g = archir.trace(Branches(repeat=1), torch.randn(2, 3, 8, 8))
    assert len(_groups(g)) == len(g.edges)  # nothing repeats: every edge alone
    g = archir.trace(Branches(repeat=3), torch.randn(2, 3, 8, 8))
    top_b1 = [e for e in g.edges.values() if "b1.0" in e.modules]
    top_b3 = [e for e in g.edges.values() if "b3.0" in e.modules]
    assert top_b1[0].group == top_b1[0].id and top_b3[0].group == top_b3[0].id
    for key, es in _shared(g).items():
        assert key.startswith("Mixed#1/") and len(es) == 3
        rel = {tuple(m[len(e.scope) + 1:] for m in e.modules) for e in es}
        assert len(rel) == 1  # the 1x1 branch of every Mixed, or the 3x3 one, never both
    b1 = {e.group for e in g.edges.values() if any(m.endswith(".b1.0") for m in e.modules)}
    b3 = {e.group for e in g.edges.values() if any(m.endswith(".b3.0") for m in e.modules)}
    assert len(b1) == len(b3) == 1 and b1 != b3


def test_cell_sharing_gives_one_theta_per_position():
    def thetas(name, share):
        ex = load_example(name)
        g = archir.trace(ex.build_model(), ex.example_input())
        PassManager([EdgeChoice(share)])(g)
        return len(arch_parameters(g))

    assert thetas("resnet20", "cell") < thetas("resnet20", "full")
    assert thetas("mobilenetv2", "cell") < thetas("mobilenetv2", "full")


def test_explicit_groups_override_automatic_keys():
    stages = {"stage1": ["layer1.0", "layer1.1", "layer1.2"], "stage2": ["layer2.1", "layer2.2"]}
    g = _trace("resnet20", groups=stages)
    by_scope = defaultdict(list)
    for e in g.edges_in_order():
        by_scope[e.scope].append(e)
    for name, prefixes in stages.items():
        for k in range(4):
            assert {by_scope[p][k].group for p in prefixes} == {f"{name}/{k}"}
    # the other identity blocks keep their automatic keys, now without stages 1 and 2
    auto = _shared(g)[by_scope["layer3.1"][0].group]
    assert {e.scope for e in auto} == {"layer3.1", "layer3.2"}
    # assign_groups works on a traced graph as well, and its automatic keys come back without groups
    assign_groups(g)
    assert by_scope["layer1.0"][0].group == "BasicBlock#1/0:conv1·bn1·relu"


def test_explicit_groups_errors():
    with pytest.raises(archir.UserInputError, match="names no submodule"):
        _trace("resnet20", groups={"a": ["layer9"]})
    with pytest.raises(archir.UserInputError, match="no edge lies under"):
        _trace("resnet20", groups={"a": ["layer1.0.bn1"]})  # bn1 shares its edge with conv1
    with pytest.raises(archir.UserInputError, match="in both"):
        _trace("resnet20", groups={"a": "layer1.0", "b": ["layer1.0"]})
    with pytest.raises(archir.UserInputError, match="must be a dict"):
        _trace("resnet20", groups=["layer1.0"])


MODEL = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return x + torch.relu(self.bn(self.conv(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 10)
        self.a, self.b, self.c = Block(8), Block(8), Block(8)

    def forward(self, x):
        return self.head(self.c(self.b(self.a(self.stem(x)))).mean((2, 3)))


def build_model():
    return Net()


def example_input():
    return torch.randn(2, 3, 8, 8)
'''


def _stderr(res) -> str:
    try:
        return res.stderr
    except ValueError:  # older click: stderr mixed into output
        return res.output


def test_inspect_groups_lists_groups(tmp_path):
    path = tmp_path / "model.py"
    path.write_text(MODEL)
    res = CliRunner().invoke(main, ["inspect", str(path), "--groups"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    start = lines.index(next(l for l in lines if l.startswith("cell-sharing groups:")))
    listing = lines[start:]
    assert listing[0].startswith("cell-sharing groups: 3 shared by 9 edges, 2 edges alone")
    conv = next(l for l in listing if "conv·bn·relu" in l)
    assert conv.split()[0] == "Block#1/0:conv·bn·relu" and "3 edges:" in conv
    assert "modules: a.conv, a.bn, b.conv, b.bn, c.conv, c.bn" in conv
    assert listing[-1].startswith("  alone: e")
    assert "cell-sharing groups:" not in CliRunner().invoke(main, ["inspect", str(path)]).output

    path.write_text(MODEL + '\ngroups = {"pair": ["a", "b"]}\n')
    res = CliRunner().invoke(main, ["inspect", str(path), "--groups"])
    assert res.exit_code == 0, res.output
    assert any(l.split()[:3] == ["pair/0", "2", "edges:"] for l in res.output.splitlines())
    # c is now a cell of its own: its edges are alone
    assert "cell-sharing groups: 3 shared by 6 edges, 5 edges alone" in res.output

    path.write_text(MODEL + '\ngroups = {"pair": ["a", "x"]}\n')
    res = CliRunner().invoke(main, ["inspect", str(path)])
    assert res.exit_code == 2 and "'x' names no submodule" in _stderr(res)

    path.write_text(MODEL + '\ngroups = 4\n')
    res = CliRunner().invoke(main, ["inspect", str(path)])
    assert res.exit_code == 2 and "groups must be a dict" in _stderr(res)


def test_inspect_groups_on_an_example():
    res = CliRunner().invoke(main, ["inspect", str(EXAMPLES / "resnet20.py"), "--granularity", "block",
                                    "--groups"])
    assert res.exit_code == 0, res.output
    assert "cell-sharing groups: " in res.output


def test_explicit_groups_reach_the_search_and_transform():
    """``groups`` from ``archir.search``/``archir.transform`` (and MODEL.py through the CLI) decide
    which edges share one θ with ``share="cell"``."""
    ex = load_example("resnet20")
    torch.manual_seed(0)
    model = ex.build_model()
    pair = {"pair": ["layer1.0", "layer2.1"]}
    s = archir.search(model, ex.example_input(), share="cell", groups=pair)
    by_scope = defaultdict(list)
    for e in s.graph.edges_in_order():
        by_scope[e.scope].append(e)
    first = by_scope["layer1.0"][0]
    assert first.group == "pair/0" and by_scope["layer2.1"][0].group == "pair/0"
    assert first.labels["param"] == by_scope["layer2.1"][0].labels["param"]
    # without groups, layer1.0 shares with every stride-1 block, not with layer2.1 alone
    auto = archir.search(model, ex.example_input(), share="cell")
    assert next(e for e in auto.graph.edges_in_order() if e.scope == "layer1.0").group != "pair/0"

    res = archir.transform(model, ex.example_input(), epochs=0, groups=pair, progress=False, onnx=False)
    assert {e["group"] for e in res.report["decisions"] if e["group"].startswith("pair/")} == {
        "pair/0", "pair/1", "pair/2", "pair/3"}


def test_model_file_groups_reach_archir_transform(tmp_path):
    path = tmp_path / "model.py"
    path.write_text(MODEL + '\ngroups = {"pair": ["a", "b"]}\n')
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["transform", str(path), "--epochs", "0", "--no-onnx", "--quiet",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    groups = [e["group"] for e in json.loads((out / "report.json").read_text())["decisions"]]
    assert groups.count("pair/0") == 2
