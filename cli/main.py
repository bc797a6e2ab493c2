# PYTHON_ARGCOMPLETE_OK
"""The ``snapferry`` command line: the parser made of every command's module, the
dispatch, and error reporting. No logic of its own.

One module per command (``cmd_init`` ... ``cmd_info``; the VM commands ``lab`` and
``demo`` and VM backups in ``vm``); they share ``common`` (parser, global options,
repository) and ``output`` (JSON, tables, progress). Only this module imports the
command modules, and none of them imports this one.

Errors: ``snapferry: <message>`` (one line) on stderr and the error's exit code (see
``common.EXIT_CODES``); under ``--json`` also an error document on stdout. Ctrl-C
exits 130; an unexpected exception exits 70 (``SNAPFERRY_DEBUG=1`` or ``-vv`` print its
traceback too).
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, NoReturn, cast

from snapferry.cli import (
    cmd_backup,
    cmd_files,
    cmd_forget,
    cmd_info,
    cmd_init,
    cmd_instant,
    cmd_key,
    cmd_list,
    cmd_prune,
    cmd_restore,
    cmd_serve,
    cmd_verify,
)
from snapferry.cli.common import (
    DEBUG_ENV,
    ENV_EPILOG,
    EXIT_BUG,
    EXIT_CODES,
    EXIT_EPILOG,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    PROG,
    REPO_ENV,
    S3_ENDPOINT_ENV,
    Parser,
    add_global_options,
    derive_key_ahead,
    merge_globals,
    parse_size,
)
from snapferry.cli.output import configure, emit_error_json, fail
from snapferry.engine.errors import SnapferryError, UsageError

__all__ = ["EXIT_CODES", "build_parser", "main", "parse_size"]

# snapferry does no linear algebra: keep OpenBLAS (loaded with numpy) from starting
# busy-spinning threads in the CLI and in every worker process it spawns.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

REPO_COMMANDS = ("backup", "restore", "list", "verify", "info")
KEY_AHEAD_COMMANDS = ("restore", "list", "verify", "info", "forget", "prune", "serve",
                      "files", "instant")
"""Commands that open an existing repository first (``backup`` starts it itself)."""
DESCRIPTION = "Live, changed-block, deduplicated backups of disks and running VMs."
EXAMPLES = f"""examples:
  snapferry init /backup/repo
  export {REPO_ENV}=/backup/repo
  snapferry backup vm1.qcow2
  snapferry backup 'qemu+unix:///run/vm1/qmp.sock?agent=/run/vm1/qga.sock'
  snapferry list
  snapferry restore latest:vm1 --to vm1-restored.qcow2
  snapferry help restore"""
MORE = """Global options go before or after the command. More: snapferry help COMMAND,
man snapferry, docs/JSON.md for --json output."""


def _version() -> str:
    from snapferry import __version__

    return __version__


class _VersionAction(argparse._VersionAction):
    """``--version``, the version looked up only when asked for (importlib.metadata
    costs ~40 ms at every start otherwise)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None
                 ) -> None:
        self.version = f"{PROG} {_version()}"
        super().__call__(parser, namespace, values, option_string)


def _vm_module() -> ModuleType | None:
    """``snapferry.cli.vm`` (VM sources, lab and demo commands) when in this build."""
    try:
        import snapferry.cli.vm as vm
    except ModuleNotFoundError as e:
        if e.name != "snapferry.cli.vm":
            raise
        return None
    return vm


LAB_EPILOG = """examples:
  snapferry lab up                 # build (once) and boot the lab VM
  snapferry lab status
  snapferry lab write /data/hello.txt --data hi
  snapferry backup lab --repo /tmp/repo
  snapferry lab down --purge"""
DEMO_EPILOG = """examples:
  snapferry demo
  snapferry demo --repo /tmp/demo-repo --keep-lab --json"""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        description=DESCRIPTION,
        epilog="\n\n".join([EXAMPLES, EXIT_EPILOG, ENV_EPILOG, MORE]),
    )
    parser.add_argument("--version", action=_VersionAction, version="",
                        help="print the version and exit")
    add_global_options(parser, top=True)
    sub = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser,
                              title="commands"),
    )
    vm = _vm_module()
    cmd_init.add_parser(sub)
    cmd_backup.add_parser(sub, getattr(vm, "backup_vm", None))
    cmd_restore.add_parser(sub)
    cmd_list.add_parser(sub)
    cmd_verify.add_parser(sub)
    cmd_info.add_parser(sub)
    cmd_forget.add_parser(sub)
    cmd_prune.add_parser(sub)
    cmd_key.add_parser(sub)
    for extra in (cmd_serve, cmd_instant, cmd_files):  # instant recovery
        run = extra.add_command(sub)
        sub.choices[extra.NAME].set_defaults(func=run)
    if vm is not None and hasattr(vm, "add_vm_commands"):
        vm.add_vm_commands(sub)  # lab, demo
        for name, text in (("lab", LAB_EPILOG), ("demo", DEMO_EPILOG)):
            p = sub.choices.get(name)
            if p is not None:
                p.epilog = p.epilog or text
                func = getattr(vm, f"cmd_{name}", None)
                if func is not None and p.get_default("func") is None:
                    p.set_defaults(func=func)
    h = sub.add_parser("help", help="show the help of snapferry or of one command",
                       description="Show the help of snapferry or of one command.",
                       epilog="examples:\n  snapferry help\n  snapferry help backup")
    h.add_argument("topic", nargs="?", metavar="COMMAND", default=None,
                   help="the command to explain (default: snapferry itself)")
    h.set_defaults(func=None)
    for p in sub.choices.values():
        add_global_options(p, top=False)
    return parser


def _help(parser: argparse.ArgumentParser, topic: str | None) -> int:
    if topic is None:
        parser.print_help()
        return 0
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    p = sub.choices.get(topic)
    if p is None:
        raise UsageError(
            f"no command {topic!r} (commands: {', '.join(sorted(sub.choices))})"
        )
    p.print_help()
    return 0


def _wants_json(argv: Sequence[str]) -> bool:
    return "--json" in argv


def _command_word(parser: argparse.ArgumentParser, argv: Sequence[str]) -> str | None:
    """The command named in ``argv`` (the first word that is one), before parsing."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return next((w for w in argv if w in sub.choices), None)


def _autocomplete(parser: argparse.ArgumentParser) -> None:
    """Shell completion (argcomplete) when the shell asks for it; free otherwise."""
    if "_ARGCOMPLETE" not in os.environ:
        return
    try:
        import argcomplete
    except ImportError:
        return
    argcomplete.autocomplete(parser)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (never raises, never prints a traceback
    unless ``SNAPFERRY_DEBUG=1`` or ``-vv``).

    Called without ``argv`` (the ``snapferry`` command, ``python -m snapferry``) it
    ends the process itself once the command is done (``_exit_now``): the
    interpreter's teardown of numpy, cffi and the other modules took ~90 ms of every
    command, a sixth of a small incremental backup."""
    if argv is None:
        _exit_now(_main(sys.argv[1:]))
    return _main(argv)


def _exit_now(code: int) -> NoReturn:
    """Exit with ``code`` without the interpreter's teardown: the ``atexit`` handlers
    run (temp files, worker processes, coverage), stdout and stderr are flushed, then
    ``os._exit``. Only when no other non-daemon thread runs (its join would be
    skipped); else a normal exit."""
    others = [t for t in threading.enumerate()
              if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if others:
        raise SystemExit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (| head): nothing more to say
            pass
    os._exit(code)


def _main(argv: Sequence[str]) -> int:
    argv = list(argv)
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    json_mode = _wants_json(argv)
    configure(command=None)
    try:
        parser = build_parser()
        configure(command=_command_word(parser, argv))  # for an error document
        _autocomplete(parser)
        if not argv:
            parser.print_help()
            return EXIT_USAGE
        args = merge_globals(parser.parse_args(argv))
        if getattr(args, "s3_endpoint", None):  # worker processes inherit the environment
            os.environ[S3_ENDPOINT_ENV] = args.s3_endpoint
        json_mode = bool(args.json)
        debug = debug or args.verbose >= 2
        repo = (args.repo or os.environ.get(REPO_ENV)) if args.command in REPO_COMMANDS else None
        configure(command=args.command, repository=repo, verbose=args.verbose,
                  quiet=args.quiet)
        if args.command == "help":
            return _help(parser, args.topic)
        func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
        if func is None:
            raise UsageError(f"command {args.command!r} is not available in this build")
        if args.command in KEY_AHEAD_COMMANDS:
            derive_key_ahead(args)  # scrypt in a thread while the command imports the store
        return int(func(args))
    except SnapferryError as e:
        if debug:
            traceback.print_exc()
        message = str(e) or type(e).__name__
        if json_mode:
            emit_error_json(message, e.exit_code, type(e).__name__)
        return fail(message, e.exit_code)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        if json_mode:
            emit_error_json("interrupted", EXIT_INTERRUPTED, "Interrupted")
        return fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:
        # stdout closed early (e.g. piped into head): nothing more to say
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        except OSError:
            pass
        return 1
    except SystemExit as e:  # --help / --version
        return e.code if isinstance(e.code, int) else 0
    except Exception as e:
        if debug:
            traceback.print_exc()
            tb = getattr(e, "worker_traceback", None)
            if tb:
                sys.stderr.write(tb)
        message = (f"internal error: {type(e).__name__}: {e} "
                   f"(run with {DEBUG_ENV}=1 for a traceback)")
        if json_mode:
            emit_error_json(message, EXIT_BUG, type(e).__name__)
        return fail(message, EXIT_BUG)


if __name__ == "__main__":
    raise SystemExit(main())
