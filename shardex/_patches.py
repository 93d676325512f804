"""Export-friendly forms of model code that neither torch.export nor transformers' exporter
captures with dynamic shapes: shardex's own patches, applied during capture only.

One so far. Mamba's selective scan runs its recurrence as a Python loop over the sequence, which
torch.export unrolls at the example's length (a graph for one sequence length only). Here the
same recurrence is a `torch._higher_order_ops.scan`, which torch.export keeps symbolic and
torch.onnx writes as one ONNX ``Scan``: the same arithmetic step by step (state = a * state +
b, output = state @ C), any length. The PyTorch reference runs the model's own loop, so the
verification compares the two forms.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterator

import torch
import torch.nn.functional as F

# Set while a block runs only for its output shapes (the trunk's hole op): a scan there would be
# traced inside a fake kernel, which torch cannot do, and its values are never read.
SHAPES_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("shardex_shapes_only", default=False)

# module defining `mamba_selective_scan` with the Mamba signature
_MAMBA_SCAN_MODULES = (
    "transformers.models.mamba.modeling_mamba",
    "transformers.models.falcon_mamba.modeling_falcon_mamba",
)


def mamba_selective_scan_as_scan(
    hidden_states: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    **kwargs,
):
    """transformers' `mamba_selective_scan` (torch path) with its sequence loop as a scan."""
    from torch._higher_order_ops.scan import scan

    input_dtype = hidden_states.dtype
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    B, C = B.transpose(1, 2), C.transpose(1, 2)  # [batch, length, state]
    discrete_A = torch.exp(A[None, :, None, :] * dt[:, :, :, None])  # [batch, channels, length, state]
    deltaB_u = dt[:, :, :, None] * B[:, None, :, :].float() * hidden_states[:, :, :, None].float()

    def step(state, inputs):
        a, bu, c = inputs
        state = a * state + bu
        return state, torch.matmul(state.to(input_dtype), c.unsqueeze(-1))[..., 0]

    initial = torch.zeros_like(deltaB_u[:, :, 0])
    if SHAPES_ONLY.get():  # right shapes and dtypes, no recurrence
        last_state, scan_output = initial, hidden_states.to(input_dtype) * 0
    else:
        xs = (discrete_A.movedim(2, 0), deltaB_u.movedim(2, 0), C.movedim(1, 0))
        last_state, outputs = scan(step, initial, xs)
        scan_output = outputs.permute(1, 2, 0)  # [batch, channels, length]
    if D is not None:
        scan_output = scan_output + hidden_states * D[None, :, None]
    if z is not None:
        scan_output = scan_output * F.silu(z)
    if return_last_state:
        return scan_output, last_state
    return scan_output


@contextlib.contextmanager
def capture_patches() -> Iterator[None]:
    """shardex's patches installed for the block, in the modeling modules already imported (a
    model being captured has imported its own)."""
    patched = []
    for name in _MAMBA_SCAN_MODULES:
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "mamba_selective_scan"):
            patched.append((module, module.mamba_selective_scan))
            module.mamba_selective_scan = mamba_selective_scan_as_scan
    try:
        yield
    finally:
        for module, original in patched:
            module.mamba_selective_scan = original
