"""Models other than image classifiers, end to end: several inputs with a dict output and a user
loss, and a regression with mean-squared error, through the CLI and through archir.search."""
from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import archir
from archir.cli import main

TWO_INPUT_MODEL = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from torch import nn

    class TwoInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 16), nn.Linear(4, 16)
            self.mid = nn.Linear(16, 16)
            self.head, self.aux = nn.Linear(16, 3), nn.Linear(16, 1)

        def forward(self, image, meta):
            h = torch.relu(self.a(image) + self.b(meta))
            h = h + torch.relu(self.mid(h))
            return {"logits": self.head(h), "score": self.aux(h).squeeze(-1)}

    def build_model():
        return TwoInput()

    def example_input():
        return torch.randn(2, 6), torch.randn(2, 4)

    def data():
        g = torch.Generator().manual_seed(0)
        x1, x2 = torch.randn(96, 6, generator=g), torch.randn(96, 4, generator=g)
        y = (x1[:, 0] + x2[:, 0] > 0).long() + (x1[:, 1] > 0.5).long()
        ds = torch.utils.data.TensorDataset(x1, x2, y)
        return ds, ds

    def loss(output, target):
        return F.cross_entropy(output["logits"], target) + 0.01 * output["score"].pow(2).mean()

    def metric(output, target):
        return (output["logits"].argmax(-1) == target).float().mean()
''')

REGRESSION_MODEL = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Regressor(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.hidden, self.out = nn.Linear(5, 32), nn.Linear(32, 32), nn.Linear(32, 1)

        def forward(self, x):
            h = torch.relu(self.inp(x))
            h = h + torch.relu(self.hidden(h))
            return self.out(h)

    def build_model():
        return Regressor()

    def example_input():
        return torch.randn(2, 5)

    def data():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(128, 5, generator=g)
        y = (x @ torch.arange(1.0, 6.0)).unsqueeze(-1) / 5
        return torch.utils.data.TensorDataset(x[:96], y[:96]), torch.utils.data.TensorDataset(x[96:], y[96:])

    def loss(output, target):
        return F.mse_loss(output, target)
''')


def _run(tmp_path, source: str, *extra: str):
    model_py = tmp_path / "model.py"
    model_py.write_text(source)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["transform", str(model_py), "--epochs", "3", "--arch-epochs", "1",
                                  "--batch-size", "32", "--lr", "0.05", "--quiet", "--out", str(out), *extra])
    assert r.exit_code == 0, r.output
    return json.loads((out / "report.json").read_text()), out, r.output


def test_two_inputs_dict_output_user_loss_through_the_cli(tmp_path):
    report, out, printed = _run(tmp_path, TWO_INPUT_MODEL)
    assert report["metric"] == "metric"  # the user's function name
    assert 0.0 <= report["transformed"]["val_metric"] <= 1.0
    assert report["onnx"]["passed"] and len(report["example_inputs"]) == 2
    ns: dict = {}
    exec(compile((out / "model.py").read_text(), "model.py", "exec"), ns)
    slim = ns["load_model"](str(out / "weights.pt")).eval()
    result = slim(torch.randn(3, 6), torch.randn(3, 4))
    assert set(result) == {"logits", "score"} and result["logits"].shape == (3, 3)
    assert "validation metric" in printed


def test_regression_mse_through_the_cli(tmp_path):
    report, _, printed = _run(tmp_path, REGRESSION_MODEL, "--baseline")
    assert report["metric"] == "neg_loss"
    val = report["transformed"]["val_neg_loss"]
    assert math.isfinite(val) and val <= 0
    # the baseline: the original trained alone on the same data, budget and seed, side by side
    rows = report["baseline"]["rows"]
    assert rows["val_neg_loss"]["original"] is not None and rows["parameters"]["original"] > 0
    assert rows["onnx_latency_seconds"]["original"] > 0 and rows["train_seconds"]["transformed"] > 0
    assert "baseline: the original trained alone reached" in printed
    assert "## " in (tmp_path / "out" / "report.md").read_text()


class TwoInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.mid = nn.Linear(6, 16), nn.Linear(4, 16), nn.Linear(16, 16)
        self.head, self.aux = nn.Linear(16, 3), nn.Linear(16, 1)

    def forward(self, image, meta):
        h = torch.relu(self.a(image) + self.b(meta))
        h = h + torch.relu(self.mid(h))
        return {"logits": self.head(h), "score": self.aux(h).squeeze(-1)}


def test_two_inputs_dict_output_in_a_users_loop():
    torch.manual_seed(0)
    model = TwoInput()
    x1, x2 = torch.randn(64, 6), torch.randn(64, 4)
    y = (x1[:, 0] > 0).long()
    s = archir.search(model, (x1[:2], x2[:2]), share="full")
    out = s.supernet.eval()(x1, x2)
    ref = model.eval()(x1, x2)
    assert all(torch.equal(out[k], ref[k]) for k in ref)
    opt = torch.optim.Adam(s.weight_parameters() + s.arch_parameters(), lr=0.05)
    s.supernet.train()
    first = None
    for _ in range(20):
        o = s.supernet(x1, x2)
        loss = F.cross_entropy(o["logits"], y) + F.mse_loss(o["score"], y.float())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    slim = s.derive().eval()
    assert set(slim(x1, x2)) == {"logits", "score"}


def test_regression_through_transform_api(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(96, 5)
    y = x.sum(-1, keepdim=True) / 5
    ds = torch.utils.data.TensorDataset(x, y)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 1))
    res = archir.transform(model, x[:2], train_data=ds, val_data=ds, epochs=2, arch_epochs=1, batch_size=32,
                           onnx=False, progress=False, task=archir.make_task(loss=F.mse_loss))
    assert res.report["metric"] == "neg_loss" and res.report["original"]["trained"] is False
    assert math.isfinite(res.report["transformed"]["val_neg_loss"])


def test_labels_beyond_the_models_outputs_are_a_user_error(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(32, 5)
    ds = torch.utils.data.TensorDataset(x, torch.arange(32) % 7)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    with pytest.raises(archir.UserInputError, match="label"):
        archir.transform(model, x[:2], train_data=ds, val_data=ds, epochs=1, arch_epochs=1, onnx=False,
                         progress=False)


def test_input_size_the_model_cannot_take_is_a_user_error():
    x = torch.randn(32, 7)
    ds = torch.utils.data.TensorDataset(x, torch.arange(32) % 3)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    with pytest.raises(archir.UserInputError, match="cannot take"):
        archir.transform(model, torch.randn(2, 5), train_data=ds, val_data=ds, epochs=1, arch_epochs=1,
                         onnx=False, progress=False)


def test_baseline_does_not_change_the_transformed_run():
    """The baseline trains on loaders of its own: the transformed network is bit for bit the same."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    ds = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())

    def run(baseline):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 2))
        return archir.transform(model, x[:2], train_data=ds, val_data=ds, epochs=2, arch_epochs=1, batch_size=16,
                                onnx=False, progress=False, baseline=baseline)

    with_baseline, without = run(True), run(False)
    assert with_baseline.report["original"]["trained"] and not without.report["original"]["trained"]
    a, b = with_baseline.module.state_dict(), without.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_model_that_cannot_be_emitted_is_refused_before_training(tmp_path):
    class Gate(nn.Module):  # a user module kept whole: model.py could not rebuild it
        def forward(self, x):
            return x * torch.sigmoid(x)

    model = nn.Sequential(nn.Linear(5, 8), Gate(), nn.Linear(8, 2))
    x = torch.randn(16, 5)
    ds = torch.utils.data.TensorDataset(x, torch.arange(16) % 2)
    epochs = []
    with pytest.raises(archir.ArchirError, match="cannot emit a standalone model.py.*'1'"):
        archir.transform(model, x[:2], train_data=ds, val_data=ds, out=tmp_path / "out", epochs=1, arch_epochs=1,
                         progress=False, leaf_modules=["1"], on_epoch=epochs.append)
    assert epochs == [] and not (tmp_path / "out" / "checkpoint.pt").exists()
