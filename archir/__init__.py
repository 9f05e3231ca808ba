"""archir: a graph-IR model transformation compiler for PyTorch."""
from .errors import ArchirError, IRError, TraceError, UserInputError
from .ir import Combine, Edge, Graph, Junction, Op, TensorMeta
from .task import Task, make_task

__version__ = "0.1.0"


def trace(model, example_inputs, granularity: str = "layer", **kwargs) -> Graph:
    """Trace ``model`` on ``example_inputs`` into an archir :class:`Graph` (see ``archir.frontends``)."""
    from archir.frontends import trace as _trace

    return _trace(model, example_inputs, granularity, **kwargs)


def search(model, example_inputs, method: str = "dnat", **options):
    """Build ``method``'s search space over ``model`` for your own training loop; returns a
    :class:`archir.search_space.Search` (``.supernet``, ``.arch_parameters()``, ``.weight_parameters()``,
    ``.decisions()``, ``.derive()``, ``.emit(dir)``). See :func:`archir.search_space.search`."""
    from archir.search_space import search as _search

    return _search(model, example_inputs, method, **options)


def transform(model, example_inputs, method: str = "dnat", train_data=None, val_data=None, out=None,
              **options):
    """Transform ``model`` (see :func:`archir.pipeline.transform`); returns a ``Result`` with
    ``.module`` (the trained slim network), ``.graph`` and ``.report``."""
    from archir.pipeline import transform as _transform

    return _transform(model, example_inputs, method, train_data, val_data, out, **options)


def export_onnx(module, example_inputs, path, **options):
    """Export ``module`` to ONNX and check it against ONNX Runtime (see archir.backends.onnx_export)."""
    from archir.backends.onnx_export import export_onnx as _export

    return _export(module, example_inputs, path, **options)


__all__ = ["ArchirError", "IRError", "TraceError", "UserInputError", "Graph", "Edge", "Junction",
           "Combine", "Op", "TensorMeta", "Task", "make_task", "trace", "search", "transform", "export_onnx", "__version__"]
