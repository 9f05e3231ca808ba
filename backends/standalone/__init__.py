"""Standalone slim-module backend: a ``torch.fx.GraphModule`` -> ``model.py`` + ``weights.pt``.

The emitted ``model.py`` is readable Python that imports nothing but ``torch`` and the standard
library. It defines ``class <class_name>(torch.nn.Module)`` with

* an ``__init__`` that builds every submodule the graph calls, under a flat attribute name
  (``layer1.0.conv1`` -> ``self.layer1_0_conv1``), and registers every parameter/buffer the graph
  reads with ``get_attr`` (right shape, dtype and ``requires_grad``; values come from
  ``weights.pt``);
* a ``forward`` written by torch.fx's own code generator from a copy of the graph whose
  ``call_module``/``get_attr`` targets point at the flat names (fx's ``x = None`` bookkeeping
  lines are dropped);

plus ``build_model()`` and ``load_model(weights_path=None)``. ``weights.pt`` is the emitted
class's ``state_dict``, loadable with ``torch.load(path, weights_only=True)``. It is the same
idea as ``GraphModule.to_folder()``, minus the pickled modules: nothing user-defined is pickled.

How submodules are rebuilt
--------------------------
A ``torch.nn`` built-in (``nn.LSTM``, ``nn.GRU``, ``nn.MultiheadAttention`` included) is written
as its ``repr()``, which for leaf modules is its class name and constructor arguments
(``Conv2d(3, 8, kernel_size=(3, 3), ..., bias=False)``); where the repr is not a literal call or
drops arguments (``padding=same``, ``AvgPool2d``'s ``ceil_mode``, ``nn.RNN``'s
``nonlinearity``), as a call passing each ``__init__`` parameter the instance attribute of the same
name. ``nn.Sequential`` is rebuilt from its children; a built-in whose constructor makes its own
submodules (``nn.MultiheadAttention``'s ``out_proj``) by that constructor; :mod:`archir.layers`
classes have their source copied into the file. Every rebuilt module is constructed in-process
and checked against the original: same ``repr()``, same public plain attributes (``p``, ``eps``,
``inplace``...) of it and of each submodule, same parameter and buffer names, shapes and dtypes.
A module that fails this (a user-defined class, an archir search-time module, a torch module with
hooks, or one with submodules that neither ``nn.Sequential`` nor its constructor rebuilds)
raises :class:`StandaloneError` naming its path, its type and why.

Other details
-------------
* One object, one attribute: a module or tensor reachable under several targets is built once;
  parameters tied across modules are re-tied in ``__init__`` (``self.b.weight = self.a.weight``);
  a ``get_attr`` of a called module's parameter reads it through that module (``self.fc.weight``).
* Tensors read with ``get_attr`` outside called modules become parameters or persistent buffers
  built with ``torch.zeros``; frozen parameters get ``requires_grad_(False)``. A module
  whose floating tensors are not float32 gets ``.to(dtype)``. Everything is built on the CPU.
* ``build_model()`` returns the model in the source module's train/eval mode; ``.train()`` and
  ``.eval()`` work as usual (Dropout and BatchNorm are modules).
* Both files are written atomically (``archir.fileio``); the source goes through ``compile()`` and
  is executed in-process (and its state_dict checked against the source tensors) before writing.

Globals referenced by ``forward`` must come from torch or the standard library; a small pure
function defined in archir (``archir.frontends.normalize.functional_setitem``) is inlined from
its source. Anything else raises :class:`StandaloneError`.

With ``example_inputs``, the written file is imported in-process and its outputs (eval mode,
weights loaded from ``weights.pt``) must equal the GraphModule's bit for bit (``torch.equal``).

Checking ahead
--------------
:func:`check_emittable` raises the same :class:`StandaloneError` (one line, naming the module and
what to do) without writing anything, so a pipeline can refuse a model before training it; it
accepts a supernet (skipping archir's search-time modules, which deriving removes).
"""
from .base import StandaloneError, StandaloneFiles
from .emit import check_emittable, emit_standalone

__all__ = ["StandaloneError", "StandaloneFiles", "check_emittable", "emit_standalone"]
