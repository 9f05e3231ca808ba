"""Step overhead of a method's supernet (default DNAT) against the original network, one process, same batch.

    python bench/step_overhead.py [--model examples/resnet20.py] [--batch 128] [--steps 20] [--method dnat]

Times the real trainer (``archir.training``) on a loader that yields the same batch every step:
the original network (plain SGD step), the supernet of ``archir.search(model, x, method=...)``
with ``joint`` updates (one backward pass for the architecture parameters and ω) and with
``alternate`` updates (ω then the architecture: two passes), and the derived network of the
network stage (``Search.derive(in_place=True)``): ``net`` derives at the initial architecture
(every edge keeps its operations: the derived network must cost no more than the original). The
method's own step after each architecture update (DNAT: the projection θ ≥ 0) runs from the
Search's optimiser hook, as in any user's loop. Ratios are to the original step measured in the
same run. DNAT only (``--method dnat``, options ``share=full`` unless ``--method-option`` says
otherwise): ``net_pruned`` forces every edge to its most shrinking valid choice (pruned edges cost
nothing); ``*_mid`` hold θ at (0.1, 0.2, 0.7) (θ's learning rate 0): mid-search, where the mixer
cannot short-cut w = (0, 0, 1); ``joint_mid_unfused`` is DNAT with the option ``fuse=False``
(no fused mixing) to show what fusing saves. Targets: joint ≤ 1.10, alternate ≤ 2.1, net ≤ 1.0.
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
from archir.training import TrainConfig, resolve_device, train_plain, train_two_stage

try:
    from bench.method_args import add_method_arguments, method_options
except ImportError:  # run as a script: bench/ is on sys.path
    from method_args import add_method_arguments, method_options

ROOT = Path(__file__).resolve().parent.parent
KINDS = ["original", "joint", "alternate", "net"]
DNAT_KINDS = ["original", "joint", "joint_mid", "joint_mid_unfused", "alternate", "alternate_mid", "net", "net_pruned"]
DNAT_SLOTS = ("none", "identity", "same")  # the layout of a DNAT θ (archir/methods/dnat.py)
MID_THETA = (0.1, 0.2, 0.7)


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


def force_most_shrinking(s) -> None:
    """DNAT, one θ per edge (share=full): every edge's θ one-hot on its most shrinking valid
    choice (none, else identity, else same), checked against ``s.decisions()``."""
    weights, thetas = s.arch_weights(), s.arch_parameters()
    if len(weights) != len(thetas):
        raise SystemExit(f"net_pruned needs one θ per edge (DNAT share=full): {len(weights)} searchable edges, "
                         f"{len(thetas)} architecture parameters")
    wanted = {}
    with torch.no_grad():
        for (eid, choices), theta in zip(weights.items(), thetas):  # share=full: one θ per edge, edge order
            wanted[eid] = "none" if "none" in choices else "identity" if "identity" in choices else "same"
            theta.zero_()
            theta[DNAT_SLOTS.index(wanted[eid])] = 1.0
    got = {eid: d["choice"] for eid, d in s.decisions().items()}
    if got != wanted:
        raise RuntimeError(f"net_pruned: θ did not select the intended choices: {got} != {wanted}")


def time_steps(kind, model_mod, x, y, steps, device, repeats, method="dnat", options=None):
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
        train_plain(model, loader, None, cfg, on_epoch=lambda r: times.append(r.train_seconds / r.steps))
        return statistics.median(times[1:])
    options = dict(options or {})
    if kind.endswith("_unfused"):
        options["fuse"] = False  # DNAT without its fused mixing
    s = archir.search(model, x[:2].cpu(), method=method, **options)
    try:
        if kind.endswith("_mid"):  # θ held inside the simplex, as mid-search: no shortcut for w = (0, 0, 1)
            with torch.no_grad():
                for theta in s.arch_parameters():
                    theta.copy_(torch.tensor(MID_THETA))

        def derive(_supernet):
            if kind == "net_pruned":  # shrink: prefer none, then identity, wherever valid
                force_most_shrinking(s)
            return s.derive(in_place=True)  # the network stage trains the supernet's own parameters

        train_two_stage(s.supernet, s.arch_parameters(), loader, None, cfg, derive=derive,
                        on_epoch=lambda r: times.append(r.train_seconds / r.steps))
    finally:
        s.close()  # no optimiser hook of this search may linger into the next kind's timing
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
    add_method_arguments(ap)
    args = ap.parse_args()
    options = method_options(ap, args, defaults={"share": "full"})
    device = resolve_device(args.device)
    mod = load(args.model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, *mod.example_input().shape[1:], generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
    kinds = DNAT_KINDS if args.method == "dnat" else KINDS
    samples = {k: [] for k in kinds}
    for _ in range(args.rounds):  # interleave so that machine noise hits every kind alike
        for k in kinds:
            samples[k].append(time_steps(k, mod, x, y, args.steps, device, args.repeats, args.method, options))
    step = {k: statistics.median(v) for k, v in samples.items()}
    ratios = {k: step[k] / step["original"] for k in kinds}
    result = {"model": args.model, "batch": args.batch, "device": str(device), "threads": torch.get_num_threads(),
              "seconds_per_step": step, "ratio_to_original": ratios,
              "targets": {"joint": 1.10, "alternate": 2.1, "net": 1.0}, "samples": samples,
              "torch": torch.__version__, "method": args.method, "method_options": options}
    write_text(args.out, json.dumps(result, indent=2))
    for k in kinds:
        print(f"{k:>9}: {1000 * step[k]:8.1f} ms/step  ratio {ratios[k]:.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
