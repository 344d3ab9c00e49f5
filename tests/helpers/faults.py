"""Test-only fault injection and loss recording for training runs (tests/test_reliability*.py).

`Faults` is a Lightning callback that a test puts in a recipe's `trainer.callbacks`; every fault
is off unless its environment variable is set, so one recipe serves the clean run, the faulty
run and the resumed run:

- VIDISTILL_KILL_AT_STEP=N: SIGKILL this process when step N is about to start (N steps done).
- VIDISTILL_KILL_IN_SAVE=N[:K]: SIGKILL this process inside the K-th (default 1st) checkpoint
  save made at step >= N, after its tensor files are written and before DCP's `.metadata` (a
  deterministic point). At a step with a periodic and a last checkpoint, K=2 is the last one.
- VIDISTILL_SIGUSR1_AT_STEP=N: send this process SIGUSR1 when step N is about to start (what
  SLURM's `--signal=SIGUSR1@120` does, at a step the test knows).
- VIDISTILL_NAN="RANK:STEP:KIND[,...]": at that step, on that rank only, a NaN loss (KIND loss:
  the loss handed to backward is multiplied by NaN) or an Inf gradient element (KIND grad: one
  element of this rank's local gradient shard, after backward).

Per training batch it appends one JSON line to `record` (`<record>.rank<r>`): the step after
the batch, its loss, whether the step was skipped, the skip count, and a digest of this rank's
local shards of the trained parameters.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal

import lightning as L
import torch
from torch.distributed.tensor import DTensor


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def digest(module: torch.nn.Module) -> str:
    """sha256 of this rank's local shards of the trainable parameters."""
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters()):
        if p.requires_grad:
            local = p.to_local() if isinstance(p, DTensor) else p
            # clone first: .numpy() marks a tensor's storage as not resizable, and on one process
            # FSDP2 hands out its gathered parameters, whose storage it frees by resizing
            h.update(name.encode() + local.detach().cpu().clone().numpy().tobytes())
    return h.hexdigest()


class Faults(L.Callback):
    def __init__(self, record: str | None = None):
        super().__init__()
        self.record = record
        env = os.environ.get
        self.kill_at = int(env("VIDISTILL_KILL_AT_STEP", -1))
        step, _, nth = env("VIDISTILL_KILL_IN_SAVE", "-1").partition(":")
        self.kill_in_save, self.kill_nth = int(step), int(nth or 1)
        self.sigusr1_at = int(env("VIDISTILL_SIGUSR1_AT_STEP", -1))
        self.nan = [tuple(x.split(":")) for x in env("VIDISTILL_NAN", "").split(",") if x]
        self._hooked: list = []

    # --- kills --------------------------------------------------------------------------------

    def setup(self, trainer, pl_module, stage) -> None:
        if self.kill_in_save >= 0:
            from torch.distributed.checkpoint import filesystem

            finish = filesystem._FileSystemWriter.finish

            def finish_or_die(writer, *args, **kwargs):
                if trainer.global_step >= self.kill_in_save:
                    self.kill_nth -= 1
                if trainer.global_step >= self.kill_in_save and self.kill_nth == 0:
                    print(
                        f"FAULT: SIGKILL inside the checkpoint save at step {trainer.global_step} "
                        f"(data files written, no .metadata) in {writer.path}",
                        flush=True,
                    )
                    _kill()
                return finish(writer, *args, **kwargs)

            filesystem._FileSystemWriter.finish = finish_or_die

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step, rank = trainer.global_step, trainer.global_rank
        if step == self.kill_at:
            print(f"FAULT: SIGKILL before step {step + 1}", flush=True)
            _kill()
        if step == self.sigusr1_at:
            print(f"FAULT: SIGUSR1 before step {step + 1}", flush=True)
            os.kill(os.getpid(), signal.SIGUSR1)
        for r, s, kind in self.nan:
            if int(r) == rank and int(s) == step and kind == "loss":
                self._poison_loss(trainer)

    def _poison_loss(self, trainer) -> None:
        """Multiply the next losses handed to backward (this batch) by NaN, on this rank."""
        strategy = trainer.strategy
        original = type(strategy).backward

        def backward(closure_loss, *args, **kwargs):
            return original(strategy, closure_loss * float("nan"), *args, **kwargs)

        strategy.backward = backward
        self._hooked.append(lambda: strategy.__dict__.pop("backward", None))

    def on_after_backward(self, trainer, pl_module) -> None:
        for r, s, kind in self.nan:
            if int(r) == trainer.global_rank and int(s) == trainer.global_step and kind == "grad":
                for p in pl_module.parameters():
                    g = p.grad
                    local = g.to_local() if isinstance(g, DTensor) else g
                    if local is not None and local.numel():
                        local.view(-1)[0] = float("inf")
                        return

    # --- recording ----------------------------------------------------------------------------

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for undo in self._hooked:
            undo()
        self._hooked.clear()
        if not self.record:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        row = {
            "step": trainer.global_step,
            "batch_idx": batch_idx,
            "loss": float(loss),
            "skipped": bool(getattr(pl_module, "_skipped_step", False)),
            "nonfinite_total": getattr(pl_module, "nonfinite_total", 0),
            "digest": digest(pl_module.trained_model()),
            "finite": all(
                bool(torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all())
                for p in pl_module.parameters()
            ),
        }
        metric = trainer.callback_metrics.get("train/nonfinite_skipped")
        row["metric_nonfinite"] = None if metric is None else float(metric)
        with open(f"{self.record}.rank{trainer.global_rank}", "a") as f:
            f.write(json.dumps(row) + "\n")


def read_record(path: str, rank: int = 0) -> list[dict]:
    """The rows a run (or several runs appending to one file) recorded."""
    with open(f"{path}.rank{rank}") as f:
        return [json.loads(line) for line in f if line.strip()]


def losses_by_step(rows: list[dict]) -> dict[int, float]:
    """step -> loss; a step recorded twice (a killed run's, then the resumed run's) keeps the last."""
    return {r["step"]: r["loss"] for r in rows}
