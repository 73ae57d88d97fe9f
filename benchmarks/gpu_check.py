"""The GPU path in one prepared device call: DINO pretraining, its step beside lightly's, and the heads, on CUDA.

No GPU was lent while DAX was built, so its CUDA branches (bf16 autocast, channels-last, fused AdamW,
``torch.compile``, pinned memory, the kNN monitor and the heads' features and training on the device) have run
only as far as the CPU tests reach. A session lent one gets about 15 minutes of device time on a bare machine
with no network and 64 MiB per call; this script makes one call enough.

Here, once, on a finished ``dax pretrain`` job that holds the kNN probe (a run with labels: the demo's, or one made
in about 2 minutes with ``DAX_HOME`` and ``DAX_DEID_SECRET`` set: ``dax synth C --studies 40``, ``dax ingest
C/dicom``, ``dax pretrain --config demo-cpu-resnet18 --labels C/labels.parquet --set epochs=1 --set
steps_per_epoch=2``):

    .venv/bin/python benchmarks/gpu_check.py pack --job dax-home/pretrain/JOB

writes ``gpu-check/`` (ignored by git, about 40 MB): ``--images`` of the job's training images in one shard,
shrunk to the job's ``decode_size`` (what the loader shrinks them to anyway) with only the metadata the loader
reads; the job's kNN probe cut to ``--bank`` and ``--queries`` images; ``pack.json``; and in ``wheels/`` the
packages the device image lacks (``DEVICE_LACKS``, at this environment's versions, for its Python 3.12). It
prints the device command, which is (the ``device`` tool's ``run``, ``carry: ["gpu-check"]``):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site
        gpu-check/wheels/*.whl && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py run
        --out $OUT/gpu-check.json

``run`` (``--device cpu`` runs the same checks on a CPU; the tests do, with the packages the device lacks
blocked) does, writing the JSON after each part so that a call cut at its limit still returns what ran (a run
that raises is a failure with its traceback; the others still go):

1. ``pretrain``: ``tasks.pretrain.main_dino.train`` on a job made of the pack, for each of ``--configs``
   (default: the two demo configs), ``--epochs`` of ``--steps`` steps, precision ``auto`` (bf16 on CUDA), the kNN
   monitor after every epoch, the first config stopped at its first epoch's end and resumed from its checkpoint
   there (the CUDA RNG states saved and restored); then the first config again with ``compile: true`` (unless
   ``--no-compile``). Checked: each run finishes (the resumed one stops first), every loss is finite, the kNN
   scored the random init and every epoch with its hits. Reported: seconds and images/s of the whole run (loader
   start, kNN and compilation included), peak GPU memory, the kNN accuracies.
2. ``speed``: ``benchmarks/lightly_dino.py``'s ``step_speed`` (DAX's DINO step and lightly's on one in-memory
   batch, alternated, CUDA-synchronised) for each of ``--speed-configs`` in bf16 and fp32: issue 18's
   "at least 1.3x lightly's step", which on 2 CPU cores the arithmetic caps at 1.09-1.19x.
3. ``heads``: for a ResNet-18 and a ViT-Ti/16 at random init, the frozen features on the device
   (``FeatureStore.compute``, bf16 autocast) against the same backbone's fp32 features on the CPU (cosine
   similarity), then a few epochs of the region probe, the metal decoder and the screw head on images with a
   planted bright bar, and the dense ceiling's backbone training with the metal decoder (``TrainedMaps``).
   Checked: features close to the CPU's, every prediction finite and of its shape.

Not checked here: DDP on CUDA (``torchrun`` with NCCL needs one GPU per rank; on CPU the tests run it with gloo).
Exit status 1 when a check failed.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from dax_models.augment import _shrink
from tasks.pretrain.data import Selection
from tasks.pretrain.main_dino import load_config, read_job, train, write_job

PACK = ROOT / "gpu-check"
DEVICE_LACKS = ("webdataset", "braceexpand", "duckdb", "pydicom", "lightly")   # KINDS.md's image, 2026-11
DEMO_CONFIGS = ("demo-cpu-resnet18", "demo-cpu")
SPEED_CONFIGS = ("demo-cpu-resnet18", "demo-cpu", "dax-vits16", "dax-resnet50")
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
LOADER_METADATA = ("normalization", "modality")     # what tasks.pretrain.data._decode reads of a sample's JSON


# --- pack (here) ------------------------------------------------------------------------------------------

def shrunk(pixels: np.ndarray, size: int) -> np.ndarray:
    """A stored uint16 image shrunk as the loader shrinks it (``_shrink``), back in uint16."""
    image = _shrink(torch.from_numpy(pixels.astype(np.float32)), size)
    return np.clip(np.rint(image.numpy()), 0, 65535).astype(np.uint16)


def cut_probe(knn: dict, bank: int, queries: int) -> dict:
    """The kNN probe with its first ``bank`` bank images and ``queries`` queries (labels and patients with them)."""
    n_bank, n_queries = len(knn["bank"]), len(knn["queries"])
    cut = {}
    for key, value in knn.items():
        if isinstance(value, torch.Tensor) and value.dim() and len(value) == n_bank and key.startswith("bank"):
            cut[key] = value[:bank].clone()
        elif isinstance(value, torch.Tensor) and value.dim() and len(value) == n_queries and key.startswith("quer"):
            cut[key] = value[:queries].clone()
        else:
            cut[key] = value
    return cut


def download_wheels(dest: Path) -> list[str]:
    """The wheels of ``DEVICE_LACKS`` at this environment's versions, for the device's CPython 3.12."""
    try:
        pins = [f"{name}=={importlib.metadata.version(name)}" for name in DEVICE_LACKS]
    except importlib.metadata.PackageNotFoundError as missing:
        raise SystemExit(f"{missing.name} is not installed here: pip install -e '.[bench]' first") from None
    platforms = [arg for p in WHEEL_PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(dest), *pins],
                   check=True)
    return sorted(p.name for p in dest.glob("*.whl"))


def pack(job: Path, out: Path, images: int, bank: int, queries: int, wheels: bool = True) -> dict:
    """Write the device call's data (see the module docstring); returns ``pack.json``'s content."""
    from tasks.ingest.shards import ShardSink, iter_shard

    _, config, selection = read_job(job)
    if not (job / "knn.pt").is_file():
        raise SystemExit(f"{job} has no knn.pt: pack a job that was pretrained with labels")
    if out.exists():
        if any(out.iterdir()) and not (out / "pack.json").is_file():
            raise SystemExit(f"{out} exists and is not a pack: name a new folder")
        shutil.rmtree(out)
    (out / "shards").mkdir(parents=True)
    wanted, keys = set(selection.keys), []
    size = config.augment.decode_size
    with ShardSink(out / "shards", "pack") as sink:
        for name, _ in selection.shards:
            for key, pixels, metadata in iter_shard(Path(selection.shard_dir) / name):
                if len(keys) == images:
                    break
                if key in wanted:
                    sink.write(key, shrunk(pixels, size), {k: metadata[k] for k in LOADER_METADATA if k in metadata})
                    keys.append(key)
            if len(keys) == images:
                break
    torch.save(cut_probe(torch.load(job / "knn.pt", weights_only=False), bank, queries), out / "knn.pt")
    summary = {"source_job": job.name, "config": config.name, "images": len(keys), "decode_size": size,
               "shards": [[s.name, s.sha256] for s in sink.finished], "keys": keys,
               "wheels": download_wheels(out / "wheels") if wheels else [],
               "packed": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__}
    (out / "pack.json").write_text(json.dumps(summary, indent=1))
    return summary


def device_path(out: Path) -> Path:
    """``out`` as the device sees it: relative to the repository's root, where the device tool copies it."""
    out = out.resolve()
    return out.relative_to(ROOT) if out.is_relative_to(ROOT) else out


def device_command(out: Path) -> str:
    rel = device_path(out)
    return (f"python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "
            f"{rel}/wheels/*.whl && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py run "
            f"--pack {rel} --out $OUT/gpu-check.json")


# --- run (on the device) ----------------------------------------------------------------------------------

def environment(device: torch.device) -> dict:
    import timm

    facts = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
             "device": str(device), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2 ** 30, 1),
                     capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                     bf16_supported=torch.cuda.is_bf16_supported())
    return facts


def pack_selection(pack_dir: Path) -> Selection:
    packed = json.loads((pack_dir / "pack.json").read_text())
    return Selection("TRUE", tuple(packed["keys"]), tuple(tuple(s) for s in packed["shards"]), str(pack_dir / "shards"))


def pack_job(pack_dir: Path, job_dir: Path, config_name: str, device: torch.device, overrides: dict,
             stop_after: int | None = None) -> Path:
    """A new job folder over the pack's shard and kNN probe, for ``config_name`` with ``overrides``."""
    write_job(job_dir, load_config(config_name, overrides), pack_selection(pack_dir), device=device.type,
              stop_after=stop_after)
    shutil.copy(pack_dir / "knn.pt", job_dir / "knn.pt")
    return job_dir


def peak_mb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


@contextlib.contextmanager
def crash_noted(failures: list[str], label: str):
    """A crash inside is a finding: ``label`` and its traceback go to ``failures`` and the caller's loop goes on."""
    try:
        yield
    except Exception:
        failures.append(f"{label} raised:\n{traceback.format_exc()}")


def check_pretraining(pack_dir: Path, scratch: Path, device: torch.device, configs: list[str], epochs: int,
                      steps: int, compiled: bool, workers: int) -> dict:
    # (config, compiled, resumed): the first config stops at its first epoch's end and resumes from there
    runs = [(name, False, i == 0 and epochs > 1) for i, name in enumerate(configs)]
    runs += [(configs[0], True, False)] if compiled else []
    rows, failures = [], []
    for name, compile_, resumed in runs:
        label = f"{name}{' compiled' if compile_ else ''}{' resumed' if resumed else ''}"
        with crash_noted(failures, label):
            overrides = {"epochs": epochs, "steps_per_epoch": steps, "warmup_epochs": min(1, epochs - 1),
                         "checkpoint_every": steps if resumed else 10 ** 9, "log_every": steps, "knn_every": 1,
                         "compile": compile_, "workers": workers}
            job = pack_job(pack_dir, scratch / label.replace(" ", "-"), name, device, overrides,
                           stop_after=steps if resumed else None)
            _, config, selection = read_job(job)
            reset_peak(device)
            began = time.perf_counter()
            result = train(job)
            if resumed:
                if result["status"] != "stopped":
                    failures.append(f"{label}: {result['status']} where it was to stop at step {steps}")
                write_job(job, config, selection, device=device.type, resume=True)
                result = train(job)
            seconds = time.perf_counter() - began
            history = [json.loads(line) for line in (job / "history.jsonl").read_text().splitlines()]
            knn = result.get("knn", [])
            row = {"config": name, "compile": compile_, "resumed": resumed, "status": result["status"],
                   "steps": result["step"], "seconds": round(seconds, 1),
                   "images_per_s": round(result["step"] * config.batch_size / seconds, 1),
                   "loss_first": history[0]["loss"] if history else None,
                   "loss_last": history[-1]["loss"] if history else None, "peak_gpu_mb": peak_mb(device),
                   "knn": [round(e["knn_accuracy"], 3) for e in knn],
                   "knn_layout": [round(e["knn_accuracy_layout"], 3) for e in knn]}
            rows.append(row)
            if result["status"] != "finished" or result["step"] != epochs * steps:
                failures.append(f"{label}: {result['status']} at step {result['step']} of {epochs * steps}")
            if not history or not all(math.isfinite(h["loss"]) for h in history):
                failures.append(f"{label}: a loss is not finite (or no step logged)")
            if len(knn) != epochs + 1 or "knn_margin" not in result:
                failures.append(f"{label}: the kNN monitor scored {len(knn)} times, not {epochs + 1}, "
                                "or gave no margin")
            print(f"pretrain {label}: {json.dumps(row)}", flush=True)
    return {"runs": rows, "failures": failures}


def check_speed(pack_dir: Path, scratch: Path, device: torch.device, configs: list[str]) -> dict:
    from lightly_dino import step_speed

    job = pack_job(pack_dir, scratch / "speed", configs[0], device, {})
    rows, failures = [], []
    precisions = ("bf16", "fp32") if device.type == "cuda" else ("fp32",)
    for name in configs:
        for precision in precisions:
            with crash_noted(failures, f"speed {name} {precision}"):
                reset_peak(device)
                speed = step_speed(job, device=str(device), precision=precision, config_name=name)
                row = {k: speed[k] for k in ("arch", "batch", "precision", "dax", "lightly", "ratio", "peak_gpu_mb")}
                row.update(config=name, dax=round(row["dax"], 1), lightly=round(row["lightly"], 1),
                           ratio=round(row["ratio"], 3), rounds=speed["rounds"])
                rows.append(row)
                if not (row["dax"] > 0 and row["lightly"] > 0):
                    failures.append(f"speed {name} {precision}: no images/s")
                print(f"speed {name} {precision}: DAX {row['dax']} images/s, lightly {row['lightly']}, "
                      f"{row['ratio']:.2f}x (target 1.3x)", flush=True)
    return {"runs": rows, "failures": failures, "target": 1.3}


def planted_images(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray]]:
    """``n`` noisy gray images with one bright bar each: images (n, 1, S, S) float16 in [0, 1], the bar's mask
    (n, S, S) bool, and the bar as a screw ([head_x, head_y, tip_x, tip_y], input px)."""
    g = torch.Generator().manual_seed(seed)
    images = 0.3 + 0.1 * torch.rand(n, 1, size, size, generator=g)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    screws = []
    for i in range(n):
        y, x = torch.randint(size // 8, size - size // 4, (2,), generator=g).tolist()
        length, width = size // 6, max(2, size // 32)
        masks[i, y:y + length, x:x + width] = True
        images[i, 0][masks[i]] = 0.95
        screws.append(np.array([[x + width / 2, y, x + width / 2, y + length - 1]], dtype=np.float32))
    return images.half(), masks, screws


def check_heads(device: torch.device, size: int, n: int, epochs: int) -> dict:
    from dax_models.backbones import create_backbone, extract
    from tasks.heads.evaluation import classifier_probabilities, predict_masks, predict_screws
    from tasks.heads.features import FeatureStore
    from tasks.heads.training import TrainedMaps, fit_classifier, fit_segmenter, fit_screw_head

    images, masks, screws = planted_images(n, size)
    labels = torch.arange(n) % 3
    train_idx, val_idx = np.arange(n - n // 4), np.arange(n - n // 4, n)
    crop = size // 2
    rows, failures = [], []
    for arch in ("resnet18", "vit_tiny_patch16"):
        with crash_noted(failures, f"heads {arch}"):
            torch.manual_seed(0)
            backbone = create_backbone(arch, 1, img_size=size).eval()
            with torch.no_grad():
                reference = extract(backbone, images[:8].float(), ("pooled",))["pooled"].float()   # fp32, CPU
            reset_peak(device)
            began = time.perf_counter()
            store = FeatureStore.compute(backbone, images, device=device, batch_size=16)
            cosine = float(torch.nn.functional.cosine_similarity(store.get("pooled", np.arange(8)), reference).min())
            probe, _ = fit_classifier(store, "last4", train_idx, labels, 3, epochs=epochs, val_idx=val_idx,
                                      device=device)
            regions = torch.from_numpy(classifier_probabilities(probe, store, "last4", val_idx, device))
            decoder, metal = fit_segmenter(store, train_idx, masks, size, epochs=epochs, batch_size=8, crop=crop,
                                           val_idx=val_idx, device=device)
            probabilities = predict_masks(decoder, store, val_idx, size, device)
            head, _ = fit_screw_head(store, train_idx, screws, size, epochs=epochs, batch_size=8, crop=crop,
                                     device=device)
            found = predict_screws(head, store, val_idx, size, device)
            trained = TrainedMaps(backbone, images, device, lr=1e-4)
            e2e_decoder, e2e = fit_segmenter(trained, train_idx, masks, size, epochs=1, batch_size=8, crop=crop,
                                             val_idx=val_idx, device=device)
            e2e_probabilities = predict_masks(e2e_decoder, trained, val_idx, size, device)
            row = {"arch": arch, "feature_cosine_min": round(cosine, 4), "metal_val_dice": metal.get("val_dice"),
                   "e2e_val_dice": e2e.get("val_dice"), "screws_found": sum(len(f) for f in found),
                   "seconds": round(time.perf_counter() - began, 1), "peak_gpu_mb": peak_mb(device)}
            rows.append(row)
            if cosine < 0.98:
                failures.append(f"heads {arch}: the device's features differ from the CPU's (cosine {cosine:.4f})")
            for name, tensor, shape in (("region", regions, (len(val_idx), 3)),
                                        ("metal", probabilities, (len(val_idx), size, size)),
                                        ("end-to-end metal", e2e_probabilities, (len(val_idx), size, size))):
                if tuple(tensor.shape) != shape or not bool(torch.isfinite(tensor).all()):
                    failures.append(f"heads {arch}: {name} predictions of shape {tuple(tensor.shape)}, finite: "
                                    f"{bool(torch.isfinite(tensor).all())}")
            if len(found) != len(val_idx) or not all(math.isfinite(s["score"]) for f in found for s in f):
                failures.append(f"heads {arch}: screw predictions for {len(found)} of {len(val_idx)} images")
            print(f"heads {arch}: {json.dumps(row)}", flush=True)
    return {"runs": rows, "failures": failures}


def run(pack_dir: Path, out: Path, device: torch.device, parts: list[str], configs: list[str],
        speed_configs: list[str], epochs: int, steps: int, compiled: bool, workers: int, heads_size: int,
        heads_images: int, heads_epochs: int) -> dict:
    report = {"environment": environment(device), "command": shlex.join(sys.argv), "parts": {}}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        checks = {"pretrain": lambda: check_pretraining(pack_dir, Path(scratch), device, configs, epochs, steps,
                                                        compiled, workers),
                  "speed": lambda: check_speed(pack_dir, Path(scratch), device, speed_configs),
                  "heads": lambda: check_heads(device, heads_size, heads_images, heads_epochs)}
        for part in parts:
            began = time.perf_counter()
            try:
                report["parts"][part] = checks[part]()
            except Exception:      # one part's crash is a finding; the others still run
                report["parts"][part] = {"failures": [f"{part} raised:\n{traceback.format_exc()}"]}
            report["parts"][part]["seconds"] = round(time.perf_counter() - began, 1)
            out.write_text(json.dumps(report, indent=1))
    report["failures"] = [f for part in report["parts"].values() for f in part["failures"]]
    report["ok"] = not report["failures"]
    out.write_text(json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="here: write the device call's data")
    p.add_argument("--job", type=Path, required=True, help="a finished dax pretrain job with knn.pt")
    p.add_argument("--out", type=Path, default=PACK)
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--bank", type=int, default=192)
    p.add_argument("--queries", type=int, default=96)
    p.add_argument("--no-wheels", dest="wheels", action="store_false", help="skip the wheels (a CPU run needs none)")
    r = sub.add_parser("run", help="on the device: the checks")
    r.add_argument("--pack", type=Path, default=PACK)
    r.add_argument("--out", type=Path, required=True, help="the report (JSON)")
    r.add_argument("--device", default="cuda")
    r.add_argument("--parts", nargs="+", default=["pretrain", "speed", "heads"],
                   choices=["pretrain", "speed", "heads"])
    r.add_argument("--configs", nargs="+", default=list(DEMO_CONFIGS))
    r.add_argument("--speed-configs", nargs="+", default=list(SPEED_CONFIGS))
    r.add_argument("--epochs", type=int, default=2)
    r.add_argument("--steps", type=int, default=8, help="steps per epoch")
    r.add_argument("--no-compile", dest="compiled", action="store_false")
    r.add_argument("--workers", type=int, default=4, help="the pretraining loader's workers")
    r.add_argument("--heads-size", type=int, default=128)
    r.add_argument("--heads-images", type=int, default=32)
    r.add_argument("--heads-epochs", type=int, default=3)
    args = parser.parse_args(argv)
    if args.command == "pack":
        if not args.out.resolve().is_relative_to(ROOT):
            print(f"note: the device tool carries folders inside the repository only, not {args.out}", file=sys.stderr)
        summary = pack(args.job, args.out, args.images, args.bank, args.queries, args.wheels)
        size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
        print(f"{args.out}: {summary['images']} images at {summary['decode_size']} px, "
              f"{len(summary['wheels'])} wheels, {size / 2 ** 20:.1f} MiB. On the device "
              f"(carry {device_path(args.out)}):\n{device_command(args.out)}")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no GPU visible: run with --device cpu to check the same path on the CPU")
    report = run(args.pack, args.out, device, args.parts, args.configs, args.speed_configs, args.epochs,
                 args.steps, args.compiled, args.workers, args.heads_size, args.heads_images, args.heads_epochs)
    print(("all checks passed" if report["ok"] else "FAILED:\n" + "\n".join(report["failures"])), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
