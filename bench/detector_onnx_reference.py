"""Is a detector's ONNX mismatch archir's doing, or the exporter's and ONNX Runtime's?

docs/zoo.md exports each whole detector from its emitted model.py and checks it against PyTorch
(``archir.export_onnx``). Where that check fails, this exports torchvision's own detector, as
built for the sweep and never traced by archir, with the same exporter and checks it the same
way, on the same inputs: the same failure there means the difference lies between PyTorch and
ONNX Runtime, not in archir's graph.

    python bench/detector_onnx_reference.py fasterrcnn_resnet50_fpn_v2 [NAME ...]

writes ``bench/results/detector_onnx_reference.json`` (merged with earlier runs).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch

import archir
from archir.backends.onnx_export import OnnxVerificationError
from detectors_whole import _order_free
from zoo import build_model, example_inputs, load

OUT = Path(__file__).parent / "results" / "detector_onnx_reference.json"


def reference(name: str) -> dict:
    """torchvision's own detector exported and checked as docs/zoo.md's row for it was."""
    sel = load()["selection"]["tvtasks"][name]
    torch.manual_seed(0)
    model = build_model("tvtasks", name, sel).eval()
    x = example_inputs(sel)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            report = archir.export_onnx(model, x, Path(tmp) / "reference.onnx")
            verdict = {"passed": report.passed}
        except OnnxVerificationError as exc:
            report, verdict = exc.report, {"passed": False, "error": str(exc).splitlines()[0][:400]}
            # on the example, in any order: do the two runtimes keep the same detections?
            verdict["example_order_free"] = _order_free(model, x, report)
    worst = max(report.errors, key=lambda e: e.worst_excess) if report.errors else None
    return {**verdict, "exporter": report.exporter,
            "worst": None if worst is None else {"output": worst.name, "max_abs_err": worst.max_abs_err,
                                                 "ref_scale": worst.ref_scale, "passed": worst.passed},
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    results.setdefault("versions", {}).update(torch=torch.__version__, archir=archir.__version__)
    for name in args.names:
        results.setdefault("models", {})[name] = row = reference(name)
        print(name, json.dumps(row))
        OUT.write_text(json.dumps(results, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
