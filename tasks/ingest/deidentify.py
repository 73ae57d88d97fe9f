"""De-identification of C-arm X-ray DICOM (XA, RF, DX, CR) at ingestion, in memory.

Implements DICOM PS3.15 2024b Annex E, Table E.1-1: the Basic Application Level Confidentiality
Profile with the Retain Longitudinal Temporal Information with Modified Dates Option and the Retain
Patient Characteristics Option. The attribute rules live in an auditable deid recipe
(``deployments/deid/dax-basic-profile.recipe``); this module supplies the keyed functions the recipe
calls and enforces what a recipe cannot express:

- every private element, overlay plane (60xx), curve (50xx) and Icon Image Sequence is gone;
- the file meta Media Storage SOP Instance UID equals the new SOP Instance UID (PS3.10 7.1);
- a recursive safety net blanks every text, date or time element outside an explicit allow-list,
  rewrites any UID the recipe left unmapped, and removes unknown binary elements.

Keyed scheme (PS3.15 E.3.9 asks that replaced UIDs stay consistent within a data set): with a secret
``k`` held outside the data, a UID ``u`` becomes ``"2.25." + int(HMAC-SHA256(k, u)[:16])``, the same
in every worker and every run, yet not recomputable from ``u`` without ``k`` (unlike unkeyed hashes).
Dates move by a whole number of days derived from HMAC(k, PatientID), so intervals within a patient
are kept (PS3.15 E.3.6). Messages under the key are domain-separated: a UID never contains ``:``,
every other message is ``"<domain>:<value>"``.
"""
from __future__ import annotations

import copy
import datetime as dt
import hashlib
import hmac
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pydicom
from deid.config import DeidRecipe
from pydicom.dataset import FileDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from deployments import SHIPPED
from tasks.fileio import sha256_file
from tasks.ingest.deid_plan import PlanMismatch, PlanStore, RecipePlanner

DEFAULT_RECIPE = SHIPPED / "deid" / "dax-basic-profile.recipe"
SECRET_BLOCK = "dax-deid-secret"
SECRET_ENV_VAR = "DAX_DEID_SECRET"
MIN_SECRET_BYTES = 16
SHIFT_MIN_DAYS, SHIFT_MAX_DAYS = 365, 3650  # dates move back by 1 to 10 years
REGISTRY_UID_ROOT = "1.2.840.10008."  # UIDs the standard itself defines (PS3.6 Annex A)

# PS3.16 CID 7050 De-identification Methods, as recorded in (0012,0064).
METHOD_CODES = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113106", "Retain Longitudinal Temporal Information Modified Dates Option"),
    ("113108", "Retain Patient Characteristics Option"),
)

# --- safety net allow-lists --------------------------------------------------------------------------
TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR", "UT"})
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
CLASS_UID_KEYWORDS = frozenset({
    "SOPClassUID", "MediaStorageSOPClassUID", "ReferencedSOPClassUID", "ReferencedSOPClassUIDInFile",
    "TransferSyntaxUID", "ImplementationClassUID", "CodingSchemeUID",
})
SHIFTED_DATE_KEYWORDS = frozenset({
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "InstanceCreationDate",
    "AcquisitionDateTime",
})
KEPT_TEXT_KEYWORDS = frozenset({
    # identification written by the recipe (checked against the pseudonym separately)
    "PatientID", "PatientName", "PatientIdentityRemoved", "DeidentificationMethod",
    "LongitudinalTemporalInformationModified", "SpecificCharacterSet",
    # Retain Patient Characteristics Option
    "PatientSex", "PatientAge",
    # device type (see the recipe: needed for per-device pixel rules and the catalog)
    "Manufacturer", "ManufacturerModelName", "SoftwareVersions",
    "DetectorManufacturerName", "DetectorManufacturerModelName",
    # times of day (dates are shifted)
    "StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime", "InstanceCreationTime",
    # image, pixel and presentation semantics (defined terms)
    "ImageType", "Modality", "ConversionType", "PhotometricInterpretation", "BurnedInAnnotation",
    "RecognizableVisualFeatures", "LossyImageCompression", "LossyImageCompressionMethod",
    "PixelIntensityRelationship", "PresentationLUTShape", "PresentationIntentType", "VOILUTFunction",
    "RescaleType", "CalibrationImage", "QualityControlImage",
    # anatomy and geometry
    "BodyPartExamined", "Laterality", "ImageLaterality", "PatientOrientation", "PatientPosition",
    "ViewPosition", "PositionerMotion", "PositionerType", "FieldOfViewShape",
    # acquisition technique
    "RadiationSetting", "RadiationMode", "ExposureControlMode", "ExposureStatus", "Grid",
    "FilterType", "FilterMaterial", "AnodeTargetMaterial", "CollimatorShape", "ShutterShape",
    "DetectorType", "DetectorConfiguration", "ScanOptions", "ContrastBolusIngredient",
})
CODE_ITEM_KEYWORDS = frozenset({
    "CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion", "CodeMeaning",
})
CODED_SEQUENCES = frozenset({  # sequences whose code items are standard vocabulary, kept whole
    "AnatomicRegionSequence", "AnatomicRegionModifierSequence", "PrimaryAnatomicStructureSequence",
    "ViewCodeSequence", "ViewModifierCodeSequence", "PatientOrientationCodeSequence",
    "PatientOrientationModifierCodeSequence", "PatientGantryRelationshipCodeSequence",
    "DerivationCodeSequence", "PurposeOfReferenceCodeSequence", "DeidentificationMethodCodeSequence",
})
KEPT_BINARY_KEYWORDS = frozenset({
    "PixelData", "FloatPixelData", "DoubleFloatPixelData", "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths", "LUTData", "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableData", "BluePaletteColorLookupTableData",
    "AlphaPaletteColorLookupTableData", "SegmentedRedPaletteColorLookupTableData",
    "SegmentedGreenPaletteColorLookupTableData", "SegmentedBluePaletteColorLookupTableData",
    "FileMetaInformationVersion",
})
FILE_META_KEYWORDS = frozenset({
    "FileMetaInformationGroupLength", "FileMetaInformationVersion", "MediaStorageSOPClassUID",
    "MediaStorageSOPInstanceUID", "TransferSyntaxUID", "ImplementationClassUID",
})


# Keys of DeidResult.actions, always present (0 when nothing of that kind was done).
ACTION_KINDS = (
    "removed",               # elements (at any depth) the recipe removed, private ones included
    "uids_replaced",         # keyed UIDs written (U)
    "dates_shifted",         # dates moved by the patient's offset (C)
    "dates_blanked",         # dates that could not be parsed, emptied rather than kept
    "pseudonyms",            # PatientID / PatientName replaced by the pseudonym (D)
    "emptied",               # type 2 attributes set to zero length (Z)
    "private_removed",       # private elements still present after the recipe
    "graphics_removed",      # overlay, curve and icon elements still present after the recipe
    "safety_net_removed",    # binary or file meta elements outside the allow-list
    "safety_net_blanked",    # text, date or time elements outside the allow-list
    "safety_net_rewritten",  # UIDs the recipe left unmapped
)


class DeidError(RuntimeError):
    """De-identification could not be done safely (no key, unusable recipe)."""


class NoSecretError(DeidError):
    """No de-identification secret is configured at all (as opposed to one that cannot be used)."""


@dataclass(frozen=True)
class DeidKey:
    """The secret of the keyed scheme. Its repr and str show a fingerprint, never the secret."""

    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes) or len(self.secret) < MIN_SECRET_BYTES:
            raise DeidError(f"the de-identification secret must be at least {MIN_SECRET_BYTES} bytes")

    def __repr__(self) -> str:
        return f"DeidKey(fingerprint={self.fingerprint})"

    __str__ = __repr__

    @property
    def fingerprint(self) -> str:
        """First 16 hex digits of SHA-256 over a domain-separated hash of the secret: names a key in
        logs and manifests without revealing it."""
        inner = hashlib.sha256(b"dax-deid-key-fingerprint:" + self.secret).digest()
        return hashlib.sha256(inner).hexdigest()[:16]

    def _mac(self, message: str) -> bytes:
        return hmac.new(self.secret, message.encode("utf-8"), hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        """``"2.25." + decimal of the first 128 bits of HMAC-SHA256(secret, original UID)``: a UUID-derived
        UID (PS3.5 B.2) of at most 44 characters, the same for the same UID in every run."""
        return "2.25." + str(int.from_bytes(self._mac(original.strip("\0 "))[:16], "big"))

    def date_shift_days(self, patient_id: str) -> int:
        """Whole days, between -SHIFT_MAX_DAYS and -SHIFT_MIN_DAYS, to add to every date of a patient."""
        span = SHIFT_MAX_DAYS - SHIFT_MIN_DAYS + 1
        return -(SHIFT_MIN_DAYS + int.from_bytes(self._mac(f"date-shift:{patient_id}")[:8], "big") % span)

    def pseudonym(self, kind: str, original: str) -> str:
        """``"DAX-"`` + first 16 hex digits of HMAC-SHA256(secret, ``"<kind>:<original>"``)."""
        return "DAX-" + self._mac(f"{kind}:{original}").hex()[:16]


def load_key(secret: str | None = None) -> DeidKey:
    """The key from ``secret``, else the environment variable ``DAX_DEID_SECRET`` (set for this process:
    it wins, and costs no API call in every worker), else the Prefect Secret block ``dax-deid-secret``.
    Raises NoSecretError (a DeidError) if none is set. The secret is never logged."""
    if secret is None:
        secret = os.environ.get(SECRET_ENV_VAR) or None
    if secret is None:
        secret = _secret_from_prefect_block()
    if not secret:
        raise NoSecretError(
            f"no de-identification secret: pass one, create the Prefect Secret block {SECRET_BLOCK!r}, "
            f"or set the environment variable {SECRET_ENV_VAR}"
        )
    return DeidKey(secret.encode("utf-8"))


def _secret_from_prefect_block() -> str | None:
    """The Secret block's value, or None when Prefect is absent, has no API, or has no such block."""
    try:
        import httpx
        from prefect.blocks.system import Secret
    except ImportError:
        return None
    if _no_prefect_database():
        return None
    try:
        value = Secret.load(SECRET_BLOCK).get()
    except ValueError as error:  # Prefect's wording for a missing block and for a missing API URL
        if str(error).startswith(("Unable to find block document", "No Prefect API URL")):
            return None
        raise
    except httpx.TransportError:  # API configured but unreachable
        return None
    if not isinstance(value, str):
        raise DeidError(f"the Prefect Secret block {SECRET_BLOCK!r} must hold a string")
    return value


def _no_prefect_database() -> bool:
    """True when Prefect has no API URL (it would start its temporary API) and the SQLite database that API would
    serve does not exist yet: no block can be stored there, so looking one up would only start the API for
    seconds and create an empty database (a first `dax ingest` without a secret said so after 15-23 s)."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:
        return False
    url = settings.server.database.connection_url
    url = url.get_secret_value() if url is not None else ""
    scheme, _, path = url.partition(":///")
    return scheme.startswith("sqlite") and bool(path) and "?" not in path and path != ":memory:" \
        and not Path(path).exists()


@dataclass(frozen=True)
class DeidResult:
    """A de-identified dataset and its pseudonymous grouping keys.

    ``patient_key``, ``study_key`` and ``series_key`` are ``DeidKey.pseudonym`` of the original
    PatientID, StudyInstanceUID and SeriesInstanceUID: stable across processes and runs.
    ``actions`` counts what was done, by kind.
    """

    dataset: pydicom.Dataset
    patient_key: str
    study_key: str
    series_key: str
    date_shift_days: int
    actions: dict[str, int]


ENGINES = ("plan", "deid")


def deidentify(ds: pydicom.Dataset, key: DeidKey, recipe: Path = DEFAULT_RECIPE,
               engine: str = "plan", *, reread: Callable[[], pydicom.Dataset] | None = None,
               plan_cache: str | os.PathLike | None = None) -> DeidResult:
    """De-identify a copy of ``ds`` in memory; ``ds`` and its source file are left untouched.

    With ``reread`` (a way to read the same data set again, e.g. from its file), ``ds`` itself is
    de-identified in place instead, saving the copy: the caller hands ``ds`` over. ``reread`` then
    serves the rare start-over with deid, which needs a pristine data set.

    With ``plan_cache`` (a directory), plans are also read from and written to disk there, shared by
    every process and run (``tasks.ingest.deid_plan.PlanStore``; keyed by the recipe file's sha256).

    The recipe's header actions are applied as deid's ``DicomParser(...).parse(remove_private=True)``
    applies them: with ``engine="deid"`` by deid itself on every dataset (the reference); with
    ``engine="plan"`` (the default) by a replay of what deid did to the first dataset of the same
    structure (``tasks.ingest.deid_plan``; deid runs, and records, on each new structure). Both give the same
    dataset. Then private elements, overlays, curves and icons still present are stripped, the file
    meta is aligned, and the safety net checks every element against the allow-lists above.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")
    patient_id = _patient_identity(ds)
    shift = key.date_shift_days(patient_id)
    pseudonym = key.pseudonym("patient", patient_id)
    study_key = key.pseudonym("study", str(ds.get("StudyInstanceUID", "")))
    series_key = key.pseudonym("series", str(ds.get("SeriesInstanceUID", "")))
    planner = _planner(Path(recipe)) if plan_cache is None else _planner(Path(recipe), Path(plan_cache))
    functions = _RecipeFunctions(key, shift, pseudonym)
    work = _working_copy(ds, copy_=reread is None)

    before = set(_element_paths(work))
    if engine == "plan":
        try:
            planner.apply(work, functions.hooks(), lambda: _RecipeFunctions(key, shift, pseudonym).hooks())
        except PlanMismatch:  # a value deid would treat otherwise: start over with deid
            functions = _RecipeFunctions(key, shift, pseudonym)
            work = _working_copy(ds) if reread is None else _working_copy(reread(), copy_=False)
            planner.run_deid(work, functions.hooks())
    else:
        planner.run_deid(work, functions.hooks())
    out = work

    actions = Counter(dict.fromkeys(ACTION_KINDS, 0))
    actions.update(functions.counts)
    actions["removed"] = len(before - set(_element_paths(out)))
    _strip_private_and_graphics(out, actions)
    _align_file_meta(out, functions, actions)
    _safety_net(out, functions, actions, parent="")
    return DeidResult(
        dataset=out,
        patient_key=functions.patient_pseudonym,
        study_key=study_key,
        series_key=series_key,
        date_shift_days=shift,
        actions=dict(actions),
    )


def shift_date(value: str, vr: str, days: int) -> str:
    """A DA (YYYYMMDD) or DT (YYYYMMDD[HHMMSS[.F{1,6}]][&ZZXX]) value moved by ``days``; the time of day
    and UTC offset are kept. A value that is not a full calendar date becomes empty, never kept."""
    text = value.strip()
    pattern = r"(\d{8})" if vr == "DA" else r"(\d{8})(\d{2,6}(?:\.\d{1,6})?)?([+-]\d{4})?"
    match = re.fullmatch(pattern, text)
    if not match:
        return ""
    try:
        moved = dt.datetime.strptime(match.group(1), "%Y%m%d").date() + dt.timedelta(days=days)
    except (ValueError, OverflowError):
        return ""
    return f"{moved.year:04d}{moved.month:02d}{moved.day:02d}" + text[8:]


class _RecipeFunctions:
    """The ``func:`` hooks the recipe calls for one dataset. Every value they write is remembered, so
    the safety net can tell a rewritten value from an original one that slipped through."""

    def __init__(self, key: DeidKey, shift_days: int, patient_pseudonym: str) -> None:
        self.key = key
        self.shift_days = shift_days
        self.patient_pseudonym = patient_pseudonym
        self.uids: set[str] = set()
        self.dates: set[str] = set()
        self.counts: Counter[str] = Counter()

    def hooks(self) -> dict[str, Callable]:
        return {
            "dax_uid": self._uid_hook,
            "dax_date": self._date_hook,
            "dax_pseudonym": self._pseudonym_hook,
            "dax_empty": self._empty_hook,
            "dax_keep": self._keep_hook,
            "dax_method_codes": self._method_codes_hook,
        }

    def new_uid(self, original: str) -> str:
        if not original or original.startswith(REGISTRY_UID_ROOT) or original in self.uids:
            return original
        new = self.key.uid(original)
        self.uids.add(new)
        self.counts["uids_replaced"] += 1
        return new

    def new_date(self, original: str, vr: str) -> str:
        new = shift_date(original, vr, self.shift_days)
        self.dates.add(new)
        self.counts["dates_shifted" if new else "dates_blanked"] += 1
        return new

    # deid calls each hook as f(dicom=..., value=<recipe text>, field=<DicomField>, item=<lookup>).
    def _uid_hook(self, field, **_) -> str | list[str]:
        if field.element.keyword in CLASS_UID_KEYWORDS:  # deid's KEEP does not reach into sequences
            return _map_values(field.element.value, str)
        return _map_values(field.element.value, self.new_uid)

    def _date_hook(self, field, **_) -> str | list[str]:
        return _map_values(field.element.value, lambda value: self.new_date(value, field.element.VR))

    def _pseudonym_hook(self, **_) -> str:
        self.counts["pseudonyms"] += 1
        return self.patient_pseudonym

    def _empty_hook(self, **_) -> str:
        self.counts["emptied"] += 1
        return ""

    def _keep_hook(self, field, **_) -> str | list[str]:
        return _map_values(field.element.value, str)

    def _method_codes_hook(self, **_) -> Sequence:
        items = []
        for value, meaning in METHOD_CODES:
            item = pydicom.Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
            items.append(item)
        return Sequence(items)


def _map_values(value, function: Callable[[str], str]) -> str | list[str]:
    if isinstance(value, (list, tuple, MultiValue)):
        return [function(str(v)) for v in value]
    return function(str(value or ""))


def _patient_identity(ds: pydicom.Dataset) -> str:
    """The original PatientID; without one, the study stands for the patient (never pooled under "")."""
    patient_id = str(ds.get("PatientID", "") or "").strip()
    return patient_id or "study:" + str(ds.get("StudyInstanceUID", "") or "")


def _working_copy(ds: pydicom.Dataset, copy_: bool = True) -> FileDataset:
    """A deep copy (or ``ds`` itself) deid can parse: deid hashes only FileDataset (a plain Dataset
    raises TypeError), and the source path is dropped so no deid log line can carry a PHI-bearing
    file name."""
    work = copy.deepcopy(ds) if copy_ else ds  # bytes are immutable: pixel data is shared, not copied
    if not isinstance(work, FileDataset):
        meta = work.file_meta if hasattr(work, "file_meta") else None
        work = FileDataset("", work, file_meta=meta, preamble=b"\0" * 128)
    work.filename = None
    return work


@lru_cache(maxsize=8)
def _planner(path: Path, plan_cache: Path | None = None) -> RecipePlanner:
    """The compiled recipe (plans by dataset structure) of the recipe file at ``path``; with
    ``plan_cache``, backed by a PlanStore there keyed by the sha256 of the recipe file's bytes."""
    if plan_cache is None:
        return RecipePlanner(_load_recipe(path))
    before = _file_sha256(path)
    recipe = _load_recipe.__wrapped__(path)  # parsed now, not a cached parse of an older file
    if _file_sha256(path) != before:  # edited while loading: no store rather than a wrong key
        return RecipePlanner(recipe)
    return RecipePlanner(recipe, store=PlanStore(plan_cache, before))


def _file_sha256(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError as error:
        raise DeidError(f"deid recipe not found: {path}") from error


@lru_cache(maxsize=8)
def _load_recipe(path: Path) -> DeidRecipe:
    """The parsed recipe. deid silently falls back to no rules for a missing file and calls sys.exit
    on a malformed one; both become DeidError here."""
    if not path.is_file():
        raise DeidError(f"deid recipe not found: {path}")
    try:
        recipe = DeidRecipe(str(path), base=False)
    except SystemExit as error:
        raise DeidError(f"deid could not parse the recipe {path}") from error
    if recipe.deid is None or not recipe.has_actions():
        raise DeidError(f"deid recipe has no %header actions: {path}")
    return recipe


def _element_paths(ds: pydicom.Dataset, prefix: tuple = ()) -> Iterator[tuple]:
    for elem in ds:
        path = prefix + (int(elem.tag),)
        yield path
        if elem.VR == "SQ":
            for index, item in enumerate(elem.value):
                yield from _element_paths(item, path + (index,))


def _is_graphics(tag: pydicom.tag.BaseTag) -> bool:
    """Overlay planes (60xx), curves (50xx) and the Icon Image Sequence (0088,0200)."""
    return (tag.group & 0xFF00) in (0x5000, 0x6000) or tag == 0x00880200


def _strip_private_and_graphics(ds: pydicom.Dataset, actions: Counter) -> None:
    """Remove what the recipe should already have removed, at every nesting level (Table E.1-1: X)."""
    private = sum(1 for elem in ds.iterall() if elem.tag.is_private)
    ds.remove_private_tags()  # recursive in pydicom 3
    actions["private_removed"] += private

    def strip(dataset: pydicom.Dataset) -> None:
        for elem in list(dataset):
            if _is_graphics(elem.tag):
                del dataset[elem.tag]
                actions["graphics_removed"] += 1
            elif elem.VR == "SQ":
                for item in elem.value:
                    strip(item)

    strip(ds)


def _align_file_meta(ds: FileDataset, functions: _RecipeFunctions, actions: Counter) -> None:
    """Keep only the file meta elements PS3.10 7.1 needs; the instance UID follows the new SOP
    Instance UID, so the file and its content name the same object."""
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        return
    for elem in list(meta):
        if elem.keyword not in FILE_META_KEYWORDS:
            del meta[elem.tag]
            actions["safety_net_removed"] += 1
    if "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    elif "MediaStorageSOPInstanceUID" in meta:
        meta.MediaStorageSOPInstanceUID = functions.new_uid(str(meta.MediaStorageSOPInstanceUID))


def _safety_net(ds: pydicom.Dataset, functions: _RecipeFunctions, actions: Counter, parent: str) -> None:
    """Walk every element: blank text outside the allow-lists, rewrite unmapped UIDs, drop unknown
    binary data. ``parent`` is the keyword of the enclosing sequence ("" at the top level)."""
    for elem in list(ds):
        keyword, vr = elem.keyword, elem.VR
        if vr == "SQ":
            for item in elem.value:
                _safety_net(item, functions, actions, parent=keyword)
        elif vr == "UI":
            if keyword not in CLASS_UID_KEYWORDS:
                mapped = _map_values(elem.value, functions.new_uid)
                if mapped != _map_values(elem.value, str):
                    elem.value = mapped
                    actions["safety_net_rewritten"] += 1
        elif vr in BINARY_VRS:
            if keyword not in KEPT_BINARY_KEYWORDS:
                del ds[elem.tag]
                actions["safety_net_removed"] += 1
        elif vr in TEXT_VRS and elem.value not in (None, "") and not _text_allowed(elem, functions, parent):
            elem.value = ""
            actions["safety_net_blanked"] += 1


def _text_allowed(elem: pydicom.DataElement, functions: _RecipeFunctions, parent: str) -> bool:
    keyword = elem.keyword
    values = _map_values(elem.value, str)
    values = values if isinstance(values, list) else [values]
    if keyword in ("PatientID", "PatientName"):
        return all(v == functions.patient_pseudonym for v in values)
    if keyword in SHIFTED_DATE_KEYWORDS:
        return all(v in functions.dates for v in values)
    if keyword in CODE_ITEM_KEYWORDS:
        return parent in CODED_SEQUENCES
    return keyword in KEPT_TEXT_KEYWORDS
