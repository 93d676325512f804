"""`shardex zoo MANIFEST.toml OUT`: export every model of a zoo, then print the summary table."""

from __future__ import annotations

import argparse
import dataclasses
import os

from shardex._commands import (
    EXIT_CODES_HELP,
    EXIT_OK,
    EXIT_VERIFICATION_FAILED,
    UsageError,
    add_output_flags,
    at_least_one,
    print_json,
)
from shardex._commands.export import check_export_flags, zoo_options
from shardex._zoo import LOG_DIR, RESULTS_JSON, RESULTS_MARKDOWN, ZooEntry, format_table, load_zoo, run_zoo

EXAMPLES = """\
example manifest (zoo.toml):
  [defaults]                       # any `shardex export` option, '_' for '-'
  max_shard_size = "2GiB"
  dtype = "bf16"

  [[model]]
  name = "llama-3-8b"              # output: OUT/llama-3-8b
  source = "ckpts/Llama-3-8B"      # paths are relative to the manifest
  blocks = "model.layers.*"

  [[model]]
  name = "mlp"
  source = "mypkg.models:build"    # a factory, importable from the current directory
  weights = "weights/mlp.safetensors"
  input = ["x=2x16"]
  dynamic_axes = ["x=0:batch"]
  verify = false                   # booleans: true -> --flag, false -> --no-flag

examples:
  shardex zoo zoo.toml out/zoo
  shardex zoo zoo.toml out/zoo --max-concurrent 4 --address auto

A re-run skips models whose export is complete and intact and whose entry is unchanged, and
retries the others (with --resume when the entry is unchanged, keeping the shards already
written). Exit code 1 when any model did not finish (its error is in the table)."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "zoo",
        help="export many models listed in a TOML manifest",
        description="Export every model of a TOML manifest, each by its own `shardex export` process,\n"
        "several at once; one model's failure does not stop the others.",
        epilog=f"{EXAMPLES}\n\n{EXIT_CODES_HELP}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("manifest", metavar="MANIFEST.toml", help="the zoo manifest, e.g. zoo.toml")
    parser.add_argument(
        "output",
        metavar="OUT",
        help=f"zoo output directory: each model in OUT/NAME, logs in OUT/{LOG_DIR}, the summary in "
        f"OUT/{RESULTS_JSON} and OUT/{RESULTS_MARKDOWN}",
    )
    parser.add_argument(
        "--max-concurrent",
        type=at_least_one,
        default=1,
        metavar="N",
        help="export at most N models at once, e.g. --max-concurrent 4 (default: 1; each export already "
        "uses every Ray CPU, so more helps on a cluster or with many small models)",
    )
    parser.add_argument(
        "--address",
        help="Ray cluster every export joins, e.g. --address auto (default: RAY_ADDRESS, else each export "
        "starts and stops its own local Ray)",
    )
    add_output_flags(parser, json_help="print every model's result as JSON on stdout instead of the table")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    entries = load_zoo(args.manifest, zoo_options())
    for entry in entries:
        _check_entry(entry, args.manifest)
    results = run_zoo(entries, args.output, max_concurrent=args.max_concurrent, address=args.address)
    if args.json:
        print_json(
            {"output_dir": os.path.abspath(args.output), "models": [dataclasses.asdict(r) for r in results]}
        )
    else:
        print(format_table(results))
        done = sum(r.done for r in results)
        summary = ", ".join(os.path.join(args.output, name) for name in (RESULTS_JSON, RESULTS_MARKDOWN))
        print(f"\n{done}/{len(results)} models exported; summary in {summary}")
    return EXIT_OK if all(r.done for r in results) else EXIT_VERIFICATION_FAILED


def _check_entry(entry: ZooEntry, manifest: str) -> None:
    """Reject, before any export starts, an entry its `shardex export` would reject at once."""
    try:
        parsed = check_export_flags([entry.source, "OUT", *entry.export_flags()])
    except UsageError as e:
        raise UsageError(f"{manifest}: model {entry.name!r}: {e}") from None
    for key, value in entry.options.items():
        if isinstance(value, list) and not isinstance(getattr(parsed, key), list):
            raise UsageError(f"{manifest}: model {entry.name!r}: {key} takes one value, not a list.")
