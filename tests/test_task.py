"""Tests of archir/task.py (loss, metric, batch conventions, preflight checks) and of the trainer
running tasks other than classification. Tiny models, tiny generated data, CPU only."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Subset, TensorDataset

from archir.errors import UserInputError
from archir.task import (
    Task,
    batch_size,
    check_labels,
    check_task,
    classification_task,
    make_task,
    move_to,
    split_batch,
)
from archir.training import EpochRecord, TrainConfig, evaluate, train_plain, train_two_stage

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def cfg(**kw):
    base = dict(epochs=3, arch_epochs=1, lr=0.05, arch_lr=0.05, device="cpu", progress=False, seed=0,
                weight_decay=0.0)
    base.update(kw)
    return TrainConfig(**base)


# --------------------------------------------------------------------------------------------
# Batch conventions
# --------------------------------------------------------------------------------------------


def test_tuple_batch_last_element_is_the_target():
    x1, x2, y = torch.zeros(4, 2), torch.ones(4, 3), torch.arange(4)
    args, kwargs, target = split_batch((x1, x2, y))
    assert args == (x1, x2) and kwargs == {} and target is y
    args, kwargs, target = classification_task().split_batch([x1, y])
    assert args == (x1,) and target is y
    assert batch_size(args, kwargs, target) == 4


def test_dict_batch_target_key_and_keyword_inputs():
    x, m, y = torch.zeros(5, 2), torch.ones(5, 2), torch.arange(5)
    args, kwargs, target = split_batch({"x": x, "mask": m, "target": y})
    assert args == () and kwargs == {"x": x, "mask": m} and target is y
    assert batch_size(args, kwargs, target) == 5
    # "y" comes before "labels" in the search order; the other one is a model input
    _, kwargs, target = split_batch({"x": x, "labels": m, "y": y})
    assert target is y and set(kwargs) == {"x", "labels"}
    # the target may be any structure
    _, _, target = split_batch({"x": x, "label": {"a": y, "b": (y, y)}})
    assert target["a"] is y


def test_bad_batches_are_clear_errors():
    with pytest.raises(UserInputError, match=r"keys 'x', 'mask'"):
        split_batch({"x": torch.zeros(2), "mask": torch.zeros(2)})
    with pytest.raises(UserInputError, match="at least 2 elements"):
        split_batch((torch.zeros(2),))
    with pytest.raises(UserInputError, match=r"got f32\[2,3\]"):
        split_batch(torch.zeros(2, 3))


def test_move_to_nested_and_contiguous():
    x = torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)
    y = torch.arange(2)
    moved = move_to({"a": (x, [y, "text"]), "b": 3}, CPU)
    assert moved["a"][0].is_contiguous() and moved["a"][1][0] is y and moved["a"][1][1] == "text"
    assert moved["b"] == 3
    c = torch.randn(3)
    assert move_to(c, CPU) is c  # already there and contiguous: unchanged


# --------------------------------------------------------------------------------------------
# make_task
# --------------------------------------------------------------------------------------------


def test_make_task_defaults_and_names():
    assert make_task().metric_name == "accuracy" and make_task().classification
    reg = make_task(loss=F.mse_loss)
    assert reg.metric_name == "neg_loss" and not reg.classification
    out, target = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0])
    assert reg.metric(out, target).item() == pytest.approx(-2.0)

    def mean_abs_error(output, target):
        return -(output - target).abs().mean()

    assert make_task(loss=F.mse_loss, metric=mean_abs_error).metric_name == "mean_abs_error"
    assert make_task(metric=lambda o, t: 0.5).metric_name == "metric"
    with pytest.raises(UserInputError, match="loss must be a function"):
        make_task(loss=3)


# --------------------------------------------------------------------------------------------
# Training other tasks
# --------------------------------------------------------------------------------------------


class TwoInputNet(nn.Module):
    """Two inputs, a dict output; a registered θ mixes two branches (for train_two_stage)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(3, 8)
        self.p, self.q = nn.Linear(8, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)
        self.theta = nn.Parameter(torch.ones(2))

    def forward(self, x1, x2):
        h = torch.relu(self.a(x1) + self.b(x2))
        w = self.theta / self.theta.sum()
        h = w[0] * torch.relu(self.p(h)) + w[1] * torch.relu(self.q(h))
        out = self.head(h)
        return {"mean": out[:, 0], "aux": out[:, 1]}


def pair_loss(output, target):
    return F.mse_loss(output["mean"], target["value"]) + 0.1 * F.mse_loss(output["aux"], target["value"])


def closeness(output, target):  # a float: the trainer turns it into a tensor
    return float(-(output["mean"] - target["value"]).abs().mean())


class DictLoader:
    def __init__(self, n=96, bs=16, seed=0, as_dict=True):
        g = torch.Generator().manual_seed(seed)
        self.x1, self.x2 = torch.randn(n, 4, generator=g), torch.randn(n, 3, generator=g)
        self.v = self.x1[:, 0] - 2 * self.x2[:, 1] + 0.5
        self.bs, self.as_dict = bs, as_dict

    def __len__(self):
        return math.ceil(len(self.v) / self.bs)

    def __iter__(self):
        for i in range(0, len(self.v), self.bs):
            s = slice(i, i + self.bs)
            if self.as_dict:
                yield {"x1": self.x1[s], "x2": self.x2[s], "target": {"value": self.v[s]}}
            else:
                yield self.x1[s], self.x2[s], {"value": self.v[s]}


@pytest.mark.parametrize("as_dict", [True, False])
def test_two_inputs_dict_output_train_plain(as_dict):
    task = make_task(loss=pair_loss, metric=closeness)
    torch.manual_seed(0)
    net = TwoInputNet()
    records = []
    res = train_plain(net, DictLoader(as_dict=as_dict), DictLoader(seed=1, as_dict=as_dict), cfg(epochs=4),
                      task=task, on_epoch=records.append)
    h = res.history
    assert h[-1]["train_loss"] < 0.5 * h[0]["train_loss"]
    assert h[-1]["train_metric"] > h[0]["train_metric"]
    assert res.metric_name == "closeness" and all(r["metric_name"] == "closeness" for r in h)
    assert res.val_metric == h[-1]["val_metric"] < 0
    assert "closeness" in records[0].summary(4) and "%" not in records[0].summary(4)


def test_two_inputs_dict_output_train_two_stage():
    task = make_task(loss=pair_loss, metric=closeness)
    torch.manual_seed(0)
    net = TwoInputNet()
    res = train_two_stage(net, [net.theta], DictLoader(), DictLoader(seed=1), cfg(epochs=4, arch_epochs=2),
                          derive=None, task=task, project_arch=lambda: net.theta.clamp_(min=1e-3),
                          log_arch=lambda: {"theta": net.theta.detach().tolist()})
    h = res.history
    assert [r["stage"] for r in h] == ["arch", "arch", "net", "net"]
    assert h[0]["arch"] != res.initial_arch  # θ trained with the user loss
    assert h[-1]["train_loss"] < 0.5 * h[0]["train_loss"]
    loss, metric = evaluate(res.network, DictLoader(seed=1), task=task)
    assert (loss, metric) == (res.val_loss, res.val_metric)


def test_regression_with_mse_and_no_metric_reports_neg_loss():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    y = x @ torch.arange(1.0, 6.0).unsqueeze(1)
    loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    torch.manual_seed(0)
    model = nn.Linear(5, 1)
    res = train_plain(model, loader, loader, cfg(epochs=3, lr=0.02), task=make_task(loss=F.mse_loss))
    assert res.metric_name == "neg_loss"
    for r in res.history:
        assert r["train_metric"] == -r["train_loss"] and r["val_metric"] == -r["val_loss"]
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    rec = EpochRecord(**res.history[0])
    assert f"neg_loss {rec.train_metric:.4g}" in rec.summary(3)


def test_classification_defaults_match_hand_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 6, generator=g), torch.randint(0, 5, (n,), generator=g)) for n in (7, 9, 3)]
    loss_sum, correct, n = torch.zeros((), dtype=torch.float64), 0, 0
    with torch.no_grad():
        for x, y in batches:
            out = model(x)
            loss_sum += F.cross_entropy(out, y, reduction="sum").double()
            correct += int((out.argmax(1) == y).sum())
            n += len(y)
    expected = (loss_sum.item() / n, correct / n)
    assert evaluate(model, batches) == expected
    assert evaluate(model, batches, task=classification_task()) == expected
    assert evaluate(model, batches, task=make_task()) == expected


# --------------------------------------------------------------------------------------------
# check_task / check_labels
# --------------------------------------------------------------------------------------------


def classifier(outputs=3):
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, outputs))


def xy(labels=(0, 1, 2, 1)):
    return torch.randn(len(labels), 4), torch.tensor(labels)


def test_check_task_passes_and_restores_flags():
    model = classifier()
    model[1].eval()  # a frozen BatchNorm must stay frozen; the rest stays in training mode
    assert check_task(model, xy(), classification_task(), "cpu") == 3
    assert model.training and model[0].training and not model[1].training
    assert check_task(model, xy(), make_task(loss=lambda o, t: o.sum() * 0), CPU) is None


def test_check_task_model_cannot_take_inputs():
    with pytest.raises(UserInputError, match=r"cannot take the batch's inputs \(f32\[128,1,28,28\]\).*mat1"):
        check_task(classifier(), (torch.randn(128, 1, 28, 28), torch.zeros(128, dtype=torch.long)),
                   classification_task(), CPU)


def test_check_task_labels_out_of_range():
    with pytest.raises(UserInputError, match="label 7 .* 3 outputs.*at least 8 outputs or fix the labels"):
        check_task(classifier(3), xy((0, 7, 1, 2)), classification_task(), CPU)
    with pytest.raises(UserInputError, match="label -2 .* negative"):
        check_task(classifier(3), xy((0, -2, 1, 2)), classification_task(), CPU)
    with pytest.raises(UserInputError, match="the data set has 10 classes but the model has only 3"):
        check_task(classifier(3), xy(), classification_task(), CPU, num_outputs_hint=10)
    with pytest.raises(UserInputError, match="1 output .* at least 2"):
        check_task(classifier(1), xy((0, 0, 0, 0)), classification_task(), CPU)


def test_check_task_dict_output_with_default_loss():
    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return {"logits": self.fc(x)}

    with pytest.raises(UserInputError, match=r"returns a dict \(keys 'logits'\).*define loss\(output, target\)"):
        check_task(DictOut(), xy(), classification_task(), CPU)


def test_check_task_loss_or_metric_raises():
    def bad_loss(output, target):
        raise ValueError("shapes differ\nsecond line")

    def bad_metric(output, target):
        raise KeyError("score")

    with pytest.raises(UserInputError, match="loss function bad_loss.*ValueError: shapes differ$"):
        check_task(classifier(), xy(), make_task(loss=bad_loss), CPU)
    with pytest.raises(UserInputError, match="metric function bad_metric.*KeyError: 'score'"):
        check_task(classifier(), xy(), make_task(metric=bad_metric), CPU)


def test_check_task_loss_not_scalar_or_nan():
    def per_example(output, target):
        return F.cross_entropy(output, target, reduction="none")

    def nan_loss(output, target):
        return output.sum() * float("nan")

    with pytest.raises(UserInputError, match=r"per_example must return a scalar .*got f32\[4\]"):
        check_task(classifier(), xy(), make_task(loss=per_example), CPU)
    with pytest.raises(UserInputError, match="loss is nan at initialisation"):
        check_task(classifier(), xy(), make_task(loss=nan_loss), CPU)
    with pytest.raises(UserInputError, match="must return a scalar"):
        check_task(classifier(), xy(), make_task(loss=lambda o, t: 1.0), CPU)


def test_check_labels_datasets():
    x = torch.randn(6, 4)
    check_labels(TensorDataset(x, torch.tensor([0, 1, 2, 2, 1, 0])), 3)
    with pytest.raises(UserInputError, match="label 5 in the data set.*at least 6 outputs"):
        check_labels(TensorDataset(x, torch.tensor([0, 1, 5, 2, 1, 0])), 3)
    with pytest.raises(UserInputError, match="every label of the data set is 2"):
        check_labels(TensorDataset(x, torch.full((6,), 2)), 3)
    # a Subset of a data set with `targets`: only its own labels count
    class WithTargets(torch.utils.data.Dataset):
        targets = [0, 1, 9, 1]

        def __len__(self):
            return 4

    check_labels(Subset(WithTargets(), [0, 1, 3]), 3)
    with pytest.raises(UserInputError, match="label 9"):
        check_labels(Subset(WithTargets(), [0, 2]), 3)
    check_labels([(x[0], 0)], 3)  # labels not exposed: nothing to check


def test_check_labels_image_tensor_dataset():
    from archir.data import ImageTensorDataset

    ds = ImageTensorDataset(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 3, 1]),
                            ["a", "b", "c", "d"])
    with pytest.raises(UserInputError, match="label 3 in the data set"):
        check_labels(ds, 3)


def test_trainer_runs_the_preflight_before_training():
    loader = [xy((0, 1, 4, 1))]
    model = classifier(3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserInputError, match="label 4"):
        train_plain(model, loader, None, cfg(epochs=1))
    for k, v in model.state_dict().items():  # nothing was trained
        assert torch.equal(v, before[k]), k

    class LoaderWithDataset(list):
        dataset = TensorDataset(torch.randn(3, 4), torch.tensor([0, 1, 5]))

    with pytest.raises(UserInputError, match="label 5 in the data set"):
        train_plain(classifier(3), LoaderWithDataset([xy()]), None, cfg(epochs=1))


def test_trainer_bad_metric_return_is_clear():
    with pytest.raises(UserInputError, match="must return a scalar"):
        train_plain(classifier(3), [xy()], None, cfg(epochs=1), task=make_task(metric=lambda o, t: o))


# --------------------------------------------------------------------------------------------
# MODEL.py
# --------------------------------------------------------------------------------------------


def test_model_file_loss_and_metric(tmp_path):
    from archir.model_file import load_model_file

    path = tmp_path / "MODEL.py"
    path.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def build_model():
            return nn.Linear(4, 1)

        def loss(output, target):
            return ((output - target) ** 2).mean()

        def r2ish(output, target):
            return 1.0 - loss(output, target) / target.var()

        metric = r2ish
    """))
    spec = load_model_file(path)
    assert isinstance(spec.task, Task) and spec.task.metric_name == "r2ish" and not spec.task.classification
    path.write_text("import torch\nfrom torch import nn\nmodel = nn.Linear(2, 2)\nloss = 3\n")
    with pytest.raises(UserInputError, match="loss must be a function"):
        load_model_file(path)
    path.write_text("import torch\nfrom torch import nn\nmodel = nn.Linear(2, 2)\n")
    assert load_model_file(path).task.metric_name == "accuracy"
