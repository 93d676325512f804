"""Export-friendly forms of model code that neither torch.export nor transformers' exporter
captures with dynamic shapes: shardex's own patches, applied during capture only.

Mamba's selective scan runs its recurrence as a Python loop over the sequence, which
torch.export unrolls at the example's length (a graph for one sequence length only). Here the
same recurrence is a `torch._higher_order_ops.scan`, which torch.export keeps symbolic and
torch.onnx writes as one ONNX ``Scan``: the same arithmetic step by step (state = a * state +
b, output = state @ C), any length. The PyTorch reference runs the model's own loop, so the
verification compares the two forms.

With the recurrent state as the cache (`_state_cache`), the scan starts from the layer's past
SSM state instead of zeros: the mixer is wrapped so that, while it runs on a hole-form
`LayerStateCache`, the scan reads that cache's state (`_PAST_SSM`). transformers' own prefill
path (the one a symbolic sequence length takes) starts from zeros whatever its cache holds; its
decode path (one token) from the state, which the patched scan now does for any length.
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

# module defining `mamba_selective_scan` with the Mamba signature -> its mixer class
MAMBA_MIXERS = {
    "transformers.models.mamba.modeling_mamba": "MambaMixer",
    "transformers.models.falcon_mamba.modeling_falcon_mamba": "FalconMambaMixer",
}
MAMBA_MODULES = tuple(MAMBA_MIXERS)
# The past SSM state of the mixer running on a hole-form state cache: where the scan starts.
_PAST_SSM: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "shardex_past_ssm", default=None
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

    past = _PAST_SSM.get()
    initial = torch.zeros_like(deltaB_u[:, :, 0]) if past is None else past.to(deltaB_u.dtype)
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


def _mixer_from_state(forward):
    """A Mamba mixer's forward whose scan starts from its hole-form cache's past state."""

    def mixer_forward(self, hidden_states, *args, **kwargs):
        from shardex._state_cache import LayerStateCache

        cache = kwargs.get("cache", kwargs.get("cache_params", args[0] if args else None))
        token = _PAST_SSM.set(cache.ssm if isinstance(cache, LayerStateCache) else None)
        try:
            return forward(self, hidden_states, *args, **kwargs)
        finally:
            _PAST_SSM.reset(token)

    return mixer_forward


@contextlib.contextmanager
def capture_patches() -> Iterator[None]:
    """shardex's patches installed for the block, in the modeling modules already imported (a
    model being captured has imported its own)."""
    patched = []
    for name, mixer_name in MAMBA_MIXERS.items():
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "mamba_selective_scan"):
            patched.append((module, "mamba_selective_scan", module.mamba_selective_scan))
            module.mamba_selective_scan = mamba_selective_scan_as_scan
        mixer = getattr(module, mixer_name, None)
        if mixer is not None:
            patched.append((mixer, "forward", mixer.forward))
            mixer.forward = _mixer_from_state(mixer.forward)
    try:
        yield
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)
