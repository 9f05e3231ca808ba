"""How far torchvision's detectors get when traced whole, with their targets, in both modes.

    python bench/detectors_whole.py [NAME ...] [--out bench/results/detectors_whole.json]

A detector's training forward needs targets, so it is traced on ``(images, targets)``: its own
checks on the targets (box shapes, degenerate boxes) become run-time guards (archir/ir/guards.py)
and its two modes (losses in training, detections in eval) one graph (frontends/mode_split.py).
Per detector: the opaque parts archir chose, the graph's size and guards, the round trip against
the original in eval and training mode (the same seed before each call: the heads sample in
training mode) on the example and on images and targets of other sizes, and the DNAT and DSO-NAS
supernets and their derive at initialisation, bit for bit in both modes; the emitted model.py
(which imports torchvision for the opaque parts), bit for bit in both modes; and the ONNX export
against ONNX Runtime in eval mode, with the score thresholds at 0 so that random weights still give
detections to compare (how many is recorded). Needs torchvision (the zoo venv, see bench/zoo.py).
One torch thread, random weights, two 3x224x224 images (checked on 3x200x260 and 3x240x180),
resized by the detectors to 320 pixels (SSD: its own 300 and 320).

``--checks emit,onnx`` runs some checks only; their results replace those fields of the models'
rows in ``--out`` and keep the others.
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


CHECKS = ("roundtrip", "dnat", "dso", "emit", "onnx")


def _detector(name: str, **options):
    import torchvision

    torch.manual_seed(0)
    # images resized to 320 (800 by default): tracing with values holds every activation of a
    # forward, and the ResNet-50 detectors at 800 pixels passed this machine's 23 GiB
    size = {} if name.startswith("ssd") else {"min_size": 320, "max_size": 320}
    return getattr(torchvision.models.detection, name)(weights=None, weights_backbone=None, **size, **options).eval()


def _emitted(model, lowered, example, other, out_dir: Path) -> dict:
    """model.py and weights.pt written from the lowered graph and loaded back: bit for bit with
    the detector in both modes, on the example and on the other sizes."""
    import importlib.util

    from archir.backends.standalone import emit_standalone

    start = time.perf_counter()
    files = emit_standalone(lowered, out_dir, example_inputs=example)
    spec = importlib.util.spec_from_file_location(f"_emitted_{out_dir.name}", files.model_py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    emitted = module.load_model()
    text = files.model_py.read_text()
    return {"example": _both_modes(model, emitted, example), "other_sizes": _both_modes(model, emitted, other),
            "imports": sorted({line.split()[1].split(".")[0] for line in text.splitlines()
                               if line.startswith("import ")}),
            "lines": len(text.splitlines()), "emit_s": round(time.perf_counter() - start, 1)}


def _onnx(name: str, example, out_dir: Path) -> dict:
    """The detector with its score thresholds at 0 (random weights score low: with the default
    thresholds there would be no detection to compare), traced whole and exported; ONNX Runtime
    against the lowered graph in eval mode (:func:`_order_free` too)."""
    import archir
    from archir.backends.onnx_export import export_onnx

    threshold = {"box_score_thresh": 0.0} if "rcnn" in name else {"score_thresh": 0.0}
    model = _detector(name, **threshold)
    start = time.perf_counter()
    lowered = archir.trace(model, example).to_module().eval()
    with torch.no_grad():
        detections = [len(d["boxes"]) for d in lowered(*example)]
    report = export_onnx(lowered, example, out_dir / f"{name}.onnx", dynamic_batch=False)
    worst = max(report.errors, key=lambda e: e.worst_excess)
    return {"passed": report.passed, "exporter": report.exporter, "detections": detections,
            "max_abs_err": max(e.max_abs_err for e in report.errors), "worst_output": worst.name,
            **_order_free(lowered, example, report), "notes": report.notes,
            "onnx_s": round(time.perf_counter() - start, 1)}


def _order_free(lowered, example, report) -> dict:
    """ONNX Runtime's detections against PyTorch's without their order. Random weights score
    nearly every box alike (SSD's exactly alike: 1/91), so which of the tied boxes top-k and NMS
    keep, and in which order, is the implementation's choice: compare the sorted scores, and count
    the ONNX boxes that PyTorch also gives (same label, coordinates within 1e-3 of the largest)."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(report.path, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    leaves = torch.utils._pytree.tree_leaves(example)
    feeds = {n: t.numpy() for n, t in zip(report.input_names, leaves) if n in wanted}
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    with torch.no_grad():
        expected = lowered(*example)
    score_err, matched, total = 0.0, 0, 0
    for i, d in enumerate(expected):
        ours = {k: d[k].numpy() for k in ("boxes", "labels", "scores")}
        theirs = {k: got[f"output_{i}.{k}"] for k in ("boxes", "labels", "scores")}
        n = min(len(ours["scores"]), len(theirs["scores"]))
        score_err = max(score_err, float(np.abs(np.sort(ours["scores"])[::-1][:n]
                                                - np.sort(theirs["scores"])[::-1][:n]).max(initial=0.0)))
        scale = max(1.0, float(np.abs(ours["boxes"]).max(initial=0.0)))
        for box, label in zip(theirs["boxes"], theirs["labels"]):
            gap = np.abs(ours["boxes"] - box).max(1, initial=0.0)
            matched += bool(((gap < 1e-3 * scale) & (ours["labels"] == label)).any())
        total += len(theirs["boxes"])
    return {"onnx_inputs": sorted(wanted), "sorted_scores_max_abs_err": score_err,
            "boxes_also_in_pytorch": f"{matched}/{total}"}


def measure(name: str, checks=CHECKS, out_dir: Path = Path("/tmp/archir_detectors")) -> dict:
    import archir
    from archir.ir.guards import graph_guards

    model = _detector(name)
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
        if "roundtrip" in checks:
            row["roundtrip"] = _both_modes(model, lowered, example)
            row["roundtrip_other_sizes"] = _both_modes(model, lowered, other)
        if "emit" in checks:
            row["emitted"] = _emitted(model, lowered, example, other, out_dir / name)
        del graph, lowered
        gc.collect()
        if "onnx" in checks:
            row["onnx"] = _onnx(name, example, out_dir)
            gc.collect()
        for method in [m for m in ("dnat", "dso") if m in checks]:
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
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated, of {', '.join(CHECKS)}")
    args = parser.parse_args()
    checks = args.checks.split(",")
    if set(checks) - set(CHECKS):
        parser.error(f"unknown checks {sorted(set(checks) - set(CHECKS))}; choose from {', '.join(CHECKS)}")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import torchvision

    results = {"torch": torch.__version__, "torchvision": torchvision.__version__,
               "example": "two 3x224x224 images and their targets (2 and 3 boxes), both modes", "models": {}}
    if set(checks) != set(CHECKS) and args.out.exists():
        results = {**json.loads(args.out.read_text()), "torch": torch.__version__,
                   "torchvision": torchvision.__version__}
    for name in args.names:
        row = measure(name, checks)
        earlier = {k: v for k, v in results["models"].get(name, {}).items() if k != "error"}
        results["models"][name] = {**earlier, **row}
        print(name, json.dumps(row), flush=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
