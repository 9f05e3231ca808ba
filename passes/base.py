"""Pass infrastructure: a pass rewrites a graph and says truthfully whether it changed it.

Modelled on torch.fx's ``PassResult`` and onnx_ir's pass manager: :class:`PassManager` can run
``Graph.verify()`` after every pass and, when a pass breaks an invariant, names that pass and the
ones that ran before it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from archir.errors import IRError
from archir.ir import Graph


@dataclass
class PassResult:
    graph: Graph
    modified: bool


class Pass:
    """Subclasses implement :meth:`run`; calling the pass runs it (in place on ``graph``)."""

    name: str = ""

    def run(self, graph: Graph) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, graph: Graph) -> PassResult:
        result = self.run(graph)
        if not isinstance(result, PassResult):
            raise TypeError(f"pass {self.pass_name} returned {type(result).__name__}, not PassResult")
        if result.modified:
            result.graph.invalidate_costs()
        return result

    @property
    def pass_name(self) -> str:
        return self.name or type(self).__name__


class PassManager:
    """Run passes in order; with ``verify=True`` check the graph after each one."""

    def __init__(self, passes: Iterable[Pass], *, verify: bool = True):
        self.passes = list(passes)
        self.verify = verify

    def __call__(self, graph: Graph) -> PassResult:
        modified, done = False, []
        for p in self.passes:
            result = p(graph)
            graph, modified = result.graph, modified or result.modified
            done.append(p.pass_name)
            if self.verify:
                try:
                    graph.verify()
                except IRError as exc:
                    raise IRError(f"after pass {p.pass_name} (passes run: {', '.join(done)}): {exc}") from exc
        return PassResult(graph, modified)
