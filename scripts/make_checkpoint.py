"""Write a random-weight Llama-architecture (or, with `--family t5`, T5) checkpoint, as
`save_pretrained` lays it out.

Used by the README demo and the benchmarks. Weights are drawn from a pool of normal(0, 0.02)
values so a 13 GB checkpoint takes seconds of CPU, not minutes; the skeleton comes from
transformers on the meta device, so names and shapes are exactly the real model's. With
`--sparse` the safetensors headers are real and the data regions are holes (zeros that take no
disk): a 138 GB Llama-2-70B-shaped checkpoint in a second, for exports that never read the data
(`--zero-copy`).

    python scripts/make_checkpoint.py OUT_DIR [--hidden 512 --layers 8 --dtype float32 ...]
    python scripts/make_checkpoint.py OUT_DIR --sparse --hidden 8192 --intermediate 28672 \
        --layers 80 --heads 64 --kv-heads 8 --dtype bfloat16        # Llama-2-70B shapes
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time

import numpy as np
import torch

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
POOL_VALUES = 1 << 24


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output_dir")
    parser.add_argument(
        "--family", default="llama", choices=["llama", "t5"], help="llama (decoder) or t5 (encoder-decoder)"
    )
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=None, help="default: 2.75 x hidden, rounded")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--shard-gb", type=float, default=5.0, help="max size of one safetensors file")
    parser.add_argument(
        "--sparse", action="store_true", help="real headers, data regions left as holes (all zeros, no disk)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="other seeds give other weights (fine-tunes of one architecture)"
    )
    return parser.parse_args(argv)


def llama_config(args: argparse.Namespace):
    import transformers

    intermediate = args.intermediate or int(round(args.hidden * 2.75 / 256)) * 256
    return transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads,
        max_position_embeddings=4096,
        dtype=args.dtype,
        architectures=["LlamaForCausalLM"],
    )


def t5_config(args: argparse.Namespace):
    """A T5 v1.1-style encoder-decoder: `--layers` in each stack, gated GELU, untied head."""
    import transformers

    return transformers.T5Config(
        vocab_size=args.vocab,
        d_model=args.hidden,
        d_ff=args.intermediate or int(round(args.hidden * 2.75 / 256)) * 256,
        d_kv=args.hidden // args.heads,
        num_layers=args.layers,
        num_decoder_layers=args.layers,
        num_heads=args.heads,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=0,
        dtype=args.dtype,
        architectures=["T5ForConditionalGeneration"],
    )


CONFIGS = {"llama": llama_config, "t5": t5_config}


def write_checkpoint(
    config, output_dir: str, dtype: torch.dtype, shard_bytes: int, *, sparse: bool = False, seed: int = 0
) -> int:
    """Write config.json, the safetensors files and the index; return the bytes of tensor data
    (holes when `sparse`)."""
    import transformers

    model_class = getattr(transformers, config.architectures[0])
    with torch.device("meta"):
        model = model_class(config)
    state = model.state_dict(keep_vars=True)
    stored: dict[int, str] = {}  # tied tensors (T5's embeddings) are stored once, as save_pretrained does
    for name, tensor in state.items():
        stored.setdefault(id(tensor), name)
    tensors = [
        (n, tuple(p.shape)) for n, p in state.items() if not n.endswith("inv_freq") and stored[id(p)] == n
    ]
    pool = (
        torch.from_numpy(np.random.default_rng(2 * seed).standard_normal(POOL_VALUES, dtype=np.float32))
        * 0.02
    ).to(dtype)
    pool_bytes = pool.view(torch.uint8).numpy()
    itemsize = pool.element_size()

    files: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = int(np.prod(shape)) * itemsize
        if files[-1] and size + nbytes > shard_bytes:
            files.append([])
            size = 0
        files[-1].append((name, shape))
        size += nbytes

    os.makedirs(output_dir, exist_ok=True)
    config.save_pretrained(output_dir)
    weight_map = {}
    total = 0
    rng = np.random.default_rng(2 * seed + 1)
    for i, members in enumerate(files):
        file = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        header, offset = {}, 0
        for name, shape in members:
            nbytes = int(np.prod(shape)) * itemsize
            header[name] = {
                "dtype": SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
            weight_map[name] = file
        encoded = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(os.path.join(output_dir, file), "wb") as f:
            f.write(struct.pack("<Q", len(encoded)) + encoded)
            if sparse:
                f.truncate(8 + len(encoded) + offset)
                members = []
            for _, shape in members:
                remaining = int(np.prod(shape)) * itemsize
                while remaining:
                    start = int(rng.integers(0, pool_bytes.size // 2 // itemsize)) * itemsize
                    chunk = pool_bytes[start : start + min(remaining, pool_bytes.size - start)]
                    f.write(chunk)
                    remaining -= chunk.size
        total += offset
    with open(os.path.join(output_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return total


def main(argv=None) -> int:
    args = parse_args(argv)
    config = CONFIGS[args.family](args)
    start = time.perf_counter()
    total = write_checkpoint(
        config,
        args.output_dir,
        getattr(torch, args.dtype),
        int(args.shard_gb * 1e9),
        sparse=args.sparse,
        seed=args.seed,
    )
    params = total // torch.tensor([], dtype=getattr(torch, args.dtype)).element_size()
    print(
        f"wrote {args.output_dir}: {config.architectures[0]}, {args.layers} layers, hidden {args.hidden}, {params / 1e9:.2f}B parameters, "
        f"{total / 1e9:.2f} GB {args.dtype}{' (sparse: holes)' if args.sparse else ''} in "
        f"{time.perf_counter() - start:.1f}s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
