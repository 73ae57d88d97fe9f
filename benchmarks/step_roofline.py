"""Where the DINO step's time goes on this machine, and how far the step is from the CPU's own ceiling.

    .venv/bin/python benchmarks/step_roofline.py --job HOME/pretrain/JOB                 # the job's config
    .venv/bin/python benchmarks/step_roofline.py --job HOME/pretrain/JOB --config demo-cpu-resnet18

On one in-memory multi-crop batch of the job's images (``lightly_dino.job_batch``, as the step-speed benchmark
beside lightly's uses), DAX's ``dino_step`` (fp32, as the demo runs it):
- its arithmetic, counted by torch (``torch.utils.flop_counter.FlopCounterMode``: convolutions and matrix
  products, forward and backward, teacher and student), per step and per image;
- its images/s on the process's torch threads and on one (how well the step spreads over the cores: a step
  that does not would leave room for running teacher and student side by side);
- the GFLOP/s that makes, beside a 2048 x 2048 fp32 matrix product's on the same threads (the best-shaped work
  the CPU's BLAS gets: a practical ceiling), and the images/s the step would reach at that rate;
- its self CPU time by operator group (``torch.profiler``): convolutions forward and backward, matrix products,
  normalisation, the rest.

It explains the step-speed target beside lightly's (``benchmarks/lightly_dino.py --speed``, BENCHMARKS.md): both
steps run the same backbone on the same images, so their ratio can only come from what lies outside the
backbone's arithmetic. Prints JSON; writes no section (BENCHMARKS.md quotes it with its command).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GROUPS = (    # operator-name fragments per group, first match wins; self time, so nested calls are not counted twice
    ("convolution backward", ("convolution_backward",)),
    ("convolution forward", ("convolution",)),
    ("matrix products", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "scaled_dot_product",
                         "flash_attention")),
    ("normalisation", ("batch_norm", "layer_norm")),
)


def images_per_second(run, images: int, steps: int, rounds: int = 3) -> float:
    """The median over ``rounds`` of ``steps`` calls of ``run``, after one call to warm up."""
    run()
    rates = []
    for _ in range(rounds):
        began = time.perf_counter()
        for _ in range(steps):
            run()
        rates.append(steps * images / (time.perf_counter() - began))
    return float(np.median(rates))


def gemm_gflops(size: int = 2048, repeats: int = 10, rounds: int = 3) -> float:
    """GFLOP/s of an fp32 ``size`` x ``size`` matrix product on this process's threads (median of rounds)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    rates = []
    for _ in range(rounds):
        began = time.perf_counter()
        for _ in range(repeats):
            a @ b
        rates.append(repeats * 2 * size ** 3 / (time.perf_counter() - began) / 1e9)
    return float(np.median(rates))


def time_by_group(run, steps: int) -> dict[str, float]:
    """Each operator group's share of the profiled self CPU time over ``steps`` calls of ``run``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run()
    totals = {name: 0.0 for name, _ in GROUPS} | {"the rest": 0.0}
    for event in prof.key_averages():
        group = next((name for name, fragments in GROUPS if any(f in event.key for f in fragments)), "the rest")
        totals[group] += event.self_cpu_time_total
    whole = sum(totals.values())
    return {name: round(value / whole, 3) for name, value in totals.items()}


def roofline(job_dir: Path, config_name: str | None = None, steps: int = 4) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from lightly_dino import STEP_SETTINGS, job_batch
    from tasks.pretrain.main_dino import Dist, build_training, dino_step

    config, crops = job_batch(job_dir, config_name)
    training = build_training(config, Dist(0, 1, 0, torch.device("cpu")), "fp32")

    def run() -> None:
        dino_step(training, crops, teacher_temp=config.teacher_temp, epoch=1, **STEP_SETTINGS)

    with FlopCounterMode(display=False) as counter:
        run()
    gflop = counter.get_total_flops() / 1e9
    threads = torch.get_num_threads()
    rate = images_per_second(run, config.batch_size, steps)
    gemm = gemm_gflops()
    shares = time_by_group(run, steps)
    torch.set_num_threads(1)
    one_thread = images_per_second(run, config.batch_size, max(steps // 2, 1))
    torch.set_num_threads(threads)
    step_gflops = gflop * rate / config.batch_size
    return {"arch": config.arch, "config": config_name or "the job's", "batch": config.batch_size,
            "crops": [list(c.shape[-2:]) for c in crops], "threads": threads,
            "gflop_per_step": round(gflop, 1), "gflop_per_image": round(gflop / config.batch_size, 2),
            "images_per_s": round(rate, 1), "images_per_s_one_thread": round(one_thread, 1),
            "thread_scaling": round(rate / one_thread, 2), "step_gflops": round(step_gflops, 1),
            "gemm_gflops": round(gemm, 1), "share_of_gemm": round(step_gflops / gemm, 2),
            "images_per_s_at_gemm_rate": round(rate * gemm / step_gflops, 1), "time_by_group": shares}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--job", type=Path, required=True, help="a finished dax pretrain job folder")
    parser.add_argument("--config", help="this named config on the job's images (default: the job's)")
    parser.add_argument("--steps", type=int, default=4, help="steps per timed round and in the profile")
    args = parser.parse_args()
    from tasks.home import QUIET_DEFAULTS
    for key, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(key, value)
    print(json.dumps(roofline(args.job, args.config, args.steps)))


if __name__ == "__main__":
    main()
