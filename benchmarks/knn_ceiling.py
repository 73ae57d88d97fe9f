"""The kNN monitor's supervised ceiling: the pretraining's architecture told the body regions, same budget.

    .venv/bin/python benchmarks/knn_ceiling.py --job HOME/pretrain/JOB            # a finished dax pretrain job

The pretraining's kNN figure lies between a floor and a ceiling, and this script measures the ceiling: what a
backbone of the job's architecture learns about body regions from as many images as the pretraining took, when
it is told the answer. The job's architecture is built with the job's seed (its random init is the
pretraining's: the kNN at step 0 is the monitor's), given a linear head, and trained end to end on body
regions (``tasks.heads.training.train_end_to_end``: AdamW, random flips; lr 1e-4 for ViTs, 3e-4 for ResNets
unless ``--lr``: on split 11 of the demo corpus ViT-Ti's kNN reached 0.652 at 1e-4 and 0.430 at 3e-4,
docs/experiments.md, section 11). It trains on the kNN bank (images of training patients, at the monitor's
size) for the pretraining's steps x batch images. Then the kNN probe scores it (the same bank and held-out
queries, k = 20). The floor is the same kNN on 16 x 16 pixel thumbnails (no backbone); random init is the
backbone untrained; the oracle is the probe's own round trip, each image's label given as its feature
(one-hot): what the probe reads back when features hold the answer. A pretraining whose kNN is far under this
ceiling has room to learn; one whose ceiling is under the floor cannot beat the floor at that budget, with or
without labels (docs/experiments.md, section 11).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.heads.data import HeadDataset
from tasks.heads.training import train_end_to_end
from tasks.pretrain.main_dino import initial_backbone, read_job
from tasks.pretrain.monitor import hits_bits, knn_hits, knn_margin, knn_monitor, knn_thumbnails


LEARNING_RATES = {"vit": 1e-4, "resnet": 3e-4}   # per architecture kind, when no lr is given


def knn_ceiling(job_dir: Path, lr: float | None = None, threads: int = 2) -> dict:
    """Train the job's architecture on the kNN bank's regions with the job's image budget; its kNN probe."""
    job_dir = Path(job_dir)
    _, config, selection = read_job(job_dir)
    knn = torch.load(job_dir / "knn.pt", weights_only=False)
    torch.set_num_threads(threads)
    began = time.perf_counter()
    backbone = initial_backbone(config)    # the pretraining's random init
    random_hits = knn_monitor(backbone, knn, torch.device("cpu"))
    lr = lr or LEARNING_RATES[backbone.kind]

    bank, queries = knn["bank"], knn["queries"]
    n_bank, n_queries = len(bank), len(queries)
    steps = config.epochs * config.epoch_steps(len(selection.keys))
    epochs = max(1, round(steps * config.batch_size / n_bank))
    data = HeadDataset(size=bank.shape[-1], keys=[str(i) for i in range(n_bank + n_queries)],
                       images=torch.cat([bank, queries]),
                       regions=torch.cat([knn["bank_labels"], knn["query_labels"]]).long(),
                       masks=None, screws=[], native_screws=[], boxes=[],
                       splits=np.array(["train"] * n_bank + ["test"] * n_queries), patient_keys=[],
                       classes=tuple(knn["classes"]))
    metrics, trained = train_end_to_end(backbone, data, np.arange(n_bank), None, np.arange(n_bank, n_bank + n_queries),
                                        epochs=epochs, lr=lr, batch_size=config.batch_size, seed=config.seed,
                                        device="cpu", return_model=True)
    hits = knn_monitor(trained, knn, torch.device("cpu"))
    classes = len(knn["classes"])
    oracle = knn_hits(torch.nn.functional.one_hot(knn["bank_labels"].long(), classes).float(),
                      torch.nn.functional.one_hot(knn["query_labels"].long(), classes).float(), knn)
    return {"arch": config.arch, "images_seen": epochs * n_bank, "pretraining_images": steps * config.batch_size,
            "epochs": epochs, "lr": lr, "oracle": float(oracle.float().mean()), "thumbnails": knn_thumbnails(knn),
            "random": float(random_hits.float().mean()), "ceiling": float(hits.float().mean()),
            "linear_accuracy": metrics["accuracy"],
            "margin": knn_margin(knn, hits_bits(random_hits), hits_bits(hits)), "hits": hits_bits(hits),
            "minutes": (time.perf_counter() - began) / 60}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--job", type=Path, required=True, help="a dax pretrain job folder with knn.pt")
    parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: 1e-4 ViT, 3e-4 ResNet)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    result = knn_ceiling(args.job, args.lr, args.threads)
    (args.job / "knn_ceiling.json").write_text(json.dumps(result, indent=2))
    m = result["margin"]
    print(f"{result['arch']}: kNN oracle {result['oracle']:.3f}, thumbnails {result['thumbnails']:.3f}, "
          f"random init {result['random']:.3f}, "
          f"supervised ceiling {result['ceiling']:.3f} ({m['margin']:+.3f} over random init, 95 % "
          f"{m['low']:+.3f} to {m['high']:+.3f}); its linear head {result['linear_accuracy']:.3f}; "
          f"lr {result['lr']:g}, {result['epochs']} epochs of {result['images_seen'] // result['epochs']} bank images "
          f"({result['images_seen']} images; the pretraining took {result['pretraining_images']}), "
          f"{result['minutes']:.1f} min")


if __name__ == "__main__":
    main()
