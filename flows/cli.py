"""`dax`: the command-line door to the pipeline's flows."""
from __future__ import annotations

import inspect
import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Optional, Sequence

import typer
from rich.console import Console

from tasks.home import configure
from tasks.release.registry import DEFAULT_BACKBONE, backbone_uri

# never print local variables with a traceback: they can hold paths with patient names, or the secret
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="DAX: C-arm X-ray DICOM to foundation models.")
catalog_app = typer.Typer(no_args_is_help=True, help="Query the dataset catalog (read-only, from its published snapshot).")
app.add_typer(catalog_app, name="catalog")
console = Console()
HOME_OPTION = typer.Option(None, "--home", envvar="DAX_HOME", help="DAX home folder (default: ./dax-home).")


# The choices, as typer checks and lists them (tests/test_cli.py keeps them equal to the stages' own lists;
# spelled here so that `dax --help` imports no stage).
class Preset(str, Enum):
    full = "full"
    demo = "demo"
    eval = "eval"
    test = "test"


class ImageFormat(str, Enum):
    npy = "npy"
    png = "png"


class Runner(str, Enum):
    process = "process"
    dask = "dask"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Modality(str, Enum):
    XA = "XA"
    RF = "RF"
    DX = "DX"
    CR = "CR"


class Task(str, Enum):
    region = "region"
    metal = "metal"
    screws = "screws"


# options that several commands share
DEVICE_OPTION = typer.Option(Device.auto, help="Where to compute.")
NPROC_OPTION = typer.Option(1, "--nproc-per-node", help="Processes (GPUs) for DDP through torchrun.")
WHERE_OPTION = typer.Option(None, help="SQL condition on the catalog's images, e.g. \"modality = 'XA'\".")
SEEDS_OPTION = typer.Option(3, help="Seeds per head (figures are mean and sd over them).")
LABELS_OPTION = typer.Option(None, help="labels.parquet of a synthetic corpus: enables the kNN monitor "
                                          "(and the heads, where they run).")
RETRAIN_CONFIGS = typer.Option(["demo-cpu"], "--config", help="Pretraining configs (repeat the option): named "
                                                             "(demo-cpu, demo-cpu-resnet18, dax-vits16, "
                                                             "dax-resnet50) or YAML files.")
HEADS_CONFIG = typer.Option(None, "--heads-config", help="Head config (demo) or a YAML file; default: built-in budgets.")


def _version(value: bool) -> None:
    if value:
        from tasks.version import code_version
        typer.echo(code_version())
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version (and git commit in a checkout) and exit.")) -> None:
    """DAX: C-arm X-ray DICOM to foundation models."""


# The stages' errors a user can fix, by module: looked up only once an error is raised, and only in modules
# already imported (an error whose module was never imported cannot have been raised). Importing them
# up front cost a command 4 to 11 s (torchvision via tasks.pretrain.main_dino; BENCHMARKS.md, start-up).
USER_ERRORS = {
    "tasks.heads.data": ("HeadDataError",),
    "tasks.heads.training": ("HeadConfigError",),
    "tasks.ingest.catalog": ("CatalogError",),
    "tasks.ingest.deidentify": ("DeidError",),
    "tasks.ingest.labels": ("LabelError",),
    "tasks.pretrain.main_dino": ("ConfigError",),
    "tasks.release.predict": ("PredictError",),
    "tasks.release.registry": ("StoreError", "UnknownModel"),
    "tasks.synth.corpus": ("CorpusMismatch",),
}


def _user_error_types() -> tuple[type[BaseException], ...]:
    loaded = ((sys.modules.get(module), names) for module, names in USER_ERRORS.items())
    return (NotADirectoryError, FileNotFoundError,
            *(getattr(module, name) for module, names in loaded if module is not None for name in names))


@contextmanager
def user_errors():
    """Errors a user can fix (no secret, no snapshot yet, a busy catalog, a refused query, a source that
    is not a folder, a corpus made with other settings, an MLflow store from a newer MLflow) as one clear line and
    exit code 2."""
    try:
        yield
    except Exception as error:
        if not isinstance(error, _user_error_types()):
            raise
        console.print(f"[red]error:[/] {error}", highlight=False)
        raise typer.Exit(2) from None


def preflight(source: Path | None = None, configs: Sequence[str] = (), overrides: dict | None = None,
              secret: bool = False, labels: Path | None = None, heads_config: str | None = None,
              home: Path | None = None, catalog: bool = False, where: str | None = None,
              backbone: str | None = None, resume: str | None = None) -> None:
    """What a flow refuses at its start, refused before the flow (and Prefect's API with it) starts, as
    `user_errors`' one line (inside a flow, a refusal also logs its traceback). The flows keep their own checks,
    for deployments. The command's own arguments first, then what it needs in ``home``: ``catalog``, a published
    catalog snapshot; ``backbone``, a registered model (a home without an MLflow store is refused, not given one);
    ``resume``, a pretraining job to resume; last what reads the catalog: ``where``, pretraining's selection of
    its images, and ``labels`` (with ``catalog``), a label file of images this home ingested, of training and test
    patients."""
    if secret:
        from tasks.ingest.deidentify import load_key
        load_key()
    if source is not None:
        from tasks.ingest.triage import check_source
        check_source(source)
    if labels is not None and not Path(labels).is_file():
        raise FileNotFoundError("the labels file (--labels) does not exist")   # its path is not echoed
    if configs:
        from tasks.pretrain.main_dino import load_config
        for config in configs:
            load_config(config, overrides)
    if heads_config is not None:
        from tasks.heads.training import load_head_config
        load_head_config(heads_config)
    if catalog:
        from tasks.ingest.catalog import NO_SNAPSHOT_MESSAGE, SnapshotMissingError, snapshot_path
        if not snapshot_path(home).is_file():
            raise SnapshotMissingError(NO_SNAPSHOT_MESSAGE)
    if backbone is not None:
        from tasks.release.registry import require_registry, resolve_model
        require_registry(home)
        resolve_model(backbone)
    if resume is not None:
        from tasks.pretrain.steps import resumable_job   # loads Prefect's client, not its API: rare enough
        resumable_job(home, resume)
    if catalog and where is not None:
        from tasks.pretrain.data import select_images
        select_images(home, where)
    if catalog and labels is not None:
        from tasks.ingest.labels import LabelError, load_labels
        splits = set(load_labels(home, labels).column("split").to_pylist())    # LabelError: not ingested here
        if not {"train", "test"} <= splits:
            raise LabelError(f"every labelled patient falls in the {' and '.join(sorted(splits))} split: the heads "
                             "and the kNN monitor need training and test patients (label more patients)")


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Corpus folder to create or extend."),
    studies: int = typer.Option(200, help="Number of studies to generate (200 demo studies: about 2,000 images)."),
    seed: int = typer.Option(0, help="Corpus seed: the same seed gives the same bytes."),
    start: int = typer.Option(0, help="First study index (seed ranges let several runs build one corpus)."),
    preset: Preset = typer.Option(Preset.demo, help="full (native detectors, 50-200 view sweeps), demo, eval (the "
                                  "heads' labelled evaluation corpus: one study per patient, a few frames per series; "
                                  "300+ studies, another seed) or test."),
    batch_size: int = typer.Option(4, help="Studies per Prefect task run."),
    workers: int = typer.Option(2, help="Worker processes."),
    detector_scale: Optional[float] = typer.Option(None, help="Override the preset's detector scale."),
    home: Optional[Path] = HOME_OPTION,
) -> None:
    """Generate synthetic C-arm studies: DICOM export, labels.parquet and phi.parquet (the run's Prefect state
    goes to HOME)."""
    configure(home)
    from flows.runners import SharedAPIProcessPool
    from flows.synth import synth as synth_flow

    with user_errors():
        result = synth_flow.with_options(task_runner=SharedAPIProcessPool(max_workers=workers))(
            out=str(out), studies=studies, seed=seed, start=start, preset=preset.value, batch_size=batch_size,
            detector_scale=detector_scale,
        )
    console.print(f"[bold]{result['images']}[/] images in {result['files']} files "
                  f"({result['resumed_batches']} batches resumed); corpus now holds {result['corpus_images']} images, "
                  f"{result['phi_values']} planted PHI values listed in {out / 'phi.parquet'}")


@app.command()
def montage(
    corpus: Path = typer.Argument(..., help="A corpus folder made by `dax synth`."),
    out: Path = typer.Option(Path("docs/montage.png"), help="PNG to write."),
    real: bool = typer.Option(True, help="Add the real radiographs of pydicom-data and deid-data."),
) -> None:
    """One image per body region with its metal mask and screw points, beside real radiographs."""
    from tasks.synth.montage import make_montage

    console.print(f"montage written to {make_montage(corpus, out, include_real=real)}")


@app.command()
def ingest(
    source: Path = typer.Argument(..., help="Folder of raw DICOM (a hospital export); it is only read."),
    home: Optional[Path] = HOME_OPTION,
    modality: list[Modality] = typer.Option([m.value for m in Modality], case_sensitive=False,
                                            help="Modalities to accept (repeat the option; a later run that takes "
                                                 "more reads the files skipped for theirs)."),
    max_size: int = typer.Option(1024, help="Long side of the stored images, in pixels."),
    frame_step: int = typer.Option(1, help="Keep every k-th frame of multi-frame files."),
    batch_size: int = typer.Option(32, help="Files per Prefect task run."),
    shard_mb: int = typer.Option(1000, help="Target shard size in MB."),
    image_format: ImageFormat = typer.Option(ImageFormat.npy, help="npy (uint16, fast) or png (16-bit, ~20 % smaller, ~10x slower to write)."),
    workers: int = typer.Option(2, help="Worker processes."),
    runner: Runner = typer.Option(Runner.process, help="process (a local pool) or dask (DAX_DASK_ADDRESS, else a local cluster)."),
    retrain_after_images: int = typer.Option(1000, help="Emit dax.catalog.ready-for-retraining once this many images "
                                                        "are new since the last pretraining (0: never)."),
    rehash: bool = typer.Option(False, help="Read and hash every file, also those a previous survey saw with the "
                                            "same path, size and mtime (skipped unread by default)."),
) -> None:
    """De-identify, normalize and shard a DICOM export into HOME, cataloged in DuckDB."""
    root = configure(home)
    with user_errors():
        preflight(source, secret=True)
        from flows.ingest import ingest as ingest_flow
        from flows.runners import ingest_task_runner

        result = ingest_flow.with_options(task_runner=ingest_task_runner(runner.value, workers))(
            source=str(source), home=str(root), modalities=tuple(m.value for m in modality), max_size=max_size,
            frame_step=frame_step, batch_size=batch_size, shard_target_mb=shard_mb, image_format=image_format.value,
            retrain_after_images=retrain_after_images, rehash=rehash)
    console.print(f"{result['files']} files ({result['unchanged']} unchanged, not read): [bold]{result['ingested']}[/] "
                  f"ingested ({result['images']} images in {result['shards']} shards), {result['duplicates']} "
                  f"duplicates, {result['skipped']} skipped, "
                  f"{result['quarantined']} quarantined. Catalog snapshot: {result['snapshot']}")


@app.command()
def locate(
    sha256: str = typer.Argument(..., help="A file hash from the catalog."),
    source: Path = typer.Argument(..., help="The source folder to search."),
) -> None:
    """Map a catalog hash back to its path on the source side (for operators; prints the path)."""
    from tasks.fileio import sha256_file
    from tasks.ingest.triage import list_source

    wanted = sha256.lower()
    if len(wanted) != 64 or not set(wanted) <= set("0123456789abcdef"):
        raise typer.BadParameter("a SHA-256 is 64 hexadecimal digits", param_hint="SHA256")
    with user_errors():
        for relpath in list_source(source):
            if sha256_file(source / relpath) == wanted:
                console.print(str(source / relpath), markup=False, highlight=False)
                return
    console.print(f"no file under the source has SHA-256 {wanted}")
    raise typer.Exit(1)


@catalog_app.command("sql")
def catalog_sql(
    query: str = typer.Argument(..., help="A read-only SQL query, e.g. \"SELECT status, count(*) FROM sources GROUP BY 1\"."),
    home: Optional[Path] = HOME_OPTION,
    output: str = typer.Option("table", "--format", help="table, csv or json."),
) -> None:
    """Run a read-only query on the catalog snapshot."""
    from tasks.ingest.catalog import query as run_query

    with user_errors():
        typer.echo(run_query(configure(home), query, output))


@catalog_app.command("report")
def catalog_report(
    home: Optional[Path] = HOME_OPTION,
    out: Optional[Path] = typer.Option(None, help="HTML file to write (default: HOME/catalog-report.html)."),
) -> None:
    """An HTML report of the catalog: counts by modality, device and date, quarantine reasons, runs."""
    from tasks.ingest.report import write_report

    root = configure(home)
    with user_errors():
        console.print(f"report written to {write_report(root, out or root / 'catalog-report.html')}")


def _log_progress() -> None:
    """Training progress (steps, loss, kNN) from the `dax.*` loggers: Prefect's console handler prints it."""
    import logging

    logging.getLogger("dax").setLevel(logging.INFO)


def parse_settings(settings: list[str]) -> dict:
    import yaml

    overrides = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set takes KEY=VALUE, not {item!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def pretrain_overrides(settings: list[str], epochs: int | None) -> dict:
    """``dax pretrain``'s config overrides: the ``--set`` items, with ``--epochs`` as ``epochs`` when given
    (``deployments.with_setting``: left out, a ``--set epochs=N`` stays; both given must agree)."""
    from deployments import with_setting

    try:
        return with_setting(parse_settings(settings), "epochs", epochs, "--epochs", "--set epochs")
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


@app.command()
def pretrain(
    config: str = typer.Option("demo-cpu", help="A named config (demo-cpu, demo-cpu-resnet18, dax-vits16, "
                                                "dax-resnet50) or a YAML file."),
    where: Optional[str] = WHERE_OPTION,
    home: Optional[Path] = HOME_OPTION,
    labels: Optional[Path] = LABELS_OPTION,
    device: Device = DEVICE_OPTION,
    nproc_per_node: int = NPROC_OPTION,
    resume: Optional[str] = typer.Option(None, help="Job to continue from its last checkpoint ('last' for the latest)."),
    epochs: Optional[int] = typer.Option(None, help="Override the config's epochs."),
    settings: list[str] = typer.Option([], "--set", help="Override any config setting: KEY=VALUE (augment.local_crops=4)."),
) -> None:
    """DINO pretraining on catalog images; the teacher is registered as dax-backbone-<arch>@candidate."""
    overrides = pretrain_overrides(settings, epochs)
    root = configure(home)
    _log_progress()
    with user_errors():
        preflight(configs=[] if resume else [config], overrides=overrides, labels=labels, home=root,
                  catalog=not resume, where=None if resume else where, resume=resume)
        from flows.pretrain import pretrain as pretrain_flow

        summary = pretrain_flow(config=config, where=where, home=str(root), labels=str(labels) if labels else None,
                                device=device.value, nproc_per_node=nproc_per_node, resume=resume, overrides=overrides)
    _print_pretraining(summary)


def _print_pretraining(summary: dict) -> None:
    from rich.table import Table

    from tasks.pretrain.monitor import margin_lines

    console.print(f"pretraining [bold]{summary['status']}[/]: {summary['step']} of {summary['total_steps']} steps "
                  f"in {summary['seconds']:.0f} s (job {summary['job']}, MLflow run {summary['run_id']})")
    if summary.get("knn"):
        table = Table("epoch", "kNN accuracy, held-out patients", "student", "layout readout",
                      title="body region, k=20 cosine kNN on the teacher (registered) and the student; the layout "
                            "readout: the teacher's last feature map pooled to 3 x 3")
        for row in summary["knn"]:
            student, layout = row.get("knn_accuracy_student"), row.get("knn_accuracy_layout")
            table.add_row("0 (random init)" if row["epoch"] == 0 else str(row["epoch"]), f"{row['knn_accuracy']:.3f}",
                          "-" if student is None else f"{student:.3f}", "-" if layout is None else f"{layout:.3f}")
        prepared = summary["prepared"]
        table.add_row("chance", f"{prepared['chance_uniform']:.3f} uniform, {prepared['chance_majority']:.3f} majority")
        if "knn_thumbnails" in prepared:   # jobs prepared before the reference existed lack it
            table.add_row("16x16 pixel thumbnails", f"{prepared['knn_thumbnails']:.3f}")
        console.print(table)
        for what, text in margin_lines(summary):
            console.print(f"{what}: {text}")
    if summary.get("registered"):
        console.print(f"registered {summary['registered']['uri']} (version {summary['registered']['version']})")


@app.command()
def heads(
    labels: Path = typer.Option(..., help="labels.parquet of the corpus (region, metal masks, screws)."),
    backbone: str = typer.Option(DEFAULT_BACKBONE, help="A registered backbone."),
    home: Optional[Path] = HOME_OPTION,
    seeds: int = SEEDS_OPTION,
    task: list[Task] = typer.Option([t.value for t in Task], help="Tasks (repeat the option)."),
    config: Optional[str] = typer.Option(None, help="A head config (demo) or a YAML file; default: built-in budgets."),
    size: Optional[int] = typer.Option(None, help="Region input size (letterboxed square; default: the config's: 224 "
                                              "built in, 96 in demo)"),
    where: Optional[str] = WHERE_OPTION,
    max_images: Optional[int] = typer.Option(None, help="Use at most this many labelled images."),
    device: Device = DEVICE_OPTION,
    alias: str = typer.Option("candidate", help="Alias for the best head of each task."),
) -> None:
    """Heads on the frozen backbone and on its random-init twin, fanned out over tasks and seeds."""
    root = configure(home)
    with user_errors():
        preflight(labels=labels, heads_config=config, home=root, catalog=True, backbone=backbone)
        from flows.heads import heads as heads_flow

        summary = heads_flow(backbone=backbone, home=str(root), labels=str(labels), seeds=seeds,
                             tasks=tuple(t.value for t in task), size=size, where=where, max_images=max_images,
                             config=config, overrides={"device": device.value}, alias=alias)
    console.print(summary["markdown"], markup=False, highlight=False)


@app.command()
def predict(
    files: list[Path] = typer.Argument(..., help="Projection X-ray DICOM files (XA, RF, DX, CR), ingested or not, "
                                                 "any manufacturer."),
    out: Path = typer.Option(Path("predictions"), "--out", help="Output folder."),
    home: Optional[Path] = HOME_OPTION,
    alias: str = typer.Option("champion", help="Alias of the heads (and backbone) to use (champion, candidate...)."),
    arch: Optional[str] = typer.Option(None, help="One architecture for every task: models:/dax-backbone-ARCH@ALIAS "
                                                  "(default: per task, the best ALIAS head of any architecture)."),
    backbone: Optional[str] = typer.Option(None, help="One backbone URI for every task (default: see --arch)."),
    device: Device = DEVICE_OPTION,
) -> None:
    """De-identify in memory, normalize, run backbones + heads; per file <sha16>.json, _mask.png, .png overlay.
    Per task, the best head under ALIAS on its own backbone (recorded in the JSON's "models"), unless --arch or
    --backbone names one backbone. Without a configured secret, a random key for this run de-identifies (the outputs
    hold no identifier)."""
    root = configure(home)
    from tasks.release.predict import EPHEMERAL_KEY_NOTE, prediction_key
    from tasks.release.predict import predict as run_predict
    from tasks.release.registry import require_registry

    with user_errors():            # a configured secret that is unusable still fails, as one line
        require_registry(root)
        key, ephemeral = prediction_key()
    if ephemeral:
        console.print(f"[dim]{EPHEMERAL_KEY_NOTE}[/]", highlight=False, soft_wrap=True)

    def report(i: int, entry: dict) -> None:   # files by position and hash only: paths can carry names
        # one line per file whatever the terminal's width, so its output path can be copied whole
        if entry["status"] == "ok":
            top = entry["regions"][0] if entry["regions"] else {"label": "?", "probability": 0.0}
            console.print(f"file {i}: {entry['name']}: {top['label']} ({top['probability']:.2f}), "
                          f"{len(entry['screws'])} screws -> {entry['overlay']}", highlight=False, soft_wrap=True)
        else:
            console.print(f"[red]file {i}: refused:[/] {entry['error']}", highlight=False, soft_wrap=True)

    with user_errors():
        results = run_predict(files, out, backbone_uri=backbone or (backbone_uri(arch, alias) if arch else None),
                              alias=alias, home=root, device=device.value, on_result=report, key=key)
    if any(r["status"] != "ok" for r in results):
        raise typer.Exit(1)


def _print_retrained(retrained: dict) -> None:
    """One backbone's outcome of `retrain`: the heads' table, the kNN monitor, the promotion."""
    from tasks.pretrain.monitor import margin_lines

    if "backbone" not in retrained:
        console.print(f"{retrained['config']}: pretraining {retrained.get('status')}, nothing registered")
        return
    if "results_markdown" not in retrained:
        console.print(f"{retrained['config']}: {retrained['backbone']} registered @candidate; no labels: no heads")
        return
    console.print(retrained["results_markdown"], markup=False, highlight=False)
    knn = retrained.get("knn") or []
    if knn:
        thumbnails = retrained.get("knn_thumbnails")
        layout = (f" (layout readout {knn[0]['knn_accuracy_layout']:.3f} -> {knn[-1]['knn_accuracy_layout']:.3f})"
                  if "knn_accuracy_layout" in knn[0] and "knn_accuracy_layout" in knn[-1] else "")
        console.print(f"kNN body-region accuracy during pretraining: random init {knn[0]['knn_accuracy']:.3f} -> "
                      f"{knn[-1]['knn_accuracy']:.3f} after {knn[-1]['epoch']} epochs{layout}"
                      + (f"; on 16x16 pixel thumbnails {thumbnails:.3f}" if thumbnails is not None else ""))
        for what, text in margin_lines(retrained):
            console.print(f"kNN {what}: {text}")
    promotion = retrained["promotion"]
    why = [f"{r['metric']} {r['candidate']:.3f} against {r['champion']:.3f} ({r['verdict']})"
           for r in promotion.get("rows", []) if r["verdict"] in ("worse", "not above floor")]
    console.print(f"promotion: {retrained['backbone']} is now @{promotion['alias']}"
                  + (": " + "; ".join(why) if why else ""), highlight=False)


@app.command()
def retrain(
    labels: Optional[Path] = LABELS_OPTION,
    config: list[str] = RETRAIN_CONFIGS,
    where: Optional[str] = WHERE_OPTION,
    home: Optional[Path] = HOME_OPTION,
    device: Device = DEVICE_OPTION,
    nproc_per_node: int = NPROC_OPTION,
    seeds: int = SEEDS_OPTION,
    heads_config: Optional[str] = HEADS_CONFIG,
) -> None:
    """The `retrain` deployment's flow: per config, pretrain (or reuse a finished job), heads, promotion."""
    root = configure(home)
    _log_progress()
    with user_errors():
        preflight(configs=config, labels=labels, heads_config=heads_config, home=root, catalog=True, where=where)
        from flows.pipeline import retrain as retrain_flow

        outcome = retrain_flow(configs=config, where=where, home=str(root), labels=str(labels) if labels else None,
                               device=device.value, nproc_per_node=nproc_per_node, seeds=seeds,
                               heads_config=heads_config)
    for retrained in outcome["retrained"]:
        _print_retrained(retrained)


@app.command("pipeline")
def pipeline_command(
    source: Path = typer.Argument(..., help="Folder of raw DICOM (a hospital export); it is only read."),
    labels: Optional[Path] = LABELS_OPTION,
    config: list[str] = RETRAIN_CONFIGS,
    home: Optional[Path] = HOME_OPTION,
    device: Device = DEVICE_OPTION,
    nproc_per_node: int = NPROC_OPTION,
    seeds: int = SEEDS_OPTION,
    heads_config: Optional[str] = HEADS_CONFIG,
) -> None:
    """The `pipeline` deployment's flow: ingest SOURCE, then retrain."""
    root = configure(home)
    _log_progress()
    with user_errors():
        preflight(source, configs=config, secret=True, labels=labels, heads_config=heads_config)
        from flows.pipeline import pipeline

        outcome = pipeline(source=str(source), home=str(root), labels=str(labels) if labels else None, configs=config,
                           device=device.value, nproc_per_node=nproc_per_node, seeds=seeds, heads_config=heads_config)
    ingested = outcome["ingest"]
    console.print(f"ingested {ingested['ingested']} of {ingested['files']} files "
                  f"({ingested['quarantined']} quarantined)")
    for retrained in outcome["retrained"]:
        _print_retrained(retrained)


@app.command()
def demo(
    home: Optional[Path] = HOME_OPTION,
    studies: int = typer.Option(200, help="Studies in the demo corpus (about 2,700 images)."),
    seeds: int = typer.Option(2, help="Seeds per head (figures are mean and sd over them; 2 keep the demo within 30 "
                                      "minutes on 2 cores)."),
    config: Optional[list[str]] = typer.Option(None, "--config",
                                               help="Pretraining configs (repeat the option; each adds its "
                                                    "pretraining and heads, 12-20 minutes): demo-cpu-resnet18 "
                                                    "(ResNet-18, the default), demo-cpu (ViT-Ti/16)."),
) -> None:
    """The whole pipeline on one machine, embedded: corpus, ingestion, DINO, heads, promotion, a prediction."""
    import os
    import secrets

    root = configure(home)
    if not os.environ.get("DAX_DEID_SECRET"):
        # a throw-away key for the demo's synthetic data, held in memory only (never stored or printed)
        os.environ["DAX_DEID_SECRET"] = secrets.token_hex(32)
        console.print("[dim]DAX_DEID_SECRET is not set: the demo uses a throw-away key for this run only[/]")
    _log_progress()
    with user_errors():
        preflight(configs=config or ())
        from flows.demo import demo as demo_flow
        from tasks.release.registry import tracking_uri

        console.rule("the demo flow: corpus -> ingest -> DINO pretraining -> heads (fan-out) -> promotion -> a "
                     "prediction")
        outcome = demo_flow(home=str(root), studies=studies, seeds=seeds, configs=config)
    console.rule("results: frozen-backbone heads, pretrained vs random-init vs the DAX paper")
    for retrained in outcome["retrained"]:
        _print_retrained(retrained)
    prediction = outcome["prediction"]
    overlay = prediction.get("overlay", "(refused: " + str(prediction.get("error")) + ")")
    console.rule("where to look")
    console.print(f"MLflow UI:         mlflow ui --backend-store-uri {tracking_uri(root)}\n"
                  f"catalog report:    {outcome['report']}\n"
                  f"query the catalog: dax catalog sql \"SELECT * FROM runs\" --home {root}\n"
                  f"prediction:        {overlay}\n"
                  f"montage:           {outcome['montage']}\n"
                  f"corpus:            {outcome['corpus_images']} images under {outcome['corpus']}\n"
                  f"took {outcome['seconds']:.0f} s", highlight=False)


@app.command()
def connect(
    home: Optional[Path] = HOME_OPTION,
    source: Optional[str] = typer.Option(None, help="The export folder the nightly ingestion reads (a path on the "
                                                    "workers' machine)."),
    notify: Optional[str] = typer.Option(None, help="A notification block, <block-type>/<name> (e.g. "
                                                    "slack-webhook/dax-ops): notified when a run's quarantined "
                                                    "share is above its alert share."),
) -> None:
    """Bind HOME to the Prefect server (PREFECT_API_URL) before `prefect deploy --all`: the Variables prefect.yaml
    reads (dax_home_id, dax_ingest_source) and, with --notify, the quarantine alert."""
    root = configure(home)
    from deployments.connect import HOME_ID_VARIABLE, SOURCE_VARIABLE
    from deployments.connect import connect as connect_home

    try:
        done = connect_home(root, source, notify)
    except ValueError as error:        # no such notification block, or not <block-type>/<name>
        console.print(f"[red]error:[/] {error}", highlight=False)
        raise typer.Exit(2) from None
    console.print(f"Prefect Variable {HOME_ID_VARIABLE} = {done['home_id']}"
                  + (f"; {SOURCE_VARIABLE} set" if done["source"] else "")
                  + (f"; quarantine alert automation {done['automation']}" if done["automation"] else ""),
                  highlight=False)
    console.print("next: prefect --no-prompt deploy --all   (from the repository root)", highlight=False)


def unwrap_help(*apps: typer.Typer) -> None:
    """Each command's help is its docstring with the source's line wrapping undone inside each paragraph: Typer's
    rich help prints a docstring's single line breaks as they are, so `dax --help` broke sentences mid-line."""
    for typer_app in apps:
        for command in typer_app.registered_commands:
            text = command.help or inspect.getdoc(command.callback) or ""
            command.help = "\n\n".join(" ".join(paragraph.split()) for paragraph in text.split("\n\n"))


unwrap_help(app, catalog_app)

if __name__ == "__main__":
    app()
