"""What pretraining is watched by: the collapse alarm and the kNN monitor with its yardsticks.

- ``CollapseMonitor``: fires when the student-teacher KL or the teacher's batch entropy stays below its
  threshold for ``patience`` steps (both fall to zero in DINO's two collapse modes: one dimension
  dominating, or a uniform output).
- kNN monitor (k=20, T=0.07, cosine; DINO's): classifies held-out images by body region with a bank of
  training-split images, at step 0 (the random-init backbone) and after every ``knn_every`` epochs.
- ``knn_thumbnails``: the same kNN on 16 x 16 pixel thumbnails of the images, a yardstick that needs no
  backbone at all.
- ``knn_margin``: a 95 % interval on the last epoch's margin over random init, by resampling the
  held-out patients.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dax_models.metrics import knn_classify

__all__ = ["MARGIN_MIN_PATIENTS", "CollapseMonitor", "features", "hits_bits", "knn_hits", "knn_margin", "knn_monitor",
           "knn_thumbnails", "margin_text", "margin_verdict"]


class CollapseMonitor:
    """Counts consecutive steps with KL or teacher batch entropy below threshold."""

    def __init__(self, min_kl: float, min_entropy: float, patience: int):
        self.min_kl, self.min_entropy, self.patience = min_kl, min_entropy, patience
        self.low_steps = 0
        self.fired_at: int | None = None

    def update(self, step: int, stats: dict[str, float]) -> bool:
        """True on the step the alarm fires."""
        low = stats["kl"] < self.min_kl or stats["teacher_batch_entropy"] < self.min_entropy
        self.low_steps = self.low_steps + 1 if low else 0
        if self.low_steps >= self.patience and self.fired_at is None:
            self.fired_at = step
            return True
        return False


@torch.no_grad()
def features(backbone: nn.Module, images: torch.Tensor, device: torch.device, batch: int = 64) -> torch.Tensor:
    was_training = backbone.training
    backbone.eval()
    out = [backbone(images[i:i + batch].to(device, dtype=torch.float32)).float().cpu()
           for i in range(0, len(images), batch)]
    backbone.train(was_training)
    return torch.cat(out)


def knn_hits(bank: torch.Tensor, queries: torch.Tensor, knn: dict) -> torch.Tensor:
    """Whether DINO's kNN (k=20, T=0.07, cosine) gets each query right, given bank and query features."""
    predictions = knn_classify(bank, knn["bank_labels"], queries, num_classes=len(knn["classes"]), k=20,
                               temperature=0.07)
    return predictions == knn["query_labels"]


def knn_monitor(backbone: nn.Module, knn: dict, device: torch.device) -> torch.Tensor:
    """The kNN monitor's verdict on each held-out query for ``backbone`` (bool, one per query)."""
    return knn_hits(features(backbone, knn["bank"], device), features(backbone, knn["queries"], device), knn)


def knn_margin(knn: dict, before: str, after: str, samples: int = 2000, seed: int = 0) -> dict:
    """``after`` minus ``before`` kNN accuracy (per-query hits as "0"/"1" strings, e.g. random init and
    the last epoch), with a 95 % interval from resampling the held-out patients with replacement (a
    paired bootstrap: frames of one patient are not independent). An interval that holds 0 is no
    clear margin."""
    patients = knn["query_patients"].numpy()
    diff = np.frombuffer(after.encode(), np.uint8).astype(float) - np.frombuffer(before.encode(), np.uint8)
    count = np.bincount(patients).astype(float)
    gained = np.bincount(patients, weights=diff)
    draws = np.random.default_rng(seed).integers(0, len(count), (samples, len(count)))
    low, high = np.percentile(gained[draws].sum(1) / count[draws].sum(1), [2.5, 97.5])
    return {"margin": float(diff.mean()), "low": float(low), "high": float(high), "patients": len(count)}


MARGIN_MIN_PATIENTS = 5    # fewer, and resampling them says little about the next patients


def margin_verdict(margin: dict) -> str:
    """"clear" when ``knn_margin``'s interval lies above 0, "below random init" when below it."""
    if margin["patients"] < MARGIN_MIN_PATIENTS:
        return "too few held-out patients to tell"
    return "clear" if margin["low"] > 0 else ("below random init" if margin["high"] < 0 else "not clear")


def margin_text(margin: dict) -> str:
    """``knn_margin``'s result in words, as the summaries print it."""
    return (f"{margin['margin']:+.3f} (95 % interval over {margin['patients']} held-out patients "
            f"{margin['low']:+.3f} to {margin['high']:+.3f}: {margin_verdict(margin)})")


def hits_bits(hits: torch.Tensor) -> str:
    return "".join("1" if h else "0" for h in hits.tolist())


def knn_thumbnails(knn: dict, side: int = 16) -> float:
    """The same kNN on the images themselves, shrunk to ``side`` x ``side`` pixels: the reference a
    backbone has to beat to have learned more than the coarse layout of the image."""
    def thumbnails(images: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(images.float(), side).flatten(1)
    return float(knn_hits(thumbnails(knn["bank"]), thumbnails(knn["queries"]), knn).float().mean())
