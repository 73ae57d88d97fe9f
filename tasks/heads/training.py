"""Heads on a FROZEN backbone, trained on cached features (``tasks.heads.features``).

Tasks, each trained on the ``train`` split, selected on ``val`` (best epoch by the task's score;
the screw score threshold) and reported on ``test`` (splits by patient, ``tasks.ingest.labels``);
metrics in ``tasks.heads.evaluation``:

- ``region``: linear head on ``last4`` (ViT: the last-4 CLS; ResNet: the 4 stages' pools), the registered head;
  linear head on ``pooled``; MLP head on ``pooled``; weighted kNN (k=20, T=0.07, DINO's);
  few-shot linear probes on 1, 5 and 10 training images per class; a small supervised end-to-end
  run (the same architecture, initialised from this backbone, trained end to end with a linear
  head: from the random-init twin it is the supervised baseline). Accuracy, macro P/R/F1.
- ``metal``: ``SegmentationDecoder`` over the 4 levels (FPN / DPT-style reassembly to stride 4, refined to
  stride 2), upsampled to the input; BCE + soft Dice. Dense tasks run at ``dense_size`` (512 px).
- ``screws``: CenterNet-style ``ScrewHead`` at stride 4 (midpoint heatmap + offset + head/tip vectors); the
  score threshold is the one with the best F1 on validation images.

The dense tasks' supervised end-to-end run (``e2e_*`` metrics, with ``e2e_epochs``): the same head with a copy of
the backbone that trains with it (``TrainedMaps``: the backbone runs on each training window), evaluated as the
frozen head is; from the random-init twin it is the task's supervised ceiling.

Randomness: each (task, seed) run seeds its own ``torch.Generator`` for data order, few-shot
picks and augmentation; heads are initialised under a lock with the global RNG forked and seeded,
so concurrent branches (the flow's thread pool) stay reproducible.
"""
from __future__ import annotations

import copy
import threading
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from dax_models.backbones import Backbone, autocast, extract, resolve_device
from dax_models.heads import (
    FrozenHead,
    LinearHead,
    MLPHead,
    ScrewHead,
    SegmentationDecoder,
    map_strides,
    screw_loss,
    screw_targets,
)
from dax_models.metrics import (
    classification_metrics,
    knn_classify,
    segmentation_metrics,
)
from deployments import checked_numbers, find_config
from tasks.heads.data import HeadDataset
from tasks.heads.features import LiveFeatures
from tasks.heads.evaluation import (
    batches,
    classifier_probabilities,
    evaluate_screws,
    native_screw_metrics,
    native_segmentation_metrics,
    predict_masks,
    predict_screws,
    screw_counts_per_image,
)

__all__ = ["DENSE_TASKS", "TASKS", "DenseCrop", "HeadConfig", "HeadConfigError", "TaskResult", "TrainedMaps",
           "dense_ceiling", "fit_classifier", "fit_screw_head", "fit_segmenter", "load_head_config", "run_task",
           "seeded", "task_view", "train_end_to_end"]

TASKS = ("region", "metal", "screws")
DENSE_TASKS = ("metal", "screws")


def task_view(task: str) -> str:
    """The images a task reads: ``region`` at ``HeadConfig.size``, ``dense`` (metal, screws) at ``dense_size``."""
    return "dense" if task in DENSE_TASKS else "region"
_RNG_LOCK = threading.Lock()


@dataclass
class HeadConfig:
    """Budgets and settings of the heads (small by default: they train on cached features)."""

    size: int = 224                   # region input size S (letterboxed); best near the pretraining global crop
    dense_size: int = 512             # metal and screw input size (their oracles need >= 512 px: tests/test_dense_oracle.py)
    dense_crop: int = 256             # dense heads train on random windows of this size (0: whole images)
    dense_max_images: int | None = None   # an evenly spread subset for metal and screws (None: every labelled image)
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
    screw_gate: float = 0.05          # matching gate: fraction of the native long side (tasks.heads.evaluation)
    weight_decay: float = 1e-4
    eval_every: int = 5               # epochs between validation checks (best epoch kept)
    knn_k: int = 20
    knn_temperature: float = 0.07
    few_shot: tuple[int, ...] = (1, 5, 10)
    few_shot_epochs: int = 100
    e2e_epochs: int = 10              # supervised end-to-end runs, region's and the dense tasks' (0: skipped)
    e2e_lr: float = 3e-4
    e2e_batch: int = 32
    e2e_size: int | None = 96         # its input side, at most ``size`` (None: ``size``): more epochs of smaller images
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
        return cls(**checked_numbers(cls, data))

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def e2e_side(self) -> int:
        """The side the supervised end-to-end bound trains and tests at (``e2e_size``, at most ``size``)."""
        return min(self.e2e_size or self.size, self.size)


class HeadConfigError(ValueError):
    """A head config that does not exist, or a setting it does not have or cannot read."""


def load_head_config(name_or_path: str | None = None, overrides: dict | None = None) -> HeadConfig:
    """A named config from ``deployments/heads/`` (``demo``), a YAML file, or the defaults (None), with
    ``overrides`` on top (None values ignored)."""
    data = {}
    try:
        if name_or_path:
            data = yaml.safe_load(find_config("heads", name_or_path, "head config").read_text()) or {}
        data.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return HeadConfig.from_dict(data)
    except (FileNotFoundError, ValueError, yaml.YAMLError) as error:
        raise HeadConfigError(str(error)) from None


def seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    """Build a module with the global RNG seeded, without disturbing other threads' randomness."""
    with _RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


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
    head = seeded(seed, make).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    y = labels.long()
    best = {"val_accuracy": float("nan"), "epoch": epochs, "loss": float("nan")}
    best_state = None
    for epoch in range(1, epochs + 1):
        for b in batches(train_idx, batch_size, generator):
            if len(b) < 2 and len(train_idx) >= 2:
                continue
            logits = head(source.get(part, b, device))
            loss = F.cross_entropy(logits, y[b].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            best["last_loss"] = float(loss.detach())
        if val_idx is not None and len(val_idx) and (epoch % eval_every == 0 or epoch == epochs):
            accuracy = float((classifier_probabilities(head, source, part, val_idx, device).argmax(1)
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


class DenseCrop:
    """Random square windows of the input for the dense heads' training batches (``crop`` px; 0 or >= the input:
    the whole input). Windows are aligned to the coarsest feature level's stride, so every cached level is cut
    exactly where the input is: training costs (crop / size)^2 of whole images; evaluation uses whole images."""

    def __init__(self, size: int, crop: int, strides: Sequence[float], generator: torch.Generator):
        self.align = int(max(strides))
        self.size, self.strides, self.generator = int(size), [float(s) for s in strides], generator
        self.crop = self.size if crop <= 0 or crop >= size else max(self.align, crop // self.align * self.align)

    def draw(self) -> tuple[int, int]:
        """(top, left) of a window, in input pixels."""
        steps = (self.size - self.crop) // self.align
        top, left = torch.randint(0, steps + 1, (2,), generator=self.generator).tolist()
        return top * self.align, left * self.align

    def maps(self, maps: Sequence[torch.Tensor], top: int, left: int) -> list[torch.Tensor]:
        return [m[..., round(top / s):round((top + self.crop) / s), round(left / s):round((left + self.crop) / s)]
                for m, s in zip(maps, self.strides)]


class TrainedMaps(LiveFeatures):
    """A copy of the backbone that trains with a dense head: the supervised end-to-end run's feature source.

    ``get`` is ``LiveFeatures``' (maps of whole images), in eval mode and without gradients (strides, validation,
    test); ``window_maps`` runs the backbone in train mode, with gradients, on a training window of the input
    (a backbone that trains has no cached maps to cut). Its parameters train at ``lr`` (``param_groups``).
    """

    def __init__(self, backbone: Backbone, images: torch.Tensor, device: torch.device | str, lr: float):
        super().__init__(copy.deepcopy(backbone), images, device)
        self.lr = lr

    def get(self, part: str, idx, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        if part != "maps":
            raise ValueError(f"TrainedMaps gives maps only, not {part!r}")
        self.backbone.eval()
        with torch.no_grad():
            return super().get(part, idx, device)

    def window_maps(self, idx, top: int, left: int, crop: int, device: torch.device | str) -> list[torch.Tensor]:
        self.backbone.train()
        x = self.images[torch.as_tensor(np.asarray(idx, dtype=np.int64))][..., top:top + crop, left:left + crop]
        with autocast(self.device):
            maps = extract(self.backbone, x.to(self.device, dtype=torch.float32), ("maps",))["maps"]
        return [m.float().to(device) for m in maps]

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.backbone.parameters()), "lr": self.lr}]


def _window_maps(source, window: DenseCrop, idx, top: int, left: int, device) -> list[torch.Tensor]:
    """A training window's maps: cut from the cached maps, or from a backbone that trains run on the window."""
    if isinstance(source, TrainedMaps):
        return source.window_maps(idx, top, left, window.crop, device)
    return window.maps(source.get("maps", idx, device), top, left)


def _parameters(head: nn.Module, source) -> list[dict]:
    """The optimizer's groups: the head, and the backbone when it trains with it."""
    return [{"params": list(head.parameters())}, *(source.param_groups() if isinstance(source, TrainedMaps) else [])]


def _snapshot(head: nn.Module, source) -> dict:
    return copy.deepcopy({"head": head.state_dict(),
                          "backbone": source.backbone.state_dict() if isinstance(source, TrainedMaps) else None})


def _restore(head: nn.Module, source, state: dict) -> None:
    head.load_state_dict(state["head"])
    if state["backbone"] is not None:
        source.backbone.load_state_dict(state["backbone"])


def fit_segmenter(source, train_idx: np.ndarray, masks: torch.Tensor, size: int, epochs: int = 40, lr: float = 1e-3,
                  weight_decay: float = 1e-4, batch_size: int = 32, hidden: int = 64, seed: int = 0,
                  val_idx: np.ndarray | None = None, eval_every: int = 5, crop: int = 0,
                  device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """``SegmentationDecoder`` on the cached maps (or a ``TrainedMaps``); BCE + soft Dice on ``crop`` px windows
    (``DenseCrop``); best validation Dice (whole images) kept."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    strides = _map_strides(source, train_idx, size)
    window = DenseCrop(size, crop, strides, generator)
    decoder = seeded(seed, lambda: SegmentationDecoder(source.map_channels, strides, hidden=hidden)).to(device)
    optimizer = torch.optim.AdamW(_parameters(decoder, source), lr=lr, weight_decay=weight_decay)
    best, best_state = {"val_dice": float("nan"), "epoch": epochs}, None
    # selection only on validation images that show metal (empty ones reward predicting nothing)
    with_metal = [int(i) for i in (val_idx if val_idx is not None else []) if bool(masks[i].any())]
    for epoch in range(1, epochs + 1):
        decoder.train()
        for b in batches(train_idx, batch_size, generator):
            if len(b) < 2 and len(train_idx) >= 2:
                continue
            top, left = window.draw()
            logits = decoder(_window_maps(source, window, b, top, left, device), (window.crop, window.crop))
            target = masks[b][:, top:top + window.crop, left:left + window.crop].to(device, dtype=torch.float32)[:, None]
            loss = F.binary_cross_entropy_with_logits(logits, target) + _dice_loss(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if with_metal and (epoch % eval_every == 0 or epoch == epochs):
            probs = predict_masks(decoder, source, np.asarray(with_metal), size, device)
            score = segmentation_metrics(probs > 0.5, masks[with_metal])["dice"]
            if best_state is None or score > best["val_dice"]:
                best.update(val_dice=score, epoch=epoch)
                best_state = _snapshot(decoder, source)
    if best_state is not None:
        _restore(decoder, source, best_state)
    return decoder.eval(), best


def _map_strides(source, idx, size: int) -> list[float]:
    return map_strides(source.get("maps", np.asarray(idx[:1])), size)


def fit_screw_head(source, train_idx: np.ndarray, screws: Sequence[np.ndarray], size: int, epochs: int = 60,
                   lr: float = 1e-3, weight_decay: float = 1e-4, batch_size: int = 32, hidden: int = 64, seed: int = 0,
                   val_idx: np.ndarray | None = None, val_score: Callable[[list[list[dict]]], float] | None = None,
                   eval_every: int = 5, crop: int = 0, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """``ScrewHead`` on the cached maps (or a ``TrainedMaps``) with ``screw_targets`` / ``screw_loss`` (screws in
    INPUT pixels), trained on ``crop`` px windows (``DenseCrop``; the targets are made on the whole grid, then cut).

    ``val_score(predictions on val_idx)`` picks the best epoch (e.g. F1 at native resolution).
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    strides = _map_strides(source, train_idx, size)
    window = DenseCrop(size, crop, strides, generator)
    head = seeded(seed, lambda: ScrewHead(source.map_channels, strides, hidden=hidden)).to(device)
    optimizer = torch.optim.AdamW(_parameters(head, source), lr=lr, weight_decay=weight_decay)
    grid, cells = size // head.out_stride, window.crop // head.out_stride
    best, best_state = {"val_score": float("nan"), "epoch": epochs}, None
    # selection only when validation images show screws (else predicting nothing scores best)
    if val_idx is None or not any(len(screws[i]) for i in val_idx):
        val_idx = None
    for epoch in range(1, epochs + 1):
        head.train()
        for b in batches(train_idx, batch_size, generator):
            if len(b) < 2 and len(train_idx) >= 2:
                continue
            top, left = window.draw()
            out = head(_window_maps(source, window, b, top, left, device))
            y0, x0 = top // head.out_stride, left // head.out_stride
            targets = screw_targets([screws[i] for i in b], (size, size), (grid, grid))
            loss = screw_loss(out, {k: v[..., y0:y0 + cells, x0:x0 + cells] for k, v in targets.items() if v.dim() == 4})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        checking = epoch % eval_every == 0 or epoch == epochs
        if val_idx is not None and len(val_idx) and val_score is not None and checking:
            score = val_score(predict_screws(head, source, val_idx, size, device))
            if best_state is None or score > best["val_score"]:
                best.update(val_score=score, epoch=epoch)
                best_state = _snapshot(head, source)
    if best_state is not None:
        _restore(head, source, best_state)
    return head.eval(), best


def train_end_to_end(backbone: Backbone, data: HeadDataset, train_idx, val_idx, test_idx, epochs: int, lr: float,
                     batch_size: int, seed: int, device, eval_every: int = 1, return_model: bool = False,
                     augment: bool = True, size: int | None = None):
    """Supervised upper bound: a copy of ``backbone`` + a linear head trained end to end on regions
    (AdamW, random flips with ``augment``); best validation epoch; test accuracy and macro P/R/F1.
    ``size`` resizes the images to that side first (None: ``data.size``), so the bound can spend its budget
    on more epochs of smaller images. With ``return_model``: (metrics, the trained backbone copy in eval mode,
    on CPU)."""
    device = torch.device(device)

    def images(b) -> torch.Tensor:
        x = data.images[b].to(device, dtype=torch.float32)
        if size and size != x.shape[-1]:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return x

    generator = torch.Generator().manual_seed(seed)
    num_classes = len(data.classes)
    net = copy.deepcopy(backbone).to(device).train()
    head = seeded(seed, lambda: LinearHead(net.embed_dim, num_classes)).to(device)
    optimizer = torch.optim.AdamW(list(net.parameters()) + list(head.parameters()), lr=lr, weight_decay=0.05)
    y = data.regions

    def predict(idx) -> np.ndarray:
        net.eval()
        out = []
        with torch.no_grad():
            for b in batches(np.asarray(idx), 64, None):
                out.append(head(net(images(b))).argmax(1).cpu())
        net.train()
        return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)

    best, best_state = -1.0, None
    for epoch in range(1, epochs + 1):
        for b in batches(np.asarray(train_idx), batch_size, generator):
            x = images(b)
            if augment:
                flips = torch.rand(len(b), 2, generator=generator)
                x = torch.where((flips[:, 0] < 0.5).view(-1, 1, 1, 1).to(device), x.flip(-1), x)
                x = torch.where((flips[:, 1] < 0.5).view(-1, 1, 1, 1).to(device), x.flip(-2), x)
            with autocast(device):
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
    per_image: dict[str, list[float]] = field(default_factory=dict)   # per test image, for patient_interval


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

    ``backbone`` is needed only for the supervised end-to-end runs (``e2e_*`` metrics: skipped when None or
    ``config.e2e_epochs`` is 0): region's at ``e2e_side``, the dense tasks' with ``dense_ceiling``.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    device = resolve_device(config.device)
    data.check_splits(task)
    train, val, test = data.indices("train"), data.indices("val"), data.indices("test")
    if task == "region":
        return _run_region(seed, data, store, config, arch, backbone, train, val, test, device)
    result = _run_dense(task, seed, data, store, config, arch, device)
    if backbone is not None and config.e2e_epochs > 0:
        ceiling = dense_ceiling(task, seed, data, backbone, config)
        result.metrics.update({f"e2e_{k}": v for k, v in ceiling.metrics.items() if k != "gate_px"})
    return result


def dense_ceiling(task: str, seed: int, data: HeadDataset, backbone: Backbone, config: HeadConfig) -> TaskResult:
    """A dense task's supervised end-to-end run: a copy of ``backbone`` trained with the task's head
    (``TrainedMaps``, backbone at ``e2e_lr``) for ``e2e_epochs`` on the same windows, selected and evaluated as
    the frozen head is. From the random-init twin it is the task's supervised ceiling. No head to register."""
    device = resolve_device(config.device)
    source = TrainedMaps(backbone, data.images, device, config.e2e_lr)
    budget = replace(config, seg_epochs=config.e2e_epochs, screw_epochs=config.e2e_epochs)
    result = _run_dense(task, seed, data, source, budget, getattr(backbone, "arch", ""), device)
    result.head = None
    return result


def _run_dense(task: str, seed: int, data: HeadDataset, source, config: HeadConfig, arch: str, device) -> TaskResult:
    """Metal or screws with one seed on ``source`` (cached maps, or a ``TrainedMaps``)."""
    train, val, test = data.indices("train"), data.indices("val"), data.indices("test")
    size = data.size
    if task == "metal":
        decoder, info = fit_segmenter(source, train, data.masks, size, epochs=config.seg_epochs, lr=config.seg_lr,
                                      weight_decay=config.weight_decay, batch_size=config.dense_batch,
                                      hidden=config.seg_hidden, seed=seed, val_idx=val, eval_every=config.eval_every,
                                      crop=config.dense_crop, device=device)
        probs = predict_masks(decoder, source, test, size, device)
        metrics = native_segmentation_metrics(probs, data, test)
        per_image = {"dice": metrics.pop("per_image_dice")}
        metrics["dice_input"] = segmentation_metrics(probs > 0.5, data.masks[test])["dice"]
        head = FrozenHead("metal", decoder.cpu(), "maps", size, arch, info={"best_epoch": info["epoch"]})
        return TaskResult("metal", seed, metrics, float(info["val_dice"]), head,
                          {"probabilities": probs, "test_idx": test}, per_image)
    # screws
    gate = config.screw_gate

    def val_f1(predictions):
        return evaluate_screws(predictions, data, val, gate)[1]["f1"]

    screw_head, info = fit_screw_head(source, train, data.screws, size, epochs=config.screw_epochs,
                                      lr=config.screw_lr, weight_decay=config.weight_decay,
                                      batch_size=config.dense_batch, hidden=config.screw_hidden, seed=seed,
                                      val_idx=val, val_score=val_f1, eval_every=config.eval_every,
                                      crop=config.dense_crop, device=device)
    # the score threshold: best F1 on validation images, on the training images when val shows no screw
    pick = val if any(len(data.screws[i]) for i in val) else train
    threshold, val_metrics = evaluate_screws(predict_screws(screw_head, source, pick, size, device), data, pick, gate)
    if pick is train:
        val_metrics = {"f1": float("nan")}
    predictions = predict_screws(screw_head, source, test, size, device)
    metrics = native_screw_metrics(predictions, data, test, score_threshold=threshold, gate=gate)
    metrics["score_threshold"] = threshold
    head = FrozenHead("screws", screw_head.cpu(), "maps", size, arch, threshold=threshold,
                      info={"best_epoch": info["epoch"], "gate": gate})
    return TaskResult("screws", seed, metrics, float(val_metrics["f1"]), head,
                      {"predictions": predictions, "test_idx": test},
                      screw_counts_per_image(predictions, data, test, threshold, gate))


def _run_region(seed, data, store, config, arch, backbone, train, val, test, device) -> TaskResult:
    num_classes = len(data.classes)
    labels = data.regions
    primary = "last4"     # ViTs: DINO's last-4-blocks CLS probe; ResNets: the 4 stages' average pools
    common = dict(weight_decay=config.weight_decay, batch_size=config.batch_size, eval_every=config.eval_every,
                  device=device)

    def fit(part, kind, idx, epochs, s=seed):
        return fit_classifier(store, part, idx, labels, num_classes, kind=kind, epochs=epochs, lr=config.linear_lr,
                              seed=s, val_idx=val, hidden=config.mlp_hidden, **common)

    def test_metrics(head, part):
        probs = classifier_probabilities(head, store, part, test, device)
        return classification_metrics(probs.argmax(1), labels[test], num_classes)

    head, info = fit(primary, "linear", train, config.linear_epochs)
    predicted = classifier_probabilities(head, store, primary, test, device).argmax(1)
    main = classification_metrics(predicted, labels[test], num_classes)
    metrics = {k: main[k] for k in ("accuracy", "precision", "recall", "f1")}
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
                               seed, device, size=config.e2e_side)
        metrics["e2e_accuracy"] = e2e["accuracy"]
    frozen = FrozenHead("region", head.cpu(), primary, data.size, arch, classes=data.classes,
                        info={"best_epoch": info["epoch"]})
    return TaskResult("region", seed, metrics, float(info["val_accuracy"]), frozen,
                      {"confusion_matrix": main["confusion_matrix"]},
                      {"accuracy": (predicted == labels[test].numpy()).astype(float).tolist()})

