"""NAO vs random search at an equal evaluation budget, on one weight-sharing ResNet20 supernet per seed.

    python bench/nao_vs_random.py --data-dir ~/.cache/archir-data --subset 4000 --test-subset 2000 \\
        --seeds 0 1 2 --supernet-epochs 4 --retrain-epochs 6 --threads 1

Per seed:

1. ``archir.search(resnet20, method="nao")`` (DNAT's choices, one decision per edge: 2.5e8 valid
   architectures), its supernet trained for ``--supernet-epochs`` with uniform random paths on
   90% of the training subset (SGD, cosine, the built-in trainer's ``train_plain``);
2. both strategies score architectures with the same :class:`archir.arch_eval.ArchEvaluator`
   (BatchNorm re-estimated on 4 training batches, then top-1 accuracy on the other 10%):
   NAO (``nao_search``: ``--initial`` + ``--rounds`` x ``--top-k``) and random search
   (``random_search``) with exactly as many evaluations as NAO made, both starting from the
   original architecture;
3. NAO's best, random search's best and the original are each derived from a fresh model of
   the same initialisation and trained alone for ``--retrain-epochs`` on the whole training
   subset (same seed, same batches), then tested on ``--test-subset`` test images.

Writes ``bench/results/nao_vs_random.json`` and ``.md`` (``--out`` changes the stem).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch

import archir
from archir.arch_eval import ArchEvaluator
from archir.data import as_loader, load_dataset, split_train
from archir.fileio import write_text
from archir.methods.nao import nao_search, random_search
from archir.training import TrainConfig, seed_everything, train_plain

ROOT = Path(__file__).resolve().parents[1]


def build(seed: int):
    spec = importlib.util.spec_from_file_location("resnet20", ROOT / "examples" / "resnet20.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    seed_everything(seed)
    return mod.build_model()


def derived(seed: int, arch: dict, x: torch.Tensor):
    """A fresh ResNet20 (initialisation of ``seed``) derived at ``arch`` through DNAT's interface."""
    s = archir.search(build(seed), x, method="dnat", share="full")
    s.method.set_architecture(s.graph, arch)
    module = s.derive()
    s.close()
    return module


def mean_std(values):
    values = list(values)
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_seed(seed, train, test, args):
    x = torch.randn(2, 3, 32, 32)
    t0 = time.perf_counter()
    s = archir.search(build(seed), x, method="nao", seed=seed, share="full")
    weight_part, held_out = split_train(train, 0.1, seed=seed)
    cfg = TrainConfig(epochs=args.supernet_epochs, arch_epochs=0, batch_size=args.batch_size, lr=args.lr,
                      device="cpu", seed=seed, progress=False)
    train_loader = as_loader(weight_part, args.batch_size, shuffle=True, seed=seed, augment=True)
    sup = train_plain(s.supernet, train_loader, None, cfg)
    supernet_seconds = time.perf_counter() - t0
    s.method.sampling = False  # from here on the strategies fix the architecture
    evaluator = ArchEvaluator(as_loader(held_out, 256, shuffle=False), train_loader, calibration_batches=4)
    tokens, graph = s.method.tokens, s.graph
    original = s.method.space.original_architecture(graph)

    def score(archs):
        out = []
        for a in archs:
            s.method.space.set_architecture(graph, a)
            out.append(evaluator.score(s.supernet))
        return out

    t = time.perf_counter()
    nao = nao_search(tokens, score, initial=args.initial, rounds=args.rounds, top_k=args.top_k,
                     nao_epochs=args.nao_epochs, seed=seed, original=original,
                     log=lambda line: print(f"  seed {seed} {line}", flush=True))
    nao_seconds = time.perf_counter() - t
    budget = len(nao["history"])
    t = time.perf_counter()
    rand = random_search(tokens, score, budget, seed=seed + 1000, original=original)
    rand_seconds = time.perf_counter() - t
    original_score = nao["history"][0]["score"]
    print(f"seed {seed}: {budget} evaluations each; shared-weight held-out accuracy: original "
          f"{original_score:.4f}, NAO best {nao['best_score']:.4f}, random best {rand['best_score']:.4f}",
          flush=True)

    retrained = {}
    cfg_r = TrainConfig(epochs=args.retrain_epochs, arch_epochs=0, batch_size=args.batch_size, lr=args.lr,
                        device="cpu", seed=seed, progress=False)
    for name, arch in (("original", original), ("nao", nao["best"]), ("random", rand["best"])):
        if name != "original" and arch == original:
            retrained[name] = dict(retrained["original"], same_as_original=True)
            continue
        t = time.perf_counter()
        module = derived(seed, arch, x)
        res = train_plain(module, as_loader(train, args.batch_size, shuffle=True, seed=seed, augment=True),
                          as_loader(test, 256, shuffle=False), cfg_r)
        retrained[name] = {"test_acc": res.val_metric, "parameters": sum(p.numel() for p in module.parameters()),
                           "changed": sorted(d for d, c in arch.items() if c != original[d]),
                           "seconds": time.perf_counter() - t}
        print(f"  seed {seed} retrained {name}: test accuracy {res.val_metric:.4f}, "
              f"{retrained[name]['parameters']:,} parameters", flush=True)
    s.close()
    return {"seed": seed, "evaluations": budget, "supernet_train_acc": sup.history[-1]["train_metric"],
            "original_score": original_score,
            "nao": {"best_score": nao["best_score"], "best": nao["best"], "seconds": nao_seconds,
                    "rounds": nao["rounds"], "scores": [h["score"] for h in nao["history"]]},
            "random": {"best_score": rand["best_score"], "best": rand["best"], "seconds": rand_seconds,
                       "scores": [h["score"] for h in rand["history"]]},
            "retrained": retrained, "supernet_seconds": supernet_seconds,
            "evaluation_seconds_mean": (nao_seconds + rand_seconds) / (2 * budget)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="~/.cache/archir-data")
    ap.add_argument("--subset", type=int, default=4000)
    ap.add_argument("--test-subset", type=int, default=2000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--supernet-epochs", type=int, default=4)
    ap.add_argument("--retrain-epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--initial", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--nao-epochs", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "nao_vs_random"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train, test = load_dataset("cifar10", args.data_dir, subset=args.subset, test_subset=args.test_subset, seed=0)
    t0 = time.perf_counter()
    runs = [run_seed(seed, train, test, args) for seed in args.seeds]
    summary = {}
    for key in ("original_score",):
        summary[key] = mean_std(r[key] for r in runs)
    for strat in ("nao", "random"):
        summary[f"{strat}_best_score"] = mean_std(r[strat]["best_score"] for r in runs)
    for name in ("original", "nao", "random"):
        summary[f"retrained_{name}_test_acc"] = mean_std(r["retrained"][name]["test_acc"] for r in runs)
    summary["nao_beats_random_shared_weights"] = sum(r["nao"]["best_score"] > r["random"]["best_score"] for r in runs)
    summary["nao_ties_random_shared_weights"] = sum(r["nao"]["best_score"] == r["random"]["best_score"] for r in runs)
    out = {"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "seconds": time.perf_counter() - t0, "summary": summary, "runs": runs}
    stem = Path(args.out)
    write_text(stem.with_suffix(".json"), json.dumps(out, indent=2, default=str))
    lines = [f"# NAO vs random search (ResNet20, CIFAR-10 {args.subset} training / {args.test_subset} test images)",
             "",
             f"Supernet: {args.supernet_epochs} epochs of uniform random paths (DNAT space, full sharing) on 90% of "
             f"the training images; architectures scored with shared weights on the other 10% (BatchNorm "
             f"re-estimated first). NAO: {args.initial} initial + {args.rounds} rounds x {args.top_k}; random "
             f"search: the same number of evaluations. Retrained: {args.retrain_epochs} epochs from scratch, "
             f"same seed. {torch.get_num_threads()} thread(s), {out['seconds'] / 60:.1f} min.",
             "",
             "| seed | evals | original (shared) | NAO best (shared) | random best (shared) | original retrained | "
             "NAO retrained | random retrained |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        rt = r["retrained"]
        lines.append(f"| {r['seed']} | {r['evaluations']} | {r['original_score']:.2%} | {r['nao']['best_score']:.2%} | "
                     f"{r['random']['best_score']:.2%} | {rt['original']['test_acc']:.2%} | "
                     f"{rt['nao']['test_acc']:.2%} ({len(rt['nao']['changed'])} changed) | "
                     f"{rt['random']['test_acc']:.2%} ({len(rt['random']['changed'])} changed) |")
    m = summary
    lines += ["", f"Mean ± std: shared-weight best NAO {m['nao_best_score'][0]:.2%} ± {m['nao_best_score'][1]:.2%}, "
              f"random {m['random_best_score'][0]:.2%} ± {m['random_best_score'][1]:.2%} (NAO higher on "
              f"{m['nao_beats_random_shared_weights']} of {len(runs)} seeds, equal on "
              f"{m['nao_ties_random_shared_weights']}); retrained test accuracy original "
              f"{m['retrained_original_test_acc'][0]:.2%} ± {m['retrained_original_test_acc'][1]:.2%}, NAO "
              f"{m['retrained_nao_test_acc'][0]:.2%} ± {m['retrained_nao_test_acc'][1]:.2%}, random "
              f"{m['retrained_random_test_acc'][0]:.2%} ± {m['retrained_random_test_acc'][1]:.2%}."]
    write_text(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
