"""Run a tiny ControlTraining fit in this process (under torchrun for several ranks) and write
per-step global losses and a fingerprint of the full parameters to a JSON file."""

import argparse
import hashlib
import json

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from modules.parallel import ShardingConfig
from modules.stages.base import NetSpec, OptimSpec, StageOptions, TextSpec
from modules.stages.control_training import ControlTraining
from tests.helpers.latents import loader


class Record(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        loss = outputs["loss"].detach().clone()
        if dist.is_initialized():
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        self.losses.append(loss.item())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--global_batch", type=int, default=4)
    p.add_argument("--micro", type=int, default=1)
    p.add_argument("--epoch_steps", type=int, default=None, help="batches per epoch (default: steps)")
    p.add_argument("--ckpt_dir", default=None)
    p.add_argument("--resume", default=None)
    p.add_argument("--checkpointing", default="none")
    p.add_argument("--accelerator", default="cpu", help="cpu (gloo) or gpu (nccl)")
    p.add_argument("--clip", type=float, default=None, help="gradient_clip_val (global norm)")
    p.add_argument("--cp", type=int, default=1, help="context_parallel_size (FSDP2Strategy)")
    p.add_argument(
        "--cp_check",
        default=None,
        help="first compare the split network with the whole one (tests.helpers.cp_worker) into this file",
    )
    a = p.parse_args()

    world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    rank = int(__import__("os").environ.get("RANK", "0"))
    if a.cp_check:  # in the process group the Trainer then reuses (one launch for both tests)
        from tests.helpers.cp_worker import check

        dist.init_process_group("gloo")
        check(a.cp_check)
    module = ControlTraining(
        net=NetSpec("tiny"),
        modality="edge",
        optim=OptimSpec(lr=1e-3, warmup_steps=1),
        options=StageOptions(
            text=TextSpec(encoder="none"),
            sharding=ShardingConfig(param_dtype="none", reduce_dtype="float32", checkpointing=a.checkpointing),
        ),
    )
    rec = Record()
    callbacks = [rec]
    if a.ckpt_dir:
        callbacks.append(ModelCheckpoint(dirpath=a.ckpt_dir, every_n_train_steps=a.epoch_steps, save_top_k=-1))
    if a.cp > 1:
        from trainers.strategy import FSDP2Strategy

        strategy = FSDP2Strategy(context_parallel_size=a.cp)
    else:
        strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    trainer = L.Trainer(
        accelerator=a.accelerator,
        devices=world,
        num_nodes=1,
        max_steps=a.steps,
        strategy=strategy,
        accumulate_grad_batches=a.micro,
        gradient_clip_val=a.clip,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=bool(a.ckpt_dir),
        enable_progress_bar=False,
        callbacks=callbacks,
        enable_model_summary=False,
    )
    epoch_steps = a.epoch_steps or a.steps
    # the ranks of one context-parallel group (consecutive ranks) read the same batches
    data = loader(epoch_steps, a.global_batch, rank // a.cp, world // a.cp, a.micro)
    trainer.fit(module, data, ckpt_path=a.resume)
    # every rank gathers the full tensors (cpu_offload would leave them on rank 0 only)
    state = get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True))
    digest = hashlib.sha256(b"".join(state[k].cpu().numpy().tobytes() for k in sorted(state))).hexdigest()
    if rank == 0:
        torch.save({k: v.cpu() for k, v in state.items()}, a.out + ".params.pt")
    with open(f"{a.out}.rank{rank}.json", "w") as f:
        json.dump({"losses": rec.losses, "digest": digest, "global_step": trainer.global_step}, f)


if __name__ == "__main__":
    main()
