"""Data-parallel training over several processes (``--nproc N``, or any ``torchrun`` launch).

How a run is split (N processes, "ranks"; rank 0 writes every file):

- **Same start everywhere.** Every rank builds the model, the search and the loaders from the same
  seed, so every rank draws the *same global batch* of ``--batch-size`` B examples (same order,
  same augmentation) and trains on its own contiguous slice of it (``torch.tensor_split``: B/N
  examples each). This is the job of a ``DistributedSampler`` (each rank a disjoint part of every
  batch), done so that N processes see exactly the batches of one process with the same B.
- **Gradients averaged per pass.** After every backward pass the gradients that pass computed
  (ω in the weight pass, θ in the architecture pass, both in ``joint``) are all-reduced as one
  flat buffer and weighted by slice size: with ``n_r`` examples and mean-loss gradient ``g_r`` on
  rank r, every rank steps with

      g = Σ_r n_r g_r / Σ_r n_r,

  the gradient of the mean loss over the global batch, i.e. what one process computes on the
  whole batch (up to float rounding). This is what ``DistributedDataParallel`` does for a full
  backward pass; archir's passes ask autograd only for ω's or only for θ's gradients
  (``backward(inputs=...)``), which DDP's reducer (expecting every parameter's gradient in each
  backward) cannot follow, so the all-reduce is explicit. The same buffer carries one flag per
  rank, "my loss was not finite" and "I received SIGINT/SIGTERM", so every rank takes the same
  decision at the same step (``--nan-policy``, stopping with a checkpoint). Identical gradients
  on every rank keep ω and θ identical without a broadcast; the optimisers run locally.
- **Derive checked.** Before the derive, θ and the supernet's parameters and buffers are broadcast
  from rank 0 (BatchNorm's running statistics are rank 0's, as with DDP's default
  ``broadcast_buffers``); after it, every rank's derived architecture (its IR text) is compared
  with rank 0's, and a difference stops the run with one message.
- **Reports.** Training loss and metric are summed over ranks at each epoch's end; validation runs
  on every rank over the whole validation set (the same numbers everywhere).
- **Failures.** Collectives time out after ``ARCHIR_DIST_TIMEOUT`` seconds (default 600): a rank
  that died makes the others stop with a message naming the timeout instead of hanging; under
  ``--nproc`` the launcher also stops the others as soon as one fails.

The backend is NCCL on CUDA (one GPU per process, ``cuda:LOCAL_RANK``) and gloo on CPU.
"""
from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ArchirError, UserInputError

_WORLD: World | None = None


class DistributedError(ArchirError):
    """Another process of a distributed run failed or disagrees (one line, exit code 2)."""


@dataclass
class World:
    """This process's place in a distributed run."""

    rank: int
    size: int
    local_rank: int
    device: torch.device
    backend: str
    group: Any = None  # the process group of archir's collectives (their timeout: timeout_seconds())

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    # ---------------------------------------------------------------------------------------
    # data
    # ---------------------------------------------------------------------------------------

    def shard(self, batch: Any) -> tuple[Any, float]:
        """This rank's slice of a global batch (tensors of any structure sliced along dim 0 into
        ``size`` contiguous parts, as ``torch.tensor_split`` does) and its weight ``n_r``, the
        slice's size. A rank left without examples (a last batch smaller than ``size``) runs
        on the whole batch with weight 0: it takes part in the all-reduce and counts for nothing."""
        n = _first_dim(batch)
        if n is None:
            return batch, 1.0
        base, extra = divmod(n, self.size)  # the first `extra` ranks get one more
        mine = base + (1 if self.rank < extra else 0)
        if mine == 0:
            return batch, 0.0
        return _slice(batch, self.rank, self.size), float(mine)

    # ---------------------------------------------------------------------------------------
    # collectives
    # ---------------------------------------------------------------------------------------

    def average_gradients(self, params: Sequence[nn.Parameter], weight: float, flags: Sequence[float]
                          ) -> list[float]:
        """All-reduce the gradients of ``params`` as ``Σ_r w_r g_r / Σ_r w_r`` (see the module
        docstring) in one flat buffer, with ``flags`` (summed over ranks) appended; returns the
        summed flags. A parameter without a gradient contributes zeros (and gets them back)."""
        import torch.distributed as dist

        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = torch.cat([g.reshape(-1) * weight for g in grads] +
                         [torch.tensor([weight, *flags], dtype=grads[0].dtype if grads else torch.float32,
                                       device=self.device)])
        self._collective(dist.all_reduce, flat, group=self.group)
        total, summed = flat[len(flat) - len(flags) - 1], flat[len(flat) - len(flags):]
        flat = flat[:len(flat) - len(flags) - 1] / total
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        return [float(v) for v in summed.tolist()]

    def sum(self, *values: float) -> list[float]:
        """``values`` summed over every rank (float64)."""
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self._collective(dist.all_reduce, t, group=self.group)
        return [float(v) for v in t.tolist()]

    def broadcast_module(self, module: nn.Module, extra: Sequence[Tensor] = ()) -> None:
        """Rank 0's parameters, buffers and ``extra`` tensors (θ the module does not hold) on
        every rank, in place."""
        import torch.distributed as dist

        with torch.no_grad():
            for t in [*module.state_dict().values(), *extra]:
                if isinstance(t, Tensor) and t.numel():
                    self._collective(dist.broadcast, t, src=0, group=self.group)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (any picklable value) on every rank."""
        import torch.distributed as dist

        box = [obj if self.rank == 0 else None]
        self._collective(dist.broadcast_object_list, box, src=0, group=self.group)
        return box[0]

    def check_same(self, what: str, value: str) -> None:
        """Every rank's ``value`` must be rank 0's; otherwise one error naming ``what``."""
        import torch.distributed as dist

        values: list[Any] = [None] * self.size
        self._collective(dist.all_gather_object, values, value, group=self.group)
        bad = [r for r, v in enumerate(values) if v != values[0]]
        if bad:
            raise DistributedError(f"process(es) {bad} derived another {what} than process 0; the run stops "
                                   "(report this: the ranks should be identical)")

    def _collective(self, fn, *args, **kwargs) -> Any:
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:  # a peer died or timed out
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise DistributedError(f"process {self.rank} of {self.size}: another process stopped or did not answer "
                                   f"within {timeout_seconds():g} s ({first}); see its own message") from exc


def _first_dim(batch: Any) -> int | None:
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    if isinstance(batch, dict):
        values = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        values = list(batch)
    else:
        return None
    for v in values:
        n = _first_dim(v)
        if n is not None:
            return n
    return None


def _slice(batch: Any, rank: int, size: int) -> Any:
    if isinstance(batch, Tensor):
        return torch.tensor_split(batch, size)[rank] if batch.dim() else batch
    if isinstance(batch, dict):
        return {k: _slice(v, rank, size) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_slice(v, rank, size) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_slice(v, rank, size) for v in batch)
    return batch


def timeout_seconds() -> float:
    """How long a collective waits for the other processes (``ARCHIR_DIST_TIMEOUT``, default 600 s)."""
    try:
        return float(os.environ.get("ARCHIR_DIST_TIMEOUT", "600"))
    except ValueError:
        return 600.0


def launched() -> bool:
    """Whether this process was started by torchrun / the elastic launcher with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def current() -> World | None:
    """The distributed run this process belongs to (None: a single process)."""
    return _WORLD


def setup(device_spec: str) -> World | None:
    """Join the process group described by the launcher's environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): NCCL with ``cuda:LOCAL_RANK`` when CUDA is
    used, gloo on CPU. None when not launched with several processes. Idempotent."""
    global _WORLD
    if _WORLD is not None or not launched():
        return _WORLD
    import torch.distributed as dist

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = device_spec == "cuda" or device_spec.startswith("cuda") or (
        device_spec == "auto" and torch.cuda.is_available())
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise UserInputError(f"process {rank}: LOCAL_RANK {local} but this node has {torch.cuda.device_count()} "
                                 "GPU(s); start at most one process per GPU (--nproc / --nproc-per-node)")
        device, backend = torch.device("cuda", local), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():  # joining may wait for slow starters: at least 10 minutes
        dist.init_process_group(backend, rank=rank, world_size=size,
                                timeout=datetime.timedelta(seconds=max(600.0, timeout_seconds())))
    # archir's own collectives: a peer that stops answering is an error after timeout_seconds()
    group = dist.new_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_seconds()))
    _WORLD = World(rank, size, local, device, backend, group)
    return _WORLD


def teardown() -> None:
    """Leave the process group (at the end of a run)."""
    global _WORLD
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = None


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``archir`` with ``argv`` in ``nproc`` local processes through torch.distributed's
    elastic launcher (what ``torchrun --standalone --nproc-per-node N`` does); returns the exit
    code: 0, or the first failed process's own code (its message is on stderr already)."""
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.1, start_method="spawn")
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "archir.cli", *argv)
    except ChildFailedError as exc:
        codes = sorted((f.exitcode for f in exc.failures.values()), key=lambda c: (c in (0, -15, 143), c))
        code = codes[0] if codes else 1
        return code if code > 0 else 128 - code
    return 0
