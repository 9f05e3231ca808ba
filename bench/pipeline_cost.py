"""Cost of a whole ``archir transform`` run against training the original for the same epochs.

    python bench/pipeline_cost.py [--model examples/resnet20.py] [--data auto|digits|cifar10]
                                  [--subset 2048] [--test-subset 1000] [--epochs 6] [--arch-epochs 3]
                                  [--modes joint alternate split] [--rounds 2] [--threads 1]
                                  [--out bench/results/pipeline_cost.json]

One process, interleaved over ``--rounds`` rounds, every transform run between two ``plain`` runs
(plain, joint, plain, alternate, plain, split, then the modes in reverse order, ..., plain): a
run's ratio is its wall time over the mean of the two plain runs beside it, the ratio of a mode
the median over rounds (the machine is shared and its load drifts over minutes). ``plain`` is
the original model of ``--model`` trained alone for ``--epochs`` epochs, as ``archir.transform`` trains its baseline: the same data sets, batch
size, optimiser, schedule, seed and loaders, through ``archir.training.train_plain``); a mode is
``archir.transform(model, example, train_data=..., val_data=..., epochs=E, arch_epochs=A,
arch_update=MODE, out=tmpdir, progress=False)`` for each ``--modes`` MODE: the whole call, from
tracing to the emitted files (model.py, weights.pt, model.onnx checked against ONNX Runtime,
graph.svg, arch.png, report.md, report.json), without a baseline. Both get the same data sets,
loaded once before timing (``--data auto``: a stratified CIFAR-10 subset when
``~/.cache/archir-data`` holds it, else the bundled digits). ``--threads 1`` (the default) runs
torch on one thread: the machine is shared.

Records per run the wall time of the whole call and the report's ``time_seconds`` (trace:
tracing, the search space and the emittability checks; data: loaders; train_arch, train_net:
the training steps of each stage; eval: validation after every epoch; derive; outputs: model.py,
weights.pt, model.onnx with its ONNX Runtime check, graph.svg, arch.png, report.md; other: the
rest of the call: preflight, checkpoints, the report), so the ratio can be explained;
``training_steps_ratio`` compares the training steps alone (train_arch + train_net against the
plain run's train_net). Writes bench/results/pipeline_cost.json. Before the rounds, one ``archir.transform(..., epochs=0)``
warms the process up (the first ONNX export, drawing and report of a process pay for imports
and lazy initialisation); its time is recorded as ``cold_start_epochs_0``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import archir
from archir.fileio import write_text
from archir.pipeline import TransformOptions, _loaders, _train_config
from archir.training import resolve_device, seed_everything, train_plain

ROOT = Path(__file__).resolve().parent.parent
MODES = ("joint", "alternate", "split")


def load(path):
    spec = importlib.util.spec_from_file_location("bench_model", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def datasets(args):
    from archir.data import load_dataset
    from archir.data.sources import default_data_dir

    name = args.data
    if name == "auto":
        d = Path(default_data_dir()).expanduser()
        name = "cifar10" if (d / "train").is_dir() or any(d.glob("cifar-10*")) else "digits"
    if name == "digits":
        train, val = load_dataset("digits", seed=0)
        return name, train, val
    train, val = load_dataset(name, args.data_dir, subset=args.subset, test_subset=args.test_subset, seed=0)
    return name, train, val


def common(args) -> dict:
    return dict(epochs=args.epochs, arch_epochs=args.arch_epochs, batch_size=args.batch_size, seed=args.seed,
                device=args.device)


def run_plain(mod, train_ds, val_ds, args) -> dict:
    """The original trained alone, as archir.pipeline.transform trains its baseline."""
    t0 = time.perf_counter()
    opts = TransformOptions(**common(args), progress=False)
    device = resolve_device(opts.device)
    seed_everything(opts.seed)
    model = mod.build_model()
    train, val, _, net = _loaders(opts, train_ds, val_ds, device)
    t1 = time.perf_counter()
    result = train_plain(model, net or train, val, _train_config(opts, device))
    total = time.perf_counter() - t0
    parts = {"data": t1 - t0, "train_net": result.stage_seconds["net"], "eval": result.eval_seconds}
    parts["other"] = total - sum(parts.values())
    parts["mean_step_net"] = result.mean_step_seconds["net"]
    return {"total": total, "parts": parts,
            "val_accuracy": result.val_metric}


def run_transform(mod, train_ds, val_ds, args, mode) -> dict:
    seed_everything(args.seed)
    model = mod.build_model()
    example = mod.example_input()
    with tempfile.TemporaryDirectory(prefix="archir-cost-") as tmp:
        t0 = time.perf_counter()
        res = archir.transform(model, example, method=args.method, train_data=train_ds, val_data=val_ds,
                               out=Path(tmp) / "out", arch_update=mode, progress=False, **common(args))
        total = time.perf_counter() - t0
        files = sorted(Path(tmp, "out").iterdir())
    ts = dict(res.report["time_seconds"])
    parts = {k: v for k, v in ts.items() if k not in ("total", "mean_step") and isinstance(v, (int, float))}
    parts["other"] = total - sum(parts.values())  # loaders, preflight, report building, checkpoint writes...
    parts["mean_step_arch"] = ts["mean_step"].get("arch")
    parts["mean_step_net"] = ts["mean_step"].get("net")
    return {"total": total, "parts": parts, "files": [f.name for f in files],
            "val_accuracy": res.report["transformed"]["val_accuracy"],
            "changed_edges": sum(d["changed"] for d in res.report["decisions"])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "examples" / "resnet20.py"))
    ap.add_argument("--data", default="auto", help="auto, digits, cifar10 or an image-folder path")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--subset", type=int, default=2048, help="training images (not for digits)")
    ap.add_argument("--test-subset", type=int, default=1000, help="validation images (not for digits)")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--arch-epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--method", default="dnat")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "pipeline_cost.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    mod = load(args.model)
    t = time.perf_counter()
    data_name, train_ds, val_ds = datasets(args)
    load_seconds = time.perf_counter() - t
    print(f"data {data_name}: {len(train_ds)} training, {len(val_ds)} validation images ({load_seconds:.1f} s)")

    # the first export, drawing and report of a process pay for imports and lazy initialisation
    # (what a one-off `archir transform` from the shell pays too): measured once, before the rounds
    seed_everything(args.seed)
    with tempfile.TemporaryDirectory(prefix="archir-cost-") as tmp:
        t = time.perf_counter()
        cold = archir.transform(mod.build_model(), mod.example_input(), method=args.method, epochs=0,
                                out=Path(tmp) / "out", progress=False, device=args.device)
        cold = {"total": time.perf_counter() - t,
                "parts": {k: v for k, v in cold.report["time_seconds"].items() if isinstance(v, (int, float))}}
    print(f"cold start (epochs=0, first transform of the process): {cold['total']:.1f} s {cold['parts']}")

    runs = {k: [] for k in ("plain", *args.modes)}
    seq = []  # (kind, index into runs[kind]) in the order run
    for r in range(args.rounds):  # interleaved; every transform run sits between two plain runs
        modes = args.modes if r % 2 == 0 else args.modes[::-1]
        order = [k for m in modes for k in ("plain", m)] + (["plain"] if r == args.rounds - 1 else [])
        for kind in order:
            out = (run_plain(mod, train_ds, val_ds, args) if kind == "plain"
                   else run_transform(mod, train_ds, val_ds, args, kind))
            out["round"] = r
            seq.append((kind, len(runs[kind])))
            runs[kind].append(out)
            print(f"round {r} {kind:>9}: {out['total']:7.1f} s  "
                  + " ".join(f"{k} {v:.2f}" for k, v in out["parts"].items() if isinstance(v, float)), flush=True)

    # a run's ratio: its time over the mean of the plain runs just before and after it (the machine
    # is shared: its load drifts over minutes, so only neighbours in time compare)
    for i, (kind, j) in enumerate(seq):
        if kind == "plain":
            continue
        before, after = runs["plain"][seq[i - 1][1]], runs["plain"][seq[i + 1][1]]
        x = runs[kind][j]
        x["plain_neighbours"] = [before["total"], after["total"]]
        x["ratio"] = x["total"] / ((before["total"] + after["total"]) / 2)
        x["train_ratio"] = ((x["parts"]["train_arch"] + x["parts"]["train_net"])
                            / ((before["parts"]["train_net"] + after["parts"]["train_net"]) / 2))
    summary = {"plain": {"seconds": statistics.median(x["total"] for x in runs["plain"]),
                         "parts_median": {k: statistics.median(x["parts"][k] for x in runs["plain"])
                                          for k in runs["plain"][0]["parts"]}}}
    for kind in args.modes:
        rs = runs[kind]
        keys = [k for k, v in rs[0]["parts"].items() if isinstance(v, (int, float))]
        summary[kind] = {"seconds": statistics.median(x["total"] for x in rs),
                         "ratio_to_plain": statistics.median(x["ratio"] for x in rs),
                         "ratio_per_round": [x["ratio"] for x in rs],
                         "training_steps_ratio": statistics.median(x["train_ratio"] for x in rs),
                         "parts_median": {k: statistics.median(x["parts"][k] for x in rs if x["parts"].get(k) is not None)
                                          for k in keys}}
    result = {"model": args.model, "data": data_name, "train_images": len(train_ds), "val_images": len(val_ds),
              "epochs": args.epochs, "arch_epochs": args.arch_epochs, "batch_size": args.batch_size,
              "device": args.device, "threads": torch.get_num_threads(), "rounds": args.rounds,
              "method": args.method, "target": 1.10, "summary": summary, "runs": runs, "cold_start_epochs_0": cold,
              "data_load_seconds": load_seconds,
              "torch": torch.__version__, "python": platform.python_version()}
    write_text(args.out, json.dumps(result, indent=2, default=str))
    for kind in args.modes:
        s = summary[kind]
        print(f"{kind:>9}: {s['seconds']:7.1f} s  ratio {s['ratio_to_plain']:.3f} (per round "
              + ", ".join(f"{v:.3f}" for v in s["ratio_per_round"])
              + f"); training steps alone {s['training_steps_ratio']:.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
