"""Model promotion: a new backbone and its heads become ``@champion`` only if they match or beat it.

The evaluation table is a flat dict of scores (``region.accuracy``, ``metal.dice``,
``screws.head_l1_px``, ...), means over seeds on the held-out patients. Errors (names ending in
``_px``, ``_deg`` or ``loss``) are better lower; everything else is better higher. The candidate wins
when no shared score is worse than the champion's by more than ``tolerance`` (relative), which with
the default 0 means "matches or beats on every metric". With no champion yet, the first candidate wins.
The scores are stored on the backbone's model version (tag ``dax.eval``) so the next comparison reads
them from MLflow, and the decision is returned as rows for a Prefect artifact.

Floors come first: a candidate whose heads do not beat the floors of the same table (the same metric with
no backbone, ``tasks.heads.floors``) is never ``@champion``, whatever the current champion scores.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NONE

__all__ = ["PROMOTION_METRICS", "Decision", "below_floors", "compare", "evaluation_scores", "floor_scores",
           "lower_is_better", "promote", "promote_task"]

# what promotion compares: the registered heads' headline metrics, means over seeds on test patients
PROMOTION_METRICS = [("region", "accuracy"), ("region", "f1"), ("metal", "dice"), ("screws", "f1"),
                     ("screws", "head_l1_px"), ("screws", "tip_l1_px"), ("screws", "angle_deg")]

CHAMPION, CHALLENGER = "champion", "challenger"


def lower_is_better(metric: str) -> bool:
    return metric.endswith(("_px", "_deg", "loss"))


@dataclass(frozen=True)
class Decision:
    alias: str                     # "champion" or "challenger"
    rows: list[dict]               # metric, candidate, champion, verdict
    champion_version: str | None   # the version that held @champion before

    def markdown(self, name: str, version: str) -> str:
        lines = [f"# Promotion of {name} version {version}: **@{self.alias}**", "",
                 f"previous champion: {('version ' + self.champion_version) if self.champion_version else 'none'}", "",
                 "| metric | candidate | champion | verdict |", "|---|---|---|---|"]
        for r in self.rows:
            champ = "" if r["champion"] is None else f"{r['champion']:.4g}"
            lines.append(f"| {r['metric']} | {r['candidate']:.4g} | {champ} | {r['verdict']} |")
        lines.append("")
        lines.append("(floor) rows: the champion column holds the floor, the same metric without a backbone.")
        return "\n".join(lines)


def compare(candidate: dict[str, float], champion: dict[str, float] | None, tolerance: float = 0.0) -> tuple[bool, list[dict]]:
    rows, wins = [], True
    for metric in sorted(candidate):
        new, old = candidate[metric], (champion or {}).get(metric)
        if old is None or old != old or new != new:           # missing or NaN: nothing to compare
            rows.append({"metric": metric, "candidate": new, "champion": old, "verdict": "new"})
            continue
        slack = tolerance * abs(old)
        worse = new > old + slack if lower_is_better(metric) else new < old - slack
        better = new < old if lower_is_better(metric) else new > old
        rows.append({"metric": metric, "candidate": new, "champion": old,
                     "verdict": "worse" if worse else "better" if better else "equal"})
        wins = wins and not worse
    return wins, rows


def below_floors(candidate: dict[str, float], floors: dict[str, float] | None) -> list[dict]:
    """Rows for the metrics where the candidate does not beat its floor (strictly; NaN on either side: skipped)."""
    rows = []
    for metric, floor in sorted((floors or {}).items()):
        new = candidate.get(metric)
        if new is None or math.isnan(new) or math.isnan(floor):
            continue
        if not (new < floor if lower_is_better(metric) else new > floor):
            rows.append({"metric": f"{metric} (floor)", "candidate": new, "champion": floor, "verdict": "not above floor"})
    return rows


def promote(name: str, version: str, scores: dict[str, float], heads: dict[str, str] | None = None,
            tolerance: float = 0.0, client=None, floors: dict[str, float] | None = None) -> Decision:
    """Compare ``name``/``version`` with its floors and the current champion; set ``@champion`` or ``@challenger``.

    ``heads`` maps head model names to the versions trained on this backbone: they get the same alias.
    ``floors``: the same metrics without a backbone (``floor_scores``); not beating one makes a challenger.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = client or MlflowClient()
    clean = {k: float(v) for k, v in scores.items() if v is not None and not math.isnan(float(v))}
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None
    if current is not None and str(current.version) == str(version):
        current = None                                          # re-promoting the champion itself
    champion_scores = json.loads(current.tags.get("dax.eval", "{}")) if current is not None else None
    wins, rows = compare(clean, champion_scores, tolerance)
    under = below_floors(clean, floors)
    alias = CHAMPION if wins and not under else CHALLENGER
    rows = under + rows
    client.set_model_version_tag(name, version, "dax.eval", json.dumps(clean, sort_keys=True))
    client.set_model_version_tag(name, version, "dax.promotion", alias)
    client.set_registered_model_alias(name, alias, version)
    for head_name, head_version in (heads or {}).items():
        client.set_registered_model_alias(head_name, alias, head_version)
    return Decision(alias, rows, str(current.version) if current is not None else None)


def evaluation_scores(table: list[dict]) -> dict[str, float]:
    """The promotion scores of a heads results table (``tasks.heads.results``): pretrained means."""
    rows = {(r["task"], r["metric"]): r for r in table}
    return {f"{t}.{m}": rows[(t, m)]["pretrained_mean"] for t, m in PROMOTION_METRICS if (t, m) in rows}


def floor_scores(table: list[dict]) -> dict[str, float]:
    """The floors of a heads results table for the promotion metrics (``floor_mean``; absent where none ran)."""
    rows = {(r["task"], r["metric"]): r for r in table}
    return {f"{t}.{m}": rows[(t, m)]["floor_mean"] for t, m in PROMOTION_METRICS
            if (t, m) in rows and math.isfinite(rows[(t, m)].get("floor_mean", float("nan")))}


def promote_and_report(model: str, version: str, table: list[dict], head_versions: dict) -> dict:
    """Promote a backbone on its heads' results table (floors and champion); the comparison as the Prefect
    artifact ``promotion``."""
    from prefect.artifacts import create_markdown_artifact

    decision = promote(model, version, evaluation_scores(table), head_versions, floors=floor_scores(table))
    create_markdown_artifact(decision.markdown(model, version), key="promotion",
                             description=f"{model} version {version}: @{decision.alias}")
    return {"model": model, "version": version, "alias": decision.alias, "previous_champion": decision.champion_version,
            "rows": decision.rows}


promote_task = task(promote_and_report, name="promote", cache_policy=NONE)
