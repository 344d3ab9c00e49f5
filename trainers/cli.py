"""`vidistill fit` / `vidistill validate`: LightningCLI over the stages and the datamodule.

Recipes (recipes/**/*.yaml) are LightningCLI configs: `model:` names a stage class
(modules.control.ControlTraining, ...) with its init arguments, `data:` the datamodule.
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from trainers.stage import Stage


class VidistillCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # plain FSDP2 over all processes unless a recipe says otherwise
        parser.set_defaults({"trainer.strategy": {"class_path": "trainers.strategy.FSDP2Strategy"}})


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
