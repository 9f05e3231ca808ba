"""Standalone slim-module backend: model.py + weights.pt that need only torch.

The main test has one shape: trace a zoo model or an example, lower it, emit it, then load the
emitted files in a *fresh* interpreter (one subprocess for all models: it imports only torch and
each model.py by path, loads weights.pt with ``weights_only=True``, runs the saved inputs) and
compare its outputs with the in-memory GraphModule's bit for bit, in eval mode.
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import json
import math
import operator
import re
import subprocess
import sys
import uuid
import weakref

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from torch import Tensor

import archir
from archir.backends import standalone
from archir.backends.standalone import StandaloneError, emit_standalone
from archir.errors import ArchirError
from archir.frontends.normalize import functional_setitem
from model_patterns import MODELS, assert_same, load_example, random_like

ZOO = ["residual", "dense", "squeeze_excite", "two_in_dict_out", "chunk_split", "transformer",
       "name_clash", "functional_dropout", "setitem", "shape_branch"]
EXAMPLES = ["resnet20", "mbconv", "darts_cell"]
CASES = ZOO + EXAMPLES

# Runs in a fresh interpreter: imports torch and the emitted files only.
FRESH = r"""
import importlib.util, json, sys
import torch
report = {}
for i, d in enumerate(sys.argv[1:]):
    spec = importlib.util.spec_from_file_location(f"slim_{i}", d + "/model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.build_model()
    model.load_state_dict(torch.load(d + "/weights.pt", weights_only=True))
    model.eval()
    inputs = torch.load(d + "/inputs.pt", weights_only=True)
    with torch.no_grad():
        torch.save(model(*inputs), d + "/outputs.pt")
ours = ("archir", "model_patterns", "backends", "frontends", "passes")
report["foreign"] = sorted(m for m in sys.modules if m.split(".")[0] in ours)
print(json.dumps(report))
"""


def _load(path):
    spec = importlib.util.spec_from_file_location(f"_test_slim_{uuid.uuid4().hex}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _model_and_inputs(name):
    torch.manual_seed(0)
    if name in MODELS:
        ctor, make_input = MODELS[name]
        return ctor(), make_input()
    ex = load_example(name)
    return ex.build_model(), ex.example_input()


@pytest.fixture(scope="module")
def emitted(tmp_path_factory):
    """Emit every case, run them all in one fresh interpreter; name -> (files, expected, got)."""
    root = tmp_path_factory.mktemp("standalone")
    cases = {}
    for name in CASES:
        model, inputs = _model_and_inputs(name)
        gm = archir.trace(model.eval(), inputs).to_module().eval()
        x = random_like(inputs, seed=1)
        x = (x,) if isinstance(x, torch.Tensor) else tuple(x)
        # The examples are slow on CPU (darts_cell: ~3 s a forward); the fresh interpreter checks them.
        check = x if name in ZOO else None
        files = emit_standalone(gm, root / name, example_inputs=check, header=f"case: {name}")
        torch.save(x, root / name / "inputs.pt")
        cases[name] = (files, gm, x)
    proc = subprocess.Popen([sys.executable, "-c", FRESH, *(str(root / n) for n in CASES)], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    expected = {}
    with torch.no_grad():  # while the fresh interpreter runs
        for name, (_, gm, x) in cases.items():
            expected[name] = gm(*x)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    report = json.loads(stdout.strip().splitlines()[-1])
    got = {n: torch.load(root / n / "outputs.pt", weights_only=True) for n in CASES}
    return {n: (cases[n][0], expected[n], got[n]) for n in CASES}, report


@pytest.mark.parametrize("name", CASES)
def test_fresh_interpreter_bit_identical(emitted, name):
    cases, report = emitted
    files, expected, got = cases[name]
    assert_same(expected, got)
    assert report["foreign"] == []  # the emitted files pulled in nothing but torch and the stdlib


@pytest.mark.parametrize("name", CASES)
def test_imports_only_torch_and_stdlib(emitted, name):
    files = emitted[0][name][0]
    tree = ast.parse(files.model_py.read_text())
    imported = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0
            imported.append(node.module)
    assert "torch" in imported
    for mod in imported:
        top = mod.split(".")[0]
        assert top == "torch" or top in sys.stdlib_module_names, mod
    src = files.model_py.read_text()
    assert not re.search(r"\barchir\.", src.split('"""', 2)[2])  # no archir references past the docstring
    assert f"case: {name}" in src


def test_readable_flat_names(emitted):
    files = emitted[0]["resnet20"][0]
    src = files.model_py.read_text()
    assert files.module_names["layer1.0.conv1"] == "layer1_0_conv1"
    assert "self.layer1_0_conv1 = torch.nn.Conv2d(16, 16, kernel_size=(3, 3)" in src
    assert "layer1_0_conv1 = self.layer1_0_conv1(relu)" in src
    forward = src.split("def forward")[1]
    assert "= None" not in forward and "del relu" in forward  # fx's release lines, written as del
    assert "getattr(" not in src
    # lowering renamed ``meta`` -> ``meta_``; the emitted class uses the user's names again
    clash = emitted[0]["name_clash"][0]
    assert clash.module_names == {"meta_.lin": "meta_lin", "graph_": "graph", "code_": "code"}
    assert files.num_parameters == sum(p.numel() for p in load_example("resnet20").build_model().parameters())


def test_weights_file_is_the_state_dict(emitted):
    files = emitted[0]["squeeze_excite"][0]
    state = torch.load(files.weights, weights_only=True)
    model = _load(files.model_py).build_model()
    assert list(state) == list(model.state_dict())
    assert {"scale", "shift"} <= set(state)  # parameter / buffer read with get_attr
    assert isinstance(model.scale, nn.Parameter) and "shift" in dict(model.named_buffers())
    assert not list(files.model_py.parent.glob(".*.tmp"))  # atomic writes left no temporaries


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x).clamp(min=0)


class WithCustom(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.custom = Custom()

    def forward(self, x):
        return self.custom(self.pre(x))


def test_custom_leaf_module_is_copied(tmp_path):
    """A user-defined leaf: model.py holds a copy of its class (it uses only torch), and the
    emitted model is verified against the GraphModule on the example input."""
    x = torch.randn(2, 4)
    gm = archir.trace(WithCustom(), x, leaf_modules=["custom"]).to_module()
    files = emit_standalone(gm, tmp_path / "out", example_inputs=(x,))
    assert "class Custom(nn.Module):" in files.model_py.read_text()


class Subclassed(nn.Linear):  # not a direct nn.Module subclass: its base's forward is not copied
    pass


def test_custom_leaf_module_that_cannot_be_copied_raises(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), Subclassed(4, 4))
    gm = archir.trace(model, torch.randn(2, 4), leaf_modules=["1"]).to_module()
    with pytest.raises(StandaloneError, match=r"'1'.*Subclassed.*user-defined") as info:
        emit_standalone(gm, tmp_path / "out")
    assert isinstance(info.value, ArchirError)
    assert not (tmp_path / "out" / "model.py").exists()


def _gm(root: nn.Module, build) -> fx.GraphModule:
    g = fx.Graph()
    build(g)
    return fx.GraphModule(root, g)


def test_torch_module_that_does_not_round_trip_raises(tmp_path):
    lin = nn.Linear(4, 4)
    lin.in_features = 5  # repr now lies about the constructor arguments
    hooked = nn.ReLU()
    hooked.register_forward_hook(lambda m, i, o: o * 2)
    for mod, why in [(lin, "does not round-trip"), (hooked, "hooks"),
                     (nn.TransformerEncoderLayer(4, 1), "submodules")]:
        root = nn.Module()
        root.layer = mod
        gm = _gm(root, lambda g: g.output(g.call_module("layer", (g.placeholder("x"),))))
        with pytest.raises(StandaloneError, match=rf"'layer'.*{type(mod).__name__}.*{why}"):
            emit_standalone(gm, tmp_path)


def test_train_eval_switch(tmp_path):
    model, inputs = _model_and_inputs("shape_branch")  # Dropout and BatchNorm
    gm = archir.trace(model.train(), inputs).to_module()
    files = emit_standalone(gm, tmp_path, example_inputs=(inputs,))
    slim = _load(files.model_py).load_model()
    assert slim.training and all(m.training for m in slim.modules())
    x = random_like(inputs, seed=3)
    for mode in (True, False):
        gm.train(mode)
        slim.train(mode)
        assert all(m.training is mode for m in slim.modules())
        torch.manual_seed(7)
        expected = gm(x)
        torch.manual_seed(7)
        got = slim(x)
        assert_same(expected, got)  # same dropout mask, same batch statistics
    assert torch.equal(slim.bn.running_mean, gm.bn.running_mean)  # train step updated both alike
    assert torch.equal(slim(x), slim(x))  # eval: deterministic
    gm.eval()
    assert not _load(emit_standalone(gm, tmp_path / "e").model_py).build_model().training


def test_inlines_small_archir_function_and_resolves_stdlib(tmp_path):
    root = nn.Module()
    root.lin = nn.Linear(4, 4)
    root.k = 4

    def build(g):
        x = g.placeholder("x")
        y = g.call_module("lin", (x,))
        y = g.call_function(functional_setitem, (y, (slice(None), 0), 0.0))
        r = g.call_function(math.sqrt, (g.get_attr("k"),))
        g.output((g.call_function(operator.mul, (y, r)), g.call_function(operator.neg, (y,))))

    gm = _gm(root, build)
    files = emit_standalone(gm, tmp_path, example_inputs=(torch.randn(3, 4),))
    src = files.model_py.read_text()
    assert "# inlined from archir.frontends.normalize.functional_setitem" in src
    # the graph's node is called ``functional_setitem`` too, so the inlined function steps aside
    assert "def functional_setitem_fn(x, index, value):" in src
    assert "math.sqrt(k)" in src and "import math" in src
    x = torch.randn(3, 4)
    assert_same(gm(x), _load(files.model_py).load_model()(x))


def user_helper(x):
    return x * 3


SCALES = {"a": 3.0}


def user_helper_with_state(x):
    return x * SCALES["a"]


def test_plain_function_from_outside_torch_is_inlined(tmp_path):
    """Libraries ``torch.fx.wrap`` helpers (torchvision's swin); a plain one is copied over."""
    root = nn.Module()
    gm = _gm(root, lambda g: g.output(g.call_function(user_helper, (g.placeholder("x"),))))
    files = emit_standalone(gm, tmp_path, example_inputs=(torch.randn(2, 3),))
    assert f"# inlined from {__name__}.user_helper" in files.model_py.read_text()


def _registry(fn):  # a registration (as torch.fx.wrap or timm's register_notrace_function): fn itself
    _registry.seen = fn
    return fn


def _wrapping(fn):  # a decorator that changes what the name calls
    @functools.wraps(fn)
    def wrapper(x):
        return fn(x) + 1
    return wrapper


@torch.fx.wrap
@_registry
def registered_helper(x, dtype: torch.dtype = torch.float64):
    return (x.to(dtype) * 3).float()  # a torch dtype as a default argument (timm's _build_grid)


@_wrapping
def wrapped_helper(x):
    return x * 3


def test_registration_decorators_are_dropped_and_wrapping_ones_refused(tmp_path):
    """timm's ``_build_grid`` is ``@torch.fx.wrap @register_notrace_function``: both return the
    function itself, so model.py gets the plain ``def``; a decorator that wraps would change it."""
    root, x = nn.Module(), torch.randn(2, 3)
    gm = _gm(root, lambda g: g.output(g.call_function(registered_helper, (g.placeholder("x"),))))
    files = emit_standalone(gm, tmp_path / "ok", example_inputs=(x,))
    src = files.model_py.read_text()
    assert f"# inlined from {__name__}.registered_helper\ndef registered_helper_fn(x, dtype=torch.float64):" in src
    assert_same(gm(x), _load(files.model_py).load_model()(x))
    gm = _gm(root, lambda g: g.output(g.call_function(wrapped_helper, (g.placeholder("x"),))))
    with pytest.raises(StandaloneError, match="wrapped_helper, which is not a plain"):
        emit_standalone(gm, tmp_path / "refused", example_inputs=(x,))


def test_function_using_state_from_outside_torch_raises(tmp_path):
    root = nn.Module()
    gm = _gm(root, lambda g: g.output(g.call_function(user_helper_with_state, (g.placeholder("x"),))))
    with pytest.raises(StandaloneError, match="user_helper_with_state.*SCALES"):
        emit_standalone(gm, tmp_path)


@pytest.mark.parametrize("layer", [
    nn.Conv2d(3, 4, 5, padding="same", groups=1, bias=False),        # repr: padding=same
    nn.AvgPool2d(3, 2, ceil_mode=True, count_include_pad=False),    # repr drops both flags
    nn.MaxPool2d(3, 2, 1, ceil_mode=True),
], ids=["conv_same", "avgpool_ceil", "maxpool_ceil"])
def test_modules_whose_repr_is_not_their_constructor(layer, tmp_path):
    root = nn.Module()
    root.layer = layer
    gm = _gm(root, lambda g: g.output(g.call_module("layer", (g.placeholder("x"),))))
    x = torch.randn(2, 3, 9, 9)
    files = emit_standalone(gm, tmp_path, example_inputs=(x,))
    slim = _load(files.model_py).load_model()
    assert_same(gm(x), slim(x))
    assert repr(slim.layer) == repr(layer)
    for k in ("padding", "ceil_mode", "count_include_pad"):
        assert getattr(slim.layer, k, None) == getattr(layer, k, None)


def test_shared_and_tied_parameters_stay_shared(tmp_path):
    root = nn.Module()
    root.seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU())  # a Sequential kept as one call
    root.emb = nn.Linear(4, 4)
    root.head = nn.Linear(4, 4)
    root.head.weight = root.emb.weight  # tied
    root.emb.bias.requires_grad_(False)
    root.pos = nn.Parameter(torch.randn(4))

    def build(g):
        x = g.placeholder("x")
        y = g.call_module("seq", (x,))
        y = g.call_module("seq.0", (y,))  # a module inside a called module
        y = g.call_module("head", (g.call_module("emb", (y,)),))
        w = g.get_attr("emb.weight")  # a called module's parameter read directly
        y = g.call_function(torch.matmul, (y, w))
        g.output({"y": g.call_function(operator.add, (y, g.get_attr("pos")))})

    gm = _gm(root, build)
    files = emit_standalone(gm, tmp_path, example_inputs=(torch.randn(2, 4),))
    assert files.module_names["seq.0"] == "seq.0" and files.module_names["emb.weight"] == "emb.weight"
    slim = _load(files.model_py).load_model()
    assert slim.head.weight is slim.emb.weight and slim.seq[0] is not None
    assert not slim.emb.bias.requires_grad and slim.pos.requires_grad
    assert files.num_parameters == sum(p.numel() for p in root.parameters())
    x = torch.randn(2, 4)
    assert_same(gm(x), slim(x))


def test_verification_failure_raises(tmp_path, monkeypatch):
    model, inputs = _model_and_inputs("dense")
    gm = archir.trace(model, inputs).to_module()
    real = standalone.emit.save_torch
    monkeypatch.setattr(standalone.emit, "save_torch",
                        lambda w, p: real({k: torch.zeros_like(v) for k, v in w.items()}, p))
    with pytest.raises(StandaloneError, match="does not reproduce"):
        emit_standalone(gm, tmp_path, example_inputs=(inputs,))


def test_bad_class_name(tmp_path):
    gm = _gm(nn.Module(), lambda g: g.output(g.placeholder("x")))
    with pytest.raises(StandaloneError, match="class_name"):
        emit_standalone(gm, tmp_path, class_name="not valid")
    files = emit_standalone(gm, tmp_path, class_name="Net", example_inputs=(torch.randn(2),))
    assert "class Net(torch.nn.Module):" in files.model_py.read_text()


def test_model_py_frees_each_value_after_its_last_use(tmp_path):
    """fx's release lines stay in model.py (as ``del``): when the last layer runs, the earlier
    activations are gone, so model.py's peak memory is the original's (holding every activation
    to the end, a 412M ViT at batch 4 ran out of 23 GiB)."""
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(6)]).eval()
    x = torch.randn(2, 8)
    emit_standalone(archir.trace(model, x).to_module(), tmp_path, example_inputs=(x,))
    emitted = _load(tmp_path / "model.py").load_model().eval()
    layers = [m for m in emitted.modules() if isinstance(m, nn.Linear)]
    outputs, alive = [], []
    for layer in layers[:-1]:
        layer.register_forward_hook(lambda _m, _i, out: outputs.append(weakref.ref(out)))
    layers[-1].register_forward_pre_hook(lambda _m, _i: alive.append(sum(r() is not None for r in outputs)))
    with torch.no_grad():
        assert torch.equal(emitted(x), model(x))
    assert len(outputs) == 5 and alive == [1]  # only the last layer's input


# ---- parts kept opaque whose classes come from an installed package ------------------------------
# A tiny package, installed the way pip installs one (a dist-info beside it), in the shape of
# torchvision's detectors: parts whose classes use the package's own types (so their source cannot
# be copied into model.py), plain objects and functions held as attributes, a method of the root
# and of a part kept opaque, and a forward that returns a loss in training mode.
FAKE_PACKAGE = '''
import torch
from torch import Tensor, nn


class Coder:
    """A plain object held as an attribute, like torchvision's BoxCoder."""

    def __init__(self, scale: float):
        self.scale = scale

    def __call__(self, x):
        return x * self.scale


def clamp_scores(x):
    return x.clamp(min=0)


class Batch:
    """The package's own type (like ImageList): the class that uses it cannot be copied."""

    def __init__(self, tensors):
        self.tensors = tensors


class Heads(nn.Module):
    kind: str = "heads"

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 2, 1)
        self.coder = Coder(2.0)
        self.score_fn = clamp_scores
        self.anchors = [torch.arange(4.0), torch.ones(2, dtype=torch.int64)]
        self.dtype = torch.float32

    def forward(self, x: Tensor) -> Tensor:
        out = self.score_fn(self.coder(self.conv(Batch(x).tensors)))
        if out.sum() > 0:  # a branch on the data: the part is kept opaque
            out = out + self.anchors[0].sum()
        return out

    def postprocess(self, out):  # as many scores per image as are positive: kept opaque
        return [{"scores": o.flatten().topk(max(int((o > 0).sum()), 1)).values} for o in out]


class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.heads = Heads()
        self.threshold = 0.5
        self.coder = Coder(0.5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.block(x)
        out = self.heads(x)
        if self.training:
            return self.loss(out)
        return self.heads.postprocess(out)

    def loss(self, out):  # iterates the batch: kept opaque, on the root itself (as SSD's compute_loss)
        loss = out.new_zeros(())
        for row in out:
            if row.mean() > self.threshold:
                loss = loss + self.coder(row).mean()
        return {"loss": loss}
'''


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    from archir.backends.standalone import submodules

    name = f"archir_fakepkg_{uuid.uuid4().hex[:8]}"
    site = tmp_path / "site"
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text(FAKE_PACKAGE)
    info = site / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "top_level.txt").write_text(name + "\n")
    monkeypatch.syspath_prepend(str(site))
    submodules._distributions.cache_clear()
    yield importlib.import_module(name)
    submodules._distributions.cache_clear()
    sys.modules.pop(name, None)


def test_parts_from_an_installed_package_are_imported_and_both_modes_emitted(fake_package, tmp_path):
    """model.py imports the package's classes (it says so), rebuilds their plain attributes
    (objects, functions, tensors), runs the methods kept opaque on the part and on the model, and
    writes the forward that differs by mode as two methods: bit for bit in eval and training mode."""
    torch.manual_seed(0)
    model = fake_package.Detector().eval()
    x = torch.randn(2, 3, 6, 6)
    g = archir.trace(model, (x,))
    g.verify()
    assert {"heads", "heads:postprocess", ":loss"} <= set(g.leaves)
    gm = g.to_module()
    files = emit_standalone(gm, tmp_path / "out", example_inputs=(x,))
    src = files.model_py.read_text()
    name = fake_package.__name__
    assert f"Needs PyTorch and {name}: the parts kept opaque (heads, Detector's own methods) are its classes." in src
    assert f"\nimport {name}\n" in src and "class Heads" not in src  # imported, not copied
    assert f"_archir_object({name}.Coder, {{'scale': 2.0}})" in src and f"{name}.clamp_scores" in src
    assert "if self.training else self.archir_by_mode_eval(*values)" in src
    emitted = _load(files.model_py).load_model()
    for training in (False, True):
        for xs in (x, torch.randn(2, 3, 5, 7), torch.randn(2, 3, 4, 4) + 1):  # the graph reads two items
            with torch.no_grad():
                assert_same(model.train(training)(xs), emitted.train(training)(xs))
    derived = archir.search(model.eval(), (x,), method="dso").derive()  # what archir transform emits
    emitted = _load(emit_standalone(derived, tmp_path / "derived", example_inputs=(x,)).model_py).load_model()
    with torch.no_grad():
        assert_same(model.train()(x), emitted.train()(x))


class Annotated(nn.Module):
    scale: float = 2.0  # an annotated class attribute stays, as a plain one

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:  # ``Tensor``: a name model.py does not import
        return self.lin(x) * self.scale


def test_a_copied_class_loses_its_annotations(tmp_path):
    x = torch.randn(2, 4)
    model = nn.Sequential(nn.Linear(4, 4), Annotated())
    gm = archir.trace(model, x, leaf_modules=["1"]).to_module()
    src = emit_standalone(gm, tmp_path / "out", example_inputs=(x,)).model_py.read_text()
    assert "def forward(self, x):" in src and "    scale = 2.0" in src


def test_an_attribute_model_py_cannot_rebuild_is_named(fake_package, tmp_path):
    model = fake_package.Detector().eval()
    model.heads.owner = weakref.ref(model)  # neither a literal, a tensor nor a plain object
    gm = archir.trace(model, (torch.randn(2, 3, 6, 6),)).to_module()
    with pytest.raises(StandaloneError, match=r"'heads'.*attribute 'owner' \(weakref.ReferenceType\)"):
        standalone.check_emittable(gm)


def test_transform_keeps_the_whole_model_and_says_what_model_py_needs(fake_package, tmp_path):
    """Before this, a model whose opaque parts model.py could not hold was searched inside a part."""
    torch.manual_seed(0)
    model = fake_package.Detector().eval()
    x = torch.randn(2, 3, 6, 6)
    res = archir.transform(model, (x,), "dnat", epochs=0, onnx=False, progress=False, out=tmp_path / "out")
    assert res.whole is None and "submodule" not in res.report
    assert res.report["model_py_needs"] == ["torch", fake_package.__name__]
    assert f"needs torch and {fake_package.__name__})" in (tmp_path / "out" / "report.md").read_text()
    emitted = _load(tmp_path / "out" / "model.py").load_model()
    with torch.no_grad():
        for training in (False, True):
            assert_same(model.train(training)(x), emitted.train(training)(x))
