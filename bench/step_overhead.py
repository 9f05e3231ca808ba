"""Step overhead of a method's supernet (default DNAT) against the original network, one process, same batch.

    python bench/step_overhead.py [--model examples/resnet20.py] [--batch 128] [--steps 3] [--rounds 10]
                                  [--method dnat] [--threads 1] [--kinds original joint joint_mid ...] [--out FILE]

Times the real trainer (``archir.training``) on a loader that yields the same batch every step:
the original network (plain SGD step), the supernet of ``archir.search(model, x, method=...)``
with ``joint`` updates (one backward pass for the architecture parameters and ω) and with
``alternate`` updates (ω then the architecture: two passes), and the derived network of the
network stage (``Search.derive(in_place=True)``): ``net`` derives at the initial architecture
(every edge keeps its operations: the derived network must cost no more than the original). The
method's own step after each architecture update (DNAT: the projection θ ≥ 0) runs from the
Search's optimiser hook, as in any user's loop. Ratios are to the original step measured in the
same run, interleaved: every kind trains in a thread of its own and only one runs at a time, in
turn, one epoch of ``--steps`` steps each; after one warm-up epoch per kind, ``--rounds`` such
rounds are timed and a kind's ratio is the median over rounds of its step time over the
original's step time in the same round (neighbouring in time on a shared machine). DNAT only (``--method dnat``, options ``share=full`` unless ``--method-option`` says
otherwise): ``net_pruned`` forces every edge to its most shrinking valid choice (pruned edges cost
nothing); ``*_mid`` hold θ at (0.1, 0.2, 0.7) (θ's learning rate 0): mid-search, where the mixer
cannot short-cut w = (0, 0, 1); ``joint_mid_unfused`` is DNAT with the option ``fuse=False``
(no fused mixing) to show what fusing saves; ``joint_mid_activations`` is ``joint_mid`` with the
option ``search_activations=True`` (activation-only edges such as post-sum ReLUs mixed too: the
space archir searched before the paper's). Targets: joint ≤ 1.10, alternate ≤ 2.1, net ≤ 1.0.
``--threads N`` sets ``torch.set_num_threads(N)`` first (1 on a shared 2-core machine, so that a
neighbouring job's load hits every kind alike); ``--kinds`` times a subset (``original`` is
always timed: the ratios are to it). Writes bench/results/step_overhead.json (``--out``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import threading
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
DNAT_KINDS = ["original", "joint", "joint_mid", "joint_mid_unfused", "joint_mid_activations", "alternate",
              "alternate_mid", "net", "net_pruned"]
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


class Baton:
    """Lets one kind's trainer run at a time: each kind trains in a thread of its own and hands
    the baton on after every epoch, so consecutive epochs of all kinds are interleaved and a
    neighbour's load changes hit every kind alike (the waiting happens outside the timed part of
    an epoch)."""

    def __init__(self, n):
        self.cv = threading.Condition()
        self.n, self.turn, self.done = n, 0, set()

    def wait(self, i):
        with self.cv:
            self.cv.wait_for(lambda: self.turn == i)

    def hand_on(self, i, finished=False):
        with self.cv:
            if finished:
                self.done.add(i)
            if len(self.done) < self.n:
                j = (i + 1) % self.n
                while j in self.done:
                    j = (j + 1) % self.n
                self.turn = j
            self.cv.notify_all()


def time_steps(kind, model_mod, x, y, steps, device, epochs, method="dnat", options=None, on_epoch=None):
    """Seconds per step of each of ``epochs`` epochs of ``steps`` steps (``on_epoch()`` after each)."""
    update = kind.split("_")[0]
    mid = kind.endswith("_mid") or "_mid_" in kind
    cfg = TrainConfig(epochs=epochs, arch_epochs=epochs if update in ("joint", "alternate") else 0,
                      batch_size=x.shape[0],
                      arch_update=update if update in ("joint", "alternate") else "alternate",
                      arch_lr=0.0 if mid else TrainConfig.arch_lr,
                      device=str(device), progress=False)
    torch.manual_seed(0)
    model = model_mod.build_model()
    loader = SameBatch(x, y, steps)
    times = []

    def record(r):
        times.append(r.train_seconds / r.steps)
        if on_epoch is not None:
            on_epoch()

    if kind == "original":
        train_plain(model, loader, None, cfg, on_epoch=record)
        return times
    options = dict(options or {})
    if kind.endswith("_unfused"):
        options["fuse"] = False  # DNAT without its fused mixing
    if kind.endswith("_activations"):
        options["search_activations"] = True  # the space archir searched before the paper's
    s = archir.search(model, x[:2].cpu(), method=method, **options)
    try:
        if mid:  # θ held inside the simplex, as mid-search: no shortcut for w = (0, 0, 1)
            with torch.no_grad():
                for theta in s.arch_parameters():
                    theta.copy_(torch.tensor(MID_THETA))

        def derive(_supernet):
            if kind == "net_pruned":  # shrink: prefer none, then identity, wherever valid
                force_most_shrinking(s)
            return s.derive(in_place=True)  # the network stage trains the supernet's own parameters

        train_two_stage(s.supernet, s.arch_parameters(), loader, None, cfg, derive=derive, on_epoch=record)
    finally:
        s.close()  # no optimiser hook of this search may outlive its timing
    return times


def time_interleaved(kinds, model_mod, x, y, steps, device, epochs, method, options):
    """Per kind, seconds per step of each epoch; the kinds' epochs run in turn (:class:`Baton`)."""
    baton = Baton(len(kinds))
    results, errors = {}, {}

    def run(i, kind):
        baton.wait(i)
        try:
            results[kind] = time_steps(kind, model_mod, x, y, steps, device, epochs, method, options,
                                       on_epoch=lambda: (baton.hand_on(i), baton.wait(i)))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors[kind] = exc
        finally:
            baton.hand_on(i, finished=True)

    threads = [threading.Thread(target=run, args=(i, k), daemon=True) for i, k in enumerate(kinds)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        kind, exc = next(iter(errors.items()))
        raise RuntimeError(f"timing {kind} failed: {exc}") from exc
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "examples" / "resnet20.py"))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="steps per epoch")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rounds", type=int, default=10,
                    help="timed epochs per kind, interleaved across the kinds (after one warm-up epoch)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "step_overhead.json"))
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--kinds", nargs="+", default=None, help="the kinds to time (default: all of the method's)")
    add_method_arguments(ap)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    options = method_options(ap, args, defaults={"share": "full"})
    device = resolve_device(args.device)
    mod = load(args.model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, *mod.example_input().shape[1:], generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
    kinds = DNAT_KINDS if args.method == "dnat" else KINDS
    if args.kinds:
        unknown = sorted(set(args.kinds) - set(kinds))
        if unknown:
            ap.error(f"unknown kinds {unknown}; choose from {kinds}")
        kinds = ["original"] + [k for k in kinds if k in args.kinds and k != "original"]
    times = time_interleaved(kinds, mod, x, y, args.steps, device, args.rounds + 1, args.method, options)
    samples = {k: v[1:] for k, v in times.items()}  # the first epoch of each kind is its warm-up
    step = {k: statistics.median(v) for k, v in samples.items()}
    # per round: each kind against the original's epoch of the same round (adjacent in time)
    per_round = {k: [t / o for t, o in zip(samples[k], samples["original"])] for k in kinds}
    ratios = {k: statistics.median(v) for k, v in per_round.items()}
    result = {"model": args.model, "batch": args.batch, "device": str(device), "threads": torch.get_num_threads(),
              "steps_per_epoch": args.steps, "rounds": args.rounds, "interleave": "epoch",
              "seconds_per_step": step, "ratio_to_original": ratios,
              "ratio_note": "median over rounds of (kind's seconds per step / the original's in the same round)",
              "ratio_per_round": per_round,
              "targets": {"joint": 1.10, "alternate": 2.1, "net": 1.0}, "samples": samples,
              "torch": torch.__version__, "method": args.method, "method_options": options}
    write_text(args.out, json.dumps(result, indent=2))
    for k in kinds:
        q = sorted(per_round[k])
        print(f"{k:>17}: {1000 * step[k]:8.1f} ms/step  ratio {ratios[k]:.3f}  (rounds {q[0]:.3f}-{q[-1]:.3f})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
