"""`vidistill <subcommand>`: one command, thin subcommands (tools never hold training logic).

Each subcommand is a typed function; jsonargparse turns its signature and docstring into the
command line and `--help`. Modules are imported only when their subcommand runs, so
`vidistill --help` stays fast.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import sys

# subcommand -> "module:function"
COMMANDS = {
    "import-weights": "tools.import_weights:import_weights",
    "bench": "tools.bench:bench",
    "make-shards": "tools.make_shards:make_shards",
    "encode-text": "tools.encode_text:encode_text",
    "consolidate": "tools.consolidate:consolidate",
    "combine": "tools.combine:combine",
    "make-kd-data": "tools.make_kd_data:make_kd_data",
    "infer": "tools.infer:infer",
    "evaluate": "tools.evaluate:evaluate",
    "make-specs": "tools.make_specs:make_specs",
    "quickstart": "tools.quickstart:quickstart",
}

# every subcommand but fit / validate takes dashed flags (--from-scratch, --num-steps) and bare
# switches (--from-scratch for --from_scratch true), as the docs spell them; infer takes
# Cosmos's short flags too (-i / -o)
SHORT = {"infer": {"-i": "--input", "-o": "--output_dir"}}


# subcommands whose first argument takes several values: `evaluate A B C` -> runs [A, B, C]
VARIADIC = {"evaluate"}


def _gather(argv: list[str]) -> list[str]:
    """Bare words (not flag values) after a VARIADIC subcommand become one JSON list."""
    if not argv or argv[0] not in VARIADIC:
        return argv
    import json

    words, rest, i = [], [argv[0]], 1
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-"):
            rest.append(arg)
            if "=" not in arg and i + 1 < len(argv):
                rest.append(argv[i + 1])
                i += 1
        else:
            words.append(arg)
        i += 1
    if len(words) == 1 and words[0].startswith("["):
        return argv
    return rest + ([json.dumps(words)] if words else [])


def _cosmos_flags(argv: list[str]) -> list[str]:
    """Rewrite dashed flags, bare switches and SHORT's flags into jsonargparse's spellings."""
    if not argv or argv[0] not in COMMANDS:
        return argv
    import inspect

    params = inspect.signature(_load(COMMANDS[argv[0]])).parameters
    switches = {f"--{n}" for n, p in params.items() if p.annotation in (bool, "bool")}
    out = [argv[0]]
    for i, arg in enumerate(argv[1:], start=1):
        flag, eq, value = arg.partition("=")
        if flag in SHORT.get(argv[0], {}):
            flag = SHORT[argv[0]][flag]
        elif flag.startswith("--"):
            flag = "--" + flag[2:].replace("-", "_")
        out.append(flag + eq + value)
        following = argv[i + 1] if i + 1 < len(argv) else None
        if (
            flag in switches
            and not eq
            and (following is None or following.startswith("-") or following.lower() not in ("true", "false"))
        ):
            out.append("true")
    return out


# LightningCLI subcommands, passed through whole
TRAINING = ("fit", "validate")

# what a user's own input can raise: reported in one line (VIDISTILL_DEBUG=1 shows the traceback)
USER_ERRORS = (FileNotFoundError, FileExistsError, ValueError, KeyError)
# what the machine refuses a write for (errno): said in one line, with the file, as the others
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def fit() -> None:
    """Train a stage: vidistill fit --config RECIPE.yaml [--ckpt_path last] (fit --help: all options).

    Listed for `vidistill --help` only: fit runs in trainers/cli.py (LightningCLI)."""


def validate() -> None:
    """Validate a stage: vidistill validate --config RECIPE.yaml --ckpt_path CKPT.

    Listed for `vidistill --help` only: validate runs in trainers/cli.py (LightningCLI)."""


def _load(target: str):
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def _rank() -> int:
    """This process's global rank in a torchrun, SLURM or Lightning-launched job (0 alone)."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return int(os.environ.get("NODE_RANK", 0) or 0) + int(os.environ.get("LOCAL_RANK", 0) or 0)


def _fail(command: str, err: Exception) -> None:
    """Exit with status 1 and the error in one line, printed once (by rank 0) however many
    processes run the command."""
    message = err.args[0] if isinstance(err, KeyError) and err.args else err
    sys.exit(f"{f'vidistill {command}'.strip()}: error: {message}" if _rank() == 0 else 1)


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import CLI

    from_shell = argv is None
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in (*COMMANDS, *TRAINING) else ""
    try:
        if command in TRAINING:
            # training subcommands are LightningCLI's own (recipes are its YAML)
            from trainers.cli import main as lightning_main

            lightning_main(None if from_shell else argv)
        else:
            argv = _gather(_cosmos_flags(argv))
            # load only the chosen subcommand; the others stay unimported (help lists them all)
            chosen = {command: _load(COMMANDS[command])} if command else {"fit": fit, "validate": validate}
            chosen.update({} if command else {name: _load(target) for name, target in COMMANDS.items()})
            CLI(chosen, args=argv, prog="vidistill")
    except USER_ERRORS as err:
        if os.environ.get("VIDISTILL_DEBUG"):
            raise
        _fail(command, err)
    except OSError as err:
        if err.errno not in DISK_ERRORS or os.environ.get("VIDISTILL_DEBUG"):
            raise
        _fail(command, ValueError(f"{err.strerror}: {err.filename}" if err.filename else err.strerror))
    _leave_process_group(exit_now=from_shell)


def _leave_process_group(exit_now: bool) -> None:
    """After a command that succeeded on every rank: destroy the process group, and (`exit_now`,
    a process started from a shell) exit at once with status 0. Left to interpreter exit, c10d and
    gloo teardown aborts a rank now and then (SIGABRT, "terminate called without an active
    exception"; seen about once in ten two-node runs here even with the group destroyed), which
    torchrun reports as a failed node while the other nodes wait 300 s in its exit barrier.
    Everything a run writes is closed by then (checkpoints, export, Lightning's loggers); output
    streams and logging are flushed first. Not after an error: a rank still inside a collective
    would never let the others' destroy return."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.destroy_process_group()
    if exit_now:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
