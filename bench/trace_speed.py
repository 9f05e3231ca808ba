"""Time trace + IR + verify + lower on models of 1,000+ fx nodes; target < 1 s per 1,000 nodes.

    python bench/trace_speed.py [--blocks 160] [--repeats 3]

Writes bench/results/trace_speed.json. The model forward is part of tracing (shape recording), so
the models are kept narrow (8 channels, 8x8 images) to measure the compiler, not the convolutions.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import archir
from archir.fileio import write_text


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + x)


class DeepResNet(nn.Module):
    def __init__(self, blocks, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(*[Block(c) for _ in range(blocks)])
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class Layer(nn.Module):
    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads, self.n1, self.n2 = heads, nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(self.n1(x)).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1) * (C // self.heads) ** -0.5).softmax(-1)
        x = x + self.proj((a @ v).transpose(1, 2).reshape(B, N, C))
        return x + self.mlp(self.n2(x))


class DeepTransformer(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.Sequential(*[Layer() for _ in range(layers)])

    def forward(self, x):
        return self.layers(x)


def time_pipeline(model, x, repeats):
    nodes = len(fx.symbolic_trace(model).graph.nodes)
    stages = {"trace": [], "verify": [], "lower": [], "total": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        g = archir.trace(model, x)
        t1 = time.perf_counter()
        g.verify()
        t2 = time.perf_counter()
        g.to_module()
        t3 = time.perf_counter()
        for k, v in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
            stages[k].append(v)
    # the model's own forward (run twice while tracing: a check and the shape recording)
    model.eval()
    with torch.no_grad():
        t = time.perf_counter()
        model(x)
        forward = time.perf_counter() - t
    med = {k: statistics.median(v) for k, v in stages.items()}
    return {"fx_nodes": nodes, "junctions": len(g.junctions), "edges": len(g.edges),
            "seconds": med, "forward_seconds": forward,
            "seconds_per_1000_nodes": med["total"] / nodes * 1000}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=160)
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "trace_speed.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    results = {
        "deep_resnet": time_pipeline(DeepResNet(args.blocks), torch.randn(2, 3, 8, 8), args.repeats),
        "deep_transformer": time_pipeline(DeepTransformer(args.layers), torch.randn(2, 5, 16), args.repeats),
    }
    results["meta"] = {"torch": torch.__version__, "python": platform.python_version(),
                       "threads": torch.get_num_threads(), "target_seconds_per_1000_nodes": 1.0}
    write_text(args.out, json.dumps(results, indent=2))
    for name in ("deep_resnet", "deep_transformer"):
        r = results[name]
        print(f"{name}: {r['fx_nodes']} fx nodes -> {r['junctions']} junctions, {r['edges']} edges; "
              f"trace {r['seconds']['trace']:.3f}s verify {r['seconds']['verify']:.3f}s "
              f"lower {r['seconds']['lower']:.3f}s => {r['seconds_per_1000_nodes']:.3f}s per 1,000 nodes")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
