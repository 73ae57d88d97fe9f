"""The `ingest` flow end to end, on the generator's corpus plus every kind of bad file.

Real components throughout: the `dax` command in a subprocess (its console output is checked too), a
real Prefect flow with its own Prefect home (whose database and logs are searched for PHI), a real
DuckDB catalog and snapshot, real tar shards read back with webdataset.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEG2000Lossless

from tasks.ingest.normalize import model_view
from tasks.ingest.shards import iter_shard
from tasks.synth.study import PRESETS, generate_study
from tests.phi_search import files_under, phi_hits, phi_values
from tests.prefect_home import prefect_home

SECRET = "test-secret-0123456789abcdef"
DAX = str(Path(sys.executable).with_name("dax"))


def _env(tmp: Path) -> dict:
    return dict(os.environ, DAX_DEID_SECRET=SECRET, PREFECT_HOME=prefect_home(tmp / "prefect"), COLUMNS="200")


def run_dax(tmp: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    completed = subprocess.run([DAX, *args], env=_env(tmp), capture_output=True, text=True, timeout=600)
    if check and completed.returncode != 0:
        raise AssertionError(f"dax {args[0]} failed:\n{completed.stdout}\n{completed.stderr}")
    return completed


def make_source(root: Path) -> tuple[list[dict], list[dict], dict[str, str]]:
    """A generated export plus one file of every bad kind; returns labels, PHI rows and bad files' reasons."""
    labels, phi = [], []
    for index in range(13):
        study_labels, study_phi = generate_study(root, 5, index, PRESETS["test"])
        labels += study_labels
        phi += study_phi
    good = sorted({row["path"] for row in labels if row["modality"] in ("XA", "RF")})
    sample = pydicom.dcmread(root / good[0])
    bad_dir = root / "ZZ_DOE_JANE_99887766" / "BAD"  # sorts last: the originals come first
    bad_dir.mkdir(parents=True)
    expected = {}

    def put(name: str, data: bytes, reason: str) -> None:
        (bad_dir / name).write_bytes(data)
        expected[hashlib.sha256(data).hexdigest()] = reason

    put("notes.txt", b"Patient DOE^JANE called about her results\n", "not a DICOM file")
    put("empty.dcm", b"", "empty file")
    raw = (root / good[0]).read_bytes()
    # truncated: its header is intact, so it is known as a copy of an image ingested from another file
    put("truncated.dcm", raw[: len(raw) // 3], "")

    def variant(mutate) -> bytes:
        ds = pydicom.dcmread(root / good[0])
        mutate(ds)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    def no_pixels(ds):
        del ds.PixelData
        ds.SOPInstanceUID += ".1"

    def too_big(ds):
        ds.Rows = ds.Rows * 2
        ds.SOPInstanceUID += ".2"

    def absurd(ds):
        ds.Rows = 60000
        ds.SOPInstanceUID += ".3"

    def not_an_image(ds):
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.SOPInstanceUID += ".4"

    def unknown_syntax(ds):
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder installed
        ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(200)])
        ds.SOPInstanceUID += ".5"

    def corrupt_stream(ds):
        ds.SOPInstanceUID += ".6"
        ds.compress(JPEG2000Lossless, ds.pixel_array)
        codestream = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
        codestream[4:48] = b"\x13" * 44  # the SIZ marker segment: image size and components
        ds.PixelData = encapsulate([bytes(codestream)])

    put("nopixels.dcm", variant(no_pixels), "no pixel data")
    put("toobig.dcm", variant(too_big), "declared size larger")
    put("absurd.dcm", variant(absurd), "absurd dimensions")
    put("report.dcm", variant(not_an_image), "not a projection X-ray image")
    put("mpeg.dcm", variant(unknown_syntax), "transfer syntax")
    put("corrupt.dcm", variant(corrupt_stream), "corrupt")
    shutil.copy(root / good[1], bad_dir / "copy_of_an_image.dcm")  # same bytes: one row only
    # a broken copy listed before its good original: the original must still get in
    early = root / "AA_EARLY_COPY"
    early.mkdir()
    broken = (root / good[3]).read_bytes()[:-200]
    (early / "broken_first.dcm").write_bytes(broken)
    expected[hashlib.sha256(broken).hexdigest()] = "declared size larger"
    reexport = pydicom.dcmread(root / good[2])
    reexport.compress(JPEG2000Lossless, reexport.pixel_array, generate_instance_uid=False)
    reexport.save_as(bad_dir / "reexport.dcm")  # same SOP instance, other bytes: a duplicate
    expected[hashlib.sha256((bad_dir / "reexport.dcm").read_bytes()).hexdigest()] = "same SOP instance"
    assert sample.Modality in ("XA", "RF")
    return labels, phi, expected


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(path.relative_to(root).as_posix().encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def catalog_rows(home: Path, sql: str) -> list[dict]:
    with duckdb.connect(str(home / "catalog-snapshot.duckdb"), read_only=True) as con:
        return con.sql(sql).to_arrow_table().to_pylist()


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ingest")
    source = tmp / "export"
    labels, phi, bad = make_source(source)
    before = tree_digest(source)
    completed = run_dax(tmp, "ingest", str(source), "--home", str(tmp / "home"), "--batch-size", "8",
                        "--max-size", "160")
    return {"tmp": tmp, "source": source, "home": tmp / "home", "labels": labels, "phi": phi, "bad": bad,
            "before": before, "console": completed.stdout + completed.stderr}


def test_the_source_is_never_modified(ingested):
    assert tree_digest(ingested["source"]) == ingested["before"]


def test_every_file_gets_a_status_and_good_files_are_ingested(ingested):
    rows = catalog_rows(ingested["home"], "SELECT sha256, status, reason, samples FROM sources")
    by_sha = {row["sha256"]: row for row in rows}
    files = {hashlib.sha256(p.read_bytes()).hexdigest() for p in ingested["source"].rglob("*") if p.is_file()}
    assert set(by_sha) == files  # one row per distinct file content, the copy included once
    for sha, reason in ingested["bad"].items():
        row = by_sha[sha]
        assert row["status"] in ("quarantined", "skipped", "duplicate"), (sha, row)
        assert row["reason"] and reason.lower() in row["reason"].lower(), row
    generated = {row["sha256"] for row in ingested["labels"]}
    statuses = {by_sha[sha]["status"] for sha in generated}
    assert statuses <= {"ingested", "quarantined"}
    ingested_files = [sha for sha in generated if by_sha[sha]["status"] == "ingested"]
    assert len(ingested_files) >= 0.6 * len(generated)
    for sha in generated - set(ingested_files):
        assert by_sha[sha]["reason"].startswith("needs pixel review"), by_sha[sha]


def test_bad_inputs_have_specific_reasons(ingested):
    rows = catalog_rows(ingested["home"], "SELECT reason FROM sources WHERE status = 'quarantined'")
    reasons = " | ".join(row["reason"] for row in rows).lower()
    for words in ("empty file", "not a dicom file", "no pixel data"):
        assert words in reasons
    console = ingested["console"].lower()                       # the run's log says them too, not only the report
    assert all("quarantined, " in console and words in console for words in ("empty file", "not a dicom file"))


def test_shards_hold_exactly_the_cataloged_images(ingested):
    home = ingested["home"]
    images = {row["key"]: row for row in catalog_rows(home, "SELECT key, shard, rows, cols FROM images")}
    shards = {row["name"]: row for row in catalog_rows(home, "SELECT name, sha256, samples FROM shards")}
    on_disk = sorted((home / "shards").glob("*.tar"))
    assert {p.name for p in on_disk} == set(shards)
    seen = {}
    for path in on_disk:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shards[path.name]["sha256"]
        keys = []
        for key, pixels, metadata in iter_shard(path):
            assert pixels.dtype == np.uint16 and max(pixels.shape) <= 160
            assert (pixels.shape[0], pixels.shape[1]) == (images[key]["rows"], images[key]["cols"])
            assert metadata["key"] == key and "." not in key
            keys.append(key)
        assert len(keys) == shards[path.name]["samples"]
        seen.update({k: path.name for k in keys})
    assert seen == {k: v["shard"] for k, v in images.items()}
    labelled = sum(1 for _ in ingested["labels"])
    assert 0 < len(images) <= labelled


def _haystacks(ingested) -> dict[str, bytes]:
    home, tmp = ingested["home"], ingested["tmp"]
    stacks = {"console": ingested["console"].encode()}
    for path in (home / "shards").glob("*.tar"):
        stacks[f"shard {path.name}"] = path.name.encode()
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                stacks[f"{path.name}:{member.name}"] = member.name.encode() + tar.extractfile(member).read()
    with duckdb.connect(str(home / "catalog-snapshot.duckdb"), read_only=True) as con:
        for (table,) in con.sql("SELECT table_name FROM information_schema.tables").fetchall():
            text = json.dumps(con.sql(f'SELECT * FROM "{table}"').to_arrow_table().to_pylist(), default=str)
            stacks[f"table {table}"] = text.encode()
    for folder in (home, tmp / "prefect"):
        stacks.update(files_under(folder, tmp, skip=("shards",)))
    return stacks


def test_no_planted_phi_in_any_output(ingested):
    values = phi_values(ingested["phi"])
    assert len(values) > 100
    hits = phi_hits(values, _haystacks(ingested))
    assert not hits, f"PHI found in outputs: {hits[:10]}"


def test_burned_in_text_is_cleaned_at_the_pixel_level(ingested):
    home = ingested["home"]
    burned = {}
    for row in ingested["labels"]:
        if row["burned_in_text"]:
            burned.setdefault(row["sha256"], row)
    assert burned, "the test corpus should contain burned-in text"
    rules = {row["source_sha256"]: row["pixel_rule"]
             for row in catalog_rows(home, "SELECT DISTINCT source_sha256, pixel_rule FROM images")}
    statuses = {row["sha256"]: row for row in catalog_rows(home, "SELECT sha256, status, reason FROM sources")}
    for sha in burned:
        if statuses[sha]["status"] == "ingested":
            assert rules[sha], "an image with burned-in text was shipped without a pixel rule"
        else:
            assert statuses[sha]["reason"].startswith("needs pixel review")
    # and no shipped pixel is saturated text: text is burned at the top of the range, images stay below;
    # the cleaned boxes are recorded and read as air (0) in the models' view, fluoroscopy included
    cleaned_polarities = set()
    for path in (home / "shards").glob("*.tar"):
        for key, pixels, metadata in iter_shard(path):
            if metadata["source_sha256"] in burned:
                assert (pixels >= 65000).mean() < 0.001, key
                boxes = metadata["normalization"]["blanked"]
                assert boxes, key
                view = model_view(pixels, metadata["normalization"])
                assert all((view[y0:y1, x0:x1] == 0).all() for x0, y0, x1, y1 in boxes), key
                cleaned_polarities.add(metadata["normalization"]["attenuation_bright"])
    assert cleaned_polarities == {True, False}, "cleaned text on radiography and on fluoroscopy"


def test_uids_series_and_dates_stay_consistent(ingested):
    home, source = ingested["home"], ingested["source"]
    images = catalog_rows(home, "SELECT source_sha256, patient_key, study_key, series_key, study_date FROM images")
    by_sha = {row["source_sha256"]: row for row in images}
    series_of: dict[str, set] = {}
    dates: dict[str, dict] = {}
    for label in ingested["labels"]:
        if label["sha256"] not in by_sha:
            continue
        original = pydicom.dcmread(source / label["path"], stop_before_pixels=True)
        row = by_sha[label["sha256"]]
        series_of.setdefault(original.SeriesInstanceUID, set()).add(row["series_key"])
        original_date = np.datetime64(f"{original.StudyDate[:4]}-{original.StudyDate[4:6]}-{original.StudyDate[6:]}")
        shift = (np.datetime64(row["study_date"]) - original_date).astype(int)
        dates.setdefault(original.PatientID, {})[row["study_key"]] = shift
        assert shift != 0
    assert all(len(keys) == 1 for keys in series_of.values())  # series grouping survives
    for shifts in dates.values():
        assert len(set(shifts.values())) == 1  # one shift per patient: intervals kept
    multi = [p for p in dates.values() if len(p) > 1]
    assert multi, "the corpus should hold patients with several studies"


def test_a_second_run_adds_nothing(ingested, tmp_path):
    home = ingested["home"]
    before = {table: catalog_rows(home, f"SELECT count(*) AS n FROM {table}")[0]["n"]
              for table in ("sources", "images", "shards")}
    shards_before = sorted(p.name for p in (home / "shards").glob("*.tar"))
    run_dax(ingested["tmp"], "ingest", str(ingested["source"]), "--home", str(home), "--batch-size", "8",
            "--max-size", "160")
    after = {table: catalog_rows(home, f"SELECT count(*) AS n FROM {table}")[0]["n"]
             for table in ("sources", "images", "shards")}
    assert after == before
    assert sorted(p.name for p in (home / "shards").glob("*.tar")) == shards_before
    last = catalog_rows(home, "SELECT ingested, unchanged, surveyed, files FROM runs ORDER BY started_at DESC LIMIT 1")[0]
    assert last["ingested"] == 0 and last["unchanged"] == last["files"] and last["surveyed"] == 0  # none read


def _content(home: Path) -> dict:
    sources = catalog_rows(home, "SELECT sha256, status, reason, samples FROM sources ORDER BY sha256")
    images = catalog_rows(home, "SELECT key, source_sha256, frame, patient_key, series_key, study_date, rows, cols "
                                "FROM images ORDER BY key")
    pixels = {}
    for path in (home / "shards").glob("*.tar"):
        for key, array, _ in iter_shard(path):
            assert key not in pixels, "an image is stored twice"
            pixels[key] = hashlib.sha256(array.tobytes()).hexdigest()
    return {"sources": sources, "images": images, "pixels": pixels}


def test_kill_and_rerun_gives_the_clean_run_content(ingested, tmp_path):
    source = ingested["source"]
    home = tmp_path / "home"
    command = [DAX, "ingest", str(source), "--home", str(home), "--batch-size", "4", "--max-size", "160",
               "--workers", "1"]
    process = subprocess.Popen(command, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list((home / "shards").glob("*.tar")) and process.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    run_dax(tmp_path, "ingest", str(source), "--home", str(home), "--batch-size", "4", "--max-size", "160")
    assert not list((home / "shards").glob(".*tmp*"))
    assert _content(home) == _content(ingested["home"])


def test_auditor_queries_the_snapshot_in_every_format(ingested):
    home = ingested["home"]
    table = run_dax(ingested["tmp"], "catalog", "sql", "SELECT status, count(*) AS n FROM sources GROUP BY 1 ORDER BY 1",
                    "--home", str(home)).stdout
    assert "ingested" in table and "quarantined" in table
    as_json = json.loads(run_dax(ingested["tmp"], "catalog", "sql", "SELECT count(*) AS n FROM images",
                                 "--home", str(home), "--format", "json").stdout)
    assert as_json[0]["n"] > 0
    csv = run_dax(ingested["tmp"], "catalog", "sql", "SELECT modality FROM images LIMIT 1", "--home", str(home),
                  "--format", "csv").stdout
    assert csv.splitlines()[0] == "modality"
    refused = run_dax(ingested["tmp"], "catalog", "sql", "DELETE FROM images", "--home", str(home), check=False)
    assert refused.returncode != 0
    typo = run_dax(ingested["tmp"], "catalog", "sql", "SELECT columns FROM images", "--home", str(home), check=False)
    assert typo.returncode == 2 and typo.stdout.startswith("error:") and "Binder Error" in typo.stdout
    assert "Traceback" not in typo.stdout + typo.stderr
    report = run_dax(ingested["tmp"], "catalog", "report", "--home", str(home))
    assert (home / "catalog-report.html").exists() and "report written" in report.stdout


def test_pretraining_settings_selections_and_labels_are_refused_before_prefects_api_starts(ingested, tmp_path,
                                                                                           capsys):
    """`dax pretrain` on an ingested home: an unknown setting, a selection that matches nothing or does not parse,
    a label file of another corpus or of training patients only is one line, without starting Prefect's API (14 s,
    and a traceback logged before the line, until the CLI checked them first). The CLI's own preflight in this
    process, and once through `dax` itself."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import typer

    from flows.cli import preflight, user_errors
    from tasks.ingest.labels import load_labels

    every, train_only, foreign = (tmp_path / f"{name}.parquet" for name in ("every", "train-only", "foreign"))
    rows = [{k: row[k] for k in ("sha256", "frame", "region")} for row in ingested["labels"]]
    pq.write_table(pa.Table.from_pylist(rows), every)
    split = {row["key"]: row["split"] for row in load_labels(ingested["home"], every).to_pylist()}
    key = {(row["source_sha256"], row["frame"]): row["key"]
           for row in catalog_rows(ingested["home"], "SELECT key, source_sha256, frame FROM images")}
    trained = [row for row in rows if split.get(key.get((row["sha256"], row["frame"]))) == "train"]
    assert {"train", "test"} <= set(split.values()) and trained
    pq.write_table(pa.Table.from_pylist(trained), train_only)
    pq.write_table(pa.Table.from_pylist([{"sha256": "0" * 64, "frame": 0, "region": "hand"}]), foreign)

    home = ingested["home"]
    preflight(configs=["demo-cpu"], home=home, catalog=True, where="modality = 'XA'", labels=every)   # all good
    for given, said in (({"overrides": {"nonsense": 1}}, "unknown pretraining settings: nonsense"),
                        ({"where": "modality = 'ZZ'"}, "no image in the catalog matches: modality = 'ZZ'"),
                        ({"where": "modality = "}, "refused catalog query: the query does not parse"),
                        ({"labels": foreign}, "the label file matches no ingested image"),
                        ({"labels": train_only}, "every labelled patient falls in the train split")):
        with pytest.raises(typer.Exit) as stopped, user_errors():       # a user error: one line, exit code 2
            preflight(**{"configs": ["demo-cpu"], "home": home, "catalog": True, **given})
        assert stopped.value.exit_code == 2 and f"error: {said}" in " ".join(capsys.readouterr().out.split())
    env = _env(ingested["tmp"]) | {"PREFECT_HOME": str(ingested["tmp"] / "unused-prefect-home")}
    done = subprocess.run([DAX, "pretrain", "--labels", str(train_only), "--home", str(home)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout.startswith("error: every labelled patient falls in the train split")
    assert "Traceback" not in done.stdout + done.stderr
    assert not (ingested["tmp"] / "unused-prefect-home" / "prefect.db").exists()


def test_locate_maps_a_hash_back_to_its_source_path(ingested):
    label = ingested["labels"][0]
    found = run_dax(ingested["tmp"], "locate", label["sha256"], str(ingested["source"])).stdout.strip()
    assert found.endswith(label["path"])
    not_a_hash = run_dax(ingested["tmp"], "locate", "abc", str(ingested["source"]), check=False)
    assert not_a_hash.returncode == 2 and "64 hexadecimal digits" in not_a_hash.stdout + not_a_hash.stderr
    no_source = run_dax(ingested["tmp"], "locate", label["sha256"], str(ingested["tmp"] / "gone"), check=False)
    assert no_source.returncode == 2 and no_source.stdout.startswith("error: the ingestion source does not exist")


def test_user_errors_are_one_clear_line(tmp_path):
    source = tmp_path / "export"
    source.mkdir()
    env = {k: v for k, v in _env(tmp_path).items() if k != "DAX_DEID_SECRET"}
    no_secret = subprocess.run([DAX, "ingest", str(source), "--home", str(tmp_path / "home")], env=env,
                               capture_output=True, text=True, timeout=300)
    assert no_secret.returncode == 2 and "error: no de-identification secret" in no_secret.stdout
    assert "Traceback" not in no_secret.stdout + no_secret.stderr
    # a first run's Prefect home has no database, so no Secret block: refused without starting Prefect's API
    first = subprocess.run([DAX, "ingest", str(source), "--home", str(tmp_path / "home")],
                           env=env | {"PREFECT_HOME": str(tmp_path / "new-prefect-home")}, capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 2 and "error: no de-identification secret" in first.stdout
    assert not (tmp_path / "new-prefect-home" / "prefect.db").exists(), "the API started to look for the block"
    short_secret = subprocess.run([DAX, "ingest", str(source), "--home", str(tmp_path / "home")],
                                  env=env | {"DAX_DEID_SECRET": "too-short"}, capture_output=True, text=True,
                                  timeout=300)
    assert short_secret.returncode == 2 and "error: the de-identification secret must be" in short_secret.stdout
    assert "Traceback" not in short_secret.stdout + short_secret.stderr
    no_source = run_dax(tmp_path, "ingest", str(tmp_path / "no such export"), "--home", str(tmp_path / "home"),
                        check=False)
    assert no_source.returncode == 2 and "error: the ingestion source does not exist" in no_source.stdout
    assert "Traceback" not in no_source.stdout + no_source.stderr and "no such export" not in no_source.stdout
    # a source is refused before the flow, and Prefect with it, is loaded (it would make its home)
    unloaded = env | {"DAX_DEID_SECRET": SECRET, "PREFECT_HOME": str(tmp_path / "unused-prefect-home")}
    no_export = subprocess.run([DAX, "pipeline", str(tmp_path / "no such export"), "--home", str(tmp_path / "home")],
                               env=unloaded, capture_output=True, text=True, timeout=300)
    assert no_export.returncode == 2 and "error: the ingestion source does not exist" in no_export.stdout
    assert not (tmp_path / "unused-prefect-home").exists(), "Prefect was loaded before the refusal"
    no_snapshot = run_dax(tmp_path, "catalog", "sql", "SELECT 1", "--home", str(tmp_path / "empty"), check=False)
    assert no_snapshot.returncode == 2 and "run `dax ingest` first" in no_snapshot.stdout
