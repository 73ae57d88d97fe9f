"""Two finished pretraining jobs of one home, paired on the kNN probe's held-out queries.

    .venv/bin/python benchmarks/knn_paired.py HOME/pretrain/JOB_A HOME/pretrain/JOB_B

A variant pretrained on a kept home beside its default (`dax pretrain --config C --home HOME --labels L --set
KEY=VALUE`: the same images, held-out queries and seed) differs from it by the variant alone, so the two
final teachers are compared query by query: B minus A with a 95 % interval from resampling the held-out
patients (`tasks.pretrain.monitor.knn_margin`), each against the same kNN on 16 x 16 thumbnails, and each
one's final student against its teacher (the student recomputed from the checkpoint; the teacher's hits are
checked against the run's own). Where both runs recorded the monitor's layout readout (runs since 2026-12-06),
the same for their final teachers' layout hits, read from the checkpoints. `benchmarks/knn_splits.py --variant`
does the same on fresh splits; this script is for homes that already hold both jobs (docs/experiments.md,
sections 22, 25 and 28). Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.pretrain.main_dino import CHECKPOINT, job_backbone, load_checkpoint
from tasks.pretrain.monitor import (hits_bits, hits_rate, knn_margin, knn_monitor, knn_thumbnail_hits,
                                    unreproduced_readouts)

PAIRED_KEYS = ("queries", "query_labels", "query_patients", "bank", "bank_labels")


def paired(job_a: Path, job_b: Path) -> dict:
    probes = [torch.load(job / "knn.pt", weights_only=False) for job in (job_a, job_b)]
    if not all(torch.equal(probes[0][key], probes[1][key]) for key in PAIRED_KEYS):
        sys.exit("the two jobs' kNN probes differ (another home, selection or seed): not paired")
    knn = probes[0]
    thumbnails = hits_bits(knn_thumbnail_hits(knn))
    jobs, teachers, layouts = {}, {}, {}
    for name, job in (("a", job_a), ("b", job_b)):
        state = load_checkpoint(job / "checkpoints" / CHECKPOINT)
        hits = {who: hits_bits(knn_monitor(job_backbone(job, who, state), knn, torch.device("cpu")))
                for who in ("teacher", "student")}
        if unreproduced_readouts(state["knn"][-1], {"pool": hits["teacher"]}):
            sys.exit(f"{job.name}: the final teacher's kNN hits do not reproduce the run's")
        teachers[name] = hits["teacher"]
        jobs[name] = {"job": job.name, "by_epoch": [round(k["knn_accuracy"], 3) for k in state["knn"]],
                      "teacher": hits_rate(hits["teacher"]), "student": hits_rate(hits["student"]),
                      "minus_thumbnails": knn_margin(knn, thumbnails, hits["teacher"]),
                      "student_minus_teacher": knn_margin(knn, hits["teacher"], hits["student"])}
        if "hits_layout" in state["knn"][-1]:
            layouts[name] = state["knn"][-1]["hits_layout"]
            jobs[name].update(layout=hits_rate(layouts[name]),
                              layout_minus_thumbnails=knn_margin(knn, thumbnails, layouts[name]))
    b_minus_a = knn_margin(knn, teachers["a"], teachers["b"])
    result = {"thumbnails": hits_rate(thumbnails), "a": jobs["a"], "b": jobs["b"], "b_minus_a": b_minus_a,
              "verdict": verdict(b_minus_a), "held_out": len(thumbnails)}
    if len(layouts) == 2:
        result["layout_b_minus_a"] = knn_margin(knn, layouts["a"], layouts["b"])
        result["layout_verdict"] = verdict(result["layout_b_minus_a"])
    return result


def verdict(b_minus_a: dict) -> str:
    return ("B clearly ahead" if b_minus_a["low"] > 0 else "A clearly ahead" if b_minus_a["high"] < 0
            else "not clearly apart")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("job_a", type=Path, help="the baseline job (HOME/pretrain/JOB)")
    parser.add_argument("job_b", type=Path, help="the variant job on the same home")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps(paired(args.job_a, args.job_b), indent=1))


if __name__ == "__main__":
    main()
