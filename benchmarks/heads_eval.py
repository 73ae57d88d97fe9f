"""The heads on a labelled evaluation corpus the backbone never saw: floor, random init, pretrained, ceiling, paper.

    .venv/bin/python benchmarks/heads_eval.py --home dax-home            # 300 eval patients, 3 seeds, every image
    .venv/bin/python benchmarks/heads_eval.py --home H --studies 30 --seeds 1 --set seg_epochs=2 --no-write   # quick

``--home`` is a home with a pretrained backbone (a finished ``make demo``). The script:

1. generates the evaluation corpus, ``dax synth --preset eval`` (one study per patient, a few frames per
   series; ``--studies`` 300 patients, corpus seed ``--seed`` 1, where the demo corpus is seed 0: other patients);
2. copies the home (once, to ``--out``) and ingests the corpus into the copy with a fresh de-identification
   secret: the backbone, registered before, never saw these images, and the original home is left alone;
3. scores the dense heads' oracles on the corpus' labels (``tasks.heads.oracle``: what a perfect head of each
   design reaches at native resolution);
4. runs the ``heads`` flow on the corpus' labels (``--seeds`` 3; ``--tasks`` all three): floors, random-init
   twin, pretrained backbone; nothing registered. ``--config`` eval (``deployments/heads/eval.yaml``) is the
   demo's heads on every labelled image (about an hour with 3 seeds on 2 cores); ``--config demo`` reads the
   demo's 250 for metal and screws;
5. trains the supervised ceiling of each task once (``--ceiling-epochs``; ``--ceiling-tasks`` picks them; seed 0:
   the same architecture from random init, end to end, on the same images; region at the head config's
   ``e2e_side``, metal and screws with their heads on the dense windows);
6. with ``--against URI`` (another registered backbone: a candidate's rival), runs the same heads on it, same
   home, labels, seeds and config, and adds a paired table: pretrained minus it on the same test patients;
7. prints, and writes to BENCHMARKS.md (a section per architecture, "heads-eval-<arch>"; with ``--against``,
   "heads-eval-<arch>-against"), the results table, each headline figure's 95 % interval with test PATIENTS
   resampled (seed 0), the paired interval of pretrained minus floor, and the command.
"""
from __future__ import annotations

import argparse
import math
import os
import secrets
import shlex
import shutil
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dax_cli import dax  # noqa: E402

HEADLINES = [("region", "accuracy"), ("metal", "dice"), ("screws", "recall"), ("screws", "precision")]


def prepare(args) -> tuple[Path, Path]:
    """The corpus (made or resumed) and the home copy that holds it (copied and ingested once)."""
    corpus, home = args.out / "eval-corpus", args.out / "home"
    dax("synth", str(corpus), "--studies", str(args.studies), "--seed", str(args.seed), "--preset", "eval")
    if not (home / "eval-ingested").is_file():
        shutil.rmtree(home, ignore_errors=True)
        shutil.copytree(args.home, home, ignore=shutil.ignore_patterns("cache", "corpus", "predictions"))
        # this copy's key: never written, gone with the subprocess; the flow's pseudonyms differ from the home's
        dax("ingest", str(corpus / "dicom"), "--home", str(home), env={"DAX_DEID_SECRET": secrets.token_hex(32)})
        (home / "eval-ingested").write_text("ingested\n")
    return corpus, home


def oracles(labels: Path, size: int) -> dict:
    """The dense heads' oracles on every labelled image of the corpus, at ``size`` px."""
    import pyarrow.parquet as pq

    from dax_models.augment import Letterbox
    from dax_models.heads import ScrewHead, SegmentationDecoder
    from tasks.heads.data import screw_rows
    from tasks.heads.oracle import metal_oracle, screw_oracle
    from tasks.label_schema import png_to_mask

    rows = pq.read_table(labels, columns=["rows", "cols", "metal_mask_png", "screws"]).to_pylist()
    boxes = [Letterbox.of(r["rows"], r["cols"], size) for r in rows]
    levels = ([192] * 4, [16.0] * 4)
    metal = metal_oracle([png_to_mask(r["metal_mask_png"]) for r in rows], boxes,
                         SegmentationDecoder(*levels).out_stride)
    screws = screw_oracle([screw_rows(r["screws"]) for r in rows], boxes, ScrewHead(*levels).out_stride)
    return {"metal": metal, "screws": screws, "size": size}


def ceilings(home: Path, labels: Path, backbone_uri: str, config, epochs: int,
             tasks: tuple[str, ...] | None = None) -> dict[str, dict]:
    """The supervised ceilings (seed 0) of ``tasks`` (default: every task): the random-init twin trained end to end
    with each task's head, on the images the flow's heads read: region at the config's ``e2e_side``, metal and
    screws on their windows of the dense view (``tasks.heads.training.dense_ceiling``), ``epochs`` each."""
    import dataclasses

    import mlflow
    import torch

    from dax_models.backbones import create_backbone, resolve_device
    from tasks.heads.data import load_head_dataset
    from tasks.heads.training import DENSE_TASKS, TASKS, dense_ceiling, train_end_to_end
    from tasks.release.registry import configure_tracking, resolve_model

    tasks = TASKS if tasks is None else tasks

    configure_tracking(home)
    name, version = resolve_model(backbone_uri)
    arch = mlflow.pytorch.load_model(f"models:/{name}/{version}", map_location="cpu").arch

    def twin():
        torch.manual_seed(0)
        return create_backbone(arch, 1, img_size=config.size)

    out = {}
    if "region" in tasks:
        data = load_head_dataset(home, labels, size=config.size, masks=False)
        began = time.perf_counter()
        out["region"] = {**train_end_to_end(twin(), data, data.indices("train"), data.indices("val"),
                                            data.indices("test"), epochs, config.e2e_lr, config.e2e_batch, 0,
                                            resolve_device(config.device), size=config.e2e_side),
                         "size": config.e2e_side, "minutes": (time.perf_counter() - began) / 60}
    dense_tasks = [task for task in DENSE_TASKS if task in tasks]
    dense = load_head_dataset(home, labels, size=config.dense_size, max_images=config.dense_max_images) \
        if dense_tasks else None
    for task in dense_tasks:
        began = time.perf_counter()
        result = dense_ceiling(task, 0, dense, twin(), dataclasses.replace(config, e2e_epochs=epochs))
        out[task] = {**result.metrics, "size": config.dense_size, "minutes": (time.perf_counter() - began) / 60}
    return {task: {**figures, "epochs": epochs} for task, figures in out.items()}


def intervals(branches: list[dict]) -> list[dict]:
    """Seed 0's headline figures with their patient-resampled 95 % intervals, and pretrained minus floor / random."""
    from tasks.heads.evaluation import patient_interval

    seed0 = {(b["role"], b["task"]): b for b in branches if b["seed"] == 0}
    rows = []
    for task, metric in HEADLINES:
        pretrained = seed0.get(("pretrained", task))
        if pretrained is None:
            continue
        patients = pretrained["test_patients"]
        row = {"task": task, "metric": metric}
        for role in ("floor", "random", "pretrained"):
            if (role, task) in seed0:
                row[role] = patient_interval(seed0[(role, task)]["per_image"], patients, metric)
        for role in ("floor", "random"):
            if (role, task) in seed0:
                row[f"minus_{role}"] = patient_interval(pretrained["per_image"], patients, metric,
                                                        minus=seed0[(role, task)]["per_image"])
        rows.append(row)
    return rows


def against_rows(branches: list[dict], rival: list[dict]) -> list[dict]:
    """Seed 0's headline figures of the backbone and of its rival (``--against``), and the backbone minus the rival,
    paired on the same test patients (the split is the labels', not the backbone's: asserted)."""
    from tasks.heads.evaluation import patient_interval

    ours = {b["task"]: b for b in branches if b["seed"] == 0 and b["role"] == "pretrained"}
    theirs = {b["task"]: b for b in rival if b["seed"] == 0 and b["role"] == "pretrained"}
    rows = []
    for task, metric in HEADLINES:
        if task not in ours or task not in theirs:
            continue
        patients = ours[task]["test_patients"]
        if list(patients) != list(theirs[task]["test_patients"]):
            raise AssertionError(f"{task}: the two backbones' heads were tested on different patients")
        rows.append({"task": task, "metric": metric,
                     "rival": patient_interval(theirs[task]["per_image"], patients, metric),
                     "pretrained": patient_interval(ours[task]["per_image"], patients, metric),
                     "minus_rival": patient_interval(ours[task]["per_image"], patients, metric,
                                                     minus=theirs[task]["per_image"])})
    return rows


def _ci(v: dict | None, signed: bool = False) -> str:
    if not v:
        return "-"
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(v['value'])} ({f.format(v['low'])} to {f.format(v['high'])})"


def ceiling_cells(table: str, top: dict[str, dict]) -> str:
    """The flow's table with its ceiling cells filled from ``ceilings`` (seed 0) where the flow ran none."""
    from tasks.heads.results import CEILING, ROWS

    cells_of = {}
    for task, metric, label, unit in ROWS:
        key = CEILING.get((task, metric))
        value = top.get(task, {}).get(key.removeprefix("e2e_")) if key else None
        if isinstance(value, float) and math.isfinite(value):
            shown = f"{100 * value:.1f} %" if unit == "%" else f"{value:.2f} {unit}"
            cells_of[f"| {task} | {label} |"] = f"{shown} (seed 0, {top[task]['epochs']} epochs)"
    lines = table.split("\n")
    for i, line in enumerate(lines):
        for start, cell in cells_of.items():
            if line.startswith(start + " "):
                cells = line.split(" | ")
                cells[5] = cell
                lines[i] = " | ".join(cells)
    return "\n".join(lines)


def report(args, summary: dict, oracle: dict, top: dict[str, dict] | None, rows: list[dict], minutes: float,
           rival: dict | None = None) -> str:
    data = summary["data"]
    table = summary["markdown"].split("\n\n", 2)[-1]        # the flow's table without its header
    if top is not None:
        table = ceiling_cells(table, top)
    m, s = oracle["metal"], oracle["screws"]
    out = [f"Measured {date.today():%Y-%m-%d} on {os.cpu_count()} CPU cores, in {minutes:.0f} min; command:", "",
           "```", " ".join(["$", shlex.join(["python", "benchmarks/heads_eval.py", *sys.argv[1:]])]), "```", "",
           (f"Evaluation corpus: `dax synth --preset eval --seed {args.seed} --studies {args.studies}` "
            f"({data['images']} labelled images of {data['patients']} patients; train {data['train_images']}, val "
            f"{data['val_images']}, test {data['test_images']} images, split by patient), ingested after the "
            f"backbone `{summary['backbone']}` was registered: it never saw them. Region at {data['size']} px, metal "
            f"and screws at {data['dense_size']} px; {args.seeds} seed(s), head config `{args.config}`"
            + (f" with {' '.join(args.overrides)}" if args.overrides else "") + "."), "",
           (f"Oracles at {oracle['size']} px (a perfect head of each design, native px): metal Dice {m['dice']:.3f} "
            f"over {m['images']} images; screws recall {s['recall']:.3f}, precision {s['precision']:.3f}, head / tip "
            f"L1 {s['head_l1_px']:.2f} / {s['tip_l1_px']:.2f} px, angle {s['angle_deg']:.2f} deg (matching gate "
            f"{s['gate_px']:.0f} native px on average: 5 % of the long side)."), "", table, ""]
    if top:
        from tasks.heads.training import TASKS

        runs = []
        if "region" in top:
            region = top["region"]
            runs.append(f"with a linear head at {region['size']} px (region accuracy {region['accuracy']:.3f}, "
                        f"{region['minutes']:.0f} min)")
        if "metal" in top:
            runs.append(f"with the metal decoder on the dense heads' windows of the {top['metal']['size']} px images "
                        f"(Dice {top['metal']['dice']:.3f}, {top['metal']['minutes']:.0f} min)")
        if "screws" in top:
            screws = top["screws"]
            runs.append(f"with the screw head on those windows (recall {screws['recall']:.3f}, precision "
                        f"{screws['precision']:.3f}, {screws['minutes']:.0f} min)")
        skipped = [task for task in TASKS if task not in top]
        epochs = next(iter(top.values()))["epochs"]
        out += [(f"Supervised ceilings: the random-init {summary['arch']} trained end to end, seed 0, {epochs} "
                 f"epochs each, " + "; ".join(runs) + "."
                 + (f" Not run: {', '.join(skipped)} (`--ceiling-tasks`)." if skipped else "")), ""]
    out += ["95 % intervals with the test patients resampled (seed 0):", "",
            "| task | metric | floor | random-init | pretrained | pretrained - floor | pretrained - random-init |",
            "|---|---|---|---|---|---|---|"]
    out += [f"| {r['task']} | {r['metric']} | {_ci(r.get('floor'))} | {_ci(r.get('random'))} | "
            f"{_ci(r.get('pretrained'))} | {_ci(r.get('minus_floor'), True)} | {_ci(r.get('minus_random'), True)} |"
            for r in rows]
    if rival is not None:
        mine, theirs = summary["backbone"], rival["backbone"]
        out += ["", f"Against `{theirs}` (`--against`: the same heads, seeds, images and test patients): its own "
                    "table, then both backbones and their difference, seed 0, the test patients resampled (seed 0):",
                "",
                rival["markdown"].split("\n\n", 2)[-1], "",
                f"| task | metric | `{theirs}` | `{mine}` | `{mine}` - `{theirs}` |", "|---|---|---|---|---|"]
        out += [f"| {r['task']} | {r['metric']} | {_ci(r['rival'])} | {_ci(r['pretrained'])} | "
                f"{_ci(r['minus_rival'], True)} |" for r in against_rows(summary["branches"], rival["branches"])]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--home", type=Path, required=True, help="a home with a registered, pretrained backbone")
    parser.add_argument("--backbone", default=None, help="registered backbone URI (default: the heads flow's)")
    parser.add_argument("--against", default=None, metavar="URI",
                        help="another registered backbone: the same heads on it, and --backbone minus it, paired")
    parser.add_argument("--tasks", default=None, help="comma-separated heads to run (default: region,metal,screws)")
    parser.add_argument("--studies", type=int, default=300, help="evaluation patients (one study each)")
    parser.add_argument("--seed", type=int, default=1, help="corpus seed (the demo corpus is seed 0)")
    parser.add_argument("--seeds", type=int, default=3, help="head seeds")
    parser.add_argument("--config", default="eval", help="head config (deployments/heads/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="head config override, e.g. seg_epochs=20")
    parser.add_argument("--ceiling-epochs", type=int, default=10, help="the ceilings' epochs (0: skip)")
    parser.add_argument("--ceiling-tasks", default=None,
                        help="the tasks whose ceiling to train, comma-separated (default: region, metal, screws; "
                             "the dense ones take longest)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/dax-heads-eval"), help="scratch folder")
    parser.add_argument("--no-write", dest="write", action="store_false", help="do not update BENCHMARKS.md")
    args = parser.parse_args()
    from tasks.heads.training import TASKS

    def task_list(option: str, value: str | None) -> tuple[str, ...]:
        chosen = TASKS if value is None else tuple(task.strip() for task in value.split(",") if task.strip())
        unknown = set(chosen) - set(TASKS)
        if unknown or not chosen:     # before the corpus, ingestion and heads, not 12 minutes in
            what = f"unknown task(s) {', '.join(sorted(unknown))}" if unknown else "no task given"
            parser.error(f"{option}: {what} (choose among {', '.join(TASKS)})")
        return chosen

    tasks = task_list("--tasks", args.tasks)
    ceiling_tasks = tuple(task for task in task_list("--ceiling-tasks", args.ceiling_tasks) if task in tasks)
    began = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["PREFECT_HOME"] = str(args.out / "prefect")     # this process's flows and every dax() beneath
    corpus, home = prepare(args)
    labels = corpus / "labels.parquet"

    import yaml

    from flows.heads import heads
    from tasks.heads.training import load_head_config
    from tasks.release.registry import DEFAULT_BACKBONE

    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.overrides)}
    config = load_head_config(args.config, {**overrides, "e2e_epochs": 0})
    oracle = oracles(labels, config.dense_size)
    backbone = args.backbone or DEFAULT_BACKBONE
    run = dict(home=str(home), labels=str(labels), seeds=args.seeds, config=args.config, tasks=tasks,
               overrides={**overrides, "e2e_epochs": 0}, register_heads=False)
    summary = heads(backbone=backbone, **run)
    rival = heads(backbone=args.against, **run) if args.against else None
    top = ceilings(home, labels, backbone, config, args.ceiling_epochs, ceiling_tasks) \
        if args.ceiling_epochs > 0 and ceiling_tasks else None
    text = report(args, summary, oracle, top, intervals(summary["branches"]), (time.perf_counter() - began) / 60,
                  rival)
    print(text)
    if args.write:
        from benchmarks_md import write_section
        if rival is None:
            write_section(f"heads-eval-{summary['arch']}", f"The heads on the evaluation corpus ({summary['arch']}): "
                          "floor, random init, pretrained, ceiling", text)
        else:       # a comparison of two backbones: its own section, the architecture's table stays
            write_section(f"heads-eval-{summary['arch']}-against", f"The heads on the evaluation corpus "
                          f"({summary['arch']}): one backbone against another, paired", text)


if __name__ == "__main__":
    main()
