"""Finished pretraining jobs read by the kNN probe in ways that keep the image's layout.

    .venv/bin/python benchmarks/knn_readouts.py HOME/pretrain/JOB [HOME/pretrain/JOB ...]

The kNN monitor's first readout is the backbone's final pool (`tasks.pretrain.monitor.knn_monitor`), which keeps
no trace of where things are; the 16 x 16 thumbnails it is compared with keep nothing else. Here the same kNN, on
the same bank and held-out queries, also reads the backbone's last two feature maps
(`dax_models.backbones.extract`'s ``maps``, levels 3 and 4) average-pooled to a 2 x 2 or 3 x 3 grid, each cell
L2-normalised, concatenated: for the run's random init (seeded as the run's) and its final teacher, each
readout's trained minus random init and trained minus thumbnails with the 95 % interval over the held-out
patients (`knn_margin`). The final pool is checked against the run's own kNN hits at step 0 and at the end, and
level 4's 3 x 3 grid against the monitor's layout readout (``monitor.LAYOUT_READOUT``, which it became after
this script's tests) in runs that recorded it. docs/experiments.md, sections 26-27. Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dax_models.backbones import extract
from tasks.pretrain.main_dino import CHECKPOINT, initial_backbone, job_backbone, load_checkpoint, read_job
from tasks.pretrain.monitor import (LAYOUT_READOUT, grid_cells, hits_bits, hits_rate, knn_hits, knn_margin,
                                    knn_thumbnail_hits, margin_brief, unreproduced_readouts)

GRIDS = (2, 3)
LEVELS = (3, 4)      # of the backbone's 4 feature maps (ResNet stages; a ViT's map blocks)
LAYOUT_NAME = f"level {LAYOUT_READOUT['level']}, {LAYOUT_READOUT['grid']} x {LAYOUT_READOUT['grid']}"  # the monitor's


@torch.no_grad()
def readouts(backbone: torch.nn.Module, images: torch.Tensor, batch: int = 64) -> dict[str, torch.Tensor]:
    """Per image: the final pool, and each of LEVELS' maps pooled to each of GRIDS (cells L2-normalised)."""
    backbone.eval()
    out: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(images), batch):
        parts = extract(backbone, images[i:i + batch].float(), parts=("pooled", "maps"))
        out.setdefault("final pool", []).append(parts["pooled"].float())
        for level in LEVELS:
            for grid in GRIDS:
                out.setdefault(f"level {level}, {grid} x {grid}", []).append(grid_cells(parts["maps"][level - 1], grid))
    return {name: torch.cat(chunks) for name, chunks in out.items()}


def margin(knn: dict, before: str, after: str) -> str:
    return margin_brief(knn_margin(knn, before, after))


def job_readouts(job: Path) -> dict:
    _, config, _ = read_job(job)
    knn = torch.load(job / "knn.pt", weights_only=False)
    state = load_checkpoint(job / "checkpoints" / CHECKPOINT)
    backbones = {"random init": initial_backbone(config), "trained": job_backbone(job, "teacher", state)}
    hits = {}
    for who, backbone in backbones.items():
        bank, queries = readouts(backbone, knn["bank"]), readouts(backbone, knn["queries"])
        hits[who] = {name: hits_bits(knn_hits(bank[name], queries[name], knn)) for name in bank}
    for who, entry in (("random init", state["knn"][0]), ("trained", state["knn"][-1])):
        monitor_names = {"pool": hits[who]["final pool"], "layout": hits[who][LAYOUT_NAME]}
        if differ := unreproduced_readouts(entry, monitor_names):
            sys.exit(f"{job.name}: the {who} {' and '.join(differ)} readout does not reproduce the run's kNN hits "
                     f"(the layout readout is {LAYOUT_NAME} here)")
    thumbnails = hits_bits(knn_thumbnail_hits(knn))
    return {"job": str(job), "held_out": len(thumbnails), "thumbnails": hits_rate(thumbnails),
            "readouts": {name: {"random init": hits_rate(hits["random init"][name]),
                                "trained": hits_rate(hits["trained"][name]),
                                "trained minus random init": margin(knn, hits["random init"][name],
                                                                    hits["trained"][name]),
                                "trained minus thumbnails": margin(knn, thumbnails, hits["trained"][name])}
                         for name in hits["trained"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("jobs", type=Path, nargs="+", help="finished jobs (HOME/pretrain/JOB)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for job in args.jobs:
        print(json.dumps(job_readouts(job), indent=1), flush=True)


if __name__ == "__main__":
    main()
