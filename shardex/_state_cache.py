"""A state-space model's recurrent state as a generation export's cache (Mamba, FalconMamba).

``text-generation-with-past`` of a state-space model exports one step that takes each layer's
state and returns the new one, under the names transformers.js and the onnx-community exports
of hybrid models read (``past_conv`` / ``past_ssm``; see DESIGN.md)::

    input_ids, attention_mask, past_conv.{i}, past_ssm.{i}
        -> logits, present_conv.{i}, present_ssm.{i}

``past_conv.{i}`` is [batch, intermediate, conv_kernel] (the last `conv_kernel` inputs of the
layer's causal convolution), ``past_ssm.{i}`` [batch, intermediate, state_size] (the selective
scan's state). The state has no sequence axis: ``attention_mask`` may cover the whole sequence so
far, as runtimes feed it to a KV-cache model; the step reads its last ``sequence_length`` columns
(the new tokens' mask, what the model's mixers multiply their inputs by).

One graph serves prefill (a zero state, any number of tokens) and decode (the previous step's
state, one token or more): the convolution runs over ``concat(past conv, new inputs)`` and keeps
its last `conv_kernel` positions as the new conv state; the scan starts from the past SSM state
and its final state is the new one. With a zero state that is transformers' prefill exactly, and
with one token transformers' decode step (`causal_conv1d_update`, `selective_state_update`).

A block sees its layer's state in hole form, as a block of a KV-cache model sees its keys and
values (`_tasks.split_cache` / `call_block` / `merge_cache`): `LayerState` (a pytree of two
tensors) is replaced by a `LayerStateCache` while the block runs; its methods are the ones
transformers' Mamba mixers call on their cache. The model's own mixer code runs on it: during
capture its scan is the ONNX ``Scan`` started from the past state (`_patches`); in the PyTorch
reference transformers' own prefill and decode paths run.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from shardex._patches import MAMBA_MODULES

STATE_INPUTS = ("past_conv", "past_ssm")
STATE_OUTPUTS = ("present_conv", "present_ssm")
# The state has no sequence axis; the mask keeps its KV-cache axes (the step reads its tail).
STATE_AXES = {
    "input_ids": {0: "batch_size", 1: "sequence_length"},
    "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
    "past_conv": {0: "batch_size"},
    "past_ssm": {0: "batch_size"},
}


@dataclasses.dataclass
class LayerState:
    """One layer's recurrent state: conv [batch, intermediate, conv_kernel], ssm [batch,
    intermediate, state_size]."""

    conv: torch.Tensor
    ssm: torch.Tensor


pytree.register_dataclass(LayerState, serialized_type_name="shardex.LayerState")


class LayerStateCache:
    """A block's cache: its own past state, in the shape of the transformers `Cache` methods a
    Mamba mixer calls (the layer and state indices are ignored: it holds one layer's one state).

    It works on copies of the past: transformers' decode path updates the state it is given in
    place (`causal_conv1d_update`, `selective_state_update`), and the past must stay what was
    recorded. `update_conv_state` concatenates the new inputs to the past conv state and keeps
    the last `conv_kernel` positions, as transformers' `LinearAttentionLayer` does once it has a
    state; with a zero past that equals its prefill (left padding with zeros)."""

    is_compileable = False

    def __init__(self, past: LayerState) -> None:
        self.past = past
        self.conv, self.ssm = past.conv.clone(), past.ssm.clone()

    @property
    def present(self) -> LayerState:
        return LayerState(self.conv, self.ssm)

    def get_conv_state(self, *args, **kwargs) -> torch.Tensor:
        return self.conv

    def get_recurrent_state(self, *args, **kwargs) -> torch.Tensor:
        return self.ssm

    def has_previous_state(self, *args, **kwargs) -> bool:
        return True

    def is_recording_past(self, *args, **kwargs) -> bool:
        return False

    def update_conv_state(self, conv_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        full = torch.cat([self.conv, conv_states], dim=-1)
        self.conv = full[..., -self.conv.shape[-1] :]
        return full

    def update_recurrent_state(self, recurrent_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.ssm = recurrent_states
        return self.ssm


def is_state_layer(entry: Any) -> bool:
    """A transformers cache layer holding conv and recurrent states (and no keys and values)."""
    return hasattr(entry, "conv_states") and hasattr(entry, "recurrent_states") and not hasattr(entry, "keys")


def layer_state(entry: Any) -> LayerState:
    """A cache layer's state in hole form."""
    return LayerState(entry.conv_states[0], entry.recurrent_states[0])


def write_state(entry: Any, present: LayerState) -> None:
    """Write a block's present state into its layer of the model's cache."""
    entry.conv_states[0], entry.recurrent_states[0] = present.conv, present.ssm


def is_state_space(model: nn.Module) -> bool:
    """A model whose every layer keeps a recurrent state that shardex exports (Mamba, FalconMamba:
    the families whose scan `_patches` captures)."""
    return type(model).__module__ in MAMBA_MODULES


def state_layout(layers: list) -> list[tuple[torch.Size, torch.dtype, torch.Size, torch.dtype]] | None:
    """Each layer's conv and ssm state shape and dtype, from the cache layers of a prefill; None
    unless every layer is a state layer."""
    if not layers or not all(is_state_layer(layer) for layer in layers):
        return None
    states = [layer_state(layer) for layer in layers]
    if not all(isinstance(s.conv, torch.Tensor) and isinstance(s.ssm, torch.Tensor) for s in states):
        return None
    return [(s.conv.shape, s.conv.dtype, s.ssm.shape, s.ssm.dtype) for s in states]


# --- the model's cache during export ------------------------------------------------------


def export_state_cache(past_conv: tuple[torch.Tensor, ...], past_ssm: tuple[torch.Tensor, ...]):
    """A transformers `DynamicCache` of `LinearAttentionLayer`s holding each layer's past state
    as is. Blocks never call it: the holes write each layer's present back (`write_state`)."""
    from transformers.cache_utils import DynamicCache, LinearAttentionLayer

    layers = []
    for conv, ssm in zip(past_conv, past_ssm):
        layer = LinearAttentionLayer()
        layer.conv_states[0], layer.recurrent_states[0] = conv, ssm
        layer.is_conv_states_initialized[0] = layer.is_recurrent_states_initialized[0] = True
        layer.has_previous_state[0] = True
        layer.conv_kernel_size[0] = conv.shape[-1]
        layer.dtype, layer.device = conv.dtype, conv.device
        layers.append(layer)
    cache = DynamicCache()
    cache.layers = layers
    return cache


def state_generation_forward(model: nn.Module) -> Callable:
    """``forward(input_ids, attention_mask, past_conv, past_ssm)`` -> ``{"logits", "present_conv",
    "present_ssm"}``, one tensor per layer in each."""
    run = model.forward
    cache_keyword = "cache" if "cache" in inspect.signature(run).parameters else "cache_params"

    def forward(input_ids, attention_mask, past_conv, past_ssm):
        cache = export_state_cache(past_conv, past_ssm)
        length, total = input_ids.shape[1], attention_mask.shape[1]
        torch._check(total >= length)
        mask = attention_mask.narrow(1, total - length, length)  # the new tokens' mask
        output = run(input_ids=input_ids, attention_mask=mask, use_cache=True, **{cache_keyword: cache})
        states = [layer_state(layer) for layer in cache.layers]
        return {
            "logits": output.logits,
            "present_conv": tuple(s.conv for s in states),
            "present_ssm": tuple(s.ssm for s in states),
        }

    return forward


def state_example(model: nn.Module, layout, batch: int, sequence: int, past: int):
    """Example inputs of one step and their dynamic axes: `sequence` new tokens, a mask over
    `past` + `sequence` tokens, and a zero state (a prefill: what transformers' own code, the
    verification's reference, computes for any number of tokens; its multi-token path starts
    the scan from zeros whatever the cache holds)."""
    generator = torch.Generator().manual_seed(0)
    kwargs: dict[str, Any] = {
        "input_ids": torch.randint(0, model.config.vocab_size, (batch, sequence), generator=generator),
        "attention_mask": torch.ones(batch, past + sequence, dtype=torch.int64),
        "past_conv": tuple(torch.zeros((batch, *conv[1:]), dtype=c) for conv, c, _, _ in layout),
        "past_ssm": tuple(torch.zeros((batch, *ssm[1:]), dtype=s) for _, _, ssm, s in layout),
    }
    return kwargs, dict(STATE_AXES)


# --- generation steps ---------------------------------------------------------------------


def zero_state(example_kwargs: dict, batch: int, to: Callable = lambda t: t) -> dict[str, tuple] | None:
    """The first step's state inputs (zeros, `batch` rows) as forward kwargs, each tensor passed
    through `to`; None when the example has no state."""
    if not all(name in example_kwargs for name in STATE_INPUTS):
        return None
    return {
        name: tuple(to(torch.zeros((batch, *t.shape[1:]), dtype=t.dtype)) for t in example_kwargs[name])
        for name in STATE_INPUTS
    }


def next_state(output: dict) -> dict[str, tuple] | None:
    """The next step's state kwargs from a step's output; None when it returns no state."""
    if not all(name in output for name in STATE_OUTPUTS):
        return None
    return {past: output[present] for past, present in zip(STATE_INPUTS, STATE_OUTPUTS)}


def zero_state_feeds(example_kwargs: dict, batch: int, dtype: np.dtype | None) -> dict[str, np.ndarray]:
    """ONNX Runtime feeds of the first step's state (zeros; `dtype`, or the example's when None),
    by graph input name; empty when the example has no state."""
    state = zero_state(example_kwargs, batch) or {}
    return {
        f"{name}.{i}": np.zeros(tuple(t.shape), dtype or t.numpy().dtype)
        for name, tensors in state.items()
        for i, t in enumerate(tensors)
    }


def present_name(past: str) -> str:
    """The output that carries an input's next value: ``past_conv.0`` <- ``present_conv.0``,
    ``past_key_values.0.key`` <- ``present.0.key`` (the rule transformers.js applies in reverse)."""
    for before, after in (*zip(STATE_INPUTS, STATE_OUTPUTS), ("past_key_values", "present")):
        if past.startswith(before + "."):
            return after + past[len(before) :]
    return past
