"""Small models, each exercising one pattern the frontend must handle. Shared by the tests."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

#: A model file for ``archir transform`` (one residual sum, 3×8×8 inputs, 32 generated examples),
#: filled in by :func:`tiny_model_file`.
_TINY_MODEL_FILE = '''import os

import torch
from torch import nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self, n={outputs}):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.res = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, n)

    def forward(self, x):
        x = F.relu(self.conv(x))
        x = x + F.relu(self.res(x))
        return self.head(x.mean((2, 3)))


def build_model():
    return Net()


def example_input():
    return torch.randn(2, 3, 8, 8)


def data():
    {data_prelude}
    g = torch.Generator().manual_seed(0)
    x = torch.randn({examples}, {channels}, 8, 8, generator=g)
    y = {labels}
    ds = torch.utils.data.TensorDataset(x, y)
    return ds, torch.utils.data.TensorDataset(x[:16], y[:16])
{extra}'''


def tiny_model_file(outputs: int = 4, channels: int = 3, examples: int = 32, labels: str | None = None,
                    data_prelude: str = "pass", extra: str = "") -> str:
    """The source of a small model file: ``outputs`` classes, data of ``channels`` channels (a
    mismatch with the model's 3 is a user error to test), ``labels`` an expression (default
    ``arange(examples) % 4``), ``data_prelude`` a statement run first in ``data()``, ``extra``
    more top-level code (e.g. a ``loss``)."""
    labels = labels or f"torch.arange({examples}) % 4"
    return _TINY_MODEL_FILE.format(outputs=outputs, channels=channels, examples=examples, labels=labels,
                                   data_prelude=data_prelude, extra=extra)


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"archir_example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def conv_bn(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))


class Residual(nn.Module):
    """x + f(x) with an in-place add and an in-place ReLU."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.body = nn.Sequential(conv_bn(8, 8), nn.ReLU(inplace=True), conv_bn(8, 8))
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.relu(self.stem(x))
        out = self.body(x)
        out += x
        out = self.relu(out)
        return self.head(out.mean((2, 3)))


class Dense(nn.Module):
    """DenseNet-style concatenation."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 4, 3, padding=1)
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        a = F.relu(self.c0(x))
        b = F.relu(self.c1(a))
        ab = torch.cat([a, b], dim=1)
        c = F.relu(self.c2(ab))
        out = torch.cat((ab, c), 1)
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc(pool(x))): a product join; also a buffer and a parameter used functionally."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Conv2d(8, 2, 1)
        self.fc2 = nn.Conv2d(2, 8, 1)
        self.scale = nn.Parameter(torch.full((1, 8, 1, 1), 0.5))
        self.register_buffer("shift", torch.linspace(-1, 1, 8).view(1, 8, 1, 1))

    def forward(self, x):
        x = F.silu(self.conv(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return (x * s) * self.scale + self.shift


class TwoInDictOut(nn.Module):
    """Two inputs, a dict output, a shared module called twice, tensor methods."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, a, b):
        ha = self.enc(a).tanh()
        hb = self.enc(b).relu()
        joint = ha * hb + ha
        return {"logits": self.out(joint), "embedding": joint.sum(dim=-1, keepdim=True), "a": ha}


class ContainerInputs(nn.Module):
    """Arguments that are a list of views and a dict holding a list: one input per tensor."""

    def __init__(self):
        super().__init__()
        self.view = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.side = nn.Conv2d(1, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, views, extras):
        x = self.view(views[0]) + self.view(views[1])
        x = F.relu(self.bn(x)) * torch.sigmoid(self.side(extras["mask"]))
        return self.head(x) + extras["bias"][1]


def _container_inputs():
    return ([torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)],
            {"mask": torch.randn(2, 1, 8, 8), "bias": [torch.randn(2, 2, 1, 1), torch.randn(2, 2, 1, 1)]})


class ChunkSplit(nn.Module):
    """chunk / split / unbind produce junctions with indexed outputs; stack joins them."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 12)

    def forward(self, x):
        q, k, v = self.proj(x).chunk(3, dim=-1)
        left, right = torch.split(v, [1, 3], dim=-1)
        parts = torch.stack([q.sigmoid(), k * 2.0], dim=0)
        rows = x.unbind(1)
        return parts.sum(0) + torch.cat([right, left], dim=-1) + rows[0].mean()


class TinyTransformer(nn.Module):
    """Pre-norm attention block: view/reshape from size() arithmetic, matmul joins, softmax."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.pos = nn.Parameter(torch.randn(1, 5, dim) * 0.02)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        B, N, C = x.shape
        x = x + self.pos
        h = self.norm1(x)
        qkv = self.qkv(h).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * (C // self.heads) ** -0.5
        attn = self.drop(attn.softmax(dim=-1))
        y = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = x + self.proj(y)
        x = x + self.mlp(self.norm2(x))
        return x.view(x.size(0), -1)


class Meta(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x)


class NameClash(nn.Module):
    """Submodules named like attributes of torch's own classes (``meta``, ``graph``, ``code``)."""

    def __init__(self):
        super().__init__()
        self.meta = Meta()
        self.graph = nn.Linear(4, 4)
        self.code = nn.Linear(4, 4)

    def forward(self, x):
        return self.code(self.graph(self.meta(x)) + x)


class ShapeBranch(nn.Module):
    """Branches on the input's shape: torch.fx cannot follow it, torch.export can."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        if x.shape[-1] > 4:
            y = F.max_pool2d(y, 2)
        y = self.drop(y)
        return self.fc(y.mean((2, 3)))


class ValueBranch(nn.Module):
    """Branches on tensor values: no tracer can follow it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        if y.sum() > 0:
            return y * 2
        return y


class FunctionalDropout(nn.Module):
    """``F.dropout(training=self.training)`` must follow train/eval after tracing."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return F.dropout(self.lin(x), p=0.5, training=self.training) + x


class SetItem(nn.Module):
    """In-place slice assignment and an in-place method whose result is unused."""

    def forward(self, x):
        y = x * 2
        y[:, 0] = 0.0
        y.relu_()
        return y + 1


MODELS = {
    # name: (constructor, example input builder)
    "residual": (Residual, lambda: torch.randn(2, 3, 8, 8)),
    "dense": (Dense, lambda: torch.randn(2, 3, 8, 8)),
    "squeeze_excite": (SqueezeExcite, lambda: torch.randn(2, 3, 8, 8)),
    "two_in_dict_out": (TwoInDictOut, lambda: (torch.randn(3, 6), torch.randn(3, 6))),
    "chunk_split": (ChunkSplit, lambda: torch.randn(2, 8)),
    "transformer": (TinyTransformer, lambda: torch.randn(2, 5, 16)),
    "name_clash": (NameClash, lambda: torch.randn(2, 4)),
    "functional_dropout": (FunctionalDropout, lambda: torch.randn(4, 8)),
    "setitem": (SetItem, lambda: torch.randn(3, 4)),
    "shape_branch": (ShapeBranch, lambda: torch.randn(2, 3, 8, 8)),
    "container_inputs": (ContainerInputs, _container_inputs),
}

EXAMPLE_NAMES = ["resnet20", "mobilenetv2", "darts_cell", "mbconv"]


def random_like(inputs, seed: int):
    gen = torch.Generator().manual_seed(seed)
    if isinstance(inputs, torch.Tensor):
        return torch.randn(inputs.shape, generator=gen, dtype=inputs.dtype)
    # lists, tuples and dicts of tensors keep their structure (tree order, as tracing flattens them)
    return tuple(pytree.tree_map(lambda x: torch.randn(x.shape, generator=gen, dtype=x.dtype), tuple(inputs)))


def nontrivial_batch_norms(model: nn.Module, seed: int = 3) -> None:
    """γ in [0.5, 1.5] and β in [-0.5, 0.5] for every BatchNorm2d: at their defaults (1, 0) a
    wrong fold into BatchNorm would hide."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)


def derive_and_check_one_hot(g, sup, x, atol: float) -> dict[str, str]:
    """Derive ``g`` (a DNAT supernet graph whose θ is set), then check that the pruned and folded
    network equals the supernet ``sup`` with every θ made one-hot at its decision. Returns the
    decisions ``{edge id: choice}``."""
    from archir.passes.base import PassManager
    from archir.passes.derive import Derive, FoldIdentities, Prune
    from archir.passes.edge_choice import SLOTS

    thetas = dict(g.root.archir_theta.items())
    PassManager([Derive()])(g)
    decisions = {e.id: e.labels["decision"] for e in g.edges.values() if "decision" in e.labels}
    with torch.no_grad():  # the supernet with the derived choices fixed one-hot
        for p in thetas.values():
            p.zero_()
        for e in g.edges.values():
            if "decision" in e.labels:
                thetas[e.labels["param"]][SLOTS.index(e.labels["decision"])] = 1.0
    PassManager([Prune(), FoldIdentities()])(g)
    slim = g.to_module().eval()
    with torch.no_grad():
        for s in (0, 1):
            xi = random_like(x, s)
            torch.testing.assert_close(slim(xi), sup(xi), rtol=0, atol=atol)
    return decisions


def call(model, inputs):
    return model(inputs) if isinstance(inputs, torch.Tensor) else model(*inputs)


def assert_same(a, b):
    """Bit-identical nested outputs (tensors, tuples, lists, dicts)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b), f"max abs diff {(a - b).abs().max().item()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


# -- functional dropout that reads self.training (tests/test_zoo_patterns.py, tests/test_fx_dropout.py)

class SdpaDropoutAttention(nn.Module):
    """Hugging Face's SDPA attention: the dropout is an argument of a function call."""

    def __init__(self, d=16, heads=2, p=0.3):
        super().__init__()
        self.qkv, self.proj, self.heads, self.p = nn.Linear(d, 3 * d), nn.Linear(d, d), heads, p

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)
        return self.proj(a.transpose(1, 2).reshape(b, n, d))


class FunctionalDropoutMlp(nn.Module):
    """Hugging Face's eager attention and T5: ``F.dropout(x, p, training=self.training)``."""

    def __init__(self, d=16, p=0.3):
        super().__init__()
        self.lin, self.p = nn.Linear(d, d), p

    def forward(self, x):
        return F.dropout(self.lin(x).softmax(-1), self.p, training=self.training)


class FunctionalBatchStats(nn.Module):
    """Training changes more than dropout here: batch statistics (a functional BatchNorm)."""

    def __init__(self, d=16, p=0.3):
        super().__init__()
        self.lin, self.p = nn.Linear(d, d), p
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("var", torch.ones(d))

    def forward(self, x):
        y = F.batch_norm(self.lin(x).transpose(1, 2), self.mean, self.var,
                                     training=self.training).transpose(1, 2)
        return F.dropout(y, self.p, training=self.training)


class PreNormBlock(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.ln, self.inner = nn.LayerNorm(16), inner

    def forward(self, x):
        return x + self.inner(self.ln(x))


def same_outputs_in_both_modes(model, traced, x, seeds=(1, 2)):
    """Eval: equal. Training: equal when the same seed precedes each call, and dropping out."""
    for mode in (False, True):
        model.train(mode), traced.train(mode)
        for seed in seeds:
            assert same_under_seed(model, traced, x, seed)
    torch.manual_seed(seeds[0])
    assert not torch.equal(traced(x), traced.eval()(x))  # it did drop out in training
    model.eval(), traced.eval()


def same_under_seed(a, b, x, seed=5):
    """``a(x)`` and ``b(x)`` equal when the same seed precedes each call."""
    torch.manual_seed(seed)
    ya = a(x)
    torch.manual_seed(seed)
    return torch.equal(ya, b(x))
