"""archir.search: the search space as an object for the user's own training loop."""
from __future__ import annotations

import gc
import math

import pytest
import torch
import torch.nn.functional as F
from model_patterns import load_example
from torch.optim import optimizer as torch_optimizer

import archir
from archir.passes.edge_choice import THETA_ROOT


@pytest.fixture(scope="module")
def resnet20():
    torch.manual_seed(0)
    return load_example("resnet20").build_model()


def _batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_supernet_is_the_original_and_parameters_split(resnet20):
    x, _ = _batch(4)
    s = archir.search(resnet20, x, method="dnat", share="cell")
    assert torch.equal(s.supernet.eval()(x), resnet20.eval()(x))
    arch, weights = s.arch_parameters(), s.weight_parameters()
    assert arch and weights
    ids_a, ids_w = {id(p) for p in arch}, {id(p) for p in weights}
    assert not ids_a & ids_w
    assert ids_a | ids_w == {id(p) for p in s.supernet.parameters()}
    # the user's model is not the search's
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(resnet20.parameters(), weights))


def test_plain_adam_loop_cannot_make_a_wrong_search(resnet20):
    """Exactly the loop a user writes: torch.optim.Adam on arch_parameters(), nothing else. A large
    learning rate drives θ below zero within a few steps unless the method's projection runs."""
    x, y = _batch(32)
    s = archir.search(resnet20, x[:2], method="dnat", share="full")
    opt_w = torch.optim.SGD(s.weight_parameters(), lr=0.01, momentum=0.9)
    opt_a = torch.optim.Adam(s.arch_parameters(), lr=0.5)
    s.supernet.train()
    for _ in range(8):
        loss = F.cross_entropy(s.supernet(x), y)
        opt_w.zero_grad()
        opt_a.zero_grad()
        loss.backward()
        opt_w.step()
        opt_a.step()
        assert math.isfinite(loss.item())
        assert min(float(t.detach().min()) for t in s.arch_parameters()) >= 0.0
    moved = [t for t in s.arch_parameters() if not torch.equal(t.detach(), torch.tensor([0.0, 0.0, 1.0]))]
    assert moved, "θ never moved: the test would not catch a missing projection"
    decisions = s.decisions()
    assert decisions and all(set(d) == {"choices", "weights", "choice"} for d in decisions.values())
    assert all(abs(sum(d["weights"].values()) - 1) < 1e-5 for d in decisions.values())


def test_derive_copy_keeps_the_search_going_and_matches_one_hot_supernet(resnet20):
    x, _ = _batch(4)
    s = archir.search(resnet20, x, method="dnat", share="full")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in s.arch_parameters():
            t.copy_(torch.rand(3, generator=g))
    slim = s.derive().eval()
    decided = {eid: d["decision"] for eid, d in s.recorded_decisions.items()}
    assert decided and hasattr(s.graph.root, THETA_ROOT)  # the search itself is untouched
    assert any(d != "same" for d in decided.values())
    # the supernet with every choice one-hot on the derived decision computes the slim network
    slots = ("none", "identity", "same")
    with torch.no_grad():
        for e in s.graph.edges.values():
            if e.id in decided:
                theta = s.graph.root.archir_theta[e.labels["param"]]
                theta.zero_()
                theta[slots.index(decided[e.id])] = 1.0
    torch.testing.assert_close(slim(x), s.supernet.eval()(x), rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in s.weight_parameters())


def test_derive_in_place_shares_parameters_and_ends_the_search(resnet20):
    x, _ = _batch(2)
    s = archir.search(resnet20, x)
    slim = s.derive(in_place=True)
    supernet_ids = {id(p) for p in s.supernet.parameters()}
    assert all(id(p) in supernet_ids for p in slim.parameters())
    with pytest.raises(archir.UserInputError, match="already derived"):
        s.derive()


def test_emit_writes_a_standalone_model(resnet20, tmp_path):
    x, _ = _batch(2)
    s = archir.search(resnet20, x, share="full")
    files = s.emit(tmp_path / "out", onnx=False)
    assert set(files) == {"model.py", "weights.pt"}
    ns: dict = {}
    exec(compile((tmp_path / "out" / "model.py").read_text(), "model.py", "exec"), ns)
    model = ns["load_model"](str(tmp_path / "out" / "weights.pt")) if "load_model" in ns else None
    assert model is not None
    torch.testing.assert_close(model.eval()(x), s.derive().eval()(x))


def test_optimizer_hook_goes_with_the_search(resnet20):
    gc.collect()  # searches of earlier tests
    before = len(torch_optimizer._global_optimizer_post_hooks)
    s = archir.search(resnet20, torch.randn(1, 3, 32, 32))
    assert len(torch_optimizer._global_optimizer_post_hooks) == before + 1
    del s
    gc.collect()
    assert len(torch_optimizer._global_optimizer_post_hooks) == before
