"""Flow `demo`: the whole pipeline on one machine, embedded, on a synthetic corpus.

    synth (resumes)  ->  montage  ->  pipeline: ingest -> pretrain -> heads -> promote  ->  catalog report
    ->  a prediction on one image, de-identified in memory

The pipeline runs with the demo's parameters: pretraining config ``demo-cpu-resnet18`` (``DEMO_PRETRAIN``) and
the head budgets of ``deployments/heads/demo.yaml``, which fit 30 minutes on 2 cores. ``configs`` takes several
(``dax demo --config demo-cpu-resnet18 --config demo-cpu`` adds the ViT-Ti and its heads); the prediction then
uses the best ``@champion`` head per task. ``dax demo`` runs this flow and prints where to look.
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

__all__ = ["demo", "prediction_models"]

# the ResNet-18: ahead of the ViT-Ti on the kNN splits and the heads measured so far (docs/experiments.md,
# sections 12, 14 and 15); the two together take about 36 minutes on 2 cores, over the demo's 30
DEMO_PRETRAIN = ["demo-cpu-resnet18"]
DEMO_HEADS = "demo"
DEMO_SEEDS = 2          # seeds per head: 3 put the demo over its 30 minutes (README, "Status"; the CLI's --seeds default)


@flow(name="demo")
def demo(home: str | None = None, studies: int = 200, seeds: int = DEMO_SEEDS,
         configs: list[str] | None = None) -> dict:
    """Corpus, ingestion, DINO, heads, promotion and a prediction; returns what ``dax demo`` prints."""
    began = time.perf_counter()
    root = configure(home)
    corpus = root / "corpus"
    corpus_made = synth(out=str(corpus), studies=studies, seed=0, preset="demo")
    montage = make_montage(corpus, root / "montage.png")
    outcome = pipeline(source=str(corpus / "dicom"), home=str(root), labels=str(corpus / "labels.parquet"),
                       configs=configs or DEMO_PRETRAIN, seeds=seeds, heads_size=None, heads_config=DEMO_HEADS)
    retrained = outcome["retrained"]
    report = write_report(root, root / "catalog-report.html")
    alias, backbone_uri = prediction_models(retrained)
    predictions = predict([demo_image(corpus)], root / "predictions", alias=alias, home=root,
                          backbone_uri=backbone_uri)
    return {"corpus_images": corpus_made["corpus_images"], "corpus": str(corpus), "montage": str(montage),
            "ingest": outcome["ingest"], "retrained": retrained, "report": str(report),
            "prediction": predictions[0], "seconds": round(time.perf_counter() - began, 1)}


def prediction_models(retrained: list[dict]) -> tuple[str, str | None]:
    """The alias and backbone the demo's prediction uses: with one backbone, its heads under the alias it was
    promoted to; with several and a ``@champion`` among them, the best champion head per task, each on its own
    backbone (``backbone_uri`` None)."""
    promoted = [r for r in retrained if r.get("promotion")]
    if not promoted:
        raise RuntimeError("no backbone finished pretraining: nothing to predict with (see the pretrain flow's log)")
    if len(promoted) > 1 and any(r["promotion"]["alias"] == "champion" for r in promoted):
        return "champion", None
    return promoted[0]["promotion"]["alias"], promoted[0]["backbone"]
