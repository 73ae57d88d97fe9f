"""A stand-in augmentation for the loader tests, in a module of its own: spawned loader workers unpickle it by
importing this module, which needs torch and numpy only (tests/test_pretrain.py itself imports timm, about 3 s
more per worker, per loader)."""
import numpy as np
import torch


def sum_and_noise(image: np.ndarray, linear: bool) -> list[torch.Tensor]:
    """The image's sum, and a draw from torch's generator (seeded per sample by the loader)."""
    return [torch.tensor(int(image.astype(np.int64).sum())), torch.rand(1)]
