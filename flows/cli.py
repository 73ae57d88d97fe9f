"""`dax`: the command-line door to the pipeline's flows."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from flows.home import configure

app = typer.Typer(add_completion=False, no_args_is_help=True, help="DAX: C-arm X-ray DICOM to foundation models.")
console = Console()


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
def demo(
    home: Optional[Path] = typer.Option(None, help="DAX home folder (default: $DAX_HOME or ./dax-home)."),
    studies: int = typer.Option(200, help="Studies in the demo corpus (about 2,000 images)."),
) -> None:
    """The whole job on one machine with embedded defaults: for now, a demo corpus and its montage."""
    root = configure(home)
    from flows.synth import synth as synth_flow
    from tasks.montage import make_montage

    corpus = root / "corpus"
    console.rule("1. synthetic C-arm corpus")
    result = synth_flow(out=str(corpus), studies=studies, seed=0, preset="demo")
    console.print(f"{result['corpus_images']} images under {corpus / 'dicom'}")
    console.rule("2. montage")
    png = make_montage(corpus, root / "montage.png")
    console.print(f"montage: {png}\nlabels:  {corpus / 'labels.parquet'}\nplanted PHI list: {corpus / 'phi.parquet'}")


if __name__ == "__main__":
    app()
