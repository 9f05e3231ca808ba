"""Original vs a search method (default DNAT, cell and full) on CIFAR-10 at an equal epoch budget, over several seeds.

    python bench/cifar10_seeds.py --data-dir ~/.cache/archir-data --epochs 10 --arch-epochs 5 \\
        --subset 10000 --seeds 0 1 2 [--arch-lr 0.05 0.2] [--device auto] [--method dnat]

Each run trains ResNet20 (examples/resnet20.py) from the same initial weights per seed: the
original network with plain SGD (cosine) for E epochs, and ``archir.transform(..., method)`` with A
architecture epochs then E - A network epochs (same optimiser, same schedule). Reports mean, std,
every seed, the edges each run changed, and wall time. ``--arch-lr`` takes several values: a sweep
of the architecture parameters' learning rate; ``--shares`` sweeps the method's ``share`` option
where it has one (DNAT: cell, full); ``--method-option NAME=VALUE`` sets any other option. The
transformed runs are stored under the method's name (``"dnat"``), keyed ``share@arch_lr`` (or
``method@arch_lr`` for a method without ``share``); ``val_acc`` is the report's validation metric
(``report["metric"]``, accuracy for this classification task).
Writes bench/results/cifar10_seeds.json (and a markdown table beside it).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import archir
from archir.data import as_loader, load_dataset
from archir.fileio import write_text
from archir.training import TrainConfig, resolve_device, seed_everything, train_plain

try:
    from bench.method_args import add_method_arguments, has_option, method_options
except ImportError:  # run as a script: bench/ is on sys.path
    from method_args import add_method_arguments, has_option, method_options

ROOT = Path(__file__).resolve().parent.parent


def build(seed):
    import importlib.util

    spec = importlib.util.spec_from_file_location("resnet20", ROOT / "examples" / "resnet20.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    seed_everything(seed)
    return mod.build_model(), mod.example_input()


def run_original(seed, train, val, args, device):
    model, _ = build(seed)
    cfg = TrainConfig(epochs=args.epochs, arch_epochs=0, batch_size=args.batch_size, lr=args.lr, seed=seed,
                      device=str(device), progress=args.progress)
    t = time.perf_counter()
    res = train_plain(model, as_loader(train, args.batch_size, shuffle=True, device=device, seed=seed, augment=True),
                      as_loader(val, 256, device=device), cfg)
    return {"val_acc": res.val_metric, "seconds": time.perf_counter() - t, "params": sum(p.numel() for p in model.parameters())}


def run_method(seed, method, options, arch_lr, train, val, args, device):
    model, x = build(seed)
    t = time.perf_counter()
    res = archir.transform(model, x, method, train, val, epochs=args.epochs,
                           arch_epochs=args.arch_epochs, batch_size=args.batch_size, lr=args.lr, arch_lr=arch_lr,
                           seed=seed, device=str(device), progress=args.progress, onnx=False, **options)
    report = res.report
    metric = report["metric"]  # "accuracy" for the default (classification) task
    val_metric = report["transformed"][f"val_{metric}"]
    changed = {d["edge"]: d["decision"] for d in report["decisions"] if d["decision"] != "same"}
    return {"val_acc": val_metric, "seconds": time.perf_counter() - t,
            "params": report["transformed"]["parameters"], "flops": report["transformed"]["flops_per_example"],
            "changed_edges": changed, "collapsed": metric == "accuracy" and val_metric < 0.2}


def summarize(runs):
    accs = [r["val_acc"] for r in runs]
    return {"mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "seeds": accs, "mean_seconds": statistics.mean(r["seconds"] for r in runs)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="cifar10")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--subset", type=int, default=10000)
    ap.add_argument("--test-subset", type=int, default=None, help="evaluate on this many test images")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--arch-epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--arch-lr", type=float, nargs="+", default=[0.05])
    ap.add_argument("--shares", nargs="+", default=["cell", "full"],
                    help="values of the method's share option to sweep (ignored by a method without one)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cifar10_seeds.json"))
    add_method_arguments(ap)
    args = ap.parse_args()
    if has_option(args.method, "share"):  # one variant per share value, each checked before any training
        variants = {share: method_options(ap, args, overrides={"share": share}) for share in args.shares}
    else:
        variants = {args.method: method_options(ap, args)}
    device = resolve_device(args.device)
    train, val = load_dataset(args.data, args.data_dir, subset=args.subset or None, test_subset=args.test_subset)
    result = {"config": vars(args) | {"device": str(device), "train_images": len(train), "val_images": len(val),
                                      "torch": torch.__version__},
              "original": [], args.method: {}}
    t0 = time.perf_counter()
    for seed in args.seeds:
        result["original"].append(run_original(seed, train, val, args, device) | {"seed": seed})
        print(f"seed {seed} original: {result['original'][-1]['val_acc']:.4f}", flush=True)
        for variant, opts in variants.items():
            for lr in args.arch_lr:
                key = f"{variant}@{lr}"
                r = run_method(seed, args.method, opts, lr, train, val, args, device) | {"seed": seed}
                result[args.method].setdefault(key, []).append(r)
                print(f"seed {seed} {args.method} {key}: {r['val_acc']:.4f} changed {r['changed_edges']}", flush=True)
        result["summary"] = {"original": summarize(result["original"]),
                             **{k: summarize(v) for k, v in result[args.method].items()}}
        result["wall_seconds"] = time.perf_counter() - t0
        write_text(args.out, json.dumps(result, indent=2))  # after every seed: nothing lost on interrupt
    lines = ["| variant | mean | std | seeds | mean time (s) |", "|---|---|---|---|---|"]
    for k, s in result["summary"].items():
        lines.append(f"| {k} | {100 * s['mean']:.2f}% | {100 * s['std']:.2f} | "
                     f"{', '.join(f'{100 * a:.2f}' for a in s['seeds'])} | {s['mean_seconds']:.0f} |")
    write_text(Path(args.out).with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
