"""`dax predict`: the registered backbone and heads on DICOM files that were never ingested.

Per file, everything in memory, as ingestion does it (``tasks.ingest.prepare_file``): read
(``tasks.ingest.triage.read_dicom``), decode the stored pixels (``tasks.ingest.normalize.decode_frames``), check
and clean burned-in text (``tasks.ingest.burned_in``; an image that needs a pixel review is refused, as
ingestion quarantines it), de-identify (``tasks.ingest.deidentify.deidentify`` with the key of ``load_key()``),
normalize (``tasks.ingest.normalize.normalize``, the ingest default long side 1024). The source file is only
read; no raw or de-identified DICOM, path or header value is written or logged.

Then one frame (``frame``, default the first), in the polarity each head was trained on (the models' view,
attenuation bright: ``tasks.ingest.normalize.model_view``; heads saved before it existed: as displayed),
goes through ``XrayEvalTransform`` at each head's size, each backbone runs once per size and polarity its
heads read, and each head's output is mapped back to the ORIGINAL DICOM pixel grid (Rows x Columns) by the
letterbox's inverse (``dax_models.augment.Letterbox``): normalize's resize and the letterbox's resize and
padding are undone.

Outputs, named by the first 16 hex digits of the file's SHA-256, NOT by the input's file name
(hospital file and folder names carry patient names and record numbers):

- ``<sha16>.json``: ``{"regions": [{"label", "probability"}] (top 3, best first), "screws":
  [{"head": [x, y], "tip": [x, y], "score"}] (original pixel coordinates, x = column, y = row,
  pixel edges at integers), "mask": "<sha16>_mask.png", "size": [rows, cols], "frame", "frames",
  "models": {task: {"head", "backbone", "polarity"}}}`` (the registered versions used: with no backbone given,
  each task's best head under the alias, on its own backbone, ``load_models``; the polarity its input had);
- ``<sha16>_mask.png``: the metal mask at the original size (8-bit, 0 or 255);
- ``<sha16>.png``: an overlay like DAX's Figure 2 (top-3 regions, the mask, the screws with scores).

A file that cannot be used (not DICOM, not a projection X-ray image as ingestion's triage says, no pixel data,
undecodable, needs a pixel review) raises a ``PredictError`` with a one-line reason naming no path or value;
``predict`` records it and goes on.

The key (``prediction_key``): the configured secret when there is one (``load_key()``: DAX_DEID_SECRET or
the Prefect Secret block), else a random key for this process only. The outputs hold no pseudonym, so
prediction needs none that is stable across runs; ingestion does, and keeps failing without a secret.
"""
from __future__ import annotations

import io
import json
import logging
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from dax_models.augment import Letterbox, XrayEvalTransform, mask_to_native
from dax_models.backbones import extract, resolve_device
from dax_models.heads import decode_screws, head_polarity
from tasks.home import dax_home
from tasks.release.registry import (
    DEFAULT_BACKBONE,
    UnknownModel,
    configure_tracking,
    head_uri,
    resolve_model,
)

if TYPE_CHECKING:
    from tasks.ingest.deidentify import DeidKey

__all__ = ["DEFAULT_BACKBONE", "LoadedModels", "PredictError", "Prepared", "load_models", "predict", "predict_file",
           "prediction_key", "prepare_dicom"]

TASKS = ("region", "metal", "screws")
INGEST_MAX_SIZE = 1024          # the ingest flow's default long side
EPHEMERAL_KEY_NOTE = ("no de-identification secret is configured: prediction de-identifies in memory with a random "
                      "key for this run only (its outputs hold no identifier)")

log = logging.getLogger("dax.predict")


class PredictError(ValueError):
    """A file prediction refused, with a one-line reason (no path, no DICOM value)."""


def prediction_key() -> tuple[DeidKey, bool]:
    """``(key, ephemeral)``: the configured de-identification key (``load_key()``), else, when no secret is
    configured at all, a random 32-byte key for this process only (``ephemeral`` True; never stored or shown).

    A configured secret that cannot be used (too short, a block that holds no string) still fails: it is
    never replaced silently. The fallback lives here, not in ``tasks.ingest``: ingestion's pseudonyms must be
    the same in every run, so ingestion without a secret keeps failing (the stage contracts keep
    ``tasks.ingest`` from importing this module).
    """
    from tasks.ingest.deidentify import DeidKey, NoSecretError, load_key

    try:
        return load_key(), False
    except NoSecretError:
        return DeidKey(secrets.token_bytes(32)), True


@dataclass
class LoadedModels:
    backbones: dict                  # "<name>/<version>" -> Backbone
    heads: dict                      # task -> FrozenHead
    refs: dict = field(default_factory=dict)    # task -> {"head", "backbone": "<name>/<version>", "polarity"}
    device: torch.device = torch.device("cpu")


def load_models(backbone_uri: str | None = None, head_uris: dict[str, str] | None = None, alias: str = "candidate",
                tasks: Sequence[str] = TASKS, home: str | Path | None = None, device: str = "auto") -> LoadedModels:
    """One head per task and the backbones they were trained on, from the MLflow registry (the home's store
    by default).

    - ``backbone_uri`` given: every head runs on that backbone; a head is ``head_uris[task]`` or
      ``models:/dax-head-<task>-<arch>@<alias>`` and must have been trained on this very backbone version (its
      ``dax.backbone`` tag), else the features would not be the ones it learned on and a clear error says so.
    - no ``backbone_uri``: per task, the ``alias`` head of whichever architecture scores best
      (``tasks.release.registry.best_heads``: region from one backbone, metal and screws from another is
      fine), each on the backbone its tag names. ``head_uris`` still pins a task's head.

    ``refs`` records, per task, the head and the backbone used (the prediction JSON's ``models``).
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    from tasks.release.registry import best_heads, head_aliases

    configure_tracking(dax_home(home))
    dev = resolve_device(device)
    client = MlflowClient()
    backbones: dict = {}

    def backbone(ref: str):
        if ref not in backbones:
            backbones[ref] = mlflow.pytorch.load_model(f"models:/{ref}", map_location="cpu").eval().to(dev)
        return backbones[ref]

    pinned = head_uris or {}
    fixed = None
    if backbone_uri is not None:
        name, version = resolve_model(backbone_uri)
        fixed = f"{name}/{version}"
        uris = {task: pinned.get(task) or head_uri(task, backbone(fixed).arch, alias) for task in tasks}
    else:
        chosen = best_heads([t for t in tasks if t not in pinned], alias)
        missing = [t for t in tasks if t not in chosen and t not in pinned]
        if missing:
            others = [a for a in head_aliases(missing) if a != alias]
            hint = (f"the registered heads carry {', '.join('@' + a for a in others)}: pass --alias {others[0]}"
                    if others else "run `dax heads` first, or give a backbone")
            raise PredictError(f"no registered {' or '.join(missing)} head with alias @{alias} ({hint})")
        uris = {task: pinned.get(task) or chosen[task]["uri"] for task in tasks}
    heads, refs = {}, {}
    for task, uri in uris.items():
        try:
            head_name, head_version = resolve_model(uri)
        except UnknownModel as error:
            raise PredictError(f"no {task} head: {error}") from None
        tag = client.get_model_version(head_name, head_version).tags.get("dax.backbone")
        if fixed is not None and tag != fixed:
            raise PredictError(f"the {task} head {head_name}/{head_version} was trained on backbone {tag}, "
                               f"not on {fixed}: give the matching backbone or head")
        if tag is None:
            raise PredictError(f"the {task} head {head_name}/{head_version} names no backbone (tag dax.backbone)")
        backbone(tag)
        head = mlflow.pytorch.load_model(f"models:/{head_name}/{head_version}", map_location="cpu")
        heads[task] = head.eval().to(dev)
        refs[task] = {"head": f"{head_name}/{head_version}", "backbone": tag, "polarity": head_polarity(head)}
    return LoadedModels(backbones, heads, refs, dev)


@dataclass
class Prepared:
    """One de-identified, normalized frame, its geometry and normalization's record (technical values only, as
    the catalog's ``normalization`` holds them: no identifying header value kept)."""

    pixels: np.ndarray           # uint16 (H, W), MONOCHROME2 display polarity, long side <= max_size
    original: tuple[int, int]    # the DICOM's Rows x Columns
    frame: int
    frames: int
    params: dict                 # normalize's record of it: geometry, LUT, polarity, boxes cleaned of text

    def view(self, polarity: str) -> np.ndarray:
        """The pixels in a head's polarity: "attenuation" (the models' view) or "display" (as shown)."""
        from tasks.ingest.normalize import model_view

        if polarity == "display":
            return self.pixels
        return model_view(self.pixels, self.params)


def prepare_dicom(path: Path, frame: int = 0, max_size: int = INGEST_MAX_SIZE, key=None,
                  plan_cache: Path | None = None) -> Prepared:
    """Read, check, de-identify and normalize one DICOM file in memory, as ingestion does."""
    from tasks.ingest.burned_in import assess, black_level, clean
    from tasks.ingest.deidentify import DEFAULT_RECIPE, load_key
    from tasks.ingest.deidentify import deidentify as deidentify_dataset
    from tasks.ingest.normalize import (
        NormalizeConfig,
        PixelDataError,
        decode_frames,
        normalize,
    )
    from tasks.ingest.triage import DEFAULT_MODALITIES, Rejected, check_header, read_dicom

    try:
        ds = read_dicom(Path(path))
        check_header(ds, DEFAULT_MODALITIES)     # what ingestion takes: projection X-ray images (CT, MR... refused)
    except Rejected as rejected:
        raise PredictError(rejected.reason) from None
    except OSError as error:
        raise PredictError(f"cannot read the file ({type(error).__name__})") from None
    try:
        frames = decode_frames(ds)
    except PixelDataError as error:
        raise PredictError(str(error)) from None
    n = int(frames.shape[0])
    if not 0 <= frame < n:
        raise PredictError(f"frame {frame} asked for, the file has {n} frame(s)")
    verdict = assess(ds, frames, recipe=DEFAULT_RECIPE)
    if verdict.action == "review":
        raise PredictError(f"needs pixel review before use: {verdict.reason}")
    if verdict.action == "clean":
        frames = clean(frames, verdict, black_level(ds))
    result = deidentify_dataset(ds, key or load_key(), recipe=DEFAULT_RECIPE, reread=lambda: read_dicom(Path(path)),
                                plan_cache=plan_cache)
    try:
        normalized = normalize(result.dataset, frames[frame:frame + 1], NormalizeConfig(max_size=max_size),
                               blanked=verdict.blanked)
    except PixelDataError as error:
        raise PredictError(str(error)) from None
    return Prepared(normalized[0].pixels, (int(frames.shape[1]), int(frames.shape[2])), frame, n,
                    normalized[0].params)


@torch.no_grad()
def run_models(models: LoadedModels, prepared: Prepared, top: int = 3) -> dict:
    """Backbone + heads on one prepared frame; outputs in ORIGINAL pixel coordinates."""
    rows, cols = prepared.original
    out: dict = {"size": [rows, cols]}
    passes: dict[tuple[str, int, str], list[str]] = {}   # one backbone pass per (backbone, input size, polarity)
    for task, head in models.heads.items():
        passes.setdefault((models.refs[task]["backbone"], int(head.size), head_polarity(head)), []).append(task)
    for (ref, size, polarity), tasks in sorted(passes.items()):
        box = Letterbox.for_stored(rows, cols, *prepared.pixels.shape, size)
        x = XrayEvalTransform(size=size)(prepared.view(polarity))[None].to(models.device)
        parts = {models.heads[t].features for t in tasks}
        features = extract(models.backbones[ref], x, parts)
        for task in tasks:
            head = models.heads[task]
            result = head(features[head.features])
            if task == "region":
                probs = torch.softmax(result.float(), dim=1)[0].cpu()
                values, order = probs.topk(min(top, len(probs)))
                out["regions"] = [{"label": head.classes[int(i)], "probability": round(float(p), 4)}
                                  for p, i in zip(values, order)]
            elif task == "metal":
                out["mask_array"] = mask_to_native(torch.sigmoid(result.float())[0, 0].cpu(), box)
            else:
                decoded = decode_screws({k: v.float().cpu() for k, v in result.items()}, (size, size),
                                        max_screws=20, threshold=head.threshold)[0]
                screws = []
                for s in decoded:
                    (hx, hy), (tx, ty) = box.to_native(np.array([s["head"], s["tip"]]))
                    screws.append({"head": [round(float(hx), 2), round(float(hy), 2)],
                                   "tip": [round(float(tx), 2), round(float(ty), 2)], "score": round(s["score"], 4)})
                out["screws"] = screws
    return out


def _mask_png(mask: np.ndarray) -> bytes:
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def overlay_figure(prepared: Prepared, result: dict, path: Path) -> Path:
    """DAX's Figure 2 for one image: the image, the metal mask (red), the screws (head dot, score) and
    the top-3 regions, drawn in the ORIGINAL pixel coordinates."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    rows, cols = prepared.original
    img = prepared.pixels.astype(np.float32)
    lo, hi = np.percentile(img, [0.5, 99.5])
    img = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
    width = 6.0
    fig = plt.figure(figsize=(width, width * rows / cols))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(img, cmap="gray", extent=(0, cols, rows, 0), interpolation="bilinear")
    mask = result.get("mask_array")
    if mask is not None and mask.any():
        ax.imshow(np.ma.masked_where(~mask, mask), cmap=ListedColormap(["red"]), alpha=0.45, extent=(0, cols, rows, 0),
                  interpolation="nearest", vmin=0, vmax=1)
    for s in result.get("screws", []):
        (hx, hy), (tx, ty) = s["head"], s["tip"]
        ax.plot([hx, tx], [hy, ty], color="cyan", lw=1.5)
        ax.plot([hx], [hy], "o", color="yellow", ms=3)
        ax.text(hx, hy, f" {s['score']:.2f}", color="yellow", fontsize=7, va="bottom")
    if result.get("regions"):
        text = "\n".join(f"{r['label']}: {100 * r['probability']:.1f} %" for r in result["regions"])
        ax.text(0.02 * cols, 0.03 * rows, text, color="white", fontsize=8, va="top", ha="left",
                bbox={"facecolor": "black", "alpha": 0.6, "edgecolor": "none"})
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)
    ax.set_axis_off()
    fig.savefig(path, dpi=max(80, min(200, int(min(cols, 1024) / width))))
    plt.close(fig)
    return path


def predict_file(path: Path, out_dir: Path, models: LoadedModels, frame: int = 0, max_size: int = INGEST_MAX_SIZE,
                 key=None, plan_cache: Path | None = None) -> dict:
    """Predict one file; writes ``<sha16>.json``, ``<sha16>_mask.png`` and ``<sha16>.png`` under ``out_dir``."""
    from tasks.fileio import sha256_file

    try:
        name = sha256_file(Path(path))[:16]
    except OSError as error:
        raise PredictError(f"cannot read the file ({type(error).__name__})") from None
    prepared = prepare_dicom(Path(path), frame=frame, max_size=max_size, key=key, plan_cache=plan_cache)
    result = run_models(models, prepared)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"regions": result.get("regions", []), "screws": result.get("screws", []),
              "mask": f"{name}_mask.png" if "mask_array" in result else None,
              "size": result["size"], "frame": prepared.frame, "frames": prepared.frames, "models": models.refs}
    if "mask_array" in result:
        (out_dir / f"{name}_mask.png").write_bytes(_mask_png(result["mask_array"]))
    overlay_figure(prepared, result, out_dir / f"{name}.png")
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=2))
    return {"name": name, "json": str(out_dir / f"{name}.json"), "overlay": str(out_dir / f"{name}.png"),
            **{k: record[k] for k in ("regions", "screws", "mask", "size")}}


def predict(files: Iterable[str | Path], out_dir: str | Path, backbone_uri: str | None = None,
            head_uris: dict[str, str] | None = None, alias: str = "candidate", home: str | Path | None = None,
            tasks: Sequence[str] = TASKS, frame: int = 0, device: str = "auto", max_size: int = INGEST_MAX_SIZE,
            on_result: Callable[[int, dict], None] | None = None, key: DeidKey | None = None) -> list[dict]:
    """Run the registered backbone and heads on each file; outputs named by SHA-256 (module docstring).

    Returns one entry per input, in order: ``{"input": i, "status": "ok", "name": <sha16>, ...}`` or
    ``{"input": i, "status": "error", "name": <sha16 or None>, "error": <one line>}`` (``i`` counts
    from 1; no path is echoed). ``on_result(i, entry)`` is called as each file finishes. The
    de-identification key is ``key``, else ``prediction_key()``'s: the configured secret (DAX_DEID_SECRET
    or the Prefect Secret block), else a random key for this run, said once in the log.
    """
    from tasks.fileio import sha256_file

    if key is None:
        key, ephemeral = prediction_key()
        if ephemeral:
            log.info(EPHEMERAL_KEY_NOTE)
    models = load_models(backbone_uri, head_uris, alias, tasks, home, device)
    root = dax_home(home)
    plan_cache = root / "cache" / "deid-plans" if root.is_dir() else None
    results = []
    for i, path in enumerate(files, start=1):
        try:
            entry = {"input": i, "status": "ok", **predict_file(Path(path), Path(out_dir), models, frame, max_size,
                                                                key, plan_cache)}
        except Exception as error:  # noqa: BLE001 - one bad file never stops the others
            reason = str(error) if isinstance(error, PredictError) else f"unexpected error ({type(error).__name__})"
            try:
                name = sha256_file(Path(path))[:16]
            except OSError:
                name = None
            entry = {"input": i, "status": "error", "name": name, "error": reason.splitlines()[0] if reason else
                     type(error).__name__}
        results.append(entry)
        if on_result is not None:
            on_result(i, entry)
    return results
