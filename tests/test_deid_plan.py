"""Compiled deid plans (tasks/deid_plan.py): the fast engine of tasks.ingest.deidentify gives exactly what deid
gives, on every synthetic device model and on real files, and deid runs only for new structures."""
from __future__ import annotations

import copy
import importlib.util
import io
from pathlib import Path

import pydicom
import pytest
from deid.config import DeidRecipe
from deid.dicom.parser import DicomParser
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence

from tasks.ingest import deid_plan
from tasks.ingest.deid_plan import PlanMismatch, RecipePlanner, structure_signature
from tasks.ingest.deidentify import DEFAULT_RECIPE, DeidKey, _planner, deidentify
from tasks.synth.study import PRESETS, generate_study

KEY = DeidKey(b"plan-test-secret-0123456789abcdef")
DEVICE_MODELS = 7  # tasks/synth/devices.py


def written(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def real_files() -> list[Path]:
    store = Path(importlib.util.find_spec("data_store").origin).parent / "data"
    cat = Path(importlib.util.find_spec("deid_data").origin).parent / "data" / "animals" / "cat.dcm"
    return sorted(store.glob("*.dcm")) + [cat]


@pytest.fixture(scope="module")
def synthetic_files(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("corpus")
    models, index = set(), 0
    while index < 22 or len(models) < DEVICE_MODELS:
        generate_study(root, 11, index, PRESETS["test"])
        models = {str(pydicom.dcmread(p, stop_before_pixels=True).ManufacturerModelName)
                  for p in root.rglob("*.dcm")}
        index += 1
        assert index < 80, f"only {len(models)} device models in {index} studies"
    return sorted(root.rglob("*.dcm"))


@pytest.fixture
def planner() -> RecipePlanner:
    planner = _planner(DEFAULT_RECIPE)
    planner.clear()
    yield planner
    planner.clear()


class ParseCounter:
    def __init__(self, monkeypatch):
        self.calls = 0
        original = DicomParser.parse

        def counting(parser, *args, **kwargs):
            self.calls += 1
            return original(parser, *args, **kwargs)

        monkeypatch.setattr(DicomParser, "parse", counting)


def assert_same_result(fast, reference, label) -> None:
    assert written(fast.dataset) == written(reference.dataset), label
    assert (fast.patient_key, fast.study_key, fast.series_key) == \
        (reference.patient_key, reference.study_key, reference.series_key), label
    assert fast.date_shift_days == reference.date_shift_days, label
    assert fast.actions == reference.actions, label


def outcome(ds: Dataset, engine: str):
    try:
        return deidentify(ds, KEY, engine=engine), None
    except Exception as error:  # noqa: BLE001 - both engines must fail alike
        return None, type(error)


# --- equivalence with deid -----------------------------------------------------------------------------

def test_fast_engine_equals_deid_on_every_synthetic_device_model(synthetic_files, planner):
    models = set()
    for rounds in range(2):  # first round: misses then hits; second round: all hits
        for path in synthetic_files:
            ds = pydicom.dcmread(path)
            models.add(str(ds.ManufacturerModelName))
            assert_same_result(deidentify(ds, KEY), deidentify(ds, KEY, engine="deid"), f"{path} round {rounds}")
    assert len(models) == DEVICE_MODELS
    stats = planner.stats
    assert stats.misses == len(planner) < len(synthetic_files)
    assert stats.hits == 2 * len(synthetic_files) - stats.misses
    assert stats.unplannable == stats.mismatches == 0


def test_in_place_with_reread_equals_the_copying_path(synthetic_files, planner):
    for path in synthetic_files[:12]:
        reference = deidentify(pydicom.dcmread(path), KEY)
        handed_over = pydicom.dcmread(path)
        in_place = deidentify(handed_over, KEY, reread=lambda: pydicom.dcmread(path))
        assert in_place.dataset is handed_over  # no copy made
        assert_same_result(in_place, reference, str(path))


def test_in_place_starts_over_from_a_reread_on_plan_mismatch(synthetic_files, planner, monkeypatch):
    path = synthetic_files[0]
    reference = deidentify(pydicom.dcmread(path), KEY, engine="deid")
    deidentify(pydicom.dcmread(path), KEY)  # the structure now has a plan

    def mismatch(*args, **kwargs):
        raise PlanMismatch("forced")

    monkeypatch.setattr(deid_plan, "replay", mismatch)
    rereads = []
    result = deidentify(pydicom.dcmread(path), KEY, reread=lambda: rereads.append(1) or pydicom.dcmread(path))
    assert rereads == [1]
    assert_same_result(result, reference, str(path))


def test_fast_engine_equals_deid_on_real_files(planner):
    compared = 0
    for rounds in range(2):
        for path in real_files():
            ds = pydicom.dcmread(path, force=True)
            (fast, fast_error), (reference, reference_error) = outcome(ds, "plan"), outcome(ds, "deid")
            assert fast_error == reference_error, path
            if reference is not None:
                assert_same_result(fast, reference, f"{path} round {rounds}")
                compared += 1
    assert compared > 100
    assert planner.stats.hits > 0 and planner.stats.unplannable == planner.stats.mismatches == 0


# --- the cache -----------------------------------------------------------------------------------------

def test_a_second_file_of_the_same_structure_does_not_run_deid(synthetic_files, planner, monkeypatch):
    by_signature: dict = {}
    for path in synthetic_files:
        ds = pydicom.dcmread(path)
        work = copy.deepcopy(ds)
        deid_plan._remove_private(work)
        by_signature.setdefault(structure_signature(work), []).append(ds)
    first, second = next(group for group in by_signature.values() if len(group) >= 2)[:2]
    assert str(first.SOPInstanceUID) != str(second.SOPInstanceUID)
    parses = ParseCounter(monkeypatch)
    deidentify(first, KEY)
    assert parses.calls == 1 and planner.stats.misses == 1
    result = deidentify(second, KEY)
    assert parses.calls == 1 and planner.stats.hits == 1
    assert result.dataset.SOPInstanceUID == KEY.uid(str(second.SOPInstanceUID))
    assert_same_result(result, deidentify(second, KEY, engine="deid"), "second file")


def test_a_structurally_new_file_falls_back_to_deid(synthetic_files, planner, monkeypatch):
    ds = pydicom.dcmread(synthetic_files[0])
    parses = ParseCounter(monkeypatch)
    deidentify(ds, KEY)
    deidentify(ds, KEY)
    assert parses.calls == 1
    changed = copy.deepcopy(ds)
    changed.OtherPatientIDsSequence = Sequence([Dataset()])
    changed.OtherPatientIDsSequence[0].PatientID = "PLAN-OTHER-ID"
    changed.InstitutionName = "PLAN-HOSPITAL"
    fast = deidentify(changed, KEY)
    assert parses.calls == 2 and planner.stats.misses == 2 and len(planner) == 2
    assert b"PLAN-" not in written(fast.dataset)
    assert_same_result(fast, deidentify(changed, KEY, engine="deid"), "changed structure")


def test_the_signature_ignores_values_and_sees_structure():
    a, b = Dataset(), Dataset()
    a.PatientID, b.PatientID = "one", "two"
    assert structure_signature(a) == structure_signature(b)
    b.ReferencedImageSequence = Sequence([Dataset()])
    assert structure_signature(a) != structure_signature(b)
    c = copy.deepcopy(b)
    c.ReferencedImageSequence.append(Dataset())  # one more item
    assert structure_signature(b) != structure_signature(c)
    d = copy.deepcopy(b)
    d.ReferencedImageSequence[0].ReferencedSOPInstanceUID = "1.2.3"  # nested element
    assert structure_signature(b) != structure_signature(d)
    e = copy.deepcopy(a)
    e.add_new(0x00100020, "SH", "one")  # same tag, another VR
    assert structure_signature(a) != structure_signature(e)


# --- guards --------------------------------------------------------------------------------------------

def _file_dataset(patient_id: str) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.12.1"
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.PatientID, ds.PatientName = patient_id, "NAME^" + patient_id
    return ds


def test_a_value_deid_would_treat_otherwise_raises_plan_mismatch(tmp_path):
    recipe = tmp_path / "r.recipe"
    recipe.write_text("FORMAT dicom\n\n%header\n\nREPLACE PatientID func:maybe\nREMOVE PatientName\n")
    planner = RecipePlanner(DeidRecipe(str(recipe), base=False))
    hooks = {"maybe": lambda field, **_: None if field.element.value == "SKIP" else "X"}
    first = _file_dataset("A")
    assert planner.apply(first, hooks, lambda: hooks) == "miss"
    assert first.PatientID == "X" and "PatientName" not in first
    second = _file_dataset("B")
    assert planner.apply(second, hooks, lambda: hooks) == "hit"
    assert second.PatientID == "X" and "PatientName" not in second
    with pytest.raises(PlanMismatch):  # deid would skip the write (a None value): not the recording
        planner.apply(_file_dataset("SKIP"), hooks, lambda: hooks)
    assert planner.stats.mismatches == 1


def test_value_dependent_recipes_always_run_deid(tmp_path):
    recipe = tmp_path / "r.recipe"
    recipe.write_text("FORMAT dicom\n\n%header\n\nJITTER StudyDate 3\nREMOVE PatientName\n")
    planner = RecipePlanner(DeidRecipe(str(recipe), base=False))
    assert not planner.plannable
    ds = _file_dataset("A")
    assert planner.apply(ds, {}, dict) == "unplannable"
    assert "PatientName" not in ds and len(planner) == 0


def test_a_plan_that_fails_its_check_is_never_replayed(synthetic_files, planner, monkeypatch):
    monkeypatch.setattr(deid_plan, "_same", lambda a, b: False)
    ds = pydicom.dcmread(synthetic_files[0])
    parses = ParseCounter(monkeypatch)
    first, second = deidentify(ds, KEY), deidentify(ds, KEY)
    assert parses.calls == 2 and planner.stats.unplannable == 1 and planner.stats.hits == 0
    assert_same_result(second, first, "deid both times")


def test_engine_is_checked(synthetic_files):
    with pytest.raises(ValueError):
        deidentify(pydicom.dcmread(synthetic_files[0]), KEY, engine="fast")


# --- plans shared on disk (PlanStore) -------------------------------------------------------------------

def stored_planner(cache: Path, recipe: Path = DEFAULT_RECIPE) -> RecipePlanner:
    """A fresh planner, as a new worker process gets it, backed by the store in ``cache``."""
    _planner.cache_clear()
    return _planner(recipe, cache)


def plan_files(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*") if p.is_file())


def test_a_plan_stored_by_one_planner_serves_a_fresh_planner(synthetic_files, tmp_path, monkeypatch):
    cache = tmp_path / "plans"
    first = stored_planner(cache)
    paths = synthetic_files[:6]
    for path in paths:
        deidentify(pydicom.dcmread(path), KEY, plan_cache=cache)
    assert first.stats.misses == len(first) == len(plan_files(cache)) > 0
    assert all(p.parent.name == deid_plan.recipe_sha256(DEFAULT_RECIPE)[:16] for p in plan_files(cache))

    second = stored_planner(cache)  # a new process: empty memory, same disk
    assert second is not first and len(second) == 0
    parses = ParseCounter(monkeypatch)
    fast = [deidentify(pydicom.dcmread(path), KEY, plan_cache=cache) for path in paths]
    assert parses.calls == 0
    assert second.stats.misses == 0 and second.stats.loaded == len(plan_files(cache))
    assert second.stats.hits == len(paths) and second.stats.mismatches == 0
    for path, result in zip(paths, fast):
        assert_same_result(result, deidentify(pydicom.dcmread(path), KEY, engine="deid"), str(path))
    _planner.cache_clear()


def test_stored_plans_hold_no_value_from_any_dataset(tmp_path):
    corpus, cache = tmp_path / "corpus", tmp_path / "plans"
    planted = set()
    for index in range(6):
        _, phi = generate_study(corpus, 23, index, PRESETS["test"])
        planted |= {str(row["value"]) for row in phi if len(str(row["value"]).strip()) >= 4}  # not "F"
    uids, texts = set(), set()
    for path in sorted(corpus.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        for elem in [*ds.file_meta.iterall(), *ds.iterall()]:
            if elem.VR == "UI" and elem.value:
                uids |= {str(v) for v in (elem.value if isinstance(elem.value, list) else [elem.value])}
            elif elem.VR in ("PN", "LO", "SH", "DA") and elem.value and len(str(elem.value)) >= 6:
                texts.add(str(elem.value))
    originals = {u for u in uids if not u.startswith("1.2.840.10008.")}  # the standard's own class UIDs
    assert planted and originals

    planner = stored_planner(cache)
    for path in sorted(corpus.rglob("*.dcm")):
        deidentify(pydicom.dcmread(path), KEY, plan_cache=cache)
    assert planner.stats.misses > 0 and plan_files(cache)
    stored = b"".join(p.read_bytes() for p in plan_files(cache))
    for secret in sorted(planted | originals | texts):
        for encoded in {secret.encode(), secret.encode("utf-16-le"), secret.upper().encode()}:
            assert encoded not in stored, f"{secret!r} found in a plan file"
    _planner.cache_clear()


def test_an_edited_recipe_does_not_reuse_stored_plans(synthetic_files, tmp_path, monkeypatch):
    cache, recipe = tmp_path / "plans", tmp_path / "copy.recipe"
    recipe.write_bytes(DEFAULT_RECIPE.read_bytes())
    ds = pydicom.dcmread(synthetic_files[0])
    stored_planner(cache, recipe)
    deidentify(ds, KEY, recipe=recipe, plan_cache=cache)
    before = plan_files(cache)
    assert len(before) == 1

    recipe.write_bytes(recipe.read_bytes() + b"\n# a harmless comment\n")
    edited = stored_planner(cache, recipe)
    parses = ParseCounter(monkeypatch)
    result = deidentify(ds, KEY, recipe=recipe, plan_cache=cache)
    assert parses.calls == 1 and edited.stats.loaded == 0 and edited.stats.misses == 1
    after = plan_files(cache)
    assert len(after) == 2 and {p.parent.name for p in after} == \
        {deid_plan.recipe_sha256(DEFAULT_RECIPE)[:16], deid_plan.recipe_sha256(recipe)[:16]}
    assert_same_result(result, deidentify(ds, KEY, engine="deid"), "edited recipe")
    _planner.cache_clear()


@pytest.mark.parametrize("damage", [b"", b"\x80\x03garbage", b'{"format": 1, "steps": []}', "truncate", "foreign"])
def test_a_corrupt_plan_file_is_ignored_and_rewritten(synthetic_files, tmp_path, monkeypatch, damage):
    cache = tmp_path / "plans"
    ds = pydicom.dcmread(synthetic_files[0])
    stored_planner(cache)
    deidentify(ds, KEY, plan_cache=cache)
    (path,) = plan_files(cache)
    good = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "foreign":  # a well-formed file of another structure
        path.write_bytes(good.replace(b'"signature":"', b'"signature":"0'))
    else:
        path.write_bytes(damage)

    planner = stored_planner(cache)
    parses = ParseCounter(monkeypatch)
    result = deidentify(ds, KEY, plan_cache=cache)
    assert parses.calls == 1 and planner.stats.loaded == 0 and planner.stats.misses == 1
    assert path.read_bytes() == good  # rewritten whole
    assert_same_result(result, deidentify(ds, KEY, engine="deid"), f"after {damage!r}")
    assert [p.name for p in cache.rglob(".tmp-*")] == []
    _planner.cache_clear()


def test_an_unplannable_structure_is_marked_on_disk(tmp_path, monkeypatch):
    cache = tmp_path / "plans"
    store = deid_plan.PlanStore(cache, "ab" * 32)
    signature = ("Dataset", (None, None), (), None)
    store.save(signature, None)
    assert deid_plan.PlanStore(cache, "ab" * 32).load(signature) == (True, None)
    assert deid_plan.PlanStore(cache, "cd" * 32).load(signature) == (False, None)
