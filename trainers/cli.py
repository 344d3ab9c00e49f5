"""`vidistill fit` / `vidistill validate`: LightningCLI over the stages and the datamodule.

Recipes (recipes/**/*.yaml) are LightningCLI configs: `model:` names a stage class
(modules.stages.ControlTraining, ...) with its init arguments, `data:` the datamodule.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from modules.stages.base import OPTIONS, Stage
from trainers.callbacks import AtomicCheckpoint, Preemption


class VidistillCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # plain FSDP2 over all processes unless a recipe says otherwise
        parser.set_defaults({"trainer.strategy": {"class_path": "trainers.strategy.FSDP2Strategy"}})

    def before_fit(self) -> None:
        make_interruptible(self.trainer)


def make_interruptible(trainer: Trainer) -> None:
    """What `vidistill fit` adds to every recipe's trainer for runs that get killed:

    - each plain ModelCheckpoint (the recipes', or Lightning's default one) becomes an
      AtomicCheckpoint (same arguments and state; the class only changes how saves are written
      and how "last" is found), so a kill during a save never leaves a half-written "last";
    - a Preemption callback (SIGUSR1: checkpoint, `scontrol requeue`, exit), unless the recipe
      lists one itself (e.g. with another signal).
    """
    for cb in trainer.callbacks:
        if type(cb) is ModelCheckpoint:
            cb.__class__ = AtomicCheckpoint  # a subclass without state of its own: safe to switch
    if not any(isinstance(cb, Preemption) for cb in trainer.callbacks):
        trainer.callbacks.append(Preemption())


def upgrade_config(config: dict) -> bool:
    """Move StageOptions keys written flat under model.init_args (recipes and saved configs from
    before they were grouped) under `options`, in place. Returns whether anything moved."""
    init = (config.get("model") or {}).get("init_args") if isinstance(config, dict) else None
    flat = [k for k in OPTIONS if isinstance(init, dict) and k in init]
    if flat:
        init.setdefault("options", {}).update({k: init.pop(k) for k in flat})
    return bool(flat)


def upgrade_argv(argv: list[str]) -> list[str]:
    """Older spellings keep working: a --config file with the flat StageOptions keys is passed on
    upgraded (as YAML text), and --model[.init_args].<key>... flags gain `options.`."""
    import yaml

    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        flag, eq, value = arg.partition("=")
        if flag in ("-c", "--config") and (eq or i + 1 < len(argv)):
            path = value if eq else argv[i + 1]
            i += 1 if eq else 2
            config = yaml.safe_load(Path(path).read_text()) if Path(path).is_file() else None
            out += [flag, yaml.safe_dump(config, sort_keys=False) if upgrade_config(config) else path]
            continue
        for prefix in ("--model.init_args.", "--model."):
            key = flag[len(prefix) :].split(".")[0] if flag.startswith(prefix) else None
            if key in OPTIONS:
                arg = prefix + "options." + arg[len(prefix) :]
                break
        out.append(arg)
        i += 1
    return out


def main(argv: list[str] | None = None) -> None:
    """argv None reads sys.argv (the console script); a list runs in-process (tests, quickstart)."""
    import sys
    import warnings

    # args given explicitly (the upgraded sys.argv) is what a shell run means here too
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter", category=UserWarning)
    argv = upgrade_argv(sys.argv[1:] if argv is None else list(argv))
    VidistillCLI(
        model_class=Stage,
        subclass_mode_model=True,
        datamodule_class=LightningDataModule,
        subclass_mode_data=True,
        args=argv,
        parser_kwargs={"prog": "vidistill"},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
