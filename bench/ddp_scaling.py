"""Data-parallel scaling of archir's trainer: 1 process against N processes, and what the
architecture stage's extra all-reduce of θ costs.

    python bench/ddp_scaling.py [--model examples/resnet20.py] [--batch 64] [--steps 6] [--rounds 3]
                                [--nprocs 1 2] [--device cpu|cuda] [--out bench/results/ddp_scaling.json]

Each configuration starts ``N`` processes (``torch.multiprocessing``, gloo on CPU with one torch
thread each, NCCL with one GPU each under ``--device cuda``) that join a process group exactly as
``archir transform --nproc N`` does (:func:`archir.distributed.setup`) and train the DNAT supernet
of ``--model`` with the real trainer (:func:`archir.training.train_two_stage`, ``alternate``
updates: an ω pass and a θ pass per step, each followed by its gradient all-reduce) on a global
batch of ``--batch`` random CIFAR-shaped images, then the derived network (ω only). Throughput
is global images per second of the training loop (``stage_seconds``), the median over
``--rounds`` runs, and is reported as a ratio to one process measured in the same invocation.

The θ all-reduce is measured in the same processes: the median time of an all-reduce of a
buffer of θ's size and of one of ω's size (after a warm-up), against the measured step time. On
a machine with fewer cores than processes the "speed-up" measures contention, not scaling: the
JSON records ``os.cpu_count()`` beside the numbers. Writes JSON and a short .md to bench/results/.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _RandomBatches:
    """``steps`` global batches of random images and labels (seeded: the same on every rank)."""

    def __init__(self, batch: int, steps: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(batch, 3, 32, 32, generator=g)
        self.y = torch.randint(0, 10, (batch,), generator=g)
        self.steps = steps

    def __len__(self):
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.x, self.y


def _worker(rank: int, size: int, port: int, args, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    import archir
    from archir import distributed
    from archir.training import TrainConfig, train_two_stage

    world = distributed.setup(args.device) if size > 1 else None
    device = world.device if world is not None else torch.device(args.device)
    spec = importlib.util.spec_from_file_location("bench_model", ROOT / args.model)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rounds = []
    for r in range(args.rounds + 1):  # the first round warms up
        torch.manual_seed(0)
        s = archir.search(module.build_model(), torch.randn(2, 3, 32, 32), method="dnat", share="full")
        cfg = TrainConfig(epochs=2, arch_epochs=1, warmup_epochs=0, lr=0.05, arch_lr=0.05, device=str(device),
                          progress=False, arch_update="alternate", grad_clip=5.0)
        loader = _RandomBatches(args.batch, args.steps)
        res = train_two_stage(s.supernet, s.arch_parameters(), loader, None, cfg,
                              derive=lambda _m, s=s: s.derive(in_place=True))
        if r:
            rounds.append({k: args.batch * res.stage_steps[k] / res.stage_seconds[k] for k in ("arch", "net")})
    theta = sum(p.numel() for p in s.arch_parameters())
    omega = sum(p.numel() for p in s.weight_parameters())
    reduce_seconds = {}
    if world is not None:
        import torch.distributed as dist

        for name, n in (("theta", theta), ("omega", omega)):
            buf = torch.zeros(n, device=device)
            times = []
            for i in range(23):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                dist.all_reduce(buf, group=world.group)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= 3:
                    times.append(time.perf_counter() - t)
            reduce_seconds[name] = statistics.median(times)
    if rank == 0:
        queue.put({"rounds": rounds, "theta_numel": theta, "omega_numel": omega, "allreduce_seconds": reduce_seconds})
    if world is not None:
        distributed.teardown()


def run(size: int, args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, size, port, args, queue)) for r in range(size)]
    for p in procs:
        p.start()
    result = queue.get(timeout=1800)
    for p in procs:
        p.join(timeout=120)
    med = {k: statistics.median(r[k] for r in result["rounds"]) for k in ("arch", "net")}
    return {"processes": size, "images_per_second": med, **result}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="examples/resnet20.py")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ddp_scaling.json"))
    args = ap.parse_args()
    results = [run(n, args) for n in args.nprocs]
    base = results[0]["images_per_second"]
    for r in results:
        r["speedup_vs_first"] = {k: r["images_per_second"][k] / base[k] for k in base}
        if r["allreduce_seconds"]:
            step = args.batch / r["images_per_second"]["arch"]  # seconds per architecture-stage step
            r["theta_allreduce_fraction_of_arch_step"] = r["allreduce_seconds"]["theta"] / step
            r["omega_allreduce_fraction_of_arch_step"] = r["allreduce_seconds"]["omega"] / step
    out = {"model": args.model, "global_batch": args.batch, "steps_per_round": args.steps, "rounds": args.rounds,
           "device": args.device, "backend": "nccl" if args.device == "cuda" else "gloo",
           "threads_per_process": args.threads, "cpu_count": os.cpu_count(), "torch": torch.__version__,
           "results": results}
    from archir.fileio import write_text

    path = Path(args.out)
    write_text(path, json.dumps(out, indent=2))
    lines = [f"# DDP scaling ({out['backend']}, {args.model}, global batch {args.batch}, {args.steps} steps x "
             f"{args.rounds} rounds, {args.threads} thread(s) per process, {os.cpu_count()} CPUs)", "",
             "| processes | arch stage img/s | net stage img/s | speed-up arch / net | θ all-reduce | ω all-reduce |",
             "|---|---|---|---|---|---|"]
    for r in results:
        ar = r["allreduce_seconds"]
        fmt = (lambda k, ar=ar, r=r: f"{1e3 * ar[k]:.2f} ms ({100 * r[k + '_allreduce_fraction_of_arch_step']:.3f}% "
               "of a step)" if ar else "–")
        lines.append(f"| {r['processes']} | {r['images_per_second']['arch']:.1f} | {r['images_per_second']['net']:.1f} "
                     f"| {r['speedup_vs_first']['arch']:.2f} / {r['speedup_vs_first']['net']:.2f} | "
                     f"{fmt('theta')} | {fmt('omega')} |")
    write_text(path.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
