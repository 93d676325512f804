"""`shardex export SRC OUT`: export a checkpoint or a factory model, then print a summary."""

from __future__ import annotations

import argparse
import re

import torch

import shardex
from shardex._commands import (
    EXIT_CODES_HELP,
    Parser,
    UsageError,
    add_output_flags,
    add_ray_flags,
    finish_with_manifest,
)
from shardex._dtypes import BY_NAME
from shardex._report import REPORT_FILE
from shardex._tasks import RUNTIMES, TASKS

EXAMPLES = """\
examples:
  shardex export ./Llama-3-8B out/llama --dtype bf16 --max-shard-size 2GiB
  shardex export meta-llama/Llama-3.1-8B out/llama --revision main
  shardex export ./ckpt out/ckpt --blocks 'model.layers.*' --address ray://head:10001
  shardex export mypkg.models:build out/mlp --weights mlp.safetensors \\
      --input x=2x16 --dynamic-axes x=0:batch

Checkpoints with a vocabulary need no --input: token ids (batch 2, sequence 8) with dynamic
batch and sequence axes are generated. Factory models name their forward's keyword inputs.

A Hub id is fetched with huggingface_hub into its cache (HF_HOME, HF_HUB_CACHE), and read from
there: only config, generation config, safetensors (+ index) and tokenizer files. HF_TOKEN is
used for private and gated models; with HF_HUB_OFFLINE=1 only the cache is used. When a local
path has the same name as the id (a directory ./org/name), the local directory wins."""

# The flags a zoo entry may not set: the zoo chooses them for every export it runs.
ZOO_CONTROLLED = frozenset(
    {"source", "output", "overwrite", "resume", "address", "json", "quiet", "verbose", "debug"}
)

INPUT_SPEC = re.compile(
    r"(?P<name>[A-Za-z_]\w*)=(?P<dims>\d+(?:x\d+)*)(?::(?P<dtype>\w+))?(?::(?P<high>\d+))?"
)
AXES_SPEC = re.compile(r"(?P<name>[A-Za-z_]\w*)=(?P<axes>\d+:\w+(?:,\d+:\w+)*)")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export one model to a sharded, verified ONNX program",
        description="Export a PyTorch model to OUT/model.onnx with its weights in OUT/model-*.data shards,\n"
        "verify it against PyTorch (whole model and block by block), and write OUT/manifest.json\n"
        f"and OUT/{REPORT_FILE}.",
        epilog=f"{EXAMPLES}\n\n{EXIT_CODES_HELP}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_export_arguments(parser)
    parser.set_defaults(run=run)


def export_parser() -> Parser:
    """A standalone parser of the export flags, to check a zoo entry as the export would."""
    parser = Parser(prog="shardex export")
    add_export_arguments(parser)
    return parser


def check_export_flags(argv: list[str]) -> argparse.Namespace:
    """Parse `argv` as `shardex export` would; raise `UsageError` for what it would reject
    before starting any work."""
    args = export_parser().parse_args(argv)
    example_inputs(args.input or [])
    dynamic_axes(args.dynamic_axes or [])
    return args


def zoo_options() -> frozenset[str]:
    """The export options a zoo entry may set, by flag name with '_' for '-' (e.g. max_shard_size)."""
    defaults = export_parser().parse_args(["SRC", "OUT"])
    return frozenset(vars(defaults)) - ZOO_CONTROLLED


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        metavar="SRC",
        help="a Hugging Face checkpoint directory (config.json + *.safetensors), e.g. ./Llama-3-8B, a "
        "Hugging Face Hub id, e.g. meta-llama/Llama-3.1-8B (a local directory of that name wins), or a "
        "factory 'package.module:function' returning the nn.Module (with --weights)",
    )
    parser.add_argument(
        "output", metavar="OUT", help="output directory, created if missing; must be empty unless --overwrite"
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--weights",
        metavar="PATH",
        help="safetensors file or directory holding a factory model's weights, e.g. --weights mlp.safetensors",
    )
    model.add_argument(
        "--revision",
        metavar="REV",
        help="branch, tag or commit hash of a Hub id SRC, e.g. --revision v1.0 (default: main)",
    )
    model.add_argument(
        "--input",
        metavar="NAME=SHAPE[:DTYPE[:HIGH]]",
        action="append",
        help="an example keyword input to trace with, repeatable: floats are drawn from a normal distribution, "
        "integers from [0, HIGH) (HIGH required), seed 0; DTYPE is one of "
        f"{', '.join(BY_NAME)} (default float32); e.g. --input x=2x16 --input ids=2x8:int64:32000",
    )
    model.add_argument(
        "--dynamic-axes",
        metavar="NAME=DIM:AXIS[,DIM:AXIS]",
        action="append",
        help="dynamic axes of an input, repeatable, e.g. --dynamic-axes input_ids=0:batch,1:sequence "
        "(default for generated token ids: batch and sequence)",
    )
    model.add_argument(
        "--task",
        choices=TASKS,
        help="what a Hugging Face checkpoint's program computes (Optimum's task names): causal LMs default to "
        "text-generation-with-past (one decoder step, KV cache as inputs and outputs, ready for "
        "onnxruntime-genai), text-generation gives logits without a cache",
    )
    model.add_argument(
        "--blocks",
        metavar="PATTERN",
        help="fnmatch pattern of the repeated blocks to capture once each, e.g. --blocks 'model.layers.*' "
        "(default: the largest nn.ModuleList of same-class modules)",
    )
    model.add_argument(
        "--trust-remote-code",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="run the checkpoint's own Python code (auto_map) when transformers has no class for it; "
        "only for checkpoints you trust (default: off)",
    )
    onnx = parser.add_argument_group("ONNX output")
    onnx.add_argument(
        "--dtype",
        help="convert floating weights and compute to float32, float16 or bfloat16 (fp32/fp16/bf16), "
        "e.g. --dtype bf16 (default: keep the checkpoint's dtype)",
    )
    onnx.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="onnxruntime",
        help="what the graph is written for: onnxruntime rewrites each distinct block once into ONNX Runtime's "
        "fused ops for its CPU provider (norms, rotary, attention where it pays), onnxruntime-cuda for its "
        "CUDA provider, onnx keeps standard ONNX ops only (default: onnxruntime)",
    )
    onnx.add_argument(
        "--opset", type=int, help="ONNX opset version, e.g. --opset 21 (default: the exporter's)"
    )
    onnx.add_argument(
        "--max-shard-size",
        metavar="SIZE",
        default="1GiB",
        help="largest weight shard file, e.g. --max-shard-size 2GiB or 500MB (default: 1GiB)",
    )
    onnx.add_argument(
        "--inline",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="inline the block functions into the main graph (default: one ONNX function per distinct "
        "block, called once per layer)",
    )
    check = parser.add_argument_group("verification")
    check.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compare ONNX Runtime with PyTorch on the whole model and on every block (default: on; "
        "--no-verify skips it, `shardex verify OUT` runs it later)",
    )
    check.add_argument(
        "--verify-tokens",
        type=int,
        default=8,
        metavar="N",
        help="for a generation export, also decode through the KV cache: ONNX Runtime's steps (a prompt, "
        "one token, the rest at once) must pick PyTorch's next token at N positions, with its logits "
        "(default: 8; 1 runs the prompt alone, feeding no cache back; 0 skips it)",
    )
    check.add_argument(
        "--atol",
        type=float,
        help="absolute tolerance, e.g. --atol 1e-3, times each output's largest |value| where that exceeds 1 "
        "(default: by compute dtype, 1e-4 for float32)",
    )
    check.add_argument(
        "--rtol",
        type=float,
        help="relative tolerance, e.g. --rtol 1e-2 (default: by compute dtype, 1e-3 for float32)",
    )
    onnx.add_argument(
        "--zero-copy",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="write no weight copies: the external data points into the source safetensors files, "
        "hard-linked into OUT (same filesystem; no --dtype conversion; default: off)",
    )
    cache = parser.add_argument_group("capture cache")
    cache.add_argument(
        "--capture-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse captured pieces (weightless graphs, keyed by architecture, shapes, options and library "
        "versions) from earlier exports, and keep new ones; the output is byte-identical either way "
        "(default: on; --no-capture-cache captures every piece)",
    )
    cache.add_argument(
        "--capture-cache-dir",
        metavar="DIR",
        help="where the capture cache lives, e.g. --capture-cache-dir /scratch/shardex-cache (default: "
        "$SHARDEX_CAPTURE_CACHE, else $XDG_CACHE_HOME/shardex/captures, i.e. ~/.cache/shardex/captures)",
    )
    add_ray_flags(parser)
    existing = parser.add_argument_group("existing output").add_mutually_exclusive_group()
    existing.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous shardex export in OUT (other files in OUT are never deleted)",
    )
    existing.add_argument(
        "--resume",
        action="store_true",
        help="finish an export that was killed: shards already written to OUT whose digest still "
        "matches are kept (an export of another model or with other options is refused)",
    )
    add_output_flags(
        parser, json_help="print the result (manifest subset) as JSON on stdout instead of a summary"
    )


def run(args: argparse.Namespace) -> int:
    kwargs = example_inputs(args.input or [])
    dynamic_shapes = dynamic_axes(args.dynamic_axes or [])
    try:
        shardex.export(
            args.source,
            args.output,
            weights=args.weights,
            kwargs=kwargs,
            dynamic_shapes=dynamic_shapes,
            dtype=args.dtype,
            task=args.task,
            runtime=args.runtime,
            opset=args.opset,
            block_pattern=args.blocks,
            max_shard_size=args.max_shard_size,
            inline=args.inline,
            verify=args.verify,
            verify_tokens=args.verify_tokens,
            atol=args.atol,
            rtol=args.rtol,
            address=args.address,
            workers=args.workers,
            overwrite=args.overwrite,
            resume=args.resume,
            trust_remote_code=args.trust_remote_code,
            zero_copy=args.zero_copy,
            revision=args.revision,
            capture_cache=(args.capture_cache_dir or True) if args.capture_cache else False,
        )
    except shardex.VerificationError as e:
        return finish_with_manifest(args, args.output, heading="exported", failure=e)
    return finish_with_manifest(args, args.output, heading="exported")


def example_inputs(specs: list[str]) -> dict[str, torch.Tensor] | None:
    """``["x=2x16", "ids=2x8:int64:1000"]`` -> keyword example inputs (seeded, reproducible)."""
    if not specs:
        return None
    generator = torch.Generator().manual_seed(0)
    inputs: dict[str, torch.Tensor] = {}
    for spec in specs:
        match = INPUT_SPEC.fullmatch(spec)
        if not match:
            raise UsageError(
                f"--input must look like NAME=2x16, NAME=2x16:float16 or NAME=2x8:int64:1000, got {spec!r}."
            )
        name, dtype_name, high = match["name"], match["dtype"] or "float32", match["high"]
        if name in inputs:
            raise UsageError(f"--input {name} is given twice; give each input once.")
        dtype = BY_NAME.get(dtype_name)
        if dtype is None:
            raise UsageError(
                f"--input {spec}: dtype must be one of {', '.join(BY_NAME)}, got {dtype_name!r}."
            )
        shape = [int(d) for d in match["dims"].split("x")]
        if dtype.is_floating_point:
            if high is not None:
                raise UsageError(
                    f"--input {spec}: an upper bound is only for integer inputs; drop ':{high}'."
                )
            inputs[name] = torch.randn(shape, generator=generator).to(dtype)
        else:
            if high is None:
                raise UsageError(
                    f"--input {spec}: integer inputs need an upper bound for their values, "
                    f"e.g. {name}={match['dims']}:{dtype_name}:1000."
                )
            inputs[name] = torch.randint(0, int(high), shape, generator=generator, dtype=dtype)
    return inputs


def dynamic_axes(specs: list[str]) -> dict[str, dict[int, str]] | None:
    """``["input_ids=0:batch,1:sequence"]`` -> ``{"input_ids": {0: "batch", 1: "sequence"}}``."""
    if not specs:
        return None
    axes: dict[str, dict[int, str]] = {}
    for spec in specs:
        match = AXES_SPEC.fullmatch(spec)
        if not match:
            raise UsageError(
                f"--dynamic-axes must look like NAME=DIM:AXIS[,DIM:AXIS], e.g. input_ids=0:batch,1:sequence, "
                f"got {spec!r}."
            )
        if match["name"] in axes:
            raise UsageError(f"--dynamic-axes {match['name']} is given twice; list all its axes in one flag.")
        pairs = [pair.split(":") for pair in match["axes"].split(",")]
        axes[match["name"]] = {int(dim): axis for dim, axis in pairs}
    return axes
