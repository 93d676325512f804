"""Runtime layout: the files next to `model.onnx` that generation runtimes open a directory with.

onnxruntime-genai reads `genai_config.json` (what the model's inputs and outputs are called, its
head counts, context length, special token ids and search defaults) and the tokenizer files;
Optimum's `ORTModelForCausalLM.from_pretrained(dir)` reads `config.json` (model type, head
counts, `use_cache`) and, when present, `generation_config.json`. This module writes the first
and copies the others from the checkpoint, so `onnxruntime_genai.Model(out)` and
`ORTModelForCausalLM.from_pretrained(out)` open the export directory as it is.

`genai_config.json` follows what the onnxruntime-genai 0.18 model builder writes
(`Model.make_genai_config` in `onnxruntime_genai/models/builders/base.py`), field for field,
minus the options shardex does not produce (paged attention, EP-specific session options,
windowed KV caches, quantized caches). genai rejects unknown keys, so nothing else is added.
Each field and where its value comes from:

model
    bos_token_id, eos_token_id, pad_token_id
        generation_config.json, else config.json, else config.json's `text_config`; eos may be
        a list (genai stops at any of them); pad falls back to the first eos id, as the builder
        does; bos and pad are left out when nothing names them (genai then uses its defaults).
    context_length                `RuntimeIO.context_length` (config's `max_position_embeddings`)
    type                          config.json `model_type` when genai knows it as a plain
                                  decoder with this I/O, else genai's generic "decoder"
    vocab_size                    `RuntimeIO.vocab_size`
    decoder.filename              `RuntimeIO.filename` ("model.onnx")
    decoder.session_options       builder's CPU default: log_id "onnxruntime-genai", no provider
                                  options (genai picks CPU; users add CUDA etc. themselves)
    decoder.head_size             `RuntimeIO.head_dim` (genai sizes the cache with it)
    decoder.hidden_size           `RuntimeIO.hidden_size`
    decoder.num_attention_heads   `RuntimeIO.num_attention_heads`
    decoder.num_key_value_heads   `RuntimeIO.num_kv_heads`
    decoder.num_hidden_layers     `RuntimeIO.num_layers`
    decoder.inputs                the graph inputs present among input_ids / attention_mask /
                                  position_ids, mapped to themselves; past_key_names
                                  "past_key_values.%d.key", past_value_names "past_key_values.%d.value"
    decoder.outputs               logits "logits"; present_key_names "present.%d.key",
                                  present_value_names "present.%d.value"
search
    past_present_share_buffer     `RuntimeIO.fused_attention`: GroupQueryAttention writes into a
                                  preallocated max-length cache; a Concat-based cache cannot
                                  (ONNX Runtime rejects the preallocated present shape)
    max_length                    context length (the builder's choice)
    min_length 0, early_stopping true
    do_sample, temperature, top_k, top_p, num_beams, num_return_sequences, repetition_penalty,
    length_penalty, diversity_penalty, no_repeat_ngram_size
                                  generation_config.json when it sets them, else the
                                  transformers defaults (greedy, 1 beam, top_k 50, top_p 1.0)

Sliding-window models keep a full cache here: the exported graph masks the window itself, so
genai must not slide the cache (the builder's `decoder.sliding_window` section is for its own
windowed GroupQueryAttention).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import os
import shutil
from collections.abc import Mapping

from shardex._errors import OptionsError, SourceError
from shardex._files import atomic_file

logger = logging.getLogger("shardex")

GENAI_CONFIG_FILE = "genai_config.json"
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.*",
    "*.tiktoken",
)
TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids")
# config.json fields that give the context length, in the order they are read
CONTEXT_LENGTH_KEYS = ("seq_length", "max_position_embeddings", "n_positions", "n_ctx")
DEFAULT_CONTEXT_LENGTH = 2048  # for a config that names none (position-free models such as BLOOM)

# onnxruntime-genai 0.18's decoder-only model types (ModelType::IsLLM) that need nothing beyond
# the standard decoder I/O; the others (chatglm, lfm2, phi3small, ...) select special handling.
_GENAI_DECODER_TYPES = frozenset(
    {
        "ernie4_5",
        "gemma",
        "gemma2",
        "gemma3_text",
        "gpt2",
        "granite",
        "internlm2",
        "llama",
        "mistral",
        "nemotron",
        "olmo",
        "phi",
        "phi3",
        "qwen2",
        "qwen3",
        "smollm3",
    }
)
# transformers' GenerationConfig defaults, which genai shares.
_SEARCH_DEFAULTS = {
    "diversity_penalty": 0.0,
    "do_sample": False,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "num_beams": 1,
    "num_return_sequences": 1,
    "repetition_penalty": 1.0,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
}


@dataclasses.dataclass(frozen=True)
class RuntimeIO:
    """The I/O layout of an exported KV-cache decoder, as runtimes need to know it.

    The graph takes `inputs` (a subset of input_ids/attention_mask/position_ids) plus
    `past_key_values.{i}.key/value` [batch, num_kv_heads, past_sequence_length, head_dim] and
    returns `logits` plus `present.{i}.key/value`. `fused_attention`: attention runs as
    GroupQueryAttention, whose cache can share one buffer between past and present.
    """

    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    context_length: int
    fused_attention: bool
    inputs: tuple[str, ...] = TOKEN_INPUTS
    filename: str = "model.onnx"

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "int" and (not isinstance(value, int) or value < 1):
                raise OptionsError(
                    f"RuntimeIO.{field.name} must be a positive int, got {value!r}; pass the model's value."
                )
        unknown = [name for name in self.inputs if name not in TOKEN_INPUTS]
        if unknown or "input_ids" not in self.inputs:
            raise OptionsError(
                f"RuntimeIO.inputs must include 'input_ids' and only names from {TOKEN_INPUTS}, "
                f"got {tuple(self.inputs)}; list the graph's token inputs."
            )
        if os.path.basename(self.filename) != self.filename or not self.filename.endswith(".onnx"):
            raise OptionsError(
                f"RuntimeIO.filename must be a bare *.onnx file name, got {self.filename!r}; e.g. 'model.onnx'."
            )

    @classmethod
    def from_config(
        cls, config: Mapping, *, fused_attention: bool, inputs: tuple[str, ...] = TOKEN_INPUTS
    ) -> RuntimeIO:
        """Read the sizes from a checkpoint's config.json content (a dict, or a transformers
        config's `to_dict()`), including GPT-2's `n_*` names and a multimodal `text_config`."""
        text = {**config, **(config.get("text_config") or {})}

        def first(*keys: str):
            return next((text[k] for k in keys if text.get(k) is not None), None)

        heads = first("num_attention_heads", "n_head")
        hidden = first("hidden_size", "n_embd", "d_model")
        head_dim = first("head_dim") or (hidden // heads if hidden and heads else None)
        return cls(
            num_layers=first("num_hidden_layers", "n_layer"),
            num_attention_heads=heads,
            num_kv_heads=first("num_key_value_heads", "n_head_kv") or heads,
            head_dim=head_dim,
            hidden_size=hidden,
            vocab_size=first("vocab_size"),
            context_length=first(*CONTEXT_LENGTH_KEYS),
            fused_attention=fused_attention,
            inputs=tuple(inputs),
        )


def write_runtime_files(
    output_dir: str | os.PathLike, checkpoint_dir: str | os.PathLike, *, io: RuntimeIO | None
) -> list[str]:
    """Write genai_config.json (unless `io` is None: a model onnxruntime-genai does not run) and
    copy config, generation config and tokenizer files from the checkpoint into `output_dir`;
    returns the file names written, sorted.

    Every file is written under a hidden temporary name, fsynced and renamed, so a final name
    never holds a partial file. A checkpoint without config.json raises `SourceError`.
    """
    out = os.fspath(output_dir)
    checkpoint = os.fspath(checkpoint_dir)
    config = _read_json(checkpoint, "config.json", required=True)
    generation = _read_json(checkpoint, "generation_config.json", required=False)
    names = sorted({*CONFIG_FILES, *_tokenizer_files(checkpoint)} & set(os.listdir(checkpoint)))
    if not any(fnmatch.fnmatch(name, "tokenizer*") for name in names):
        logger.warning(
            "runtime layout: no tokenizer files in %s; onnxruntime_genai.Tokenizer will not load", checkpoint
        )
    for name in names:
        with open(os.path.join(checkpoint, name), "rb") as source, atomic_file(os.path.join(out, name)) as f:
            shutil.copyfileobj(source, f)
    if io is None:
        return names
    with atomic_file(os.path.join(out, GENAI_CONFIG_FILE)) as f:
        f.write((json.dumps(genai_config(io, config, generation), indent=4) + "\n").encode())
    return sorted([*names, GENAI_CONFIG_FILE])


def genai_config(io: RuntimeIO, config: Mapping, generation: Mapping | None = None) -> dict:
    """The genai_config.json content for `io`, with token ids and search defaults taken from
    generation_config.json (`generation`) over config.json (`config`); see the module docstring."""
    generation = generation or {}
    text = config.get("text_config") or {}

    def token(key: str):
        return next((src[key] for src in (generation, config, text) if src.get(key) is not None), None)

    eos = token("eos_token_id")
    pad = token("pad_token_id")
    if pad is None and eos is not None:
        pad = eos[0] if isinstance(eos, list) else eos
    ids = {"bos_token_id": token("bos_token_id"), "eos_token_id": eos, "pad_token_id": pad}
    model_type = text.get("model_type") or config.get("model_type")
    inputs = {name: name for name in TOKEN_INPUTS if name in io.inputs}
    inputs |= {"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    search = {k: d if generation.get(k) is None else generation[k] for k, d in _SEARCH_DEFAULTS.items()}
    return {
        "model": {
            **{k: v for k, v in ids.items() if v is not None},
            "context_length": io.context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": io.filename,
                "head_size": io.head_dim,
                "hidden_size": io.hidden_size,
                "inputs": inputs,
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": io.num_attention_heads,
                "num_hidden_layers": io.num_layers,
                "num_key_value_heads": io.num_kv_heads,
            },
            "type": model_type if model_type in _GENAI_DECODER_TYPES else "decoder",
            "vocab_size": io.vocab_size,
        },
        "search": {
            **search,
            "early_stopping": True,
            "max_length": io.context_length,
            "min_length": 0,
            "past_present_share_buffer": io.fused_attention,
        },
    }


def _tokenizer_files(checkpoint: str) -> list[str]:
    return [n for n in os.listdir(checkpoint) if any(fnmatch.fnmatch(n, p) for p in TOKENIZER_FILES)]


def is_runtime_file(name: str) -> bool:
    """A file `write_runtime_files` may have written (so an overwrite may replace it)."""
    return name in (GENAI_CONFIG_FILE, *CONFIG_FILES) or any(
        fnmatch.fnmatch(name, p) for p in TOKENIZER_FILES
    )


def _read_json(directory: str, name: str, *, required: bool) -> dict | None:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        if required:
            raise SourceError(
                f"a runtime layout needs the checkpoint's {name}, not found in {directory}; "
                "export from a Hugging Face checkpoint directory."
            )
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise SourceError(f"{path} must be readable JSON, got {error}; fix or replace the file.") from None
