"""Every recipe parses, and its --print_config output parses back to the same config."""

from pathlib import Path

import pytest
import yaml

from modules.stages.base import OPTIONS
from tools.cli import main
from trainers.cli import upgrade_argv

RECIPES = sorted(str(p) for p in (Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml"))


# recipes of a tool rather than of a training stage: the subcommand that reads them
TOOLS = {"kd_data.yaml": "make-kd-data"}
# overlays, which go on the command line after the recipe named here
QUICKSTART = Path(__file__).resolve().parents[1] / "recipes/quickstart"
OVERLAYS = {
    "fit-latent.yaml": str(Path(__file__).resolve().parents[1] / "recipes/transfer2.5-2b/edge/control.yaml"),
    "kd_sparse.yaml": str(QUICKSTART / "kd.yaml"),
    "dmd2_sparse.yaml": str(QUICKSTART / "dmd2.yaml"),
}


def printed(capsys, config: str, overlay: bool = True) -> str:
    command = TOOLS.get(Path(config).name, "fit")
    base = OVERLAYS.get(Path(config).name) if overlay else None
    with pytest.raises(SystemExit) as end:
        main([command, *(["--config", base] if base else []), "--config", config, "--print_config"])
    assert end.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(Path(p).relative_to(Path(p).parents[2])))
def test_print_config_round_trips(recipe, tmp_path, capsys):
    first = printed(capsys, recipe)
    assert "class_path: modules." in first or Path(recipe).name in TOOLS
    again = tmp_path / Path(recipe).name
    again.write_text(first)
    assert printed(capsys, str(again), overlay=False) == first


def test_recipes_found():
    assert len(RECIPES) >= 8


OLD_EDGE = """
model:
  class_path: modules.control.ControlTraining     # the stage's module path before modules/stages/
  init_args:
    modality: edge
    trainable: base                                # ControlTraining's old word for all
    tokenizer: {kind: pixel, options: {spatial: 2}}   # StageOptions fields, flat as they were
    seed: 5
    export_to: runs/x/export
    optim: {lr: 0.001}
"""


def test_old_recipe_spellings_still_work(tmp_path, capsys):
    """Recipes and saved configs from before the stages moved and their shared arguments were
    grouped under `options` load as they are; the old flags too (--model.init_args.seed)."""
    old = tmp_path / "old.yaml"
    old.write_text(OLD_EDGE)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(old), "--model.init_args.sampler.steps", "7", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)["model"]
    assert printed["class_path"].endswith("ControlTraining")
    opts = printed["init_args"]["options"]
    assert opts["seed"] == 5 and opts["export_to"] == "runs/x/export" and opts["tokenizer"]["options"] == {"spatial": 2}
    assert opts["sampler"]["steps"] == 7 and printed["init_args"]["optim"]["lr"] == 0.001
    assert not set(OPTIONS) & set(printed["init_args"])
    from modules.stages import ControlTraining

    assert ControlTraining(trainable="base", modality="edge").modality is None  # base: a plain base


def test_upgrade_argv_leaves_current_spellings_alone(tmp_path):
    new = [
        "fit",
        "--config",
        "recipes/quickstart/edge.yaml",
        "--model.init_args.options.seed",
        "3",
        "--trainer.max_steps=2",
    ]
    assert upgrade_argv(new) == new
    assert upgrade_argv(["fit", "--model.seed=3", "--model.init_args.net.preset", "tiny"]) == [
        "fit",
        "--model.options.seed=3",
        "--model.init_args.net.preset",
        "tiny",
    ]


def test_null_reaches_a_nested_option_as_none(capsys):
    # jsonargparse alone turns this null into the string "None" (a folder named None)
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                "recipes/quickstart/blur.yaml",
                "--model.init_args.options.export_to",
                "null",
                "--model.options.text.max_length=null",
                "--print_config",
            ]
        )
    options = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["options"]
    assert options["export_to"] is None and options["text"]["max_length"] is None
    assert options["text"]["encoder"] == "tiny" and options["tokenizer"]["kind"] == "pixel"  # the rest kept
    assert upgrade_argv(["fit", "--data.init_args.val_shards", "null"]) == [
        "fit",
        "--data.init_args.val_shards",
        "null",
    ]
