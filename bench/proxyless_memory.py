"""Peak memory and step time of ProxylessNAS's binary gates against a full mixture and the original.

    python bench/proxyless_memory.py [--model examples/resnet20.py] [--batch 64] [--steps 3]
                                     [--threads 1] [--out bench/results/proxyless_memory.json]
    python bench/proxyless_memory.py --accuracy --data-dir ~/.cache/archir-data [--subset 2000]
                                     [--epochs 4] [--arch-epochs 2]

Memory: every variant runs in a subprocess of its own (``--variant``), so that one variant's
allocations never count for another. Variants: ``original`` (the plain network: forward,
backward), ``binary1`` and ``binary2`` (the proxyless supernet with one or two gate paths) and
``full`` (the same supernet with every candidate run and weighted by softmax(α), as DARTS
mixes: ``CandidateMix.mode = "full"``). A supernet *step* is what the built-in trainer does per
batch in the split mode: an ω pass (forward, backward for the weights) then an α pass (forward,
backward for α); both are measured. Figures per variant and pass:

* ``saved_mb``: bytes of the distinct tensor storages autograd saved for the backward (from
  ``torch.autograd.graph.saved_tensors_hooks``): the activation memory a step holds, exact and
  independent of the allocator;
* ``peak_mb``: the rise of the peak resident set size over the step on the CPU (``/proc``: the
  peak ``VmHWM`` reset through ``clear_refs`` after a warm-up step, minus ``VmRSS`` before the
  step; glibc's mmap threshold is fixed at 64 KiB so that freed activations leave the RSS), or
  ``torch.cuda.max_memory_allocated`` minus the allocation before the step on CUDA;
* ``step_s``: the median time of ``--steps`` steps after the warm-up.

Ratios are to ``original`` of the same run. Target: binary-gated ≤ 1.5× the original's peak.

``--accuracy``: ``archir.transform(..., method="proxyless", baseline=True)`` on the CIFAR-10
copy at a CPU-sized budget: the original and the proxyless network trained for the same epochs
on the same data and seed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("original", "binary1", "binary2", "full")


def _load(path: Path):
    spec = importlib.util.spec_from_file_location("bench_model", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _saved_bytes(fn) -> int:
    """Run ``fn`` and return the bytes of the distinct storages autograd saved meanwhile."""
    import torch

    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def run_variant(args) -> dict:
    """One variant in this process: warm-up, then the measured passes (see the module docstring)."""
    import torch
    import torch.nn.functional as F
    from archir.passes.candidate_ops import gate_ops

    import archir

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    model = _load(ROOT / args.model).build_model()
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    if args.variant == "original":
        net, arch, weights = model.to(dev).train(), [], list(model.parameters())
    else:
        s = archir.search(model, x[:2], method="proxyless", gate_paths=2 if args.variant == "binary2" else 1)
        for _, _, mix in gate_ops(s.graph):
            mix.mode = "full" if args.variant == "full" else "binary"
        net, arch, weights = s.supernet.to(dev).train(), s.arch_parameters(), s.weight_parameters()
        for p in arch:
            p.data = p.data.to(dev)
    x, y = x.to(dev), y.to(dev)

    def w_pass():
        F.cross_entropy(net(x), y).backward(inputs=weights)

    def a_pass():
        F.cross_entropy(net(x), y).backward(inputs=arch)

    passes = {"weights": w_pass} | ({"arch": a_pass} if arch else {})
    out = {"variant": args.variant, "device": str(dev), "batch": args.batch}
    for name, fn in passes.items():
        fn()  # warm-up: gradients and caches allocated
        out[f"{name}_saved_mb"] = _saved_bytes(fn) / 2**20
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        out[f"{name}_step_s"] = statistics.median(times)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            out[f"{name}_peak_mb"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM)
            before = _status("VmRSS")
            fn()
            out[f"{name}_peak_mb"] = (_status("VmHWM") - before) / 2**20
    return out


def memory(args) -> dict:
    rows = []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    for v in VARIANTS:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", v, "--model", args.model,
               "--batch", str(args.batch), "--steps", str(args.steps), "--threads", str(args.threads)]
        cmd += ["--cpu"] if args.cpu else []
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    for r in rows:
        for k in ("weights_saved_mb", "weights_peak_mb", "weights_step_s"):
            r[k.replace("weights_", "weights_ratio_")] = r[k] / base[k]
        for k in ("arch_saved_mb", "arch_peak_mb", "arch_step_s"):
            if k in r:
                r[k.replace("arch_", "arch_ratio_")] = r[k] / base[k.replace("arch_", "weights_")]
    return {"model": args.model, "batch": args.batch, "threads": args.threads, "rows": rows}


def accuracy(args) -> dict:
    import torch

    import archir

    torch.set_num_threads(args.threads)
    mod = _load(ROOT / args.model)
    res = archir.transform(mod.build_model(), mod.example_input(), method="proxyless", data="cifar10",
                           data_dir=args.data_dir, subset=args.subset, epochs=args.epochs,
                           arch_epochs=args.arch_epochs, batch_size=args.batch, baseline=True, seed=args.seed,
                           scope=args.scope, progress=True, device="cpu")
    r = res.report
    arch = [h for h in r["history"] if h["stage"] == "arch"]
    changed = arch[-1]["changed_edges"] if arch else []  # units whose argmax left the original
    return {"model": args.model, "subset": args.subset, "epochs": args.epochs, "arch_epochs": args.arch_epochs,
            "batch": args.batch, "seed": args.seed, "scope": args.scope,
            "original_accuracy": r["baseline"]["rows"]["val_accuracy"]["original"],
            "proxyless_accuracy": r["transformed"]["val_accuracy"],
            "baseline": r.get("baseline"), "options": r["options"], "method_defaults": r["method_defaults"],
            "decisions": [{k: d[k] for k in ("edge", "decision", "final_weights")} for d in r["decisions"]
                          if d.get("param")], "changed": changed,
            "parameters": [r["original"]["parameters"], r["transformed"]["parameters"]],
            "flops": [r["original"]["flops_per_example"], r["transformed"]["flops_per_example"]],
            "time_seconds": r["time_seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="examples/resnet20.py")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cpu", action="store_true", help="measure on the CPU even when CUDA is available")
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--accuracy", action="store_true")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--subset", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--arch-epochs", type=int, default=2)
    ap.add_argument("--scope", default="f")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    result = accuracy(args) if args.accuracy else memory(args)
    name = "proxyless_accuracy.json" if args.accuracy else "proxyless_memory.json"
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
