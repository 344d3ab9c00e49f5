"""`vidistill fit` / `vidistill validate`: LightningCLI over the stages and the datamodule.

Recipes (recipes/**/*.yaml) are LightningCLI configs: `model:` names a stage class
(modules.stages.ControlTraining, ...) with its init arguments, `data:` the datamodule.

Bad input is refused before anything is written (no TensorBoard version, no checkpoint): a
misspelt key with the closest valid one, an accelerator this machine does not have, data that is
not there. tools/cli.py prints what is raised here in one line.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from modules.stages.base import OPTIONS, Stage
from trainers.callbacks import AtomicCheckpoint, Preemption, StepProgress


class VidistillParser(LightningArgumentParser):
    """LightningCLI's parser whose errors name the closest valid key of a misspelt one (jsonargparse
    names the wrong key only) and leave out the usage listing every option (`--help` has it)."""

    def error(self, message: str, ex: Exception | None = None):
        message = one_line(suggest_keys(self, message, getattr(ex, "subcommand_parser", None)))
        target = getattr(ex, "subcommand_parser", None) or self
        target.print_usage = lambda file=None: None  # the parser is about to exit
        return super().error(message, ex)


def suggest_keys(parser, message: str, subparser=None) -> str:
    """`message` with "(did you mean 'KEY'?)" after each unknown key it names that is close to a
    valid one: a key of the subcommand, or of the class whose `class_path` the message names."""
    lines = message.splitlines()
    keys = _parser_keys(subparser or parser)
    for i, line in enumerate(lines):
        if "(did you mean" in line:  # already suggested (a subcommand's error reaches the main parser)
            continue
        owner = re.search(r"class_path '([\w.]+)'", "\n".join(lines[max(0, i - 1) : i + 1]))
        group = re.search(r"Group '([\w.]+)' does not accept", line)
        valid = _class_keys(owner.group(1)) if owner else keys
        inside = group.group(1) + "." if group else ""
        hints = [hint for wrong in _unknown_keys(line) if (hint := closest_key(inside + wrong, valid))]
        if hints:
            lines[i] += " (did you mean " + " or ".join(f"'{h}'" for h in hints) + "?)"
    return "\n".join(lines)


def one_line(message: str) -> str:
    """A misspelt key of a class (model, data, a callback) in one line: its group, the class and
    the suggestion, without jsonargparse's dump of the union's subtypes and the given value."""
    lines = message.splitlines()
    hints = [line.strip() for line in lines if "(did you mean" in line]
    if len(lines) < 2 or not hints:
        return message
    group = re.search(r'Parser key "([\w.]+)"', message)
    owner = re.search(r"class_path '([\w.]+)'", message)
    where = ": ".join(m.group(1) for m in (group, owner) if m)
    return (f"{where}: " if where else "") + "; ".join(hints)


def _unknown_keys(line: str) -> list[str]:
    """The keys an error line of jsonargparse or argparse names as not accepted."""
    m = re.search(r"(?:does not accept option|Option|Key) '([\w.\-]+)'", line)
    if m:
        return [m.group(1)]
    m = re.search(r"unrecognized arguments: (.*)", line)
    return [a[2:].split("=")[0] for a in m.group(1).split() if a.startswith("--")] if m else []


def closest_key(wrong: str, keys: set[str]) -> str | None:
    """The valid dotted key closest to `wrong`: its first unknown component replaced by the most
    similar sibling (trainer.max_step -> trainer.max_steps; modle.init_args.x -> model)."""
    parts = wrong.split(".")
    for depth, part in enumerate(parts):
        prefix = parts[:depth]
        siblings = {k.split(".")[depth] for k in keys if k.split(".")[:depth] == prefix and len(k.split(".")) > depth}
        if part not in siblings:
            match = difflib.get_close_matches(part, siblings, n=1, cutoff=0.6)
            return ".".join(prefix + match) if match else None
    return None


def _parser_keys(parser) -> set[str]:
    keys = {a.dest for a in parser._actions if isinstance(a.dest, str)}
    sub = getattr(parser, "_subcommands_action", None)
    for p in sub._name_parser_map.values() if sub else ():
        keys |= _parser_keys(p)
    return keys


def _class_keys(class_path: str) -> set[str]:
    """The init argument keys (nested ones dotted) of the class at `class_path`."""
    import importlib

    from jsonargparse import ArgumentParser

    module, _, name = class_path.rpartition(".")
    try:
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(getattr(importlib.import_module(module), name))
    except Exception:  # noqa: BLE001 - no suggestion then
        return set()
    return _parser_keys(parser)


class VidistillCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("parser_class", VidistillParser)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        # plain FSDP2 over all processes unless a recipe says otherwise
        parser.set_defaults({"trainer.strategy": {"class_path": "trainers.strategy.FSDP2Strategy"}})

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        check_accelerator(config.trainer.accelerator)
        no_hp_metric(config.trainer.logger)

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = self._get(self.config_init, "trainer", default={})
        if trainer.get("logger") in (None, True) and "logger" not in kwargs:  # Lightning's default logger
            kwargs["logger"] = default_logger(trainer.get("default_root_dir"))
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        check_data(self.datamodule, ("train_shards", "val_shards"))
        if hasattr(self.datamodule, "check_train_data"):  # only broken samples: stop before any write
            self.datamodule.check_train_data(self.trainer.global_rank, self.trainer.world_size)
        check_clip(self.model, self.datamodule)
        check_ckpt_path(self.config_init[self.subcommand].get("ckpt_path"))
        make_interruptible(self.trainer)
        use_step_progress(self.trainer, self.config[self.subcommand].trainer.callbacks)
        if self.config_init[self.subcommand].get("ckpt_path") == "last" and not find_last(self.trainer):
            self.config_init[self.subcommand]["ckpt_path"] = None

    def before_validate(self) -> None:
        check_data(self.datamodule, ("val_shards",))
        check_clip(self.model, self.datamodule)
        check_ckpt_path(self.config_init[self.subcommand].get("ckpt_path"))


def check_clip(model, datamodule) -> None:
    """The data's clip size fits the stage's tokenizer and patch, before the Trainer writes
    anything (a misfit is otherwise found in the first forward, after setup)."""
    size = [getattr(datamodule, "hparams", {}).get(k) for k in ("num_frames", "height", "width")]
    if None not in size and hasattr(model, "check_clip") and not datamodule.hparams.get("use_latents"):
        model.check_clip(*size)


def check_ckpt_path(ckpt_path) -> None:
    """A checkpoint named by path reads back whole, checked before the Trainer writes anything
    (a truncated shard otherwise ends a run in an EOFError deep inside the load)."""
    from modules.checkpoint import check_checkpoint

    if ckpt_path not in (None, "last", "best", "hpc", "registry"):
        check_checkpoint(ckpt_path)


def check_accelerator(accelerator) -> None:
    """A GPU recipe on a machine without one is refused in one line (Lightning's own message is
    "No supported gpu backend found!" after a traceback)."""
    import torch

    name = accelerator if isinstance(accelerator, str) else None
    if name in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"--trainer.accelerator {name}: this machine has no CUDA GPU (torch.cuda.is_available() is "
            "False); run with --trainer.accelerator cpu"
        )


def no_hp_metric(logger) -> None:
    """TensorBoard loggers without their placeholder hp_metric (a constant -1 in the HPARAMS tab;
    the stages log no single number that ranks runs): Lightning's default_hp_metric=False."""
    for item in logger if isinstance(logger, list) else [logger]:
        class_path = getattr(item, "class_path", None) or ""
        if class_path.endswith("TensorBoardLogger") and getattr(item, "init_args", None) is not None:
            item.init_args.default_hp_metric = False


def default_logger(root: str | None):
    """The logger Lightning makes for a recipe without `logger:` (TensorBoard in the default root
    directory, the SLURM job id as version), without the placeholder hp_metric."""
    import os

    from lightning.fabric.plugins.environments import SLURMEnvironment
    from lightning.pytorch.loggers import TensorBoardLogger

    save_dir = os.path.normpath(os.path.expanduser(root or os.getcwd()))
    try:
        return TensorBoardLogger(save_dir=save_dir, version=SLURMEnvironment.job_id(), default_hp_metric=False)
    except ModuleNotFoundError:  # no tensorboard: Lightning's own choice (CSV)
        return True


def check_data(datamodule, attrs: tuple[str, ...]) -> None:
    """The datamodule's shard lists exist and hold shards, before the Trainer writes anything (its
    TensorBoard version directory is made before the datamodule's own setup runs)."""
    from datamodules.shards import expand_shards

    for attr in attrs:
        spec = getattr(datamodule, attr, None)
        if spec is None:
            continue
        try:
            expand_shards(spec)
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"data.{attr}: {err}") from None


def find_last(trainer: Trainer) -> bool:
    """Whether `--ckpt_path last` finds a checkpoint; if not, says so plainly (Lightning's warning
    suggests save_last=True, which the recipes set) and the run starts from step 0."""
    from lightning.pytorch.callbacks import OnExceptionCheckpoint

    dirs = []
    found = any(Path(cb.ckpt_path).exists() for cb in trainer.callbacks if isinstance(cb, OnExceptionCheckpoint))
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint):
            found = found or bool(cb._find_last_checkpoints(trainer))
            dirs.append(str(cb.dirpath or "the default checkpoint directory"))
    if not found and trainer.is_global_zero:
        where = ", ".join(dirs) or "(no checkpoint callback)"
        print(f"--ckpt_path last: no checkpoint found in {where}; training starts fresh from step 0", flush=True)
    return found


def use_step_progress(trainer: Trainer, configured) -> None:
    """Lightning's default progress bar -> StepProgress (steps against max_steps; a line every few
    steps where the output is no terminal). A progress bar the recipe lists stays."""
    configured = configured if isinstance(configured, list) else [configured] if configured else []
    listed = [c for c in configured if "ProgressBar" in str(getattr(c, "class_path", c))]
    for i, cb in enumerate(trainer.callbacks):
        if type(cb) in (TQDMProgressBar, RichProgressBar) and not listed:
            trainer.callbacks[i] = StepProgress()


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
        flag, eq, value = arg.partition("=")
        if (value if eq else argv[i + 1] if i + 1 < len(argv) else None) == "null":
            nested = null_as_object(flag)
            if nested is not None:
                out += nested
                i += 1 if eq else 2
                continue
        out.append(arg)
        i += 1
    return out


def null_as_object(flag: str) -> list[str] | None:
    """`--model.init_args.options.export_to null` as `--model.init_args.options '{"export_to":
    null}'`. jsonargparse turns a null given to a field of a dataclass inside a class's init
    arguments into the string "None" (or refuses it for an int); given as an object, the null
    stays None and merges into the rest of the argument. None: not such a flag."""
    for root in ("--model.", "--data."):
        if flag.startswith(root):
            path = flag[len(root) :].removeprefix("init_args.").split(".")
            if len(path) < 2:
                return None
            value = None
            for key in reversed(path[1:]):
                value = {key: value}
            return [f"{root}init_args.{path[0]}", json.dumps(value)]
    return None


def main(argv: list[str] | None = None) -> None:
    """argv None reads sys.argv (the console script); a list runs in-process (tests, quickstart)."""
    import sys
    import warnings

    # args given explicitly (the upgraded sys.argv) is what a shell run means here too
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter", category=UserWarning)
    argv = upgrade_argv(sys.argv[1:] if argv is None else list(argv))
    try:
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
    except MisconfigurationException as err:  # Lightning's word for a setting that cannot work here
        raise ValueError(str(err)) from err
