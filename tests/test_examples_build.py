"""Every example model builds, runs on its example input, and traces exactly with torch.fx."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.fx

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
EXAMPLES = ["resnet20", "mobilenetv2", "darts_cell", "mbconv"]


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"archir_example_{name}", EXAMPLES_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_model(model, x):
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    traced = torch.fx.symbolic_trace(model)
    traced.graph.lint()
    traced.eval()
    with torch.no_grad():
        traced_out = traced(x)
    assert torch.equal(traced_out, out)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_builds_and_traces(name):
    torch.manual_seed(0)
    example = load_example(name)
    model = example.build_model()
    assert isinstance(model, torch.nn.Module)
    x = example.example_input()
    assert x.shape == (2, 3, 32, 32)
    check_model(model, x)


def test_darts_v1_genotype_traces():
    torch.manual_seed(0)
    example = load_example("darts_cell")
    check_model(example.build_model(example.DARTS_V1), example.example_input())
