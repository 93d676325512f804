"""Tiny random-weight configurations of the model families users export, one per family.

The architecture matrix (`scripts/arch_matrix.py`, and parametrized tests) builds each entry,
saves it with transformers' own `save_pretrained` and compares exports in ONNX Runtime with
transformers at `SIZES`, two input sizes other than shardex's example (batch 2, 8 tokens).

Widths are 32 to 128 and every vocabulary has `VOCAB` tokens, a size no width shares, so a
vocabulary axis can never be mistaken for a hidden one. Token ids are drawn above the special
ids (pad, bos, eos: 0, 1, 2), so no input is padding. Importing this module builds nothing.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

VOCAB = 160
# (batch, sequence) of the two comparisons, and of the example the other exporters capture with.
SIZES = ((1, 5), (3, 11))
EXAMPLE = (2, 8)
KINDS = ("decoder", "moe", "encoder", "vision", "encoder-decoder", "speech", "state-space")
SPECIAL_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
# Config fields holding a width: none may equal the vocabulary size.
_WIDTH_SUFFIXES = ("_size", "_dim", "d_model", "d_ff", "n_embd", "n_inner", "_rank")


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One family: `config()` gives its transformers config, `build()` the seeded model in
    eval mode, `inputs(model, batch, seq)` its forward kwargs; `output` names the output the
    comparison checks (every position of it)."""

    name: str
    kind: str
    model_class: str
    config_class: str
    config_kwargs: dict[str, Any]
    output: str = "logits"

    def config(self):
        import transformers

        config = getattr(transformers, self.config_class)(**self.config_kwargs)
        widths = {
            k: v
            for k, v in config.to_dict().items()
            if k != "vocab_size" and k.endswith(_WIDTH_SUFFIXES) and isinstance(v, int)
        }
        clash = [k for k, v in widths.items() if v == getattr(config, "vocab_size", None)]
        assert not clash, f"Bug: {self.name}'s vocab_size equals its widths {clash}"
        return config

    def build(self, seed: int = 0) -> nn.Module:
        import transformers

        torch.manual_seed(seed)
        model = getattr(transformers, self.model_class)(self.config())
        return model.eval()

    def load(self, checkpoint: str) -> nn.Module:
        """The model as transformers loads `checkpoint`, without a KV cache: the reference the
        exports are compared with. (Set at load time, so copies of the config that submodules
        keep, like T5's decoder's, have it too.)"""
        import transformers

        cache = {"use_cache": False} if hasattr(self.config(), "use_cache") else {}
        return getattr(transformers, self.model_class).from_pretrained(checkpoint, **cache).eval()

    def inputs(self, model: nn.Module, batch: int, seq: int) -> dict[str, torch.Tensor]:
        return _INPUT_MAKERS[self.kind](model, batch, seq)


def _generator(batch: int, seq: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 * batch + seq)


def _tokens(batch: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(len(SPECIAL_TOKENS), VOCAB, (batch, seq), generator=generator)


def token_inputs(model: nn.Module, batch: int, seq: int) -> dict[str, torch.Tensor]:
    """input_ids, plus an all-ones attention_mask when the forward takes one."""
    ids = _tokens(batch, seq, _generator(batch, seq))
    feeds = {"input_ids": ids}
    if "attention_mask" in inspect.signature(model.forward).parameters:
        feeds["attention_mask"] = torch.ones_like(ids)
    return feeds


def pixel_inputs(model: nn.Module, batch: int, seq: int) -> dict[str, torch.Tensor]:
    """pixel_values at the config's image size (`seq` is unused: the resolution is fixed)."""
    config = model.config
    size = (batch, config.num_channels, config.image_size, config.image_size)
    return {"pixel_values": torch.randn(size, generator=_generator(batch, seq))}


def seq2seq_inputs(model: nn.Module, batch: int, seq: int) -> dict[str, torch.Tensor]:
    """Source tokens of length `seq` and a decoder prefix about half as long."""
    generator = _generator(batch, seq)
    ids = _tokens(batch, seq, generator)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "decoder_input_ids": _tokens(batch, seq // 2 + 1, generator),
    }


def speech_inputs(model: nn.Module, batch: int, seq: int) -> dict[str, torch.Tensor]:
    """input_features of the length the encoder requires (2 frames per source position) and a
    decoder prefix of `seq` tokens."""
    config = model.config
    generator = _generator(batch, seq)
    features = torch.randn((batch, config.num_mel_bins, 2 * config.max_source_positions), generator=generator)
    return {"input_features": features, "decoder_input_ids": _tokens(batch, seq, generator)}


_INPUT_MAKERS: dict[str, Callable[[nn.Module, int, int], dict[str, torch.Tensor]]] = {
    "decoder": token_inputs,
    "moe": token_inputs,
    "encoder": token_inputs,
    "state-space": token_inputs,
    "vision": pixel_inputs,
    "encoder-decoder": seq2seq_inputs,
    "speech": speech_inputs,
}


# Field sets per shape, each entry overriding some: dict(_DECODER, sliding_window=4).
# A Llama-shaped decoder: hidden 64, 4 heads (2 key/value heads), MLP 128, 2 layers.
_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    **SPECIAL_TOKENS,
)
_MOE = dict(_DECODER, num_experts_per_tok=2)  # 2 of 4 experts per token: routing differs by token
_GPT2_LIKE = dict(vocab_size=VOCAB, **SPECIAL_TOKENS)
_ENCODER = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    pad_token_id=0,
)
# BART-shaped encoder-decoders (BART, Whisper): 2 + 2 layers, width 64.
_BART_LIKE = dict(
    vocab_size=VOCAB,
    d_model=64,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=128,
    decoder_ffn_dim=128,
    **SPECIAL_TOKENS,
)
_VISION = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8, num_channels=3
)

_SLIDING, _FULL = "sliding_attention", "full_attention"

ARCHITECTURES: tuple[Architecture, ...] = (
    # --- decoders -------------------------------------------------------------------------
    Architecture("llama", "decoder", "LlamaForCausalLM", "LlamaConfig", _DECODER),
    Architecture(
        "mistral", "decoder", "MistralForCausalLM", "MistralConfig", dict(_DECODER, sliding_window=4)
    ),
    Architecture("qwen2", "decoder", "Qwen2ForCausalLM", "Qwen2Config", _DECODER),
    Architecture("qwen3", "decoder", "Qwen3ForCausalLM", "Qwen3Config", dict(_DECODER, head_dim=16)),
    Architecture("phi", "decoder", "PhiForCausalLM", "PhiConfig", dict(_DECODER, num_key_value_heads=4)),
    Architecture(
        "phi3",
        "decoder",
        "Phi3ForCausalLM",
        "Phi3Config",
        dict(_DECODER, original_max_position_embeddings=128),
    ),
    Architecture("gemma", "decoder", "GemmaForCausalLM", "GemmaConfig", dict(_DECODER, head_dim=16)),
    Architecture(
        "gemma2",
        "decoder",
        "Gemma2ForCausalLM",
        "Gemma2Config",
        dict(_DECODER, head_dim=16, sliding_window=4),
    ),
    Architecture(
        "gemma3-text",
        "decoder",
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        dict(
            _DECODER,
            head_dim=16,
            num_hidden_layers=4,
            sliding_window=4,
            layer_types=[_SLIDING, _SLIDING, _SLIDING, _FULL],
        ),
    ),
    Architecture("cohere", "decoder", "CohereForCausalLM", "CohereConfig", _DECODER),
    Architecture(
        "cohere2",
        "decoder",
        "Cohere2ForCausalLM",
        "Cohere2Config",
        dict(
            _DECODER, num_hidden_layers=4, sliding_window=4, layer_types=[_SLIDING, _SLIDING, _SLIDING, _FULL]
        ),
    ),
    Architecture("glm4", "decoder", "Glm4ForCausalLM", "Glm4Config", dict(_DECODER, head_dim=16)),
    Architecture("granite", "decoder", "GraniteForCausalLM", "GraniteConfig", _DECODER),
    Architecture("olmo2", "decoder", "Olmo2ForCausalLM", "Olmo2Config", _DECODER),
    Architecture(
        "starcoder2", "decoder", "Starcoder2ForCausalLM", "Starcoder2Config", dict(_DECODER, sliding_window=4)
    ),
    Architecture(
        "falcon",
        "decoder",
        "FalconForCausalLM",
        "FalconConfig",
        dict(_GPT2_LIKE, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_hidden_size=128),
    ),
    Architecture(
        "gpt-neox",
        "decoder",
        "GPTNeoXForCausalLM",
        "GPTNeoXConfig",
        dict(
            _GPT2_LIKE,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
        ),
    ),
    Architecture(
        "gpt2",
        "decoder",
        "GPT2LMHeadModel",
        "GPT2Config",
        dict(_GPT2_LIKE, n_embd=64, n_layer=2, n_head=4, n_positions=128),
    ),
    Architecture(
        "gptj",
        "decoder",
        "GPTJForCausalLM",
        "GPTJConfig",
        dict(_GPT2_LIKE, n_embd=64, n_layer=2, n_head=4, n_positions=128, rotary_dim=8),
    ),
    Architecture(
        "opt",
        "decoder",
        "OPTForCausalLM",
        "OPTConfig",
        dict(
            _GPT2_LIKE,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
        ),
    ),
    Architecture(
        "bloom",
        "decoder",
        "BloomForCausalLM",
        "BloomConfig",
        dict(_GPT2_LIKE, hidden_size=64, n_layer=2, n_head=4),
    ),
    # --- mixture of experts ---------------------------------------------------------------
    Architecture(
        "mixtral",
        "moe",
        "MixtralForCausalLM",
        "MixtralConfig",
        dict(_MOE, num_local_experts=4, intermediate_size=96),
    ),
    Architecture(
        "qwen2-moe",
        "moe",
        "Qwen2MoeForCausalLM",
        "Qwen2MoeConfig",
        dict(_MOE, num_experts=4, moe_intermediate_size=48, shared_expert_intermediate_size=96),
    ),
    Architecture(
        "qwen3-moe",
        "moe",
        "Qwen3MoeForCausalLM",
        "Qwen3MoeConfig",
        dict(_MOE, num_experts=4, moe_intermediate_size=48),
    ),
    Architecture(
        "olmoe", "moe", "OlmoeForCausalLM", "OlmoeConfig", dict(_MOE, num_experts=4, intermediate_size=96)
    ),
    Architecture(
        "phimoe",
        "moe",
        "PhimoeForCausalLM",
        "PhimoeConfig",
        dict(_MOE, num_local_experts=4, intermediate_size=96),
    ),
    Architecture(
        "deepseek-v3",
        "moe",
        "DeepseekV3ForCausalLM",
        "DeepseekV3Config",
        dict(
            _MOE,
            num_hidden_layers=3,
            first_k_dense_replace=1,  # layer 0 dense, layers 1-2 MoE: two distinct blocks
            n_routed_experts=4,
            n_shared_experts=1,
            moe_intermediate_size=48,
            n_group=1,
            topk_group=1,
            q_lora_rank=48,
            kv_lora_rank=32,
            qk_rope_head_dim=8,
            qk_nope_head_dim=16,
            v_head_dim=16,
            num_key_value_heads=4,
        ),
    ),
    Architecture(
        "gpt-oss",
        "moe",
        "GptOssForCausalLM",
        "GptOssConfig",
        dict(
            _MOE,
            num_local_experts=4,
            intermediate_size=96,
            head_dim=16,
            sliding_window=4,
            layer_types=[_SLIDING, _FULL],
        ),
    ),
    # --- encoders -------------------------------------------------------------------------
    Architecture("bert", "encoder", "BertForMaskedLM", "BertConfig", _ENCODER),
    Architecture("roberta", "encoder", "RobertaForMaskedLM", "RobertaConfig", dict(_ENCODER, pad_token_id=1)),
    Architecture(
        "distilbert",
        "encoder",
        "DistilBertForMaskedLM",
        "DistilBertConfig",
        dict(
            vocab_size=VOCAB,
            dim=64,
            hidden_dim=128,
            n_layers=2,
            n_heads=4,
            max_position_embeddings=64,
            pad_token_id=0,
        ),
    ),
    Architecture(
        "modernbert",
        "encoder",
        "ModernBertForMaskedLM",
        "ModernBertConfig",
        dict(
            _ENCODER,
            num_hidden_layers=3,
            layer_types=[_FULL, _SLIDING, _SLIDING],
            local_attention=4,
            bos_token_id=1,
            eos_token_id=2,
            cls_token_id=1,
            sep_token_id=2,
        ),
    ),
    # --- vision towers --------------------------------------------------------------------
    Architecture(
        "vit",
        "vision",
        "ViTModel",
        "ViTConfig",
        dict(_VISION, intermediate_size=128),
        output="last_hidden_state",
    ),
    Architecture(
        "dinov2",
        "vision",
        "Dinov2Model",
        "Dinov2Config",
        dict(_VISION, mlp_ratio=2),
        output="last_hidden_state",
    ),
    Architecture(
        "clip-vision",
        "vision",
        "CLIPVisionModel",
        "CLIPVisionConfig",
        dict(_VISION, intermediate_size=128),
        output="last_hidden_state",
    ),
    Architecture(
        "siglip-vision",
        "vision",
        "SiglipVisionModel",
        "SiglipVisionConfig",
        dict(_VISION, intermediate_size=128),
        output="last_hidden_state",
    ),
    # --- encoder-decoder and speech -------------------------------------------------------
    Architecture(
        "t5",
        "encoder-decoder",
        "T5ForConditionalGeneration",
        "T5Config",
        dict(
            vocab_size=VOCAB,
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            pad_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=0,
        ),
    ),
    Architecture(
        "bart",
        "encoder-decoder",
        "BartForConditionalGeneration",
        "BartConfig",
        dict(_BART_LIKE, max_position_embeddings=64, decoder_start_token_id=2, forced_eos_token_id=2),
    ),
    Architecture(
        "whisper",
        "speech",
        "WhisperForConditionalGeneration",
        "WhisperConfig",
        dict(
            _BART_LIKE,
            num_mel_bins=16,
            max_source_positions=16,
            max_target_positions=64,
            decoder_start_token_id=1,
            suppress_tokens=None,
            begin_suppress_tokens=None,
        ),
    ),
    # --- state space ----------------------------------------------------------------------
    Architecture(
        "mamba",
        "state-space",
        "MambaForCausalLM",
        "MambaConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=64,
            state_size=8,
            num_hidden_layers=2,
            expand=2,
            conv_kernel=4,
            **SPECIAL_TOKENS,
        ),
    ),
)

BY_NAME: dict[str, Architecture] = {a.name: a for a in ARCHITECTURES}
assert len(BY_NAME) == len(ARCHITECTURES), "Bug: two architectures share a name"
assert all(a.kind in KINDS for a in ARCHITECTURES), "Bug: an architecture has an unknown kind"
