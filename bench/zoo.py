"""Trace the real model zoos: torchvision classification models and one model per timm family.

Not part of CI: it needs torchvision and timm, which archir does not depend on. Run it in its own
virtual environment::

    python3 -m venv /tmp/zoo-venv
    /tmp/zoo-venv/bin/pip install torch torchvision timm onnx onnxscript onnxruntime networkx click \\
        tqdm scikit-learn matplotlib pillow
    /tmp/zoo-venv/bin/pip install --no-deps -e .
    /tmp/zoo-venv/bin/python bench/zoo.py --suite torchvision      # then --suite timm
    /tmp/zoo-venv/bin/python bench/zoo.py --report                 # docs/zoo.md from the JSON

For every model (random weights, eval mode, batch 1) and each step's wall time:

1. **trace**: ``archir.trace(model, x)`` (torch.fx, torch.export fallback, automatic leaves) and
   ``graph.verify()``: which frontend, how many opaque leaves and why;
2. **round trip**: the lowered GraphModule against the model (max abs error; exact = ``torch.equal``);
3. **supernet parity** (``edgechoice`` in the JSON): ``archir.search(model, x, method=--method)``
   (default DNAT with its default ``share=cell``; ``--method-option`` for others), its supernet at
   initialisation (DNAT: θ = (0, 0, 1)) against the model, and how many searchable edges it has.
   Its time includes the search's own trace of a copy of the model (records from before
   ``archir.search`` reused step 1's graph and leave that trace out);
4. **emit**: ``archir.transform(model, x, method, epochs=0, onnx=False, out=tmp)`` writes model.py +
   weights.pt (backends/standalone/); the emitted module, loaded from disk, against the model;
5. **onnx**: ``archir.export_onnx`` of the emitted module (the lowered module where emitting
   failed) checked against ONNX Runtime; skipped, and recorded as skipped, over ``--onnx-max-params``.

Models: ``torchvision.models.list_models(module=torchvision.models)`` with at most 60M parameters
(224x224 input); timm: ``timm.list_models()`` grouped into families by the leading run of
lowercase letters of the name (``resnet50d`` and ``resnet18`` -> ``resnet``; ``efficientnet_b0``
-> ``efficientnet``; ``lambda_resnet26rpt_256`` -> ``lambda``), and per family the first model in
alphabetical order with at most 60M parameters whose default input is 224x224, or, where the
family has none at 224x224, the first with at most 60M parameters at its default input size.

Results go to ``bench/results/zoo.json`` after every model (resumable: models already recorded are
skipped; a model whose process died mid-run is retried once, then recorded as crashed). Each model
runs under a time limit; every failure is recorded with its step and the error's first line.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import json
import re
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

from archir.fileio import write_text

try:
    from bench.method_args import add_method_arguments, method_options
except ImportError:  # run as a script: bench/ is on sys.path
    from method_args import add_method_arguments, method_options

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "zoo.json"
DOC = ROOT / "docs" / "zoo.md"
MAX_PARAMS = 60_000_000


# ---- results file (shared by concurrent sweeps: read-modify-write under a lock) --------------
@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def load(path: Path = RESULTS) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"meta": {}, "selection": {}, "models": {}}


def update(path: Path, fn) -> dict:
    with _locked(path):
        data = load(path)
        fn(data)
        write_text(path, json.dumps(data, indent=1, sort_keys=True, default=str))
        return data


# ---- model lists -------------------------------------------------------------------------------
def family(name: str) -> str:
    return re.match(r"[a-z]*", name).group(0) or name


def _count_params(build) -> int:
    try:
        with torch.device("meta"):  # fast: no weights are allocated or initialised
            model = build()
    except Exception:  # noqa: BLE001 - some constructors copy data at init: build for real
        model = build()
    return sum(p.numel() for p in model.parameters())


def torchvision_selection() -> dict[str, dict]:
    import torchvision

    out = {}
    for name in sorted(torchvision.models.list_models(module=torchvision.models)):
        try:
            n = _count_params(lambda: torchvision.models.get_model(name, weights=None))
        except Exception as exc:  # noqa: BLE001
            out[name] = {"suite": "torchvision", "name": name, "excluded": f"cannot build: {_first(exc)}"}
            continue
        size = [3, 299, 299] if name == "inception_v3" else [3, 224, 224]
        rec = {"suite": "torchvision", "name": name, "params": n, "input": [1, *size]}
        if n > MAX_PARAMS:
            rec["excluded"] = f"{n / 1e6:.1f}M parameters > 60M"
        out[name] = rec
    return out


def timm_selection() -> dict[str, dict]:
    import timm

    families: dict[str, list[str]] = {}
    for name in timm.list_models():
        families.setdefault(family(name), []).append(name)
    out = {}
    for fam, names in families.items():
        fallback, chosen, seen = None, None, []
        for name in names:
            cfg = timm.get_pretrained_cfg(name)
            size = list(cfg.input_size) if cfg is not None and cfg.input_size else [3, 224, 224]
            if fallback is not None and size[1:] != [224, 224]:
                continue  # only a 224x224 model can still beat the fallback
            try:
                n = _count_params(lambda: timm.create_model(name, pretrained=False))
            except Exception as exc:  # noqa: BLE001
                seen.append(f"{name}: cannot build ({_first(exc)})")
                continue
            if n > MAX_PARAMS:
                continue
            rec = {"suite": "timm", "family": fam, "name": name, "params": n, "input": [1, *size]}
            if size[1:] == [224, 224]:
                chosen = rec
                break
            fallback = fallback or rec
        chosen = chosen or fallback
        if chosen is None:
            out[fam] = {"suite": "timm", "family": fam, "name": None,
                        "excluded": f"no model with <= 60M parameters ({len(names)} models)"}
        else:
            out[fam] = chosen
    return out


def build_model(suite: str, name: str) -> torch.nn.Module:
    if suite == "torchvision":
        import torchvision

        return torchvision.models.get_model(name, weights=None)
    import timm

    return timm.create_model(name, pretrained=False)


# ---- one model -----------------------------------------------------------------------------------
def _first(exc: BaseException, limit: int = 300) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def compare(expected, got) -> dict:
    a, b = _tensors(expected), _tensors(got)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return {"exact": False, "max_abs": None, "note": "output structure or shapes differ"}
    diff = max(((x.double() - y.double()).abs().max().item() if x.numel() else 0.0) for x, y in zip(a, b))
    return {"exact": all(torch.equal(x, y) for x, y in zip(a, b)), "max_abs": diff}


class StepTimeout(Exception):
    pass


def _alarm(signum, frame):  # noqa: ARG001
    raise StepTimeout("per-model time limit reached")


def _load_emitted(directory: Path) -> torch.nn.Module:
    spec = importlib.util.spec_from_file_location(f"zoo_emitted_{abs(hash(directory))}", directory / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.load_model().eval()


def run_model(sel: dict, args) -> dict:
    import archir

    method, options = getattr(args, "method", "dnat"), getattr(args, "options", {})
    rec = {k: sel[k] for k in ("suite", "name", "family", "input", "params") if k in sel}
    rec.update(status="ok", times={}, steps={})
    times, steps = rec["times"], rec["steps"]
    step = "build"

    def timed(name):
        nonlocal step
        step = name
        return _Timer(times, name)

    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(args.timeout)
    try:
        with timed("build"):
            torch.manual_seed(0)
            model = build_model(sel["suite"], sel["name"]).eval()
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(sel["input"], generator=gen)
            with torch.no_grad():
                ref = model(x)
        with timed("trace"):
            try:
                graph = archir.trace(model, x)
                graph.verify()
            except Exception as exc:  # noqa: BLE001
                steps["trace"] = {"ok": False, "error": _first(exc)}
                rec["status"] = "trace failed"
                return rec
        rec["frontend"] = graph.frontend
        rec["leaves"] = dict(graph.leaves)
        rec["junctions"], rec["edges"] = len(graph.junctions), len(graph.edges)
        steps["trace"] = {"ok": True}

        lowered = None
        with timed("roundtrip"):
            try:
                lowered = graph.to_module().eval()
                with torch.no_grad():
                    steps["roundtrip"] = {"ok": None, **compare(ref, lowered(x))}
                steps["roundtrip"]["ok"] = steps["roundtrip"]["exact"]
            except Exception as exc:  # noqa: BLE001
                steps["roundtrip"] = {"ok": False, "error": _first(exc)}

        with timed("edgechoice"):  # the JSON keeps the step's old name
            try:
                search = archir.search(model, x, method, **options)
                choices = len(search.arch_weights())  # searchable edges
                sup = search.supernet.eval()
                with torch.no_grad():
                    steps["edgechoice"] = {"ok": None, "choice_edges": choices, **compare(ref, sup(x))}
                steps["edgechoice"]["ok"] = steps["edgechoice"]["exact"]
                search.close()
                del search, sup
            except Exception as exc:  # noqa: BLE001
                steps["edgechoice"] = {"ok": False, "error": _first(exc)}

        onnx_module = lowered
        with tempfile.TemporaryDirectory() as tmp, timed("emit"):
            try:
                res = archir.transform(model, x, method, epochs=0, onnx=False, out=Path(tmp) / "out",
                                       progress=False, **options)
                emitted = _load_emitted(Path(tmp) / "out")
                with torch.no_grad():
                    steps["emit"] = {"ok": None, **compare(ref, emitted(x))}
                steps["emit"]["ok"] = steps["emit"]["exact"]
                onnx_module = emitted
                del res
            except Exception as exc:  # noqa: BLE001
                steps["emit"] = {"ok": False, "error": _first(exc)}

        params = sel.get("params") or 0
        if args.skip_onnx:
            steps["onnx"] = {"ok": None, "skipped": "--skip-onnx"}
        elif params > args.onnx_max_params:
            steps["onnx"] = {"ok": None, "skipped": f"{params / 1e6:.1f}M parameters > --onnx-max-params "
                                                    f"{args.onnx_max_params / 1e6:.0f}M (CPU time)"}
        elif onnx_module is None:
            steps["onnx"] = {"ok": None, "skipped": "no module to export (round trip failed)"}
        else:
            with tempfile.TemporaryDirectory() as tmp, timed("onnx"):
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        report = archir.export_onnx(onnx_module, x, Path(tmp) / "model.onnx")
                    worst = report.worst()
                    steps["onnx"] = {"ok": bool(report.passed), "exporter": report.exporter,
                                     "module": "emitted" if onnx_module is not lowered else "lowered",
                                     "nodes": report.num_nodes,
                                     "worst": None if worst is None else _jsonable(worst)}
                except Exception as exc:  # noqa: BLE001
                    steps["onnx"] = {"ok": False, "error": _first(exc)}
    except StepTimeout:
        steps[step] = {"ok": False, "error": f"timeout: more than {args.timeout} s for the whole model"}
        rec["status"] = f"timeout in {step}"
    except Exception as exc:  # noqa: BLE001
        steps[step] = {"ok": False, "error": _first(exc)}
        rec["status"] = f"{step} failed"
        rec["traceback"] = traceback.format_exc(limit=-4)
    finally:
        signal.alarm(0)
    if rec["status"] == "ok":
        bad = [k for k, v in steps.items() if v.get("ok") is False]
        rec["status"] = "ok" if not bad else "failed: " + ", ".join(bad)
    return rec


def _jsonable(obj):
    import dataclasses

    if dataclasses.is_dataclass(obj):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, float) and obj != obj:
        return None
    return obj


class _Timer:
    def __init__(self, times: dict, name: str):
        self.times, self.name = times, name

    def __enter__(self):
        self.t = time.perf_counter()

    def __exit__(self, *exc):
        self.times[self.name] = round(time.perf_counter() - self.t, 3)
        return False


# ---- sweep -------------------------------------------------------------------------------------
def sweep(args) -> None:
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    key_of = lambda sel: f"{sel['suite']}/{sel['name']}"  # noqa: E731
    data = load(args.results)
    if args.suite not in data.get("selection", {}) or args.reselect:
        t = time.perf_counter()
        chosen = torchvision_selection() if args.suite == "torchvision" else timm_selection()
        print(f"selected {sum('excluded' not in s for s in chosen.values())} {args.suite} models "
              f"in {time.perf_counter() - t:.0f} s", flush=True)

        def put(d):
            d.setdefault("selection", {})[args.suite] = chosen
            d.setdefault("meta", {}).update(_versions())
        data = update(args.results, put)
    selection = [s for s in data["selection"][args.suite].values() if "excluded" not in s]
    if args.only:
        selection = [s for s in selection if s["name"] in args.only or s.get("family") in args.only]
    for sel in selection:
        key = key_of(sel)
        old = load(args.results)["models"].get(key)
        if old is not None and old.get("status") != "running" and not args.redo:
            continue
        attempts = (old or {}).get("attempts", 0) if (old or {}).get("status") == "running" else 0
        if attempts >= 2:
            rec = {k: sel[k] for k in ("suite", "name", "family", "input", "params") if k in sel}
            rec.update(status="crashed", attempts=attempts,
                       steps={"process": {"ok": False, "error": "the process died twice on this model"}})
            update(args.results, lambda d, rec=rec: d["models"].__setitem__(key, rec))
            continue
        marker = {**sel, "status": "running", "attempts": attempts + 1}
        update(args.results, lambda d, m=marker: d["models"].__setitem__(key, m))
        t = time.perf_counter()
        rec = run_model(sel, args)
        rec["attempts"] = attempts + 1
        rec["total_seconds"] = round(time.perf_counter() - t, 2)
        update(args.results, lambda d, rec=rec: d["models"].__setitem__(key, rec))
        leaves = len(rec.get("leaves") or {})
        print(f"{key:50s} {rec['status']:28s} {rec.get('frontend', '-'):6s} leaves={leaves} "
              f"{rec['total_seconds']:7.1f}s", flush=True)


def _versions() -> dict:
    out = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for name in ("torchvision", "timm", "onnx", "onnxruntime"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


# ---- report ------------------------------------------------------------------------------------
def _cell(step: dict | None) -> str:
    if step is None:
        return "–"
    if step.get("skipped"):
        return "skipped"
    if step.get("ok"):
        if "max_abs" in step:
            return "exact"
        return "ok"
    if "max_abs" in step and step.get("max_abs") is not None:
        return f"{step['max_abs']:.1e}"
    return "**fail**"


def report(args) -> None:
    data = load(args.results)
    rows, errors = [], []
    totals: dict[str, dict] = {}
    for suite in ("torchvision", "timm"):
        sel = data.get("selection", {}).get(suite, {})
        chosen = [s for s in sel.values() if "excluded" not in s]
        t = totals.setdefault(suite, {"selected": len(chosen), "run": 0, "traced": 0, "exact": 0, "fx": 0,
                                      "export": 0, "with_leaves": 0, "edgechoice": 0, "emit": 0, "onnx": 0,
                                      "onnx_run": 0, "excluded": len(sel) - len(chosen)})
        for s in chosen:
            r = data["models"].get(f"{suite}/{s['name']}")
            label = s["name"] if suite == "torchvision" else f"{s['name']} ({s['family']})"
            if r is None or r.get("status") == "running":
                rows.append(f"| {suite} | {label} | not run yet | | | | | | | | |")
                continue
            st = r.get("steps", {})
            t["run"] += 1
            traced = st.get("trace", {}).get("ok")
            t["traced"] += bool(traced)
            t["exact"] += bool(st.get("roundtrip", {}).get("ok"))
            if traced:
                t[r["frontend"]] = t.get(r["frontend"], 0) + 1
            t["with_leaves"] += bool(r.get("leaves"))
            t["edgechoice"] += bool(st.get("edgechoice", {}).get("ok"))
            t["emit"] += bool(st.get("emit", {}).get("ok"))
            if st.get("onnx") and not st["onnx"].get("skipped"):
                t["onnx_run"] += 1
                t["onnx"] += bool(st["onnx"].get("ok"))
            times = r.get("times", {})
            tt = " / ".join(f"{times[k]:.1f}" if k in times else "–"
                            for k in ("trace", "roundtrip", "edgechoice", "emit", "onnx"))
            rows.append(f"| {suite} | {label} | {(r.get('params') or 0) / 1e6:.1f}M | "
                        f"{'×'.join(map(str, r.get('input', [])[2:]))} | "
                        f"{r.get('frontend', '**fail**') if traced else '**fail**'} | {len(r.get('leaves') or {})} | "
                        f"{_cell(st.get('roundtrip'))} | {_cell(st.get('edgechoice'))} | {_cell(st.get('emit'))} | "
                        f"{_cell(st.get('onnx'))} | {tt} |")
            for k, v in st.items():
                if v.get("error"):
                    errors.append(f"- {suite}/{s['name']} — {k}: `{v['error']}`")
            for path, why in (r.get("leaves") or {}).items():
                errors.append(f"- {suite}/{s['name']} — opaque leaf `{path}`: {why}")
    lines = ["# Model zoo coverage", "",
             "Generated by `bench/zoo.py --report` from `bench/results/zoo.json` "
             f"({', '.join(f'{k} {v}' for k, v in data.get('meta', {}).items())}). Random weights, eval mode, "
             "batch 1, CPU. See `bench/zoo.py` for how models are chosen.", "", "## Totals", "",
             "| suite | selected | run | traced | exact round trip | fx | export | with opaque leaves | "
             "supernet parity | emitted model.py parity | ONNX parity (run) | excluded (> 60M) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for suite, t in totals.items():
        lines.append(f"| {suite} | {t['selected']} | {t['run']} | {t['traced']} | {t['exact']} | {t['fx']} | "
                     f"{t['export']} | {t['with_leaves']} | {t['edgechoice']} | {t['emit']} | "
                     f"{t['onnx']} / {t['onnx_run']} | {t['excluded']} |")
    lines += ["", "## Models", "",
              "Round trip, supernet and emitted: `exact` is bit-identical output (`torch.equal`), otherwise "
              "the max abs error; ONNX: ONNX Runtime within tolerance. Times in seconds: trace / round trip / "
              "supernet (archir.search) / transform+emit / ONNX.", "",
              "| suite | model | params | input | frontend | leaves | round trip | supernet | emitted | ONNX | "
              "time (s) |", "|---|---|---|---|---|---|---|---|---|---|---|", *rows, "",
              "## Errors and opaque leaves", "", *(errors or ["None."]), ""]
    if args.limits:
        lines += [Path(args.limits).read_text()]
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(lines) + "\n")
    print(f"wrote {DOC}")
    for suite, t in totals.items():
        print(suite, t)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=("torchvision", "timm"))
    p.add_argument("--only", nargs="*", help="model names (or timm families) to run")
    p.add_argument("--redo", action="store_true", help="run models already recorded again")
    p.add_argument("--reselect", action="store_true", help="recompute the model selection")
    p.add_argument("--timeout", type=int, default=420, help="seconds per model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--onnx-max-params", type=float, default=30e6)
    p.add_argument("--skip-onnx", action="store_true")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--report", action="store_true", help="write docs/zoo.md from the results")
    p.add_argument("--limits", default=str(ROOT / "bench" / "zoo_limits.md"),
                   help="markdown appended to docs/zoo.md (documented limits)")
    add_method_arguments(p)
    args = p.parse_args(argv)
    args.options = method_options(p, args)
    if args.limits and not Path(args.limits).exists():
        args.limits = None
    if args.report:
        report(args)
        return
    if not args.suite:
        p.error("--suite is required (or --report)")
    sweep(args)


if __name__ == "__main__":
    main()
