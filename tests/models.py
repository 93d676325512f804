"""Tiny real models built inside the tests (nothing is downloaded)."""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file
from torch import nn


def llama_config(layers: int = 4, **overrides):
    import transformers

    values = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    values.update(overrides)
    return transformers.LlamaConfig(**values)


def save_hf(model, directory, *, max_shard_size: str | None = None) -> str:
    """save_pretrained with random weights (seeded by the caller), optionally multi-file."""
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return os.fspath(directory)


def make_llama(
    directory, *, layers: int = 4, dtype=torch.float32, max_shard_size: str | None = None, **overrides
):
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config(layers, **overrides)).to(dtype).eval()
    return save_hf(model, directory, max_shard_size=max_shard_size)


def make_gpt2(directory, *, layers: int = 3):
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=128, n_positions=256, n_embd=64, n_layer=layers, n_head=4)
    return save_hf(transformers.GPT2LMHeadModel(config).eval(), directory)


class ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x)))) * scale


class BlockStack(nn.Module):
    """A plain-torch model: input projection, repeated residual blocks, output head; a
    non-persistent buffer and a submodule the forward never uses."""

    def __init__(self, width: int = 32, layers: int = 4, features: int = 16, classes: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(features, width)
        self.blocks = nn.ModuleList(ResidualBlock(width) for _ in range(layers))
        self.head = nn.Linear(width, classes)
        self.unused = nn.Linear(width, width)
        self.register_buffer("scale", torch.full((width,), 0.5), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, self.scale)
        return self.head(h)


class SpectralBlock(ResidualBlock):
    """A block with an op torch.onnx has no translation for (singular values): its capture fails."""

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return super().forward(x, scale) * torch.linalg.svdvals(x).sum(-1, keepdim=True).unsqueeze(-1)


def make_spectral_stack() -> BlockStack:
    """Factory used as "tests.models:make_spectral_stack": a stack of `SpectralBlock`s."""
    model = BlockStack()
    model.blocks = nn.ModuleList(SpectralBlock(32) for _ in model.blocks)
    return model


def make_block_stack() -> BlockStack:
    """Factory used as "tests.models:make_block_stack"."""
    return BlockStack()


def save_block_stack(path) -> BlockStack:
    torch.manual_seed(0)
    model = BlockStack().eval()
    save_file(model.state_dict(), os.fspath(path))
    return model


class TiedEmbeddingModel(nn.Module):
    """An in-memory model with tied weights, a non-contiguous parameter and a non-persistent buffer."""

    def __init__(self, vocab: int = 64, width: int = 32, layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(ResidualBlock(width) for _ in range(layers))
        self.proj = nn.Parameter(torch.randn(width, width).t())  # non-contiguous
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.embed.weight  # tied
        self.register_buffer("scale", torch.linspace(0.1, 1.0, width), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h, self.scale)
        return self.lm_head(h @ self.proj)
