"""Trace the real model zoos: torchvision classification models and one model per timm family.

Not part of CI: it needs torchvision and timm, which archir does not depend on. Run it in its own
virtual environment::

    python3 -m venv /tmp/zoo-venv
    /tmp/zoo-venv/bin/pip install torch torchvision timm onnx onnxscript onnxruntime networkx click \\
        tqdm scikit-learn matplotlib pillow
    /tmp/zoo-venv/bin/pip install --no-deps -e .
    /tmp/zoo-venv/bin/python bench/zoo.py --suite torchvision      # then --suite timm
    /tmp/zoo-venv/bin/python bench/zoo.py --report                 # docs/zoo.md from the JSON

For every model (random weights, eval mode, batch 1; a torchvision detector: two images and
their targets, which its training forward needs, see :func:`_detection_inputs`) and each step's
wall time:

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
import gc
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
    from bench.peak_memory import PeakMemory
except ImportError:  # run as a script: bench/ is on sys.path
    from method_args import add_method_arguments, method_options
    from peak_memory import PeakMemory

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


MEMORY_BUDGET = 8 * 2**30  # bytes one model may use on the shared machine
# float32 weight copies alive at once at a model's peak: measured 4.7 (``peak_weight_copies`` in
# the JSON; torchvision's vit_l_32) -- the model, archir.transform's trace and original graph (the
# supernet and the derived network share the trace's), the emitted model.py loaded to check it,
# and in the ONNX step the emitted model, ONNX Runtime's copy and the exporter's
COPIES = 5


def _base_selection(base: str) -> dict[str, dict]:
    """The ``base`` suite's selection as recorded in the results (computed when it is not)."""
    return load().get("selection", {}).get(base) or SELECTIONS[base]()


def big_selection(base: str):
    """The classifiers the base suite leaves out (> 60M parameters), smallest first; a model whose
    weights times :data:`COPIES` pass :data:`MEMORY_BUDGET` stays excluded with that reason."""
    def select() -> dict[str, dict]:
        chosen = _base_selection(base)
        out = {}
        for s in sorted(chosen.values(), key=lambda s: s.get("params") or 0):
            if (s.get("params") or 0) <= MAX_PARAMS or not s.get("name"):
                continue
            rec = {**{k: v for k, v in s.items() if k != "excluded"}, "suite": f"{base}_big"}
            need = rec["params"] * 4 * COPIES
            if need > MEMORY_BUDGET:
                rec["excluded"] = (f"{rec['params'] / 1e6:.0f}M parameters: about {need / 2**30:.1f} GiB for "
                                   f"{COPIES} weight copies > {MEMORY_BUDGET / 2**30:.0f} GiB on a shared machine")
            out[s.get("family") or s["name"]] = rec
        return out
    return select


def timm_big_selection() -> dict[str, dict]:
    """One model per timm family that has none of at most 60M parameters (those the timm suite
    excludes): its smallest, counted on the meta device, smallest first; memory-bound ones
    excluded as in :func:`big_selection`."""
    import timm

    out = {}
    for fam, rec in _base_selection("timm").items():
        if rec.get("name") is not None:
            continue
        sizes = []
        for name in (n for n in timm.list_models() if family(n) == fam):
            try:
                sizes.append((_count_params(lambda: timm.create_model(name, pretrained=False)), name))
            except Exception:  # noqa: BLE001 - a model that cannot be built is not a candidate
                continue
        if not sizes:
            out[fam] = {**rec, "suite": "timm_big", "excluded": "no model of the family can be built"}
            continue
        n, name = min(sizes)
        cfg = timm.get_pretrained_cfg(name)
        size = list(cfg.input_size) if cfg is not None and cfg.input_size else [3, 224, 224]
        out[fam] = {"suite": "timm_big", "family": fam, "name": name, "params": n, "input": [1, *size]}
        need = n * 4 * COPIES
        if need > MEMORY_BUDGET:
            out[fam]["excluded"] = (f"{n / 1e6:.0f}M parameters: about {need / 2**30:.1f} GiB for {COPIES} "
                                    f"weight copies > {MEMORY_BUDGET / 2**30:.0f} GiB on a shared machine")
    return dict(sorted(out.items(), key=lambda kv: kv[1].get("params") or 0))  # run smallest first


# ---- torchvision's other tasks: segmentation, detection, video, optical flow -------------------
# Per model: the input, and constructor arguments. ``weights_backbone=None``: no download. Detection
# models resize every image inside their forward; 320 px keeps the CPU sweep in minutes.
_DET_SMALL = {"min_size": 320, "max_size": 320}
TV_TASKS = {
    "segmentation": ([1, 3, 224, 224], {"weights_backbone": None, "aux_loss": False}),
    "detection": ([1, 3, 224, 224], {"weights_backbone": None, **_DET_SMALL}),
    "video": ([1, 3, 8, 112, 112], {}),
    "optical_flow": ([1, 3, 128, 128], {}),
}
_VIDEO_INPUT = {"mvit_v1_b": [1, 3, 16, 224, 224], "mvit_v2_s": [1, 3, 16, 224, 224],
                "s3d": [1, 3, 16, 224, 224], "swin3d_t": [1, 3, 8, 224, 224],
                "swin3d_s": [1, 3, 8, 224, 224], "swin3d_b": [1, 3, 8, 224, 224]}
_DET_KWARGS = {"ssd300_vgg16": {"weights_backbone": None},  # fixed input sizes of their own
               "ssdlite320_mobilenet_v3_large": {"weights_backbone": None}}
# A whole detector: two images and their targets (its training forward needs them), the score
# threshold at 0 (random weights score every class alike, under the default threshold: without
# it there would be no detection to compare).
_DET_IMAGES = [[3, 224, 224], [3, 224, 224]]
_DET_BOXES = [2, 3]


def _detection_spec(name: str) -> dict:
    return {"images": _DET_IMAGES, "boxes": _DET_BOXES, "classes": 2 if name.startswith("keypoint") else 10}


def _zero_threshold(name: str) -> dict:
    return {"box_score_thresh": 0.0} if "rcnn" in name else {"score_thresh": 0.0}


def tvtasks_selection() -> dict[str, dict]:
    import torchvision

    out = {}
    for task, (shape, kwargs) in TV_TASKS.items():
        for name in sorted(torchvision.models.list_models(module=getattr(torchvision.models, task))):
            kw = _DET_KWARGS.get(name, kwargs)
            size = _VIDEO_INPUT.get(name, shape)
            inputs = [{"shape": size}] * (2 if task == "optical_flow" else 1)
            if task == "detection":
                kw = {**kw, **_zero_threshold(name)}
                inputs = [{"detection": _detection_spec(name)}]
                size = [len(_DET_IMAGES), *_DET_IMAGES[0]]
            rec = {"suite": "tvtasks", "task": task, "name": name, "kwargs": kw, "inputs": inputs,
                   "input": size, "train_parity": True}
            try:
                rec["params"] = _count_params(lambda: torchvision.models.get_model(name, weights=None, **kw))
            except Exception as exc:  # noqa: BLE001
                rec["excluded"] = f"cannot build: {_first(exc)}"
            out[name] = rec
            if task == "detection":
                # Its backbone (+ FPN) alone too, on the batch the model's transform makes: the
                # part a search inside the detector (``submodule="backbone"``) works on.
                side = 300 if name == "ssd300_vgg16" else 320
                back = {**rec, "name": f"{name}.backbone", "part": "backbone", "input": [1, 3, side, side],
                        "inputs": [{"shape": [1, 3, side, side]}], "kwargs": _DET_KWARGS.get(name, kwargs)}
                try:
                    back["params"] = _count_params(
                        lambda: torchvision.models.get_model(name, weights=None, **kw).backbone)
                except Exception as exc:  # noqa: BLE001
                    back["excluded"] = f"cannot build: {_first(exc)}"
                out[back["name"]] = back
    return out


# ---- Hugging Face transformers, built from configs (random weights, nothing downloaded) ---------
HF_MODELS = {
    # name: (model class, config class, config kwargs, forward keyword names of the inputs)
    "bert": ("BertModel", "BertConfig", dict(vocab_size=1000, hidden_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, intermediate_size=256),
             ["input_ids", "attention_mask", "token_type_ids"]),
    "distilbert": ("DistilBertModel", "DistilBertConfig", dict(vocab_size=1000, dim=128, n_layers=2, n_heads=4,
                                                               hidden_dim=256), ["input_ids", "attention_mask"]),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(vocab_size=1000, n_embd=128, n_layer=2, n_head=4),
             ["input_ids", "attention_mask"]),
    "t5": ("T5Model", "T5Config", dict(vocab_size=1000, d_model=128, d_kv=32, d_ff=256, num_layers=2,
                                       num_heads=4), ["input_ids", "attention_mask", "decoder_input_ids"]),
    "vit": ("ViTModel", "ViTConfig", dict(image_size=64, patch_size=16, hidden_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, intermediate_size=256), ["pixel_values"]),
    "whisper_encoder": ("WhisperEncoder", "WhisperConfig", dict(num_mel_bins=80, d_model=128, encoder_layers=2,
                                                                encoder_attention_heads=4, encoder_ffn_dim=256,
                                                                max_source_positions=50), ["input_features"]),
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(vocab_size=1000, hidden_size=128, intermediate_size=256,
                                                      num_hidden_layers=2, num_attention_heads=4,
                                                      num_key_value_heads=2), ["input_ids", "attention_mask"]),
}
_SEQ = 16
_HF_INPUTS = {
    "input_ids": {"shape": [1, _SEQ], "dtype": "int64", "high": 1000},
    "decoder_input_ids": {"shape": [1, 8], "dtype": "int64", "high": 1000},
    "attention_mask": {"shape": [1, _SEQ], "dtype": "int64", "mask": True},
    "token_type_ids": {"shape": [1, _SEQ], "dtype": "int64", "high": 2},
    "pixel_values": {"shape": [1, 3, 64, 64]},
    "input_features": {"shape": [1, 80, 100]},
}


def hf_selection() -> dict[str, dict]:
    out = {}
    for name, (cls, cfg_cls, cfg, names) in HF_MODELS.items():
        rec = {"suite": "hf", "name": name, "class": cls, "config_class": cfg_cls, "config": cfg,
               "input_names": names, "inputs": [_HF_INPUTS[n] for n in names],
               "input": _HF_INPUTS[names[0]]["shape"], "train_parity": True}
        try:
            rec["params"] = _count_params(lambda: _build_hf(rec))
        except Exception as exc:  # noqa: BLE001
            rec["excluded"] = f"cannot build: {_first(exc)}"
        out[name] = rec
    return out


class KeywordInputs(torch.nn.Module):
    """Calls ``model(**{name: tensor})`` with the positional tensors archir traces with (a
    Hugging Face model's second positional parameter is not always the attention mask)."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, list(names)

    def forward(self, *tensors):
        return self.model(**dict(zip(self.names, tensors)))


def _build_hf(sel: dict) -> torch.nn.Module:
    import transformers

    config = getattr(transformers, sel["config_class"])(**sel["config"])
    if sel["class"] == "WhisperEncoder":
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        model = WhisperEncoder(config)
    else:
        model = getattr(transformers, sel["class"])(config)
    return KeywordInputs(model, sel["input_names"])


def example_inputs(sel: dict, batch: int | None = None, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """The example inputs of a selected model (float: normal; int64: uniform below ``high``; an
    attention mask: ones with the last two positions of the first sample masked; a detector:
    :func:`_detection_inputs`)."""
    gen = torch.Generator().manual_seed(seed)
    specs = sel.get("inputs") or [{"shape": sel["input"]}]
    out = []
    for spec in specs:
        if "detection" in spec:
            out.extend(_detection_inputs(spec["detection"], gen))
            continue
        shape = list(spec["shape"])
        if batch is not None:
            shape[0] = batch
        if spec.get("mask"):
            t = torch.ones(shape, dtype=torch.int64)
            t[0, -2:] = 0  # right padding: no query position has every key masked (docs/zoo.md)
        elif spec.get("dtype") == "int64":
            t = torch.randint(0, spec["high"], shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen)
        out.append(t)
    return tuple(out)


def _detection_inputs(spec: dict, gen: torch.Generator) -> tuple[list, list]:
    """A torchvision detector's ``(images, targets)``: uniform images, and per image boxes inside
    it with labels below ``classes``, plus a mask and 17 keypoints per box (the detectors that do
    not predict them ignore them)."""
    images = [torch.rand(shape, generator=gen) for shape in spec["images"]]
    targets = []
    for img, n in zip(images, spec["boxes"]):
        h, w = img.shape[-2:]
        corner = torch.rand(n, 2, generator=gen) * torch.tensor([w, h]) * 0.6
        size = 10 + torch.rand(n, 2, generator=gen) * torch.tensor([w, h]) * 0.3
        targets.append({"boxes": torch.cat([corner, corner + size], 1),
                        "labels": torch.randint(1, spec["classes"], (n,), generator=gen),
                        "masks": (torch.rand(n, h, w, generator=gen) > 0.5).to(torch.uint8),
                        "keypoints": torch.cat([torch.rand(n, 17, 2, generator=gen) * torch.tensor([w, h]),
                                                torch.ones(n, 17, 1)], 2)})
    return images, targets


def build_model(suite: str, name: str, sel: dict | None = None) -> torch.nn.Module:
    if suite in ("torchvision", "torchvision_big"):
        import torchvision

        return torchvision.models.get_model(name, weights=None)
    if suite == "tvtasks":
        import torchvision

        sel = sel or {}
        model = torchvision.models.get_model(name.split(".")[0], weights=None, **sel.get("kwargs", {}))
        return model.backbone if sel.get("part") == "backbone" else model
    if suite == "hf":
        return _build_hf(sel)
    import timm

    return timm.create_model(name, pretrained=False)


# ---- one model -----------------------------------------------------------------------------------
def _first(exc: BaseException, limit: int = 300) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _tensors(out) -> list[torch.Tensor]:
    """The tensors of a model output in order: containers, and objects such as Hugging Face's
    ``DynamicCache`` through the attributes that hold tensors (a traced graph returns those as
    dicts in the same order)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if hasattr(out, "__dict__") and not isinstance(out, (type, torch.nn.Module)):
        return _tensors([v for v in vars(out).values() if _tensors(v)])
    return []


def compare(expected, got) -> dict:
    a, b = _tensors(expected), _tensors(got)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return {"exact": False, "max_abs": None, "note": "output structure or shapes differ"}
    diff = max(((x.double() - y.double()).abs().max().item() if x.numel() else 0.0) for x, y in zip(a, b))
    return {"exact": all(torch.equal(x, y) for x, y in zip(a, b)), "max_abs": diff}


class StepTimeout(BaseException):
    """The per-model time limit (SIGALRM). Not an ``Exception``: archir's frontend catches those
    while it tries one tracer after another, and would take the limit for a tracing failure."""


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
    memory = PeakMemory("build", announce=True)  # the step running (set below) -> its peak

    def timed(name):
        nonlocal step
        step = memory.phase = name
        return _Timer(times, name)

    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(args.timeout)
    try:
        with timed("build"):
            torch.manual_seed(0)
            model = build_model(sel["suite"], sel["name"], sel).eval()
            x = example_inputs(sel)
            with torch.no_grad():
                ref = model(*x)
        with timed("trace"):
            try:
                graph = archir.trace(model, x)
                graph.verify()
            except Exception as exc:  # noqa: BLE001
                steps["trace"] = {"ok": False, "error": _first(exc)}
                rec["status"] = "trace failed"
                if sel.get("task") == "detection" and sel.get("part") != "backbone":
                    with timed("submodule"):
                        steps["submodule"] = _search_inside(model, x, ref, "backbone")
                    if steps["submodule"]["ok"]:
                        rec["status"] = "ok (searched inside 'backbone')"
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
                    steps["roundtrip"] = {"ok": None, **compare(ref, lowered(*x))}
                steps["roundtrip"]["ok"] = steps["roundtrip"]["exact"]
            except Exception as exc:  # noqa: BLE001
                steps["roundtrip"] = {"ok": False, "error": _first(exc)}
        if sel.get("train_parity") and lowered is not None:
            with timed("train"):
                steps["train"] = _train_parity(model, lowered, sel)
        round_trip_ok = lowered is not None
        del graph, lowered  # a copy of the weights: the steps below make their own
        gc.collect()  # graphs and modules hold reference cycles: free them now, not at some later gc

        with timed("edgechoice"):  # the JSON keeps the step's old name
            try:
                search = archir.search(model, x, method, **options)
                choices = len(search.arch_weights())  # searchable edges
                sup = search.supernet.eval()
                with torch.no_grad():
                    steps["edgechoice"] = {"ok": None, "choice_edges": choices, **compare(ref, sup(*x))}
                steps["edgechoice"]["ok"] = steps["edgechoice"]["exact"]
                search.close()
                del search, sup
                gc.collect()
            except Exception as exc:  # noqa: BLE001
                steps["edgechoice"] = {"ok": False, "error": _first(exc)}
        for extra in getattr(args, "extra_methods", None) or ():
            with timed(extra):
                try:
                    search = archir.search(model, x, extra)
                    sup = search.supernet.eval()
                    with torch.no_grad():
                        steps[extra] = {"ok": None, "choice_edges": len(search.arch_weights()),
                                        **compare(ref, sup(*x))}
                    steps[extra]["ok"] = steps[extra]["exact"]
                    search.close()
                    del search, sup
                    gc.collect()
                except Exception as exc:  # noqa: BLE001
                    steps[extra] = {"ok": False, "error": _first(exc)}

        onnx_module = None
        with tempfile.TemporaryDirectory() as tmp, timed("emit"):
            try:
                res = archir.transform(model, x, method, epochs=0, onnx=False, out=Path(tmp) / "out",
                                       progress=False, **options)
                emitted = _load_emitted(Path(tmp) / "out")
                with torch.no_grad():
                    steps["emit"] = {"ok": None, **compare(ref, emitted(*x))}
                steps["emit"]["ok"] = steps["emit"]["exact"]
                onnx_module = emitted
                del res
                gc.collect()
            except Exception as exc:  # noqa: BLE001
                steps["emit"] = {"ok": False, "error": _first(exc)}

        params = sel.get("params") or 0
        if args.skip_onnx:
            steps["onnx"] = {"ok": None, "skipped": "--skip-onnx"}
        elif params > args.onnx_max_params:
            steps["onnx"] = {"ok": None, "skipped": f"{params / 1e6:.1f}M parameters > --onnx-max-params "
                                                    f"{args.onnx_max_params / 1e6:.0f}M (CPU time)"}
        elif onnx_module is None and not round_trip_ok:
            steps["onnx"] = {"ok": None, "skipped": "no module to export (round trip failed)"}
        else:
            lowered = None
            if onnx_module is None:  # model.py failed: export the lowered graph instead
                onnx_module = lowered = archir.trace(model, x).to_module().eval()
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
        peak = memory.stop()
        if peak is not None:  # above the process's memory before the model was built
            rec["peak_memory_gib"] = round(peak / 2**30, 2)
            if rec.get("params"):
                rec["peak_weight_copies"] = round(peak / (4 * rec["params"]), 2)
            rec["peak_memory_gib_by_step"] = {k: round(max(v - memory.start, 0) / 2**30, 2)
                                              for k, v in memory.peaks.items()}
    if rec["status"] == "ok":
        bad = [k for k, v in steps.items() if v.get("ok") is False]
        rec["status"] = "ok" if not bad else "failed: " + ", ".join(bad)
    return rec


def _detection_targets(model: torch.nn.Module, images) -> list[dict]:
    """One box per image (what a torchvision detector's training forward needs), with a mask and
    keypoints where its ROI heads predict them."""
    heads = getattr(model, "roi_heads", None)
    out = []
    for img in images:
        h, w = img.shape[-2:]
        t = {"boxes": torch.tensor([[0.1 * w, 0.2 * h, 0.6 * w, 0.7 * h]]), "labels": torch.tensor([1])}
        if heads is not None and heads.has_mask():
            t["masks"] = torch.zeros(1, h, w, dtype=torch.uint8)
            t["masks"][0, int(0.2 * h):int(0.7 * h), int(0.1 * w):int(0.6 * w)] = 1
        if heads is not None and heads.has_keypoint():
            k = heads.keypoint_predictor.kps_score_lowres.out_channels
            t["keypoints"] = torch.tensor([[[0.3 * w, 0.4 * h, 1.0]] * k])
        out.append(t)
    return out


def _search_inside(model: torch.nn.Module, x: tuple, ref, path: str) -> dict:
    """A detector whose own ``forward`` does not trace: ``archir.search(..., submodule=path)`` with
    DNAT and DSO-NAS. Per method: the whole model with the supernet inside against the original in
    eval mode (and its derive at initialisation); in training mode, where a detector's forward
    takes targets and returns its losses, the same (the same seed before each call: the RPN and
    ROI heads sample proposals at random); then one training step through those losses and a
    derived whole model that runs."""
    import copy

    import archir

    images = [img for img in x[0] for _ in range(2)]  # two per example: BatchNorm trains on 1×1 maps
    targets = _detection_targets(model, images)

    def train_losses(m: torch.nn.Module) -> dict:
        torch.manual_seed(1)
        return m.train()(images, targets)

    with torch.no_grad():
        train_ref = train_losses(copy.deepcopy(model))  # a copy: training mode updates BatchNorm's statistics
    out: dict = {"path": path}
    for method in ("dnat", "dso"):
        torch.manual_seed(0)
        s = archir.search(model, x, method, submodule=path)
        with torch.no_grad():
            inside = compare(ref, s.model.eval()(*x))
            derived = compare(ref, s.whole_model(s.derive()).eval()(*x))
            derived_train = compare(train_ref, train_losses(s.whole_model(s.derive())))
        losses = train_losses(s.model)
        inside_train = compare(train_ref, {k: v.detach() for k, v in losses.items()})
        loss = sum(losses.values())
        loss.backward()
        torch.optim.SGD(s.weight_parameters(), lr=1e-3).step()
        if s.arch_parameters():  # VGG (SSD300) has no sum to search
            s.arch_optimizer(lr=0.01).step()
        with torch.no_grad():
            s.whole_model(s.derive()).eval()(*x)
        out[method] = {"exact": inside["exact"] and derived["exact"], "max_abs": max(inside["max_abs"] or 0.0,
                       derived["max_abs"] or 0.0),
                       "train_exact": inside_train["exact"] and derived_train["exact"],
                       "train_max_abs": max(inside_train["max_abs"] or 0.0, derived_train["max_abs"] or 0.0),
                       "choice_edges": len(s.arch_weights()),
                       "train_loss": float(loss.detach()), "loss_finite": bool(torch.isfinite(loss))}
    out["ok"] = all(out[m]["exact"] and out[m]["train_exact"] and out[m]["loss_finite"] for m in ("dnat", "dso"))
    return out


def _train_parity(model: torch.nn.Module, lowered: torch.nn.Module, sel: dict) -> dict:
    """Training mode, where the forward differs (BatchNorm's batch statistics, dropout): copies of
    the model and of the lowered module in ``.train()``, the example's batch (2 where BatchNorm
    needs more than one value per channel), the same random seed before each
    call (so dropout draws the same masks where the ops run in the same order)."""
    import copy

    try:
        a, b = copy.deepcopy(model).train(), copy.deepcopy(lowered).train()
        x = example_inputs(sel, seed=1)
        with torch.no_grad():
            try:
                torch.manual_seed(0)
                want = a(*x)
            except ValueError:  # BatchNorm on one value per channel (DeepLab's image pooling)
                x = example_inputs(sel, batch=2, seed=1)
                torch.manual_seed(0)
                want = a(*x)
            torch.manual_seed(0)
            got = b(*x)
        res = compare(want, got)
        return {"ok": res["exact"], **res}
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "error": _first(exc)}


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
def _readmit(args, data: dict) -> dict:
    """With ``--memory-budget GIB``: the suite's models excluded only for memory (their weight copies
    over the budget, or killed by the OOM killer) whose weights times
    :data:`COPIES` fit that budget lose their exclusion (recorded in the selection, so the report
    counts them)."""
    budget = args.memory_budget * 2**30
    fits = [key for key, rec in data["selection"][args.suite].items()
            if any(m in str(rec.get("excluded", "")) for m in ("weight copies >", "OOM killer"))
            and rec["params"] * 4 * COPIES <= budget]
    if not fits:
        return data

    def put(d):
        for key in fits:
            d["selection"][args.suite][key].pop("excluded", None)
    print(f"readmitted under {args.memory_budget:g} GiB: {', '.join(fits)}", flush=True)
    return update(args.results, put)


def sweep(args) -> None:
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    key_of = lambda sel: f"{sel['suite']}/{sel['name']}"  # noqa: E731
    data = load(args.results)
    if args.suite not in data.get("selection", {}) or args.reselect:
        t = time.perf_counter()
        chosen = SELECTIONS[args.suite]()
        print(f"selected {sum('excluded' not in s for s in chosen.values())} {args.suite} models "
              f"in {time.perf_counter() - t:.0f} s", flush=True)

        def put(d):
            d.setdefault("selection", {})[args.suite] = chosen
            d.setdefault("meta", {}).update(_versions())
        data = update(args.results, put)
    if args.memory_budget is not None:
        data = _readmit(args, data)
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
        gc.collect()  # one model at a time: free its memory before the next
        _trim_heap()
        leaves = len(rec.get("leaves") or {})
        print(f"{key:50s} {rec['status']:28s} {rec.get('frontend', '-'):6s} leaves={leaves} "
              f"{rec['total_seconds']:7.1f}s", flush=True)


def _trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc keeps them otherwise), so that the
    next model's peak memory is measured from what it really uses."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _versions() -> dict:
    out = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for name in ("torchvision", "timm", "transformers", "onnx", "onnxruntime"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


# ---- report ------------------------------------------------------------------------------------
def _untraced(inside: dict | None) -> str:
    """The frontend cell of a model that did not trace whole."""
    if inside is None:
        return "**fail**"
    return f"inside `{inside['path']}`" if inside.get("ok") else f"**fail** (inside `{inside['path']}`: not exact)"


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


SUITE_TITLES = {"torchvision": "torchvision classification (<= 60M)", "timm": "timm, one per family (<= 60M)",
                "hf": "Hugging Face transformers (from configs)",
                "tvtasks": "torchvision segmentation / detection / video / optical flow",
                "torchvision_big": "torchvision classification (> 60M)",
                "timm_big": "timm, families without a model <= 60M (their smallest)"}


def _input_cell(sel: dict, rec: dict) -> str:
    """The example input of a row: its shape after the batch axis; a detector's images and targets."""
    shape = "×".join(map(str, (rec.get("input") or [])[1:]))
    spec = next((i["detection"] for i in sel.get("inputs") or () if "detection" in i), None)
    return shape if spec is None else f"{len(spec['images'])} images {shape} + targets"


def _label(suite: str, s: dict) -> str:
    if suite in ("timm", "timm_big"):
        return f"{s['name']} ({s['family']})"
    if suite == "tvtasks":
        return f"{s['name']} ({s['task']})"
    return s["name"]


def report(args) -> None:
    data = load(args.results)
    rows, errors = [], []
    totals: dict[str, dict] = {}
    suites = [k for k in SUITE_TITLES if k in data.get("selection", {})]
    for suite in suites:
        sel = data.get("selection", {}).get(suite, {})
        chosen = [s for s in sel.values() if "excluded" not in s]
        t = totals.setdefault(suite, {"selected": len(chosen), "run": 0, "traced": 0, "exact": 0, "fx": 0,
                                      "export": 0, "with_leaves": 0, "train": 0, "train_run": 0,
                                      "edgechoice": 0, "dso": 0, "dso_run": 0, "emit": 0, "onnx": 0,
                                      "onnx_run": 0, "inside": 0, "seconds": 0.0,
                                      "excluded": len(sel) - len(chosen)})
        for s in chosen:
            r = data["models"].get(f"{suite}/{s['name']}")
            label = _label(suite, s)
            if r is None or r.get("status") == "running":
                rows.append(f"| {suite} | {label} | not run yet | | | | | | | | | | | |")
                continue
            st = r.get("steps", {})
            t["run"] += 1
            t["seconds"] += r.get("total_seconds") or 0.0
            traced = st.get("trace", {}).get("ok")
            t["traced"] += bool(traced)
            t["exact"] += bool(st.get("roundtrip", {}).get("ok"))
            if traced:
                t[r["frontend"]] = t.get(r["frontend"], 0) + 1
            t["with_leaves"] += bool(r.get("leaves"))
            for key in ("train", "dso"):
                if key in st:
                    t[f"{key}_run"] += 1
                    t[key] += bool(st[key].get("ok"))
            inside = st.get("submodule")  # not traced whole: searched inside a submodule instead
            t["inside"] += bool(inside and inside.get("ok"))
            if inside:
                st = {**st, **{k: {"ok": inside[m]["exact"], "max_abs": inside[m]["max_abs"]}
                               for k, m in (("edgechoice", "dnat"), ("dso", "dso"))}}
                if "train_exact" in inside["dnat"]:  # the whole model with either supernet inside, in .train()
                    st["train"] = {"ok": all(inside[m]["train_exact"] for m in ("dnat", "dso")),
                                   "max_abs": max(inside[m]["train_max_abs"] for m in ("dnat", "dso"))}
                    t["train_run"] += 1
                    t["train"] += st["train"]["ok"]
            t["edgechoice"] += bool(st.get("edgechoice", {}).get("ok")) and not inside
            t["emit"] += bool(st.get("emit", {}).get("ok"))
            if st.get("onnx") and not st["onnx"].get("skipped"):
                t["onnx_run"] += 1
                t["onnx"] += bool(st["onnx"].get("ok"))
            times = r.get("times", {})
            tt = " / ".join(f"{times[k]:.1f}" if k in times else "–"
                            for k in ("trace", "roundtrip", "edgechoice", "emit", "onnx"))
            rows.append(f"| {suite} | {label} | {(r.get('params') or 0) / 1e6:.1f}M | "
                        f"{_input_cell(s, r)} | "
                        f"{r.get('frontend', '**fail**') if traced else _untraced(inside)} | "
                        f"{len(r.get('leaves') or {})} | "
                        f"{_cell(st.get('roundtrip'))} | {_cell(st.get('train'))} | {_cell(st.get('edgechoice'))} | "
                        f"{_cell(st.get('dso'))} | {_cell(st.get('emit'))} | "
                        f"{_cell(st.get('onnx'))} | {tt} | {r.get('total_seconds') or 0:.0f} |")
            for k, v in st.items():
                if k == "submodule":
                    continue
                if v.get("error"):
                    errors.append(f"- {suite}/{s['name']} — {k}: `{v['error']}`")
                elif v.get("ok") is False and v.get("max_abs") is not None:
                    errors.append(f"- {suite}/{s['name']} — {k}: not exact, max abs error {v['max_abs']:.3g}")
            for path, why in (r.get("leaves") or {}).items():
                errors.append(f"- {suite}/{s['name']} — opaque leaf `{path}`: {why}")
    lines = ["# Model zoo coverage", "",
             "Generated by `bench/zoo.py --report` from `bench/results/zoo.json` "
             f"({', '.join(f'{k} {v}' for k, v in data.get('meta', {}).items())}). Random weights, eval mode, "
             "batch 1 (a detector: two images and their targets), CPU, one torch thread. See `bench/zoo.py` for how "
             "models are chosen.", "", "## Totals", "",
             "| suite | selected | run | traced | fx | export | with opaque leaves | exact round trip | "
             "train-mode parity (run) | DNAT supernet parity | DSO-NAS supernet parity (run) | "
             "emitted model.py parity | ONNX parity (run) | not traced whole, searched inside a submodule | "
             "time (s) | excluded |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for suite, t in totals.items():
        lines.append(f"| {SUITE_TITLES[suite]} | {t['selected']} | {t['run']} | {t['traced']} | {t['fx']} | "
                     f"{t['export']} | {t['with_leaves']} | {t['exact']} | {t['train']} / {t['train_run']} | "
                     f"{t['edgechoice']} | {t['dso']} / {t['dso_run']} | {t['emit']} | "
                     f"{t['onnx']} / {t['onnx_run']} | {t['inside']} | {t['seconds']:.0f} | {t['excluded']} |")
    lines += ["", "## Models", "",
              "Round trip, train mode, supernets and emitted: `exact` is bit-identical output (`torch.equal`), "
              "otherwise the max abs error; `–` not run (train mode: only the hf and tvtasks suites; DSO-NAS: "
              "`--extra-methods`). ONNX: ONNX Runtime within tolerance, for each output "
              "`max|onnx - torch| <= 1e-5 + 1e-4·max|torch|` (see below). Times in seconds: trace / round trip / "
              "DNAT supernet (archir.search) / transform+emit / ONNX, then the whole model.", "",
              "| suite | model | params | input | frontend | leaves | round trip | train mode | DNAT | DSO-NAS | "
              "emitted | ONNX | time (s) | total (s) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
              *rows, "", "## Errors and opaque leaves", "", *(errors or ["None."]), ""]
    if args.limits:
        lines += [Path(args.limits).read_text()]
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(lines) + "\n")
    print(f"wrote {DOC}")
    for suite, t in totals.items():
        print(suite, t)


SELECTIONS = {"torchvision": torchvision_selection, "timm": timm_selection,
              "tvtasks": tvtasks_selection, "hf": hf_selection,
              "torchvision_big": big_selection("torchvision"), "timm_big": timm_big_selection}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=tuple(SELECTIONS))
    p.add_argument("--extra-methods", nargs="*", default=None,
                   help="further methods whose untrained supernet is checked (default: dso for the "
                        "hf and tvtasks suites, none for the classifier suites)")
    p.add_argument("--only", nargs="*", help="model names (or timm families) to run")
    p.add_argument("--redo", action="store_true", help="run models already recorded again")
    p.add_argument("--reselect", action="store_true", help="recompute the model selection")
    p.add_argument("--timeout", type=int, default=420, help="seconds per model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--onnx-max-params", type=float, default=30e6)
    p.add_argument("--skip-onnx", action="store_true")
    p.add_argument("--memory-budget", type=float, default=None, metavar="GIB",
                   help=f"run models excluded for memory whose weights times {COPIES} fit GIB (default: keep the "
                        f"selection's {MEMORY_BUDGET / 2**30:.0f} GiB exclusions)")
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
    if args.extra_methods is None:
        args.extra_methods = ["dso"] if args.suite in ("hf", "tvtasks") else []
    sweep(args)


if __name__ == "__main__":
    main()
