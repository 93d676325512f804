"""The `shardex` subcommands, one module each: ``add_parser(subparsers)`` + ``run(args) -> int``.

This package holds what they share: exit codes, the parser class that reports usage errors in
one line, the flags several commands take, loading an export directory as user input, and
printing a finished export's result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from shardex._errors import ShardexError, VerificationError
from shardex._output import MANIFEST_FILE, load_manifest
from shardex._report import format_summary, summarize, write_report

EXIT_OK = 0
EXIT_VERIFICATION_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = """\
exit codes:
  0    success
  1    verification failed: ONNX Runtime disagrees with PyTorch or a shard's digest changed
       (zoo: at least one model did not finish; see its summary)
  2    bad input or usage: missing path, not a checkpoint, bad flag value, bad manifest
  3    internal failure: capture, weight streaming or stitching failed, or a bug in shardex
  130  interrupted (Ctrl-C or SIGTERM)"""


class UsageError(ShardexError):
    """The command line or a file the user named is wrong; the message says how to fix it."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises `UsageError` instead of printing usage and exiting, so
    every bad input ends as one ``shardex: error: ...`` line (and a zoo entry can be checked)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def at_least_one(text: str) -> int:
    """argparse type of counts (workers, concurrent models)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_ray_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Ray")
    group.add_argument(
        "--address",
        help="Ray cluster to run on, e.g. --address ray://head:10001 or auto; local starts a local Ray "
        "whose workers run every stage, as a cluster's would (default: RAY_ADDRESS, else this machine: "
        "the command does small work itself and starts a local Ray only for more, stopped after)",
    )
    group.add_argument(
        "--workers",
        type=at_least_one,
        metavar="N",
        help="at most N Ray tasks at once, e.g. --workers 8 (default: as many as there are tasks)",
    )


def add_output_flags(parser: argparse.ArgumentParser, *, json_help: str) -> None:
    """The flags every command takes; `json_help` says what its JSON result holds."""
    group = parser.add_argument_group("output")
    group.add_argument("--json", action="store_true", help=json_help)
    group.add_argument(
        "-q", "--quiet", action="store_true", help="no progress or warnings on stderr; errors still show"
    )
    group.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show progress on stderr even when it is not a terminal (e.g. redirected to a log)",
    )
    group.add_argument("--debug", action="store_true", help="debug logging, and a full traceback on errors")


def load_export(output_dir: str) -> dict:
    """The manifest of a finished export; a missing or unreadable one is the user's input error."""
    if not os.path.isdir(output_dir):
        raise UsageError(f"{output_dir} is not a directory; pass the output directory of `shardex export`.")
    try:
        return load_manifest(output_dir)
    except ShardexError as e:
        raise UsageError(str(e)) from None
    except (OSError, ValueError) as e:
        raise UsageError(
            f"the {MANIFEST_FILE} in {output_dir} is unreadable ({e}); export the model again with --overwrite."
        ) from None


def finish_with_manifest(
    args: argparse.Namespace, output_dir: str, *, heading: str, failure: VerificationError | None = None
) -> int:
    """Write the report, then print the result (JSON or the summary). A failed verification
    still gets both, then one error line and exit code 1."""
    manifest = load_manifest(output_dir)
    write_report(output_dir)
    if args.json:
        print_json(summarize(manifest, output_dir) | ({"error": str(failure)} if failure else {}))
    else:
        print(format_summary(manifest, output_dir, heading=heading))
    if failure is None:
        return EXIT_OK
    print_error(str(failure))
    return EXIT_VERIFICATION_FAILED


def print_json(data: dict) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def print_error(message: str) -> None:
    print(f"shardex: error: {message}", file=sys.stderr)
