"""No PHI past ingestion: the small corpus's planted PHI (the generator's phi.parquet) searched in every
byte that pretraining, the heads flow and ``dax predict`` wrote: the MLflow store and its artifacts
(pickled models, figures, configs, manifests), the pretraining and heads job folders, the feature
cache, the predictions, and the session's Prefect database and logs."""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq

from tasks.release.predict import predict
from tests.phi_search import files_under, phi_hits, phi_values


def test_no_planted_phi_downstream_of_ingestion(small_corpus, heads_flow, heads_env, tmp_path):
    corpus = small_corpus.labels.parent
    phi = pq.read_table(corpus / "phi.parquet").to_pylist()
    values = phi_values(phi)
    assert len(values) > 50
    # predict on source files straight from the export (PHI in their headers and burned into pixels)
    source = sorted((corpus / "dicom").rglob("*.dcm"))[:3]
    results = predict(source, tmp_path / "predictions", home=heads_env.home)
    assert [r["status"] for r in results] == ["ok"] * len(source)

    stacks = files_under(heads_env.home, heads_env.home)
    stacks.update(files_under(tmp_path / "predictions", tmp_path))
    stacks.update(files_under(Path(os.environ["PREFECT_HOME"]), Path(os.environ["PREFECT_HOME"]).parent))
    for written in ("mlflow.db", "mlartifacts/", "pretrain/", "heads/", "cache/features/", "prefect.db"):
        assert any(written in name for name in stacks), f"nothing under {written}: the search would prove nothing"
    hits = phi_hits(values, stacks)
    assert not hits, f"PHI found downstream: {hits[:10]}"


def test_the_search_finds_planted_numbers_but_not_clock_digits_or_hex_ids():
    """The matcher itself: a planted record number is found wherever it stands as a number of its own
    (a JSON value, a file name, after a label), but not inside a longer number, as a timestamp's
    microseconds (CI once met '888832' so in prefect.db), nor inside a UUID, run id, digest or key. A name
    is found unless its hex letters continue a run id with no separator (a parallel run once met 'celine' in
    mlflow.db's index: run id '...5bcbcace' + metric 'linear_pooled_accuracy')."""
    values = {"888832", "Doe^Jane", "Celine"}
    leaks = {"json": b'{"patient": "888832"}', "name": b"pred_888832.png", "text": b"id 888832\n",
             "label": b"PatientID888832", "hex-looking label": b"ID888832;", "dashed": b"888832-2026-11-30",
             "name part": b"PATIENT: jane, doe^jane", "after an id": b"4e7960b93dbd44a7-celine.png",
             "fused": b"parcelines", "short hex": b"abcaceline"}
    assert {where for where, _ in phi_hits(values, leaks)} == set(leaks)
    noise = {"timestamp": b"2026-11-30 21:14:26.888832\x81y", "iso": b"21:14:26.888832+00:00",
             "float": b"loss 0.888832e-3", "longer": b"id 18888321",
             "uuid": b"\x01455a95dc-a1cb-4d68-ba51-e3469c888832\x1bc", "uuid start": b"(888832dd-0df3-491b-8400-5e757587d128",
             "run id": b"$M\x01dffc104653ab4b9d888832fdd2e946f3$", "sha256": b"sha256:73E835B6CB9A1902FD888832FB7F8A90F9",
             "key": b"9b509c888832aff0_097038ce13cfdcc2_0000.json",
             "index page": b"\x08\x01c31fc888654d4542af3a5bc95bcbcacelinear_pooled_accuracy'",
             "id after a name": b"\x08\x01celine4e7960b93dbd44a7\x1b"}
    assert phi_hits(values, noise) == []
