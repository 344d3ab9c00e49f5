"""In-memory latent batches for training tests: a known global order, split across ranks and
accumulation micro-batches exactly as the stages' per-sample random streams assume."""

import torch
from torch.utils.data import DataLoader, Dataset

LATENT = (48, 3, 4, 4)  # pixel tokenizer (spatial 4) latents of a 3-frame 16x16 clip


def sample(i: int) -> dict:
    g = torch.Generator().manual_seed(1000 + i)
    return {
        "latent": torch.randn(*LATENT, generator=g),
        "control_latent": torch.randn(*LATENT, generator=g),
        "text_emb": torch.randn(6, 32, generator=g),
        "text_mask": torch.ones(6, dtype=torch.bool),
        "fps": torch.tensor(24.0),
    }


class RankSlice(Dataset):
    """Rank r's share of consecutive global batches: global batch s holds samples
    [s*G, (s+1)*G); rank r takes [s*G + r*b, s*G + (r+1)*b) with b = G / world."""

    def __init__(self, steps: int, global_batch: int, rank: int = 0, world: int = 1):
        b = global_batch // world
        self.ids = [s * global_batch + rank * b + i for s in range(steps) for i in range(b)]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, j):
        return sample(self.ids[j])


def loader(steps: int, global_batch: int, rank: int = 0, world: int = 1, micro: int = 1) -> DataLoader:
    """`steps` optimizer steps of `global_batch` samples, each split into `micro` accumulation batches."""
    ds = RankSlice(steps, global_batch, rank, world)
    return DataLoader(ds, batch_size=global_batch // world // micro, shuffle=False)
