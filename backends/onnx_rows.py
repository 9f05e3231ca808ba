"""A verdict on outputs whose rows are a ranked set: detections in another order at near-tied scores.

A detector returns, per image, a dict of tensors that share their first axis, one row per
detection (``boxes`` N x 4, ``labels`` N, ``scores`` N, ``masks``, ``keypoints``), sorted by score.
Where two scores are closer than float32's own rounding error (random weights give many such
near-ties), ONNX Runtime and PyTorch may each sort them the other way; comparing row ``i`` with
row ``i`` then compares two different detections, and the verification fails on a correct model
(torchvision's Keypoint R-CNN: rows 27 and 28 of an image, scores 1.6e-6 apart, swapped; boxes
and keypoints "off" by 153 px).

:func:`reordered_rows` looks for a permutation ``π`` of the rows such that, for every output
``k`` of the group, with ``tol_k = atol + rtol * max_i |ref_k,i|`` (the first check's tolerance),

    max |got_k[r] - ref_k[π(r)]| <= tol_k                 (every output, row for row)
    |ref_s[r] - ref_s[π(r)]| <= tol_s                      (the ranking key: a near-tie)

where ``s`` is the group's one-dimensional floating output (the scores). The second condition
means a row may only move among rows PyTorch itself scores alike within tolerance: a set
that is right but ranked wrong (or rows from elsewhere) still fails. The permutation is a
maximum bipartite matching (Hopcroft-Karp, networkx) over the pairs allowed by the key, so
costly outputs (masks) are compared only for those pairs.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Reordered:
    """Rows of one group matched in another order: ``moved`` rows (of ``rows``) and, per output,
    its largest error after the reordering."""

    group: str
    key: str
    rows: int
    moved: int
    max_abs_err: dict[str, float]

    def detail(self) -> str:
        return (f"the same {self.rows} rows of {self.group} as PyTorch's, {self.moved} of them in another order "
                f"(near-tied {self.key}, within tolerance of each other: each runtime ranks such ties its own way)")


def _groups(names: Sequence[str], arrays: Sequence[np.ndarray]) -> dict[str, list[int]]:
    """Outputs that are items of one dict or list (``output_1.boxes``, ``output_1.scores``) and
    share a first axis of at least 2 rows, by their common prefix."""
    out: dict[str, list[int]] = {}
    for i, (name, a) in enumerate(zip(names, arrays)):
        prefix = name.rpartition(".")[0]
        if prefix and a.ndim >= 1 and a.shape[0] >= 2:
            out.setdefault(f"{prefix}@{a.shape[0]}", []).append(i)
    return out


def _tolerance(ref: np.ndarray, rtol: float, atol: float) -> float:
    finite = np.abs(ref[np.isfinite(ref)]) if np.issubdtype(ref.dtype, np.floating) else np.abs(ref)
    return atol + rtol * (float(finite.max()) if finite.size else 0.0)


def _row_err(got: np.ndarray, ref: np.ndarray) -> float:
    if got.shape != ref.shape:
        return np.inf
    d = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    return float(d.max()) if d.size else 0.0


def reordered_rows(names: Sequence[str], got: Sequence[np.ndarray], ref: Sequence[np.ndarray], failed: set[str],
                   rtol: float, atol: float) -> list[Reordered]:
    """For each group of outputs (module docstring) with a failed output in ``failed``: the
    reordering that matches ONNX Runtime's rows ``got`` to PyTorch's ``ref``, where there is one."""
    import networkx as nx

    found = []
    for key, members in _groups(names, ref).items():
        if not any(names[i] in failed for i in members):
            continue
        if any(got[i].shape != ref[i].shape for i in members):
            continue
        keys = [i for i in members if ref[i].ndim == 1 and np.issubdtype(ref[i].dtype, np.floating)]
        if len(keys) != 1:
            continue  # no ranking key to bound the ties by
        s = keys[0]
        tol = {i: _tolerance(ref[i], rtol, atol) for i in members}
        n = ref[s].shape[0]
        graph = nx.Graph()
        graph.add_nodes_from(("onnx", r) for r in range(n))
        graph.add_nodes_from(("torch", c) for c in range(n))
        for r in range(n):
            near = np.flatnonzero(np.abs(ref[s].astype(np.float64) - float(ref[s][r])) <= tol[s])
            for c in near:
                if all(_row_err(got[i][r], ref[i][c]) <= tol[i] for i in members):
                    graph.add_edge(("onnx", r), ("torch", int(c)))
        matching = nx.bipartite.hopcroft_karp_matching(graph, top_nodes=[("onnx", r) for r in range(n)])
        if sum(1 for node in matching if node[0] == "onnx") != n:
            continue
        order = np.array([matching[("onnx", r)][1] for r in range(n)])
        errs = {names[i]: _row_err(got[i], ref[i][order]) for i in members}
        found.append(Reordered(group=names[members[0]].rpartition(".")[0], key=names[s].rpartition(".")[2],
                               rows=n, moved=int((order != np.arange(n)).sum()), max_abs_err=errs))
    return found
