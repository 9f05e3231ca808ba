"""Per-epoch scalars of a run, to a CSV file and to TensorBoard (``--log-dir DIR``).

``DIR/metrics.csv`` has one row per epoch; ``DIR/events.out.tfevents.*`` (when TensorBoard is
installed: ``pip install 'archir[tensorboard]'``) hold the same scalars, so a search can be
watched converging in ``tensorboard --logdir DIR``. The columns of a ``transform`` run
(:func:`epoch_scalars`; ``<metric>`` is the task's metric, e.g. ``accuracy``):

=====================  ==============================================================
``epoch``              1, 2, ... (the TensorBoard step)
``stage``              ``arch`` (architecture stage, weight warm-up included) or ``net``
``warmup``             1 in a weight warm-up epoch (the architecture did not move), else 0
``train_loss``         mean training loss of the epoch
``train_<metric>``     mean training metric of the epoch
``val_loss``           validation loss after the epoch (empty without validation data)
``val_<metric>``       validation metric after the epoch
``lr``                 the weights' learning rate at the epoch's start
``arch_lr``            the architecture parameters' learning rate (architecture stage only)
``images_per_second``  training examples per second of the epoch (steps × batch size / seconds)
``epoch_seconds``      the epoch's wall time, validation included
``changed_edges``      searchable edges whose leading choice is no longer the original
``arch/<edge>/<c>``    every architecture weight: θ per edge and choice (DNAT), λ (DSO-NAS) ...
=====================  ==============================================================

In TensorBoard the tags group as ``loss/train``, ``loss/val``, ``<metric>/train``,
``<metric>/val``, ``lr/weights``, ``lr/arch``, ``speed/images_per_second`` and ``arch/...``.
:class:`RunLog` takes any scalars, so a user's own loop logs the same way::

    log = archir.RunLog("runs/logs")
    log.log(epoch, {"train_loss": loss, **archir.run_log.arch_scalars(search.arch_weights())})
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Mapping

from .errors import UserInputError
from .fileio import write_text

CSV_NAME = "metrics.csv"
TENSORBOARD_HINT = ("TensorBoard is not installed, so {dir} holds metrics.csv only; "
                    "pip install 'archir[tensorboard]' for TensorBoard event files")

# CSV column -> TensorBoard tag for the fixed columns (arch/... columns keep their name)
_TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "lr": "lr/weights", "arch_lr": "lr/arch",
         "images_per_second": "speed/images_per_second", "epoch_seconds": "speed/epoch_seconds",
         "changed_edges": "arch/changed_edges"}
_TEXT_COLUMNS = ("stage",)


def arch_scalars(weights: Mapping[str, Mapping[str, float]] | None) -> dict[str, float]:
    """``{"arch/<edge>/<choice>": weight}`` from ``Search.arch_weights()`` (``{edge: {choice: w}}``)."""
    return {f"arch/{edge}/{choice}": float(w) for edge, ws in (weights or {}).items() for choice, w in ws.items()}


def epoch_scalars(record: Any, batch_size: int, arch_lr: float | None = None) -> dict[str, Any]:
    """The row of one :class:`~archir.training.EpochRecord` (see the module docstring)."""
    metric = record.metric_name
    arch_stage = record.stage == "arch"
    row: dict[str, Any] = {
        "epoch": record.epoch + 1, "stage": record.stage, "warmup": int(bool(record.warmup)),
        "train_loss": record.train_loss, f"train_{metric}": record.train_metric,
        "val_loss": record.val_loss, f"val_{metric}": record.val_metric, "lr": record.lr,
        "arch_lr": arch_lr if arch_stage and record.arch_stepped else None,
        "images_per_second": (record.steps * batch_size / record.train_seconds
                              if record.train_seconds else None),
        "epoch_seconds": record.seconds,
        "changed_edges": len(record.changed_edges) if record.changed_edges is not None else None,
    }
    row.update(arch_scalars(record.arch if arch_stage else None))
    return row


class RunLog:
    """Scalars per step to ``directory/metrics.csv`` (rewritten whole, atomically, after every
    :meth:`log`: columns may appear later, and an interrupted run leaves a readable file) and
    to TensorBoard event files when ``tensorboard`` is installed (``tensorboard=None``: when
    installed; True: required; False: CSV only). ``keep_until``: a resumed run keeps the rows of
    metrics.csv up to this step (those of the epochs it does not repeat); None starts afresh."""

    def __init__(self, directory: str | Path, tensorboard: bool | None = None, *, say=None,
                 keep_until: int | None = None):
        self.directory = Path(directory).expanduser()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserInputError(f"--log-dir {directory}: cannot create the directory ({exc.strerror}); "
                                 f"choose a writable place") from exc
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = []
        if keep_until is not None and self.csv_path.is_file():
            with self.csv_path.open(newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or [])
                self.rows = [r for r in reader if r.get("epoch", "").isdigit() and int(r["epoch"]) <= keep_until]
        self.writer = None
        if tensorboard is not False:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                if tensorboard:
                    raise UserInputError(TENSORBOARD_HINT.format(dir=self.directory)) from exc
                if say is not None:
                    say(TENSORBOARD_HINT.format(dir=self.directory))
            else:
                self.writer = SummaryWriter(log_dir=str(self.directory))

    @property
    def csv_path(self) -> Path:
        return self.directory / CSV_NAME

    def log(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Record ``scalars`` at ``step`` (a CSV row; numbers, not None, to TensorBoard)."""
        row = {"epoch": step, **scalars}
        self.rows.append(row)
        self.columns += [k for k in row if k not in self.columns]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns, restval="", lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: _cell(v) for k, v in r.items()})
        write_text(self.csv_path, buf.getvalue())
        if self.writer is not None:
            for key, value in row.items():
                if key == "epoch" or key in _TEXT_COLUMNS or not _is_number(value):
                    continue
                self.writer.add_scalar(_tag(key), float(value), step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # round-trips exactly
    return value


def _tag(key: str) -> str:
    if key in _TAGS:
        return _TAGS[key]
    for prefix in ("train_", "val_"):
        if key.startswith(prefix):
            return f"{key[len(prefix):]}/{prefix[:-1]}"
    return key
