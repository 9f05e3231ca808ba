"""Step overhead of the DNAT supernet against the original network, one process, same batch.

    python bench/step_overhead.py [--model examples/resnet20.py] [--batch 128] [--steps 20]

Times the real trainer (``archir.training``) on a loader that yields the same batch every step:
the original network (plain SGD step), the supernet with ``joint`` updates (one backward pass for
θ and ω) and with ``alternate`` updates (ω then θ: two passes), and the derived network of the
network stage: ``net`` derives at θ's initial value (every edge keeps its operations: the derived
network must cost no more than the original), ``net_pruned`` forces every edge to its most
shrinking valid choice (pruned edges cost nothing). Ratios are to the original step measured in
the same run. ``*_mid`` hold θ at (0.1, 0.2, 0.7) (θ's learning rate 0): mid-search, where the
mixer cannot short-cut w = (0, 0, 1); ``joint_mid_unfused`` turns off EdgeChoice's fused mixing
(``fuse=False``) to show what it saves. Targets: joint ≤ 1.10, alternate ≤ 2.1, net ≤ 1.0.
Writes bench/results/step_overhead.json.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
from pathlib import Path

import torch

import archir
from archir.fileio import write_text
from archir.passes.base import PassManager
from archir.passes.derive import Derive, FoldIdentities, Prune
from archir.passes.edge_choice import SLOTS, EdgeChoice, arch_parameters, project_thetas
from archir.training import TrainConfig, resolve_device, train_plain, train_two_stage

ROOT = Path(__file__).resolve().parent.parent


class SameBatch:
    def __init__(self, x, y, steps):
        self.x, self.y, self.steps = x, y, steps

    def __len__(self):
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.x, self.y


def load(path):
    spec = importlib.util.spec_from_file_location("bench_model", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def time_steps(kind, model_mod, x, y, steps, device, repeats):
    """Median seconds per step over ``repeats`` epochs of ``steps`` steps (first epoch = warm-up)."""
    update = kind.split("_")[0]
    cfg = TrainConfig(epochs=repeats + 1, arch_epochs=repeats + 1 if update in ("joint", "alternate") else 0,
                      batch_size=x.shape[0],
                      arch_update=update if update in ("joint", "alternate") else "alternate",
                      arch_lr=0.0 if kind.endswith("_mid") else TrainConfig.arch_lr,
                      device=str(device), progress=False)
    torch.manual_seed(0)
    model = model_mod.build_model()
    loader = SameBatch(x, y, steps)
    times = []
    if kind == "original":
        res = train_plain(model, loader, None, cfg, on_epoch=lambda r: times.append(r.train_seconds / r.steps))
        return statistics.median(times[1:])
    g = archir.trace(model, x[:2].cpu())
    PassManager([EdgeChoice("full", fuse=not kind.endswith("_unfused"))])(g)
    if kind.endswith("_mid"):  # θ held inside the simplex, as mid-search: no shortcut for w = (0, 0, 1)
        with torch.no_grad():
            for theta in arch_parameters(g):
                theta.copy_(torch.tensor([0.1, 0.2, 0.7]))
    sup = g.to_module()

    def derive(_):
        if kind == "net_pruned":  # shrink: prefer none, then identity, wherever valid
            with torch.no_grad():
                for e in g.edges.values():
                    if e.ops and e.ops[0].kind == "choice":
                        choices = e.labels["choices"].split(",")
                        theta = g.root.archir_theta[e.labels["theta"]]
                        theta.zero_()
                        theta[SLOTS.index("none" if "none" in choices else "identity" if "identity" in choices
                                          else "same")] = 1.0
        PassManager([Derive(), Prune(), FoldIdentities()])(g)
        return g.to_module()

    train_two_stage(sup, arch_parameters(g), loader, None, cfg, derive=derive,
                    project_arch=lambda: project_thetas(g),
                    on_epoch=lambda r: times.append(r.train_seconds / r.steps))
    return statistics.median(times[1:])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "examples" / "resnet20.py"))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (noise control)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "step_overhead.json"))
    args = ap.parse_args()
    device = resolve_device(args.device)
    mod = load(args.model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, *mod.example_input().shape[1:], generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
    kinds = ["original", "joint", "joint_mid", "joint_mid_unfused", "alternate", "alternate_mid", "net", "net_pruned"]
    samples = {k: [] for k in kinds}
    for _ in range(args.rounds):  # interleave so that machine noise hits every kind alike
        for k in kinds:
            samples[k].append(time_steps(k, mod, x, y, args.steps, device, args.repeats))
    step = {k: statistics.median(v) for k, v in samples.items()}
    ratios = {k: step[k] / step["original"] for k in kinds}
    result = {"model": args.model, "batch": args.batch, "device": str(device), "threads": torch.get_num_threads(),
              "seconds_per_step": step, "ratio_to_original": ratios,
              "targets": {"joint": 1.10, "alternate": 2.1, "net": 1.0}, "samples": samples,
              "torch": torch.__version__}
    write_text(args.out, json.dumps(result, indent=2))
    for k in kinds:
        print(f"{k:>9}: {1000 * step[k]:8.1f} ms/step  ratio {ratios[k]:.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
