"""Pass infrastructure: a pass rewrites a graph and says truthfully whether it changed it.

Modelled on torch.fx's ``PassResult`` and onnx_ir's pass manager: a pass's promise is checked,
not hoped for (a pass that changed the root module's modules, parameters or buffers but reports
``modified=False`` raises), and :class:`PassManager` names the failing pass and the passes run
before it for any exception raised inside a pass, and for an invariant that a pass broke
(``Graph.verify()`` after each pass). Printing, timing or collecting labels after a pass are
*instruments* (after TVM): callables given to the manager, not code inside the passes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from archir.errors import ArchirError, IRError
from archir.ir import Graph


@dataclass
class PassResult:
    graph: Graph
    modified: bool


class PassError(RuntimeError):
    """A pass raised an unexpected exception (a bug, not a user error); says which pass."""


def _root_state(graph: Graph) -> frozenset:
    root = graph.root
    return frozenset(
        [("m", n, id(m)) for n, m in root.named_modules()]
        + [("p", n, id(p)) for n, p in root.named_parameters(remove_duplicate=False)]
        + [("b", n, id(b)) for n, b in root.named_buffers(remove_duplicate=False)])


class Pass:
    """Subclasses implement :meth:`run`; calling the pass runs it (in place on ``graph``)."""

    name: str = ""

    def run(self, graph: Graph) -> PassResult:  # pragma: no cover - interface
        """Rewrite ``graph`` in place; return it with ``modified`` true iff anything changed."""
        raise NotImplementedError

    def __call__(self, graph: Graph) -> PassResult:
        before = _root_state(graph)
        result = self.run(graph)
        if not isinstance(result, PassResult):
            raise TypeError(f"pass {self.pass_name} returned {type(result).__name__}, not PassResult")
        if not result.modified and _root_state(result.graph) != before:
            raise IRError(f"pass {self.pass_name} changed the root module's modules, parameters or buffers "
                          "but reported modified=False")
        if result.modified:
            result.graph.invalidate_costs()
        return result

    @property
    def pass_name(self) -> str:
        return self.name or type(self).__name__


Instrument = Callable[[Pass, Graph], None]


class PassManager:
    """Run passes in order; with ``verify=True`` check the graph after each one and call each
    instrument with ``(pass, graph)``."""

    def __init__(self, passes: Iterable[Pass], *, verify: bool = True, instruments: Iterable[Instrument] = ()):
        self.passes = list(passes)
        self.verify = verify
        self.instruments = list(instruments)

    def __call__(self, graph: Graph) -> PassResult:
        modified, done = False, []
        for p in self.passes:
            done.append(p.pass_name)
            where = f"pass {p.pass_name} (passes run: {', '.join(done)})"
            try:
                result = p(graph)
            except ArchirError as exc:
                raise type(exc)(f"in {where}: {exc}") from exc
            except Exception as exc:  # noqa: BLE001 - any failure names the pass chain
                raise PassError(f"in {where}: {type(exc).__name__}: {exc}") from exc
            graph, modified = result.graph, modified or result.modified
            if self.verify:
                try:
                    graph.verify()
                except IRError as exc:
                    raise IRError(f"after {where}: {exc}") from exc
            for instrument in self.instruments:
                instrument(p, graph)
        return PassResult(graph, modified)
