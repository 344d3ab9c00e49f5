"""Every recipe parses, and its --print_config output parses back to the same config."""

from pathlib import Path

import pytest

from tools.cli import main

RECIPES = sorted(str(p) for p in (Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml"))


# recipes of a tool rather than of a training stage: the subcommand that reads them
TOOLS = {"kd_data.yaml": "make-kd-data"}
# overlays, which go on the command line after the recipe named here
OVERLAYS = {"fit-latent.yaml": str(Path(__file__).resolve().parents[1] / "recipes/transfer2.5-2b/edge/control.yaml")}


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
