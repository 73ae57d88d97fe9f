"""lightly's DINO beside ours: the same budget on the same shards and patients, and the step's speed.

    .venv/bin/python benchmarks/lightly_dino.py --job HOME/pretrain/JOB            # train lightly's DINO, kNN
    .venv/bin/python benchmarks/lightly_dino.py --job HOME/pretrain/JOB --speed    # images/s of both steps

Needs the ``bench`` extra (``pip install -e '.[bench]'``: lightly). ``--job`` names a finished ``dax pretrain``
job (one with labels, so it holds ``knn.pt``): its config, its image selection and its kNN bank and
held-out queries are reused as they are.

Training (``train_lightly``): lightly's own ``DINOProjectionHead``, ``DINOLoss``, ``DINOTransform`` and
``update_momentum``, as its DINO example wires them (teacher per global view, student per view), on the
job's backbone architecture built with the job's seed (so its random init is ours: the kNN at step 0 is the
same), with the job's head sizes, crops (sizes, scales, counts), batch, steps, temperatures, optimizer,
learning-rate, weight-decay and teacher-momentum schedules, gradient clipping and precision (``auto`` resolved as
DAX's run resolves it: bf16 autocast for a ResNet on a CPU that computes bf16). What differs is what
lightly brings: its generic augmentation (on the image min-max scaled to 8 bits, the mapping evaluation
uses, normalize off since the backbone reads gray [0, 1]) and its loss and head code. The images stream
through DAX's loader (the same shards, keys and shuffling). The same kNN probe scores the teacher at
random init and after every epoch, with both of the monitor's readouts (the final pool and the layout readout,
``tasks.pretrain.monitor.knn_monitor_readouts``); each margin's interval resamples the held-out patients as ours
does.

Speed (``step_speed``): DAX's ``dino_step`` and lightly's step on the same in-memory multi-crop batch, the
same config and torch threads, alternated in one process (2 warm-up steps each, then rounds of N steps).
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dax_models.augment import _shrink, minmax, to_image_tensor
from dax_models.dino import clip_gradients, param_groups
from tasks.pretrain.main_dino import (AMP_DTYPES, PretrainConfig, build_schedules, initial_backbone, read_job,
                                      run_precision)
from tasks.pretrain.monitor import hits_bits, knn_margin, knn_monitor_readouts


class LightlyViews:
    """``train_loader``'s transform for lightly: the image shrunk to ``decode_size``, min-max scaled to an
    8-bit gray PIL image (what a generic pipeline is handed), then lightly's ``DINOTransform``."""

    def __init__(self, config: PretrainConfig) -> None:
        from lightly.transforms.dino_transform import DINOTransform

        aug = config.augment
        self.decode_size = aug.decode_size
        self.transform = DINOTransform(global_crop_size=aug.global_size, global_crop_scale=aug.global_scale,
                                       local_crop_size=aug.local_size, local_crop_scale=aug.local_scale,
                                       n_local_views=aug.local_crops, normalize=None)

    def __call__(self, image, linear: bool = True) -> list[torch.Tensor]:
        from PIL import Image

        gray = minmax(_shrink(to_image_tensor(image), self.decode_size))
        pil = Image.fromarray((gray.numpy() * 255.0 + 0.5).astype(np.uint8), mode="L")
        return [view.float() for view in self.transform(pil)]


class LightlyDINO(torch.nn.Module):
    """lightly's DINO example: student and teacher backbones with ``DINOProjectionHead``s."""

    def __init__(self, config: PretrainConfig) -> None:
        from lightly.models.modules import DINOProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        self.student_backbone = initial_backbone(config, config.drop_path_rate)   # DAX's random init

        def head(freeze: int) -> torch.nn.Module:
            return DINOProjectionHead(self.student_backbone.embed_dim, config.head_hidden_dim,
                                      config.head_bottleneck_dim, config.out_dim, batch_norm=config.use_bn_in_head,
                                      freeze_last_layer=freeze, norm_last_layer=config.norm_last_layer)

        self.student_head = head(config.freeze_last_layer)
        self.teacher_backbone = copy.deepcopy(self.student_backbone)
        self.teacher_head = head(-1)
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student_head(self.student_backbone(x).flatten(start_dim=1))

    def forward_teacher(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher_head(self.teacher_backbone(x).flatten(start_dim=1))


class LightlyTraining:
    """lightly's model, loss and an optimizer over the student as DAX's (same parameter groups): AdamW, or
    lightly's own LARS (momentum 0.9, as DINO's) for LARS configs such as ``demo-cpu-resnet18``."""

    def __init__(self, config: PretrainConfig) -> None:
        from lightly.loss import DINOLoss

        self.config = config
        self.model = LightlyDINO(config)
        self.criterion = DINOLoss(output_dim=config.out_dim, warmup_teacher_temp=config.warmup_teacher_temp,
                                  teacher_temp=config.teacher_temp,
                                  warmup_teacher_temp_epochs=config.warmup_teacher_temp_epochs,
                                  student_temp=config.student_temp, center_momentum=config.center_momentum)
        student = torch.nn.ModuleDict({"backbone": self.model.student_backbone, "head": self.model.student_head})
        self.student = student
        if config.optimizer == "lars":
            from lightly.utils.lars import LARS

            self.optimizer = LARS(param_groups(student), lr=0.0, momentum=0.9)
        else:
            self.optimizer = torch.optim.AdamW(param_groups(student), lr=0.0)

    def step(self, views: list[torch.Tensor], *, lr: float, weight_decay: float, momentum: float,
             epoch: int, amp: torch.dtype | None = None) -> float:
        """One step of lightly's DINO example (momentum update first, as there), DAX's schedules and clipping;
        the forward passes and the loss under ``amp`` autocast on the CPU where given (as DAX's step runs)."""
        from lightly.models.utils import update_momentum

        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = lr
            if i == 0:
                group["weight_decay"] = weight_decay
        model = self.model
        update_momentum(model.student_backbone, model.teacher_backbone, m=momentum)
        update_momentum(model.student_head, model.teacher_head, m=momentum)
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            teacher_out = [model.forward_teacher(view) for view in views[:2]]
            student_out = [model.forward(view) for view in views]
            loss = self.criterion(teacher_out, student_out, epoch=epoch)
        loss.backward()
        if self.config.clip_grad:
            clip_gradients(self.student, self.config.clip_grad)
        model.student_head.cancel_last_layer_gradients(current_epoch=epoch)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return float(loss.detach())


def train_lightly(job_dir: Path, out: Path | None = None) -> dict:
    """lightly's DINO on a DAX job's images, config and kNN probe; the result (also ``out/lightly.json``)."""
    from tasks.pretrain.data import train_loader

    job_dir = Path(job_dir)
    _, config, selection = read_job(job_dir)
    if config.optimizer not in ("adamw", "lars"):
        raise SystemExit(f"this comparison runs AdamW and LARS configs only, not {config.optimizer}")
    knn = torch.load(job_dir / "knn.pt", weights_only=False)
    device = torch.device("cpu")
    precision = run_precision(config, device)      # as DAX's run of this job resolved it
    amp = AMP_DTYPES.get(precision)
    steps_per_epoch = config.epoch_steps(len(selection.keys))
    schedules = build_schedules(config, steps_per_epoch, config.batch_size)
    training = LightlyTraining(config)
    model = training.model
    views = LightlyViews(config)

    def score() -> dict[str, torch.Tensor]:
        return knn_monitor_readouts(model.teacher_backbone, knn, device)

    def accuracies(hits: dict[str, torch.Tensor]) -> dict[str, float]:
        return {"knn_accuracy": float(hits["pool"].float().mean()),
                "knn_accuracy_layout": float(hits["layout"].float().mean())}

    random_hits = score()
    history = [{"epoch": 0, **accuracies(random_hits)}]
    print(f"lightly: kNN at random init {history[0]['knn_accuracy']:.3f} "
          f"(layout readout {history[0]['knn_accuracy_layout']:.3f})", flush=True)
    began, step, hits = time.perf_counter(), 0, random_hits
    model.train()
    for epoch in range(config.epochs):
        for batch in train_loader(selection, views, config.batch_size, steps_per_epoch, epoch, seed=config.seed,
                                  workers=config.workers, shuffle_buffer=config.shuffle_buffer):
            loss = training.step(batch, lr=schedules["lr"][step], weight_decay=schedules["wd"][step],
                                 momentum=schedules["momentum"][step], epoch=epoch, amp=amp)
            step += 1
            if not np.isfinite(loss):
                raise FloatingPointError(f"lightly's DINO loss is {loss} at step {step}")
        hits = score()
        history.append({"epoch": epoch + 1, **accuracies(hits), "loss": loss})
        print(f"lightly: epoch {epoch + 1}: kNN {history[-1]['knn_accuracy']:.3f} (layout readout "
              f"{history[-1]['knn_accuracy_layout']:.3f}, loss {loss:.3f})", flush=True)
    result = {"steps": step, "seconds": time.perf_counter() - began, "precision": precision, "knn": history,
              "knn_margin": knn_margin(knn, hits_bits(random_hits["pool"]), hits_bits(hits["pool"])),
              "knn_layout_margin": knn_margin(knn, hits_bits(random_hits["layout"]), hits_bits(hits["layout"])),
              "final_hits": hits_bits(hits["pool"]), "final_hits_layout": hits_bits(hits["layout"])}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "lightly.json").write_text(json.dumps(result, indent=2))
    return result


STEP_SETTINGS = {"lr": 1e-4, "weight_decay": 0.04, "momentum": 0.996}   # the schedules' values of a timed step


def job_batch(job_dir: Path, config_name: str | None = None) -> tuple[PretrainConfig, list[torch.Tensor]]:
    """The job's config (or the named one) and the first multi-crop batch its loader makes of the job's images."""
    from dax_models.augment import XrayMultiCrop
    from tasks.pretrain.data import train_loader
    from tasks.pretrain.main_dino import load_config

    _, config, selection = read_job(Path(job_dir))
    if config_name is not None:
        config = load_config(config_name)
    crops = next(iter(train_loader(selection, XrayMultiCrop(config.augment), config.batch_size, 1, epoch=0,
                                   workers=0)))
    return config, crops


def step_speed(job_dir: Path, steps: int = 8, rounds: int = 3, device: str = "cpu", precision: str = "fp32",
               config_name: str | None = None) -> dict:
    """Images/s of DAX's DINO step and lightly's on one in-memory batch of the job's config (or of
    ``config_name``, on the job's images), alternated; on ``device``, both under the same autocast."""
    from tasks.pretrain.main_dino import Dist, build_training, dino_step

    config, crops = job_batch(job_dir, config_name)
    where = torch.device(device)
    ours = build_training(config, Dist(0, 1, 0, where), precision)
    theirs = LightlyTraining(config)
    theirs.model.to(where)
    theirs.criterion.to(where)
    if config.optimizer == "adamw":      # the same fused AdamW as ours on CUDA
        theirs.optimizer = torch.optim.AdamW(param_groups(theirs.student), lr=0.0,
                                             **({"fused": True} if where.type == "cuda" else {}))
    amp = AMP_DTYPES.get(precision)

    def run_ours() -> None:
        dino_step(ours, crops, teacher_temp=config.teacher_temp, epoch=1, **STEP_SETTINGS)

    def run_theirs() -> None:    # the batch moved per step, as a loader's would be
        views = [c.to(where, non_blocking=True) for c in crops]
        with torch.autocast(where.type, dtype=amp or torch.float32, enabled=amp is not None):
            theirs.step(views, epoch=1, **STEP_SETTINGS)

    def sync() -> None:
        if where.type == "cuda":
            torch.cuda.synchronize()

    rates: dict[str, list[float]] = {"dax": [], "lightly": []}
    for run in (run_ours, run_theirs, run_ours, run_theirs):      # warm-up
        run()
    for _ in range(rounds):
        for name, run in (("dax", run_ours), ("lightly", run_theirs)):
            sync()
            began = time.perf_counter()
            for _ in range(steps):
                run()
            sync()
            rates[name].append(steps * config.batch_size / (time.perf_counter() - began))
    dax, lightly = float(np.median(rates["dax"])), float(np.median(rates["lightly"]))
    return {"dax": dax, "lightly": lightly, "ratio": dax / lightly, "threads": torch.get_num_threads(),
            "batch": config.batch_size, "arch": config.arch, "rounds": rates, "device": device,
            "device_name": torch.cuda.get_device_name(where) if where.type == "cuda" else "cpu",
            "precision": precision, "config": config_name or "the job's",
            "peak_gpu_mb": torch.cuda.max_memory_allocated(where) / 2 ** 20 if where.type == "cuda" else None}


def write_speed_section(speed: dict, command: str) -> None:
    from benchmarks_md import write_section

    rounds = ", ".join(f"{d:.1f} / {t:.1f}" for d, t in zip(speed["rounds"]["dax"], speed["rounds"]["lightly"]))
    body = (f"Measured {time.strftime('%Y-%m-%d')} on this machine: {speed['arch']}, batch {speed['batch']}, "
            f"{speed['threads']} torch threads, fp32, the job's config and one in-memory multi-crop batch.\n"
            f"Command: `{command}`\n\n"
            "| DINO step | images/s (median of rounds) |\n|---|---|\n"
            f"| DAX (`dino_step`) | {speed['dax']:.1f} |\n| lightly 1.6 (its DINO example's step) | "
            f"{speed['lightly']:.1f} |\n| DAX / lightly | {speed['ratio']:.2f}x (target >= 1.3x) |\n\n"
            f"Rounds, DAX / lightly images/s: {rounds}.")
    write_section("lightly-step", "The DINO step beside lightly's (`benchmarks/lightly_dino.py --speed`)", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--job", type=Path, required=True, help="a finished dax pretrain job folder (with knn.pt)")
    parser.add_argument("--speed", action="store_true", help="measure the two steps' images/s instead of training")
    parser.add_argument("--out", type=Path, help="where lightly.json goes (default: the job folder)")
    parser.add_argument("--device", default="cpu", help="--speed on this device (cuda: JSON only, no section)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="--speed's autocast")
    parser.add_argument("--config", help="--speed with this named config on the job's images")
    args = parser.parse_args()
    import os

    from tasks.home import QUIET_DEFAULTS
    for key, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if args.speed:
        speed = step_speed(args.job, device=args.device, precision=args.precision, config_name=args.config)
        print(json.dumps(speed))
        if args.device == "cpu" and args.precision == "fp32" and args.config is None:
            write_speed_section(speed, shlex.join([".venv/bin/python", "benchmarks/lightly_dino.py", *sys.argv[1:]]))
    else:
        print(json.dumps(train_lightly(args.job, args.out or args.job)["knn_margin"]))


if __name__ == "__main__":
    main()
