"""torch.onnx's export with shardex's shortcuts (`_export_shortcuts`): the re-trace is skipped
only where it would change nothing, and the exported graph computes what PyTorch does."""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.onnx._internal.exporter import _fx_passes

from shardex._export_shortcuts import shortcuts


class Renamed(nn.Module):
    """Ops the trace keeps that only need a rename: `to` (three overloads) and `&`."""

    def forward(self, x, mask):
        keep = (mask > 0) & (x > -1)
        y = x.to(torch.float64).to(x.device, torch.float32).to(dtype=torch.float32)
        return torch.where(keep, y.reshape(x.shape).contiguous() * 2, 0.0)


class Mutates(nn.Module):
    """An in-place update of a buffer: only the re-trace (functionalization) handles it."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("total", torch.zeros(4))

    def forward(self, x):
        self.total.add_(x.sum(0))
        y = x.clone()
        y.mul_(3)
        return y + self.total


class Decomposed(nn.Module):
    """An op ONNX has no translation for, which the decomposition table rewrites."""

    def forward(self, x):
        return torch.diag_embed(x).sum(-1) * 2


@pytest.fixture
def retraces(monkeypatch):
    """How often torch.onnx's own decomposition (the re-trace) ran."""
    calls = []
    original = _fx_passes.decompose_with_registry

    def counted(program, registry):
        calls.append(program)
        return original(program, registry)

    monkeypatch.setattr(_fx_passes, "decompose_with_registry", counted)
    return calls


def _export_and_run(module: nn.Module, inputs: tuple, tmp_path) -> list[np.ndarray]:
    with warnings.catch_warnings(), shortcuts():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, inputs, dynamo=True, optimize=False, verbose=False)
    path = str(tmp_path / "model.onnx")
    program.save(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    return session.run(None, feeds)


def test_renamed_ops_skip_the_retrace(tmp_path, retraces):
    x = torch.randn(3, 4)
    mask = torch.tensor([[1, 0, 1, 1]] * 3)
    (got,) = _export_and_run(Renamed(), (x, mask), tmp_path)
    assert retraces == []  # nothing to decompose: the program was translated as traced
    np.testing.assert_allclose(got, Renamed()(x, mask).numpy(), rtol=1e-6)


@pytest.mark.parametrize("module_class", [Mutates, Decomposed])
def test_programs_that_need_it_are_retraced(module_class, tmp_path, retraces):
    x = torch.randn(3, 4)
    (got,) = _export_and_run(module_class(), (x,), tmp_path)
    assert len(retraces) == 1
    np.testing.assert_allclose(got, module_class()(x).numpy(), rtol=1e-5, atol=1e-6)


def test_torch_onnx_is_itself_again_after(retraces):
    from torch.onnx._internal.exporter import _registration

    with shortcuts():
        first = _registration.ONNXRegistry.from_torchlib()
        second = _registration.ONNXRegistry.from_torchlib()
        relu = torch.ops.aten.relu.default
        first.register_op(relu, lambda x: x)  # an export's custom translation: its copy only
        assert len(second.get_decomps(relu)) == len(first.get_decomps(relu)) - 1
    assert _fx_passes.decompose_with_registry.__name__ == "counted"
    assert "cached_registry" not in repr(_registration.ONNXRegistry.from_torchlib)
