"""Flow `demo`: the whole pipeline on one machine, embedded, on a synthetic corpus.

    synth (resumes)  ->  montage  ->  pipeline: ingest -> pretrain -> heads -> promote  ->  catalog report
    ->  a prediction on one image, de-identified in memory

The pipeline runs with the demo's parameters: pretraining config ``demo-cpu`` and the head budgets of
``deployments/heads/demo.yaml``, which fit 30 minutes on 2 cores. ``dax demo`` runs this flow and
prints where to look.
"""
from __future__ import annotations

import time

from prefect import flow

from flows.pipeline import pipeline
from flows.synth import synth
from tasks.home import configure
from tasks.ingest.report import write_report
from tasks.release.predict import predict
from tasks.synth.corpus import demo_image
from tasks.synth.montage import make_montage

__all__ = ["demo"]

DEMO_PRETRAIN = ["demo-cpu"]
DEMO_HEADS = "demo"
DEMO_SEEDS = 2          # seeds per head: 3 put the demo over its 30 minutes (README, "Status"; the CLI's --seeds default)


@flow(name="demo")
def demo(home: str | None = None, studies: int = 200, seeds: int = DEMO_SEEDS) -> dict:
    """Corpus, ingestion, DINO, heads, promotion and a prediction; returns what ``dax demo`` prints."""
    began = time.perf_counter()
    root = configure(home)
    corpus = root / "corpus"
    corpus_made = synth(out=str(corpus), studies=studies, seed=0, preset="demo")
    montage = make_montage(corpus, root / "montage.png")
    outcome = pipeline(source=str(corpus / "dicom"), home=str(root), labels=str(corpus / "labels.parquet"),
                       configs=DEMO_PRETRAIN, seeds=seeds, heads_size=None, heads_config=DEMO_HEADS)
    retrained = outcome["retrained"][0]
    report = write_report(root, root / "catalog-report.html")
    promoted = retrained["promotion"]["alias"]
    predictions = predict([demo_image(corpus)], root / "predictions", alias=promoted, home=root,
                          backbone_uri=retrained["backbone"])
    return {"corpus_images": corpus_made["corpus_images"], "corpus": str(corpus), "montage": str(montage),
            "ingest": outcome["ingest"], "retrained": retrained, "report": str(report),
            "prediction": predictions[0], "seconds": round(time.perf_counter() - began, 1)}
