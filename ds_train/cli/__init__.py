"""`ds-train` / `python -m ds_train`: one console entry, one module per command.

Each command module exposes `register(subparsers)`; user errors (bad config, bad data) end as
one line on stderr and exit status 2, without a traceback. `console_main` is what the two
entries run: `main` plus an exit that cannot abort after the work is done.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

COMMANDS = [
    "pretrain",
    "finetune",
    "shard",
    "data",
    "convert",
    "tokenizer",
    "config",
    "demo",
    "plan",
    "report",
    "slurm",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ds-train", description="Distributed training of HF transformers on DeepSpeed."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"ds_train.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"ds_train.cli.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def _strip_local_rank(argv: list[str]) -> list[str]:
    """The `deepspeed` launcher appends --local_rank=N to every command; the env says the same."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            continue
        if arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
            continue
        out.append(arg)
    return out


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """`parser.parse_args`, but `key=value` overrides may also follow the flags
    (`pretrain RUN.yaml --check train.lr=1e-4`). argparse ends a `nargs="*"` positional at the
    first flag and calls what follows unrecognized, and its parse_intermixed_args does not work
    with subparsers: leftover tokens that are not flags join the command's `overrides` in order."""
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list):
        args.overrides.extend(t for t in extra if not t.startswith("-"))
        extra = [t for t in extra if t.startswith("-")]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    from ds_train.config.loader import ConfigError
    from ds_train.data.shard_set import DataError
    from ds_train.errors import RunFailure, error_line, report_failure

    argv = _strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    args = parse_args(build_parser(), argv)
    command = getattr(args, "command", None)
    held = {}
    if command in ("pretrain", "finetune"):
        # before torch and DeepSpeed are imported (seconds): a preemption signal is held from here
        # on (the run's handler takes it over); the handlers found are back when main returns
        from ds_train.train.callbacks.preemption import PreemptionHandler

        held = {sig: signal.getsignal(sig) for sig in PreemptionHandler.SIGNALS}
        PreemptionHandler().install()
    if command in ("pretrain", "finetune", "convert", "plan"):
        from ds_train.distributed.engine import quiet_deepspeed

        quiet_deepspeed()
    try:
        return int(args.func(args) or 0)
    except (ConfigError, DataError) as e:
        from ds_train.distributed.requeue import record_user_error

        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        error_line(f"{prefix}{e}")
        record_user_error(f"{prefix}{e}")  # under Slurm: so the job is not requeued for it
        return 2
    except RunFailure as e:  # a fault met while training, explained in its message
        report_failure(e)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)


def console_main() -> None:
    """Run `main` and end the process with its status (distributed/process_exit.py says how).
    The statuses the interpreter would give are kept: an unexpected error prints its traceback and
    exits 1, a `SystemExit` from anywhere exits with its code, Ctrl-C with 130."""
    import traceback

    from ds_train.distributed.process_exit import exit_process

    try:
        code = main()
        sys.stdout.flush()  # a reader gone (`| head`) shows up here, where it is handled
    except BrokenPipeError:
        code = _stdout_reader_gone()
    except SystemExit as e:  # argparse's usage errors and --help, or a library's sys.exit
        code = _system_exit_status(e.code)
    except KeyboardInterrupt:
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    exit_process(code)


def _stdout_reader_gone() -> int:
    """The reader of stdout left (`ds-train config | head -3`): nothing is wrong with the work, so
    no traceback. As Python's docs advise ("Note on SIGPIPE"), stdout is pointed at /dev/null so
    the flush at exit cannot fail again; the status is the shell's for a process killed by SIGPIPE
    (128 + 13), what `cat` or `yes` give in the same pipeline."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


def _system_exit_status(code: object) -> int:
    """`sys.exit(code)`'s status as the interpreter computes it: None is 0, an int itself,
    anything else is printed to stderr and gives 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1
