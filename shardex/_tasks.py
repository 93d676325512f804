"""What the exported program computes: its task, its inputs and outputs, and the KV cache as one
block sees it.

Tasks take Optimum's names. ``text-generation-with-past`` (the default for causal LMs whose config
has ``use_cache``) exports one decoder step with the cache as inputs and outputs, under the names
onnxruntime-genai and Optimum read::

    input_ids, attention_mask, position_ids, past_key_values.{i}.key/value
        -> logits, present.{i}.key/value

``text-generation`` exports logits only (no cache); ``None`` keeps the model's own forward.

Each block (a decoder layer) stays one ONNX function: its layer of the cache becomes two more
inputs (the past) and two more outputs (the present), so nothing per layer is duplicated. A block
never sees the model's cache object. It is called in *hole form*: the cache argument is replaced
by `LayerKV` (its own past), which becomes a `LayerCache` while the block runs; `update` there
concatenates the new states exactly as transformers' `DynamicLayer` does. The plan's recording,
the trunk's hole op, the block capture and the PyTorch reference all go through `split_cache`,
`call_block` and `merge_cache`, so the four agree on one contract. A state-space model (Mamba)
exports its recurrent state the same way, as `LayerState` (see `_state_cache`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from shardex import _state_cache
from shardex._state_cache import LayerState, LayerStateCache

TEXT_GENERATION_WITH_PAST = "text-generation-with-past"
TEXT_GENERATION = "text-generation"
TEXT2TEXT_GENERATION_WITH_PAST = "text2text-generation-with-past"
SPEECH_RECOGNITION_WITH_PAST = "automatic-speech-recognition-with-past"
# Encoder-decoder tasks export Optimum's files, each one program over the same weight shards:
# the encoder; the decoder's first step (no past; it computes the cross-attention keys and
# values); each later step (self- and cross-attention caches as inputs).
SEQ2SEQ_TASKS = (TEXT2TEXT_GENERATION_WITH_PAST, SPEECH_RECOGNITION_WITH_PAST)
SEQ2SEQ_COMPONENTS = {
    "encoder": "encoder_model.onnx",
    "decoder": "decoder_model.onnx",
    "decoder_with_past": "decoder_with_past_model.onnx",
}
TASKS = (TEXT_GENERATION_WITH_PAST, TEXT_GENERATION, *SEQ2SEQ_TASKS)
# What the program is rewritten for: ONNX Runtime's CPU or CUDA provider (its fused ops), or
# plain ONNX (standard ops only, for any runtime).
RUNTIMES = ("onnxruntime", "onnxruntime-cuda", "onnx")

# Example sizes of a generation step: a past shorter than the new tokens keeps the two symbols
# apart (equal example sizes would let torch.export unify them).
EXAMPLE_BATCH, EXAMPLE_SEQUENCE, EXAMPLE_PAST = 2, 8, 5
GENERATION_AXES = {
    "input_ids": {0: "batch_size", 1: "sequence_length"},
    "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
    "position_ids": {0: "batch_size", 1: "sequence_length"},
    "past_key_values": {0: "batch_size", 2: "past_sequence_length"},
}
# The past of an encoder-decoder's decoder step: its own, and the cross-attention's.
SEQ2SEQ_PAST_AXES = {0: "batch_size", 2: "past_decoder_sequence_length"}
SEQ2SEQ_CROSS_AXES = {0: "batch_size", 2: "encoder_sequence_length"}
# The axes of cache tensors: torch.export gets one named dim each for all layers.
CACHE_AXES = (GENERATION_AXES["past_key_values"], SEQ2SEQ_PAST_AXES, SEQ2SEQ_CROSS_AXES)
# An axis whose size is the sum of others: grown by their growth when inputs are resized.
DERIVED_AXES = {"total_sequence_length": ("past_sequence_length", "sequence_length")}


# --- the cache seen from one block --------------------------------------------------------


@dataclasses.dataclass
class LayerKV:
    """One layer's keys and values, [batch, kv_heads, length, head_dim] each."""

    key: torch.Tensor
    value: torch.Tensor


pytree.register_dataclass(LayerKV, serialized_type_name="shardex.LayerKV")


@dataclasses.dataclass
class CrossLayerKV:
    """One decoder layer's cache in an encoder-decoder: its self-attention past (None: empty, the
    first step) and its cross-attention keys and values (None: computed from the encoder's
    states in this call, and returned as part of the present)."""

    decoder: LayerKV | None
    encoder: LayerKV | None


pytree.register_dataclass(CrossLayerKV, serialized_type_name="shardex.CrossLayerKV")


class LayerCache:
    """A block's cache: its own past (None: empty); `update` appends the new states along the
    sequence axis, as transformers' `DynamicLayer` does, and keeps the result as the present.
    Read as a transformers cache, it is that one layer under any layer index."""

    is_compileable = False

    def __init__(self, past: LayerKV | None) -> None:
        self.past = past
        self.present: LayerKV | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.past is None:
            self.present = LayerKV(key_states, value_states)
        else:
            self.present = LayerKV(
                torch.cat([self.past.key, key_states], dim=-2),
                torch.cat([self.past.value, value_states], dim=-2),
            )
        return self.present.key, self.present.value

    def get_seq_length(self, *args, **kwargs) -> int:
        return 0 if self.past is None else self.past.key.shape[-2]

    @property
    def current(self) -> LayerKV | None:
        return self.present or self.past

    @property
    def layers(self) -> _EveryIndex:
        current = self.current
        return _EveryIndex(_KeysValues(current.key, current.value) if current else None)


@dataclasses.dataclass
class _KeysValues:
    """A cache layer as transformers' attention reads a reused one: ``.keys``, ``.values``."""

    keys: torch.Tensor
    values: torch.Tensor


class _EveryIndex(dict):
    """One value under every key: a block's own layer, read by its `layer_idx`."""

    def __init__(self, value) -> None:
        super().__init__()
        self.value = value

    def __getitem__(self, key):
        return self.value

    def get(self, key, default=None):
        return self.value

    def __setitem__(self, key, value) -> None:
        self.value = value


def _block_encoder_decoder_cache(kv: CrossLayerKV):
    """One decoder layer's `CrossLayerKV` as the `EncoderDecoderCache` its attention expects
    (T5, BART, Whisper test ``isinstance``): the two caches and ``is_updated`` hold that layer
    under any index; cross-attention is "updated" when its keys and values were given."""
    return _block_encoder_decoder_cache_class()(kv)


@functools.cache
def _block_encoder_decoder_cache_class() -> type:
    """The class of `_block_encoder_decoder_cache`, made once (transformers imported lazily)."""
    from transformers.cache_utils import EncoderDecoderCache

    class BlockEncoderDecoderCache(EncoderDecoderCache):
        def __init__(self, kv: CrossLayerKV) -> None:  # no super(): nothing of a real cache is kept
            self.self_attention_cache = LayerCache(kv.decoder)
            self.cross_attention_cache = LayerCache(kv.encoder)
            self.is_updated = _EveryIndex(kv.encoder is not None)
            self.given_cross = kv.encoder is not None

        def get_seq_length(self, *args, **kwargs) -> int:
            return self.self_attention_cache.get_seq_length()

        past = None  # the present is always whole: `call_block` takes it as it is

        @property
        def present(self) -> CrossLayerKV:
            cross = None if self.given_cross else self.cross_attention_cache.present
            return CrossLayerKV(self.self_attention_cache.current, cross)

    return BlockEncoderDecoderCache


def is_model_cache(value: Any) -> bool:
    """A transformers `Cache` (checked without importing transformers for models that don't use it)."""
    if "transformers" not in sys.modules:
        return False
    from transformers.cache_utils import Cache

    return isinstance(value, Cache)


def cache_layer_index(block: nn.Module, ordinal: int) -> int:
    """Which layer of the model's cache a block reads: its attention's `layer_idx`, else its
    position among the holes."""
    for module in block.modules():
        index = getattr(module, "layer_idx", None)
        if isinstance(index, int):
            return index
    return ordinal


class BlockStandIn:
    """Mixed into modules that take a block's place in the model (the trunk's holes, the
    streamed reference's blocks): attributes the model reads off its blocks (ModernBERT's
    ``attention_type``) are read through to the block, set as ``_block``."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)


def split_cache(args: tuple, kwargs: dict, layer: int) -> tuple[tuple, dict, Any]:
    """A block's call in hole form: a model cache argument is replaced by this layer's past
    (`LayerKV`). Returns the new args and kwargs, and the cache (None if there was none)."""
    found = None

    def replace(value):
        nonlocal found
        if is_model_cache(value):
            found = value
            if hasattr(value, "cross_attention_cache"):  # an encoder-decoder's
                own = value.self_attention_cache.layers
                cross = value.cross_attention_cache.layers
                return CrossLayerKV(
                    LayerKV(own[layer].keys, own[layer].values) if layer < len(own) else None,
                    LayerKV(cross[layer].keys, cross[layer].values) if value.is_updated.get(layer) else None,
                )
            entry = value.layers[layer]
            if _state_cache.is_state_layer(entry):  # a state-space layer's recurrent state
                return _state_cache.layer_state(entry)
            return LayerKV(entry.keys, entry.values)
        return value

    args = tuple(replace(a) for a in args)
    kwargs = {k: replace(v) for k, v in kwargs.items()}
    return args, kwargs, found


def call_block(run: Callable, args: tuple, kwargs: dict):
    """Run a block called in hole form. With a past, returns ``(output, present)``; the present
    is the past unchanged if the block never updated its cache."""
    caches = []

    def to_cache(value):
        if isinstance(value, LayerKV):
            caches.append(LayerCache(value))
            return caches[-1]
        if isinstance(value, CrossLayerKV):
            caches.append(_block_encoder_decoder_cache(value))
            return caches[-1]
        if isinstance(value, LayerState):
            caches.append(LayerStateCache(value))
            return caches[-1]
        return value

    output = run(*(to_cache(a) for a in args), **{k: to_cache(v) for k, v in kwargs.items()})
    if not caches:
        return output
    (cache,) = caches
    return output, cache.present or cache.past


def merge_cache(output, cache, layer: int):
    """Write a hole-form block output's present into the model's cache; return the block's output."""
    if cache is None:
        return output
    output, present = output
    if isinstance(present, CrossLayerKV):
        _set_layer(cache.self_attention_cache, layer, present.decoder)
        if present.encoder is not None:
            _set_layer(cache.cross_attention_cache, layer, present.encoder)
        cache.is_updated[layer] = True
        return output
    entry = cache.layers[layer]
    if isinstance(present, LayerState):
        _state_cache.write_state(entry, present)
        return output
    entry.keys, entry.values = present.key, present.value
    return output


def _set_layer(cache, layer: int, kv: LayerKV) -> None:
    """Put `kv` in `cache`'s layer `layer`, adding layers up to it (a first step starts empty)."""
    while len(cache.layers) <= layer:
        cache.layers.append(_export_layer(kv.key, kv.value))
    cache.layers[layer].keys, cache.layers[layer].values = kv.key, kv.value


# --- the model's cache during export ------------------------------------------------------


def _export_layer(key: torch.Tensor, value: torch.Tensor):
    """A transformers `DynamicLayer` holding `key` and `value` as they are; its length comes
    from the tensor shape (`DynamicLayer` also tests ``numel() == 0``, which would pin the
    symbolic past length under export)."""
    return _export_layer_class()(key, value)


@functools.cache
def _export_layer_class() -> type:
    """The class of `_export_layer`, made once (transformers imported lazily)."""
    from transformers.cache_utils import DynamicLayer

    class ExportLayer(DynamicLayer):
        def __init__(self, key: torch.Tensor, value: torch.Tensor) -> None:
            super().__init__()
            self.keys, self.values = key, value
            self.device, self.dtype = key.device, key.dtype
            self.is_initialized = True

        def get_seq_length(self) -> int:
            return self.keys.shape[-2]

    return ExportLayer


def export_cache(past: tuple[dict[str, torch.Tensor], ...]):
    """A transformers `DynamicCache` holding `past` (one ``{"key", "value"}`` per layer) as is.
    Blocks never call its `update`: the holes write each layer's present back with
    `merge_cache`."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    cache.layers = [_export_layer(layer["key"], layer["value"]) for layer in past]
    return cache


def export_encoder_decoder_cache(past: tuple[dict[str, dict[str, torch.Tensor]], ...] | None):
    """A transformers `EncoderDecoderCache` holding `past` (per layer ``{"decoder": {"key",
    "value"}, "encoder": {...}}``), or an empty one for a decoder's first step, whose layers the
    holes fill (`merge_cache`)."""
    from transformers.cache_utils import EncoderDecoderCache

    own = export_cache(tuple(layer["decoder"] for layer in past or ()))
    cross = export_cache(tuple(layer["encoder"] for layer in past or ()))
    cache = EncoderDecoderCache(own, cross)
    cache.is_updated = dict.fromkeys(range(len(past or ())), True)
    return cache


# --- tasks --------------------------------------------------------------------------------


def default_task(config) -> str | None:
    """The task a Hugging Face checkpoint exports by default: ``text-generation-with-past`` for a
    causal LM whose config keeps a cache, ``text-generation`` for one that does not, else None
    (the model's own forward on generated token ids)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES,
    )

    architecture = (getattr(config, "architectures", None) or [""])[0]
    caches = getattr(config, "use_cache", False)
    if getattr(config, "is_encoder_decoder", False):
        if caches and architecture in set(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values()):
            return TEXT2TEXT_GENERATION_WITH_PAST
        if caches and architecture in set(MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES.values()):
            return SPEECH_RECOGNITION_WITH_PAST
        return None
    if architecture not in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        return None
    return TEXT_GENERATION_WITH_PAST if caches else TEXT_GENERATION


def uses_cache(task: str | None) -> bool:
    """Whether the model runs with its KV cache for `task` (its config's ``use_cache``)."""
    return task == TEXT_GENERATION_WITH_PAST or task in SEQ2SEQ_TASKS


def components(task: str | None) -> list[str | None]:
    """The programs an export of `task` writes: Optimum's encoder and decoders for an
    encoder-decoder task, else one (None)."""
    return list(SEQ2SEQ_COMPONENTS) if task in SEQ2SEQ_TASKS else [None]


def check_task(task: str | None) -> None:
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}.")


def check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}.")


def install_task(model: nn.Module, task: str | None, component: str | None = None) -> None:
    """Give `model` the forward of `task` (of its `component` for an encoder-decoder task), an
    instance attribute over the class's forward."""
    model.__dict__.pop("forward", None)  # a forward installed before (the plan probes a first step)
    if task == TEXT_GENERATION_WITH_PAST and _state_cache.is_state_space(model):
        model.forward = _state_cache.state_generation_forward(model)
    elif task == TEXT_GENERATION_WITH_PAST:
        model.forward = _generation_forward(model)
    elif task in SEQ2SEQ_TASKS:
        model.forward = (
            _encoder_forward(model) if component == "encoder" else _decoder_forward(model, component)
        )


def _encoder_forward(model: nn.Module) -> Callable:
    """The encoder of an encoder-decoder: ``(input_ids, attention_mask)`` (``input_features`` for
    speech) -> ``{"last_hidden_state"}``."""
    encoder = model.get_encoder()
    if "input_features" in inspect.signature(encoder.forward).parameters:

        def speech(input_features):
            return {"last_hidden_state": encoder(input_features=input_features).last_hidden_state}

        return speech

    def text(input_ids, attention_mask):
        return {
            "last_hidden_state": encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        }

    return text


def _decoder_forward(model: nn.Module, component: str) -> Callable:
    """One decoder step of an encoder-decoder, by Optimum's names: ``(input_ids,
    [encoder_attention_mask], encoder_hidden_states, [past_key_values])`` -> ``{"logits",
    "present"}``, the past and present as ``{"decoder": {"key", "value"}, "encoder": {...}}``
    per layer. The first step (``decoder``) takes no past and returns the cross-attention keys
    and values it computed; later steps (``decoder_with_past``) take both and return the
    self-attention's only."""
    from transformers.modeling_outputs import BaseModelOutput

    run = model.forward
    accepted = inspect.signature(run).parameters
    cache_keyword = "cache" if "cache" in accepted else "past_key_values"
    first_step = component == "decoder"

    def forward(input_ids, encoder_attention_mask=None, encoder_hidden_states=None, past_key_values=None):
        cache = export_encoder_decoder_cache(past_key_values)
        mask = {} if encoder_attention_mask is None else {"attention_mask": encoder_attention_mask}
        output = run(
            decoder_input_ids=input_ids,
            encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden_states),
            use_cache=True,
            **{cache_keyword: cache},
            **mask,
        )
        own, cross = cache.self_attention_cache.layers, cache.cross_attention_cache.layers
        present = tuple(
            {"decoder": {"key": own[i].keys, "value": own[i].values}}
            | ({"encoder": {"key": cross[i].keys, "value": cross[i].values}} if first_step else {})
            for i in range(len(own))
        )
        return {"logits": output.logits, "present": present}

    return forward


def seq2seq_example(model: nn.Module, component: str, run: Callable):
    """Example inputs of an encoder-decoder's decoder step and their dynamic axes (Optimum's
    names): batch 2, 3 new tokens after a past of 5, an encoder output of 8 positions (distinct
    sizes keep torch.export from unifying the symbols). The cache's shapes come from one first
    step run by `run(model, kwargs)` under fake tensors."""
    generator = torch.Generator().manual_seed(0)
    config = model.config
    batch, seq, past, source = EXAMPLE_BATCH, 3, EXAMPLE_PAST, EXAMPLE_SEQUENCE
    hidden = getattr(config, "d_model", None) or config.hidden_size
    speech = "input_features" in inspect.signature(model.get_encoder().forward).parameters
    dtype = _float_dtype(model)  # the encoder's output: the model's own precision
    probe = {
        "input_ids": torch.zeros(1, 2, dtype=torch.int64),
        "encoder_hidden_states": torch.zeros(1, 3, hidden, dtype=dtype),
    }
    layers = run(model, probe)["present"]
    kwargs: dict[str, Any] = {
        "input_ids": torch.randint(0, config.vocab_size, (batch, seq), generator=generator)
    }
    axes: dict[str, Any] = {"input_ids": {0: "batch_size", 1: "decoder_sequence_length"}}
    if not speech:
        kwargs["encoder_attention_mask"] = torch.ones(batch, source, dtype=torch.int64)
        axes["encoder_attention_mask"] = {0: "batch_size", 1: "encoder_sequence_length"}
    kwargs["encoder_hidden_states"] = torch.randn(batch, source, hidden, generator=generator).to(dtype)
    axes["encoder_hidden_states"] = {0: "batch_size", 1: "encoder_sequence_length"}
    if component == "decoder_with_past":

        def random(like: torch.Tensor, length: int) -> torch.Tensor:
            sizes = (batch, like.shape[1], length, *like.shape[3:])
            return torch.randn(sizes, generator=generator).to(like.dtype)

        kwargs["past_key_values"] = tuple(
            {
                "decoder": {k: random(layer["decoder"][k], past) for k in ("key", "value")},
                "encoder": {k: random(layer["encoder"][k], source) for k in ("key", "value")},
            }
            for layer in layers
        )
        own, cross = SEQ2SEQ_PAST_AXES, SEQ2SEQ_CROSS_AXES
        axes["past_key_values"] = tuple(
            {"decoder": {"key": own, "value": own}, "encoder": {"key": cross, "value": cross}} for _ in layers
        )
    return kwargs, axes


def component_holes(model: nn.Module, hole_paths: list[str], component: str | None) -> list[str]:
    """The holes a component's program calls: the encoder's stack for the encoder, the others
    for a decoder step."""
    if component is None:
        return hole_paths
    encoder = model.get_encoder()
    prefix = next(name for name, module in model.named_modules() if module is encoder) + "."
    return [p for p in hole_paths if p.startswith(prefix) == (component == "encoder")]


def _generation_forward(model: nn.Module) -> Callable:
    """``forward(input_ids, attention_mask, [position_ids], past_key_values)`` -> ``{"logits",
    "present"}``, the cache as one ``{"key", "value"}`` per layer."""
    run = model.forward
    accepted = inspect.signature(run).parameters
    cache_keyword = "cache" if "cache" in accepted else "past_key_values"
    takes_positions = "position_ids" in accepted

    def step(input_ids, attention_mask, position_ids, past_key_values):
        cache = export_cache(past_key_values)
        extra = {"position_ids": position_ids} if takes_positions else {}
        output = run(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=True,
            **{cache_keyword: cache},
            **extra,
        )
        present = tuple({"key": layer.keys, "value": layer.values} for layer in cache.layers)
        return {"logits": output.logits, "present": present}

    if takes_positions:
        return step

    def forward(input_ids, attention_mask, past_key_values):
        return step(input_ids, attention_mask, None, past_key_values)

    return forward


def generation_example(model: nn.Module, layout: list[tuple[torch.Size, torch.Size, torch.dtype]]):
    """Example inputs of one generation step (batch 2, 8 new tokens after a past of 5) and their
    dynamic axes; `layout` gives each cache layer's key and value shape and dtype (a
    state-space model's: its conv and ssm state's, see `_state_cache`)."""
    if _state_cache.is_state_space(model):
        return _state_cache.state_example(model, layout, EXAMPLE_BATCH, EXAMPLE_SEQUENCE, EXAMPLE_PAST)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batch, seq, past = EXAMPLE_BATCH, EXAMPLE_SEQUENCE, EXAMPLE_PAST
    kwargs: dict[str, Any] = {
        "input_ids": torch.randint(0, vocab, (batch, seq), generator=generator),
        "attention_mask": torch.ones(batch, past + seq, dtype=torch.int64),
    }
    if "position_ids" in inspect.signature(model.forward).parameters:
        kwargs["position_ids"] = torch.arange(past, past + seq).expand(batch, seq).contiguous()

    def random(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        sizes = (batch, shape[1], past, *shape[3:])
        return torch.randn(sizes, generator=generator).to(dtype)

    kwargs["past_key_values"] = tuple(
        {"key": random(key, dtype), "value": random(value, dtype)} for key, value, dtype in layout
    )
    axes = {name: GENERATION_AXES[name] for name in kwargs}
    return kwargs, axes


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point weights (bf16 for a bf16 checkpoint)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def default_inputs(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict[int, str]]] | None:
    """Example inputs generated from the model's config, and their dynamic axes: images
    (``pixel_values``, batch dynamic) for a vision model, token ids (with an attention mask when
    forward takes one) for a model with a vocabulary; None when the config says neither."""
    config = getattr(model, "config", None)
    generator = torch.Generator().manual_seed(0)
    accepted = inspect.signature(model.forward).parameters
    size, channels = getattr(config, "image_size", None), getattr(config, "num_channels", None)
    if "pixel_values" in accepted and isinstance(size, int) and isinstance(channels, int):
        pixels = torch.randn(EXAMPLE_BATCH, channels, size, size, generator=generator)
        return {"pixel_values": pixels}, {"pixel_values": {0: "batch_size"}}
    vocab = getattr(config, "vocab_size", None)
    mel_bins, frames = getattr(config, "num_mel_bins", None), getattr(config, "max_source_positions", None)
    kwargs: dict[str, torch.Tensor] = {}
    axes: dict[str, dict[int, str]] = {}
    if "input_features" in accepted and isinstance(mel_bins, int) and isinstance(frames, int):
        # speech: log-mel features of the full window the encoder's positions cover
        # in the model's precision, as its convolutions take them (no cast inside, unlike pixels)
        features = torch.randn(EXAMPLE_BATCH, mel_bins, 2 * frames, generator=generator)
        kwargs["input_features"] = features.to(_float_dtype(model))
        axes["input_features"] = {0: "batch_size"}
    elif vocab:
        kwargs["input_ids"] = torch.randint(0, vocab, (EXAMPLE_BATCH, EXAMPLE_SEQUENCE), generator=generator)
        if "attention_mask" in accepted:
            kwargs["attention_mask"] = torch.ones_like(kwargs["input_ids"])
        axes |= {k: {0: "batch_size", 1: "sequence_length"} for k in kwargs}
    else:
        return None
    if "decoder_input_ids" in accepted and vocab:
        # an encoder-decoder's full forward: the decoder's tokens so far (fewer than the source's)
        decoder_length = EXAMPLE_SEQUENCE - 3
        kwargs["decoder_input_ids"] = torch.randint(
            0, vocab, (EXAMPLE_BATCH, decoder_length), generator=generator
        )
        axes["decoder_input_ids"] = {0: "batch_size", 1: "decoder_sequence_length"}
    return kwargs, axes


def cache_layout(model: nn.Module, run: Callable) -> list[tuple[torch.Size, torch.Size, torch.dtype]] | None:
    """Each cache layer's key and value shape and dtype, read off one prefill of two tokens run
    by `run(model, kwargs)` (under fake tensors: no weights are touched); for a state-space model
    shardex exports with its state (Mamba), each layer's conv and ssm state shape and dtype
    (`_state_cache.state_layout`). None when the cache is neither (a hybrid model's)."""
    ids = torch.zeros(1, 2, dtype=torch.int64)
    output = run(model, {"input_ids": ids, "use_cache": True})
    cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
    layers = getattr(cache, "layers", None) or []
    if _state_cache.is_state_space(model):
        return _state_cache.state_layout(layers)
    if not layers or not all(isinstance(getattr(layer, "keys", None), torch.Tensor) for layer in layers):
        return None
    return [(layer.keys.shape, layer.values.shape, layer.keys.dtype) for layer in layers]


def hole_names(params: list[str], args: tuple, kwargs: dict, output) -> tuple[list[str], list[str]]:
    """Readable names of a block's hole-form inputs and outputs: positional inputs by the
    forward's parameter names, keyword inputs by their keywords, nested ones by path
    (``position_embeddings.0``), its cache layer as ``past_key_values.key/value`` in and
    ``present.key/value`` out (a state layer's as ``past.conv/ssm`` and ``present.conv/ssm``);
    its own outputs ``output`` (``output.0``, ... for several)."""
    named = {params[i] if i < len(params) else f"input_{i}": a for i, a in enumerate(args)} | kwargs
    has_past = any(isinstance(v, (LayerKV, CrossLayerKV, LayerState)) for v in named.values())
    named = {"past_key_values" if isinstance(v, (LayerKV, CrossLayerKV)) else k: v for k, v in named.items()}
    named = {"past" if isinstance(v, LayerState) else k: v for k, v in named.items()}
    outputs = {"output": output[0], "present": output[1]} if has_past else {"output": output}
    return tree_names(named), tree_names(outputs)


def tree_names(tree, *, prefix: str = "") -> list[str]:
    """Names of a tree's tensors from their paths: dict keys and attributes as they are,
    sequence positions as numbers, joined by '.' (``present.0.key``)."""
    names = []
    for path, leaf in pytree.tree_flatten_with_path(tree)[0]:
        if not isinstance(leaf, torch.Tensor):
            continue
        parts = []
        for key in path:
            if isinstance(key, pytree.MappingKey):
                parts.append(str(key.key))
            elif isinstance(key, pytree.SequenceKey):
                parts.append(str(key.idx))
            elif isinstance(key, pytree.GetAttrKey):
                parts.append(key.name)
            else:
                parts.append(str(key))
        name = ".".join([prefix, *parts] if prefix else parts)
        names.append(name if name and not name[0].isdigit() else f"output.{name}".rstrip("."))
    return names
