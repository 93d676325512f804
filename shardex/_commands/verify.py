"""`shardex verify OUT`: re-verify an export against its source and refresh its report."""

from __future__ import annotations

import argparse

import shardex
from shardex._commands import (
    EXIT_CODES_HELP,
    add_output_flags,
    add_ray_flags,
    finish_with_manifest,
    load_export,
)

EXAMPLES = """\
examples:
  shardex verify out/llama
  shardex verify out/llama --atol 1e-3 --address auto
  shardex verify out/mlp --factory mypkg.models:build

Checks model.onnx's sha256 against the manifest, runs the source model in PyTorch and the saved
files in ONNX Runtime (which resolves every weight reference itself) on the example inputs saved
with the export (grown along their dynamic axes), comparing the outputs and each block's outputs,
and checks every shard's digest (BLAKE3; sha256 in older manifests). The manifest and report are
updated. Code is imported only when named on this command line (--factory, --trust-remote-code),
never because the manifest says so."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="re-verify an export against its source model",
        description="Re-run the shard hash check and the global and per-block verification of an\n"
        "existing export against the model it was exported from.",
        epilog=f"{EXAMPLES}\n\n{EXIT_CODES_HELP}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("output", metavar="OUT", help="the output directory of `shardex export`")
    parser.add_argument(
        "--factory",
        metavar="PACKAGE.MODULE:FUNCTION",
        help="the factory to import for an export of a factory model, e.g. --factory mypkg.models:build; "
        "never taken from the manifest (a downloaded export cannot make shardex run its code)",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the checkpoint's own Python code (auto_map), as `export --trust-remote-code` did; never "
        "taken from the manifest",
    )
    parser.add_argument(
        "--atol",
        type=float,
        help="absolute tolerance, e.g. --atol 1e-3, times each output's largest |value| where that exceeds 1 "
        "(default: by compute dtype)",
    )
    parser.add_argument(
        "--rtol", type=float, help="relative tolerance, e.g. --rtol 1e-2 (default: by compute dtype)"
    )
    parser.add_argument(
        "--verify-tokens",
        type=int,
        metavar="N",
        help="for a generation export, tokens to decode through the cache in both runtimes "
        "(default: as at export; 0 skips)",
    )
    add_ray_flags(parser)
    add_output_flags(
        parser, json_help="print the result (manifest subset) as JSON on stdout instead of a summary"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    load_export(args.output)  # a missing or unreadable manifest is bad input, not a failure
    try:
        shardex.verify(
            args.output,
            atol=args.atol,
            rtol=args.rtol,
            verify_tokens=args.verify_tokens,
            address=args.address,
            workers=args.workers,
            factory=args.factory,
            trust_remote_code=args.trust_remote_code,
        )
    except shardex.VerificationError as e:
        return finish_with_manifest(args, args.output, heading="verified", failure=e)
    return finish_with_manifest(args, args.output, heading="verified")
