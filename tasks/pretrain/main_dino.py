"""DINO pretraining on the shard store: the whole training loop in one file, as DINO's ``main_dino.py``.

One entry point for every scale: ``train(job_dir)`` runs in the calling process (CPU, one GPU), and
``python -m tasks.pretrain.main_dino JOB_DIR`` is what ``torchrun --nproc_per_node N`` starts on every rank
(DDP: gloo on CPU, NCCL on GPUs). The job folder holds ``job.json`` (config, selection, device, MLflow
run id), ``keys.txt`` (the selected image keys) and, when labels were given, ``knn.pt`` (the kNN
monitor's bank and queries); training writes ``checkpoints/last.pt`` (atomically, every
``checkpoint_every`` steps), ``history.jsonl`` (one line per step, from rank 0) and ``result.json``.

Per step, as DINO: learning rate, weight decay and teacher momentum from per-step cosine schedules,
teacher temperature from a per-epoch schedule (``teacher_half_life`` sizes the teacher's start momentum to
the run: see ``momentum_schedule``); the teacher (no gradients) sees the 2 global crops,
the student all crops; DINO loss with centering; per-parameter gradient clipping; the last layer frozen
in the first ``freeze_last_layer`` epochs; then the EMA update of the teacher. On CUDA: bf16 autocast,
channels-last, fused AdamW and optional ``torch.compile``; fp16 uses a GradScaler. LARS for ResNets.

A checkpoint holds everything a resumed run needs to continue bit-for-bit on CPU: student, teacher,
optimizer, scaler, loss centre, schedules, step (the data position: the loader is rebuilt from the
step's epoch on, from its seed, and the epoch's steps already done are skipped) and the training process's
RNG states.

Monitoring: loss, lr, weight decay, momentum, teacher temperature, teacher entropy (per sample and of
the batch mean, and their difference, the teacher's information about the crop), student-teacher KL,
centre norm and images/s, to MLflow every ``log_every`` steps.
The collapse alarm fires when the KL or the batch entropy of the teacher stays below its threshold
for ``collapse_patience`` steps (both fall to zero in DINO's two collapse modes: one dimension
dominating, or a uniform output), or when over those steps the teacher sorts a batch into fewer than
``collapse_min_groups`` groups (either mode, partial); it warns and, with ``stop_on_collapse``, ends the
run. The kNN monitor (k=20, T=0.07, cosine; DINO's) classifies held-out images by body region at step 0
(the random-init backbone) and after every ``knn_every`` epochs, with the teacher (what is registered) and the
student, on the final pool; the teacher also on its last feature map pooled to 3 x 3 cells (the layout readout,
``knn_accuracy_layout``); ``knn_thumbnails`` gives the same kNN on 16 x 16 pixel thumbnails of the images, a
reference that needs no backbone at all. The share of crop boxes the augmentation redrew for too little content
is logged (``crop_rejection_rate``). At the end, ``knn_margin`` (final pool) and ``knn_layout_margin`` put a
95 % interval on the last epoch's margin over random init, and ``knn_margin_over_thumbnails`` on each
readout's margin over the thumbnails, by resampling the held-out patients (``result.json`` and MLflow).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn

from dax_models.augment import CropDraws, MultiCropConfig, XrayMultiCrop
from dax_models.backbones import ARCHITECTURES, Backbone, create_backbone
from dax_models.dino import (
    LARS,
    DINOHead,
    DINOLoss,
    MultiCropWrapper,
    cancel_last_layer_gradients,
    clip_gradients,
    cosine_schedule,
    ema_update,
    momentum_for_half_life,
    param_groups,
    teacher_temperature_schedule,
    teacher_weights,
)
from deployments import checked_numbers, find_config
from tasks.pretrain.data import Selection, train_loader
from tasks.pretrain.monitor import (HIT_KEYS, CollapseMonitor, hits_bits, knn_margin, knn_monitor,
                                    knn_monitor_readouts, knn_thumbnail_hits, recorded_hits)

log = logging.getLogger("dax.pretrain")

__all__ = ["ConfigError", "PretrainConfig", "TrainingCollapsed", "load_config", "main", "momentum_schedule", "train",
           "write_job"]

CHECKPOINT = "last.pt"


class ConfigError(ValueError):
    """A pretraining config that does not exist or does not parse."""


@dataclass
class PretrainConfig:
    name: str = "custom"
    # model
    arch: str = "vit_tiny_patch16"
    in_chans: int = 1                      # 1, or 3 (gray copied to 3 channels, DAX's habit)
    init_checkpoint: str | None = None     # a local weights file (e.g. DINO ImageNet), else random init
    drop_path_rate: float = 0.1
    out_dim: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    use_bn_in_head: bool = False           # True for DAX's ResNet-50
    norm_last_layer: bool = True
    # schedule (epochs are fixed-length: steps_per_epoch batches per rank)
    epochs: int = 100
    steps_per_epoch: int | None = None     # default: selected images // (batch_size * world size)
    batch_size: int = 64                   # per process
    optimizer: str = "adamw"               # adamw | lars | sgd
    lr: float = 5e-4                       # at a total batch of 256, scaled linearly
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.996        # start of the cosine to 1, unless teacher_half_life is set
    teacher_half_life: float | None = None # a fraction of the run's steps: the start momentum under which a
                                           # student step's weight in the teacher halves in that many steps
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    student_temp: float = 0.1
    center_momentum: float = 0.9
    freeze_last_layer: int = 1
    clip_grad: float = 3.0                 # 0: no clipping
    # data
    augment: MultiCropConfig = field(default_factory=MultiCropConfig)
    workers: int = 2
    shuffle_buffer: int = 256
    # device
    precision: str = "auto"                # auto (bf16 on CUDA; auto_precision on a CPU) | fp32 | bf16 | fp16
    compile: bool = False
    seed: int = 0
    # bookkeeping and monitoring
    checkpoint_every: int = 500            # steps
    log_every: int = 10                    # steps
    knn_every: int = 1                     # epochs; 0 = off
    knn_size: int = 112
    knn_max_bank: int = 2000
    knn_max_queries: int = 1000
    collapse_min_kl: float = 1e-3
    collapse_min_entropy: float = 0.1      # teacher batch entropy, nats
    collapse_patience: int = 100           # steps
    collapse_min_groups: float = 2.0       # partial collapse: the teacher sorts a batch into fewer groups than
                                           # this, on average over collapse_patience steps; 0 = off
    stop_on_collapse: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def epoch_steps(self, images: int, world: int = 1) -> int:
        """Steps per epoch on each of ``world`` ranks for ``images`` selected images (``steps_per_epoch`` if set)."""
        return self.steps_per_epoch or max(1, images // (self.batch_size * world))

    @classmethod
    def from_dict(cls, data: dict) -> "PretrainConfig":
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown pretraining settings: {', '.join(sorted(unknown))}")
        augment = data.pop("augment", None) or {}
        aug_known = {f.name for f in dataclasses.fields(MultiCropConfig)}
        if set(augment) - aug_known:
            raise ConfigError(f"unknown augment settings: {', '.join(sorted(set(augment) - aug_known))}")
        augment = {k: tuple(v) if isinstance(v, list) else v for k, v in augment.items()}
        try:
            data, augment = checked_numbers(cls, data), checked_numbers(MultiCropConfig, augment, "augment.")
            config = cls(**data, augment=MultiCropConfig(**augment))
        except (TypeError, ValueError) as error:
            raise ConfigError(f"invalid pretraining config: {error}") from None
        if config.arch not in ARCHITECTURES:
            raise ConfigError(f"unknown architecture {config.arch!r}; known: {', '.join(ARCHITECTURES)}")
        if config.optimizer not in ("adamw", "lars", "sgd"):
            raise ConfigError(f"unknown optimizer {config.optimizer!r} (adamw, lars or sgd)")
        if config.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"unknown precision {config.precision!r} (auto, fp32, bf16 or fp16)")
        return config


def load_config(name_or_path: str, overrides: dict | None = None) -> PretrainConfig:
    """A named config from ``deployments/pretrain/`` or a YAML file, with ``overrides`` on top."""
    try:
        path = find_config("pretrain", name_or_path, "pretraining config")
    except FileNotFoundError as error:
        raise ConfigError(str(error)) from None
    data = yaml.safe_load(path.read_text()) or {}
    data.setdefault("name", path.stem)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key.startswith("augment."):
            data.setdefault("augment", {})[key.split(".", 1)[1]] = value
        else:
            data[key] = value
    return PretrainConfig.from_dict(data)


def momentum_schedule(config: PretrainConfig, steps_per_epoch: int) -> np.ndarray:
    """The teacher's EMA momentum per step: a cosine from the start momentum to 1 (DINO).

    The start is ``momentum_teacher``, or, with ``teacher_half_life`` h, the momentum whose half-life is h
    of the run's steps: DINO's 0.996 over 250k steps leaves nothing of the initialisation in the teacher,
    but over a few hundred steps it leaves 42 % (0.99: 11 %), so a short run's teacher would be largely
    its random init. With h = 0.05 about 0.1 % is left, whatever the run's length
    (``dax_models.dino.teacher_weights``).
    """
    total = config.epochs * steps_per_epoch
    start = (momentum_for_half_life(config.teacher_half_life * total) if config.teacher_half_life
             else config.momentum_teacher)
    return cosine_schedule(start, 1.0, config.epochs, steps_per_epoch)


def build_schedules(config: PretrainConfig, steps_per_epoch: int, total_batch: int) -> dict[str, np.ndarray]:
    """Per-step lr (scaled linearly from batch 256), weight decay and teacher momentum; per-epoch teacher
    temperature."""
    return {
        "lr": cosine_schedule(config.lr * total_batch / 256.0, config.min_lr, config.epochs, steps_per_epoch,
                              config.warmup_epochs),
        "wd": cosine_schedule(config.weight_decay, config.weight_decay_end, config.epochs, steps_per_epoch),
        "momentum": momentum_schedule(config, steps_per_epoch),
        "teacher_temp": teacher_temperature_schedule(config.warmup_teacher_temp, config.teacher_temp,
                                                     config.warmup_teacher_temp_epochs, config.epochs),
    }


def teacher_make_up(momentum: np.ndarray) -> dict:
    """The final teacher's weight on its initialisation and the step its student weights centre on."""
    init, after = teacher_weights(momentum)
    steps = np.arange(1, len(after) + 1)
    return {"teacher_init_weight": init,
            "teacher_centre_step": float((steps * after).sum() / after.sum()) if after.sum() > 0 else 0.0}


class TrainingCollapsed(RuntimeError):
    """The collapse alarm fired and the config asks to stop."""


# --- distributed ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' asked for, but no GPU is visible")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(minutes=10))
    return Dist(rank, world, local_rank, dev)


def _any_rank(flag: bool, d: Dist) -> bool:
    """Whether ``flag`` holds on any rank (the same answer on every rank)."""
    if d.world == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=d.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


# --- checkpoints ----------------------------------------------------------------------------------------

def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    # Our own files: optimizer and RNG states need full unpickling (numpy arrays, tuples).
    return torch.load(path, map_location="cpu", weights_only=False)


# --- the job folder -------------------------------------------------------------------------------------

def write_job(job_dir: Path, config: PretrainConfig, selection: Selection, *, device: str = "auto",
              run_id: str | None = None, resume: bool = False, stop_after: int | None = None) -> Path:
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "keys.txt").write_text("\n".join(selection.keys) + "\n")
    job = {"config": config.to_dict(), "where": selection.where, "shards": [list(s) for s in selection.shards],
           "shard_dir": selection.shard_dir, "device": device, "run_id": run_id, "resume": resume,
           "stop_after": stop_after}
    (job_dir / "job.json").write_text(json.dumps(job, indent=2, default=str))
    return job_dir


def read_job(job_dir: Path) -> tuple[dict, PretrainConfig, Selection]:
    job = json.loads((job_dir / "job.json").read_text())
    keys = tuple(k for k in (job_dir / "keys.txt").read_text().split("\n") if k)
    selection = Selection(job["where"], keys, tuple(tuple(s) for s in job["shards"]), job["shard_dir"])
    return job, PretrainConfig.from_dict(job["config"]), selection


# --- building the models --------------------------------------------------------------------------------

def initial_backbone(config: PretrainConfig, drop_path_rate: float = 0.0) -> Backbone:
    """The run's first backbone, the student's, seeded with ``config.seed`` (the same initial weights on every
    rank; DDP also broadcasts them): the random init that benchmarks compare a finished run against."""
    torch.manual_seed(config.seed)
    return create_backbone(config.arch, config.in_chans, img_size=config.augment.global_size,
                           drop_path_rate=drop_path_rate, checkpoint=config.init_checkpoint)


def build_models(config: PretrainConfig, d: Dist) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(student, teacher, student without DDP), on the device, teacher initialized from the student."""

    def wrapper(backbone: Backbone) -> MultiCropWrapper:
        head = DINOHead(backbone.embed_dim, config.out_dim, use_bn=config.use_bn_in_head,
                        norm_last_layer=config.norm_last_layer, hidden_dim=config.head_hidden_dim,
                        bottleneck_dim=config.head_bottleneck_dim)
        return MultiCropWrapper(backbone, head)

    student = wrapper(initial_backbone(config, config.drop_path_rate))
    teacher = wrapper(create_backbone(config.arch, config.in_chans, img_size=config.augment.global_size,
                                      checkpoint=config.init_checkpoint))
    # SyncBatchNorm is CUDA-only: on CPU (gloo) each rank keeps its own batch statistics
    if d.world > 1 and d.device.type == "cuda" and (config.use_bn_in_head or ARCHITECTURES[config.arch].kind == "resnet"):
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    memory_format = torch.channels_last if d.device.type == "cuda" else torch.preserve_format
    student, teacher = student.to(d.device, memory_format=memory_format), teacher.to(d.device, memory_format=memory_format)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    student_plain = student
    if d.world > 1:
        student = nn.parallel.DistributedDataParallel(student, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    return student, teacher, student_plain


def build_optimizer(config: PretrainConfig, student: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(student)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, fused=device.type == "cuda")
    if config.optimizer == "lars":
        return LARS(groups, lr=0.0)
    return torch.optim.SGD(groups, lr=0.0, momentum=0.9)


@dataclass
class Training:
    """Everything one DINO step touches."""
    config: PretrainConfig
    device: torch.device
    student: nn.Module            # DDP-wrapped when distributed
    student_plain: nn.Module
    teacher: nn.Module
    loss: DINOLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    forward_student: nn.Module
    forward_teacher: nn.Module


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX): there oneDNN's bf16 kernels are faster than
    fp32, elsewhere they are emulated. torch has no public probe; a torch without these private ones reads as no."""
    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(probe is not None and probe() for probe in probes)


def auto_precision(device: torch.device, arch: str) -> str:
    """``precision: auto``: bf16 autocast on CUDA, and for ResNets on a CPU that computes bf16 natively (AVX-512 BF16
    or AMX: the ResNet-18 DINO step 1.4-1.7x fp32's, trained level with it on three paired splits; the ViT-Ti/16
    step only 0.9-1.2x); fp32 elsewhere. docs/experiments.md, sections 25, 30 and 31."""
    if device.type == "cuda":
        return "bf16"
    return "bf16" if ARCHITECTURES[arch].kind == "resnet" and native_bf16_cpu() else "fp32"


def run_precision(config: PretrainConfig, device: torch.device) -> str:
    """The precision a run of ``config`` on ``device`` trains at: the config's, ``auto`` resolved by
    ``auto_precision``."""
    return config.precision if config.precision != "auto" else auto_precision(device, config.arch)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}   # autocast's dtype per precision (fp32: no autocast)


def build_training(config: PretrainConfig, d: Dist, precision: str) -> Training:
    student, teacher, student_plain = build_models(config, d)
    return Training(
        config=config, device=d.device, student=student, student_plain=student_plain, teacher=teacher,
        loss=DINOLoss(config.out_dim, 2, config.student_temp, config.center_momentum).to(d.device),
        optimizer=build_optimizer(config, student, d.device),
        scaler=torch.amp.GradScaler(d.device.type, enabled=precision == "fp16"),
        amp_dtype=AMP_DTYPES.get(precision),
        forward_student=torch.compile(student) if config.compile else student,
        forward_teacher=torch.compile(teacher) if config.compile else teacher)


def dino_step(t: Training, batch: list[torch.Tensor], *, lr: float, weight_decay: float, momentum: float,
              teacher_temp: float, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
    """One DINO step on a multi-crop batch (globals first): schedules, forward, loss, update, EMA."""
    config = t.config
    for i, group in enumerate(t.optimizer.param_groups):
        group["lr"] = lr
        if i == 0:
            group["weight_decay"] = weight_decay
    batch = [c.to(t.device, non_blocking=True) for c in batch]
    if t.device.type == "cuda":
        batch = [c.contiguous(memory_format=torch.channels_last) for c in batch]
    with torch.autocast(t.device.type, dtype=t.amp_dtype or torch.float32, enabled=t.amp_dtype is not None):
        with torch.no_grad():
            teacher_out = t.forward_teacher(batch[:2])
        student_out = t.forward_student(batch)
        loss, stats = t.loss(student_out, teacher_out, float(teacher_temp), len(batch))
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"the DINO loss is {loss.item()}: stopping")
    t.optimizer.zero_grad(set_to_none=True)
    t.scaler.scale(loss).backward()
    if config.clip_grad:
        t.scaler.unscale_(t.optimizer)
        clip_gradients(t.student_plain, config.clip_grad)
    cancel_last_layer_gradients(epoch, t.student_plain, config.freeze_last_layer)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    ema_update(t.teacher, t.student_plain, float(momentum))
    return loss, stats


# --- the loop -------------------------------------------------------------------------------------------

def train(job_dir: Path) -> dict:
    """Run (or resume) the pretraining described by ``job_dir/job.json``; returns the result summary."""
    job_dir = Path(job_dir)
    job, config, selection = read_job(job_dir)
    d = init_distributed(job["device"])
    ckpt_dir = job_dir / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    logger = None
    if d.main and job.get("run_id"):
        from tasks.release.registry import RunLogger
        logger = RunLogger(job["run_id"])

    precision = run_precision(config, d.device)
    if d.main:
        log.info("precision %s (config: %s)", precision, config.precision)
    steps_per_epoch = config.epoch_steps(len(selection.keys), d.world)
    total_steps = config.epochs * steps_per_epoch
    total_batch = config.batch_size * d.world

    models = build_training(config, d, precision)
    student_plain, teacher, dino_loss = models.student_plain, models.teacher, models.loss
    optimizer, scaler = models.optimizer, models.scaler
    schedules = build_schedules(config, steps_per_epoch, total_batch)
    knn = torch.load(job_dir / "knn.pt", weights_only=False) if d.main and (job_dir / "knn.pt").is_file() else None

    step, knn_history = 0, []
    history_path = job_dir / "history.jsonl"
    if job.get("resume") and (ckpt_dir / CHECKPOINT).is_file():
        state = load_checkpoint(ckpt_dir / CHECKPOINT)
        student_plain.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        dino_loss.load_state_dict(state["loss"])
        schedules = state["schedules"]
        step, knn_history = state["step"], state.get("knn", [])
        _set_rng_state(state["rng"])
        if d.main and history_path.is_file():   # drop what a killed run logged after its last checkpoint
            kept = [line for line in history_path.read_text().splitlines() if json.loads(line)["step"] <= step]
            history_path.write_text("".join(line + "\n" for line in kept))
        log.info("resumed at step %d of %d", step, total_steps)
    elif d.main:
        history_path.write_text("")

    def checkpoint(final: bool = False) -> Path:
        path = ckpt_dir / CHECKPOINT
        save_atomic({"student": student_plain.state_dict(), "teacher": teacher.state_dict(),
                     "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                     "loss": dino_loss.state_dict(), "schedules": schedules, "step": step, "epoch": step // steps_per_epoch,
                     "config": config.to_dict(), "knn": knn_history, "rng": _rng_state(), "final": final}, path)
        if logger is not None:
            logger.log_artifact(path, f"checkpoints/step-{step:07d}")
        return path

    def score_knn(epoch: int) -> dict[str, float]:
        """Run the kNN monitor on the teacher (final pool and layout readouts) and the student (final pool) now;
        record them (the teacher's per-query hits too) in the history; return the accuracies."""
        hits = knn_monitor_readouts(teacher.backbone, knn, d.device)
        accuracy = float(hits["pool"].float().mean())
        student_accuracy = (accuracy if step == 0 else      # at step 0 the teacher is a copy of the student
                            float(knn_monitor(student_plain.backbone, knn, d.device).float().mean()))
        scores = {"knn_accuracy": accuracy, "knn_accuracy_student": student_accuracy,
                  "knn_accuracy_layout": float(hits["layout"].float().mean())}
        knn_history.append({"step": step, "epoch": epoch, **scores, **recorded_hits(hits)})
        return scores

    if d.main and knn is not None and step == 0:
        scores = score_knn(0)
        if logger:
            logger.log_metrics({**scores, "knn_accuracy_random_init": scores["knn_accuracy"],
                                "knn_accuracy_layout_random_init": scores["knn_accuracy_layout"]}, step=0)
        log.info("kNN accuracy at random init: %.3f (layout readout %.3f)", scores["knn_accuracy"],
                 scores["knn_accuracy_layout"])

    transform = XrayMultiCrop(config.augment)
    alarm = CollapseMonitor(config.collapse_min_kl, config.collapse_min_entropy, config.collapse_patience,
                            config.collapse_min_groups, config.out_dim)
    status, window_start, window_images = "finished", time.perf_counter(), 0
    draws = CropDraws()                  # the crop boxes this rank's loader drew in this run (resumed: since)
    window_draws = CropDraws()           # ... up to the start of the current log window

    def run_facts() -> dict:
        return {**teacher_make_up(schedules["momentum"]), "crop_rejection_rate": draws.rejection_rate,
                "precision": precision}

    models.student.train()
    teacher.train()
    start_epoch = step // steps_per_epoch
    # one loader for every epoch left: its workers start once per run, not once per epoch
    batches = train_loader(selection, transform, config.batch_size, steps_per_epoch, start_epoch, seed=config.seed,
                           rank=d.rank, workers=config.workers, skip=step - start_epoch * steps_per_epoch,
                           shuffle_buffer=config.shuffle_buffer, draws=draws, epochs=config.epochs - start_epoch)
    try:
        for epoch in range(start_epoch, config.epochs):
            for batch in itertools.islice(batches, (epoch + 1) * steps_per_epoch - step):
                it = step
                loss, stats = dino_step(models, batch, lr=schedules["lr"][it], weight_decay=schedules["wd"][it],
                                        momentum=schedules["momentum"][it],
                                        teacher_temp=schedules["teacher_temp"][epoch], epoch=epoch)
                step = it + 1
                window_images += batch[0].shape[0] * d.world

                if d.main:
                    record = {"step": step, "epoch": epoch, "loss": loss.item(), "lr": float(schedules["lr"][it]),
                              "weight_decay": float(schedules["wd"][it]), "momentum": float(schedules["momentum"][it]),
                              "teacher_temp": float(schedules["teacher_temp"][epoch]), **stats}
                    with open(history_path, "a") as fh:
                        fh.write(json.dumps(record) + "\n")
                    if step % config.log_every == 0 or step == total_steps:
                        elapsed = time.perf_counter() - window_start
                        record["images_per_s"] = window_images / elapsed if elapsed > 0 else 0.0
                        record["crop_rejection_rate"] = draws.since(window_draws).rejection_rate
                        window_start, window_images, window_draws = time.perf_counter(), 0, dataclasses.replace(draws)
                        if logger:
                            logger.log_metrics({k: v for k, v in record.items() if k not in ("step", "epoch")}, step)
                        log.info("step %d/%d  loss %.4f  kl %.4f  entropy %.3f  groups %.1f  %.1f img/s", step,
                                 total_steps, record["loss"], stats["kl"], stats["teacher_entropy"],
                                 math.exp(stats["teacher_information"]), record["images_per_s"])
                if alarm.update(step, stats) and d.main:
                    log.warning("collapse alarm: %s", alarm.message)
                    if logger:
                        logger.set_tag("collapse_alarm", alarm.message)
                if config.stop_on_collapse and _any_rank(alarm.fired_at is not None, d):
                    raise TrainingCollapsed(f"training collapsed (alarm at step {alarm.fired_at})")
                # the epoch's kNN before its checkpoint: a checkpoint at an epoch's end holds the epoch's score
                if (step % steps_per_epoch == 0 and d.main and knn is not None and config.knn_every
                        and (epoch + 1) % config.knn_every == 0):
                    scores = score_knn(epoch + 1)
                    if logger:
                        logger.log_metrics(scores, step=step)
                    log.info("epoch %d: kNN accuracy %.3f (student %.3f, layout readout %.3f)", epoch + 1,
                             scores["knn_accuracy"], scores["knn_accuracy_student"], scores["knn_accuracy_layout"])
                if step % config.checkpoint_every == 0 and d.main:
                    checkpoint()
                if job.get("stop_after") and step >= job["stop_after"]:
                    status = "stopped"
                    return _finish(job_dir, d, status, step, total_steps, knn_history, alarm, knn, run_facts())
        if d.main:
            checkpoint(final=True)
    except TrainingCollapsed:
        status = "collapsed"
        if d.main:
            checkpoint()
    finally:
        batches.close()      # stops the loader's workers, also when the run ends early
    return _finish(job_dir, d, status, step, total_steps, knn_history, alarm, knn, run_facts())


def _finish(job_dir: Path, d: Dist, status: str, step: int, total_steps: int, knn_history: list,
            alarm: CollapseMonitor, knn: dict | None, facts: dict) -> dict:
    result = {"status": status, "step": step, "total_steps": total_steps, "world_size": d.world,
              "knn": [{k: v for k, v in entry.items() if not k.startswith("hits")} for entry in knn_history],
              "collapse_alarm_step": alarm.fired_at, "collapse_alarm": alarm.message, **facts}
    scored = [entry for entry in knn_history if "hits" in entry]   # checkpoints of older runs lack hits
    if knn is not None and "query_patients" in knn and len(scored) > 1 and scored[0]["epoch"] == 0:
        result["knn_margin"] = knn_margin(knn, scored[0]["hits"], scored[-1]["hits"])
        if "hits_layout" in scored[0] and "hits_layout" in scored[-1]:     # runs before the layout readout lack it
            result["knn_layout_margin"] = knn_margin(knn, scored[0]["hits_layout"], scored[-1]["hits_layout"])
            thumbnails = hits_bits(knn_thumbnail_hits(knn))
            result["knn_margin_over_thumbnails"] = {
                readout: knn_margin(knn, thumbnails, scored[-1][hits]) for readout, hits in HIT_KEYS.items()}
    if d.main:
        (job_dir / "result.json").write_text(json.dumps(result, indent=2))
    if d.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return result


def job_backbone(job_dir: Path, which: str = "teacher", state: dict | None = None) -> Backbone:
    """The final (or latest) ``which`` ("teacher" or "student") backbone of a job, on CPU, in eval mode;
    ``state``: the job's checkpoint when the caller has it loaded already."""
    _, config, _ = read_job(job_dir)
    state = state or load_checkpoint(Path(job_dir) / "checkpoints" / CHECKPOINT)
    backbone = create_backbone(config.arch, config.in_chans, img_size=config.augment.global_size)
    prefix = "backbone."
    weights = {k[len(prefix):]: v for k, v in state[which].items() if k.startswith(prefix)}
    weights = {k.replace("module.", ""): v for k, v in weights.items()}
    backbone.load_state_dict(weights)
    return backbone.eval()


def teacher_backbone(job_dir: Path) -> Backbone:
    """The final (or latest) teacher backbone of a job, on CPU, in eval mode: what is registered."""
    return job_backbone(job_dir)


def main(argv: list[str] | None = None) -> int:
    """``python -m tasks.pretrain.main_dino JOB_DIR``: one rank of a (torchrun) pretraining job."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tasks.pretrain.main_dino JOB_DIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank" + os.environ.get("RANK", "0") + " %(message)s")
    result = train(Path(args[0]))
    return 0 if result["status"] in ("finished", "stopped") else 1


if __name__ == "__main__":
    sys.exit(main())
