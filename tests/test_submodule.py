"""``archir.search(..., submodule=...)``: a search inside one part of a model whose own ``forward``
cannot be traced (a detector-like model: a list of images, value-dependent selection), trained
through the whole model with its own loss, derived and put back."""
from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import archir
from archir.errors import TraceError, UserInputError

pytestmark = pytest.mark.usefixtures("one_thread")


#: A detector-like MODEL.py: the tests below use its classes, and the CLI tests the file itself.
DETECTOR_FILE = '''
import torch
import torch.nn.functional as F
from torch import nn


class Backbone(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.block1 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))
        self.block2 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(x + self.block1(x))
        return {"0": x, "1": F.relu(x + self.block2(x))}  # FPN-like: a dict of feature maps


class Detector(nn.Module):
    """Iterates over its images and keeps the boxes whose score passes a threshold: neither
    torch.fx nor torch.export follows this forward, its backbone they do."""

    def __init__(self):
        super().__init__()
        self.backbone = Backbone()
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, images):  # a list of (3, H, W) images, or a batch tensor
        batch = torch.stack([F.interpolate(img[None], size=(16, 16))[0] for img in images])
        features = self.backbone(batch)
        out = self.head(features["0"] + features["1"])  # (N, 5, H, W): a score and a box per place
        scores = out[:, 0].flatten(1)
        # selected by value, and a branch on a value: no tracer follows this
        keep = [s > s.median() if s.std() > 0 else torch.ones_like(s, dtype=torch.bool) for s in scores]
        return [{"boxes": o[1:].flatten(1).T[k], "scores": s[k]} for o, s, k in zip(out, scores, keep)]


def build_model():
    return Detector()


def example_input():
    return torch.randn(2, 3, 20, 24)


def data():
    g = torch.Generator().manual_seed(0)
    images, quality = torch.randn(24, 3, 20, 24, generator=g), torch.rand(24, generator=g)
    return (torch.utils.data.TensorDataset(images[:16], quality[:16]),
            torch.utils.data.TensorDataset(images[16:], quality[16:]))


def loss(output, target):  # the detector's own loss: a list of dicts, one per image
    return torch.stack([(o["scores"].mean() - t) ** 2 + o["boxes"].abs().mean()
                        for o, t in zip(output, target)]).mean()
'''
_detector = {}
exec(compile(DETECTOR_FILE, "detector.py", "exec"), _detector)
Backbone, Detector = _detector["Backbone"], _detector["Detector"]


def _images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 20, 24, generator=g), torch.randn(3, 16, 16, generator=g)]


def _same(a, b):
    return all(torch.equal(x["boxes"], y["boxes"]) and torch.equal(x["scores"], y["scores"]) for x, y in zip(a, b))


def test_the_whole_model_does_not_trace_and_the_error_points_to_submodule():
    # a list of images is an input like any other; the detector's own forward then fails
    with pytest.raises(TraceError, match=r"cannot trace Detector at .*detector\.py:\d+.*--submodule PATH.*"
                                         r"largest parts: backbone"):
        archir.trace(Detector(), (_images(),))


@pytest.mark.parametrize("method", ["dnat", "dso"])
def test_search_inside_a_submodule_starts_exact_trains_and_goes_back(method):
    torch.manual_seed(0)
    model = Detector().eval()
    images = _images()
    s = archir.search(model, (images,), method, submodule="backbone")
    assert s.example_inputs[0].shape == (2, 3, 16, 16)  # what the backbone receives, found by running
    assert s.model.backbone is s.supernet and model.backbone is not s.supernet  # the user's model untouched
    s.model.eval()
    with torch.no_grad():
        assert _same(s.model(images), model(images))  # exact at initialisation
        assert _same(s.whole_model(s.derive()).eval()(images), model(images))  # and so is its derive
        # and in training mode, where the backbone's BatchNorm uses the batch's statistics
        assert not _same(copy.deepcopy(model).train()(images), model(images))
        s.model.train()
        assert _same(s.model(images), copy.deepcopy(model).train()(images))
        assert _same(s.whole_model(s.derive()).train()(images), copy.deepcopy(model).train()(images))
    arch = set(map(id, s.arch_parameters()))
    weights = s.weight_parameters()
    assert any(p is s.model.head.weight for p in weights) and not arch & set(map(id, weights))
    opt_w, opt_a = torch.optim.SGD(weights, lr=0.01), s.arch_optimizer(lr=0.05)
    s.model.train()
    for seed in range(2):  # the model's own loss: no (x, y) cross-entropy
        out = s.model(_images(seed))
        loss = sum((o["scores"] - 1).pow(2).mean() + o["boxes"].abs().mean() for o in out)
        opt_w.zero_grad()
        opt_a.zero_grad()
        loss.backward()
        opt_w.step()
        opt_a.step()
    s.model.eval()
    slim = s.derive()
    whole = s.whole_model(slim).eval()
    assert whole.backbone is slim and s.model.backbone is s.supernet
    with torch.no_grad():
        ref = s.model.backbone(s.example_inputs[0])
        got = slim(s.example_inputs[0])
    assert set(got) == set(ref)
    if method == "dso":  # pruning λ = 0 and folding the others keep the function (DNAT's argmax does not)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert isinstance(whole(images), list)


def test_submodule_mistakes_are_one_clear_error():
    model, images = Detector(), (_images(),)
    with pytest.raises(UserInputError, match=r"'neck' is not in Detector \(its children: backbone, head\)"):
        archir.search(model, images, submodule="neck")
    with pytest.raises(UserInputError, match="running Detector on the example inputs"):
        archir.search(model, (torch.randn(3, 8, 8, 1),), submodule="backbone")

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.block(self.block(x))

    with pytest.raises(UserInputError, match="ran 2 times"):
        archir.search(Twice(), torch.randn(1, 3, 4, 4), submodule="block")


def test_arch_optimizer_without_anything_to_search_is_one_clear_error():
    """A part without sums (a VGG backbone) gives DSO-NAS no λ: say so instead of torch's
    'optimizer got an empty parameter list'."""
    s = archir.search(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()), torch.randn(1, 3, 4, 4), method="dso")
    assert s.arch_parameters() == []
    with pytest.raises(UserInputError, match="dso found nothing to search in Sequential"):
        s.arch_optimizer()


def _write_detector(tmp_path):
    path = tmp_path / "detector.py"
    path.write_text(DETECTOR_FILE)
    return path


def test_transform_inside_a_submodule_trains_the_whole_model_and_writes_both_weights(tmp_path):
    """``archir.transform(..., submodule=...)``: the detector trains with its own loss, model.py holds
    the slim backbone, whole_weights.pt rebuilds the trained detector exactly as report.md says."""
    from archir.model_file import import_file, load_model_file

    spec = load_model_file(_write_detector(tmp_path))
    train, val = spec.data()
    res = archir.transform(spec.model, spec.example_inputs, "dso", train, val, tmp_path / "out", task=spec.task,
                           submodule="backbone", epochs=2, arch_epochs=1, warmup_epochs=0, batch_size=8,
                           progress=False)
    out = res.out
    assert {"model.py", "weights.pt", "whole_weights.pt", "model.onnx"} <= {p.name for p in out.iterdir()}
    assert type(res.whole).__name__ == "Detector" and res.whole.backbone is res.module
    assert res.report["submodule"]["path"] == "backbone"
    assert res.report["example_inputs"][0]["shape"] == [2, 3, 16, 16]  # the backbone's, for model.py
    assert res.report["onnx"]["passed"]
    assert [h["stage"] for h in res.report["history"]] == ["arch", "net"]
    assert not torch.equal(res.whole.head.weight, spec.model.head.weight)  # the whole model trained
    # rebuilt as report.md shows: the user's model, the emitted backbone, the whole weights
    emitted = import_file(out / "model.py", "archir_emitted")
    rebuilt = spec.model
    rebuilt.set_submodule("backbone", emitted.load_model())
    rebuilt.load_state_dict(torch.load(out / "whole_weights.pt", weights_only=True))
    images = _images()
    with torch.no_grad():
        assert _same(rebuilt.eval()(images), res.whole.eval()(images))
    assert "whole_weights.pt" in (out / "report.md").read_text()


def test_cli_transform_and_inspect_with_submodule(tmp_path):
    from click.testing import CliRunner

    from archir.cli import main

    path = _write_detector(tmp_path)
    res = CliRunner().invoke(main, ["inspect", str(path), "--no-auto-submodule"])
    assert res.exit_code == 2 and "--submodule PATH" in res.output  # the whole model does not trace
    assert "its largest parts: backbone (1.42K parameters), head (45)." in res.output
    res = CliRunner().invoke(main, ["inspect", str(path)])  # as transform does: the largest part that traces
    assert res.exit_code == 0, res.output
    assert "Detector's own forward does not trace" in res.output and "'backbone' (1.42K of 1.47K" in res.output
    assert "Backbone" in res.output
    res = CliRunner().invoke(main, ["inspect", str(path), "--submodule", "backbone"])
    assert res.exit_code == 0, res.output
    assert "Backbone" in res.output
    res = CliRunner().invoke(main, ["transform", str(path), "--submodule", "backbone", "--method", "dnat",
                                    "--epochs", "1", "--arch-epochs", "1", "--batch-size", "8", "--no-onnx",
                                    "--out", str(tmp_path / "out"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "Backbone (inside backbone of Detector)" in res.output
    assert "whole_weights.pt" in res.output
    res = CliRunner().invoke(main, ["transform", str(path), "--submodule", "neck", "--epochs", "0",
                                    "--out", str(tmp_path / "out2"), "--quiet"])
    assert res.exit_code == 2 and "'neck' is not in Detector" in res.output


def test_transform_inside_a_submodule_resumes_bit_identically(tmp_path):
    """Stopped in the network stage (the whole model, the derived part inside) and resumed: the
    same whole model as a run that was never stopped."""
    import os
    import signal

    from archir.errors import RunInterrupted
    from archir.model_file import load_model_file

    spec = load_model_file(_write_detector(tmp_path))
    train, val = spec.data()
    opts = dict(task=spec.task, submodule="backbone", epochs=3, arch_epochs=1, warmup_epochs=0, batch_size=8,
                onnx=False, progress=False)

    def run(out, **kw):
        torch.manual_seed(0)
        return archir.transform(Detector(), spec.example_inputs, "dnat", train, val, tmp_path / out, **opts, **kw)

    reference = run("ref")

    def stop(record):
        if record.epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(RunInterrupted):
        run("run", on_epoch=stop)
    resumed = run("run", resume=True)
    a, b = reference.whole.state_dict(), resumed.whole.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    wa, wb = (torch.load(r.out / "whole_weights.pt", weights_only=True) for r in (reference, resumed))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_transform_searches_inside_the_largest_part_that_traces_by_itself(tmp_path):
    """Without --submodule, a model whose own forward does not trace is searched inside its
    largest child that does (here the backbone; the head is smaller), said on the terminal and
    recorded in the report; --no-auto-submodule keeps the error."""
    from click.testing import CliRunner

    from archir.cli import main
    from archir.errors import TraceError
    from archir.model_file import load_model_file

    path = _write_detector(tmp_path)
    spec = load_model_file(path)
    res = archir.transform(spec.model, spec.example_inputs, "dnat", epochs=0, onnx=False, progress=False)
    sub = res.report["submodule"]
    assert sub["path"] == "backbone" and res.whole.backbone is res.module
    assert "Detector's own forward does not trace" in sub["automatic"] and "'backbone'" in sub["automatic"]
    assert res.report["options"]["submodule"] == "backbone"
    with torch.no_grad():  # untrained: the whole model with the derived backbone inside is the original
        assert _same(res.whole.eval()(_images()), spec.model.eval()(_images()))
    with pytest.raises(TraceError, match="cannot trace"):
        archir.transform(spec.model, spec.example_inputs, epochs=0, onnx=False, progress=False, auto_submodule=False)
    # a list of images as the example: the tracers fail on the detector's own code
    res = archir.transform(spec.model, (_images(),), "dso", epochs=0, onnx=False, progress=False)
    assert res.report["submodule"]["path"] == "backbone"
    assert re.search(r"does not trace \(at .*detector\.py:\d+\)", res.report["submodule"]["automatic"])
    with torch.no_grad():
        assert _same(res.whole.eval()(_images(1)), spec.model.eval()(_images(1)))

    out = CliRunner().invoke(main, ["transform", str(path), "--epochs", "1", "--arch-epochs", "1", "--batch-size", "8",
                                    "--no-onnx", "--out", str(tmp_path / "out"), "--quiet"])
    assert out.exit_code == 0, out.output
    assert "warning: Detector's own forward does not trace" in out.output and "'backbone'" in out.output
    assert "Backbone (inside backbone of Detector)" in out.output
    assert "chosen automatically" in (tmp_path / "out" / "report.md").read_text()
    out = CliRunner().invoke(main, ["transform", str(path), "--epochs", "0", "--no-auto-submodule",
                                    "--out", str(tmp_path / "out2"), "--quiet"])
    assert out.exit_code == 2 and "--submodule" in out.output and "Traceback" not in out.output
