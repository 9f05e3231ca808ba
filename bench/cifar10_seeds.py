"""Original vs a search method (default DNAT, cell and full) on CIFAR-10 at an equal epoch budget, over several seeds.

    python bench/cifar10_seeds.py --data-dir ~/.cache/archir-data --epochs 10 --arch-epochs 5 \\
        --subset 10000 --seeds 0 1 2 [--arch-lr 0.05 0.2] [--warmup-epochs 1] [--threads 1] \\
        [--device auto] [--method dnat] [--out bench/results/cifar10_seeds.json]
    python bench/cifar10_seeds.py --merge A.json B.json --out bench/results/cifar10_seeds.json

Each run trains ResNet20 (examples/resnet20.py) from the same initial weights per seed: the
original network with plain SGD (cosine) for E epochs, and ``archir.transform(..., method)`` with A
architecture epochs then E - A network epochs (same optimiser, same schedule). Reports mean, std,
every seed, the edges each run changed (``changed_edges``: id -> decision, none / identity or
removed as dead after pruning; ``n_changed``: how many became none or identity, of
``searchable_edges``; ``n_dead``: how many were removed as dead), the accuracy difference to the original of the same seed and budget
(``delta``) and wall time; the summary has mean ± std of accuracy, delta and edges changed per
variant. ``--arch-lr`` takes several values: a sweep of the architecture parameters' learning
rate; ``--shares`` sweeps the method's ``share`` option where it has one (DNAT: cell, full);
``--method-option NAME=VALUE`` sets any other option; ``--warmup-epochs`` (default: archir's) is
passed to ``archir.transform``; ``--threads`` sets ``torch.set_num_threads``. The transformed runs
are stored under the method's name (``"dnat"``), keyed ``share@arch_lr`` (or ``method@arch_lr``
for a method without ``share``); ``val_acc`` is the report's validation metric
(``report["metric"]``, accuracy for this classification task); ``epochs`` holds each epoch's
validation metric and changed edges.
Writes bench/results/cifar10_seeds.json (``--out``; and a markdown table beside it) after every run.
``--merge`` joins runs of the same budget written by separate processes (e.g. seeds run in
parallel) into ``--out``, training nothing.
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
from archir.run_compare import compare_runs, mean_std, render
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
    return {"val_acc": res.val_metric, "seconds": time.perf_counter() - t,
            "params": sum(p.numel() for p in model.parameters()),
            "epochs": [{"epoch": h["epoch"], "val_acc": h["val_metric"]} for h in res.history]}


def epoch_rows(report):
    """Per epoch of a transform report: stage, warm-up, validation metric, seconds, and (after an
    architecture-stage epoch, else None) the ids of the edges whose leading choice is not the
    original's and the number of searchable edges."""
    return [{"epoch": h["epoch"], "stage": h["stage"], "warmup": h.get("warmup", False), "val_acc": h["val_metric"],
             "changed_edges": h.get("changed_edges"), "searchable_edges": h.get("searchable_edges"),
             "seconds": h["seconds"]} for h in report["history"]]


def run_method(seed, method, options, arch_lr, train, val, args, device, out=None, **extra):
    """One ``archir.transform`` run; ``extra``: further transform options (e.g. ``warmup_epochs``);
    ``out``: its output directory (``--runs-dir``), else none."""
    model, x = build(seed)
    t = time.perf_counter()
    res = archir.transform(model, x, method, train, val, out, epochs=args.epochs,
                           arch_epochs=args.arch_epochs, batch_size=args.batch_size, lr=args.lr, arch_lr=arch_lr,
                           seed=seed, device=str(device), progress=args.progress, onnx=out is not None,
                           force=out is not None, **options, **extra)
    report = res.report
    metric = report["metric"]  # "accuracy" for the default (classification) task
    val_metric = report["transformed"][f"val_{metric}"]
    changed = {d["edge"]: d["decision"] for d in report["decisions"] if d["changed"]}
    chosen = {e: d for e, d in changed.items() if d in ("none", "identity")}  # the search's own decisions
    rows = epoch_rows(report)
    searchable = next((r["searchable_edges"] for r in rows if r["searchable_edges"] is not None), None)
    return {"val_acc": val_metric, "seconds": time.perf_counter() - t,
            "params": report["transformed"]["parameters"], "flops": report["transformed"]["flops_per_example"],
            "changed_edges": changed, "n_changed": len(chosen), "n_dead": len(changed) - len(chosen),
            "searchable_edges": searchable,
            "warmup_epochs": report["effective"]["warmup_epochs"], "epochs": rows,
            "collapsed": metric == "accuracy" and val_metric < 0.2}


def summarize(runs):
    """Mean ± std of ``val_acc`` over ``runs``; of ``delta`` and ``n_changed`` too where every run has them."""
    mean, std = mean_std(r["val_acc"] for r in runs)
    out = {"mean": mean, "std": std, "seeds": [r["val_acc"] for r in runs],
           "mean_seconds": statistics.mean(r["seconds"] for r in runs)}
    for key in ("delta", "n_changed"):
        if all(key in r for r in runs):
            out[f"{key}_mean"], out[f"{key}_std"] = mean_std(r[key] for r in runs)
    return out


def which_edges(run):
    """``e2 identity, e6 none (+3 dead)``: the edges the search changed, and how many edges
    pruning then removed as dead."""
    chosen = [f"{e} {d}" for e, d in run["changed_edges"].items() if d in ("none", "identity")]
    dead = len(run["changed_edges"]) - len(chosen)
    return (", ".join(chosen) or "–") + (f" (+{dead} dead)" if dead else "")


def markdown(result, method):
    """The summary (one row per variant) and every run (one row per seed and variant)."""
    lines = ["| variant | mean | std | seeds | Δ vs original, points (mean ± std) | edges changed (mean ± std) "
             "| mean time (s) |", "|---|---|---|---|---|---|---|"]
    for k, s in result["summary"].items():
        delta = f"{100 * s['delta_mean']:+.2f} ± {100 * s['delta_std']:.2f}" if "delta_mean" in s else "–"
        changed = f"{s['n_changed_mean']:.1f} ± {s['n_changed_std']:.1f}" if "n_changed_mean" in s else "–"
        seeds = ", ".join(f"{100 * a:.2f}" for a in s["seeds"])
        lines.append(f"| {k} | {100 * s['mean']:.2f}% | {100 * s['std']:.2f} | {seeds} | {delta} | {changed} "
                     f"| {s['mean_seconds']:.0f} |")
    lines += ["", "| seed | variant | accuracy | original | Δ (points) | edges changed | which (decision) | time (s) |",
              "|---|---|---|---|---|---|---|---|"]
    originals = {r["seed"]: r for r in result["original"]}
    for key, runs in result[method].items():
        for r in runs:
            orig = f"{100 * originals[r['seed']]['val_acc']:.2f}%" if r["seed"] in originals else "–"
            delta = f"{100 * r['delta']:+.2f}" if "delta" in r else "–"
            lines.append(f"| {r['seed']} | {key} | {100 * r['val_acc']:.2f}% | {orig} | {delta} | "
                         f"{r['n_changed']}/{r['searchable_edges']} | {which_edges(r)} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


SAME_BUDGET = ("data", "subset", "test_subset", "epochs", "arch_epochs", "warmup_epochs", "batch_size", "lr",
               "method", "method_option", "train_images", "val_images")


def merge(paths, out):
    """The results in ``paths`` (same budget and method) as one, runs ordered by seed, summary
    recomputed; written to ``out`` with its table. ``wall_seconds`` is the longest of them (the
    processes ran side by side), ``wall_seconds_sum`` their sum."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    first = parts[0]
    method = first["config"]["method"]
    for path, part in zip(paths[1:], parts[1:]):
        differ = [k for k in SAME_BUDGET if part["config"].get(k) != first["config"].get(k)]
        if differ:
            raise SystemExit(f"--merge: {path} differs from {paths[0]} in {', '.join(differ)}")
    result = {"config": first["config"] | {"seeds": sorted({r["seed"] for p in parts for r in p["original"]}),
                                           "merged_from": list(paths)},
              "original": sorted((r for p in parts for r in p["original"]), key=lambda r: r["seed"]), method: {}}
    for part in parts:
        for key, runs in part[method].items():
            result[method].setdefault(key, []).extend(runs)
    for runs in result[method].values():
        runs.sort(key=lambda r: r["seed"])
    result["summary"] = {"original": summarize(result["original"]),
                         **{k: summarize(v) for k, v in result[method].items()}}
    result["wall_seconds"] = max(p["wall_seconds"] for p in parts)
    result["wall_seconds_sum"] = sum(p["wall_seconds"] for p in parts)
    write_text(out, json.dumps(result, indent=2))
    write_text(Path(out).with_suffix(".md"), markdown(result, method))
    print(markdown(result, method))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="join these results into --out (no training)")
    ap.add_argument("--data", default="cifar10")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--subset", type=int, default=10000)
    ap.add_argument("--test-subset", type=int, default=None, help="evaluate on this many test images")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--arch-epochs", type=int, default=5)
    ap.add_argument("--warmup-epochs", type=int, default=None,
                    help="weight warm-up epochs at the start of the architecture stage (default: archir's)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--arch-lr", type=float, nargs="+", default=[0.05])
    ap.add_argument("--shares", nargs="+", default=["cell", "full"],
                    help="values of the method's share option to sweep (ignored by a method without one)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--runs-dir", default=None, help="keep every run's outputs here (one directory per run) "
                    "and write the `archir compare` tables of them beside --out (.compare.md)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cifar10_seeds.json"))
    add_method_arguments(ap)
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, args.out)
    if args.warmup_epochs is not None and not 0 <= args.warmup_epochs <= args.arch_epochs:
        ap.error(f"--warmup-epochs ({args.warmup_epochs}) must lie in 0..--arch-epochs ({args.arch_epochs})")
    if has_option(args.method, "share"):  # one variant per share value, each checked before any training
        variants = {share: method_options(ap, args, overrides={"share": share}) for share in args.shares}
    else:
        variants = {args.method: method_options(ap, args)}
    extra = {} if args.warmup_epochs is None else {"warmup_epochs": args.warmup_epochs}
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    train, val = load_dataset(args.data, args.data_dir, subset=args.subset or None, test_subset=args.test_subset)
    result = {"config": vars(args) | {"device": str(device), "train_images": len(train), "val_images": len(val),
                                      "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
              "original": [], args.method: {}}
    t0 = time.perf_counter()
    run_dirs = []

    def save():  # after every run: nothing finished is lost on an interrupt
        result["summary"] = {"original": summarize(result["original"]),
                             **{k: summarize(v) for k, v in result[args.method].items()}}
        result["wall_seconds"] = time.perf_counter() - t0
        write_text(args.out, json.dumps(result, indent=2))
        write_text(Path(args.out).with_suffix(".md"), markdown(result, args.method))

    for seed in args.seeds:
        original = run_original(seed, train, val, args, device) | {"seed": seed}
        result["original"].append(original)
        print(f"seed {seed} original: {original['val_acc']:.4f} ({original['seconds']:.0f}s)", flush=True)
        save()
        for variant, opts in variants.items():
            for lr in args.arch_lr:
                key = f"{variant}@{lr}"
                out = Path(args.runs_dir) / f"{key}-seed{seed}" if args.runs_dir else None
                r = run_method(seed, args.method, opts, lr, train, val, args, device, out, **extra) | {"seed": seed}
                r["delta"] = r["val_acc"] - original["val_acc"]
                result[args.method].setdefault(key, []).append(r)
                print(f"seed {seed} {args.method} {key}: {r['val_acc']:.4f} (delta {100 * r['delta']:+.2f}) "
                      f"changed {r['n_changed']}/{r['searchable_edges']} {r['changed_edges']} "
                      f"({r['seconds']:.0f}s)", flush=True)
                save()
                if out is not None:
                    run_dirs.append(out)
    print(markdown(result, args.method))
    if run_dirs:  # the runs side by side, mean ± std over seeds (archir compare)
        _, tables = compare_runs(run_dirs)
        write_text(Path(args.out).with_suffix(".compare.md"), render(tables, "markdown"))
        print(render(tables))


if __name__ == "__main__":
    main()
