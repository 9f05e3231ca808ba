"""When does the architecture search start changing edges? A grid of weight warm-up × θ learning rate.

    python bench/warmup_sweep.py --data-dir ~/.cache/archir-data --subset 4000 --test-subset 2000 \\
        --epochs 8 --arch-epochs 4 --warmups 0 1 2 --arch-lrs 0.01 0.05 0.1 --seed 0 --threads 1 \\
        [--original] [--method dnat] [--method-option share=full] [--out bench/results/warmup_sweep.json]
    python bench/warmup_sweep.py --merge A.json B.json --out bench/results/warmup_sweep.json

For each ``warmup_epochs`` W and ``arch_lr`` (θ's learning rate) of the grid, runs
``archir.transform`` on ResNet20 (examples/resnet20.py) with CIFAR-10 (a stratified training
subset, a stratified test subset for validation), E epochs of which A architecture epochs, the
first W of them training the weights only, and records per epoch the validation accuracy and the
edges whose leading choice is no longer the original (number and ids), and per run the final
accuracy, the edges changed in the derived network (id -> none / identity, and those pruning
removed as dead), the first epoch whose
architecture step changed an edge with the validation accuracy after the epoch before it (what
the network knew when θ first flipped an edge; chance: 1 / number of classes), and the wall time.
``--original`` also trains the original network alone on the same budget and seed (reference).

The question: with which warm-up and θ learning rate do edges change only once the network has
learned something (validation accuracy at least ``--min-chance-multiple`` × chance when the first
edge changes), while the search still changes something? A run meets it (``ok``) when it changed
at least one edge and its first change came after such an epoch.
Writes the JSON (after every run) and a markdown table beside it. ``--merge`` joins the runs of
sweeps written separately (same data, budget, seed and method; e.g. a grid extended later) into
``--out`` and rewrites the table, training nothing.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from archir.data import load_dataset
from archir.fileio import write_text
from archir.training import resolve_device

try:
    from bench.cifar10_seeds import ROOT, run_method, run_original, which_edges
    from bench.method_args import add_method_arguments, method_options
except ImportError:  # run as a script: bench/ is on sys.path
    from cifar10_seeds import ROOT, run_method, run_original, which_edges
    from method_args import add_method_arguments, method_options


def first_change(rows, chance):
    """The first epoch after which some edge's leading choice differs from the original, the
    validation accuracy the network had before that epoch's steps (after the previous epoch;
    None for epoch 0), that accuracy as a multiple of chance, and the accuracy after the epoch."""
    previous = None
    for row in rows:
        if row["changed_edges"]:
            return {"epoch": row["epoch"], "val_acc_before": previous,
                    "chance_multiple_before": None if previous is None else previous / chance,
                    "val_acc_after": row["val_acc"], "edges": row["changed_edges"]}
        previous = row["val_acc"]
    return None


def verdict(run, chance, multiple):
    """``ok``: some edge changed, and only after the network reached ``multiple`` × chance."""
    first = run["first_change"]
    if not run["n_changed"] or first is None:
        return "nothing changed"
    before = first["val_acc_before"]
    if before is None or before < multiple * chance:
        return "early"
    return "ok"


def markdown(result):
    cfg = result["config"]
    arch, epochs = cfg["arch_epochs"], cfg["epochs"]
    head = " ".join(f"e{i + 1}{'*' if i < arch else ''}" for i in range(epochs))
    lines = [f"ResNet20, CIFAR-10, {cfg['train_images']} training / {cfg['val_images']} test images, {epochs} epochs "
             f"(* = architecture stage, {arch} epochs, the first W of them weights only), seed {cfg['seed']}, "
             f"{cfg['torch_threads']} thread(s); chance {100 * result['chance']:.0f}%.", "",
             f"| W | θ lr | val acc per epoch (%): {head} | changed per arch epoch | first change: epoch "
             "(acc before it) | edges changed (final) | final acc | Δ vs original | time (s) | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    orig = result.get("original")
    for r in result["runs"]:
        accs = " ".join(f"{100 * e['val_acc']:.1f}" for e in r["epochs"])
        per_epoch = " ".join(str(len(e["changed_edges"])) for e in r["epochs"] if e["changed_edges"] is not None)
        f = r["first_change"]
        before = None if f is None else f["val_acc_before"]
        first = "–" if f is None else f"e{f['epoch'] + 1} ({'–' if before is None else f'{100 * before:.1f}%'})"
        changed = f"{r['n_changed']}/{r['searchable_edges']}: {which_edges(r)}"
        delta = f"{100 * (r['val_acc'] - orig['val_acc']):+.2f}" if orig else "–"
        lines.append(f"| {r['warmup_epochs']} | {r['arch_lr']} | {accs} | {per_epoch} | {first} | {changed} | "
                     f"{100 * r['val_acc']:.2f}% | {delta} | {r['seconds']:.0f} | {r['verdict']} |")
    if orig:
        accs = " ".join(f"{100 * e['val_acc']:.1f}" for e in orig["epochs"])
        lines.append(f"| original | – | {accs} | – | – | – | {100 * orig['val_acc']:.2f}% | – | "
                     f"{orig['seconds']:.0f} | – |")
    lines.append("")
    merged = f" (sum over the merged sweeps {', '.join(cfg['merged_from'])})" if cfg.get("merged_from") else ""
    lines.append(f"Wall time of the sweep: {result['wall_seconds'] / 60:.1f} min{merged}.")
    return "\n".join(lines) + "\n"


SAME_BUDGET = ("data", "subset", "test_subset", "epochs", "arch_epochs", "batch_size", "lr", "seed", "method",
               "method_options", "train_images", "val_images")


def merge(paths, out):
    """The sweeps in ``paths`` as one (runs ordered by warm-up, then θ lr; a grid point in several
    files is kept once, from the first), written to ``out`` with its table. Sweeps of another
    budget or method are refused."""
    sweeps = [json.loads(Path(p).read_text()) for p in paths]
    first = sweeps[0]
    for path, sweep in zip(paths[1:], sweeps[1:]):
        differ = [k for k in SAME_BUDGET if sweep["config"].get(k) != first["config"].get(k)]
        if differ:
            raise SystemExit(f"--merge: {path} differs from {paths[0]} in {', '.join(differ)}")
    runs = {}
    for sweep in sweeps:
        for r in sweep["runs"]:
            runs.setdefault((r["warmup_epochs"], r["arch_lr"]), r)
    result = {"config": first["config"] | {"warmups": sorted({w for w, _ in runs}),
                                           "arch_lrs": sorted({lr for _, lr in runs}), "merged_from": list(paths)},
              "chance": first["chance"], "runs": [runs[k] for k in sorted(runs)],
              "wall_seconds": sum(s["wall_seconds"] for s in sweeps)}
    original = next((s["original"] for s in sweeps if s.get("original")), None)
    if original:
        result["original"] = original
    write_text(out, json.dumps(result, indent=2))
    write_text(Path(out).with_suffix(".md"), markdown(result))
    print(markdown(result))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="join these sweeps' runs into --out (no training)")
    ap.add_argument("--data", default="cifar10")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--subset", type=int, default=4000, help="training images (stratified)")
    ap.add_argument("--test-subset", type=int, default=2000, help="validation (test) images (stratified)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--arch-epochs", type=int, default=4)
    ap.add_argument("--warmups", type=int, nargs="+", default=[0, 1, 2], help="warmup_epochs values")
    ap.add_argument("--arch-lrs", type=float, nargs="+", default=[0.01, 0.05, 0.1], help="arch_lr values")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--original", action="store_true", help="also train the original alone (reference)")
    ap.add_argument("--min-chance-multiple", type=float, default=2.5,
                    help="validation accuracy, as a multiple of chance, wanted before the first change")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "warmup_sweep.json"))
    add_method_arguments(ap)
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, args.out)
    bad = [w for w in args.warmups if not 0 <= w <= args.arch_epochs]
    if bad:
        ap.error(f"--warmups {bad} must lie in 0..--arch-epochs ({args.arch_epochs})")
    options = method_options(ap, args)  # checked before any training
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    train, val = load_dataset(args.data, args.data_dir, subset=args.subset or None, test_subset=args.test_subset)
    chance = 1.0 / train.num_classes
    result = {"config": vars(args) | {"device": str(device), "train_images": len(train), "val_images": len(val),
                                      "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                                      "method_options": options},
              "chance": chance, "runs": []}
    t0 = time.perf_counter()

    def save():
        result["wall_seconds"] = time.perf_counter() - t0
        write_text(args.out, json.dumps(result, indent=2))
        write_text(Path(args.out).with_suffix(".md"), markdown(result))

    # args carries epochs, arch_epochs, batch_size, lr and progress for the shared run helpers
    if args.original:
        result["original"] = run_original(args.seed, train, val, args, device) | {"seed": args.seed}
        print(f"original: {result['original']['val_acc']:.4f} ({result['original']['seconds']:.0f}s)", flush=True)
        save()
    for warmup, arch_lr in itertools.product(args.warmups, args.arch_lrs):
        r = run_method(args.seed, args.method, options, arch_lr, train, val, args, device, warmup_epochs=warmup)
        r |= {"seed": args.seed, "arch_lr": arch_lr, "first_change": first_change(r["epochs"], chance)}
        r["verdict"] = verdict(r, chance, args.min_chance_multiple)
        result["runs"].append(r)
        f = r["first_change"]
        print(f"W={warmup} arch_lr={arch_lr}: acc {r['val_acc']:.4f} changed {r['n_changed']}/{r['searchable_edges']} "
              f"{r['changed_edges']} first change {None if f is None else (f['epoch'], f['val_acc_before'])} "
              f"per epoch {[e['val_acc'] for e in r['epochs']]} {r['verdict']} ({r['seconds']:.0f}s)", flush=True)
        save()
    print(markdown(result))


if __name__ == "__main__":
    main()
