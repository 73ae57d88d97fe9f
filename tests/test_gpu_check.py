"""benchmarks/gpu_check.py, the one device call a session lent a GPU makes: its pack, and its checks run on the CPU
with the packages the device image lacks made unimportable, so that call is not spent on an ImportError."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from tasks.ingest.shards import iter_shard
from tasks.pretrain.main_dino import read_job
from tasks.pretrain.steps import latest_job

ROOT = Path(__file__).resolve().parents[1]
# Not on the device (KINDS.md's image) and not carried as wheels: the checks must not need them.
NOT_ON_DEVICE = ("prefect", "mlflow", "deid", "hydra", "omegaconf", "pytorch_lightning", "lightning",
                 "pylibjpeg", "libjpeg", "openjpeg", "jpeg_ls", "rle")


def gpu_check(*args, block: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    code = ("import runpy, sys\n"
            f"for name in {block!r}:\n    sys.modules[name] = None\n"
            "sys.argv = sys.argv[1:]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", code, "benchmarks/gpu_check.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_the_gpu_check_packs_a_job_and_runs_its_checks_on_the_cpu_without_what_the_device_lacks(heads_corpus,
                                                                                               tmp_path):
    job = latest_job(heads_corpus.home)
    _, config, selection = read_job(job)
    pack = tmp_path / "gpu-check"
    packed = gpu_check("pack", "--job", job, "--out", pack, "--images", 24, "--bank", 20, "--queries", 10,
                       "--no-wheels")
    assert packed.returncode == 0, packed.stderr
    assert "--target /tmp/site" in packed.stdout and "gpu_check.py run" in packed.stdout   # the device command
    summary = json.loads((pack / "pack.json").read_text())
    assert summary["images"] == 24 and summary["wheels"] == [] and len(summary["shards"]) == 1
    samples = list(iter_shard(pack / "shards" / summary["shards"][0][0]))
    assert [key for key, _, _ in samples] == summary["keys"] and set(summary["keys"]) <= set(selection.keys)
    assert all(max(pixels.shape) <= config.augment.decode_size for _, pixels, _ in samples)
    assert all(set(meta) <= {"normalization", "modality"} and "normalization" in meta for _, _, meta in samples)
    knn, source = torch.load(pack / "knn.pt", weights_only=False), torch.load(job / "knn.pt", weights_only=False)
    assert len(knn["bank"]) == len(knn["bank_labels"]) == 20
    assert len(knn["queries"]) == len(knn["query_labels"]) == len(knn["query_patients"]) == 10
    assert torch.equal(knn["queries"], source["queries"][:10]) and knn["classes"] == source["classes"]

    out = tmp_path / "report.json"
    ran = gpu_check("run", "--pack", pack, "--out", out, "--device", "cpu", "--parts", "pretrain", "heads",
                    "--configs", "demo-cpu", "--epochs", 2, "--steps", 2, "--no-compile", "--workers", 1,
                    "--heads-size", 64, "--heads-images", 16, "--heads-epochs", 1, block=NOT_ON_DEVICE)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["failures"] == [] and report["environment"]["device"] == "cpu"
    (pretraining,) = report["parts"]["pretrain"]["runs"]
    assert pretraining["status"] == "finished" and pretraining["steps"] == 4 and pretraining["resumed"]
    assert len(pretraining["knn"]) == len(pretraining["knn_layout"]) == 3     # random init and 2 epochs
    heads = report["parts"]["heads"]["runs"]
    assert [h["arch"] for h in heads] == ["resnet18", "vit_tiny_patch16"]
    assert all(h["feature_cosine_min"] > 0.99 for h in heads)     # fp16 storage of fp32 CPU features


def test_the_gpu_check_reports_a_failed_run_goes_on_and_exits_1(tmp_path):
    out = tmp_path / "report.json"
    ran = gpu_check("run", "--pack", tmp_path / "no-pack", "--out", out, "--device", "cpu", "--parts", "pretrain",
                    "heads", "--heads-size", 64, "--heads-images", 8, "--heads-epochs", 1)
    assert ran.returncode == 1 and "FAILED" in ran.stdout
    report = json.loads(out.read_text())
    assert not report["ok"] and report["parts"]["pretrain"]["runs"] == []
    assert [failure.split(" raised:")[0] for failure in report["failures"]] == [   # each run, and only those
        "demo-cpu-resnet18 resumed", "demo-cpu", "demo-cpu-resnet18 compiled"]
    assert all("pack.json" in failure for failure in report["failures"])
    assert report["parts"]["heads"]["failures"] == [] and len(report["parts"]["heads"]["runs"]) == 2
