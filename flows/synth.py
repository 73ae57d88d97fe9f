"""Flow `synth`: a synthetic C-arm corpus with ground truth and planted PHI.

    prepare the corpus folder  ->  generate batches of studies (mapped, in parallel)  ->  merge tables
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, unmapped
from prefect.futures import as_completed
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from flows.runners import SharedAPIProcessPool
from tasks.synth.corpus import (
    batch_ranges,
    merge_parts_task,
    prepare_corpus,
    synthesize_batch_task,
)
from tasks.synth.study import PRESETS, with_overrides


@flow(name="synth", task_runner=SharedAPIProcessPool(max_workers=2))
def synth(
    out: str,
    studies: int = 200,
    seed: int = 0,
    start: int = 0,
    preset: str = "demo",
    batch_size: int = 4,
    detector_scale: float | None = None,
) -> dict:
    """Generate studies [start, start + studies) of corpus ``seed`` into ``out``."""
    root = Path(out)
    config = with_overrides(PRESETS[preset], detector_scale=detector_scale)
    prepare_corpus(root, seed, preset, config)

    batches = batch_ranges(start, studies, batch_size)
    futures = synthesize_batch_task.map(
        unmapped(root), seed, [first for first, _ in batches], [last for _, last in batches], unmapped(config)
    )
    images = files = resumed = 0
    with Progress(TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TextColumn("studies"),
                  TextColumn("{task.fields[images]} images"), TimeElapsedColumn()) as progress:
        bar = progress.add_task("synth", total=studies, images=0)
        for future in as_completed(futures):
            batch = future.result()
            images += batch.images
            files += batch.files
            resumed += batch.resumed
            progress.update(bar, advance=batch.last - batch.first, images=images)

    counts = merge_parts_task(root)
    return {"out": str(root), "studies": studies, "images": images, "files": files,
            "resumed_batches": resumed, "corpus_images": counts["labels"], "phi_values": counts["phi"]}
