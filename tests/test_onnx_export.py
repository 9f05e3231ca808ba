"""ONNX backend: export, cleanup, checks, and numerical verification under ONNX Runtime.

Each export test has one shape: build a module, export it, check the graph's structure (names,
dynamic batch axis, no Identity nodes), then check the numbers (``export_onnx`` verifies at the
example's batch size and at batch + 3; some tests also run ONNX Runtime by hand at other sizes).
"""

import os
import warnings

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from archir.backends import onnx_export
from archir.backends.onnx_export import (
    OnnxVerificationError,
    clean_graph,
    count_nodes,
    export_onnx,
    ort_session,
)


def conv_bn_relu(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv_bn_relu(3, 8), conv_bn_relu(8, 16, 2))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.features(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Block(nn.Module):
    """BasicBlock with an nn.Identity shortcut and a no-op view: both invite Identity nodes."""

    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(c, c), nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))
        self.shortcut = nn.Identity()

    def forward(self, x):
        y = self.body(x) + self.shortcut(x)
        return F.relu(y.view(y.shape))


class ResidualNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn_relu(3, 8)
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(x.mean((2, 3)))


class TupleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = conv_bn_relu(3, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        f = self.conv(x)
        return self.fc(f.mean((2, 3))), f


class DictNet(TupleNet):
    def forward(self, x):
        logits, f = super().forward(x)
        return {"logits": logits, "features": f, "probs": logits.softmax(-1)}


class PassThrough(nn.Module):
    """Returns its input, and one tensor twice: ONNX can only express these with Identity."""

    def forward(self, x):
        y = torch.relu(x)
        return {"relu": y, "relu_again": y, "input_copy": x}


class BehavesDifferentlyInOnnx(nn.Module):
    def forward(self, x):
        return x + 1e-3 if torch.onnx.is_in_onnx_export() else x * 1.0


def ort_run(path, x):
    session = ort_session(path)
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})


def batch_dims(model):
    return [vi.type.tensor_type.shape.dim[0].dim_param for vi in [*model.graph.input, *model.graph.output]]


def files_in(directory):
    return sorted(os.listdir(directory))


def test_conv_bn_relu_net_exports_and_verifies(tmp_path, capfd, recwarn, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU-only path
    torch.manual_seed(0)
    model = SmallNet().train()
    capfd.readouterr()
    report = export_onnx(model, torch.randn(2, 3, 16, 16), tmp_path / "small.onnx")
    session = ort_session(tmp_path / "small.onnx")
    session.run(None, {"input": np.zeros((1, 3, 16, 16), np.float32)})

    # nothing printed or warned by ONNX Runtime (or the exporter's registry) on a CPU-only run
    out, err = capfd.readouterr()
    assert report.providers == ["CPUExecutionProvider"] == session.get_providers()
    assert "onnxruntime" not in out + err and "[W:" not in err and "[E:" not in err
    assert "torchvision is not installed" not in err
    assert not [w for w in recwarn if "onnxruntime" in str(w.filename) + str(w.message)]
    assert not [w for w in recwarn if "training mode" in str(w.message)]

    assert report.passed and report.verified
    assert report.exporter == "dynamo"
    assert model.training and all(m.training for m in model.modules())  # mode restored
    assert {e.batch for e in report.errors} == {2, 5}
    assert all(e.max_abs_err <= 1e-5 + 1e-4 * 10 for e in report.errors)
    assert report.op_counts == count_nodes(tmp_path / "small.onnx")
    assert report.op_counts["Conv"] == 2 and "Identity" not in report.op_counts
    assert report.num_nodes == sum(report.op_counts.values())
    assert files_in(tmp_path) == ["small.onnx"]  # no temp files or folders left behind
    onnx.checker.check_model(str(tmp_path / "small.onnx"), full_check=True)
    d = report.to_dict()
    assert d["path"] == str(tmp_path / "small.onnx") and d["errors"][0]["name"] == "output"


def test_residual_net_has_no_identity_and_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    model = ResidualNet().eval()
    path = tmp_path / "res.onnx"
    report = export_onnx(model, torch.randn(1, 3, 8, 8), path)  # batch 1 example still gives dynamic batch

    assert report.passed
    assert "Identity" not in count_nodes(path)
    onnx_model = onnx.load(str(path))
    assert [i.name for i in onnx_model.graph.input] == ["input"]
    assert batch_dims(onnx_model) == ["batch", "batch"]
    for batch in (3, 64):
        x = torch.randn(batch, 3, 8, 8)
        with torch.no_grad():
            ref = model(x).numpy()
        (got,) = ort_run(path, x)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_static_batch_when_not_dynamic(tmp_path):
    torch.manual_seed(0)
    report = export_onnx(SmallNet(), torch.randn(2, 3, 8, 8), tmp_path / "s.onnx", dynamic_batch=False)
    assert report.passed and {e.batch for e in report.errors} == {2}
    dims = [vi.type.tensor_type.shape.dim[0] for vi in onnx.load(str(tmp_path / "s.onnx")).graph.input]
    assert [d.dim_value for d in dims] == [2]


class FixedBatch(nn.Module):
    """A graph traced at batch 1 may hard-code it (timm's efficientvit under torch.export)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x).reshape(1, 256)


def test_module_that_only_runs_at_its_batch_exports_static_with_a_note(tmp_path):
    torch.manual_seed(0)
    report = export_onnx(FixedBatch().eval(), torch.randn(1, 3, 8, 8), tmp_path / "f.onnx")
    assert report.passed and not report.dynamic_batch and {e.batch for e in report.errors} == {1}
    assert any("does not run at batch 4" in n for n in report.notes)
    dims = [vi.type.tensor_type.shape.dim[0] for vi in onnx.load(str(tmp_path / "f.onnx")).graph.input]
    assert [d.dim_value for d in dims] == [1]


def test_tuple_outputs_are_named_and_verified(tmp_path):
    torch.manual_seed(0)
    report = export_onnx(TupleNet(), torch.randn(2, 3, 8, 8), tmp_path / "t.onnx")
    assert report.passed and report.output_names == ["output_0", "output_1"]
    assert [o.name for o in onnx.load(str(tmp_path / "t.onnx")).graph.output] == ["output_0", "output_1"]

    report = export_onnx(TupleNet(), torch.randn(2, 3, 8, 8), tmp_path / "t2.onnx",
                         output_names=["logits", "feat"], input_names=["image"], exporter="torchscript")
    model = onnx.load(str(tmp_path / "t2.onnx"))
    assert [o.name for o in model.graph.output] == ["logits", "feat"]
    assert [i.name for i in model.graph.input] == ["image"]


def test_dict_outputs_keep_their_keys(tmp_path):
    torch.manual_seed(0)
    model = DictNet().eval()
    path = tmp_path / "d.onnx"
    report = export_onnx(model, torch.randn(2, 3, 8, 8), path)
    assert report.passed and report.output_names == ["logits", "features", "probs"]
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["logits", "features", "probs"]
    assert {e.name for e in report.errors} == {"logits", "features", "probs"}

    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    session = ort_session(path)
    got = dict(zip(["logits", "features", "probs"], session.run(["logits", "features", "probs"], {"input": x.numpy()})))
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key].numpy(), rtol=1e-4, atol=1e-5)


def test_multiple_inputs(tmp_path):
    class TwoIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 2)

        def forward(self, a, b):
            return self.fc(torch.cat([a, b], 1))

    report = export_onnx(TwoIn(), (torch.randn(2, 4), torch.randn(2, 2)), tmp_path / "two.onnx")
    assert report.passed and report.input_names == ["a", "b"]  # the forward's argument names
    assert batch_dims(onnx.load(str(tmp_path / "two.onnx"))) == ["batch"] * 3


@pytest.mark.parametrize("exporter", ["auto", "torchscript"])
def test_fx_graph_module(tmp_path, exporter):
    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(ResidualNet())
    assert isinstance(gm, torch.fx.GraphModule)
    report = export_onnx(gm, torch.randn(2, 3, 8, 8), tmp_path / "gm.onnx", exporter=exporter)
    assert report.passed
    assert report.exporter == ("dynamo" if exporter == "auto" else "torchscript")
    assert "Identity" not in report.op_counts
    assert batch_dims(onnx.load(str(tmp_path / "gm.onnx"))) == ["batch", "batch"]


def test_identities_needed_for_names_are_the_only_ones_kept(tmp_path):
    path = tmp_path / "p.onnx"
    report = export_onnx(PassThrough(), torch.randn(2, 5), path)
    assert report.passed
    assert report.output_names == ["relu", "relu_again", "input_copy"]
    model = onnx.load(str(path))
    assert [o.name for o in model.graph.output] == ["relu", "relu_again", "input_copy"]
    identities = [n for n in model.graph.node if n.op_type == "Identity"]
    # relu_again duplicates relu's value, input_copy is the graph input: nothing else can name them
    assert report.kept_identity == len(identities) == 2
    assert sorted(n.output[0] for n in identities) == ["input_copy", "relu_again"]


def test_torchscript_identities_are_removed(tmp_path):
    """The TorchScript exporter leaves removable Identity nodes; the cleanup takes them out."""

    class Twice(nn.Module):
        def forward(self, x):
            y = torch.relu(x) * 2
            return y, y + 1

    report = export_onnx(Twice(), torch.randn(2, 3), tmp_path / "ts.onnx", exporter="torchscript",
                         output_names=["a", "b"])
    assert report.passed and report.exporter == "torchscript"
    assert "Identity" not in count_nodes(tmp_path / "ts.onnx")
    assert [o.name for o in onnx.load(str(tmp_path / "ts.onnx")).graph.output] == ["a", "b"]


CLEANUP_TEXT = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[N, 4] x, bool c) => (float[N, 4] out, float[N, 4] x_copy, float[N, 4] branch)
{
    a = Relu(x)
    b = Identity(a)
    t = Identity(b)
    d = Add(t, b)
    e = Sigmoid(a)
    unused = Neg(e)
    out = Identity(d)
    x_copy = Identity(x)
    branch = If(c) <
        then_branch = g1 () => (float[N, 4] z1) { z1 = Neg(t) },
        else_branch = g2 () => (float[N, 4] z2) { z2 = Abs(t) }
    >
}
"""


def test_clean_graph_rewires_identities_and_drops_dead_nodes(tmp_path):
    model = onnx.parser.parse_model(CLEANUP_TEXT)
    onnx.checker.check_model(model, full_check=True)
    original = tmp_path / "orig.onnx"
    onnx.save(model, str(original))

    stats = clean_graph(model)
    onnx.checker.check_model(model, full_check=True)
    assert (stats.removed_identity, stats.removed_dead, stats.kept_identity) == (3, 2, 1)
    assert stats.modified
    assert [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node] == [
        ("Relu", ["x"], ["a"]),
        ("Add", ["a", "a"], ["out"]),  # producer of the graph output now writes it directly
        ("Identity", ["x"], ["x_copy"]),  # input passed through: needed to name the output
        ("If", ["c"], ["branch"]),
    ]
    assert [o.name for o in model.graph.output] == ["out", "x_copy", "branch"]
    then_branch = next(a.g for a in model.graph.node[3].attribute if a.name == "then_branch")
    assert list(then_branch.node[0].input) == ["a"]  # outer-scope read rewired inside the subgraph

    cleaned = tmp_path / "clean.onnx"
    onnx.save(model, str(cleaned))
    assert clean_graph(model).modified is False  # already clean: honest "no change"
    for cond in (True, False):
        feed = {"x": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32),
                "c": np.array(cond)}
        for want, got in zip(ort_session(original).run(None, feed), ort_session(cleaned).run(None, feed)):
            np.testing.assert_array_equal(got, want)


def test_mismatch_raises_and_keeps_unverified_file(tmp_path):
    path = tmp_path / "liar.onnx"
    (tmp_path / "liar.onnx").write_bytes(b"earlier")  # an earlier export is replaced only by a verified one
    with pytest.raises(OnnxVerificationError) as info:
        export_onnx(BehavesDifferentlyInOnnx(), torch.randn(2, 3), path)
    message = str(info.value)
    assert "'output'" in message and "max abs error 0.001" in message
    assert "atol=1e-05 + rtol=0.0001*max|ref|" in message
    assert path.read_bytes() == b"earlier" and "left as it was" in message
    assert files_in(tmp_path) == ["liar.onnx", "liar.unverified.onnx"]
    report = info.value.report
    assert report.passed is False and report.path == str(tmp_path / "liar.unverified.onnx")
    onnx.checker.check_model(report.path, full_check=True)

    # tolerances are honoured: 1e-3 off passes with atol=2e-3, and the stale unverified file goes
    report = export_onnx(BehavesDifferentlyInOnnx(), torch.randn(2, 3), path, atol=2e-3, exporter="torchscript")
    assert report.passed and files_in(tmp_path) == ["liar.onnx"]


def test_tiny_tolerance_with_monkeypatched_reference(tmp_path, monkeypatch):
    """A reference off by float rounding fails rtol=0, atol=0, and the worst output is named."""
    real = onnx_export.flatten_outputs
    calls = {"n": 0}

    def off_reference(out):
        pairs = real(out)
        calls["n"] += 1
        if calls["n"] == 1:  # the first call names the outputs; later ones are the references
            return pairs
        return [(n, t if n == "output_0" else t * (1 + 1e-6)) for n, t in pairs]

    monkeypatch.setattr(onnx_export, "flatten_outputs", off_reference)
    with pytest.raises(OnnxVerificationError, match="'output_1'.*atol=0 \\+ rtol=0"):
        export_onnx(TupleNet(), torch.randn(2, 3, 8, 8), tmp_path / "tiny.onnx", rtol=0.0, atol=0.0,
                    dynamic_batch=False, exporter="torchscript")
    assert (tmp_path / "tiny.unverified.onnx").exists() and not (tmp_path / "tiny.onnx").exists()


class SumsInAnotherOrderInOnnx(nn.Module):
    """``y = (100 x) @ w``, outputs of about 1e4: exported, the same sum in another order (two
    halves added), as another kernel would. Only float32 rounding differs, of the size of the
    terms (~1e-3), and a few of the 2 x 256 x 64 outputs lie near zero."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(512, 64, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        x = 100 * x
        if torch.onnx.is_in_onnx_export():
            return x[..., :256] @ self.w[:256] + x[..., 256:] @ self.w[256:]
        return x @ self.w


def test_rounding_at_outputs_near_zero_passes(tmp_path):
    """Rounding errors are set by the scale of the computation: elementwise ``|d| <= atol + rtol |ref|``
    fails at outputs near zero, the norm-wise check (relative to ``max |ref|``) passes."""
    model, x = SumsInAnotherOrderInOnnx(), torch.randn(2, 256, 512)
    path = tmp_path / "order.onnx"
    report = export_onnx(model, x, path)
    assert report.passed and {e.batch for e in report.errors} == {2, 5}
    for e in report.errors:
        assert 0 < e.max_abs_err and e.ref_scale > 1e3
        assert e.max_rel_err == e.max_abs_err / e.ref_scale < 1e-6  # a few units of float32 rounding
        assert e.worst_excess == e.max_abs_err - (1e-5 + 1e-4 * e.ref_scale) < 0

    # the same ONNX model fails numpy.allclose's elementwise test, at elements near zero only
    with torch.no_grad():
        ref = model(x).numpy()
    (got,) = ort_run(path, x)
    bad = np.abs(got - ref) > 1e-5 + 1e-4 * np.abs(ref)
    assert bad.any() and np.abs(ref[bad]).max() < 0.01 * np.abs(ref).max()


class CancelsInFloat32(nn.Module):
    """``y = a @ w1 - a @ w2`` with ``w1 ~ 100`` and ``w2 = w1 + 1e-3 z``: terms of about 1e3
    cancel to outputs of about 1e-2, so PyTorch's float32 is off by more than ``rtol`` of its
    output. Exported, the same sum is computed in float64 (exact to float32 rounding of ``y``)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        w1 = 100 * torch.randn(64, 16, generator=g)
        self.w1 = nn.Parameter(w1)
        self.w2 = nn.Parameter(w1 + 1e-3 * torch.randn(64, 16, generator=g))

    def forward(self, a):
        if torch.onnx.is_in_onnx_export():
            a, w1, w2 = a.double(), self.w1.double(), self.w2.double()
            return (a @ w1 - a @ w2).float()
        return a @ self.w1 - a @ self.w2


def test_float32_error_of_pytorch_itself_gets_a_float64_second_opinion(tmp_path):
    """ONNX Runtime closer to the exact function than PyTorch's float32: the first check fails
    (they differ by PyTorch's own rounding), PyTorch in float64 says ONNX Runtime is right."""
    report = export_onnx(CancelsInFloat32(), torch.randn(2, 64), tmp_path / "cancel.onnx")
    assert report.passed
    for e in report.errors:
        assert e.max_rel_err > 1e-3  # far over rtol against PyTorch's float32 ...
        assert e.float64_onnx_err < 1e-3 * e.float64_torch_err  # ... which is the inexact one
        assert e.worst_excess < 0 and "within float32's own error" in e.detail
    assert any("passed against PyTorch in float64" in n for n in report.notes)


class TransposedWeightInOnnx(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        w = self.fc.weight.t() if torch.onnx.is_in_onnx_export() else self.fc.weight
        return F.linear(x, w, self.fc.bias)


class DroppedBranchInOnnx(ResidualNet):
    """The second block's shortcut is missing from the export."""

    def forward(self, x):
        if torch.onnx.is_in_onnx_export():
            block = self.blocks[1]
            x = F.relu(block.body(self.blocks[0](self.stem(x))))
            return self.head(x.mean((2, 3)))
        return super().forward(x)


def _perturb_one_weight(monkeypatch, dims, fraction):
    """Let the cleaned model's saving change one element of the initializer of shape ``dims`` by
    ``fraction`` of that initializer's largest magnitude: a model that differs from PyTorch by one
    wrong weight."""
    real = onnx_export._save_model

    def perturb_and_save(model, tmp, final_name, source_dir=None):
        if source_dir is not None:  # the weights are still in the exporter's data file
            onnx.load_external_data_for_model(model, str(source_dir))
        tensor = next(t for t in model.graph.initializer if list(t.dims) == dims)
        w = onnx.numpy_helper.to_array(tensor).copy()
        w.flat[0] += fraction * np.abs(w).max()
        tensor.CopyFrom(onnx.numpy_helper.from_array(w, tensor.name))
        real(model, tmp, final_name)

    monkeypatch.setattr(onnx_export, "_save_model", perturb_and_save)


@pytest.mark.parametrize("bug", ["first conv weight off by 10%", "last layer weight off by 1%",
                                 "transposed weight", "dropped branch"])
def test_real_bugs_still_fail_the_normwise_check(tmp_path, monkeypatch, bug):
    torch.manual_seed(0)
    model, x = SmallNet(), torch.randn(2, 3, 8, 8)
    if bug == "first conv weight off by 10%":
        _perturb_one_weight(monkeypatch, [8, 3, 3, 3], 0.1)
    elif bug == "last layer weight off by 1%":
        _perturb_one_weight(monkeypatch, [5, 16], 0.01)
    elif bug == "transposed weight":
        model, x = TransposedWeightInOnnx(), torch.randn(2, 8)
    else:
        model = DroppedBranchInOnnx()
    with pytest.raises(OnnxVerificationError, match=r"max\|ref\|") as info:
        export_onnx(model, x, tmp_path / "bug.onnx")
    worst = info.value.report.worst()
    assert worst.max_rel_err > 3e-4 and worst.worst_excess > 0  # above rtol=1e-4 by a margin
    # and PyTorch in float64 agrees: ONNX Runtime is far off where float32 itself is not
    assert worst.float64_onnx_err > 100 * worst.float64_torch_err
    assert not (tmp_path / "bug.onnx").exists()


def test_compare_needs_non_finite_values_to_agree():
    ref = np.array([1e3, 1e-3, -np.inf, np.nan], np.float32)
    ok = onnx_export._compare("y", 1, ref.copy(), ref, rtol=1e-4, atol=1e-5)
    assert ok.passed and ok.max_abs_err == 0 and ok.ref_scale == np.float32(1e3)
    near_zero = ref.copy()
    near_zero[1] += 0.05  # 50x that element, 5e-5 of the output's scale
    e = onnx_export._compare("y", 1, near_zero, ref, rtol=1e-4, atol=1e-5)
    assert e.passed and e.max_rel_err == pytest.approx(5e-5, rel=1e-3)
    for k, value in ((2, np.inf), (2, 0.0), (3, 0.0), (0, np.nan)):
        got = ref.copy()
        got[k] = value
        e = onnx_export._compare("y", 1, got, ref, rtol=1e-4, atol=1e-5)
        assert not e.passed and e.max_abs_err == np.inf, (k, value)
    e = onnx_export._compare("y", 1, ref[:2], ref, rtol=1e-4, atol=1e-5)
    assert not e.passed and "shape [2]" in e.detail


class MaskedCausalAttention(nn.Module):
    """Self-attention with a causal mask and a 0/1 integer padding mask (1 = attend), as GPT-2's,
    turned into an additive ``-inf`` mask."""

    def __init__(self, d=8):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x, mask):
        q, k, v = self.qkv(x).chunk(3, -1)
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).tril()
        allowed = causal & mask[:, None, :].bool()
        bias = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def test_masks_are_drawn_from_the_examples_rows(tmp_path):
    """A random 0/1 mask can leave a query with no key (softmax over nothing); verification cycles
    the example's rows instead, and draws the other inputs at random."""
    mask = torch.ones(2, 6, dtype=torch.int64)
    mask[0, -2:] = 0  # right padding
    generator = torch.Generator().manual_seed(0)
    drawn = onnx_export._random_like(mask, 5, generator)
    assert drawn.dtype == torch.int64 and torch.equal(drawn, mask[[0, 1, 0, 1, 0]])
    assert torch.equal(onnx_export._random_like(mask.bool(), 3, generator), mask.bool()[[0, 1, 0]])
    ids = torch.tensor([[3, 7, 5]])  # not a mask: uniform over the example's range
    drawn_ids = onnx_export._random_like(ids, 64, generator)
    assert drawn_ids.min() == 3 and drawn_ids.max() == 7

    torch.manual_seed(0)
    model = MaskedCausalAttention()
    path = tmp_path / "attn.onnx"
    report = export_onnx(model, (torch.randn(2, 6, 8), mask), path)
    assert report.passed and {e.batch for e in report.errors} == {2, 5}

    # why: where a query has no key left (query 0 sees key 0 only, here masked), the softmax is
    # 0/0 and PyTorch and ONNX Runtime disagree (torch 2.14: zeros, ONNX Runtime: NaN); the other
    # queries agree
    x, empty_row = torch.randn(1, 6, 8), torch.tensor([[0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        ref = model(x, empty_row).numpy()
    session = ort_session(path)
    (got,) = session.run(None, {"x": x.numpy(), "mask": empty_row.numpy()})
    assert not np.allclose(got[0, 0], ref[0, 0], atol=1e-3)
    np.testing.assert_allclose(got[0, 1:], ref[0, 1:], rtol=1e-4, atol=1e-5)


def test_dynamo_failure_falls_back_to_torchscript(tmp_path):
    class Branchy(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.export refuses it
                return x * 2
            return x + x

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        report = export_onnx(Branchy(), torch.randn(2, 3), tmp_path / "b.onnx")
    assert report.exporter == "torchscript" and report.passed
    assert "dynamo exporter failed" in report.notes[0]


def test_invalid_dynamo_model_falls_back_to_torchscript(tmp_path, monkeypatch):
    """The dynamo exporter's optimiser can leave a node reading a value no node produces (timm's
    Gemma ViT): ``onnx.checker`` refuses that model, and ``auto`` uses the TorchScript exporter."""
    from onnx import helper

    from archir.backends import onnx_export

    def broken(module, args, f, input_names, output_names, opset, dynamic_batch):
        node = helper.make_node("Clip", [input_names[0], "nowhere"], [output_names[0]])
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(input_names[0], 1, [2, 3])],
                                  [helper.make_tensor_value_info(output_names[0], 1, [2, 3])])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(f))

    monkeypatch.setattr(onnx_export, "_export_dynamo", broken)
    report = export_onnx(nn.ReLU(), torch.randn(2, 3), tmp_path / "r.onnx")
    assert report.exporter == "torchscript" and report.passed
    assert "dynamo exporter failed" in report.notes[0] and "topologically sorted" in report.notes[0]


def test_rms_norm_exports_through_torchscript(tmp_path):
    """The TorchScript exporter has no ``aten::rms_norm`` (timm's Gemma ViT, after the dynamo
    exporter wrote an invalid model): archir decomposes it, with and without a weight and eps."""
    class Normed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.norm, self.bare = nn.Linear(8, 8), nn.RMSNorm(8), nn.RMSNorm(8, eps=1e-3,
                                                                                      elementwise_affine=False)

        def forward(self, x):
            return self.bare(self.norm(self.lin(x)) * 3)

    model = Normed()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    for opset in (17, 20):  # ReduceMean's axes: an attribute, then an input
        report = export_onnx(model, torch.randn(2, 4, 8), tmp_path / f"n{opset}.onnx", exporter="torchscript",
                             opset=opset)
        assert report.passed and report.exporter == "torchscript" and report.opset == opset
        assert {"ReduceMean", "Sqrt"} <= set(count_nodes(tmp_path / f"n{opset}.onnx"))


def test_a_small_model_is_one_file_and_replaces_an_external_data_one(tmp_path):
    """The exporter's own external-data file stays in the work folder: a small model is one
    ``.onnx`` file, and one that replaces a model with external data takes its ``.data`` along."""
    path = tmp_path / "m.onnx"
    (tmp_path / "m.onnx.data").write_bytes(b"weights of an earlier, bigger model")
    report = export_onnx(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), torch.randn(2, 3), path)
    assert report.passed and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


class BigLiar(nn.Module):
    """Weights worth an external data file (with the threshold lowered) and an ONNX graph that
    differs from the module."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(32, 32)

    def forward(self, x):
        return self.lin(x) + (1e-2 if torch.onnx.is_in_onnx_export() else 0.0)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_large_model_streams_its_weights_into_an_external_data_file(tmp_path, monkeypatch, exporter):
    """Above the threshold the weights go to ``m.onnx.data`` one tensor at a time (the exporter's
    own data file is read, never loaded whole): same values, small tensors kept inline; a model
    that fails verification is kept with its own data file."""
    monkeypatch.setattr(onnx_export, "_EXTERNAL_DATA_THRESHOLD", 1000)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8))
    path = tmp_path / "m.onnx"

    def whole_load(*args, **kwargs):
        raise AssertionError("a large model's weights were loaded into the proto")

    with monkeypatch.context() as m:  # streamed: never loaded into the proto, whole or tensor by tensor
        m.setattr(onnx.external_data_helper, "load_external_data_for_model", whole_load)
        m.setattr(onnx.external_data_helper, "load_external_data_for_tensor", whole_load)
        report = export_onnx(model, torch.randn(2, 16), path, exporter=exporter)
    assert report.passed and files_in(tmp_path) == ["m.onnx", "m.onnx.data"]
    proto = onnx.load(str(path), load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert {(64, 16), (8, 64)} <= {tuple(t.dims) for t in external}
    assert (tmp_path / "m.onnx.data").stat().st_size == sum(4 * int(np.prod(t.dims)) for t in external)
    onnx.load_external_data_for_model(proto, str(tmp_path))
    weights = sorted((onnx.numpy_helper.to_array(t) for t in proto.graph.initializer), key=lambda a: a.size)
    assert any(np.array_equal(w, model[0].weight.detach().numpy()) or np.array_equal(w.T, model[0].weight.detach()
                                                                                      .numpy()) for w in weights)
    x = torch.randn(3, 16)
    np.testing.assert_allclose(ort_run(path, x)[0], model(x).detach().numpy(), rtol=1e-5, atol=1e-5)

    with pytest.raises(OnnxVerificationError):
        export_onnx(BigLiar(), torch.randn(2, 32), tmp_path / "liar.onnx", exporter=exporter)
    assert files_in(tmp_path) == ["liar.unverified.onnx", "liar.unverified.onnx.data", "m.onnx", "m.onnx.data"]
    assert ort_run(tmp_path / "liar.unverified.onnx", torch.randn(1, 32))[0].shape == (1, 32)


def test_cuda_provider_only_when_torch_sees_a_gpu(monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert onnx_export.ort_providers() == ["CPUExecutionProvider"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert onnx_export.ort_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert onnx_export.ort_providers() == ["CPUExecutionProvider"]


def test_verify_false_skips_onnxruntime(tmp_path):
    report = export_onnx(BehavesDifferentlyInOnnx(), torch.randn(2, 3), tmp_path / "nv.onnx", verify=False,
                         exporter="torchscript")
    assert not report.verified and report.errors == [] and (tmp_path / "nv.onnx").exists()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="output names"):
        export_onnx(TupleNet(), torch.randn(2, 3, 8, 8), tmp_path / "x.onnx", output_names=["only_one"])
    with pytest.raises(ValueError, match="exporter"):
        export_onnx(TupleNet(), torch.randn(2, 3, 8, 8), tmp_path / "x.onnx", exporter="tvm")
    assert files_in(tmp_path) == []


def _detections(scores):
    """One image's detections as a detector returns them: rows ranked by score."""
    n = len(scores)
    rng = np.random.default_rng(0)
    return {"boxes": rng.uniform(0, 200, (n, 4)).astype(np.float32), "labels": np.arange(n, dtype=np.int64),
            "scores": np.asarray(scores, dtype=np.float32), "masks": rng.uniform(0, 1, (n, 1, 6, 6)).astype(np.float32)}


def _as_outputs(dets):
    names = [f"output_0.{k}" for k in dets]
    return names, list(dets.values())


@pytest.mark.parametrize("gap, passes", [(1e-6, True), (0.05, False)])
def test_rows_in_another_order_pass_only_among_near_tied_scores(gap, passes):
    """Rows 1 and 2 swapped: the same detections, ranked the other way. That is rounding where
    PyTorch's own scores are within tolerance of each other, and a real difference where not."""
    from archir.backends.onnx_rows import reordered_rows

    ref = _detections([0.9, 0.5 + gap, 0.5, 0.1])
    names, want = _as_outputs(ref)
    got = [a[[0, 2, 1, 3]] for a in want]
    failed = {"output_0.boxes", "output_0.labels", "output_0.masks"}
    found = reordered_rows(names, got, want, failed, rtol=1e-4, atol=1e-5)
    assert bool(found) == passes
    if passes:
        assert found[0].moved == 2 and found[0].rows == 4 and found[0].key == "scores"
        assert max(found[0].max_abs_err.values()) <= 1e-5 + 1e-4 * 200


def test_a_row_that_is_not_pytorchs_fails_even_among_ties():
    from archir.backends.onnx_rows import reordered_rows

    ref = _detections([0.5, 0.5, 0.5])
    names, want = _as_outputs(ref)
    got = [a[[1, 0, 2]].copy() for a in want]
    got[0][2] += 1.0  # one box moved by a pixel: no reordering explains it
    assert reordered_rows(names, got, want, {"output_0.boxes"}, rtol=1e-4, atol=1e-5) == []
    got = [a[[1, 0, 2]].copy() for a in want]
    got[3][0, 0, 0, 0] += 0.5  # a mask pixel
    assert reordered_rows(names, got, want, {"output_0.masks"}, rtol=1e-4, atol=1e-5) == []


def test_the_verification_passes_detections_ranked_the_other_way_and_says_so():
    from types import SimpleNamespace

    from archir.backends.onnx_export import _compare, _rows_verdict

    names, want = _as_outputs(_detections([0.9, 0.5 + 1e-6, 0.5, 0.1]))
    got = [a[[0, 2, 1, 3]] for a in want]
    errors = [_compare(n, None, g, r, 1e-4, 1e-5) for n, g, r in zip(names, got, want)]
    assert not all(e.passed for e in errors)
    report = SimpleNamespace(output_names=names, rtol=1e-4, atol=1e-5)
    judged = _rows_verdict(errors, report, got, want)
    assert all(e.passed for e in judged)
    assert all("2 of them in another order (near-tied scores" in e.detail for e in judged if e.detail)
    assert [e.max_abs_err for e in judged] == [e.max_abs_err for e in errors]  # as measured row for row
