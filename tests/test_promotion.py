"""Promotion against a real MLflow store: champion only when the candidate matches or beats it."""
from __future__ import annotations

import pytest
import torch

from tasks.heads.results import results_table
from tasks.release.promotion import below_floors, compare, floor_scores, lower_is_better, promote


def test_compare_knows_which_way_is_better():
    assert lower_is_better("screws.head_l1_px") and lower_is_better("screws.angle_deg")
    assert not lower_is_better("region.accuracy")
    wins, rows = compare({"region.accuracy": 0.9, "screws.tip_l1_px": 5.0}, {"region.accuracy": 0.9, "screws.tip_l1_px": 6.0})
    assert wins and [r["verdict"] for r in rows] == ["equal", "better"]
    wins, rows = compare({"region.accuracy": 0.95, "screws.tip_l1_px": 7.0}, {"region.accuracy": 0.9, "screws.tip_l1_px": 6.0})
    assert not wins and [r["verdict"] for r in rows] == ["better", "worse"]
    assert compare({"region.accuracy": 0.89}, {"region.accuracy": 0.9}, tolerance=0.02)[0]
    assert compare({"metal.dice": 0.5}, None) == (True, [{"metric": "metal.dice", "candidate": 0.5, "champion": None,
                                                          "verdict": "new"}])


def test_floors_come_from_the_results_table_and_are_beaten_strictly():
    branches = [{"role": role, "task": "region", "seed": seed, "metrics": {"accuracy": value + 0.01 * seed}}
                for role, value in (("floor", 0.48), ("random", 0.30), ("pretrained", 0.45)) for seed in range(2)]
    table = results_table(branches, ("region",))
    floors = floor_scores(table)
    assert floors == {"region.accuracy": pytest.approx(0.485)}
    assert table[0]["floor"] == "48.5 ± 0.7 %" and table[0]["ceiling"] == "n/a"
    assert [r["verdict"] for r in below_floors({"region.accuracy": 0.455}, floors)] == ["not above floor"]
    assert below_floors({"region.accuracy": 0.6}, floors) == []
    assert below_floors({"screws.head_l1_px": 3.0}, {"screws.head_l1_px": 2.0})[0]["metric"] == "screws.head_l1_px (floor)"


def test_promotion_moves_the_champion_alias_only_on_a_win(tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_registry_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")   # the registry does not follow on its own
    experiment = MlflowClient().create_experiment("promotion", artifact_location=(tmp_path / "art").as_uri())

    def register(name: str) -> str:
        with mlflow.start_run(experiment_id=experiment):
            info = mlflow.pytorch.log_model(torch.nn.Linear(2, 2), name="m", serialization_format="pickle",
                                            pip_requirements=["torch"], registered_model_name=name)
        return str(info.registered_model_version)

    client = MlflowClient()
    first, head1 = register("dax-backbone-x"), register("dax-head-region-x")
    decision = promote("dax-backbone-x", first, {"region.accuracy": 0.8, "screws.head_l1_px": 9.0},
                       heads={"dax-head-region-x": head1})
    assert decision.alias == "champion" and decision.champion_version is None
    assert str(client.get_model_version_by_alias("dax-head-region-x", "champion").version) == head1

    second = register("dax-backbone-x")
    decision = promote("dax-backbone-x", second, {"region.accuracy": 0.7, "screws.head_l1_px": 8.0})
    assert decision.alias == "challenger" and decision.champion_version == first
    assert str(client.get_model_version_by_alias("dax-backbone-x", "champion").version) == first
    assert str(client.get_model_version_by_alias("dax-backbone-x", "challenger").version) == second
    assert "| region.accuracy | 0.7 | 0.8 | worse |" in decision.markdown("dax-backbone-x", second)

    third = register("dax-backbone-x")
    decision = promote("dax-backbone-x", third, {"region.accuracy": 0.8, "screws.head_l1_px": 8.5})
    assert decision.alias == "champion"
    assert str(client.get_model_version_by_alias("dax-backbone-x", "champion").version) == third
    assert client.get_model_version("dax-backbone-x", third).tags["dax.promotion"] == "champion"
    with pytest.raises(Exception):
        client.get_model_version_by_alias("dax-head-region-x", "challenger")

    # better than the champion but not above its floors: never champion
    fourth = register("dax-backbone-x")
    decision = promote("dax-backbone-x", fourth, {"region.accuracy": 0.85, "screws.head_l1_px": 8.0},
                       floors={"region.accuracy": 0.9})
    assert decision.alias == "challenger"
    assert str(client.get_model_version_by_alias("dax-backbone-x", "champion").version) == third
    assert "| region.accuracy (floor) | 0.85 | 0.9 | not above floor |" in decision.markdown("dax-backbone-x", fourth)
