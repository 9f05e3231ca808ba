"""``archir.search(..., submodule=...)``: a search inside one part of a model whose own ``forward``
cannot be traced (a detector-like model: a list of images, value-dependent selection), trained
through the whole model with its own loss, derived and put back."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import archir
from archir.errors import UserInputError

pytestmark = pytest.mark.usefixtures("one_thread")


class Backbone(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(x + self.b1(self.c1(x)))
        return {"0": x, "1": F.relu(x + self.b2(self.c2(x)))}  # FPN-like: a dict of feature maps


class Detector(nn.Module):
    """Iterates over a list of images and keeps the boxes whose score passes a threshold: neither
    torch.fx nor torch.export follows this ``forward``, its backbone they do."""

    def __init__(self):
        super().__init__()
        self.backbone = Backbone()
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, images: list[torch.Tensor]):
        batch = torch.stack([F.interpolate(img[None], size=(16, 16))[0] for img in images])
        features = self.backbone(batch)
        out = self.head(features["0"] + features["1"])  # (N, 5, H, W): a score and a box per place
        scores = out[:, 0].flatten(1)
        keep = [s > s.median() for s in scores]  # selected by value: no tracer follows the shapes
        return [{"boxes": o[1:].flatten(1).T[k], "scores": s[k]} for o, s, k in zip(out, scores, keep)]


def _images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 20, 24, generator=g), torch.randn(3, 16, 16, generator=g)]


def _same(a, b):
    return all(torch.equal(x["boxes"], y["boxes"]) and torch.equal(x["scores"], y["scores"]) for x, y in zip(a, b))


def test_the_whole_model_does_not_trace_and_the_error_points_to_submodule():
    with pytest.raises(UserInputError, match=r"input 0 is a list.*submodule='backbone'"):
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
