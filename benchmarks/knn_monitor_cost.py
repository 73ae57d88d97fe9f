"""What the kNN monitor's second readout costs: the final pool alone against both readouts, on a finished job.

    .venv/bin/python benchmarks/knn_monitor_cost.py HOME/pretrain/JOB [--repeats 5] [--threads 2]

The monitor used to read the teacher's final pool only (`tasks.pretrain.monitor.knn_monitor`: one pass over the
kNN bank and one over the held-out queries, then the kNN); it now also reads the last feature map pooled to
3 x 3 (`knn_monitor_readouts`: the same two passes, two kNNs). Both are timed here alternately, in one process,
on the job's own bank and queries with its final teacher; the difference times the times a run scores the
teacher (step 0 and each monitored epoch) is what a run pays for it. docs/experiments.md, section 27. Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.pretrain.main_dino import job_backbone
from tasks.pretrain.monitor import knn_monitor, knn_monitor_readouts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("job", type=Path, help="a finished job (HOME/pretrain/JOB)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    knn = torch.load(args.job / "knn.pt", weights_only=False)
    teacher, cpu = job_backbone(args.job), torch.device("cpu")
    ways = {"final pool (before)": lambda: knn_monitor(teacher, knn, cpu),
            "final pool and layout (now)": lambda: knn_monitor_readouts(teacher, knn, cpu)}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, way in ways.items():        # alternated, so a slower stretch of the machine hits both
            began = time.perf_counter()
            way()
            seconds[name].append(time.perf_counter() - began)
    scored = len(json.loads((args.job / "result.json").read_text())["knn"])     # step 0 and each monitored epoch
    median = {name: statistics.median(times) for name, times in seconds.items()}
    before, now = median.values()
    print(json.dumps({"job": str(args.job), "bank": len(knn["bank"]), "queries": len(knn["queries"]),
                      "threads": args.threads, "repeats": args.repeats,
                      "median_s": {name: round(s, 2) for name, s in median.items()},
                      "ratio": round(now / before, 2), "times_scored_per_run": scored,
                      "added_s_per_run": round((now - before) * scored, 1)}, indent=1))


if __name__ == "__main__":
    main()
