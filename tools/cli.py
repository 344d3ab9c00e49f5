"""`vidistill <subcommand>`: one command, thin subcommands (tools never hold training logic).

Each subcommand is a typed function; jsonargparse turns its signature and docstring into the
command line and `--help`. Modules are imported only when their subcommand runs, so
`vidistill --help` stays fast.
"""

from __future__ import annotations

import importlib
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
}


# LightningCLI subcommands, passed through whole
TRAINING = ("fit", "validate")


def _load(target: str):
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import CLI

    from_shell = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TRAINING:
        # training subcommands are LightningCLI's own (recipes are its YAML)
        from trainers.cli import main as lightning_main

        lightning_main(None if from_shell else argv)
        return
    # load only the chosen subcommand; the others stay unimported
    chosen = [argv[0]] if argv and argv[0] in COMMANDS else list(COMMANDS)
    try:
        CLI({name: _load(COMMANDS[name]) for name in chosen}, args=argv, prog="vidistill")
    except (FileNotFoundError, ValueError, KeyError) as err:
        # bad input is reported in one line; VIDISTILL_DEBUG=1 shows the traceback
        if os.environ.get("VIDISTILL_DEBUG"):
            raise
        sys.exit(f"vidistill {chosen[0] if len(chosen) == 1 else ''}: error: {err}")


if __name__ == "__main__":
    main()
