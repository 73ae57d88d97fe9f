"""Finished pretraining jobs read by the kNN monitor with the probe's images at other sizes.

    .venv/bin/python benchmarks/knn_resolution.py --labels CORPUS/labels.parquet HOME/pretrain/JOB [...]
        [--sizes 96 112 128 144 160] [--out OUT.json]

The kNN monitor renders its bank and held-out queries as the whole image at ``knn_size`` px (96 in the demo
configs), while DINO's global crops at the same 96 px are random-resized from 0.14-1 of the image, so the
network learns objects magnified by 1/sqrt(scale) (median 1.32x). A network trained on random-resized crops
reads best at a test size somewhat larger than its training size (Touvron et al. 2019, "Fixing the train-test
resolution discrepancy"). Here the same bank and query images (the same keys, rebuilt from the home's shards by
``tasks.pretrain.steps.build_knn_probe``; at the job's own ``knn_size`` checked equal to its ``knn.pt``, and
both readouts there against the run's own hits at step 0 and at the end) are rendered at each size and read
by the monitor's two readouts (``knn_monitor_readouts``: the final pool, the layout readout) for the run's seeded
random init and its final teacher. Per size and readout: the accuracies, trained minus random init at the same
size, trained minus the job's 16 x 16 thumbnails (of its ``knn.pt``, the registered figure) and trained at this
size minus trained at ``knn_size``, each with the 95 % interval over the held-out patients (``knn_margin``). A
run's final pool must be reproduced at its own size, its layout readout where the run recorded one.
docs/experiments.md, section 29. Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.ingest.labels import load_labels
from tasks.pretrain.data import select_images
from tasks.pretrain.main_dino import (CHECKPOINT, PretrainConfig, initial_backbone, job_backbone, load_checkpoint,
                                      read_job)
from tasks.pretrain.monitor import (hits_bits, hits_rate, knn_margin, knn_monitor_readouts, knn_thumbnail_hits,
                                    margin_brief, unreproduced_readouts)
from tasks.pretrain.steps import build_knn_probe, knn_probe_rows

CPU = torch.device("cpu")
PROBE_KEYS = ("bank", "bank_labels", "queries", "query_labels", "query_patients")


def probe_rows(job: Path, labels: Path, where: str, config: PretrainConfig) -> tuple[list[dict], list[dict]]:
    """The catalog rows of the job's kNN bank and queries, chosen as ``prepare_job`` chose them."""
    home = job.parents[1]
    chosen = set(select_images(home, where).keys)
    rows = [r for r in load_labels(home, labels, ("region",)).to_pylist() if r["key"] in chosen]
    _, bank_rows, query_rows = knn_probe_rows(rows, config)
    return bank_rows, query_rows


def job_sizes(job: Path, labels: Path, sizes: list[int]) -> dict:
    meta, config, _ = read_job(job)
    bank_rows, query_rows = probe_rows(job, labels, meta["where"], config)
    stored = torch.load(job / "knn.pt", weights_only=False)
    state = load_checkpoint(job / "checkpoints" / CHECKPOINT)
    backbones = {"random init": initial_backbone(config), "trained": job_backbone(job, "teacher", state)}
    hits: dict[int, dict[str, dict[str, str]]] = {}
    for size in sorted(set(sizes) | {config.knn_size}):
        probe = build_knn_probe(Path(meta["shard_dir"]), bank_rows, query_rows, size)
        if size == config.knn_size and not all(torch.equal(probe[k], stored[k]) for k in PROBE_KEYS):
            sys.exit(f"{job.name}: the probe rebuilt at {size} px differs from the job's knn.pt")
        hits[size] = {who: {name: hits_bits(h) for name, h in knn_monitor_readouts(b, probe, CPU).items()}
                      for who, b in backbones.items()}
    for who, entry in (("random init", state["knn"][0]), ("trained", state["knn"][-1])):
        if differ := unreproduced_readouts(entry, hits[config.knn_size][who]):
            sys.exit(f"{job.name}: the {who} {' and '.join(differ)} readout at {config.knn_size} px does not "
                     "reproduce the run's kNN hits")
    thumbnails = hits_bits(knn_thumbnail_hits(stored))
    base = hits[config.knn_size]["trained"]

    def row(size: int, readout: str) -> dict:
        random, trained = hits[size]["random init"][readout], hits[size]["trained"][readout]
        margins = {"trained minus random init": knn_margin(stored, random, trained),
                   "trained minus thumbnails": knn_margin(stored, thumbnails, trained),
                   f"trained minus trained at {config.knn_size} px": knn_margin(stored, base[readout], trained)}
        return {"random init": hits_rate(random), "trained": hits_rate(trained),
                **{name: {**m, "brief": margin_brief(m)} for name, m in margins.items()}}

    return {"job": str(job), "knn_size": config.knn_size, "held_out": len(thumbnails),
            "thumbnails": hits_rate(thumbnails),
            "sizes": {size: {readout: row(size, readout) for readout in ("pool", "layout")} for size in hits}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("jobs", nargs="+", type=Path)
    parser.add_argument("--labels", type=Path, required=True, help="the corpus' labels.parquet")
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 112, 128, 144, 160])
    parser.add_argument("--out", type=Path, help="also write the JSON here (after each job)")
    args = parser.parse_args(argv)
    results = []
    for job in args.jobs:
        results.append(job_sizes(job, args.labels, args.sizes))
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))
        print(f"{job.name}: thumbnails {results[-1]['thumbnails']:.3f}", file=sys.stderr)
        for size, readouts in results[-1]["sizes"].items():
            print("  " + f"{size} px: " + "; ".join(
                f"{name} {r['random init']:.3f} -> {r['trained']:.3f}, over thumbnails "
                f"{r['trained minus thumbnails']['brief']}" for name, r in readouts.items()), file=sys.stderr)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
