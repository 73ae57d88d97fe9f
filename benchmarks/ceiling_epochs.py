"""Is the region ceiling a ceiling? The supervised end-to-end run of ``heads_eval.py`` at several epoch counts,
on a home it already ingested (same images, patients, split and recipe; only the epochs change).

    .venv/bin/python benchmarks/ceiling_epochs.py --home /tmp/dax-heads-eval/home \\
        --labels /tmp/dax-heads-eval/eval-corpus/labels.parquet --backbone models:/dax-backbone-resnet18/1 10 30 60
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--home", type=Path, required=True, help="the home heads_eval.py ingested (its --out/home)")
    parser.add_argument("--labels", type=Path, required=True, help="the evaluation corpus' labels.parquet")
    parser.add_argument("--backbone", required=True, help="the registered backbone whose architecture to train")
    parser.add_argument("--config", default="demo", help="head config (its e2e_lr, e2e_batch, e2e_size)")
    parser.add_argument("epochs", type=int, nargs="+", help="epoch counts to train the ceiling for")
    args = parser.parse_args()

    from heads_eval import ceilings
    from tasks.heads.training import load_head_config

    config = load_head_config(args.config, {"e2e_epochs": 0})
    print("| epochs | side (px) | region accuracy (test patients, seed 0) | minutes |\n|---|---|---|---|")
    for epochs in args.epochs:
        began = time.perf_counter()
        region = ceilings(args.home, args.labels, args.backbone, config, epochs, ("region",))["region"]
        print(f"| {epochs} | {region['size']} | {region['accuracy']:.3f} | {(time.perf_counter() - began) / 60:.1f} |",
              flush=True)
    print("command: python benchmarks/ceiling_epochs.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
