"""Tests of the generic two-stage trainer (archir/training.py).

A tiny learnable task (3x8x8 images, noise plus a fixed pattern per class) and a tiny "supernet":
two branches mixed by a non-negative θ normalised by its sum; derive keeps the stronger branch
(the very same submodule objects, so its parameters are a subset of the supernet's).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from archir.training import (
    EpochRecord,
    TrainConfig,
    carry_optimizer_state,
    cosine_lr,
    evaluate,
    initial_values,
    rewind,
    resolve_device,
    split_indices,
    train_plain,
    train_two_stage,
)

N_CLASSES = 4
TIMING_KEYS = {"seconds", "train_seconds"}


class Loader:
    """Minimal stand-in for archir.data.BatchLoader: len() and a seeded reshuffle per pass."""

    def __init__(self, x, y, batch_size=32, shuffle=True, seed=0):
        self.x, self.y, self.bs, self.shuffle = x, y, batch_size, shuffle
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self):
        return math.ceil(len(self.y) / self.bs)

    def __iter__(self):
        order = torch.randperm(len(self.y), generator=self.gen) if self.shuffle else torch.arange(len(self.y))
        for i in range(0, len(order), self.bs):
            idx = order[i:i + self.bs]
            yield self.x[idx], self.y[idx]


def make_data(n=256, seed=123):
    """Images = noise + 0.3 x a fixed per-class pattern: linearly separable, learnable in a few
    epochs, but not trivially (the first epoch is far from perfect)."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(N_CLASSES, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    y = torch.randint(0, N_CLASSES, (n,), generator=g)
    x = torch.randn(n, 3, 8, 8, generator=g) + 0.3 * patterns[y]
    return x, y


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    x, y = make_data(256)
    xv, yv = make_data(128, seed=321)
    return x, y, xv, yv


class SuperNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 8, N_CLASSES))
        self.theta = nn.Parameter(torch.ones(2))  # registered on purpose: ω must exclude it

    def forward(self, x):
        h = self.stem(x)
        w = self.theta / self.theta.sum()
        return self.head(w[0] * self.a(h) + w[1] * self.b(h))


class Derived(nn.Module):
    def __init__(self, stem, branch, head):
        super().__init__()
        self.stem, self.branch, self.head = stem, branch, head

    def forward(self, x):
        return self.head(self.branch(self.stem(x)))


class Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self, net: SuperNet) -> nn.Module:
        self.calls += 1
        keep = net.a if net.theta[0] >= net.theta[1] else net.b
        return Derived(net.stem, keep, net.head)


def project(net):
    def f():
        net.theta.clamp_(min=1e-3)
    return f


def cfg(**kw):
    base = dict(epochs=2, arch_epochs=1, batch_size=32, lr=0.05, arch_lr=0.05, device="cpu",
                progress=False, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def run(data, c, derive=True, **kw):
    x, y, xv, yv = data
    torch.manual_seed(c.seed)
    net = SuperNet()
    kw.setdefault("log_arch", lambda: {"theta": net.theta.detach().tolist()})
    res = train_two_stage(net, [net.theta], Loader(x, y, seed=c.seed), Loader(xv, yv, shuffle=False), c,
                          derive=Counter() if derive is True else derive, project_arch=project(net), **kw)
    return net, res


def strip_timing(history):
    return [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in history]


# --------------------------------------------------------------------------------------------


def test_theta_moves_in_arch_stage_then_frozen_and_weights_keep_training(data):
    snapshots = {}

    def on_epoch(rec: EpochRecord):
        snapshots[rec.epoch] = {k: v.detach().clone() for k, v in net_holder[0].state_dict().items()}

    net_holder = []
    x, y, xv, yv = data
    torch.manual_seed(0)
    net = SuperNet()
    net_holder.append(net)
    derive = Counter()
    c = cfg(epochs=4, arch_epochs=2)
    res = train_two_stage(net, [net.theta], Loader(x, y), Loader(xv, yv, shuffle=False), c, derive=derive,
                          project_arch=project(net), on_epoch=on_epoch,
                          log_arch=lambda: {"theta": net.theta.detach().tolist()})
    h = res.history
    assert [r["stage"] for r in h] == ["arch", "arch", "net", "net"]
    assert derive.calls == 1
    assert isinstance(res.network, Derived) and not res.network.training
    # θ moved during the architecture stage, stayed non-negative, then froze.
    assert h[0]["arch"] != res.initial_arch and h[1]["arch"] != h[0]["arch"]
    assert h[1]["arch"] == h[2]["arch"] == h[3]["arch"] == res.final_arch
    assert min(res.final_arch["theta"]) >= 1e-3
    # ω (stem and head survive in the derived net) kept training in the network stage.
    for name in ("stem.0.weight", "head.1.weight", "head.1.bias"):
        assert not torch.equal(snapshots[1][name], net.state_dict()[name])
    assert res.stage_steps == {"arch": 16, "net": 16}
    assert res.mean_step_seconds["arch"] > 0 and res.mean_step_seconds["net"] > 0
    assert res.carried_state == len(list(res.network.parameters()))
    assert res.val_metric == h[-1]["val_metric"]


def test_arch_log_is_a_copy(data):
    # log_arch may hand back θ itself; the history must still show θ as it was at each epoch.
    x, y, xv, yv = data
    torch.manual_seed(0)
    net = SuperNet()
    res = train_two_stage(net, [net.theta], Loader(x, y), None, cfg(epochs=2, arch_epochs=2), derive=None,
                          log_arch=lambda: {"theta": net.theta})
    snaps = [res.initial_arch["theta"]] + [h["arch"]["theta"] for h in res.history]
    assert all(type(t) is torch.Tensor and not t.requires_grad for t in snaps)
    assert not torch.equal(snaps[0], snaps[1]) and not torch.equal(snaps[1], snaps[2])
    assert torch.equal(snaps[0], torch.ones(2)) and torch.equal(snaps[2], net.theta.detach())
    assert res.val_metric is None and res.history[0]["val_metric"] is None  # no val_loader: no evaluation


def test_network_stage_optimizer_covers_only_derived_weights(data):
    net, res = run(data, cfg(epochs=2, arch_epochs=1))
    params = {id(p) for g in res.optimizer.param_groups for p in g["params"]}
    assert params == {id(p) for p in res.network.parameters()}
    assert id(net.theta) not in params


def test_momentum_buffers_carried_over_at_derive(data):
    # Same seed, A == E == 1: one run keeps the supernet (its optimizer is returned), the other
    # derives right after the architecture stage with no step afterwards, so every surviving
    # parameter's momentum buffer must equal the supernet run's buffer bit for bit.
    c = cfg(epochs=1, arch_epochs=1)
    sup, res_sup = run(data, c, derive=None)
    der, res_der = run(data, c)
    assert isinstance(res_der.network, Derived) and res_sup.network is sup
    sup_buf = {name: res_sup.optimizer.state[p]["momentum_buffer"] for name, p in sup.named_parameters()
               if name != "theta"}
    net_params = dict(res_der.network.named_parameters())
    assert res_der.carried_state == len(net_params) > 0
    by_id = {id(p): name for name, p in der.named_parameters()}
    for p in net_params.values():
        buf = res_der.optimizer.state[p]["momentum_buffer"]
        assert buf.abs().sum() > 0
        assert torch.equal(buf, sup_buf[by_id[id(p)]])


def test_carry_optimizer_state_by_identity():
    a, b, c = (nn.Parameter(torch.randn(3)) for _ in range(3))
    old = torch.optim.SGD([a, b], lr=0.1, momentum=0.9)
    (a.sum() + b.sum()).backward()
    old.step()
    new = torch.optim.SGD([b, c], lr=0.1, momentum=0.9)
    assert carry_optimizer_state(old, new) == 1
    assert new.state[b]["momentum_buffer"] is old.state[b]["momentum_buffer"]
    assert c not in new.state


def test_epochs_zero_derives_without_training(data):
    x, y, xv, yv = data
    torch.manual_seed(0)
    net = SuperNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    derive = Counter()
    res = train_two_stage(net, [net.theta], Loader(x, y), Loader(xv, yv), cfg(epochs=0, arch_epochs=5),
                          derive=derive)
    assert derive.calls == 1 and isinstance(res.network, Derived)
    assert res.history == [] and res.stage_steps == {"arch": 0, "net": 0}
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert res.val_metric is not None  # the derived network is evaluated once


def test_arch_epochs_zero_derives_first(data):
    net, res = run(data, cfg(epochs=1, arch_epochs=0))
    assert [r["stage"] for r in res.history] == ["net"]
    assert isinstance(res.network, Derived)
    assert res.history[0]["arch"] == res.initial_arch  # θ never trained


@pytest.mark.parametrize("mode", ["alternate", "split", "joint"])
def test_arch_update_modes_run(data, mode):
    x, y, xv, yv = data
    train, kw = Loader(x, y), {}
    if mode == "split":
        w_idx, a_idx = split_indices(len(y), 0.5, seed=0)
        assert len(w_idx) == len(a_idx) == 128 and not set(w_idx.tolist()) & set(a_idx.tolist())
        train = Loader(x[w_idx], y[w_idx])
        kw = dict(arch_loader=Loader(x[a_idx], y[a_idx]), net_loader=Loader(x, y))
    torch.manual_seed(0)
    net = SuperNet()
    res = train_two_stage(net, [net.theta], train, Loader(xv, yv), cfg(arch_update=mode), derive=Counter(),
                          project_arch=project(net), log_arch=lambda: {"theta": net.theta.detach().tolist()},
                          **kw)
    assert res.history[0]["arch"] != res.initial_arch
    assert all(math.isfinite(r["train_loss"]) for r in res.history)
    assert res.stage_steps == {"arch": len(train), "net": 8}


def test_split_mode_requires_arch_loader(data):
    with pytest.raises(ValueError, match="arch_loader"):
        run(data, cfg(arch_update="split"))


def test_alternate_steps_do_not_leak_between_weight_and_arch(data):
    # ω's learning rate 0: only θ may change; θ's learning rate 0: only ω may change.
    net, res = run(data, cfg(epochs=1, arch_epochs=1, lr=0.0, weight_decay=0.0), derive=None)
    torch.manual_seed(0)
    fresh = SuperNet()
    for name, p in net.named_parameters():
        same = torch.equal(p.detach(), dict(fresh.named_parameters())[name].detach())
        assert same == (name != "theta"), name
    net, res = run(data, cfg(epochs=1, arch_epochs=1, arch_lr=0.0), derive=None)
    for name, p in net.named_parameters():
        same = torch.equal(p.detach(), dict(fresh.named_parameters())[name].detach())
        assert same == (name == "theta"), name


def test_same_seed_is_bit_identical(data):
    c = cfg(epochs=2, arch_epochs=1)
    net1, res1 = run(data, c)
    net2, res2 = run(data, c)
    sd1, sd2 = net1.state_dict(), net2.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k
    assert strip_timing(res1.history) == strip_timing(res2.history)
    net3, _ = run(data, cfg(epochs=2, arch_epochs=1, seed=1))
    assert not torch.equal(net3.state_dict()["stem.0.weight"], sd1["stem.0.weight"])


def test_loss_goes_down_and_beats_chance(data):
    net, res = run(data, cfg(epochs=6, arch_epochs=2))
    h = res.history
    assert h[-1]["train_loss"] < 0.7 * h[0]["train_loss"]
    assert res.val_metric > 0.6  # chance is 0.25


def test_train_plain_reuses_loop(data):
    x, y, xv, yv = data
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, N_CLASSES))
    res = train_plain(model, Loader(x, y), Loader(xv, yv), cfg(epochs=3, arch_epochs=2))
    assert [r["stage"] for r in res.history] == ["net"] * 3
    assert res.network is model and res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert res.val_metric > 0.6


def test_cosine_schedule_continues_across_switch(data):
    c = cfg(epochs=4, arch_epochs=2, lr=0.1)
    _, res = run(data, c)
    total = 4 * 8
    assert [r["lr"] for r in res.history] == [cosine_lr(0.1, 8 * e, total) for e in range(4)]
    _, res = run(data, cfg(epochs=2, schedule="constant", lr=0.1))
    assert [r["lr"] for r in res.history] == [0.1, 0.1]


def test_retrain_scratch_rewinds_the_derived_network_and_restarts_the_schedule(data):
    _, res = run(data, cfg(epochs=4, arch_epochs=2, lr=0.1, retrain="scratch"))
    steps = 8  # per epoch; each stage its own cosine schedule of 16 steps, from lr again
    assert [r["lr"] for r in res.history] == [cosine_lr(0.1, steps * e, 2 * steps) for e in (0, 1, 0, 1)]
    assert res.carried_state == 0  # a fresh optimiser: no momentum from the search
    assert res.history[-1]["val_metric"] > 0.5  # it trains from the fresh start
    # derived after the last epoch: the network returned is the rewound one, untrained
    x, y, xv, yv = data
    torch.manual_seed(0)
    net = SuperNet()
    initial = {id(p): p.detach().clone() for p in net.parameters()}
    res = train_two_stage(net, [net.theta], Loader(x, y), Loader(xv, yv, shuffle=False),
                          cfg(epochs=2, arch_epochs=2, retrain="scratch"), derive=Counter(), project_arch=project(net))
    params = list(res.network.parameters())
    assert params and all(torch.equal(p, initial[id(p)]) for p in params)
    with pytest.raises(ValueError, match="retrain"):
        cfg(retrain="warm")


def test_rewind_restores_known_parameters_and_resets_the_others():
    torch.manual_seed(0)
    kept, new = nn.Linear(3, 3), nn.Linear(3, 3)
    initial = initial_values(kept)
    start = {n: p.detach().clone() for n, p in kept.named_parameters()}
    bn = nn.BatchNorm1d(3)
    model = nn.Sequential(kept, bn, new)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    bn(torch.randn(8, 3))  # running statistics move
    before_new = new.weight.detach().clone()
    assert rewind(model, initial, seed=0) == []
    assert all(torch.equal(p, start[n]) for n, p in kept.named_parameters())
    assert not torch.equal(new.weight, before_new)  # reset_parameters (not in ``initial``)
    assert torch.equal(bn.running_mean, torch.zeros(3)) and torch.equal(bn.weight, torch.ones(3))


def test_checkpoint_written_atomically_and_loadable(data, tmp_path):
    net, res = run(data, cfg(epochs=2, arch_epochs=1), checkpoint_dir=tmp_path / "ck")
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert files == ["checkpoint.pt"]
    ck = torch.load(tmp_path / "ck" / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 1 and ck["stage"] == "net"
    assert ck["model"].keys() == res.network.state_dict().keys()  # the derived network after the switch
    assert torch.equal(ck["arch_params"][0], net.theta.detach())
    assert ck["cfg"]["epochs"] == 2 and len(ck["history"]) == 2
    assert ck["arch_optimizer"] is None and ck["optimizer"]["state"]
    assert ck["history"][-1]["metric_name"] == "accuracy" and "val_metric" in ck["history"][-1]


def test_checkpoint_rng_state_is_plain_and_restores(tmp_path):
    import random

    import numpy as np

    from archir.training import _rng_state, _set_rng_state

    torch.save({"rng": _rng_state()}, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    rng = torch.load(tmp_path / "rng.pt", weights_only=True)["rng"]
    assert isinstance(rng["python"], list) and all(isinstance(v, int) for v in rng["python"][1])
    _set_rng_state(rng)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


def test_history_and_summary_name_the_metric(data):
    net, res = run(data, cfg(epochs=1, arch_epochs=1))
    rec = res.history[0]
    assert res.metric_name == rec["metric_name"] == "accuracy"
    assert {"train_metric", "val_metric"} <= rec.keys() and not {"train_acc", "val_acc"} & rec.keys()
    line = EpochRecord(**rec).summary(1)
    assert f"accuracy {100 * rec['train_metric']:.2f}%" in line
    assert f"val loss {rec['val_loss']:.4f} accuracy {100 * rec['val_metric']:.2f}%" in line


def test_evaluate_restores_mode_and_moves_batches(data):
    x, y, xv, yv = data
    net = SuperNet().train()
    # channels-last (non-contiguous) batches are made contiguous on the way in
    loader = [(xv.to(memory_format=torch.channels_last), yv)]
    loss, acc = evaluate(net, loader, "cpu")
    assert net.training and 0.0 <= acc <= 1.0 and math.isfinite(loss)
    assert evaluate(net, [(xv, yv)]) == (loss, acc)


def test_cuda_requested_without_cuda_is_a_clear_error(data):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        run(data, cfg(device="cuda"))
    assert resolve_device("auto") == torch.device("cpu")


def test_config_validation():
    with pytest.raises(ValueError, match="arch_update"):
        TrainConfig(arch_update="bogus")
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="step")
    with pytest.raises(ValueError, match="split_fraction"):
        TrainConfig(split_fraction=1.0)
    with pytest.raises(ValueError, match="warmup_epochs"):
        TrainConfig(arch_epochs=2, warmup_epochs=3)
    with pytest.raises(ValueError, match="warmup_epochs"):
        TrainConfig(warmup_epochs=-1)
    TrainConfig(arch_epochs=2, warmup_epochs=2)  # the whole architecture stage may be warm-up


# --------------------------------------------------------------------------------------------
# Weight warm-up and per-epoch edge changes
# --------------------------------------------------------------------------------------------


def test_warmup_freezes_theta_then_it_moves(data):
    # 2 warm-up epochs of a 3-epoch architecture stage: θ bit-identical through the warm-up
    # (no θ step, no projection), ω trained; then θ moves.
    x, y, xv, yv = data
    torch.manual_seed(0)
    net = SuperNet()
    theta0 = net.theta.detach().clone()
    thetas, stem = [], []

    def on_epoch(rec: EpochRecord):
        thetas.append(net.theta.detach().clone())
        stem.append(net.stem[0].weight.detach().clone())

    res = train_two_stage(net, [net.theta], Loader(x, y), Loader(xv, yv, shuffle=False),
                          cfg(epochs=4, arch_epochs=3, warmup_epochs=2), derive=Counter(),
                          project_arch=project(net), on_epoch=on_epoch)
    h = res.history
    assert [r["stage"] for r in h] == ["arch", "arch", "arch", "net"]  # consumers filtering "arch" keep working
    assert [r["warmup"] for r in h] == [True, True, False, False]
    assert [r["arch_stepped"] for r in h] == [False, False, True, False]
    assert torch.equal(thetas[0], theta0) and torch.equal(thetas[1], theta0)
    assert not torch.equal(thetas[2], theta0)
    assert not torch.equal(stem[0], stem[1])  # ω trained during the warm-up
    assert res.stage_steps["arch"] == 3 * 8
    line = EpochRecord(**h[0]).summary(4)
    assert line.startswith("[arch warm-up] epoch 1/4") and EpochRecord(**h[2]).summary(4).startswith("[arch] ")


def test_warmup_is_cut_short_by_epochs_and_skipped_by_train_plain(data):
    net, res = run(data, cfg(epochs=1, arch_epochs=3, warmup_epochs=3), derive=None)
    assert [(r["stage"], r["warmup"]) for r in res.history] == [("arch", True)]
    assert res.history[0]["arch"] == res.initial_arch
    x, y, xv, yv = data
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, N_CLASSES))
    res = train_plain(model, Loader(x, y), None, cfg(epochs=1, arch_epochs=1, warmup_epochs=1))
    assert [(r["stage"], r["warmup"]) for r in res.history] == [("net", False)]


def test_log_changes_recorded_after_arch_epochs_only(data):
    calls = []

    def log_changes():
        calls.append(1)
        return ["e9", "e10", "e2"], 5

    net, res = run(data, cfg(epochs=3, arch_epochs=2), log_changes=log_changes)
    assert len(calls) == 2
    h = res.history
    assert [r["changed_edges"] for r in h] == [["e10", "e2", "e9"], ["e10", "e2", "e9"], None]
    assert [r["searchable_edges"] for r in h] == [5, 5, None]
    assert EpochRecord(**h[0]).summary(3).endswith("changed 3/5")
    assert "changed" not in EpochRecord(**h[2]).summary(3)
