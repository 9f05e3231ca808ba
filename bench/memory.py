"""Peak memory of ``archir.transform`` in copies of the model's weights.

A model of ``P`` float32 parameters has ``4P`` bytes of weights; a large one (ViT-H/14: 2.5 GB)
fits a machine only if archir keeps few copies of them alive at once. This runs
``archir.transform(model, x, epochs=0)`` (trace, search space, derive, model.py written and checked,
model.onnx exported and checked against ONNX Runtime) on a residual MLP of about ``--params``
parameters and samples the process's anonymous resident memory (``RssAnon``: tensors, not mapped
files) every 3 ms. For each phase it reports the peak above the memory before the call, divided by
``4P``: the number of weight copies alive at that phase's worst moment.

    python bench/memory.py                          # ~80M parameters, both ONNX and no-ONNX runs
    python bench/memory.py --params 3e8 --external  # weights past the 1.8 GB external-data limit

``--external`` lowers the threshold above which model.onnx keeps its weights in ``model.onnx.data``
so that a small model takes that path too (it is the one a model over 1.8 GB takes).

Results go to ``bench/results/memory.json``. Linux only (reads ``/proc/self/status``). The
memory the C heap keeps after ``free`` would blur the figures, so each run is a fresh process
with ``MALLOC_MMAP_THRESHOLD_`` set, which makes every large block its own mapping, returned to
the system when freed.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

try:
    from bench.peak_memory import PeakMemory
except ImportError:  # run as a script: bench/ is on sys.path
    from peak_memory import PeakMemory

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "memory.json"


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Phases:
    """The peak memory of each phase, the phase running being the innermost wrapped call in
    progress (``transform`` outside them all)."""

    def __init__(self):
        self.stack = ["transform"]
        self.memory = PeakMemory("transform", interval=0.003)

    def wrap(self, owner, attr: str, phase: str) -> None:
        original = getattr(owner, attr)

        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            self.stack.append(phase)
            self.memory.phase = phase
            try:
                return original(*args, **kwargs)
            finally:
                self.stack.pop()
                self.memory.phase = self.stack[-1]

        setattr(owner, attr, wrapped)


def measure(params: float, onnx: bool, external: bool) -> dict:
    import archir
    from archir import output_dir, search_space
    from archir.backends import onnx_export, standalone

    d = 512
    depth = max(1, round(params / (8 * d * d + 7 * d)))
    torch.manual_seed(0)
    model = nn.Sequential(*[Block(d) for _ in range(depth)]).eval()
    x = (torch.randn(1, 16, d),)
    weights = 4 * sum(p.numel() for p in model.parameters())
    if external:
        onnx_export._EXTERNAL_DATA_THRESHOLD = 1000

    phases = Phases()
    phases.wrap(search_space.Search, "__init__", "trace + search space")
    phases.wrap(search_space.Search, "derive", "derive")
    phases.wrap(standalone, "emit_standalone", "model.py written and checked")
    phases.wrap(onnx_export, "export_onnx", "model.onnx exported and checked")
    phases.wrap(output_dir, "emit_model", "outputs")
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        archir.transform(model, x, "dnat", epochs=0, onnx=onnx, out=Path(tmp) / "out", progress=False)
    seconds = time.perf_counter() - t
    phases.memory.stop()
    base = phases.memory.start
    copies = {k: round((v - base) / weights, 2) for k, v in phases.memory.peaks.items()}
    return {"parameters": weights // 4, "weights_mib": round(weights / 2**20, 1), "onnx": onnx,
            "onnx_external_data": external, "seconds": round(seconds, 1),
            "peak_weight_copies": max(copies.values()), "peak_weight_copies_by_phase": copies}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=float, default=8e7, help="parameters of the MLP (default 8e7)")
    p.add_argument("--external", action="store_true", help="ONNX weights in an external data file")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--one", choices=("onnx", "no-onnx"), help=argparse.SUPPRESS)  # one run, JSON to stdout
    args = p.parse_args(argv)
    if args.one:
        torch.set_num_threads(1)
        onnx = args.one == "onnx"
        print(json.dumps(measure(args.params, onnx, args.external and onnx)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}  # see the module docstring
    runs = []
    for one in ("no-onnx", "onnx"):  # each in a fresh process: nothing left over from the other
        cmd = [sys.executable, __file__, "--one", one, "--params", str(args.params)]
        cmd += ["--external"] if args.external else []
        done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    result = {"torch": torch.__version__, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for r in runs:
        print(f"onnx={r['onnx']!s:5} external={r['onnx_external_data']!s:5} {r['weights_mib']:7.1f} MiB: peak "
              f"{r['peak_weight_copies']} copies {r['peak_weight_copies_by_phase']} ({r['seconds']} s)")


if __name__ == "__main__":
    main()
