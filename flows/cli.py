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
    from tasks.synthesize import CorpusMismatch

    try:
        yield
    except (DeidError, CatalogError, NotADirectoryError, CorpusMismatch) as error:
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
) -> None:
    """De-identify, normalize and shard a DICOM export into HOME, cataloged in DuckDB."""
    root = configure(home)
    from prefect.task_runners import ProcessPoolTaskRunner

    from flows.ingest import ingest as ingest_flow

    with user_errors():
        result = ingest_flow.with_options(task_runner=ProcessPoolTaskRunner(max_workers=workers))(
            source=str(source), home=str(root), modalities=tuple(modality), max_size=max_size,
            frame_step=frame_step, batch_size=batch_size, shard_target_mb=shard_mb, image_format=image_format)
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
