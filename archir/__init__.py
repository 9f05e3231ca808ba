"""archir: a graph-IR model transformation compiler for PyTorch."""
from .errors import ArchirError, IRError, TraceError, UserInputError
from .ir import Combine, Edge, Graph, Junction, Op, TensorMeta

__version__ = "0.1.0"


def trace(model, example_inputs, granularity: str = "layer", **kwargs) -> Graph:
    """Trace ``model`` on ``example_inputs`` into an archir :class:`Graph` (see ``archir.frontends``)."""
    from archir.frontends import trace as _trace

    return _trace(model, example_inputs, granularity, **kwargs)


__all__ = ["ArchirError", "IRError", "TraceError", "UserInputError", "Graph", "Edge", "Junction",
           "Combine", "Op", "TensorMeta", "trace", "__version__"]
