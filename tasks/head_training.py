"""Heads on a FROZEN backbone: features computed once and cached, then heads trained and evaluated.

Features (``FeatureStore``), one backbone pass per image, stored as float16:

- ``pooled`` (N, D): ``Backbone.forward`` (ViT CLS after the final norm, ResNet global average pool);
- ``cls4`` (N, 4D): the CLS tokens of the last 4 ViT blocks, normed and concatenated (DINO's linear
  probe; for ResNets the same as ``pooled``);
- ``maps``: the multi-level maps of ``Backbone.feature_maps`` (4 levels (N, C_i, H_i, W_i); for ViTs
  blocks spread over the depth, ``backbones.vit_map_blocks``).

They are computed once per (backbone weights, data) and kept in memory or, with a cache folder
(the flow uses ``HOME/cache/features/``), as ``.npy`` memmaps written batch by batch and read by
slices, so memory stays bounded whatever the corpus size; the cache key is the sha256 of the
backbone's weights and of the dataset's identity, so every epoch, head, task and seed reuses them.
``LiveFeatures`` has the same ``get`` interface but runs the backbone on every call: the
benchmark's "recompute every epoch" baseline.

Tasks, each trained on the ``train`` split, selected on ``val`` (best epoch by the task's score;
the screw score threshold) and reported on ``test`` (splits by patient, ``tasks.labels``):

- ``region``: linear head on the last-4 CLS (ViT; pooled for ResNets), the registered head;
  linear head on ``pooled``; MLP head on ``pooled``; weighted kNN (k=20, T=0.07, DINO's);
  few-shot linear probes on 1, 5 and 10 training images per class; a small supervised end-to-end
  run (the same architecture, initialised from this backbone, trained end to end with a linear
  head: from the random-init twin it is the supervised baseline). Accuracy, macro P/R/F1.
- ``metal``: ``SegmentationDecoder`` over the 4 levels, upsampled to the input; BCE + soft Dice.
  Dice and IoU at NATIVE resolution (the prediction cut out of the letterbox and resized to the
  detector grid), averaged over test images that show metal; ``dice_all`` over every test image.
- ``screws``: CenterNet-style ``ScrewHead`` (midpoint heatmap + offset + head/tip vectors).
  Predictions are mapped back to NATIVE pixels, then DAX's metrics (``screw_metrics``): mean L1
  (Manhattan) error of matched heads and tips, mean head->tip angle error, precision/recall/F1.
  Matching gate: a prediction matches a true screw only when its mean endpoint L1 error,
  (L1(head) + L1(tip)) / 2, is at most ``screw_gate`` (5 %) of the image's native long side
  (49 px at DAX's 976 px): a detection that far off is a false positive plus a false negative,
  not a localisation error that would swamp the L1 means. Images are grouped by native long side
  for the gate and the groups pooled (sums of TP/FP/FN, L1 and angle means weighted by matches).

Randomness: each (task, seed) run seeds its own ``torch.Generator`` for data order, few-shot
picks and augmentation; heads are initialised under a lock with the global RNG forked and seeded,
so concurrent branches (the flow's thread pool) stay reproducible.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import threading
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dax_models.backbones import Backbone
from dax_models.heads import (LinearHead, MLPHead, ScrewHead, SegmentationDecoder, decode_screws, screw_loss,
                              screw_targets)
from dax_models.metrics import (classification_metrics, detection_scores, knn_classify, screw_metrics,
                                 segmentation_metrics)
from tasks.head_data import HeadDataset, Letterbox, mask_to_native

__all__ = ["FEATURE_PARTS", "TASKS", "FeatureStore", "FrozenHead", "HeadConfig", "LiveFeatures", "backbone_digest",
           "evaluate_screws", "extract", "fit_classifier", "fit_screw_head", "fit_segmenter", "native_screw_metrics",
           "predict_masks", "predict_screws", "resolve_device", "resolve_model", "run_task", "train_end_to_end"]

FEATURE_PARTS = ("pooled", "cls4", "maps")
TASKS = ("region", "metal", "screws")
_RNG_LOCK = threading.Lock()


@dataclass
class HeadConfig:
    """Budgets and settings of the heads (small by default: they train on cached features)."""

    size: int = 224                   # evaluation input size S (letterboxed)
    feature_batch: int = 64           # images per backbone pass
    batch_size: int = 256             # classification heads (features)
    dense_batch: int = 32             # segmentation and screw heads
    linear_epochs: int = 200          # cheap on cached features; at 60 the demo's region probes were undertrained
    linear_lr: float = 1e-3
    mlp_epochs: int = 200
    mlp_hidden: int = 512
    seg_epochs: int = 40
    seg_lr: float = 1e-3
    seg_hidden: int = 64
    screw_epochs: int = 60
    screw_lr: float = 1e-3
    screw_hidden: int = 64
    screw_gate: float = 0.05          # matching gate: fraction of the native long side (module doc)
    weight_decay: float = 1e-4
    eval_every: int = 5               # epochs between validation checks (best epoch kept)
    knn_k: int = 20
    knn_temperature: float = 0.07
    few_shot: tuple[int, ...] = (1, 5, 10)
    few_shot_epochs: int = 100
    e2e_epochs: int = 10              # supervised end-to-end baseline (0: skipped)
    e2e_lr: float = 3e-4
    e2e_batch: int = 32
    device: str = "auto"

    @classmethod
    def from_dict(cls, data: dict | None) -> "HeadConfig":
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown head settings: {', '.join(sorted(unknown))}")
        if "few_shot" in data:
            data["few_shot"] = tuple(int(n) for n in data["few_shot"])
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_model(uri: str) -> tuple[str, str]:
    """(registered model name, version) of ``models:/<name>@<alias>`` or ``models:/<name>/<version>``."""
    from mlflow.tracking import MlflowClient

    if not uri.startswith("models:/"):
        raise ValueError("give a registered model URI: models:/<name>@<alias> or models:/<name>/<version>")
    rest = uri[len("models:/"):]
    client = MlflowClient()
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, str(client.get_model_version_by_alias(name, alias).version)
    name, _, version = rest.rpartition("/")
    if not name or not version.isdigit():
        raise ValueError(f"cannot read a model name and version from {uri!r}")
    client.get_model_version(name, version)   # raises when it does not exist
    return name, version


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


# --------------------------------------------------------------------------------------------- features

def backbone_digest(backbone: nn.Module) -> str:
    """sha256 of the backbone's architecture and weights: the identity its features are cached under."""
    h = hashlib.sha256(f"{getattr(backbone, 'arch', type(backbone).__name__)}:{getattr(backbone, 'in_chans', '')}"
                       .encode())
    for name, tensor in backbone.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def extract(backbone: Backbone, x: torch.Tensor, parts: Sequence[str] = FEATURE_PARTS) -> dict[str, Any]:
    """The requested feature parts of a batch, from ONE backbone pass (see the module docstring).

    Equal to ``backbone(x)``, ``backbone.last_blocks_cls(x)`` and ``backbone.feature_maps(x)``.
    """
    parts = set(parts)
    model = backbone.model
    x = backbone._input(x)
    out: dict[str, Any] = {}
    if backbone.kind == "vit":
        if parts & {"cls4", "maps"}:
            last4 = list(range(len(model.blocks) - 4, len(model.blocks)))
            wanted = sorted(set(last4 if "cls4" in parts else []) | set(backbone.map_blocks if "maps" in parts else []))
            final, inter = model.forward_intermediates(x, indices=wanted, return_prefix_tokens=True, norm=True)
            block = dict(zip(wanted, inter))
            if "pooled" in parts:
                out["pooled"] = model.forward_head(final)
            if "cls4" in parts:
                out["cls4"] = torch.cat([block[i][1][:, 0] for i in last4], dim=1)
            if "maps" in parts:
                out["maps"] = [block[i][0] for i in backbone.map_blocks]
        else:
            out["pooled"] = model(x)
    else:
        if "maps" in parts:
            final, inter = model.forward_intermediates(x, indices=[1, 2, 3, 4])
            out["maps"] = list(inter)
            pooled = model.forward_head(final)
        else:
            pooled = model(x)
        if "pooled" in parts:
            out["pooled"] = pooled
        if "cls4" in parts:
            out["cls4"] = pooled
    return out


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


class FeatureStore:
    """Cached frozen features of one backbone on one dataset (module docstring); ``get`` gives float32."""

    def __init__(self, arrays: dict[str, np.ndarray], maps: list[np.ndarray], meta: dict, path: Path | None = None):
        self.arrays, self.maps, self.meta, self.path = arrays, maps, meta, path

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.meta["parts"])

    def __len__(self) -> int:
        return int(self.meta["n"])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values()) + sum(m.nbytes for m in self.maps)

    @property
    def map_channels(self) -> list[int]:
        return [int(m.shape[1]) for m in self.maps]

    def get(self, part: str, idx: np.ndarray | Sequence[int], device: torch.device | str = "cpu"):
        """Rows ``idx`` of a part as float32 tensors on ``device`` (a list of 4 tensors for ``maps``)."""
        idx = np.asarray(idx, dtype=np.int64)
        if part == "maps":
            return [torch.from_numpy(np.ascontiguousarray(m[idx])).to(device).float() for m in self.maps]
        return torch.from_numpy(np.ascontiguousarray(self.arrays[part][idx])).to(device).float()

    @classmethod
    def compute(cls, backbone: Backbone, images: torch.Tensor, parts: Sequence[str] = FEATURE_PARTS,
                device: torch.device | str = "cpu", batch_size: int = 64, cache_dir: Path | None = None,
                data_digest: str | None = None, log: Callable[[str], None] | None = None) -> "FeatureStore":
        """Run ``backbone`` once over ``images`` (N, 1, S, S); reuse a complete cache entry if there is one.

        With ``cache_dir``, the entry ``cache_dir/<key>/`` holds one ``.npy`` per part and level (written
        as memmaps batch by batch, then renamed into place, ``meta.json`` last) and is opened as memmaps.
        """
        device = torch.device(device)
        parts = tuple(p for p in FEATURE_PARTS if p in set(parts))
        n = len(images)
        if data_digest is None:
            data_digest = hashlib.sha256(images.numpy().tobytes()).hexdigest()
        identity = f"{backbone_digest(backbone)}:{data_digest}:{','.join(parts)}:f16:v2"
        key = hashlib.sha256(identity.encode()).hexdigest()[:32]
        if cache_dir is not None:
            entry = Path(cache_dir) / key
            found = cls.open(entry)
            if found is not None:
                if log:
                    log(f"features: cache hit {key[:12]} ({found.nbytes / 2**20:.1f} MiB)")
                return found
        was_training = backbone.training
        backbone.eval().to(device)
        arrays: dict[str, np.ndarray] = {}
        maps: list[np.ndarray] = []
        tmp = None
        if cache_dir is not None:
            tmp = Path(cache_dir) / f".{key}.{uuid.uuid4().hex[:8]}.tmp"
            tmp.mkdir(parents=True, exist_ok=True)
        try:
            for start in range(0, n, batch_size):
                x = images[start:start + batch_size].to(device, dtype=torch.float32)
                with _autocast(device):
                    out = extract(backbone, x, parts)
                for part in ("pooled", "cls4"):
                    if part in out:
                        value = out[part].detach().float().cpu().numpy().astype(np.float16)
                        if part not in arrays:
                            arrays[part] = _allocate(tmp, f"{part}.npy", (n, *value.shape[1:]))
                        arrays[part][start:start + len(value)] = value
                if "maps" in out:
                    for level, value in enumerate(out["maps"]):
                        value = value.detach().float().cpu().numpy().astype(np.float16)
                        if len(maps) <= level:
                            maps.append(_allocate(tmp, f"map{level}.npy", (n, *value.shape[1:])))
                        maps[level][start:start + len(value)] = value
        except BaseException:
            if tmp is not None:
                _remove_tree(tmp)
            raise
        finally:
            backbone.train(was_training)
        meta = {"n": n, "parts": list(parts), "key": key, "arch": getattr(backbone, "arch", None),
                "levels": len(maps), "pooled_dim": int(arrays["pooled"].shape[1]) if "pooled" in arrays else None}
        if tmp is None:
            return cls(arrays, maps, meta)
        for array in list(arrays.values()) + maps:
            array.flush()
        (tmp / "meta.json").write_text(json.dumps(meta))
        entry = Path(cache_dir) / key
        try:
            os.replace(tmp, entry)
        except OSError:           # another process finished the same entry first: use it
            _remove_tree(tmp)
        if log:
            log(f"features: computed {n} images -> cache {key[:12]}")
        return cls.open(entry)

    @classmethod
    def open(cls, entry: Path) -> "FeatureStore | None":
        """A complete cache entry as read-only memmaps, or None."""
        entry = Path(entry)
        meta_file = entry / "meta.json"
        if not meta_file.is_file():
            return None
        meta = json.loads(meta_file.read_text())
        arrays = {p: np.load(entry / f"{p}.npy", mmap_mode="r") for p in ("pooled", "cls4")
                  if (entry / f"{p}.npy").is_file()}
        maps = [np.load(entry / f"map{i}.npy", mmap_mode="r") for i in range(meta.get("levels", 0))]
        return cls(arrays, maps, meta, entry)


def _allocate(folder: Path | None, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if folder is None:
        return np.zeros(shape, dtype=np.float16)
    return np.lib.format.open_memmap(folder / name, mode="w+", dtype=np.float16, shape=shape)


def _remove_tree(path: Path) -> None:
    for child in Path(path).glob("*"):
        child.unlink(missing_ok=True)
    Path(path).rmdir()


class LiveFeatures:
    """``FeatureStore``'s interface, but the backbone runs on every ``get`` (no cache)."""

    def __init__(self, backbone: Backbone, images: torch.Tensor, device: torch.device | str = "cpu"):
        self.backbone = backbone.eval().to(device)
        self.images, self.device = images, torch.device(device)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def map_channels(self) -> list[int]:
        return list(self.backbone.feature_channels)

    def get(self, part: str, idx, device: torch.device | str = "cpu"):
        idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        x = self.images[idx].to(self.device, dtype=torch.float32)
        with _autocast(self.device):
            out = extract(self.backbone, x, (part,))[part]
        if part == "maps":
            return [m.float().to(device) for m in out]
        return out.float().to(device)


# ---------------------------------------------------------------------------------------- the heads

class FrozenHead(nn.Module):
    """A trained head with what it needs to be used again: the task, the features it reads, the input
    size, the classes (region) and the screw score threshold. ``forward`` takes the features:
    (B, D) for 'pooled'/'cls4', the list of maps for 'maps'."""

    def __init__(self, task: str, head: nn.Module, features: str, size: int, arch: str,
                 classes: Sequence[str] | None = None, threshold: float = 0.5, info: dict | None = None):
        super().__init__()
        self.task, self.head, self.features, self.size, self.arch = task, head, features, int(size), arch
        self.classes = list(classes) if classes else None
        self.threshold = float(threshold)
        self.info = dict(info or {})

    def forward(self, features):
        if self.task == "metal":
            return self.head(features, (self.size, self.size))
        return self.head(features)


def _seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    """Build a module with the global RNG seeded, without disturbing other threads' randomness."""
    with _RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def _batches(idx: np.ndarray, batch_size: int, generator: torch.Generator | None) -> list[np.ndarray]:
    """Shuffled near-equal batches (never a batch of 1 when there are 2 or more samples: BatchNorm)."""
    idx = np.asarray(idx)
    if generator is not None:
        idx = idx[torch.randperm(len(idx), generator=generator).numpy()]
    count = max(1, math.ceil(len(idx) / batch_size))
    return [b for b in np.array_split(idx, count) if len(b)]


def _evaluate_classifier(head: nn.Module, source, part: str, idx: np.ndarray, device,
                         batch_size: int = 1024) -> np.ndarray:
    """Softmax probabilities (n, C) of ``head`` on rows ``idx``."""
    was_training = head.training
    head.eval()
    out = []
    with torch.no_grad():
        for b in _batches(idx, batch_size, None):
            out.append(torch.softmax(head(source.get(part, b, device)).float(), dim=1).cpu())
    head.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


def fit_classifier(source, part: str, train_idx: np.ndarray, labels: torch.Tensor, num_classes: int,
                   kind: str = "linear", epochs: int = 100, lr: float = 1e-3, weight_decay: float = 1e-4,
                   batch_size: int = 256, seed: int = 0, val_idx: np.ndarray | None = None, eval_every: int = 5,
                   hidden: int = 512, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """A linear or MLP head (standardised inputs) on feature ``part``; AdamW, cross-entropy.

    With ``val_idx``, the state with the best validation accuracy (checked every ``eval_every``
    epochs and at the end) is kept. Returns (head in eval mode, {"val_accuracy", "epoch", "loss"}).
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    dim = int(source.get(part, train_idx[:1]).shape[1])
    make = (lambda: LinearHead(dim, num_classes, standardize=True)) if kind == "linear" else \
        (lambda: MLPHead(dim, num_classes, hidden=hidden, standardize=True))
    head = _seeded(seed, make).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    y = labels.long()
    best = {"val_accuracy": float("nan"), "epoch": epochs, "loss": float("nan")}
    best_state = None
    for epoch in range(1, epochs + 1):
        for b in _batches(train_idx, batch_size, generator):
            if len(b) < 2 and len(train_idx) >= 2:
                continue
            logits = head(source.get(part, b, device))
            loss = F.cross_entropy(logits, y[b].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            best["last_loss"] = float(loss.detach())
        if val_idx is not None and len(val_idx) and (epoch % eval_every == 0 or epoch == epochs):
            accuracy = float((_evaluate_classifier(head, source, part, val_idx, device).argmax(1)
                              == y[val_idx].numpy()).mean())
            if best_state is None or accuracy > best["val_accuracy"]:
                best.update(val_accuracy=accuracy, epoch=epoch, loss=best.get("last_loss", float("nan")))
                best_state = copy.deepcopy(head.state_dict())
    if best_state is not None:
        head.load_state_dict(best_state)
    else:
        best.update(epoch=epochs, loss=best.get("last_loss", float("nan")))
    return head.eval(), best


def _dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    inter = (p * t).sum(1)
    return (1 - (2 * inter + 1) / (p.sum(1) + t.sum(1) + 1)).mean()


def predict_masks(decoder: nn.Module, source, idx: np.ndarray, size: int, device, batch_size: int = 32) -> torch.Tensor:
    """Metal probabilities (n, S, S) float32 on CPU."""
    decoder.eval()
    out = []
    with torch.no_grad():
        for b in _batches(idx, batch_size, None):
            out.append(torch.sigmoid(decoder(source.get("maps", b, device), (size, size))[:, 0].float()).cpu())
    return torch.cat(out) if out else torch.zeros(0, size, size)


def fit_segmenter(source, train_idx: np.ndarray, masks: torch.Tensor, size: int, epochs: int = 40, lr: float = 1e-3,
                  weight_decay: float = 1e-4, batch_size: int = 32, hidden: int = 64, seed: int = 0,
                  val_idx: np.ndarray | None = None, eval_every: int = 5,
                  device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """``SegmentationDecoder`` on the cached maps; BCE + soft Dice; best validation Dice kept."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    decoder = _seeded(seed, lambda: SegmentationDecoder(source.map_channels, hidden=hidden)).to(device)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=weight_decay)
    best, best_state = {"val_dice": float("nan"), "epoch": epochs}, None
    # selection only on validation images that show metal (empty ones reward predicting nothing)
    with_metal = [int(i) for i in (val_idx if val_idx is not None else []) if bool(masks[i].any())]
    for epoch in range(1, epochs + 1):
        decoder.train()
        for b in _batches(train_idx, batch_size, generator):
            if len(b) < 2 and len(train_idx) >= 2:
                continue
            logits = decoder(source.get("maps", b, device), (size, size))
            target = masks[b].to(device, dtype=torch.float32)[:, None]
            loss = F.binary_cross_entropy_with_logits(logits, target) + _dice_loss(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if with_metal and (epoch % eval_every == 0 or epoch == epochs):
            probs = predict_masks(decoder, source, np.asarray(with_metal), size, device)
            score = segmentation_metrics(probs > 0.5, masks[with_metal])["dice"]
            if best_state is None or score > best["val_dice"]:
                best.update(val_dice=score, epoch=epoch)
                best_state = copy.deepcopy(decoder.state_dict())
    if best_state is not None:
        decoder.load_state_dict(best_state)
    return decoder.eval(), best


def _map_size(source, idx) -> tuple[int, int]:
    maps = source.get("maps", np.asarray(idx[:1]))
    return tuple(max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1]))


def predict_screws(head: nn.Module, source, idx: np.ndarray, size: int, device, threshold: float = 0.05,
                   max_screws: int = 20, batch_size: int = 32) -> list[list[dict]]:
    """Per image the decoded screws in INPUT pixels (score >= ``threshold``), best first."""
    head.eval()
    result: list[list[dict]] = []
    with torch.no_grad():
        for b in _batches(idx, batch_size, None):
            out = head(source.get("maps", b, device))
            result += decode_screws({k: v.float().cpu() for k, v in out.items()}, (size, size),
                                    max_screws=max_screws, threshold=threshold)
    return result


def fit_screw_head(source, train_idx: np.ndarray, screws: Sequence[np.ndarray], size: int, epochs: int = 60,
                   lr: float = 1e-3, weight_decay: float = 1e-4, batch_size: int = 32, hidden: int = 64, seed: int = 0,
                   val_idx: np.ndarray | None = None, val_score: Callable[[list[list[dict]]], float] | None = None,
                   eval_every: int = 5, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """``ScrewHead`` on the cached maps with ``screw_targets`` / ``screw_loss`` (screws in INPUT pixels).

    ``val_score(predictions on val_idx)`` picks the best epoch (e.g. F1 at native resolution).
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    head = _seeded(seed, lambda: ScrewHead(source.map_channels, hidden=hidden)).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    map_size = _map_size(source, train_idx)
    targets = screw_targets([screws[i] for i in train_idx], (size, size), map_size)
    row_of = {int(i): r for r, i in enumerate(train_idx)}
    best, best_state = {"val_score": float("nan"), "epoch": epochs}, None
    # selection only when validation images show screws (else predicting nothing scores best)
    if val_idx is None or not any(len(screws[i]) for i in val_idx):
        val_idx = None
    for epoch in range(1, epochs + 1):
        head.train()
        for b in _batches(train_idx, batch_size, generator):
            if len(b) < 2 and len(train_idx) >= 2:
                continue
            rows = torch.as_tensor([row_of[int(i)] for i in b])
            out = head(source.get("maps", b, device))
            loss = screw_loss(out, {k: v[rows] for k, v in targets.items()})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        checking = epoch % eval_every == 0 or epoch == epochs
        if val_idx is not None and len(val_idx) and val_score is not None and checking:
            score = val_score(predict_screws(head, source, val_idx, size, device))
            if best_state is None or score > best["val_score"]:
                best.update(val_score=score, epoch=epoch)
                best_state = copy.deepcopy(head.state_dict())
    if best_state is not None:
        head.load_state_dict(best_state)
    return head.eval(), best


def native_screw_metrics(predictions: Sequence[Sequence[dict]], data: HeadDataset, idx: Sequence[int],
                         score_threshold: float = 0.5, gate: float = 0.05) -> dict:
    """DAX's screw metrics at NATIVE resolution for images ``idx`` (predictions in INPUT pixels).

    Each image's predictions are mapped back with its ``Letterbox``; images are grouped by native long
    side so the gate is ``gate`` x long side in each group; groups are pooled (module docstring).
    """
    groups: dict[int, tuple[list, list]] = {}
    for pred, i in zip(predictions, idx):
        box: Letterbox = data.boxes[i]
        rows = np.asarray([[*p["head"], *p["tip"], p["score"]] for p in pred], dtype=np.float64).reshape(-1, 5)
        native = box.screws_to_native(rows) if len(rows) else rows
        side = max(box.native_h, box.native_w)
        groups.setdefault(side, ([], []))
        groups[side][0].append(native)
        groups[side][1].append(data.native_screws[i])
    tp = fp = fn = n_pred = n_true = 0
    sums = {"head_l1_px": 0.0, "tip_l1_px": 0.0, "angle_deg": 0.0}
    weights = dict.fromkeys(sums, 0)
    for side, (preds, truths) in sorted(groups.items()):
        m = screw_metrics(preds, truths, score_threshold=score_threshold, max_distance=gate * side)
        tp, fp, fn = tp + m["tp"], fp + m["fp"], fn + m["fn"]
        n_pred, n_true = n_pred + m["num_pred"], n_true + m["num_true"]
        for key in sums:
            if m["tp"] and not math.isnan(m[key]):
                sums[key] += m[key] * m["tp"]
                weights[key] += m["tp"]
    precision, recall, f1 = detection_scores(tp, n_pred, n_true)
    result = {key: (sums[key] / weights[key] if weights[key] else float("nan")) for key in sums}
    result.update(precision=float(precision), recall=float(recall), f1=float(f1), tp=int(tp), fp=int(fp), fn=int(fn),
                  num_pred=int(n_pred), num_true=int(n_true), num_images=len(idx))
    return result


def evaluate_screws(predictions, data: HeadDataset, idx, gate: float, thresholds=None) -> tuple[float, dict]:
    """The score threshold with the best F1 (ties: the higher threshold) and its metrics."""
    best_t, best = 0.5, None
    for t in thresholds if thresholds is not None else np.round(np.arange(0.1, 0.91, 0.1), 2):
        m = native_screw_metrics(predictions, data, idx, score_threshold=float(t), gate=gate)
        if best is None or m["f1"] >= best["f1"]:
            best_t, best = float(t), m
    return best_t, best


def train_end_to_end(backbone: Backbone, data: HeadDataset, train_idx, val_idx, test_idx, epochs: int, lr: float,
                     batch_size: int, seed: int, device, eval_every: int = 1, return_model: bool = False,
                     augment: bool = True):
    """Supervised upper bound: a copy of ``backbone`` + a linear head trained end to end on regions
    (AdamW, random flips with ``augment``); best validation epoch; test accuracy and macro P/R/F1.
    With ``return_model``: (metrics, the trained backbone copy in eval mode, on CPU)."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    num_classes = len(data.classes)
    net = copy.deepcopy(backbone).to(device).train()
    head = _seeded(seed, lambda: LinearHead(net.embed_dim, num_classes)).to(device)
    optimizer = torch.optim.AdamW(list(net.parameters()) + list(head.parameters()), lr=lr, weight_decay=0.05)
    y = data.regions

    def predict(idx) -> np.ndarray:
        net.eval()
        out = []
        with torch.no_grad():
            for b in _batches(np.asarray(idx), 64, None):
                out.append(head(net(data.images[b].to(device, dtype=torch.float32))).argmax(1).cpu())
        net.train()
        return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)

    best, best_state = -1.0, None
    for epoch in range(1, epochs + 1):
        for b in _batches(np.asarray(train_idx), batch_size, generator):
            x = data.images[b].to(device, dtype=torch.float32)
            if augment:
                flips = torch.rand(len(b), 2, generator=generator)
                x = torch.where((flips[:, 0] < 0.5).view(-1, 1, 1, 1).to(device), x.flip(-1), x)
                x = torch.where((flips[:, 1] < 0.5).view(-1, 1, 1, 1).to(device), x.flip(-2), x)
            with _autocast(device):
                loss = F.cross_entropy(head(net(x)).float(), y[b].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if val_idx is not None and len(val_idx) and (epoch % eval_every == 0 or epoch == epochs):
            accuracy = float((predict(val_idx) == y[val_idx].numpy()).mean())
            if accuracy > best:
                best = accuracy
                best_state = (copy.deepcopy(net.state_dict()), copy.deepcopy(head.state_dict()))
    if best_state is not None:
        net.load_state_dict(best_state[0])
        head.load_state_dict(best_state[1])
    metrics = classification_metrics(predict(test_idx), y[test_idx], num_classes)
    result = {"accuracy": metrics["accuracy"], "precision": metrics["precision"], "recall": metrics["recall"],
              "f1": metrics["f1"], "val_accuracy": best if best_state is not None else float("nan")}
    return (result, net.eval().cpu()) if return_model else result


# ------------------------------------------------------------------------------------- one task, one seed

@dataclass
class TaskResult:
    """What one (backbone, task, seed) run produced: test metrics, the validation score it was selected
    on, the head to register, figures and extra data for the report (confusion matrix)."""

    task: str
    seed: int
    metrics: dict[str, float]
    val_score: float
    head: FrozenHead | None = None
    extra: dict = field(default_factory=dict)


def _few_shot_indices(labels: np.ndarray, train_idx: np.ndarray, n: int, generator: torch.Generator) -> np.ndarray:
    picked = []
    for c in np.unique(labels[train_idx]):
        members = train_idx[labels[train_idx] == c]
        order = torch.randperm(len(members), generator=generator).numpy()
        picked.extend(members[order[:n]].tolist())
    return np.asarray(sorted(picked), dtype=np.int64)


def run_task(task: str, seed: int, data: HeadDataset, store, config: HeadConfig, arch: str,
             backbone: Backbone | None = None) -> TaskResult:
    """Train and evaluate one task with one seed on cached features (``store``); see the module doc.

    ``backbone`` is needed only for the region task's end-to-end baseline (skipped when None or
    ``config.e2e_epochs`` is 0).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    device = resolve_device(config.device)
    train, val, test = data.indices("train"), data.indices("val"), data.indices("test")
    if not len(train) or not len(test):
        raise ValueError(f"the {task} task needs training and test images (got {len(train)} and {len(test)}): "
                         "label more patients")
    size = data.size
    if task == "region":
        return _run_region(seed, data, store, config, arch, backbone, train, val, test, device)
    if task == "metal":
        decoder, info = fit_segmenter(store, train, data.masks, size, epochs=config.seg_epochs, lr=config.seg_lr,
                                      weight_decay=config.weight_decay, batch_size=config.dense_batch,
                                      hidden=config.seg_hidden, seed=seed, val_idx=val, eval_every=config.eval_every,
                                      device=device)
        probs = predict_masks(decoder, store, test, size, device)
        metrics = native_segmentation_metrics(probs, data, test)
        metrics["dice_input"] = segmentation_metrics(probs > 0.5, data.masks[test])["dice"]
        head = FrozenHead("metal", decoder.cpu(), "maps", size, arch, info={"best_epoch": info["epoch"]})
        return TaskResult("metal", seed, metrics, float(info["val_dice"]), head,
                          {"probabilities": probs, "test_idx": test})
    # screws
    gate = config.screw_gate

    def val_f1(predictions):
        return evaluate_screws(predictions, data, val, gate)[1]["f1"]

    screw_head, info = fit_screw_head(store, train, data.screws, size, epochs=config.screw_epochs, lr=config.screw_lr,
                                      weight_decay=config.weight_decay, batch_size=config.dense_batch,
                                      hidden=config.screw_hidden, seed=seed, val_idx=val, val_score=val_f1,
                                      eval_every=config.eval_every, device=device)
    # the score threshold: best F1 on validation images, on the training images when val shows no screw
    pick = val if any(len(data.screws[i]) for i in val) else train
    threshold, val_metrics = evaluate_screws(predict_screws(screw_head, store, pick, size, device), data, pick, gate)
    if pick is train:
        val_metrics = {"f1": float("nan")}
    predictions = predict_screws(screw_head, store, test, size, device)
    metrics = native_screw_metrics(predictions, data, test, score_threshold=threshold, gate=gate)
    metrics["score_threshold"] = threshold
    head = FrozenHead("screws", screw_head.cpu(), "maps", size, arch, threshold=threshold,
                      info={"best_epoch": info["epoch"], "gate": gate})
    return TaskResult("screws", seed, metrics, float(val_metrics["f1"]), head,
                      {"predictions": predictions, "test_idx": test})


def native_segmentation_metrics(probabilities: torch.Tensor, data: HeadDataset, idx: Sequence[int]) -> dict:
    """Dice and IoU at NATIVE resolution: over test images with metal ('dice', 'iou'), and over all."""
    per_image = []
    for p, i in zip(probabilities, idx):
        pred = mask_to_native(p, data.boxes[i])
        truth = data.native_mask(i)
        m = segmentation_metrics(torch.from_numpy(pred), torch.from_numpy(truth))
        per_image.append((bool(truth.any()), m["dice"], m["iou"]))
    with_metal = [(d, j) for has, d, j in per_image if has]
    mean = (lambda v: float(np.mean(v)) if len(v) else float("nan"))
    return {"dice": mean([d for d, _ in with_metal]), "iou": mean([j for _, j in with_metal]),
            "dice_all": mean([d for _, d, _ in per_image]), "iou_all": mean([j for _, _, j in per_image]),
            "test_with_metal": len(with_metal)}


def _run_region(seed, data, store, config, arch, backbone, train, val, test, device) -> TaskResult:
    num_classes = len(data.classes)
    labels = data.regions
    # ViTs: DINO's last-4-blocks CLS probe; ResNets (cls4 == pooled): the pooled features
    primary = "cls4" if store.get("cls4", train[:1]).shape[1] != store.get("pooled", train[:1]).shape[1] else "pooled"
    common = dict(weight_decay=config.weight_decay, batch_size=config.batch_size, eval_every=config.eval_every,
                  device=device)

    def fit(part, kind, idx, epochs, s=seed):
        return fit_classifier(store, part, idx, labels, num_classes, kind=kind, epochs=epochs, lr=config.linear_lr,
                              seed=s, val_idx=val, hidden=config.mlp_hidden, **common)

    def test_metrics(head, part):
        probs = _evaluate_classifier(head, store, part, test, device)
        return classification_metrics(probs.argmax(1), labels[test], num_classes)

    head, info = fit(primary, "linear", train, config.linear_epochs)
    main = test_metrics(head, primary)
    metrics = {k: main[k] for k in ("accuracy", "precision", "recall", "f1")}
    if primary != "pooled":
        pooled_head, _ = fit("pooled", "linear", train, config.linear_epochs)
        metrics["linear_pooled_accuracy"] = test_metrics(pooled_head, "pooled")["accuracy"]
    mlp, _ = fit("pooled", "mlp", train, config.mlp_epochs)
    metrics["mlp_accuracy"] = test_metrics(mlp, "pooled")["accuracy"]
    knn = knn_classify(store.get("pooled", train), labels[train], store.get("pooled", test), num_classes,
                       k=config.knn_k, temperature=config.knn_temperature)
    metrics["knn_accuracy"] = float((knn.cpu() == labels[test]).float().mean())
    generator = torch.Generator().manual_seed(10_000 + seed)
    for n in config.few_shot:
        shots = _few_shot_indices(labels.numpy(), train, n, generator)
        few, _ = fit(primary, "linear", shots, config.few_shot_epochs)
        metrics[f"fewshot{n}_accuracy"] = test_metrics(few, primary)["accuracy"]
    if backbone is not None and config.e2e_epochs > 0:
        e2e = train_end_to_end(backbone, data, train, val, test, config.e2e_epochs, config.e2e_lr, config.e2e_batch,
                               seed, device)
        metrics["e2e_accuracy"] = e2e["accuracy"]
    frozen = FrozenHead("region", head.cpu(), primary, data.size, arch, classes=data.classes,
                        info={"best_epoch": info["epoch"]})
    return TaskResult("region", seed, metrics, float(info["val_accuracy"]), frozen,
                      {"confusion_matrix": main["confusion_matrix"]})


# ------------------------------------------------------------------------------------------- figures

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def confusion_figure(matrix: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str) -> Path:
    """Rows true class, columns predicted; counts written in the cells."""
    plt = _plt()
    cm = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    for (r, c), v in np.ndenumerate(cm):
        if v:
            ax.text(c, r, str(v), ha="center", va="center", fontsize=7, color="white" if v > cm.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pick(candidates: Sequence[int], n: int) -> list[int]:
    candidates = list(candidates)
    if len(candidates) <= n:
        return candidates
    return [candidates[i] for i in np.linspace(0, len(candidates) - 1, n).round().astype(int)]


def segmentation_figure(data: HeadDataset, idx: Sequence[int], probabilities: torch.Tensor, path: Path,
                        title: str, n: int = 4) -> Path:
    """Test images with metal: truth outline (green) and predicted mask (red) on the input view."""
    plt = _plt()
    rows = list(idx)
    with_metal = [r for r, i in enumerate(rows) if bool(data.masks[i].any())] or list(range(len(rows)))
    chosen = _pick(with_metal, n)
    fig, axes = plt.subplots(1, max(1, len(chosen)), figsize=(3 * max(1, len(chosen)), 3.2), squeeze=False)
    for ax, r in zip(axes[0], chosen):
        i = rows[r]
        ax.imshow(data.images[i, 0].float().numpy(), cmap="gray", vmin=0, vmax=1)
        pred = (probabilities[r] > 0.5).numpy()
        ax.imshow(np.ma.masked_where(~pred, pred), cmap="autumn", alpha=0.5, vmin=0, vmax=1)
        if bool(data.masks[i].any()):
            ax.contour(data.masks[i].numpy().astype(float), levels=[0.5], colors="lime", linewidths=0.8)
        ax.set_axis_off()
    fig.suptitle(title + "  (green: truth, red: prediction)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def screw_figure(data: HeadDataset, idx: Sequence[int], predictions: Sequence[Sequence[dict]], threshold: float,
                 path: Path, title: str, n: int = 4) -> Path:
    """Test images with screws: true screws (green, head dot) and predictions above the threshold (red, score)."""
    plt = _plt()
    rows = list(idx)
    with_screws = [r for r, i in enumerate(rows) if len(data.screws[i])] or list(range(len(rows)))
    chosen = _pick(with_screws, n)
    fig, axes = plt.subplots(1, max(1, len(chosen)), figsize=(3 * max(1, len(chosen)), 3.2), squeeze=False)
    for ax, r in zip(axes[0], chosen):
        i = rows[r]
        ax.imshow(data.images[i, 0].float().numpy(), cmap="gray", vmin=0, vmax=1)
        for hx, hy, tx, ty in data.screws[i]:
            ax.plot([hx, tx], [hy, ty], color="lime", lw=1.2)
            ax.plot([hx], [hy], "o", color="lime", ms=2.5)
        for p in predictions[r]:
            if p["score"] < threshold:
                continue
            (hx, hy), (tx, ty) = p["head"], p["tip"]
            ax.plot([hx, tx], [hy, ty], color="red", lw=1.0)
            ax.plot([hx], [hy], "o", color="red", ms=2.5)
            ax.text(hx, hy, f"{p['score']:.2f}", color="red", fontsize=6)
        ax.set_xlim(0, data.size)
        ax.set_ylim(data.size, 0)
        ax.set_axis_off()
    fig.suptitle(title + "  (green: truth, red: prediction and score)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def task_figures(result: TaskResult, data: HeadDataset, folder: Path, label: str) -> list[Path]:
    """The figure of one task's run (confusion matrix, segmentation overlays or screw predictions)."""
    folder.mkdir(parents=True, exist_ok=True)
    if result.task == "region":
        return [confusion_figure(result.extra["confusion_matrix"], data.classes, folder / f"region-{label}.png",
                                 f"body region, {label}: confusion matrix (test patients)")]
    if result.task == "metal":
        return [segmentation_figure(data, result.extra["test_idx"], result.extra["probabilities"],
                                    folder / f"metal-{label}.png", f"metal, {label}")]
    return [screw_figure(data, result.extra["test_idx"], result.extra["predictions"], result.head.threshold,
                         folder / f"screws-{label}.png", f"screws, {label}")]


# --------------------------------------------------------------------------------- the flow's steps

_MLFLOW_LOCK = threading.Lock()   # one MLflow writer at a time among the flow's threads (SQLite store)
HEAD_MODEL = "dax-head-{task}-{arch}"


def compute_features(role: str, backbone: Backbone, images: torch.Tensor, cache_dir: str, data_digest: str,
                     parts: Sequence[str], device: str = "auto", batch_size: int = 64) -> str:
    """Features of one backbone (cached under ``cache_dir``); returns the cache entry's folder."""
    store = FeatureStore.compute(backbone, images, parts, resolve_device(device), batch_size, Path(cache_dir),
                                 data_digest)
    return str(store.path)


def train_branch(role: str, task: str, seed: int, data: HeadDataset, stores: dict[str, str],
                 backbones: dict[str, Backbone], config: HeadConfig, arch: str, experiment_id: str,
                 parent_run_id: str, backbone_ref: str, figures_dir: str, register: bool = True,
                 figures: bool = True) -> dict:
    """One branch of the fan-out: train and evaluate ``task`` with ``seed`` on ``role``'s cached features;
    log a child MLflow run; register the head (``dax-head-<task>-<arch>``, tagged with the backbone's
    ``name/version``) when ``role`` is 'pretrained' and ``register``. Returns metrics and the version."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from tasks.tracking import log_torch_model

    store = FeatureStore.open(Path(stores[role]))
    if store is None:
        raise FileNotFoundError(f"the feature cache of the {role} backbone is incomplete")
    result = run_task(task, seed, data, store, config, arch, backbone=backbones.get(role))
    label = f"{role}-seed{seed}"
    paths = task_figures(result, data, Path(figures_dir), label) if figures else []
    metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    client = MlflowClient()
    model_name = HEAD_MODEL.format(task=task, arch=arch)
    version = None
    with _MLFLOW_LOCK:
        run = client.create_run(experiment_id, run_name=f"{task}-{role}-seed{seed}",
                                tags={"mlflow.parentRunId": parent_run_id, "dax.task": task, "dax.role": role,
                                      "dax.seed": str(seed), "dax.backbone": backbone_ref if role == "pretrained"
                                      else f"random-init {arch}"})
        run_id = run.info.run_id
        client.log_batch(run_id, params=_params({"task": task, "role": role, "seed": seed, "size": data.size}))
        RunMetrics(client, run_id).log({**metrics, "val_score": result.val_score})
        for path in paths:
            client.log_artifact(run_id, str(path), "figures")
        if role == "pretrained" and register and result.head is not None:
            with mlflow.start_run(run_id=run_id):
                info = log_torch_model(
                    result.head, "head", model_name,
                    metadata={"task": task, "arch": arch, "features": result.head.features, "size": data.size,
                              "classes": list(result.head.classes or []), "threshold": result.head.threshold,
                              "backbone": backbone_ref, "seed": seed})
            version = str(info.registered_model_version)
            tags = {"dax.backbone": backbone_ref, "dax.task": task, "dax.seed": str(seed), "dax.size": str(data.size),
                    "dax.features": result.head.features, "dax.val_score": f"{result.val_score:.6g}"}
            tags.update({f"metric.{k}": f"{v:.6g}" for k, v in metrics.items()})
            for key, value in tags.items():
                client.set_model_version_tag(model_name, version, key, value)
        client.set_terminated(run_id)
    undefined = sorted(k for k, v in result.metrics.items() if isinstance(v, float) and not math.isfinite(v))
    return {"role": role, "task": task, "seed": seed, "metrics": metrics, "undefined": undefined,
            "val_score": result.val_score,
            "model": model_name if version else None, "version": version, "run_id": run_id,
            "figures": [str(p) for p in paths]}


class RunMetrics:
    """Metrics of one run in one batch (MLflow keys: letters, digits, _ - . / and spaces)."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    def log(self, metrics: dict[str, float], step: int = 0) -> None:
        import time as _time

        from mlflow.entities import Metric
        now = int(_time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)


def _params(values: dict) -> list:
    from mlflow.entities import Param
    return [Param(k, str(v)[:500]) for k, v in values.items()]
