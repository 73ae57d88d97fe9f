"""The heads' results table: floor, random init, pretrained, supervised ceiling and the paper, mean ± sd over seeds.

One row per (task, metric) that ran; written as an MLflow table, markdown and CSV, and as the Prefect
artifact ``heads-summary``. Columns:

- ``floor``: the same metric without a backbone (``tasks.heads.floors``): region rows, the logistic
  regression on 32 x 32 thumbnails (the kNN row: kNN on 16 x 16 thumbnails); metal, the best threshold;
- ``random``: the same heads on the random-init twin; ``pretrained``: on the backbone under test;
- ``ceiling``: the same architecture trained end to end, supervised, from random init on the same images
  (``CEILING``: the random-init branch's ``e2e_*`` metric; for metal and screws, every row), where it ran;
- ``paper``: DAX's figure.

Promotion (``tasks.release.promotion``) reads the ``pretrained_mean`` and ``floor_mean`` columns.
"""
from __future__ import annotations

import csv
import io
import math

import numpy as np

__all__ = ["CEILING", "PAPER", "ROLES", "ROWS", "log_results", "results_csv", "results_markdown", "results_table"]

# (task, metric, label, unit): "%" metrics are fractions shown as percentages
ROWS = [
    ("region", "accuracy", "accuracy (linear, last 4 levels)", "%"),
    ("region", "precision", "precision (macro)", "%"),
    ("region", "recall", "recall (macro)", "%"),
    ("region", "f1", "F1 (macro)", "%"),
    ("region", "linear_pooled_accuracy", "accuracy (linear, pooled)", "%"),
    ("region", "mlp_accuracy", "accuracy (MLP, pooled)", "%"),
    ("region", "knn_accuracy", "accuracy (kNN k=20, T=0.07)", "%"),
    ("region", "fewshot1_accuracy", "accuracy (1-shot linear)", "%"),
    ("region", "fewshot5_accuracy", "accuracy (5-shot linear)", "%"),
    ("region", "fewshot10_accuracy", "accuracy (10-shot linear)", "%"),
    ("region", "e2e_accuracy", "accuracy (supervised end-to-end from this init)", "%"),
    ("metal", "dice", "Dice (native, images with metal)", "%"),
    ("metal", "iou", "IoU (native, images with metal)", "%"),
    ("metal", "dice_all", "Dice (native, all images)", "%"),
    ("screws", "head_l1_px", "head L1 error (native px)", "px"),
    ("screws", "tip_l1_px", "tip L1 error (native px)", "px"),
    ("screws", "angle_deg", "angle error (deg)", "deg"),
    ("screws", "gate_px", "matching gate (native px; screw_gate x the long side)", "px"),
    ("screws", "precision", "precision", "%"),
    ("screws", "recall", "recall", "%"),
    ("screws", "f1", "F1", "%"),
]
# DAX (the paper), for the same tasks on its clinical data; screw errors at 976 px images
PAPER = {
    ("region", "accuracy"): "96.9 %", ("region", "precision"): "97.0 %", ("region", "recall"): "97.0 %",
    ("metal", "dice"): "94.1 %",
    ("screws", "head_l1_px"): "3.28 px (at 976 px)", ("screws", "tip_l1_px"): "7.86 px (at 976 px)",
    ("screws", "angle_deg"): "1.22 deg",
}


# the supervised ceiling of a row: (the random-init branches' metric)
CEILING = {("region", "accuracy"): "e2e_accuracy",
           **{(task, metric): f"e2e_{metric}" for task, metric, _, _ in ROWS
              if task in ("metal", "screws") and metric != "gate_px"}}
ROLES = ("floor", "random", "pretrained")                 # the branches' roles (tasks.heads.steps)
COLUMNS = (*ROLES, "ceiling")


def _stats(values: list[float]) -> tuple[float, float, int]:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return float("nan"), float("nan"), 0
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)


def _format(mean: float, sd: float, unit: str) -> str:
    if not math.isfinite(mean):
        return "n/a"
    if unit == "%":
        return f"{100 * mean:.1f} ± {100 * sd:.1f} %"
    return f"{mean:.2f} ± {sd:.2f} {unit}"


def results_table(results: list[dict], tasks: tuple[str, ...]) -> list[dict]:
    """Rows (task, metric): floor, random-init, pretrained and ceiling mean ± sd over seeds, and the paper's number."""
    rows = []
    for task_name, metric, label, unit in ROWS:
        if task_name not in tasks:
            continue
        row = {"task": task_name, "metric": metric, "label": label, "paper": PAPER.get((task_name, metric), "")}
        ran = False
        columns = [(role, role, metric) for role in ROLES]
        if (task_name, metric) in CEILING:
            columns.append(("ceiling", "random", CEILING[(task_name, metric)]))
        for column, role, key in columns:
            branches = [r for r in results if r["role"] == role and r["task"] == task_name]
            values = [r["metrics"].get(key) for r in branches]
            if column != "floor":
                ran = ran or any(key in r["metrics"] or key in r.get("undefined", ()) for r in branches)
            mean, sd, n = _stats([v for v in values if v is not None])
            row.update({column: _format(mean, sd, unit), f"{column}_mean": mean, f"{column}_sd": sd, f"{column}_n": n})
        for column in COLUMNS:
            row.setdefault(column, "n/a")
            row.setdefault(f"{column}_mean", float("nan"))
            row.setdefault(f"{column}_sd", float("nan"))
        if ran:   # a metric that was computed but undefined (no matched screw: NaN) shows as n/a
            rows.append(row)
    return rows


def results_markdown(rows: list[dict], header: list[str]) -> str:
    lines = header + ["", "| task | metric | floor | random-init | pretrained | supervised ceiling | DAX paper |",
                      "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['label']} | {r['floor']} | {r['random']} | {r['pretrained']} | {r['ceiling']} "
              f"| {r['paper']} |" for r in rows]
    lines += ["", ("floor: no backbone (region: logistic regression on 32 x 32 thumbnails, kNN on 16 x 16 ones; metal: "
                   "the best intensity threshold chosen on training images); supervised ceiling: the same architecture "
                   "trained end to end from random init on the same images (n/a: not run).")]
    return "\n".join(lines)


def results_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    keys = ["task", "metric", "label"] + [f"{c}_{s}" for c in COLUMNS for s in ("mean", "sd")] + ["paper"]
    writer = csv.DictWriter(out, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def log_results(rows: list[dict], markdown: str) -> None:
    """The table into the active MLflow run: as a table, markdown and CSV, and as flat metrics."""
    import mlflow

    keys = ("task", "metric", "label", *COLUMNS, "paper", *(f"{c}_{s}" for c in COLUMNS for s in ("mean", "sd")))
    mlflow.log_table({k: [r[k] for r in rows] for k in keys}, "results/heads_table.json")
    mlflow.log_text(markdown, "results/heads.md")
    mlflow.log_text(results_csv(rows), "results/heads.csv")
    flat = {}
    for r in rows:
        for role in COLUMNS:
            if math.isfinite(r[f"{role}_mean"]):
                flat[f"{role}.{r['task']}.{r['metric']}.mean"] = r[f"{role}_mean"]
                flat[f"{role}.{r['task']}.{r['metric']}.sd"] = r[f"{role}_sd"]
    mlflow.log_metrics(flat)
