"""The retrain flow reuses a finished pretraining of the same config and data (Prefect's task cache)."""
from __future__ import annotations

import pytest
from conftest import HEADS_TEST_OVERRIDES, TINY_DINO, heads_tracking, home_with_catalog_of

from tasks.pretrain.steps import pretraining_cache_key


@pytest.mark.slow
def test_a_rerun_on_the_same_data_reuses_the_backbone_and_a_new_config_does_not(small_corpus, tmp_path,
                                                                                  one_torch_thread):
    from flows.pipeline import retrain

    home = home_with_catalog_of(small_corpus, tmp_path / "home")
    run = dict(configs=["demo-cpu"], home=str(home), labels=str(small_corpus.labels), device="cpu", seeds=1,
               overrides=TINY_DINO, heads_size=32, heads_overrides={**HEADS_TEST_OVERRIDES, "e2e_epochs": 0,
                                                                 "dense_size": 32})
    with heads_tracking(home):
        first = retrain(**run)["retrained"][0]
        second = retrain(**run)["retrained"][0]
    assert first["reused"] is False and second["reused"] is True
    assert second["backbone"] == first["backbone"] and second["knn"] == first["knn"]
    assert len(list((home / "pretrain").glob("*/job.json"))) == 1            # trained once

    params = {"home": str(home), "config": "demo-cpu", "overrides": TINY_DINO, "where": None,
              "labels": str(small_corpus.labels)}
    key = pretraining_cache_key(None, params)
    assert key == pretraining_cache_key(None, dict(params))
    assert key != pretraining_cache_key(None, {**params, "overrides": {**TINY_DINO, "steps_per_epoch": 4}})
    assert key != pretraining_cache_key(None, {**params, "where": "modality = 'XA'"})
    assert key != pretraining_cache_key(None, {**params, "labels": None})
