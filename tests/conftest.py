"""Test settings: no telemetry, no network, a throw-away Prefect home per session."""
import atexit
import os
import shutil
import tempfile

_PREFECT_HOME = tempfile.mkdtemp(prefix="dax-test-prefect-")
atexit.register(shutil.rmtree, _PREFECT_HOME, True)    # registered first, so it runs after Prefect's own exits
os.environ["PREFECT_HOME"] = _PREFECT_HOME
from tasks.home import QUIET_DEFAULTS  # noqa: E402  (imports nothing heavy; before prefect)

for _name, _value in QUIET_DEFAULTS.items():   # no telemetry, no hub, a 120 s ephemeral-API start
    os.environ.setdefault(_name, _value)
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

# MLflow's own default store is ./mlflow.db in the working directory: code that forgets to configure
# tracking (or a fixture that restores "the previous" URIs) would write into the checkout and share a
# registry across sessions. The session's default is a throw-away store instead.
import mlflow  # noqa: E402

mlflow.set_tracking_uri(f"sqlite:///{os.path.join(_PREFECT_HOME, 'mlflow-default.db')}")
mlflow.set_registry_uri(mlflow.get_tracking_uri())


# --- a small ingested corpus, shared by the pretraining and heads tests ---------------------------
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402

from tests.prefect_home import prefect_home  # noqa: E402

CORPUS_SECRET = "dax-test-secret-not-for-production"
DAX = str(Path(sys.executable).with_name("dax"))


def synth_and_ingest(tmp: Path, studies: int, seed: int, preset: str, max_size: int):
    """A corpus through the real `dax synth` and `dax ingest` under ``tmp``: ``home`` (catalog, shards),
    ``labels`` (labels.parquet), ``tmp`` and the ``env`` the commands ran with."""
    env = dict(os.environ, DAX_DEID_SECRET=CORPUS_SECRET, PREFECT_HOME=prefect_home(tmp / "prefect"), COLUMNS="200")
    for args in (["synth", str(tmp / "corpus"), "--studies", str(studies), "--seed", str(seed), "--preset", preset],
                 ["ingest", str(tmp / "corpus" / "dicom"), "--home", str(tmp / "home"), "--max-size", str(max_size)]):
        done = subprocess.run([DAX, *args], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"dax {args[0]} failed:\n{done.stdout}\n{done.stderr}"
    return SimpleNamespace(home=tmp / "home", labels=tmp / "corpus" / "labels.parquet", tmp=tmp, env=env)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """24 test-preset studies (about 100 images), stored at 128 px; shared by the pretraining and heads
    tests (the MLflow store some of them use lives in its home)."""
    return synth_and_ingest(tmp_path_factory.mktemp("small-corpus"), 24, seed=3, preset="test", max_size=128)


# --- heads fixtures ---
# The small corpus's catalog and shards copied into a home of their own (so the heads' MLflow store and
# registry are not the pretraining tests'), a quick DINO pretraining there, and one run of the heads flow;
# shared by tests/test_head_training.py and tests/test_predict.py.
import contextlib  # noqa: E402


@contextlib.contextmanager
def heads_tracking(home):
    """MLflow pointed at ``home``'s store, and a de-identification secret, for the duration
    (tasks.release.registry keeps an MLFLOW_TRACKING_URI that is already set, maybe by another test's home)."""
    import mlflow

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "DAX_DEID_SECRET")}
    uris = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    uri = f"sqlite:///{Path(home).resolve() / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["DAX_DEID_SECRET"] = CORPUS_SECRET
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        mlflow.set_tracking_uri(uris[0])
        mlflow.set_registry_uri(uris[1])


# demo-cpu cut to seconds: 1 epoch of 3 steps of 8 images at 64 / 32 px
TINY_DINO = {"epochs": 1, "steps_per_epoch": 3, "batch_size": 8, "augment.global_size": 64, "augment.local_size": 32,
             "augment.local_crops": 2, "knn_size": 64, "workers": 0}


def home_with_catalog_of(corpus, home: Path) -> Path:
    """A new home holding ``corpus``'s catalog and shards (its own MLflow store and pretraining jobs)."""
    home.mkdir(parents=True)
    for name in ("catalog.duckdb", "catalog-snapshot.duckdb"):
        shutil.copy2(corpus.home / name, home / name)
    shutil.copytree(corpus.home / "shards", home / "shards")
    return home


@pytest.fixture(scope="session")
def heads_corpus(small_corpus, tmp_path_factory) -> SimpleNamespace:
    """``small_corpus``'s images in a home of their own, with models:/dax-backbone-vit_tiny_patch16@candidate
    from a 1-epoch, 3-step DINO pretraining (the flow, as a user runs it)."""
    home = home_with_catalog_of(small_corpus, tmp_path_factory.mktemp("heads") / "home")
    from flows.pretrain import pretrain
    with heads_tracking(home):
        result = pretrain(config="demo-cpu", home=str(home), labels=str(small_corpus.labels), device="cpu",
                          overrides=TINY_DINO)
    return SimpleNamespace(home=home, labels=small_corpus.labels, corpus=small_corpus.labels.parent,
                           backbone=result["registered"]["uri"], backbone_version=result["registered"]["version"])


HEADS_TEST_OVERRIDES = {"linear_epochs": 30, "mlp_epochs": 30, "few_shot_epochs": 20, "seg_epochs": 10,
                        "screw_epochs": 10, "e2e_epochs": 1, "eval_every": 5, "dense_size": 64}


@pytest.fixture(scope="session")
def heads_flow(heads_corpus) -> dict:
    """The heads flow on that home: 2 seeds, every task, 64 px, tiny budgets."""
    from flows.heads import heads
    with heads_tracking(heads_corpus.home):
        return heads(torch_threads=1, backbone=heads_corpus.backbone, home=str(heads_corpus.home), labels=str(heads_corpus.labels),
                     seeds=2, size=64, overrides=HEADS_TEST_OVERRIDES)


@pytest.fixture
def heads_env(heads_corpus):
    """A test that talks to the heads home's MLflow store (and de-identifies: the corpus's secret)."""
    with heads_tracking(heads_corpus.home):
        yield heads_corpus


@pytest.fixture
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine, 2 spinning threads per op cost far more than they give."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_random_state_per_test():
    """Every test starts from the same global random state, whatever ran before it, so a draw a test does
    not seed itself is the same in CI as here. (An unseeded test passed here and failed in CI once: 8 in 10,000
    crops of its pattern, all local ones, are legitimately flat, brightness jitter saturating a bright patch.)"""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
