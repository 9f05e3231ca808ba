"""CandidateOps and DeriveCandidates: kernel-size and activation candidates with binary gates.

Cai, Zhu & Han, *ProxylessNAS: Direct Neural Architecture Search on Target Task and Hardware*
(binary gates, their gradient estimate, two-path sampling with rescaling), with the search space
of *Search Space Adaptation for Differentiable Neural Architecture Search in Image
Classification* (candidate kernel sizes and activations where a network has convolutions, and a
search scope that grows from the deepest stage towards the shallowest).

**Units.** A *unit* is a run of operations inside an edge: a ``call_module`` of an ``nn.Conv2d``
(exactly that class: subclasses such as timm's ``Conv2dSame`` pad differently), optionally
followed by a normalisation (a module or a functional ``batch_norm``) and optionally by an
activation archir recognises (:data:`ACTIVATIONS`: ``relu``, ``relu6``, ``leaky_relu``, ``mish``,
``hardswish``, ``silu``, ``gelu``, ``elu``, as a module, a function or a method). Its candidates
are the product of

* kernel sizes: a square k×k convolution with k > 1 takes every size k' of ``kernels`` with k' − k
  even (so that the centre stays the centre), stride, dilation and groups kept and the padding
  p' = p + d·(k' − k)/2 (the output size is unchanged); a 1×1 (pointwise) convolution keeps k = 1;
* activations: a recognised activation takes every name of ``activations``; no (or an
  unrecognised) activation stays as it is.

A unit with two or more candidates becomes one ``choice`` operation; ops before and after it in
the edge stay. The original candidate is always listed *last* in each decision (archir's
convention for "the original", and the tie-break of :meth:`archir.search_space.Search.decisions`).

**Warm start.** Each kernel size k' ≠ k gets its own convolution, initialised from the original
weights zero-padded (k' > k) or centre-cropped (k' < k), and its own copy of the normalisation
(running statistics included). With zero padding, conv_{k'}(x) = conv_k(x) in exact arithmetic:
the extra taps multiply padding rows and columns by zero weights. So a trained model can be
improved instead of trained from scratch: every larger kernel with the original activation
computes the original function (to float rounding), and the original candidate reuses the
original modules themselves (bit for bit). Activations are parameter-free functions and share the
convolution and normalisation of their kernel size.

**Decisions.** ``combine="separate"`` (the default, as the adaptation paper's Fig. 3 tracks kernel
size and activation separately): one logit vector α per factor (``<unit>_kernel``, ``<unit>_act``);
``combine="product"``: one α over all kernel × activation pairs (``<unit>``). α starts at 0.

**Binary gates** (ProxylessNAS sec. 3.2). In training mode each forward draws, per factor, one
index i ~ softmax(α) and runs only the path of the drawn indices, so activations are stored for
one path. The gates g (one-hot at i) enter the output as y = Σ_j g_j o_j = o_i, and ProxylessNAS
estimates the gradient of α by the gradient of the gates:

    ∂L/∂α_i ≈ Σ_j ∂L/∂g_j · ∂p_j/∂α_i = Σ_j ⟨∂L/∂y, o_j⟩ · p_j (δ_ij − p_i)

(:class:`GateGrad`: the backward evaluates o_j = path_j(x) one at a time under no_grad, with the
normalisation's running statistics left untouched, so memory stays near one path; the product
with softmax's Jacobian is autograd's own). With ``gate_paths=2`` two distinct indices are drawn
from the multinomial of softmax(α), one of them runs (drawn by the softmax of their two α), the
gradient reaches only those two α, and after each α step (:func:`rescale_pairs`) both are shifted
by log(Σ_pair e^{α_old}) − log(Σ_pair e^{α_new}) so that the probabilities of the others do not
change (ProxylessNAS's rescaling). The gate term is an exact zero added to the output by a node
that only the α backward reaches: a backward for the weights alone (``backward(inputs=ω)``)
never runs it. In eval mode the supernet runs the argmax path (ties to the original).

**Deriving** (:class:`DeriveCandidates`): each unit becomes its argmax path (ties to the
original, so with no training the derived network *is* the original, bit for bit); then
:class:`~archir.passes.derive.Prune` drops the unchosen candidates' modules.

**Scope** (the adaptation paper's s / m / l / f). Stages are runs of units (in topological
order) at the same resolution and width, those of the block the unit belongs to: the first sum
or concat join its edge feeds (the block's output, so a bottleneck's inner 1×1 and 3×3 convolutions, and the
expanding 1×1 before a stride, belong to the stage of the block, as the paper groups ResNet-50 by
feature channels), or for the tail of a network with no join after it the last join before it;
a unit of a network without joins takes its own output's. ``s``, ``m``, ``l`` search the deepest one, two or
three stages, ``f`` all of them.
"""
from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from archir.errors import IRError, UserInputError
from archir.ir import Graph, Input, Op, TensorMeta, fetch_attr
from archir.ir.graph import map_refs
from archir.ir.lower import Lowering, register_lowering

from .base import Pass, PassResult
from .edge_choice import op_class

ALPHA_ROOT = "archir_alpha"
GATE_ROOT = "archir_gates"
CAND_ROOT = "archir_cand"
LOWERING = "candidate_ops.binary_gates"
SCOPES = {"s": 1, "m": 2, "l": 3, "f": None}
COMBINES = ("separate", "product")

#: activation name -> the function a new candidate calls (default arguments)
ACTIVATIONS = {"relu": F.relu, "relu6": F.relu6, "leaky_relu": F.leaky_relu, "mish": F.mish,
               "hardswish": F.hardswish, "silu": F.silu, "gelu": F.gelu, "elu": F.elu}
_ACT_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.LeakyReLU: "leaky_relu", nn.Mish: "mish",
                nn.Hardswish: "hardswish", nn.SiLU: "silu", nn.GELU: "gelu", nn.ELU: "elu"}
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.leaky_relu: "leaky_relu",
                  F.mish: "mish", F.hardswish: "hardswish", F.silu: "silu", F.gelu: "gelu", F.elu: "elu"}
_ACT_METHODS = {"relu": "relu"}


def parse_list(text, what: str, cast=str) -> tuple:
    """``"3,5,7"`` (or a sequence) → a tuple of ``cast`` values; UserInputError naming ``what``."""
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    try:
        out = tuple(cast(s) for s in items if s != "")
    except ValueError as exc:
        raise UserInputError(f"{what}: cannot read {text!r} as a comma-separated list ({exc})") from exc
    if not out:
        raise UserInputError(f"{what} is empty; give at least one value, e.g. {what}=3,5,7")
    return out


def check_candidates(kernels, activations) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The checked kernel sizes (positive, odd) and activation names (of :data:`ACTIVATIONS`)."""
    kernels = parse_list(kernels, "kernels", int)
    activations = parse_list(activations, "activations")
    bad = [k for k in kernels if k < 1 or k % 2 == 0]
    if bad:
        raise UserInputError(f"kernels must be positive odd sizes (the centre tap stays the centre), not {bad}")
    unknown = [a for a in activations if a not in ACTIVATIONS]
    if unknown:
        raise UserInputError(f"unknown activation(s) {unknown}; choose from {', '.join(ACTIVATIONS)}")
    return tuple(dict.fromkeys(kernels)), tuple(dict.fromkeys(activations))


# -- planning: which units, which candidates ----------------------------------------------------

@dataclass
class Unit:
    """One searchable run ``edge.ops[start:end]``: conv [norm] [activation], and its candidates."""

    edge: str
    start: int
    end: int
    name: str
    kernel: int
    kernels: tuple[int, ...]  # the original last
    act: str | None
    acts: tuple[str | None, ...]  # the original last
    stage: int = 0
    stages: int = 1
    norm: int | None = None  # index of the normalisation within the unit's ops
    key: tuple = field(default=(), repr=False)

    @property
    def size(self) -> int:
        return len(self.kernels) * len(self.acts)


def _act_name(graph: Graph, op: Op) -> str | None:
    """The name (of :data:`ACTIVATIONS`) of an activation op applied to the chain input, or None."""
    if not op.args or not isinstance(op.args[0], Input):
        return None
    if op.kind == "call_module":
        return _ACT_MODULES.get(type(fetch_attr(graph.root, op.target)))
    if op.kind == "call_function":
        return _ACT_FUNCTIONS.get(op.target)
    if op.kind == "call_method":
        return _ACT_METHODS.get(op.target)
    return None


def _conv_of(graph: Graph, op: Op) -> nn.Conv2d | None:
    if op.kind != "call_module" or op.args != (Input(),) or op.kwargs:
        return None
    m = fetch_attr(graph.root, op.target)
    return m if type(m) is nn.Conv2d else None


def _skip_identities(graph: Graph, ops: list[Op], i: int) -> int:
    """The index of the first op at or after ``i`` that is not an identity (``nn.Identity``,
    dropout, timm's ``drop_block``/``aa`` placeholders): those stay inside a unit as they are."""
    while i < len(ops) and op_class(graph, ops[i]) == "identity":
        i += 1
    return i


def _kernel_choices(conv: nn.Conv2d, kernels: tuple[int, ...]) -> tuple[int, ...]:
    """The kernel sizes of a conv, the original last; only its own for a 1×1, non-square or even one."""
    kh, kw = conv.kernel_size
    if kh != kw or kh == 1 or kh % 2 == 0:
        return (kh,)
    return tuple(k for k in kernels if k != kh and (k - kh) % 2 == 0) + (kh,)


def _block_key(graph: Graph, edge, own: tuple) -> tuple:
    """``(resolution, width)`` of the block an edge belongs to: those of the first sum or concat
    (a block's output; a product is a gate inside a block, as in squeeze-and-excitation) reached
    from its destination (following first out-edges), else of the last join before its source
    (following first in-edges: the tail of a network without joins after it), else ``own``."""
    def key(j):
        m = j.meta
        return (tuple(m.shape[2:]), m.shape[1]) if isinstance(m, TensorMeta) and len(m.shape) == 4 else None

    for start, step in ((edge.dst, lambda jid: graph.out_edges(jid)[:1]),
                        (edge.src, lambda jid: graph.in_edges(jid)[:1])):
        jid = start
        for _ in range(len(graph.junctions)):
            j = graph.junctions[jid]
            if j.combine is not None and j.combine.kind in ("sum", "concat") and key(j) is not None:
                return key(j)
            nxt = step(jid)
            if not nxt:
                break
            jid = nxt[0].dst if nxt[0].src == jid else nxt[0].src
    return own


def plan_units(graph: Graph, kernels=(3, 5, 7), activations=("relu", "leaky_relu", "mish", "hardswish"),
               scope: str = "f") -> list[Unit]:
    """The units :class:`CandidateOps` would turn into choices, in topological order (see the
    module docstring); changes nothing."""
    kernels, activations = check_candidates(kernels, activations)
    if scope not in SCOPES:
        raise UserInputError(f"scope must be one of {', '.join(SCOPES)} (the deepest 1, 2, 3 stages, or all), "
                             f"not {scope!r}")
    units: list[Unit] = []
    for e in graph.edges_in_order():
        found = []
        i = 0
        while i < len(e.ops):
            conv = _conv_of(graph, e.ops[i])
            if conv is None:
                i += 1
                continue
            start, end = i, i + 1
            norm = None
            end = _skip_identities(graph, e.ops, end)
            if end < len(e.ops) and op_class(graph, e.ops[end]) == "norm" and e.ops[end].kind in (
                    "call_module", "call_function"):
                norm = end - start
                end = _skip_identities(graph, e.ops, end + 1)
            act = _act_name(graph, e.ops[end]) if end < len(e.ops) else None
            end += act is not None
            ks = _kernel_choices(conv, kernels)
            acts = tuple(a for a in activations if a != act) + (act,) if act is not None else (None,)
            out = e.ops[end - 1].meta.get("out")
            if len(ks) * len(acts) >= 2 and isinstance(out, TensorMeta) and len(out.shape) == 4:
                found.append(Unit(e.id, start, end, "", conv.kernel_size[0], ks, act, acts, norm=norm,
                                  key=_block_key(graph, e, (tuple(out.shape[2:]), out.shape[1]))))
            i = end
        for n, u in enumerate(found):
            u.name = e.id if len(found) == 1 else f"{e.id}_{n}"
        units += found
    stage, last = -1, None
    for u in units:
        if u.key != last:
            stage, last = stage + 1, u.key
        u.stage = stage
    total = stage + 1
    keep = SCOPES[scope]
    units = [u for u in units if keep is None or u.stage >= total - keep]
    for u in units:
        u.stages = total
    return units


def kernel_name(k: int) -> str:
    return f"k{k}"


def factor_choices(unit: Unit, combine: str) -> list[tuple[str, tuple[str, ...]]]:
    """``[(decision suffix, choice names), ...]`` of a unit: one factor over kernel × activation
    pairs (``product``), or the kernel and the activation separately (``separate``), leaving out a
    factor with one choice. The original is last in each."""
    ks = tuple(kernel_name(k) for k in unit.kernels)
    acts = tuple(a for a in unit.acts)
    if combine == "product":
        names = tuple("-".join(p for p in ((k if len(ks) > 1 else ""), (a or "")) if p) for k in ks for a in acts)
        return [("", names)]
    out = []
    if len(ks) > 1:
        out.append(("_kernel", ks))
    if len(acts) > 1:
        out.append(("_act", acts))
    return out


# -- the gates -------------------------------------------------------------------------------

@contextmanager
def _buffers_kept(module: nn.Module):
    """Run a candidate on copies of the buffers of ``module`` (BatchNorm's running statistics), so
    that evaluating it neither changes them nor bumps the version of tensors autograd saved."""
    swapped = []
    for m in module.modules():
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = b.clone()
                swapped.append((m, name, b))
    try:
        yield
    finally:
        for m, name, b in swapped:
            m._buffers[name] = b


class GateGrad(torch.autograd.Function):
    """An exact zero the shape of the gated output, whose backward is ProxylessNAS's gate gradient.

    ``forward(x, evaluate, groups, shape, *probs)``: ``probs[f]`` are the gate probabilities of
    factor f and ``groups[f]`` the path index of each of its entries; returns zeros (an expanded
    scalar, no memory). ``backward(g)``: ∂L/∂p_f[j] = ⟨g, o_{groups[f][j]}⟩ with
    o_i = ``evaluate(i, x)`` computed under no_grad (each path once); autograd then multiplies by
    softmax's Jacobian, p_j(δ_ij − p_i). Only a backward that asks for α reaches this node.
    """

    @staticmethod
    def forward(ctx, x, evaluate, groups, shape, *probs):
        ctx.save_for_backward(x)
        ctx.evaluate, ctx.groups = evaluate, groups
        return x.new_zeros(()).expand(shape)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        flat = g.reshape(-1)
        dots: dict[int, torch.Tensor] = {}
        grads = []
        with torch.no_grad():
            for group in ctx.groups:
                for i in group:
                    if i not in dots:
                        dots[i] = torch.dot(flat, ctx.evaluate(i, x).reshape(-1))
                grads.append(torch.stack([dots[i] for i in group]))
        return (None, None, None, None, *grads)


class _AddZero(torch.autograd.Function):
    """``o + z`` for an exact zero ``z`` (from :class:`GateGrad`): returns ``o`` itself (an alias,
    no pass over the activations) and hands ``g`` to both."""

    @staticmethod
    def forward(ctx, o, z):
        return o.as_strided(o.shape, o.stride(), o.storage_offset())

    @staticmethod
    def backward(ctx, g):
        return g, g


def last_argmax(alpha: torch.Tensor) -> int:
    """The index of the largest α, ties to the last (the original candidate)."""
    a = alpha.detach()
    return int(a.numel() - 1 - torch.argmax(a.flip(0)))


class CandidateMix(nn.Module):
    """The binary-gated mixture of one unit's candidate paths (see the module docstring).

    ``paths`` are the candidates (modules sharing the graph's convolutions and normalisations) in
    C order over ``factors`` (the number of choices of each decision); ``forward(x, a0=α_0, ...)``
    takes one α per factor. ``mode``: ``"binary"`` (the method: sampled paths) or ``"full"``
    (every path weighted by its probability, as DARTS does: the memory benchmark's reference).
    """

    def __init__(self, paths: list[nn.Module], factors: tuple[int, ...], gate_paths: int = 1,
                 names: tuple[tuple[str, ...], ...] = (), params: tuple[str, ...] = ()):
        super().__init__()
        self.paths = nn.ModuleList(paths)
        self.factors = tuple(factors)
        self.gate_paths = gate_paths
        self.names, self.params = tuple(names), tuple(params)
        self.mode = "binary"
        self.pairs: dict[int, tuple[list[int], torch.Tensor]] = {}  # two-path draws, for the rescale
        self.latency_ms: list[float] | None = None

    def ravel(self, idx: list[int]) -> int:
        """The path index of one choice per factor (C order)."""
        out = 0
        for i, n in zip(idx, self.factors):
            out = out * n + i
        return out

    def run(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Path ``i`` on ``x`` (with autograd, as any module)."""
        return self.paths[i](x)

    def _evaluate(self, i: int, x: torch.Tensor) -> torch.Tensor:
        with _buffers_kept(self.paths[i]):
            return self.paths[i](x)

    def forward(self, x, **alphas):
        """Eval mode: the argmax path (ties to the original). Training: per factor one index drawn
        from softmax(α) (two with ``gate_paths=2``, one of them run), only that path runs, and
        the exact zero of :class:`GateGrad` carries α's gradient estimate."""
        alphas = [alphas[f"a{f}"] for f in range(len(self.factors))]
        if not self.training:
            return self.run(self.ravel([last_argmax(a) for a in alphas]), x)
        probs = [torch.softmax(a, 0) for a in alphas]
        if self.mode == "full":
            out = 0
            for i in range(len(self.paths)):
                w, rest = 1, i
                for f in range(len(self.factors) - 1, -1, -1):
                    w, rest = w * probs[f][rest % self.factors[f]], rest // self.factors[f]
                out = out + w * self.run(i, x)
            return out
        chosen, groups, gates = [], [], []
        for f, (a, p) in enumerate(zip(alphas, probs)):
            pd = p.detach()
            if self.gate_paths == 2 and int((pd > 0).sum()) >= 2:
                pair = torch.multinomial(pd, 2, replacement=False).tolist()
                q = torch.softmax(a[pair], 0)
                pick = pair[int(torch.multinomial(q.detach(), 1))]
                if a.requires_grad and torch.is_grad_enabled():
                    self.pairs[f] = (pair, a.detach()[pair].clone())
                chosen.append(pick)
                groups.append(pair)
                gates.append(q)
            else:
                chosen.append(int(torch.multinomial(pd, 1)))
                groups.append(list(range(self.factors[f])))
                gates.append(p)
        out = self.run(self.ravel(chosen), x)
        # softmax exactly one-hot everywhere (an architecture fixed by set_architecture): p_j(δ_ij − p_i)
        # is 0 for every i, so the gate gradient is 0 without evaluating any candidate
        fixed = all(float(p.detach().max()) == 1.0 for p in probs)
        if torch.is_grad_enabled() and any(a.requires_grad for a in alphas) and not fixed:
            paths = []
            for f, group in enumerate(groups):
                paths.append([self.ravel(chosen[:f] + [j] + chosen[f + 1:]) for j in group])
            z = GateGrad.apply(x.detach(), self._evaluate, paths, out.shape, *gates)
            out = _AddZero.apply(out, z)
        return out

    def extra_repr(self) -> str:
        return f"factors={self.factors}, gate_paths={self.gate_paths}, mode={self.mode}"


# -- the pass ----------------------------------------------------------------------------------

def _resized_conv(conv: nn.Conv2d, k: int) -> nn.Conv2d:
    """``conv`` with a k×k kernel: the weights zero-padded (or centre-cropped), stride, dilation,
    groups, bias and padding mode kept, padding grown by d·(k − k₀)/2 (the same output size)."""
    k0 = conv.kernel_size[0]
    if isinstance(conv.padding, str):
        padding = conv.padding if conv.padding == "same" else tuple(d * (k - k0) // 2 for d in conv.dilation)
    else:
        padding = tuple(p + d * (k - k0) // 2 for p, d in zip(conv.padding, conv.dilation))
    new = nn.Conv2d(conv.in_channels, conv.out_channels, k, conv.stride, padding, conv.dilation, conv.groups,
                    conv.bias is not None, conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        if k >= k0:
            o = (k - k0) // 2
            new.weight[:, :, o:o + k0, o:o + k0] = conv.weight
        else:
            o = (k0 - k) // 2
            new.weight.copy_(conv.weight[:, :, o:o + k, o:o + k])
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    new.train(conv.training)
    return new


class _Tensors(nn.Module):
    """Holds copies of the parameters and buffers a functional normalisation reads."""


def _copy_norm(graph: Graph, op: Op, holder_name: str, cands: nn.ModuleDict) -> Op:
    """A copy of a normalisation op with its own parameters and running statistics."""
    if op.kind == "call_module":
        cands[holder_name] = copy.deepcopy(fetch_attr(graph.root, op.target))
        return op.replace(target=f"{CAND_ROOT}.{holder_name}", meta={**op.meta, "name": holder_name})
    holder = _Tensors()
    cands[holder_name] = holder

    def swap(r):
        if isinstance(r, Op) and r.kind == "get_attr":
            t = fetch_attr(graph.root, r.target)
            name = r.target.replace(".", "_")
            if not hasattr(holder, name):
                if isinstance(t, nn.Parameter):
                    holder.register_parameter(name, nn.Parameter(t.detach().clone(), t.requires_grad))
                else:
                    holder.register_buffer(name, t.detach().clone())
            return r.replace(target=f"{CAND_ROOT}.{holder_name}.{name}")
        return r

    return op.replace(args=map_refs(op.args, swap), kwargs=map_refs(op.kwargs, swap),
                      meta={**op.meta, "name": holder_name})


def _path_module(graph: Graph, ops: tuple[Op, ...]) -> nn.Module:
    """A candidate path as a GraphModule over the graph root's own modules and parameters."""
    lw = Lowering(graph)
    x = lw.fx.placeholder("x")
    lw.fx.output(lw.path(ops, x))
    return fx.GraphModule(lw.attrs, lw.fx)


class CandidateOps(Pass):
    """Turn every unit of :func:`plan_units` into a binary-gated choice (see the module docstring).

    ``kernels``, ``activations``: the candidates; ``scope``: ``s`` | ``m`` | ``l`` | ``f``;
    ``combine``: ``separate`` (one α for the kernel, one for the activation) or ``product``
    (one α over the pairs); ``gate_paths``: 1 or 2 paths drawn per step.
    """

    def __init__(self, kernels=(3, 5, 7), activations=("relu", "leaky_relu", "mish", "hardswish"),
                 scope: str = "f", combine: str = "separate", gate_paths: int = 1):
        self.kernels, self.activations = check_candidates(kernels, activations)
        if scope not in SCOPES:
            raise UserInputError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
        if combine not in COMBINES:
            raise UserInputError(f"combine must be one of {', '.join(COMBINES)}, not {combine!r}")
        if gate_paths not in (1, 2):
            raise UserInputError(f"gate_paths must be 1 or 2, not {gate_paths!r}")
        self.scope, self.combine, self.gate_paths = scope, combine, gate_paths

    def run(self, graph: Graph) -> PassResult:
        """Replace each unit by a ``choice`` op lowered to a :class:`CandidateMix` in
        ``graph.root.archir_gates``, α in ``archir_alpha``, new kernels' modules in ``archir_cand``;
        label each edge with ``choices``, ``param`` and ``why``. Unmodified when no unit qualifies."""
        if hasattr(graph.root, ALPHA_ROOT):
            raise IRError("CandidateOps already ran on this graph (it has architecture logits α)")
        units = plan_units(graph, self.kernels, self.activations, self.scope)
        if not units:
            return PassResult(graph, False)
        alphas, gates, cands = nn.ParameterDict(), nn.ModuleDict(), nn.ModuleDict()
        graph.root.add_module(CAND_ROOT, cands)  # the lowering of candidate paths looks modules up here
        by_edge: dict[str, list[Unit]] = {}
        for u in units:
            by_edge.setdefault(u.edge, []).append(u)
        for eid, found in by_edge.items():
            e = graph.edges[eid]
            labels = []
            for u in reversed(found):  # from the back, so that earlier indices stay valid
                op, lab = self._unit_choice(graph, e.ops[u.start:u.end], u, alphas, gates, cands)
                e.ops = e.ops[:u.start] + [op] + e.ops[u.end:]
                labels.insert(0, lab)
            e.labels.update(choices=",".join(c for lab in labels for c in lab[0]),
                            param=",".join(p for lab in labels for p in lab[1]),
                            why="; ".join(lab[2] for lab in labels))
        graph.root.add_module(ALPHA_ROOT, alphas)
        graph.root.add_module(GATE_ROOT, gates)
        return PassResult(graph, True)

    def _unit_choice(self, graph, ops, u: Unit, alphas, gates, cands) -> tuple[Op, tuple]:
        conv_op = ops[0]
        conv = fetch_attr(graph.root, conv_op.target)
        per_kernel = {}  # kernel -> the unit's ops before the activation, with that kernel's modules
        body = list(ops[:-1] if u.act is not None else ops)
        for k in u.kernels:
            if k == u.kernel:
                per_kernel[k] = tuple(body)
                continue
            key = f"{u.name}_k{k}"
            cands[key] = _resized_conv(conv, k)
            new = list(body)
            new[0] = conv_op.replace(target=f"{CAND_ROOT}.{key}", meta={
                **conv_op.meta, "name": key, "flops": conv_op.meta.get("flops", 0) * k * k // (u.kernel ** 2)})
            if u.norm is not None:
                new[u.norm] = _copy_norm(graph, body[u.norm], f"{key}_norm", cands)
            per_kernel[k] = tuple(new)
        act_op = ops[-1] if u.act is not None else None
        paths = []
        for k in u.kernels:
            for a in u.acts:
                if a is None:
                    tail = ()
                elif a == u.act:
                    tail = (act_op,)
                else:
                    tail = (Op("call_function", ACTIVATIONS[a], (Input(),), {},
                               meta={**act_op.meta, "name": f"{u.name}_{a}", "flops": 0}),)
                paths.append(per_kernel[k] + tail)
        factors = factor_choices(u, self.combine)
        params = tuple(f"{u.name}{suffix}" for suffix, _ in factors)
        sizes = (u.size,) if self.combine == "product" else tuple(len(n) for _, n in factors)
        for p, n in zip(params, sizes):
            alphas[p] = nn.Parameter(torch.zeros(n))
        gates[u.name] = CandidateMix([_path_module(graph, p) for p in paths], sizes, self.gate_paths,
                                     names=tuple(n for _, n in factors), params=params)
        kwargs = {f"a{i}": Op("get_attr", f"{ALPHA_ROOT}.{p}") for i, p in enumerate(params)}
        flops = sum(o.meta.get("flops", 0) for o in ops)
        what = " and ".join(w for w, n in (("kernel", len(u.kernels)), ("activation", len(u.acts))) if n > 1)
        labels = ([n for _, names in factors for n in names], list(params),
                  f"conv {u.kernel}x{u.kernel}: {what} candidates (stage {u.stage + 1} of {u.stages})")
        return Op("choice", f"{GATE_ROOT}.{u.name}", tuple(paths), kwargs,
                  meta={"name": f"gate_{u.name}", "flops": flops, "out": ops[-1].meta.get("out"),
                        "lowering": LOWERING, "unit": u.name}), labels


def _lower_gate(lowering: Lowering, op: Op, inp, operands):
    """A gated choice: one call of its :class:`CandidateMix` on the input, α as keywords (the
    candidate paths run inside it, only the drawn ones)."""
    return lowering.fx.create_node("call_module", lowering.safe_target(op.target), (inp,),
                                   lowering.kwargs_of(op, inp, operands), name=op.meta.get("name"))


register_lowering(LOWERING, _lower_gate)


# -- reading the search space ------------------------------------------------------------------

def gate_ops(graph: Graph) -> list[tuple[str, Op, CandidateMix]]:
    """``(edge id, choice op, its CandidateMix)`` for every gated unit, in topological order."""
    out = []
    for e in graph.edges_in_order():
        for op in e.ops:
            if op.kind == "choice" and op.meta.get("lowering") == LOWERING:
                out.append((e.id, op, fetch_attr(graph.root, op.target)))
    return out


def alpha_parameters(graph: Graph) -> list[nn.Parameter]:
    """The α logits :class:`CandidateOps` added (empty if none)."""
    alphas = getattr(graph.root, ALPHA_ROOT, None)
    return list(alphas.values()) if alphas is not None else []


def alpha_of(graph: Graph, name: str) -> nn.Parameter:
    return getattr(graph.root, ALPHA_ROOT)[name]


def unit_weights(graph: Graph) -> dict[str, dict[str, float]]:
    """``{unit: {choice: softmax(α)}}`` (both factors' choices in one dict in the separate form)."""
    out = {}
    for _, op, mix in gate_ops(graph):
        w = {}
        for p, names in zip(mix.params, mix.names):
            w.update(zip(names, torch.softmax(alpha_of(graph, p).detach().float().cpu(), 0).tolist()))
        out[op.meta["unit"]] = w
    return out


def rescale_pairs(graph: Graph) -> None:
    """After an α step with two-path gates: shift the two drawn α so that log Σ_pair e^α is what it
    was before the step (the other candidates' probabilities unchanged; ProxylessNAS)."""
    for _, _, mix in gate_ops(graph):
        for f, (pair, old) in mix.pairs.items():
            a = alpha_of(graph, mix.params[f])
            new = a.detach()[pair]
            a.data[pair] += torch.logsumexp(old, 0) - torch.logsumexp(new, 0)
        mix.pairs.clear()


def _onnx_runner(path: nn.Module, x: torch.Tensor):
    """``path`` exported to ONNX (TorchScript exporter: fast, enough for timing) and a function
    running it in ONNX Runtime (CUDA where available, else CPU)."""
    import tempfile
    import warnings

    from archir.backends.onnx_export import ort_session

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = f"{tmp}/path.onnx"
        torch.onnx.export(path, (x,), f, dynamo=False, input_names=["x"], do_constant_folding=True)
        session = ort_session(f)
    feed = {"x": x.detach().cpu().numpy()}
    return lambda: session.run(None, feed)


@torch.no_grad()
def measure_latency(mix: CandidateMix, in_shape: tuple[int, ...], repeats: int = 10,
                    target: str = "torch") -> list[float]:
    """Each path's latency in milliseconds (median of ``repeats`` runs after 2 warm-up runs,
    batch 1, eval mode), with torch on the device of its parameters (``target="torch"``) or with
    ONNX Runtime (``"onnx"``); measured once and cached on ``mix``."""
    if mix.latency_ms is None:
        p = next(mix.parameters())
        x = torch.randn((1, *in_shape[1:]), device=p.device, dtype=p.dtype)
        cuda = p.device.type == "cuda" and target == "torch"
        out = []
        for path in mix.paths:
            was = path.training
            path.eval()
            run = _onnx_runner(path, x) if target == "onnx" else (lambda path=path: path(x))
            for _ in range(2):
                run()
            times = []
            for _ in range(repeats):
                if cuda:
                    torch.cuda.synchronize()
                t = time.perf_counter()
                run()
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            path.train(was)
            out.append(1e3 * sorted(times)[len(times) // 2])
        mix.latency_ms = out
    return mix.latency_ms


def expected_latency(graph: Graph, target: str = "torch") -> torch.Tensor | None:
    """E[latency] = Σ_units Σ_paths P(path)·lat(path) in ms, differentiable in α (P the product of
    the factors' softmax probabilities); None without gated units."""
    total = None
    for eid, op, mix in gate_ops(graph):
        e = graph.edges[eid]
        idx = e.ops.index(op)
        in_meta = e.in_meta if idx == 0 else e.ops[idx - 1].meta.get("out")
        lat = measure_latency(mix, in_meta.shape, target=target)
        probs = [torch.softmax(alpha_of(graph, p), 0) for p in mix.params]
        joint = probs[0]
        for q in probs[1:]:
            joint = torch.outer(joint, q).reshape(-1)
        term = (joint * torch.tensor(lat, device=joint.device, dtype=joint.dtype)).sum()
        total = term if total is None else total + term
    return total


class DeriveCandidates(Pass):
    """Fix each gated unit to its argmax path (ties to the original); label each edge with
    ``decision`` (the chosen names, comma-joined), ``changed`` and ``weights``. ``fixed``:
    optional ``{decision: choice}`` imposed instead of the argmax. ``margin``: a candidate
    replaces the original only if its probability softmax(α) exceeds the original's by more
    than this (after a short search α is still near uniform, and a bare argmax would pick
    candidates by noise)."""

    def __init__(self, fixed: dict[str, str] | None = None, margin: float = 0.0):
        self.fixed = fixed or {}
        self.margin = margin

    def run(self, graph: Graph) -> PassResult:
        weights = unit_weights(graph)
        modified = False
        for e in graph.edges.values():
            picked, changed = [], False
            new_ops = []
            for op in e.ops:
                if not (op.kind == "choice" and op.meta.get("lowering") == LOWERING):
                    new_ops.append(op)
                    continue
                mix = fetch_attr(graph.root, op.target)
                idx = []
                for p, names in zip(mix.params, mix.names):
                    i = names.index(self.fixed[p]) if p in self.fixed else self._pick(alpha_of(graph, p))
                    idx.append(i)
                    picked.append(names[i])
                    changed |= i != len(names) - 1
                new_ops.extend(op.args[mix.ravel(idx)])
                modified = True
            if picked:
                e.ops = new_ops
                unit_w = {c: round(w, 6) for u, ws in weights.items() if u == e.id or u.startswith(e.id + "_")
                          for c, w in ws.items()}
                e.labels.update(decision=",".join(picked), changed=changed, weights=unit_w)
        return PassResult(graph, modified)

    def _pick(self, alpha: torch.Tensor) -> int:
        """The argmax of α, or the original (the last) unless the argmax's probability beats it by
        more than ``margin``."""
        i = last_argmax(alpha)
        if self.margin > 0:
            prob = torch.softmax(alpha.detach().float(), 0)
            if float(prob[i] - prob[-1]) <= self.margin:
                return alpha.numel() - 1
        return i


def set_alphas(graph: Graph, architecture: dict[str, str], value: float = -1e4) -> None:
    """α one-hot-like at ``architecture`` (``{decision: choice}``): 0 for the choice, ``value`` for
    the others, so softmax(α) is exactly one-hot in float32 (e^-1e4 underflows to 0): every gate
    draws that choice and the argmax (derive, eval) is it."""
    spaces = {p: names for _, _, mix in gate_ops(graph) for p, names in zip(mix.params, mix.names)}
    missing = sorted(set(spaces) - set(architecture))
    unknown = sorted(set(architecture) - set(spaces))
    if missing or unknown:
        raise UserInputError(f"architecture must name every decision exactly once: missing {missing}, unknown "
                             f"{unknown}")
    with torch.no_grad():
        for p, choice in architecture.items():
            names = spaces[p]
            if choice not in names:
                raise UserInputError(f"decision {p}: {choice!r} is not one of {', '.join(names)}")
            a = alpha_of(graph, p)
            a.fill_(value)
            a[names.index(choice)] = 0.0


__all__ = [
    "ACTIVATIONS",
    "COMBINES",
    "SCOPES",
    "CandidateMix",
    "CandidateOps",
    "DeriveCandidates",
    "GateGrad",
    "Unit",
    "alpha_parameters",
    "expected_latency",
    "gate_ops",
    "plan_units",
    "rescale_pairs",
    "set_alphas",
    "unit_weights",
]
