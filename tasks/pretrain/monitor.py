"""What pretraining is watched by: the collapse alarm and the kNN monitor with its yardsticks.

- ``CollapseMonitor``: fires when the student-teacher KL or the teacher's batch entropy stays below its
  threshold for ``patience`` steps (both fall to zero in DINO's two collapse modes: one dimension
  dominating, or a uniform output), or when the teacher, on average over those steps, sorts a batch into
  fewer than ``min_groups`` groups (either mode, partial).
- kNN monitor (k=20, T=0.07, cosine; DINO's): classifies held-out images by body region with a bank of
  training-split images, at step 0 (the random-init backbone) and after every ``knn_every`` epochs. It reads
  the backbone two ways from one pass (``knn_monitor_readouts``): the final pool (``"pool"``, DINO's readout,
  what ``knn_accuracy`` reports) and the last feature map average-pooled to a 3 x 3 grid, each cell
  L2-normalised (``"layout"``, ``LAYOUT_READOUT``), which keeps where things are in the image as the
  thumbnails do (docs/experiments.md, sections 26-27: named on two homes, then read on eleven fresh splits).
- ``knn_thumbnails`` (per query: ``knn_thumbnail_hits``): the same kNN on 16 x 16 pixel thumbnails of the
  images, a yardstick that needs no backbone at all.
- ``knn_margin``: a 95 % interval on the last epoch's margin over random init, by resampling the
  held-out patients.
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np
import torch
from torch import nn

from dax_models.backbones import extract
from dax_models.dino import entropy_ceiling
from dax_models.metrics import knn_classify

__all__ = ["LAYOUT_READOUT", "MARGIN_MIN_PATIENTS", "CollapseMonitor", "end_margins", "features", "grid_cells",
           "hits_bits", "knn_hits", "knn_margin", "knn_monitor", "knn_monitor_readouts", "knn_thumbnail_hits",
           "knn_thumbnails", "margin_brief", "margin_lines", "margin_text", "margin_verdict", "readout_features"]


class CollapseMonitor:
    """DINO's two collapse modes, whole or partial, from the loss's per-step statistics.

    - Whole: the KL or the teacher's batch entropy below its threshold for ``patience`` steps in a row
      (both fall to zero when one prototype takes every image, or every output is uniform).
    - Partial: the teacher's information about the crop (``teacher_information``: batch entropy minus
      per-crop entropy) averages under ``log(min_groups)`` over the last ``patience`` steps, i.e. the
      teacher sorts a batch into fewer than ``min_groups`` equally likely groups. It catches what the
      whole-collapse thresholds miss: a teacher that settles on a few prototypes for every image
      (dominance: batch entropy far under ``log(out_dim)``) or on near-uniform outputs for every image
      (per-crop entropy near it). On the demo corpus kNN accuracy fell in both, but a backbone can still
      learn under such a teacher (docs/experiments.md, section 11): it warns, it does not judge.
      ``min_groups`` 0 turns it off.

    ``fired_at`` is the step of the first alarm, ``message`` what it found.
    """

    def __init__(self, min_kl: float, min_entropy: float, patience: int, min_groups: float = 0.0,
                 out_dim: int | None = None):
        self.min_kl, self.min_entropy, self.patience = min_kl, min_entropy, patience
        self.min_information = math.log(min_groups) if min_groups > 1 else None
        self.half_ceiling = 0.5 * entropy_ceiling(out_dim) if out_dim else None
        self.low_steps = 0
        self.recent: deque[dict[str, float]] = deque(maxlen=max(patience, 1))
        self.fired_at: int | None = None
        self.message: str | None = None

    def update(self, step: int, stats: dict[str, float]) -> bool:
        """True on the step the alarm fires."""
        low = stats["kl"] < self.min_kl or stats["teacher_batch_entropy"] < self.min_entropy
        self.low_steps = self.low_steps + 1 if low else 0
        self.recent.append(stats)
        if self.fired_at is not None:
            return False
        if self.low_steps >= self.patience:
            self.message = (f"collapse at step {step}: KL {stats['kl']:.2e} (min {self.min_kl}) or teacher batch "
                            f"entropy {stats['teacher_batch_entropy']:.3f} nats (min {self.min_entropy}) for "
                            f"{self.patience} steps")
        elif self._partial():
            self.message = self._partial_message(step)
        else:
            return False
        self.fired_at = step
        return True

    def _mean(self, key: str) -> float:
        return float(np.mean([s[key] for s in self.recent]))

    def _partial(self) -> bool:
        return (self.min_information is not None and len(self.recent) == self.recent.maxlen
                and "teacher_information" in self.recent[0]
                and self._mean("teacher_information") < self.min_information)

    def _partial_message(self, step: int) -> str:
        batch_entropy = self._mean("teacher_batch_entropy")
        if self.half_ceiling is not None:
            mode = ("dominance: a few prototypes take every image" if batch_entropy < self.half_ceiling
                    else "uniform: every image gets a near-uniform output")
        else:
            mode = "the teacher tells the images apart less and less"
        return (f"partial collapse at step {step} ({mode}): over the last {len(self.recent)} steps the teacher "
                f"sorted a batch into {math.exp(self._mean('teacher_information')):.2f} groups (min "
                f"{math.exp(self.min_information):g}); per-crop entropy {self._mean('teacher_entropy'):.2f}, "
                f"batch entropy {batch_entropy:.2f} nats")


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
    """The kNN monitor's verdict on each held-out query for ``backbone``'s final pool (bool, one per query)."""
    return knn_hits(features(backbone, knn["bank"], device), features(backbone, knn["queries"], device), knn)


LAYOUT_READOUT = {"level": 4, "grid": 3}    # the last of the backbone's 4 feature maps, pooled to 3 x 3 cells


def grid_cells(feature_map: torch.Tensor, grid: int) -> torch.Tensor:
    """A (B, C, H, W) feature map average-pooled to ``grid`` x ``grid`` cells, each cell L2-normalised, the cells
    concatenated: (B, C * grid * grid)."""
    cells = nn.functional.adaptive_avg_pool2d(feature_map.float(), grid)
    return nn.functional.normalize(cells, dim=1).flatten(1)


@torch.no_grad()
def readout_features(backbone: nn.Module, images: torch.Tensor, device: torch.device,
                     batch: int = 64) -> dict[str, torch.Tensor]:
    """Per image, from one backbone pass: ``"pool"``, the final pool (``backbone(x)``), and ``"layout"``, the
    ``LAYOUT_READOUT`` map average-pooled to its grid, each cell L2-normalised, the cells concatenated."""
    was_training = backbone.training
    backbone.eval()
    out: dict[str, list[torch.Tensor]] = {"pool": [], "layout": []}
    for i in range(0, len(images), batch):
        parts = extract(backbone, images[i:i + batch].to(device, dtype=torch.float32), parts=("pooled", "maps"))
        out["pool"].append(parts["pooled"].float().cpu())
        out["layout"].append(grid_cells(parts["maps"][LAYOUT_READOUT["level"] - 1], LAYOUT_READOUT["grid"]).cpu())
    backbone.train(was_training)
    return {name: torch.cat(chunks) for name, chunks in out.items()}


def knn_monitor_readouts(backbone: nn.Module, knn: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """The kNN monitor's verdict on each held-out query, per readout (``"pool"``, ``"layout"``), from one pass
    over the bank and one over the queries."""
    bank, queries = readout_features(backbone, knn["bank"], device), readout_features(backbone, knn["queries"], device)
    return {name: knn_hits(bank[name], queries[name], knn) for name in bank}


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


def margin_verdict(margin: dict, against: str = "random init") -> str:
    """"clear" when ``knn_margin``'s interval lies above 0, "below random init" (or what the margin is
    ``against``) when below it."""
    if margin["patients"] < MARGIN_MIN_PATIENTS:
        return "too few held-out patients to tell"
    return "clear" if margin["low"] > 0 else (f"below {against}" if margin["high"] < 0 else "not clear")


def margin_text(margin: dict, against: str = "random init") -> str:
    """``knn_margin``'s result in words, as the summaries print it."""
    return (f"{margin['margin']:+.3f} (95 % interval over {margin['patients']} held-out patients "
            f"{margin['low']:+.3f} to {margin['high']:+.3f}: {margin_verdict(margin, against)})")


def margin_brief(margin: dict) -> str:
    """``knn_margin``'s result in a table cell: "+0.123 (-0.010 to +0.250)"."""
    return f"{margin['margin']:+.3f} ({margin['low']:+.3f} to {margin['high']:+.3f})"


def end_margins(summary: dict) -> list[tuple[str, str, str, dict]]:
    """The kNN monitor's end-of-run margins a pretraining result or summary holds, as (MLflow metric, what,
    against, margin), in the order they are printed: over random init (final pool, layout readout), then over
    the 16 x 16 thumbnails (each readout)."""
    over_thumbnails = summary.get("knn_margin_over_thumbnails") or {}
    named = [("knn_margin", "margin over random init", "random init", summary.get("knn_margin")),
             ("knn_layout_margin", "layout readout's margin over random init", "random init",
              summary.get("knn_layout_margin")),
             ("knn_pool_over_thumbnails", "margin over the 16x16 thumbnails", "the thumbnails",
              over_thumbnails.get("pool")),
             ("knn_layout_over_thumbnails", "layout readout's margin over the 16x16 thumbnails", "the thumbnails",
              over_thumbnails.get("layout"))]
    return [entry for entry in named if entry[3]]


def margin_lines(summary: dict) -> list[tuple[str, str]]:
    """``end_margins`` as (what, in words), as the summaries print them."""
    return [(what, margin_text(margin, against)) for _, what, against, margin in end_margins(summary)]


def hits_bits(hits: torch.Tensor) -> str:
    """Per-query hits (bool) as a "0"/"1" string: how checkpoints and ``result.json`` keep them."""
    return "".join("1" if h else "0" for h in hits.tolist())


HIT_KEYS = {"pool": "hits", "layout": "hits_layout"}   # per readout, the key of its hits in a run's kNN history


def recorded_hits(hits: dict[str, torch.Tensor]) -> dict[str, str]:
    """``knn_monitor_readouts``' hits as a run's kNN history records them (``HIT_KEYS``)."""
    return {HIT_KEYS[name]: hits_bits(h) for name, h in hits.items()}


def unreproduced_readouts(entry: dict, hits: dict[str, str]) -> list[str]:
    """The readouts (``HIT_KEYS``' names) whose hits, as ``hits_bits`` strings, differ from those a run recorded
    in one entry of its kNN history: what a script that re-reads a finished run checks before it reports. A
    readout the entry lacks (runs before the layout readout) or ``hits`` lacks is not compared."""
    return [name for name, key in HIT_KEYS.items() if key in entry and name in hits and hits[name] != entry[key]]


def hits_rate(hits: str) -> float:
    """The accuracy of ``hits_bits``' string."""
    return hits.count("1") / len(hits)


def knn_thumbnail_hits(knn: dict, side: int = 16) -> torch.Tensor:
    """The same kNN on the images themselves, shrunk to ``side`` x ``side`` pixels, per query."""
    def thumbnails(images: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(images.float(), side).flatten(1)
    return knn_hits(thumbnails(knn["bank"]), thumbnails(knn["queries"]), knn)


def knn_thumbnails(knn: dict, side: int = 16) -> float:
    """``knn_thumbnail_hits``' accuracy: the reference a backbone has to beat to have learned more than the
    coarse layout of the image."""
    return float(knn_thumbnail_hits(knn, side).float().mean())
