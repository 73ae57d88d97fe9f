"""How much the demo's kNN margin depends on which patients are held out: one corpus, several secrets.

    .venv/bin/python benchmarks/knn_splits.py --splits 5                 # 5 splits of the demo corpus, with lightly
    .venv/bin/python benchmarks/knn_splits.py --splits 2 --studies 40 --set epochs=1 --no-lightly   # a quick look

Patients are split by a hash of their pseudonymous key (``tasks.ingest.labels.patient_split``), and that key
comes from the de-identification secret. ``make demo`` draws a throw-away secret, so every demo holds out
different patients and reports its kNN monitor on them. This script measures the spread of that must-show
figure: it generates the demo corpus once, ingests it under N fresh secrets (each held in memory only, in the
environment of its own ``dax ingest``), pretrains ``--config`` (``demo-cpu``) on each home with the corpus'
labels, one after the other, then trains the same architecture supervised on the kNN bank's regions with the
same image budget (``benchmarks/knn_ceiling.py``: the ceiling) and (unless ``--no-lightly``; needs the
``bench`` extra) lightly's DINO on the same job's images, config and kNN probe
(``benchmarks/lightly_dino.py``), and prints one row per split: the held-out images, their patients, the
majority-class share (what always answering the held-out set's most frequent region scores), the upper-limb
share (the regions the demo backbone confuses with their lower-limb look-alikes), the same kNN on 16 x 16
pixel thumbnails (no backbone), the kNN accuracy at random init, at its best epoch and after the last epoch,
the margin's 95 % interval with the held-out patients resampled (``tasks.pretrain.main_dino.knn_margin``), the
supervised ceiling's kNN accuracy, lightly's final kNN accuracy and the interval of ours minus lightly's (the
same paired resampling). A second table puts the kNN monitor's two readouts of the same teacher side by side
(the final pool, and the layout readout: its last feature map pooled to 3 x 3, ``monitor.LAYOUT_READOUT``), each
with its margin over random init and its paired interval over the thumbnails. Each row is also appended to
``OUT/rows.jsonl`` as it comes. Each home is deleted after its row unless ``--keep``; ``--add-lightly`` trains
lightly's DINO later on the kept homes of such a run whose rows lack it (read both ways, beside ours in the
second table) and prints the tables again::

    .venv/bin/python benchmarks/knn_splits.py --splits 5 --no-lightly --keep --out /tmp/ks    # lightly's later:
    .venv/bin/python benchmarks/knn_splits.py --add-lightly --out /tmp/ks

``--variant KEY=VALUE`` (repeat) pretrains a second time on each home with those overrides on top of ``--set``
(the same images, held-out queries and seed) and reports the variant beside the default: its kNN, its own
margin over random init, and the paired intervals of variant minus default (by both readouts) and variant minus
lightly's on the same queries, so a candidate change is judged split by split against what it would replace::

    .venv/bin/python benchmarks/knn_splits.py --splits 2 --config demo-cpu-resnet18 \
        --variant augment.jitter=0 --variant augment.solarize_p=0 --variant augment.blur=sharpness

(the photometric views off, as the demo configs were until 2026-12-06: docs/experiments.md, sections 20-21).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dax_cli import dax  # noqa: E402

from tasks.pretrain.monitor import margin_brief  # noqa: E402


UPPER_LIMB = ("shoulder and upper arm", "elbow-forearm-hand")   # the regions the demo backbone confuses most


def held_out_patients(home: Path, labels: Path) -> tuple[int, str, float]:
    """(test patients, their most frequent region, the upper-limb share of their images) for a home."""
    from tasks.ingest.labels import load_labels
    from tasks.label_schema import BODY_REGIONS

    assert set(UPPER_LIMB) <= set(BODY_REGIONS), "the generator renamed a region"
    rows = [r for r in load_labels(home, labels, ("region",)).to_pylist() if r["split"] == "test"]
    regions = collections.Counter(r["region"] for r in rows)
    upper = sum(regions[name] for name in UPPER_LIMB) / max(len(rows), 1)
    return len({r["patient_key"] for r in rows}), regions.most_common(1)[0][0] if regions else "-", upper


def pretrain(home: Path, corpus: Path, config: str, overrides: list[str]) -> Path:
    """One ``dax pretrain`` on ``home`` with the corpus' labels; its job folder."""
    before = set((home / "pretrain").glob("*"))
    sets = [item for pair in overrides for item in ("--set", pair)]
    dax("pretrain", "--config", config, "--home", str(home), "--labels", str(corpus / "labels.parquet"),
        "--device", "cpu", *sets)
    (job,) = set((home / "pretrain").glob("*")) - before
    return job


def final_knn(job: Path) -> dict:
    """The job's kNN monitor entry after its last epoch, with its per-query hits (the checkpoint keeps them;
    result.json only the rates): ``"hits"`` for the final pool, ``"hits_layout"`` for the layout readout."""
    from tasks.pretrain.main_dino import CHECKPOINT, load_checkpoint

    return load_checkpoint(job / "checkpoints" / CHECKPOINT)["knn"][-1]


def lightly_columns(job: Path, probe: dict, ours: dict) -> dict:
    """lightly's DINO trained on ``job``'s images, config and kNN probe (``benchmarks/lightly_dino.py``, in its own
    process), and ours (``final_knn(job)``) minus lightly's per readout, paired on the same queries."""
    from tasks.pretrain.monitor import knn_margin

    began = time.perf_counter()
    subprocess.run([sys.executable, str(Path(__file__).with_name("lightly_dino.py")), "--job", str(job)],
                   check=True, capture_output=True, text=True)
    theirs = json.loads((job / "lightly.json").read_text())
    return {"lightly": theirs["knn"][-1]["knn_accuracy"], "lightly_random": theirs["knn"][0]["knn_accuracy"],
            "versus_lightly": knn_margin(probe, theirs["final_hits"], ours["hits"]),
            "lightly_layout": theirs["knn"][-1]["knn_accuracy_layout"],
            "layout_versus_lightly": knn_margin(probe, theirs["final_hits_layout"], ours["hits_layout"]),
            "lightly_min": (time.perf_counter() - began) / 60}


def one_split(index: int, corpus: Path, out: Path, overrides: list[str], config: str = "demo-cpu",
              lightly: bool = True, variant: tuple[str, ...] = ()) -> dict:
    import torch

    from knn_ceiling import knn_ceiling
    from tasks.pretrain.monitor import knn_margin, margin_verdict

    home = out / f"split-{index}"
    shutil.rmtree(home, ignore_errors=True)   # a split is a fresh home: an old one keeps its old patient keys
    secret = secrets.token_hex(32)   # this split's key: never written, gone with this function
    dax("ingest", str(corpus / "dicom"), "--home", str(home), env={"DAX_DEID_SECRET": secret})
    del secret
    ingested = time.perf_counter()
    job = pretrain(home, corpus, config, overrides)
    pretrain_min = (time.perf_counter() - ingested) / 60
    prepared = json.loads((job / "prepare.json").read_text())
    result = json.loads((job / "result.json").read_text())
    knn = result["knn"]
    patients, majority_region, upper_limb = held_out_patients(home, corpus / "labels.parquet")
    ceiling = knn_ceiling(job)
    probe = torch.load(job / "knn.pt", weights_only=False)     # the bank and queries every model is scored on
    ours = final_knn(job)
    theirs = lightly_columns(job, probe, ours) if lightly else {}
    if variant:
        began = time.perf_counter()
        other = pretrain(home, corpus, config, [*overrides, *variant])
        same = torch.load(other / "knn.pt", weights_only=False)
        assert all(torch.equal(same[key], probe[key]) for key in ("queries", "query_labels", "query_patients")), \
            "the variant was scored on other queries: not paired"
        result_v = json.loads((other / "result.json").read_text())
        final_v = final_knn(other)
        hits_v = final_v["hits"]
        theirs.update(variant=result_v["knn"][-1]["knn_accuracy"], variant_random=result_v["knn"][0]["knn_accuracy"],
                      variant_verdict=margin_verdict(result_v["knn_margin"]),
                      variant_versus_default=knn_margin(probe, ours["hits"], hits_v),
                      variant_layout=result_v["knn"][-1]["knn_accuracy_layout"],
                      variant_layout_versus_default=knn_margin(probe, ours["hits_layout"], final_v["hits_layout"]),
                      variant_min=(time.perf_counter() - began) / 60)
        if lightly:
            lightly_hits = json.loads((job / "lightly.json").read_text())["final_hits"]
            theirs["variant_versus_lightly"] = knn_margin(probe, lightly_hits, hits_v)
    return {**theirs, "split": index, "held_out": prepared["held_out"], "patients": patients,
            "majority": prepared["chance_majority"], "majority_region": majority_region, "upper_limb": upper_limb,
            "thumbnails": prepared["knn_thumbnails"], "random": knn[0]["knn_accuracy"],
            "best": max(k["knn_accuracy"] for k in knn[1:] or knn), "final": knn[-1]["knn_accuracy"],
            "interval": (result["knn_margin"]["low"], result["knn_margin"]["high"]),
            "verdict": margin_verdict(result["knn_margin"]), "ceiling": ceiling["ceiling"],
            "versus_thumbnails": result["knn_margin_over_thumbnails"]["pool"],
            "layout_random": knn[0]["knn_accuracy_layout"], "layout": knn[-1]["knn_accuracy_layout"],
            "layout_verdict": margin_verdict(result["knn_layout_margin"]),
            "layout_versus_thumbnails": result["knn_margin_over_thumbnails"]["layout"], "pretrain_min": pretrain_min}


def table(rows: list[dict]) -> str:
    lines = ["| split | held-out images (patients) | majority region of the held-out set | its share | upper limb | "
             "kNN 16x16 thumbnails | kNN random init | kNN best epoch | kNN final | final - random | "
             "its 95 % interval (held-out patients resampled) | kNN supervised ceiling | lightly's DINO, final | "
             "ours - lightly's (95 %) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "lightly" in r:
            v = r["versus_lightly"]
            lightly = f"{r['lightly']:.3f} | {margin_brief(v)}"
        else:
            lightly = "- | -"
        lines.append(f"| {r['split']} | {r['held_out']} ({r['patients']}) | {r['majority_region']} | "
                     f"{r['majority']:.3f} | {r['upper_limb']:.0%} | {r['thumbnails']:.3f} | {r['random']:.3f} | "
                     f"{r['best']:.3f} | {r['final']:.3f} | {r['final'] - r['random']:+.3f} | "
                     f"{r['interval'][0]:+.3f} to {r['interval'][1]:+.3f}: {r['verdict']} | {r['ceiling']:.3f} | "
                     f"{lightly} |")
    return "\n".join(lines)


def layout_table(rows: list[dict]) -> str:
    """The kNN monitor's two readouts of the same teacher, split by split, against the thumbnails (paired), and
    lightly's teacher read the same two ways where it was trained with both readouts."""
    lines = ["| split | kNN 16x16 thumbnails | final pool: random init | final | its margin over random init | "
             "final pool - thumbnails (95 %) | layout readout: random init | final | its margin over random init | "
             "layout readout - thumbnails (95 %) | lightly's DINO: final pool | layout readout | "
             "ours - lightly's, layout readout (95 %) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lightly = (f"{r['lightly']:.3f} | {r['lightly_layout']:.3f} | {margin_brief(r['layout_versus_lightly'])}"
                   if "lightly_layout" in r else "- | - | -")
        lines.append(f"| {r['split']} | {r['thumbnails']:.3f} | {r['random']:.3f} | {r['final']:.3f} | "
                     f"{r['final'] - r['random']:+.3f} ({r['verdict']}) | {margin_brief(r['versus_thumbnails'])} | "
                     f"{r['layout_random']:.3f} | {r['layout']:.3f} | {r['layout'] - r['layout_random']:+.3f} "
                     f"({r['layout_verdict']}) | {margin_brief(r['layout_versus_thumbnails'])} | {lightly} |")
    return "\n".join(lines)


def variant_table(rows: list[dict], variant: list[str]) -> str:
    """The variant beside the default, split by split, paired on the same queries; the final pool, then the layout
    readout (rows written before the variant's layout readout was kept show "-" there)."""
    lines = [f"variant: {' '.join(variant)}", "",
             "| split | kNN 16x16 thumbnails | default, final | variant: random init | variant, final | "
             "its margin over random init | variant - default (95 %) | variant - lightly's (95 %) | "
             "default, layout readout | variant, layout readout | variant - default, layout readout (95 %) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        versus = margin_brief(r["variant_versus_lightly"]) if "variant_versus_lightly" in r else "-"
        layout = (f"{r['layout']:.3f} | {r['variant_layout']:.3f} | "
                  f"{margin_brief(r['variant_layout_versus_default'])}" if "variant_layout" in r else "- | - | -")
        lines.append(f"| {r['split']} | {r['thumbnails']:.3f} | {r['final']:.3f} | {r['variant_random']:.3f} | "
                     f"{r['variant']:.3f} | {r['variant_verdict']} | {margin_brief(r['variant_versus_default'])} | "
                     f"{versus} | {layout} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--splits", type=int, default=4, help="secrets to ingest the corpus under")
    parser.add_argument("--studies", type=int, default=200, help="demo-preset studies (the demo makes 200)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/dax-knn-splits"), help="scratch folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a --config override, as dax pretrain --set (repeat)")
    parser.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE",
                        help="pretrain again on each home with this override too, paired against the default (repeat)")
    parser.add_argument("--keep", action="store_true", help="keep each split's home")
    parser.add_argument("--config", default="demo-cpu", help="the pretraining config (default demo-cpu)")
    parser.add_argument("--no-lightly", dest="lightly", action="store_false",
                        help="skip lightly's DINO (it needs the bench extra and as long again)")
    parser.add_argument("--add-lightly", action="store_true",
                        help="no new splits: train lightly's DINO on the kept homes of an earlier --keep run in --out "
                             "whose rows lack it, rewrite OUT/rows.jsonl and print the tables")
    args = parser.parse_args()
    from tasks.home import QUIET_DEFAULTS
    for key, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if args.add_lightly:
        report(add_lightly(args.out), args.variant)
        return
    os.environ["PREFECT_HOME"] = str(args.out / "prefect")     # every dax() beneath: one Prefect database
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = args.out / "corpus"
    dax("synth", str(corpus), "--studies", str(args.studies), "--preset", "demo")
    rows = []
    for index in range(1, args.splits + 1):
        rows.append(one_split(index, corpus, args.out, args.overrides, args.config, args.lightly, tuple(args.variant)))
        r = rows[-1]
        with open(args.out / "rows.jsonl", "a") as saved:   # each row as it comes: a stopped run keeps its rows
            saved.write(json.dumps(r, default=str) + "\n")
        others = [f"{who} {r[key]:.1f}" for who, key in (("lightly's", "lightly_min"), ("the variant's", "variant_min"))
                  if key in r]
        print(f"split {index}: kNN {r['random']:.3f} -> {r['final']:.3f} (majority {r['majority']:.3f}, "
              f"thumbnails {r['thumbnails']:.3f}, supervised ceiling {r['ceiling']:.3f}"
              + (f", lightly's {r['lightly']:.3f}" if "lightly" in r else "")
              + (f", variant {r['variant']:.3f}" if "variant" in r else "")
              + f"), pretraining {r['pretrain_min']:.1f} min" + (f" ({', '.join(others)})" if others else ""),
              flush=True)
        if not args.keep:
            shutil.rmtree(args.out / f"split-{index}")
    report(rows, args.variant)


def add_lightly(out: Path) -> list[dict]:
    """lightly's columns added to the rows of an earlier ``--keep`` run whose rows lack them (each split's first
    job, the default run, on its kept home); ``out/rows.jsonl`` rewritten after each split."""
    import torch

    saved = out / "rows.jsonl"
    rows = [json.loads(line) for line in saved.read_text().splitlines()]
    for r in rows:
        if "lightly_layout" in r:
            continue
        if "layout" not in r:
            raise SystemExit(f"split {r['split']} ran before the monitor's layout readout: run fresh splits instead")
        job = sorted((out / f"split-{r['split']}" / "pretrain").glob("*"))[0]     # timestamped: the default first
        ours = final_knn(job)
        assert ours["knn_accuracy"] == r["final"], f"{job.name} is not split {r['split']}'s run"
        r.update(lightly_columns(job, torch.load(job / "knn.pt", weights_only=False), ours))
        print(f"split {r['split']}: lightly's {r['lightly']:.3f} (layout readout {r['lightly_layout']:.3f}), "
              f"ours {r['final']:.3f} ({r['layout']:.3f}), {r['lightly_min']:.1f} min", flush=True)
        saved.write_text("".join(json.dumps(row, default=str) + "\n" for row in rows))
    return rows


def report(rows: list[dict], variant: list[str]) -> None:
    """The tables and counts of a run's rows, as printed at its end."""
    margins = [r["final"] - r["random"] for r in rows]
    print()
    print(table(rows))
    print(f"\nmargin over random init: mean {sum(margins) / len(margins):+.3f}, "
          f"min {min(margins):+.3f}, max {max(margins):+.3f}")
    beaten = sum(r["final"] > r["thumbnails"] for r in rows)
    print(f"the pretrained backbone beats the 16x16 thumbnails on {beaten} of {len(rows)} splits")
    capped = sum(r["ceiling"] <= r["thumbnails"] for r in rows)
    print(f"the supervised ceiling itself is at or under the thumbnails on {capped} of {len(rows)} splits")
    clear = sum(r["verdict"] == "clear" for r in rows)
    print(f"a clear margin (its interval above 0) on {clear} of {len(rows)} splits")
    print()
    print(layout_table(rows))
    for name, key, verdict, versus in (("final pool", "final", "verdict", "versus_thumbnails"),
                                       ("layout readout", "layout", "layout_verdict", "layout_versus_thumbnails")):
        print(f"the {name}: a clear margin over random init on {sum(r[verdict] == 'clear' for r in rows)} of "
              f"{len(rows)}, above the 16x16 thumbnails on {sum(r[key] > r['thumbnails'] for r in rows)} "
              f"({sum(r[versus]['low'] > 0 for r in rows)} with the interval above 0)")
    if all("lightly" in r for r in rows):
        ahead = sum(r["final"] > r["lightly"] for r in rows)
        clearly = sum(r["versus_lightly"]["low"] > 0 for r in rows)
        print(f"ours beats lightly's DINO at the same budget on {ahead} of {len(rows)} splits "
              f"({clearly} with the interval above 0)")
    if all("lightly_layout" in r for r in rows):
        ahead = sum(r["layout"] > r["lightly_layout"] for r in rows)
        clearly = sum(r["layout_versus_lightly"]["low"] > 0 for r in rows)
        print(f"read by the layout readout, ours beats lightly's on {ahead} of {len(rows)} splits "
              f"({clearly} with the interval above 0)")
    if variant:
        print()
        print(variant_table(rows, variant))
        counts = {"a clear margin over random init": sum(r["variant_verdict"] == "clear" for r in rows),
                  "beats the 16x16 thumbnails": sum(r["variant"] > r["thumbnails"] for r in rows),
                  "beats the default": sum(r["variant"] > r["final"] for r in rows),
                  "beats the default with the interval above 0":
                      sum(r["variant_versus_default"]["low"] > 0 for r in rows)}
        if all("variant_versus_lightly" in r for r in rows):
            counts["beats lightly's DINO"] = sum(r["variant"] > r["lightly"] for r in rows)
        if all("variant_layout" in r for r in rows):
            counts["by the layout readout, beats the default"] = sum(r["variant_layout"] > r["layout"] for r in rows)
            counts["by the layout readout, beats the 16x16 thumbnails"] = sum(r["variant_layout"] > r["thumbnails"]
                                                                            for r in rows)
        print("the variant: " + "; ".join(f"{what} on {n} of {len(rows)}" for what, n in counts.items()))
    print("command: " + shlex.join(["python", "benchmarks/knn_splits.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
