"""`dax`: the command-line door to the pipeline's flows."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from flows.home import configure

# never print local variables with a traceback: they can hold paths with patient names, or the secret
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="DAX: C-arm X-ray DICOM to foundation models.")
catalog_app = typer.Typer(no_args_is_help=True, help="Query the dataset catalog (read-only, from its published snapshot).")
app.add_typer(catalog_app, name="catalog")
console = Console()
HOME_OPTION = typer.Option(None, "--home", help="DAX home folder (default: $DAX_HOME or ./dax-home).")


@contextmanager
def user_errors():
    """Errors a user can fix (no secret, no snapshot yet, a busy catalog, a refused query, a source that
    is not a folder, a corpus made with other settings) as one clear line and exit code 2."""
    from tasks.catalog import CatalogError
    from tasks.deidentify import DeidError
    from tasks.labels import LabelError
    from tasks.pretrain import ConfigError
    from tasks.synthesize import CorpusMismatch

    try:
        yield
    except (DeidError, CatalogError, NotADirectoryError, CorpusMismatch, ConfigError, LabelError,
            FileNotFoundError) as error:
        console.print(f"[red]error:[/] {error}", highlight=False)
        raise typer.Exit(2) from None


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Corpus folder to create or extend."),
    studies: int = typer.Option(200, help="Number of studies to generate (200 demo studies: about 2,000 images)."),
    seed: int = typer.Option(0, help="Corpus seed: the same seed gives the same bytes."),
    start: int = typer.Option(0, help="First study index (seed ranges let several runs build one corpus)."),
    preset: str = typer.Option("demo", help="full (native detectors, 50-200 view sweeps), demo, or test."),
    batch_size: int = typer.Option(4, help="Studies per Prefect task run."),
    workers: int = typer.Option(2, help="Worker processes."),
    detector_scale: Optional[float] = typer.Option(None, help="Override the preset's detector scale."),
) -> None:
    """Generate synthetic C-arm studies: DICOM export, labels.parquet and phi.parquet."""
    configure()
    from prefect.task_runners import ProcessPoolTaskRunner

    from flows.synth import synth as synth_flow
    from tasks.synth.study import PRESETS

    if preset not in PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    with user_errors():
        result = synth_flow.with_options(task_runner=ProcessPoolTaskRunner(max_workers=workers))(
            out=str(out), studies=studies, seed=seed, start=start, preset=preset, batch_size=batch_size,
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
    from tasks.montage import make_montage

    console.print(f"montage written to {make_montage(corpus, out, include_real=real)}")


@app.command()
def ingest(
    source: Path = typer.Argument(..., help="Folder of raw DICOM (a hospital export); it is only read."),
    home: Optional[Path] = HOME_OPTION,
    modality: list[str] = typer.Option(["XA", "RF", "DX", "CR"], help="Modalities to accept (repeat the option)."),
    max_size: int = typer.Option(1024, help="Long side of the stored images, in pixels."),
    frame_step: int = typer.Option(1, help="Keep every k-th frame of multi-frame files."),
    batch_size: int = typer.Option(32, help="Files per Prefect task run."),
    shard_mb: int = typer.Option(1000, help="Target shard size in MB."),
    image_format: str = typer.Option("npy", help="npy (uint16, fast) or png (16-bit, ~20 % smaller, ~10x slower to write)."),
    workers: int = typer.Option(2, help="Worker processes."),
    runner: str = typer.Option("process", help="process (a local pool) or dask (DAX_DASK_ADDRESS, else a local cluster)."),
    retrain_after_images: int = typer.Option(1000, help="Emit dax.catalog.ready-for-retraining once this many images "
                                                        "are new since the last pretraining (0: never)."),
) -> None:
    """De-identify, normalize and shard a DICOM export into HOME, cataloged in DuckDB."""
    root = configure(home)
    from flows.ingest import ingest as ingest_flow
    from flows.runners import ingest_task_runner

    with user_errors():
        result = ingest_flow.with_options(task_runner=ingest_task_runner(runner, workers))(
            source=str(source), home=str(root), modalities=tuple(modality), max_size=max_size,
            frame_step=frame_step, batch_size=batch_size, shard_target_mb=shard_mb, image_format=image_format,
            retrain_after_images=retrain_after_images)
    console.print(f"{result['files']} files: [bold]{result['ingested']}[/] ingested ({result['images']} images in "
                  f"{result['shards']} shards), {result['duplicates']} duplicates, {result['skipped']} skipped, "
                  f"{result['quarantined']} quarantined. Catalog snapshot: {result['snapshot']}")


@app.command()
def locate(
    sha256: str = typer.Argument(..., help="A file hash from the catalog."),
    source: Path = typer.Argument(..., help="The source folder to search."),
) -> None:
    """Map a catalog hash back to its path on the source side (for operators; prints the path)."""
    from tasks.fileio import sha256_file
    from tasks.triage import list_source

    wanted = sha256.lower()
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
    from tasks.catalog import query as run_query

    with user_errors():
        typer.echo(run_query(configure(home), query, output))


@catalog_app.command("report")
def catalog_report(
    home: Optional[Path] = HOME_OPTION,
    out: Optional[Path] = typer.Option(None, help="HTML file to write (default: HOME/catalog-report.html)."),
) -> None:
    """An HTML report of the catalog: counts by modality, device and date, quarantine reasons, runs."""
    from tasks.catalog_report import write_report

    root = configure(home)
    with user_errors():
        console.print(f"report written to {write_report(root, out or root / 'catalog-report.html')}")


def _log_progress() -> None:
    """Training progress (steps, loss, kNN) from the `dax.*` loggers, on stderr."""
    import logging

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s  %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("dax")
    logger.setLevel(logging.INFO)
    if not logger.handlers:
        logger.addHandler(handler)


def _parse_settings(settings: list[str]) -> dict:
    import yaml

    overrides = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set takes KEY=VALUE, not {item!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


@app.command()
def pretrain(
    config: str = typer.Option("demo-cpu", help="A named config (demo-cpu, dax-vits16, dax-resnet50) or a YAML file."),
    where: Optional[str] = typer.Option(None, help="SQL condition on the catalog's images, e.g. \"modality = 'XA'\"."),
    home: Optional[Path] = HOME_OPTION,
    labels: Optional[Path] = typer.Option(None, help="labels.parquet of a synthetic corpus: enables the kNN monitor."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", help="Processes (GPUs) for DDP through torchrun."),
    resume: Optional[str] = typer.Option(None, help="Job to continue from its last checkpoint ('last' for the latest)."),
    epochs: Optional[int] = typer.Option(None, help="Override the config's epochs."),
    settings: list[str] = typer.Option([], "--set", help="Override any config setting: KEY=VALUE (augment.local_crops=4)."),
) -> None:
    """DINO pretraining on catalog images; the teacher is registered as dax-backbone-<arch>@candidate."""
    root = configure(home)
    _log_progress()
    from flows.pretrain import pretrain as pretrain_flow

    overrides = {**_parse_settings(settings), "epochs": epochs}
    with user_errors():
        summary = pretrain_flow(config=config, where=where, home=str(root), labels=str(labels) if labels else None,
                                device=device, nproc_per_node=nproc_per_node, resume=resume, overrides=overrides)
    _print_pretraining(summary)


def _print_pretraining(summary: dict) -> None:
    from rich.table import Table

    console.print(f"pretraining [bold]{summary['status']}[/]: {summary['step']} of {summary['total_steps']} steps "
                  f"in {summary['seconds']:.0f} s (job {summary['job']}, MLflow run {summary['run_id']})")
    if summary.get("knn"):
        table = Table("epoch", "kNN accuracy, held-out patients", title="body region, k=20 cosine kNN on the teacher")
        for row in summary["knn"]:
            table.add_row("0 (random init)" if row["epoch"] == 0 else str(row["epoch"]), f"{row['knn_accuracy']:.3f}")
        prepared = summary["prepared"]
        table.add_row("chance", f"{prepared['chance_uniform']:.3f} uniform, {prepared['chance_majority']:.3f} majority")
        console.print(table)
    if summary.get("registered"):
        console.print(f"registered {summary['registered']['uri']} (version {summary['registered']['version']})")


@app.command()
def demo(
    home: Optional[Path] = HOME_OPTION,
    studies: int = typer.Option(200, help="Studies in the demo corpus (about 2,000 images)."),
) -> None:
    """The whole job on one machine with embedded defaults: corpus, montage, ingestion, catalog report."""
    import os
    import secrets

    root = configure(home)
    if not os.environ.get("DAX_DEID_SECRET"):
        # a throw-away key for the demo's synthetic data, held in memory only (never stored or printed)
        os.environ["DAX_DEID_SECRET"] = secrets.token_hex(32)
        console.print("[dim]DAX_DEID_SECRET is not set: the demo uses a throw-away key for this run only[/]")
    from flows.ingest import ingest as ingest_flow
    from flows.synth import synth as synth_flow
    from tasks.catalog import query
    from tasks.catalog_report import write_report
    from tasks.montage import make_montage

    corpus = root / "corpus"
    console.rule("1. synthetic C-arm corpus")
    result = synth_flow(out=str(corpus), studies=studies, seed=0, preset="demo")
    console.print(f"{result['corpus_images']} images under {corpus / 'dicom'}")
    console.rule("2. montage")
    png = make_montage(corpus, root / "montage.png")
    console.rule("3. ingestion: de-identify, normalize, shard, catalog")
    summary = ingest_flow(source=str(corpus / "dicom"), home=str(root))
    console.print(query(root, "SELECT status, count(*) AS files, sum(samples) AS images FROM sources GROUP BY 1 ORDER BY 1"))
    report = write_report(root, root / "catalog-report.html")
    console.rule("where to look")
    console.print(f"montage:          {png}\nlabels:           {corpus / 'labels.parquet'}\n"
                  f"planted PHI list: {corpus / 'phi.parquet'}\nshards:           {root / 'shards'} "
                  f"({summary['shards']} shards, {summary['images']} images)\ncatalog snapshot: {summary['snapshot']}\n"
                  f"catalog report:   {report}\nquery it:         dax catalog sql \"SELECT * FROM runs\" --home {root}")


if __name__ == "__main__":
    app()
