"""`vidistill fit` / `vidistill validate`: LightningCLI over the stages and the datamodule.

Recipes (recipes/**/*.yaml) are LightningCLI configs: `model:` names a stage class
(modules.stages.ControlTraining, ...) with its init arguments, `data:` the datamodule.
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from modules.stages.base import Stage
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


def main(argv: list[str] | None = None) -> None:
    """argv None reads sys.argv (the console script); a list runs in-process (tests, quickstart)."""
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
