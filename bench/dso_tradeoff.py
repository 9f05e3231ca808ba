"""DSO-NAS's accuracy/cost trade-off on ResNet20 and CIFAR-10 at a CPU-sized budget.

    python bench/dso_tradeoff.py --data-dir ~/.cache/archir-data --subset 4000 --test-subset 2000 \\
        --epochs 6 --arch-epochs 3 --warmup-epochs 1 --gammas 0.05 0.2 [--targets 0.7 0.5] \\
        [--retrain scratch|continue] [--random-draws 2] [--penalty none|flops|mac] [--seed 0]

For each γ (``--gammas``) and each FLOPs target (``--targets``, a fraction of the original's),
``archir.transform(..., method="dso")`` searches and prunes ResNet20 (examples/resnet20.py) with
A architecture epochs (the first W of them weight pre-training), then trains the derived network:
``--retrain scratch`` (the default, the paper's protocol) re-initialises it and trains it for E
epochs, exactly like the controls, so the rows compare *architectures* at equal training;
``--retrain continue`` keeps the searched weights and trains E − A epochs (what a user's default
run does, the search counted in the budget). Against:

* the original, trained alone for the same E epochs (same data, seed, optimiser, schedule);
* random controls per γ/target (``--random-draws``): the same number of λ-scaled edges pruned,
  chosen at random (seeded per draw), through the same derive passes (prune, fold), then trained
  for the same E epochs from scratch;
* with ``--cost-control`` (and ``--penalty flops|mac``), the same number of edges that the
  penalty weighs most, pruned without any search: what the cost prior alone would choose.

Each row: parameters, FLOPs (multiply-adds per example), ONNX Runtime latency at batch 1 and at
``--latency-batch`` (all models exported and timed interleaved in one process,
``archir.comparison.onnx_latencies``), validation accuracy, pruned edges and wall time. Writes
``bench/results/dso_tradeoff.json``, a markdown table and a plot of accuracy against FLOPs
(``.png``) beside it. Unpack
``../shared/data/cifar10-jpg.tar.gz`` into ``~/.cache/archir-data`` first; ``--data digits``
runs offline (a quick check that the script works).
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

import archir
from archir.comparison import onnx_latencies
from archir.data import as_loader, load_dataset
from archir.fileio import write_text
from archir.ir.printer import human
from archir.passes.edge_scale import lambda_of, scale_op, scaled_edges
from archir.training import TrainConfig, resolve_device, train_plain

try:
    from bench.cifar10_seeds import ROOT, build
except ImportError:  # run as a script: bench/ is on sys.path
    from cifar10_seeds import ROOT, build


def train_alone(model, train, val, args, device):
    cfg = TrainConfig(epochs=args.epochs, arch_epochs=0, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      device=str(device), progress=args.progress)
    t = time.perf_counter()
    res = train_plain(model, as_loader(train, args.batch_size, shuffle=True, device=device, seed=args.seed,
                                       augment=True),
                      as_loader(val, 256, device=device), cfg)
    return res.network.cpu().eval(), res.val_metric, time.perf_counter() - t


def run_dso(label, options, train, val, args, device):
    model, x = build(args.seed)
    t = time.perf_counter()
    epochs = args.epochs + (args.arch_epochs if args.retrain == "scratch" else 0)
    res = archir.transform(model, x, "dso", train, val, epochs=epochs, arch_epochs=args.arch_epochs,
                           warmup_epochs=args.warmup_epochs, batch_size=args.batch_size, lr=args.lr,
                           arch_lr=args.arch_lr, split_fraction=args.split_fraction, seed=args.seed,
                           device=str(device), progress=args.progress, onnx=False, penalty=args.penalty,
                           retrain=args.retrain, **options)
    r = res.report
    pruned = [d["edge"] for d in r["decisions"] if d["decision"] == "none" and d.get("param")]
    row = {"variant": label, "options": options, "val_acc": r["transformed"]["val_accuracy"],
           "params": r["transformed"]["parameters"], "flops": r["transformed"]["flops_per_example"],
           "pruned_edges": pruned, "scaled_edges": sum(1 for d in r["decisions"] if d.get("param")),
           "seconds": time.perf_counter() - t,
           "lambda_final": r["arch_history"][-1]["weights"] if r["arch_history"] else None}
    return res.module, row


def run_random(label, k, draw, train, val, args, device, earlier):
    """Prune ``k`` λ-scaled edges chosen at random (λ = 0 there, 1 elsewhere), derive, train E epochs
    (or take the accuracy of the same control from ``earlier`` runs: see :func:`earlier_controls`)."""
    return run_control(label, lambda edges, _search: random.Random(args.seed + 1000 * k + 7 * draw).sample(
        [e.id for e in edges], min(k, len(edges))), train, val, args, device, earlier)


def run_cost(label, k, train, val, args, device, earlier):
    """Prune the ``k`` λ-scaled edges that ``--penalty`` weighs most (ties: the lower edge id), with
    no search at all: what the penalty's cost prior alone would choose."""
    def costliest(edges, s):
        weight = s.method._edge_multipliers(s.graph)
        return sorted((e.id for e in edges), key=lambda eid: (-weight[eid], eid))[:k]
    return run_control(label, costliest, train, val, args, device, earlier)


def run_control(label, choose, train, val, args, device, earlier):
    """Prune the edges ``choose(scaled edges, search)`` names (λ = 0 there, 1 elsewhere), derive,
    train E epochs, or reuse an earlier run's accuracy for the same network."""
    model, x = build(args.seed)
    s = archir.search(model, x, method="dso", penalty=args.penalty)
    edges = scaled_edges(s.graph)
    chosen = set(choose(edges, s))
    with torch.no_grad():
        for e in edges:
            lambda_of(s.graph, scale_op(e)).fill_(0.0 if e.id in chosen else 1.0)
    slim = s.derive()
    flops = archir.trace(slim, x).total_flops()
    row = {"variant": label, "params": sum(p.numel() for p in slim.parameters()), "flops": flops,
           "pruned_edges": sorted(chosen), "scaled_edges": len(edges)}
    before = earlier.get(("random", tuple(sorted(chosen))))
    if before is not None:  # the same network trained the same way: its accuracy, and the module for latency
        return slim.eval(), row | {"val_acc": before["val_acc"], "seconds": before["seconds"], "reused": True}
    net, acc, seconds = train_alone(slim, train, val, args, device)
    return net, row | {"val_acc": acc, "seconds": seconds}


#: what decides a control's accuracy: runs that agree on all of these trained the same networks
CONTROL_CONFIG = ("data", "subset", "test_subset", "epochs", "batch_size", "lr", "seed", "device",
                  "train_images", "val_images", "torch")


def earlier_controls(paths, config) -> dict:
    """``{("original",): row, ("random", pruned edges): row}`` from earlier result files whose
    training configuration (:data:`CONTROL_CONFIG`) equals ``config``: the original and the random
    controls do not depend on the search, so a new run over other DSO settings reuses them."""
    found = {}
    for path in paths:
        earlier = json.loads(Path(path).read_text())
        if any(earlier["config"].get(k) != config.get(k) for k in CONTROL_CONFIG):
            raise SystemExit(f"--reuse {path}: its training configuration differs "
                             f"({', '.join(k for k in CONTROL_CONFIG if earlier['config'].get(k) != config.get(k))})")
        for row in earlier["rows"]:
            if row["variant"] == "original":
                found[("original",)] = row
            elif row["variant"].startswith(("random", "costliest")):
                found[("random", tuple(sorted(row["pruned_edges"])))] = row
    return found


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="cifar10")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--subset", type=int, default=4000)
    ap.add_argument("--test-subset", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--arch-epochs", type=int, default=4)
    ap.add_argument("--warmup-epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--arch-lr", type=float, default=0.05)
    ap.add_argument("--split-fraction", type=float, default=0.5)
    ap.add_argument("--gammas", type=float, nargs="*", default=[0.05, 0.2, 0.5])
    ap.add_argument("--targets", type=float, nargs="*", default=[])
    ap.add_argument("--penalty", default="none", choices=("none", "flops", "mac"))
    ap.add_argument("--no-random", action="store_true", help="skip the random-pruning controls")
    ap.add_argument("--random-draws", type=int, default=2, help="random controls per γ/target")
    ap.add_argument("--retrain", default="scratch", choices=("scratch", "continue"))
    ap.add_argument("--latency-batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--cost-control", action="store_true",
                    help="also a control that prunes the edges --penalty weighs most, without searching")
    ap.add_argument("--reuse", nargs="*", default=[], metavar="JSON",
                    help="earlier results of this script with the same training configuration: their "
                         "original and random controls are not trained again (marked reused)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "dso_tradeoff.json"))
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    kwargs = {"test_subset": args.test_subset} if args.data == "cifar10" else {}
    train, val = load_dataset(args.data, args.data_dir, subset=args.subset or None, **kwargs)
    result = {"config": vars(args) | {"device": str(device), "train_images": len(train), "val_images": len(val),
                                      "torch": torch.__version__}, "rows": []}
    t0 = time.perf_counter()
    earlier = earlier_controls(args.reuse, result["config"])
    modules = {}
    model, x = build(args.seed)
    before = earlier.get(("original",))
    if before is None:
        modules["original"], acc, seconds = train_alone(model, train, val, args, device)
    else:
        modules["original"], acc, seconds = model.eval(), before["val_acc"], before["seconds"]
    orig_graph = archir.trace(modules["original"], x)
    result["rows"].append({"variant": "original", "val_acc": acc, "params": orig_graph.total_params(),
                           "flops": orig_graph.total_flops(), "pruned_edges": [], "seconds": seconds}
                          | ({"reused": True} if before is not None else {}))
    print(f"original: {acc:.4f}", flush=True)
    runs = [(f"dso gamma={g}", {"gamma": g}) for g in args.gammas]
    runs += [(f"dso target={t}", {"target_flops": t}) for t in args.targets]
    for label, options in runs:
        modules[label], row = run_dso(label, options, train, val, args, device)
        result["rows"].append(row)
        print(f"{label}: {row['val_acc']:.4f}, {len(row['pruned_edges'])}/{row['scaled_edges']} edges pruned, "
              f"FLOPs {human(row['flops'])}", flush=True)
        k = len(row["pruned_edges"])
        for draw in range(0 if args.no_random or not k else args.random_draws):
            rlabel = f"random {k} edges #{draw + 1} ({label})"
            modules[rlabel], rrow = run_random(rlabel, k, draw, train, val, args, device, earlier)
            result["rows"].append(rrow)
            if not rrow.get("reused"):
                earlier[("random", tuple(rrow["pruned_edges"]))] = rrow  # a later target with the same k
            print(f"{rlabel}: {rrow['val_acc']:.4f}", flush=True)
        if args.cost_control and k and args.penalty != "none":
            clabel = f"costliest {k} edges by {args.penalty} ({label})"
            modules[clabel], crow = run_cost(clabel, k, train, val, args, device, earlier)
            result["rows"].append(crow)
            earlier.setdefault(("random", tuple(crow["pruned_edges"])), crow)
            print(f"{clabel}: {crow['val_acc']:.4f} ({', '.join(crow['pruned_edges'])})", flush=True)
        write_text(args.out, json.dumps(result, indent=2, default=str))  # nothing lost on interrupt
    for batch in sorted({1, args.latency_batch}):
        inputs = (torch.randn(batch, *x.shape[1:]),)
        lat = onnx_latencies(modules, inputs)
        for row in result["rows"]:
            row[f"onnx_latency_ms_b{batch}"] = (1000 * lat[row["variant"]]["median_seconds"]
                                                if "median_seconds" in lat[row["variant"]] else None)
    result["wall_seconds"] = time.perf_counter() - t0
    write_text(args.out, json.dumps(result, indent=2, default=str))
    b = args.latency_batch
    lines = [f"| variant | val accuracy | parameters | FLOPs | ORT ms (b1) | ORT ms (b{b}) | pruned edges |",
             "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        def ms(key):
            return f"{row[key]:.2f}" if row.get(key) is not None else "–"
        pruned = f"{len(row['pruned_edges'])}/{row.get('scaled_edges', '–')}" if row["variant"] != "original" else "–"
        lines.append(f"| {row['variant']} | {100 * row['val_acc']:.2f}% | {row['params']:,} | {human(row['flops'])} | "
                     f"{ms('onnx_latency_ms_b1')} | {ms(f'onnx_latency_ms_b{b}')} | {pruned} |")
    write_text(Path(args.out).with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(result["rows"], Path(args.out).with_suffix(".png"))


def plot(rows, path):
    """Validation accuracy against FLOPs: the original, each DSO run and its random controls."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, marker in (("original", "*"), ("dso", "o"), ("random", "x"), ("costliest", "s")):
        pts = [(r["flops"] / 1e6, 100 * r["val_acc"]) for r in rows if r["variant"].startswith(kind)]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, s=70 if kind == "original" else 40, label=kind)
    ax.set_xlabel("FLOPs per example (M multiply-adds)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("DSO-NAS on ResNet20: accuracy against FLOPs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
