"""The demo flow's choice of models for its prediction (the flow itself runs in `make demo`, not here)."""
import pytest

from flows.demo import prediction_models


def run(config: str, alias: str | None) -> dict:
    return {"config": config, "backbone": f"models:/dax-backbone-{config}/1",
            "promotion": {"alias": alias} if alias else None}


def test_one_backbone_predicts_with_the_heads_of_the_alias_it_was_promoted_to():
    assert prediction_models([run("demo-cpu-resnet18", "challenger")]) == (
        "challenger", "models:/dax-backbone-demo-cpu-resnet18/1")


def test_two_backbones_with_a_champion_predict_with_the_best_champion_head_per_task():
    retrained = [run("demo-cpu-resnet18", "challenger"), run("demo-cpu", "champion")]
    assert prediction_models(retrained) == ("champion", None)


def test_two_backbones_without_a_champion_keep_to_the_first_promoted_one():
    retrained = [run("demo-cpu-resnet18", None), run("demo-cpu", "challenger")]
    assert prediction_models(retrained) == ("challenger", "models:/dax-backbone-demo-cpu/1")


def test_no_promoted_backbone_is_a_clear_error():
    with pytest.raises(RuntimeError, match="nothing to predict with"):
        prediction_models([run("demo-cpu", None)])
