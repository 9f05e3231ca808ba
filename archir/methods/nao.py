"""NAO: Neural Architecture Optimization with shared weights (Luo et al., NAO-WS), over any method's choices.

NAO does not build a search space of its own: ``space`` (default ``dnat``) names the method whose
search passes do, and NAO reads that method's discrete choices only through the
:class:`~archir.methods.Method` interface (``choice_space``, ``original_architecture``,
``set_architecture``, ``forbidden_choices``, ``canonical_architecture``). So the same NAO runs on
DNAT's none / identity / same edges or on any other method with discrete choices.

The pipeline (``archir transform --method nao``):

1. **Supernet training with uniform random paths** (the architecture stage): before every
   training-mode forward pass a forward pre-hook draws a valid architecture uniformly
   (:meth:`TokenSpace.sample`) and fixes the supernet to it (``set_architecture``: DNAT's θ
   one-hot); the space's architecture parameters are frozen (no gradient, no optimiser) and
   only the shared weights ω train. In eval mode the supernet computes the current architecture
   (the original until NAO has chosen), so the per-epoch validation line is the original's.
   The suggested defaults (``default_options``) are ``--arch-update split --split-fraction 0.1``:
   ω trains on 90% of the training set and the other 10% is NAO's validation split.
2. **NAO** (:func:`nao_search`, from :meth:`NAO.choose_architecture` before derive): evaluate
   ``initial`` architectures (the original and uniform random ones) with the shared weights
   (:class:`archir.arch_eval.ArchEvaluator`: BatchNorm statistics re-estimated on training
   batches first, then the task's metric on the held-out split; higher is better, whatever the
   metric); then for ``rounds`` rounds: train the encoder-predictor-decoder
   (:mod:`archir.methods._nao_model`, loss λ·L_pp + (1 − λ)·L_rec, λ = ``trade_off``) on every
   (architecture, score) pair so far plus up to ``equivalents`` equivalent architectures of each
   (NAO's symmetric augmentation: architectures with the same canonical form, e.g. DNAT's
   decisions whose edges are all pruned as dead code; a space without symmetries adds none),
   take the ``top_k`` best as seeds, move each embedding along the predictor's gradient
   (e' = e + η ∂f/∂e, η growing by 25% from ``step`` until the decoded architecture is new), decode,
   evaluate. The best architecture scored is fixed in the supernet.

   Choices of ours where the paper (or the text of it we have) says nothing: the encoder-decoder
   is trained afresh each round on all pairs so far; the gradient is taken per architecture and
   scaled to the embedding's norm, so that η is a fraction of the embedding whatever the
   predictor's slope; where fewer than ``top_k`` seeds decode to new architectures, the next best
   architectures are stepped too, so each round scores ``top_k`` (fewer only when no more are
   found). Proxyless's kernels and activations have no symmetries: nothing is augmented there.
3. Derive (the space's derive passes after fixing the chosen architecture), prune, fold; the
   network stage; the backends.

With ``epochs=0`` (or no data) nothing is searched: the original architecture comes back.
Evaluation budget: ``initial + rounds · top_k`` architectures at most (a round may find fewer
new ones). :func:`random_search` is the control with the same budget.
"""
from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from archir.errors import UserInputError
from archir.options import option
from archir.passes.base import Pass, PassResult

from . import Method, create, register
from ._nao_model import (
    NAOModel,
    TokenSpace,
    normalise_scores,
    reconstruction_accuracy,
    train_nao,
)

ScoreFn = Callable[[list[dict]], list[float]]


# -- the search strategies (on any TokenSpace and any score) ----------------------------------

def _best(history: list[dict]) -> dict:
    return max(history, key=lambda h: h["score"])  # first of equals: the original wins ties


def random_search(space: TokenSpace, score: ScoreFn, budget: int, seed: int = 0,
                  original: dict | None = None) -> dict[str, Any]:
    """``budget`` distinct architectures (``original`` first when given, then uniform random ones),
    each scored once; returns ``{"best", "best_score", "history"}``."""
    rng = random.Random(seed)
    archs, seen = [], set()
    if original is not None:
        archs.append(dict(original))
        seen.add(space.key(original))
    tries = 0
    while len(archs) < min(budget, space.size()) and tries < 100 * budget:
        a = space.sample(rng)
        tries += 1
        if space.key(a) not in seen:
            seen.add(space.key(a))
            archs.append(a)
    history = [{"arch": a, "score": s, "round": 0} for a, s in zip(archs, score(archs))]
    best = _best(history)
    return {"best": best["arch"], "best_score": best["score"], "history": history}


def nao_search(space: TokenSpace, score: ScoreFn, *, initial: int = 24, rounds: int = 3, top_k: int = 8,
               trade_off: float = 0.8, nao_epochs: int = 200, step: float = 0.05, augment: int = 4,
               hidden: int = 64, embed: int = 32, lr: float = 5e-3, seed: int = 0, original: dict | None = None,
               log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """NAO's loop (see the module docstring) on ``space``, scoring with ``score`` (a list of
    architectures → their scores, higher is better). Returns ``{"best", "best_score",
    "history": [{"arch", "score", "round"}], "rounds": [per-round NAO losses, reconstruction,
    new architectures]}``; the evaluation budget is ``initial + rounds * top_k`` at most. Seeded by
    ``seed`` alone; torch's global random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        return _nao_search(space, score, initial=initial, rounds=rounds, top_k=top_k, trade_off=trade_off,
                           nao_epochs=nao_epochs, step=step, augment=augment, hidden=hidden, embed=embed, lr=lr,
                           seed=seed, original=original, log=log)


def _nao_search(space, score, *, initial, rounds, top_k, trade_off, nao_epochs, step, augment, hidden, embed, lr,
                seed, original, log):
    start = random_search(space, score, initial, seed=seed, original=original)
    history = start["history"]
    seen = {tuple(space.encode(h["arch"])) for h in history}
    rounds_log = []
    rng = random.Random(seed + 1)
    equivalents: dict[tuple, list[dict]] = {}
    for r in range(1, rounds + 1):
        torch.manual_seed(seed * 1000 + r)
        archs = [h["arch"] for h in history]
        targets = normalise_scores([h["score"] for h in history])
        rows, ys = [], []
        for a, y in zip(archs, targets.tolist()):
            rows.append(space.encode(a))
            ys.append(y)
            k = space.key(a)
            if k not in equivalents:
                equivalents[k] = space.equivalents(a, augment, rng)
            for b in equivalents[k]:
                rows.append(space.encode(b))
                ys.append(y)
        tokens = torch.tensor(rows, dtype=torch.long)
        model = NAOModel(space, embed=embed, hidden=hidden)
        losses = train_nao(model, tokens, torch.tensor(ys), epochs=nao_epochs, trade_off=trade_off, lr=lr,
                           seed=seed * 1000 + r)
        order = sorted(range(len(history)), key=lambda i: -history[i]["score"])
        new = []
        for first in range(0, len(order), top_k):  # the next best seeds while fewer than top_k are new
            chunk = order[first:first + top_k]
            seeds = torch.tensor([space.encode(history[i]["arch"]) for i in chunk], dtype=torch.long)
            for row in model.improve(seeds, step, seen):
                if row is not None and len(new) < top_k:
                    seen.add(tuple(row))
                    new.append(space.decode(row))
            if len(new) >= top_k:
                break
        scores = score(new) if new else []
        history += [{"arch": a, "score": s, "round": r} for a, s in zip(new, scores)]
        entry = {"round": r, "pairs": len(rows), "augmented": len(rows) - len(archs), **losses,
                 "reconstruction": reconstruction_accuracy(model, tokens), "new": len(new),
                 "best_new": max(scores) if scores else None, "best_so_far": _best(history)["score"]}
        rounds_log.append(entry)
        if log is not None:
            log(f"[nao] round {r}/{rounds}: {len(new)} new architectures, best new "
                f"{entry['best_new'] if scores else 'n/a'}, best so far {entry['best_so_far']:.4g} "
                f"(predictor mse {losses['l_pp']:.3g}, reconstruction {entry['reconstruction']:.1%})")
    best = _best(history)
    return {"best": best["arch"], "best_score": best["score"], "history": history, "rounds": rounds_log}


# -- the method ------------------------------------------------------------------------------

def _parse_space_options(method: str, text: str) -> dict[str, Any]:
    """``"share=full,form=linear"`` → typed keyword options of ``method`` (by its fields' defaults)."""
    fields = {f.name: f for f in dataclasses.fields(create(method).Options)}
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in fields:
            raise UserInputError(f"--space-options: {item!r} is not NAME=VALUE with NAME an option of {method} "
                                 f"({', '.join(fields) or 'none'})")
        default, value = fields[name].default, value.strip()
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise UserInputError(f"--space-options: {name} wants true or false, not {value!r}")
            out[name] = value.lower() in ("true", "1", "yes")
        elif isinstance(default, (int, float)):
            try:
                out[name] = type(default)(value)
            except ValueError:
                raise UserInputError(f"--space-options: {name} wants a {type(default).__name__}, not {value!r}") from None
        else:
            out[name] = None if value.lower() == "none" and default is None else value
    return out


@dataclass
class NAOOptions:
    space: str = option("dnat", "The method whose search passes build the choices NAO searches (any method "
                        "with discrete choices: dnat, proxyless).")
    share: str = option("full", "Passed to the space method: full (one decision per edge; the default, since "
                        "DNAT's cell-shared ResNet20 space has only 50 architectures) or cell.",
                        choices=("cell", "full"))
    space_options: str = option("", "Other options of the space method, NAME=VALUE[,NAME=VALUE] "
                                "(e.g. search_activations=true).")
    initial: int = option(24, "Architectures evaluated before the first NAO round (the original and random "
                          "ones).", minimum=1)
    rounds: int = option(3, "NAO rounds (train NAO, step the top-k embeddings, decode, evaluate).", minimum=0)
    top_k: int = option(8, "New architectures per round, stepped from the best ones so far (the next best "
                        "step in while fewer are new).", minimum=1)
    trade_off: float = option(0.8, "λ of NAO's loss λ·L_pp + (1-λ)·L_rec.", minimum=0.0, maximum=1.0)
    nao_epochs: int = option(200, "Training epochs of the encoder-predictor-decoder per round.", minimum=1)
    step: float = option(0.05, "First step size η in the embedding, relative to its norm (raised by 25% until the decoding is new).",
                         minimum=0.0)
    equivalents: int = option(4, "Equivalent architectures added per scored one to NAO's training pairs "
                              "(symmetric augmentation; 0: off).", minimum=0)
    eval_batches: int | None = option(None, "Held-out batches per evaluation (default: all of NAO's "
                                      "validation split).", minimum=1)
    calibration_batches: int = option(4, "Training batches to re-estimate BatchNorm statistics before each "
                                      "evaluation.", minimum=0)


class _FixArchitecture(Pass):
    """Fix the supernet to NAO's current architecture (θ values only) before the space's derive passes."""

    name = "FixArchitecture"

    def __init__(self, method: NAO):
        self.method = method

    def run(self, graph):
        self.method.space.set_architecture(graph, self.method.current)
        return PassResult(graph, False)


@register
class NAO(Method):
    """NAO-WS as a :class:`Method` (see the module docstring)."""

    name = "nao"
    summary = ("NAO with shared weights: random-path supernet, then encoder / predictor / decoder search over "
               "another method's choices (--space)")
    Options = NAOOptions
    default_options = {"arch_update": "split", "split_fraction": 0.1}

    def __init__(self, options=None):
        super().__init__(options)
        o = self.options
        if o.space == self.name:
            raise UserInputError("--space nao: NAO needs another method's choices (e.g. --space dnat)")
        space_opts = _parse_space_options(o.space, o.space_options)
        if "share" in {f.name for f in dataclasses.fields(create(o.space).Options)}:
            space_opts.setdefault("share", o.share)
        self.space: Method = create(o.space, **space_opts)
        self.tokens: TokenSpace | None = None
        self.current: dict[str, str] = {}
        self.sampling = False
        self.training_steps = 0
        self.chosen: dict[str, str] | None = None  # the architecture fixed at derive
        self.search_log: dict | None = None  # what the search did (report.json's architecture_search)
        self._graph = None
        self._rng = random.Random(0)

    # -- the space, through the discrete-choice interface -----------------------------------
    def search_passes(self):
        """The space method's search passes."""
        return self.space.search_passes()

    def arch_parameters(self, graph):
        """None: the space's architecture parameters are set by NAO, never trained."""
        return []

    def arch_weights(self, graph):
        """The space's weights of the current architecture (one-hot: NAO's decisions)."""
        if self.current:
            self.space.set_architecture(graph, self.current)
        return self.space.arch_weights(graph)

    def choice_space(self, graph):
        return self.space.choice_space(graph)

    def original_architecture(self, graph):
        return self.space.original_architecture(graph)

    def set_architecture(self, graph, architecture):
        self.space.set_architecture(graph, architecture)
        self.current = dict(architecture)

    def forbidden_choices(self, graph):
        return self.space.forbidden_choices(graph)

    def canonical_architecture(self, graph, architecture):
        return self.space.canonical_architecture(graph, architecture)

    def derive_passes(self):
        """Fix the chosen architecture, then the space's derive passes."""
        return [_FixArchitecture(self)] + self.space.derive_passes()

    def searchable(self, graph):
        return self.space.searchable(graph)

    def candidates(self, graph):
        return self.space.candidates(graph)

    # -- random paths ------------------------------------------------------------------------
    def on_supernet(self, graph, supernet):
        """Build the token space, freeze the space's architecture parameters, and install the
        random-path pre-hook on ``supernet``."""
        self._graph = graph
        self.tokens = TokenSpace(self.space.choice_space(graph), self.space.forbidden_choices(graph),
                                 lambda a: self.space.canonical_architecture(graph, a))
        for p in self.space.arch_parameters(graph):
            p.requires_grad_(False)
        self.current = self.space.original_architecture(graph)
        self.space.set_architecture(graph, self.current)
        self._rng = random.Random(torch.initial_seed())
        self.sampling = True
        supernet.register_forward_pre_hook(self._pre_forward)

    def _pre_forward(self, module, args):
        if not self.sampling:
            return
        if module.training:
            self.training_steps += 1
            self.space.set_architecture(self._graph, self.tokens.sample(self._rng))
        else:
            self.space.set_architecture(self._graph, self.current)

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What a resumed run needs: the architecture chosen at derive (None before), the training
        steps so far and the random-path generator (so a resumed search draws the same paths)."""
        version, internal, gauss = self._rng.getstate()
        return {"chosen": dict(self.chosen) if self.chosen is not None else None, "log": self.search_log,
                "training_steps": self.training_steps, "rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`: a run resumed after derive re-derives the chosen architecture
        instead of searching again."""
        self.chosen = dict(state["chosen"]) if state.get("chosen") is not None else None
        self.search_log = state.get("log")
        self.training_steps = int(state.get("training_steps", 0))
        if state.get("rng") is not None:
            version, internal, gauss = state["rng"]
            self._rng.setstate((version, tuple(internal), gauss))

    # -- the search ----------------------------------------------------------------------------
    def choose_architecture(self, graph, supernet, evaluator):
        """Run :func:`nao_search` with ``evaluator`` on the supernet (nothing without an evaluator
        or before any training step: the original stays) and fix the best architecture; a run
        resumed after derive fixes the architecture its checkpoint recorded."""
        self.sampling = False
        if self.chosen is not None:
            self.set_architecture(graph, self.chosen)
            return self.search_log
        if evaluator is None or self.training_steps == 0 or self.tokens is None:
            self.set_architecture(graph, self.current or self.space.original_architecture(graph))
            return None
        o = self.options
        if hasattr(evaluator, "configure"):
            evaluator.configure(max_batches=o.eval_batches, calibration_batches=o.calibration_batches)
        original = self.space.original_architecture(graph)
        say = getattr(evaluator, "log", None) or (lambda line: None)
        t0 = time.perf_counter()

        def score(archs):
            out = []
            for a in archs:
                self.space.set_architecture(graph, a)
                out.append(evaluator.score(supernet))
            return out

        seed = int(torch.initial_seed() % 2**31)
        result = nao_search(self.tokens, score, initial=o.initial, rounds=o.rounds, top_k=o.top_k,
                            trade_off=o.trade_off, nao_epochs=o.nao_epochs, step=o.step, augment=o.equivalents,
                            seed=seed, original=original, log=say)
        self.set_architecture(graph, result["best"])
        self.chosen = dict(result["best"])
        evaluator.recalibrate(supernet)  # the network stage starts from the chosen path's statistics
        orig_score = result["history"][0]["score"]
        changed = sorted(d for d, c in result["best"].items() if c != original[d])
        say(f"[nao] {len(result['history'])} architectures scored on {evaluator.metric_name}: best "
             f"{result['best_score']:.4g} (original {orig_score:.4g}), {len(changed)} decisions changed")
        self.search_log = {
            "strategy": "nao", "evaluator": evaluator.describe(), "space": self.space.describe(),
            "architectures": self.tokens.size(), "evaluations": len(result["history"]),
            "best": result["best"], "best_score": result["best_score"], "original_score": orig_score,
            "changed_decisions": changed, "rounds": result["rounds"],
            "scores": [{"round": h["round"], "score": h["score"]} for h in result["history"]],
            "seconds": time.perf_counter() - t0}
        return self.search_log


__all__ = ["NAO", "NAOOptions", "TokenSpace", "nao_search", "random_search"]
