"""How far torchvision's detectors get when traced whole, with their targets, in both modes.

    python bench/detectors_whole.py [NAME ...] [--out bench/results/detectors_whole.json]

A detector's training forward needs targets, so it is traced on ``(images, targets)``: its own
checks on the targets (box shapes, degenerate boxes) become run-time guards (archir/ir/guards.py)
and its two modes (losses in training, detections in eval) one graph (frontends/mode_split.py).
Per detector: the opaque parts archir chose, the graph's size and guards, the round trip against
the original in eval and training mode (the same seed before each call: the heads sample in
training mode) on the example and on images and targets of other sizes, and the DNAT and DSO-NAS
supernets and their derive at initialisation, bit for bit in both modes. Needs torchvision (the
zoo venv, see bench/zoo.py). One torch thread, random weights, two 3x224x224 images (checked on
3x200x260 and 3x240x180), resized by the detectors to 320 pixels (SSD: its own 300 and 320).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import time
import warnings
from pathlib import Path

import torch

DETECTORS = ["fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_resnet50_fpn",
             "fasterrcnn_resnet50_fpn_v2", "fcos_resnet50_fpn", "keypointrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn",
             "maskrcnn_resnet50_fpn_v2", "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "ssd300_vgg16",
             "ssdlite320_mobilenet_v3_large"]


def _same(a, b) -> bool:
    la, lb = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    return len(la) == len(lb) and all(torch.equal(x, y) for x, y in zip(la, lb))


def _targets(*counts: int, classes: int = 10) -> list[dict]:
    out = []
    for n in counts:
        corner = torch.rand(n, 2) * 150
        out.append({"boxes": torch.cat([corner, corner + 10 + torch.rand(n, 2) * 60], 1),
                    "labels": torch.randint(1, classes, (n,)),
                    "masks": torch.zeros(n, 224, 224, dtype=torch.uint8),
                    "keypoints": torch.cat([torch.rand(n, 17, 2) * 200, torch.ones(n, 17, 1)], 2)})
    return out


def _both_modes(model, net, args) -> dict:
    """Whether ``net`` gives ``model``'s outputs in eval and in training mode (copies: a training
    run updates BatchNorm statistics), the same seed before each call."""
    out = {}
    for mode in ("eval", "train"):
        results = []
        for m in (model, net):
            torch.manual_seed(0)
            with torch.no_grad():
                results.append(copy.deepcopy(m).train(mode == "train")(*args))
        out[mode] = _same(*results)
    return out


def measure(name: str) -> dict:
    import torchvision

    import archir
    from archir.ir.guards import graph_guards

    torch.manual_seed(0)
    # images resized to 320 (800 by default): tracing with values holds every activation of a
    # forward, and the ResNet-50 detectors at 800 pixels passed this machine's 23 GiB
    size = {} if name.startswith("ssd") else {"min_size": 320, "max_size": 320}
    model = getattr(torchvision.models.detection, name)(weights=None, weights_backbone=None, **size).eval()
    classes = 2 if name.startswith("keypoint") else 10  # Keypoint R-CNN: person or not
    example = ([torch.rand(3, 224, 224), torch.rand(3, 224, 224)], _targets(2, 3, classes=classes))
    other = ([torch.rand(3, 200, 260), torch.rand(3, 240, 180)], _targets(1, 4, classes=classes))
    for t, img in zip(other[1], other[0]):  # masks and keypoints of these images' sizes
        t["masks"] = torch.zeros(len(t["boxes"]), *img.shape[-2:], dtype=torch.uint8)
    row: dict = {}
    start = time.perf_counter()
    try:
        graph = archir.trace(model, example)
        row["trace_s"] = round(time.perf_counter() - start, 1)
        graph.verify()
        row.update(leaves=sorted(graph.leaves), edges=len(graph.edges), guards=len(graph_guards(graph)),
                   by_mode="archir_by_mode" in dict(graph.root.named_children()))
        lowered = graph.to_module()
        row["roundtrip"] = _both_modes(model, lowered, example)
        row["roundtrip_other_sizes"] = _both_modes(model, lowered, other)
        del graph, lowered
        gc.collect()
        for method in ("dnat", "dso"):
            s = archir.search(model, example, method=method)
            row[method] = {"searchable_edges": len(s.decisions()),
                           "supernet": _both_modes(model, s.supernet, other),
                           "derive": _both_modes(model, s.derive(), other)}
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
    import torchvision

    results = {"torch": torch.__version__, "torchvision": torchvision.__version__,
               "example": "two 3x224x224 images and their targets (2 and 3 boxes), both modes", "models": {}}
    for name in args.names:
        results["models"][name] = row = measure(name)
        print(name, json.dumps(row), flush=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
