"""The `shardex` command line: export, verify, inspect, zoo.

Each subcommand lives in `shardex._commands` (parser + run function); this module wires them,
shows the library's progress log on stderr, and turns every failure into one line and an exit
code.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import time
import traceback
from collections.abc import Iterator

import shardex
from shardex._commands import (
    EXIT_BAD_INPUT,
    EXIT_CODES_HELP,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_VERIFICATION_FAILED,
    Parser,
    UsageError,
    export,
    inspect,
    print_error,
    print_json,
    verify,
    zoo,
)

BAD_INPUT_ERRORS = (UsageError, shardex.OptionsError, shardex.SourceError, shardex.PlanError)


def build_parser() -> Parser:
    parser = Parser(
        prog="shardex",
        description="Export PyTorch models too large for ordinary tools to one sharded, verified ONNX\n"
        "program, in parallel on Ray. Run `shardex COMMAND --help` for a command's flags.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"shardex {shardex.__version__}")
    commands = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")
    for command in (export, verify, inspect, zoo):
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command and return its exit code (listed in EXIT_CODES_HELP)."""
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print_error(str(e))
        return EXIT_BAD_INPUT
    with _progress_log(args), _sigterm_interrupts():
        try:
            return args.run(args)
        except KeyboardInterrupt:
            return _fail(args, EXIT_INTERRUPTED, "interrupted")
        except SystemExit as e:
            if e.code != signal.SIGTERM:
                raise
            # ray.init replaces our SIGTERM handler with its own, which calls sys.exit(SIGTERM)
            return _fail(args, EXIT_INTERRUPTED, "interrupted")
        except shardex.VerificationError as e:
            return _fail(args, EXIT_VERIFICATION_FAILED, str(e))
        except BAD_INPUT_ERRORS as e:
            return _fail(args, EXIT_BAD_INPUT, str(e))
        except shardex.ShardexError as e:
            return _fail(args, EXIT_INTERNAL, str(e))
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0]
            message = f"internal error: {type(e).__name__}: {first}"
            return _fail(
                args, EXIT_INTERNAL, message if args.debug else f"{message} (--debug shows the traceback)"
            )


def _fail(args: argparse.Namespace, code: int, message: str) -> int:
    if args.debug:
        traceback.print_exc()
    if args.json:
        print_json({"status": "error", "error": message, "exit_code": code})
    print_error(message)
    return code


class _ElapsedFormatter(logging.Formatter):
    """``[  12.3s] capture: ...``: seconds since the command started."""

    def __init__(self) -> None:
        super().__init__()
        self.start = time.time()

    def format(self, record: logging.LogRecord) -> str:
        return f"[{record.created - self.start:6.1f}s] {super().format(record)}"


@contextlib.contextmanager
def _progress_log(args: argparse.Namespace) -> Iterator[None]:
    """The library's progress on stderr when someone watches (a terminal, or --verbose);
    warnings only when redirected; errors only with --quiet."""
    if args.debug:
        level = logging.DEBUG
    elif args.quiet:
        level = logging.ERROR
    elif args.verbose or sys.stderr.isatty():
        level = logging.INFO
    else:
        level = logging.WARNING
    logger = logging.getLogger("shardex")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ElapsedFormatter())
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.level, logger.propagate = saved


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a scheduler, or a zoo stopping its exports) unwinds like Ctrl-C, so the Ray
    started for the command is stopped on the way out."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
