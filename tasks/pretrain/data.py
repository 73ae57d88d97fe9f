"""Training data for pretraining: a catalog query picks the images, WebDataset streams their shards.

``select_images`` runs ``SELECT key, shard FROM images WHERE <where>`` on the published catalog
snapshot (read-only, so pretraining never blocks ingestion) and returns a ``Selection``: the keys, the
shards that hold them (with their sha256 from the catalog) and a manifest digest, the sha256 of the
query and the sorted (shard, sha256) and key lists: the dataset's identity for MLflow lineage.

``train_loader`` is the stream DDP needs (WebDataset issues #225, #250, #444): every rank draws shards
with replacement (``ResampledShards``), keeps the selected keys, shuffles in a buffer, decodes 16-bit
images in the models' polarity (``tasks.ingest.normalize.model_view``: attenuation bright), applies the
multi-crop augmentation (told by ``stored_linear`` whether the image's stored values are linear in intensity,
from the normalization recorded with the sample) and batches; the DataLoader yields exactly
``steps_per_epoch`` batches per epoch on every rank, so no rank waits for another at the end.
Everything random is seeded from (seed, epoch, rank, worker, sample index): the stream of an epoch is
the same every time it is built (with the same number of workers), so resuming at step s of an
epoch is building the loader from that epoch on and skipping s batches (read, not decoded nor augmented).

``read_samples`` reads given keys (for the kNN monitor and the heads) from their shards in order, in the
same polarity.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from webdataset.filters import _shuffle

from dax_models.augment import CropDraws
from tasks.ingest.catalog import CatalogError, check_read_only, open_snapshot
from tasks.ingest.normalize import model_view
from tasks.ingest.shards import IMAGE_FORMATS, decode_image, iter_shard

__all__ = ["Selection", "SelectionError", "read_samples", "select_images", "stored_linear", "train_loader"]

LINEAR_MODALITIES = ("XA", "RF")   # fluoroscopy and angiography: detector values linear in the quanta


class SelectionError(CatalogError):
    """The catalog query is invalid or selects nothing."""


@dataclass(frozen=True)
class Selection:
    where: str
    keys: tuple[str, ...]
    shards: tuple[tuple[str, str], ...]   # (name, sha256), sorted
    shard_dir: str

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({"where": self.where, "shards": self.shards}, sort_keys=True).encode())
        for key in self.keys:
            h.update(key.encode() + b"\n")
        return h.hexdigest()

    @property
    def shard_paths(self) -> list[str]:
        return [str(Path(self.shard_dir) / name) for name, _ in self.shards]

    def manifest(self) -> dict:
        return {"where": self.where, "images": len(self.keys), "digest": self.digest,
                "shards": [{"name": n, "sha256": s} for n, s in self.shards]}

    def without(self, keys: Iterable[str]) -> "Selection":
        drop = set(keys)
        return Selection(self.where, tuple(k for k in self.keys if k not in drop), self.shards, self.shard_dir)


def select_images(home: Path, where: str | None = None) -> Selection:
    """The images matching ``where`` (a SQL condition on the catalog's ``images`` table)."""
    where = (where or "").strip() or "TRUE"
    sql = ("SELECT i.key, i.shard, s.sha256 FROM images i JOIN shards s ON s.name = i.shard "
           f"WHERE ({where}) ORDER BY i.key")
    con = open_snapshot(home)
    try:
        try:
            check_read_only(con, sql)
        except CatalogError as error:
            raise SelectionError(f"refused catalog query: {error}") from None
        try:
            rows = con.sql(sql).fetchall()
        except Exception as error:  # duckdb.Error subclasses: bad column, bad syntax
            raise SelectionError(f"the catalog query failed: {str(error).splitlines()[0]}") from None
    finally:
        con.close()
    if not rows:
        raise SelectionError(f"no image in the catalog matches: {where}")
    shards = tuple(sorted({(shard, sha) for _, shard, sha in rows}))
    return Selection(where, tuple(key for key, _, _ in rows), shards, str(Path(home) / "shards"))


def stored_linear(metadata: dict) -> bool:
    """Whether a sample's stored values are linear in the X-ray intensity (so a negative log is meaningful).

    From the normalization ingestion recorded: DICOM's Pixel Intensity Relationship when the device wrote
    it ("LIN" yes, "LOG" no), otherwise the modality: XA and RF detectors store linear values, DX and CR
    exports are log-encoded ("for presentation") as a rule, and anything else is taken as not linear.
    """
    normalization = metadata.get("normalization") or {}
    relationship = str(normalization.get("pixel_intensity_relationship") or "").upper()
    if relationship in ("LIN", "LOG"):
        return relationship == "LIN"
    modality = normalization.get("modality") or metadata.get("modality") or ""
    return str(modality).upper() in LINEAR_MODALITIES


def _worker_index() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") & (2 ** 63 - 1)


def collate_crops(samples: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """A batch of multi-crop lists -> one tensor per crop position."""
    return [torch.stack(crops) for crops in zip(*samples)]


class _Stream(torch.utils.data.IterableDataset):
    """One rank's run over the range ``epochs``: ``steps`` batches per epoch, batch b made by worker ``b % workers``.

    Every sample's augmentation is seeded from (stream seed, sample index) inside ``fork_rng``, so a
    skipped batch costs only its tar reading (no decode, no augmentation) and the training process's
    RNG is untouched even with ``workers=0``. A batch comes with the crop boxes its augmentation drew
    (``CropDraws``, when the transform keeps a tally).

    The DataLoader asks its workers in turn, so every worker yields the same number of items per epoch,
    ``ceil(steps / workers)``: a slot with no batch (past ``steps``, or before ``skip`` in the first epoch)
    is a filler (``None``). Then the loader's turn order is the batch order, epoch after epoch, whatever
    ``steps`` and ``skip`` are, and the training process only drops the fillers.
    """

    def __init__(self, selection: Selection, transform: Callable, batch_size: int, seed: int, epochs: range,
                 rank: int, steps: int, skip: int, shuffle_buffer: int):
        super().__init__()
        self.urls = selection.shard_paths
        self.keys = frozenset(selection.keys)
        self.transform, self.batch_size = transform, batch_size
        self.seed, self.epochs, self.rank, self.shuffle_buffer = seed, epochs, rank, shuffle_buffer
        self.steps, self.skip = steps, skip

    def __iter__(self) -> Iterator[tuple]:
        worker, workers = _worker_index()
        for epoch in self.epochs:
            skip = self.skip if epoch == self.epochs.start else 0
            yield from self._epoch(epoch, skip, worker, workers)

    def _epoch(self, epoch: int, skip: int, worker: int, workers: int) -> Iterator[tuple]:
        stream_seed = _seed(self.seed, epoch, self.rank, worker)
        keys = self.keys
        samples = iter(wds.DataPipeline(
            wds.ResampledShards(self.urls, seed=stream_seed, worker_seed=lambda: 0, deterministic=True),
            wds.tarfile_to_samples(),
            wds.select(lambda sample: sample["__key__"] in keys),
            lambda src: _shuffle(src, bufsize=self.shuffle_buffer, initial=self.shuffle_buffer // 4,
                                 rng=random.Random(stream_seed)),
        ))
        index = 0
        for b in range(worker, -(-self.steps // workers) * workers, workers):
            if b >= self.steps:
                yield epoch, b, None, None
                continue
            batch = [next(samples) for _ in range(self.batch_size)]
            index += self.batch_size
            if b < skip:
                yield epoch, b, None, None
                continue
            views, before = [], _tally(self.transform)
            for i, sample in enumerate(batch):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(_seed(stream_seed, index + i))
                    views.append(self.transform(*_decode(sample)))
            draws = _tally(self.transform)
            draws = draws.since(before) if draws is not None else None
            yield epoch, b, collate_crops(views), draws


def _tally(transform: Callable) -> CropDraws | None:
    draws = getattr(transform, "draws", None)
    return dataclasses.replace(draws) if isinstance(draws, CropDraws) else None


def _decode(sample: dict) -> tuple[np.ndarray, bool]:
    """(the image in the models' polarity, whether its stored values are linear in intensity)."""
    metadata = json.loads(sample["json"]) if "json" in sample else {}
    for ext in IMAGE_FORMATS:
        if ext in sample:
            return model_view(decode_image(ext, sample[ext]), metadata.get("normalization")), stored_linear(metadata)
    raise ValueError(f"sample {sample.get('__key__')!r} has no image")


def train_loader(selection: Selection, transform: Callable, batch_size: int, steps_per_epoch: int, epoch: int,
                 seed: int = 0, rank: int = 0, workers: int = 2, skip: int = 0,
                 shuffle_buffer: int = 256, draws: CropDraws | None = None,
                 epochs: int = 1) -> Iterator[list[torch.Tensor]]:
    """Epochs ``epoch`` to ``epoch + epochs - 1`` for this rank, ``steps_per_epoch`` batches each (the first
    ``skip`` of the first epoch left out), the same every time.

    ``transform(image, linear)`` makes a sample's crops. An epoch's batches do not depend on how many epochs
    one loader spans: the training loop takes all its epochs from one loader, so the worker processes start
    once per run and make the next epoch's first batches while the last one's end is trained and scored,
    instead of starting again every epoch (each spawned worker imports torch first: about 3 s on 2 cores).
    ``draws``, if given, gets each yielded batch's crop-box tally added (the workers' transforms are copies,
    so their own tallies never reach this process).
    """
    span = range(epoch, epoch + epochs)
    dataset = _Stream(selection, transform, batch_size, seed, span, rank, steps_per_epoch, skip, shuffle_buffer)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if workers else None,
        # fresh worker processes: forked from a Prefect flow run (its threads, event loop and atexit
        # hooks), workers exit with status 1 at the end of their stream and the DataLoader fails
        multiprocessing_context="spawn" if workers else None,
        # its own generator: making the iterator draws a base seed, which must not come from (and
        # advance) the training process's global RNG, or a resumed run would diverge
        generator=torch.Generator().manual_seed(_seed(seed, epoch, rank)))
    due = (epoch, skip) if skip < steps_per_epoch else (epoch + 1, 0)      # (epoch, batch) expected next
    for e, b, batch, batch_draws in loader:
        if batch is None:
            continue
        if (e, b) != due:
            raise RuntimeError(f"the loader gave epoch {e} batch {b} where batch {due[1]} of epoch {due[0]} was due")
        due = (e, b + 1) if b + 1 < steps_per_epoch else (e + 1, 0)
        if draws is not None and batch_draws is not None:
            draws.add(batch_draws)
        yield batch
    if epochs > 0 and due != (epoch + epochs, 0):
        raise RuntimeError(f"the loader lost batches from batch {due[1]} of epoch {due[0]} on")


def read_samples(shard_dir: Path, shard_keys: dict[str, list[str]]) -> Iterator[tuple[str, np.ndarray, dict]]:
    """(key, uint16 image in the models' polarity, metadata) for the given keys, shard by shard in sorted order."""
    for shard in sorted(shard_keys):
        wanted = set(shard_keys[shard])
        for key, pixels, meta in iter_shard(Path(shard_dir) / shard):
            if key in wanted:
                yield key, model_view(pixels, meta.get("normalization")), meta
