"""Models whose arguments are lists, tuples and dicts of tensors (a list of views, a batch dict):
one graph input per tensor, and every product of archir (the lowered module, a supernet, the
derived network, model.py, ONNX, the CLI's output directory) takes the same arguments."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import archir
from archir.cli import main
from archir.data import DataError
from archir.errors import UntraceableInputs, UserInputError
from archir.pipeline import TransformOptions, _loaders, _skipped_last_batch, lists_sized_by_batch
from model_patterns import ContainerInputs, assert_same, random_like


def _inputs():
    return ([torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)],
            {"mask": torch.randn(2, 1, 8, 8), "bias": [torch.randn(2, 2, 1, 1), torch.randn(2, 2, 1, 1)]})


def test_each_tensor_is_an_input_reached_from_its_argument():
    torch.manual_seed(0)
    g = archir.trace(ContainerInputs().eval(), _inputs())
    g.verify()
    assert g.arguments == ["views", "extras"]
    # extras["bias"][0] is not read: no input for it, but the argument keeps its structure
    assert [g.junctions[j].input_label for j in g.inputs] == [
        "views[0]", "views[1]", "extras['mask']", "extras['bias'][1]"]
    assert "input views[0]" in str(g)
    lowered = g.to_module()
    assert "def forward(self, views, extras)" in lowered.code


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_round_trip_with_either_frontend(frontend):
    torch.manual_seed(0)
    model = ContainerInputs().eval()
    g = archir.trace(model, _inputs(), frontend=frontend)
    g.verify()
    x = random_like(_inputs(), 1)
    with torch.no_grad():
        assert_same(model(*x), g.to_module().eval()(*x))


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, a, unused, b):
        return self.fc(a) + b[0]


def test_an_argument_the_model_does_not_read_keeps_its_position():
    torch.manual_seed(0)
    model = Unused()
    x = (torch.randn(2, 4), torch.randn(2, 4), [torch.randn(2, 4)])
    lowered = archir.trace(model, x).to_module()
    assert "def forward(self, a, unused, b)" in lowered.code
    assert_same(model(*x), lowered(*x))


@pytest.mark.parametrize("method", ["dnat", "dso"])
def test_search_is_exact_at_initialisation_and_emits_model_py_and_onnx(method, tmp_path):
    torch.manual_seed(0)
    model = ContainerInputs().eval()
    x = _inputs()
    s = archir.search(model, x, method=method)
    with torch.no_grad():
        assert_same(model(*x), s.supernet.eval()(*x))
        assert_same(model(*x), s.derive().eval()(*x))
        # training mode (BatchNorm on the batch's statistics, updating its running ones): on copies
        trained = copy.deepcopy(model).train()(*x)
        assert not torch.equal(trained, model(*x))
        assert_same(trained, copy.deepcopy(s.supernet).train()(*x))
        assert_same(trained, s.derive().train()(*x))
    files = s.emit(tmp_path / "out")
    assert {"model.py", "weights.pt", "model.onnx"} <= set(files)
    source = (tmp_path / "out" / "model.py").read_text()
    assert "def forward(self, views, extras)" in source and "views_checked[0]" in source
    # model.py alone, in a fresh interpreter, on new inputs
    y = random_like(x, 2)
    torch.save({"x": y, "ref": model(*y)}, tmp_path / "io.pt")
    check = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(tmp_path / 'out')!r})
        import model
        io = torch.load({str(tmp_path / 'io.pt')!r})
        got = model.load_model().eval()(*io["x"])
        torch.testing.assert_close(got, io["ref"], rtol=1e-5, atol=1e-6)
    """)
    subprocess.run([sys.executable, "-c", check], check=True)


def test_onnx_takes_one_input_per_tensor_named_after_its_place():
    torch.manual_seed(0)
    model = ContainerInputs().eval()
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        report = archir.export_onnx(model, _inputs(), f"{d}/m.onnx")
    assert report.passed and report.exporter == "dynamo" and report.dynamic_batch, report.notes
    assert report.input_names == ["views_0", "views_1", "extras_mask", "extras_bias_0", "extras_bias_1"]


@pytest.mark.parametrize("inputs, message", [
    (([torch.randn(2, 4), 3],), r"input 0\[1\] is a int"),
    (({"x": torch.randn(2, 4), "n": None},), r"input 0\['n'\] is a NoneType"),
])
def test_an_input_that_holds_something_else_than_tensors_is_one_clear_error(inputs, message):
    with pytest.raises(UntraceableInputs, match=message + r".*submodule="):
        archir.trace(Unused(), inputs)


def test_inputs_without_a_tensor_are_refused():
    with pytest.raises(UserInputError, match="hold no tensor"):
        archir.trace(Unused(), ([], {}))


MODEL_PY = '''
import torch
from torch import nn


class Fusion(nn.Module):
    def __init__(self):
        super().__init__()
        self.rgb = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.depth = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.fuse = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 1, 1)

    def forward(self, views):
        x = self.rgb(views["rgb"]) + self.depth(views["depth"])
        x = x + torch.relu(self.fuse(x))
        return {"depth": self.head(x)}


class Pairs(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.rgb, self.depth = torch.randn(n, 3, 8, 8, generator=g), torch.randn(n, 1, 8, 8, generator=g)

    def __len__(self):
        return len(self.rgb)

    def __getitem__(self, i):
        target = self.rgb[i].mean(0, keepdim=True) + 0.5 * self.depth[i]
        return {"rgb": self.rgb[i], "depth": self.depth[i]}, target


def build_model():
    return Fusion()


def example_input():
    return ({"rgb": torch.randn(2, 3, 8, 8), "depth": torch.randn(2, 1, 8, 8)},)


def data():
    return Pairs(32, 0), Pairs(16, 1)


def loss(output, target):
    return nn.functional.smooth_l1_loss(output["depth"], target)
'''


def test_cli_transforms_a_model_that_takes_a_dict_and_export_rebuilds_its_inputs(tmp_path):
    (tmp_path / "fusion.py").write_text(MODEL_PY)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["transform", str(tmp_path / "fusion.py"), "--out", str(out), "--epochs", "1",
                                  "--batch-size", "8"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["example_inputs"] == [{"dict": {"rgb": {"shape": [2, 3, 8, 8], "dtype": "float32"},
                                                  "depth": {"shape": [2, 1, 8, 8], "dtype": "float32"}}}]
    assert "def forward(self, views)" in (out / "model.py").read_text()
    r = CliRunner().invoke(main, ["export", str(out), "--onnx", str(tmp_path / "again.onnx")])
    assert r.exit_code == 0, r.output
    assert "matches PyTorch" in r.output


def test_example_input_returning_a_bare_dict_says_how_to_pass_it(tmp_path):
    (tmp_path / "fusion.py").write_text(MODEL_PY.replace(
        'return ({"rgb": torch.randn(2, 3, 8, 8), "depth": torch.randn(2, 1, 8, 8)},)',
        'return {"rgb": torch.randn(2, 3, 8, 8), "depth": torch.randn(2, 1, 8, 8)}'))
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "fusion.py")])
    assert r.exit_code == 2
    assert "return (the_dict,)" in r.output and "Traceback" not in r.output


def test_a_list_of_another_length_is_refused_by_the_lowered_module_and_model_py(tmp_path):
    """The graph reads a list argument's items by position: a longer list would lose its extra
    items without a word, a shorter one fail deep inside; both are refused up front."""
    torch.manual_seed(0)
    model = ContainerInputs().eval()
    x = _inputs()
    longer = ([*x[0], torch.randn(2, 3, 8, 8)], x[1])
    shorter = ([x[0][0]], x[1])
    lowered = archir.trace(model, x).to_module()
    for bad, n in ((longer, 3), (shorter, 1)):
        with pytest.raises(ValueError, match=rf"views has {n} items; the model was traced on an example where it "
                                             r"has 2, and the traced graph reads them by position"):
            lowered(*bad)
    with pytest.raises(ValueError, match=r"extras\['bias'\] has 1 items"):
        lowered(x[0], {**x[1], "bias": x[1]["bias"][:1]})
    archir.transform(model, x, epochs=0, onnx=False, progress=False, out=tmp_path / "out")
    torch.save({"x": x, "longer": longer, "ref": model(*x)}, tmp_path / "io.pt")
    check = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(tmp_path / 'out')!r})
        import model
        io = torch.load({str(tmp_path / 'io.pt')!r})
        m = model.load_model().eval()
        torch.testing.assert_close(m(*io["x"]), io["ref"], rtol=1e-5, atol=1e-6)
        try:
            m(*io["longer"])
        except ValueError as exc:
            assert "views has 3 items" in str(exc), exc
        else:
            raise AssertionError("model.py took a longer list")
    """)
    subprocess.run([sys.executable, "-c", check], check=True)


DETECTOR_PY = '''
"""A detector in miniature: a list of images of any size, and in training mode the targets too
(it returns its losses then); in eval mode one box per image."""
import torch
from torch import nn


class TinyDetector(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, images, targets):
        boxes = []
        for img in images:
            x = torch.relu(self.stem(img.unsqueeze(0)))
            x = x + self.block(x)
            boxes.append(self.head(x.mean((2, 3)))[0])
        boxes = torch.stack(boxes)
        if self.training:
            want = torch.stack([t["boxes"][0] for t in targets])
            return {"loss_box": (boxes - want).abs().mean()}
        return [{"boxes": boxes[i:i + 1]} for i in range(len(images))]


class Boxes(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            h, w = 12 + i % 3 * 4, 16 - i % 2 * 4
            box = torch.tensor([[1.0, 2.0, w - 1.0, h - 2.0]])
            self.items.append((torch.rand(3, h, w, generator=g), {"boxes": box}))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def build_model():
    return TinyDetector()


def example_input():
    (a, ta), (b, tb) = Boxes(2, 0)
    return [a, b], [ta, tb]


def data():
    return Boxes(9, 1), Boxes(5, 2)  # neither divides into batches of 2


def collate(samples):
    images, targets = [list(s) for s in zip(*samples)]
    return images, targets, targets  # model(images, targets); loss(output, targets)


def loss(output, targets):
    if isinstance(output, dict):  # training mode: the model's own losses
        return sum(output.values())
    want = torch.stack([t["boxes"][0] for t in targets])
    return torch.stack([o["boxes"][0] for o in output]).sub(want).abs().mean()
'''


def test_a_detector_trains_on_the_batches_its_collate_makes_and_exports(tmp_path):
    """MODEL.py's ``collate`` batches images of different sizes and target dicts as lists; the
    model's two modes (losses, detections) are one graph; the run trains, and model.onnx (whose
    inputs, images and boxes, share no batch axis) is checked at the example's shapes."""
    (tmp_path / "det.py").write_text(DETECTOR_PY)
    out = tmp_path / "out"
    args = ["transform", str(tmp_path / "det.py"), "--method", "dso", "--epochs", "2", "--batch-size", "2",
            "--out", str(out)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["onnx"]["passed"] is True, report["onnx"]
    assert any("share no batch axis" in n for n in report["onnx"]["notes"]), report["onnx"]["notes"]
    # model.onnx is the eval-mode detector: its detections, from the images alone
    assert report["onnx"]["output_names"] == ["output_0.boxes", "output_1.boxes"], report["onnx"]
    assert report["onnx"]["unread_inputs"] == ["targets_0_boxes", "targets_1_boxes"], report["onnx"]
    # model.py gives the detections in eval mode and the losses in training mode, as the model does
    check = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(out)!r})
        from model import load_model
        ns = {{}}
        exec(open({str(tmp_path / "det.py")!r}).read(), ns)
        images, targets = ns["example_input"]()
        net = load_model().eval()
        detections = net(images, targets)
        assert [list(d) for d in detections] == [["boxes"], ["boxes"]], detections
        assert list(net.train()(images, targets)) == ["loss_box"]
    """)
    subprocess.run([sys.executable, "-c", check], check=True)
    losses = [e["train_loss"] for e in report["history"]]
    assert len(losses) == 2 and all(v == v for v in losses), report["history"]  # trained, finite
    # the graph takes lists of exactly 2: each epoch leaves its last sample out, said in the report
    assert report["last_batch_left_out"] == {"inputs": ["images", "targets"],
                                             "samples_left_out": {"training": 1, "validation": 1}}
    md = (out / "report.md").read_text()
    assert "Data: `own: Boxes (9 samples) / Boxes (5 samples)`" in md, md
    assert "each epoch left out its last, smaller batch (1 training, 1 validation samples)" in md, md
    # a batch size the graph cannot take is one clear error before any training step
    r = CliRunner().invoke(main, [*args[:-4], "--batch-size", "3", "--out", str(tmp_path / "out3")])
    assert r.exit_code == 2 and "images has 3 items" in r.output and "Traceback" not in r.output, r.output


def test_lists_as_long_as_a_batch_leave_out_the_last_smaller_batch_or_refuse_too_little_data():
    g = archir.trace(ContainerInputs().eval(), _inputs())
    assert lists_sized_by_batch(g, 2) == ["views", "extras['bias']"] and lists_sized_by_batch(g, 3) == []
    opts = TransformOptions(batch_size=4)
    assert _skipped_last_batch(opts, ["images"], {"training": range(8), "validation": range(4)}) is None
    assert _skipped_last_batch(opts, [], {"training": range(9)}) is None  # no list sized by the batch
    assert _skipped_last_batch(opts, ["images"], {"training": range(9), "validation": range(6)}) == {
        "inputs": ["images"], "samples_left_out": {"training": 1, "validation": 2}}
    with pytest.raises(DataError, match="the validation data has 3 samples, fewer than one batch of 4"):
        _skipped_last_batch(opts, ["images"], {"training": range(9), "validation": range(3)})
    # a part of the split training set smaller than a batch would leave the search without a step
    split = TransformOptions(batch_size=4, arch_update="split", split_fraction=0.5)
    assert [len(x) for x in _loaders(split, range(8), range(4), "cpu", drop_last=True)] == [1, 1, 1, 2]
    with pytest.raises(DataError, match="the weight part of the training data .* has 3 samples, fewer than one"):
        _loaders(split, range(6), range(4), "cpu", drop_last=True)


def test_a_collate_that_fails_names_its_file_and_line(tmp_path):
    (tmp_path / "det.py").write_text(DETECTOR_PY.replace(
        "    images, targets = [list(s) for s in zip(*samples)]\n",
        "    images, targets = [list(s) for s in zip(*samples)]\n    raise KeyError('boxes')\n"))
    r = CliRunner().invoke(main, ["transform", str(tmp_path / "det.py"), "--epochs", "1", "--batch-size", "2",
                                  "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "collate() failed on a batch of 2 samples" in r.output and "det.py:" in r.output, r.output
    (tmp_path / "det.py").write_text(DETECTOR_PY.replace("def collate(samples):", "collate = 3\n\n\ndef _c(samples):"))
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "det.py")])
    assert r.exit_code == 2 and "collate must be a function collate(samples)" in r.output, r.output


def test_onnx_of_inputs_that_share_no_batch_axis_is_checked_at_their_own_shapes(tmp_path):
    torch.manual_seed(0)
    ns: dict = {}
    exec(DETECTOR_PY, ns)  # noqa: S102 - the test's own model source
    model, x = ns["TinyDetector"]().eval(), ns["example_input"]()
    report = archir.export_onnx(archir.trace(model, x).to_module(), x, tmp_path / "det.onnx")
    assert report.passed and not report.dynamic_batch
    assert {e.batch for e in report.errors} == {None}
    assert any("share no batch axis (axis 0: images_0 3, images_1 3, targets_0_boxes 1" in n
               for n in report.notes), report.notes


def test_an_onnx_model_that_does_not_verify_leaves_the_rest_of_the_run(tmp_path, monkeypatch):
    """A trained run whose model.onnx fails verification still delivers model.py, the weights
    and the report, with the unverified model under its own name, and says so."""
    from archir.backends import onnx_export

    real = onnx_export.export_onnx

    class Liar(nn.Module):
        def forward(self, x):
            return x + 1e-3 if torch.onnx.is_in_onnx_export() else x * 1.0

    monkeypatch.setattr(onnx_export, "export_onnx", lambda module, inputs, path, **kw: real(
        Liar(), torch.randn(2, 3), path, **kw))
    (tmp_path / "det.py").write_text(DETECTOR_PY)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["transform", str(tmp_path / "det.py"), "--epochs", "1", "--batch-size", "2",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "warning: the ONNX model did not verify against ONNX Runtime, kept as model.unverified.onnx" in r.output
    assert {"model.py", "weights.pt", "model.unverified.onnx", "report.md"} <= {p.name for p in out.iterdir()}
    assert not (out / "model.onnx").exists()
    assert json.loads((out / "report.json").read_text())["onnx"]["passed"] is False
    assert "did not verify against ONNX Runtime and is kept as `model.unverified.onnx`: ONNX Runtime output" \
        in (out / "report.md").read_text()
