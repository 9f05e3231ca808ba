"""How far torchvision's detectors get when traced whole, in eval mode only.

    python bench/detectors_whole.py [NAME ...] [--out bench/results/detectors_whole.json]

archir keeps a graph traced through a model's own glue code (``frontends/value_trace.py``) only
where it matches the model in eval *and* in training mode, and a torchvision detector's training
forward cannot be checked (it needs targets, and with them it tests their values for degenerate
boxes, a condition the value tracer refuses). So ``archir.trace`` refuses the whole detector and
archir searches inside its backbone. This benchmark measures the other half: with the
training-mode check lifted (below, for this measurement only), per detector, the opaque parts
archir chooses, the graph's size, the round trip against the original on the example and on
images of other sizes, and the DNAT and DSO-NAS supernets and their derive at initialisation,
all bit for bit in eval mode. Needs torchvision (the zoo venv, see bench/zoo.py). One torch
thread, random weights, two 3x224x224 images (checked on 3x200x260 and 3x240x180), resized by
the detectors to 320 pixels (SSD: its own 300 and 320).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import warnings
from pathlib import Path

import torch

DETECTORS = ["fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_resnet50_fpn",
             "fasterrcnn_resnet50_fpn_v2", "fcos_resnet50_fpn", "keypointrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn",
             "maskrcnn_resnet50_fpn_v2", "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "ssd300_vgg16",
             "ssdlite320_mobilenet_v3_large"]


def _eval_mode_only() -> None:
    """Lift the training-mode half of the frontend's check (this measurement only)."""
    trace_module = sys.modules["archir.frontends.trace"]
    check = trace_module._mode_problem
    trace_module._mode_problem = lambda *a: (lambda p: None if p and p[0] else p)(check(*a))


def _same(a, b) -> bool:
    la, lb = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    return len(la) == len(lb) and all(torch.equal(x, y) for x, y in zip(la, lb))


def measure(name: str) -> dict:
    import torchvision

    import archir

    torch.manual_seed(0)
    # images resized to 320 (800 by default): tracing with values holds every activation of a
    # forward, and the ResNet-50 detectors at 800 pixels passed this machine's 23 GiB
    size = {} if name.startswith("ssd") else {"min_size": 320, "max_size": 320}
    model = getattr(torchvision.models.detection, name)(weights=None, weights_backbone=None, **size).eval()
    images = [torch.rand(3, 224, 224), torch.rand(3, 224, 224)]
    other = [torch.rand(3, 200, 260), torch.rand(3, 240, 180)]
    row: dict = {}
    start = time.perf_counter()
    try:
        graph = archir.trace(model, (images,))
        row["trace_s"] = round(time.perf_counter() - start, 1)
        graph.verify()
        row.update(leaves=sorted(graph.leaves), edges=len(graph.edges))
        lowered = graph.to_module().eval()
        with torch.no_grad():
            row["roundtrip"] = _same(model(images), lowered(images))
            row["roundtrip_other_sizes"] = _same(model(other), lowered(other))
        del graph, lowered
        gc.collect()
        for method in ("dnat", "dso"):
            s = archir.search(model, (images,), method=method)
            with torch.no_grad():
                row[method] = {"searchable_edges": len(s.decisions()),
                               "supernet_exact": _same(model(other), s.supernet.eval()(other)),
                               "derive_exact": _same(model(other), s.derive().eval()(other))}
            del s
            gc.collect()
    except Exception as exc:  # noqa: BLE001 - recorded per model
        row["error"] = f"{type(exc).__name__}: {exc}"[-600:]
    row["total_s"] = round(time.perf_counter() - start, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=DETECTORS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "detectors_whole.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import archir.frontends.trace  # noqa: F401 - the module _eval_mode_only patches

    _eval_mode_only()
    import torchvision

    results = {"torch": torch.__version__, "torchvision": torchvision.__version__, "mode": "eval only",
               "models": {}}
    for name in args.names:
        results["models"][name] = row = measure(name)
        print(name, json.dumps(row), flush=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
