"""Fake identities for synthetic studies: a `Patient` and the `StudyContext` of one visit.

Everything here is invented and drawn from a numpy ``Generator`` only, so the same seed gives the
same people, dates and UIDs byte for byte. Names are assembled from syllables (family names) and a
list of common given names, so they are varied (tens of thousands of combinations) but never a
particular real person. dicom_writer.py plants these values in every place real PHI hides.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np

# Family names are two syllables glued together: 40 x 32 combinations.
_FAMILY_HEADS = (
    "ALDER", "BRAN", "CALD", "DORN", "EVER", "FALK", "GARR", "HOLM", "IVER", "JESS",
    "KELL", "LANG", "MARR", "NORD", "OSTER", "PELL", "QUINN", "ROTH", "STAN", "TOLL",
    "URS", "VALL", "WEST", "YARR", "ZELL", "ASH", "BECK", "CORR", "DELL", "ELM",
    "FENN", "GILD", "HADD", "INGR", "KIRK", "LOCK", "MORR", "NESS", "PRENT", "RADD",
)
_FAMILY_TAILS = (
    "WICK", "FIELD", "HOLT", "BERG", "STROM", "MORE", "WELL", "TON", "LEY", "BY",
    "RIDGE", "WOOD", "MARK", "HAM", "FORD", "DALE", "SON", "STEAD", "BROOK", "HURST",
    "MANN", "GATE", "LUND", "VIK", "ROSE", "WARD", "COTT", "HAVEN", "MOOR", "SHAW",
    "THORPE", "LOW",
)
_GIVEN_FEMALE = (
    "ANNA", "BEATRIX", "CLARA", "DORA", "ELENA", "FIONA", "GRETA", "HANNA", "IRIS", "JUNE",
    "KAREN", "LENA", "MAREN", "NORA", "OLIVIA", "PAULA", "ROSA", "SOFIA", "TILDA", "VERA",
    "WILMA", "YARA", "ZOE", "AMELIE", "BRITT", "CELINE", "DAPHNE", "EDITH", "FRIDA", "GWEN",
)
_GIVEN_MALE = (
    "ANTON", "BRUNO", "CARL", "DAVID", "EMIL", "FELIX", "GUSTAV", "HUGO", "IVAN", "JONAS",
    "KARL", "LEON", "MARTIN", "NILS", "OSCAR", "PAUL", "RUBEN", "SIMON", "THEO", "VIKTOR",
    "WALTER", "XAVIER", "YANNICK", "ZENO", "ARVID", "BENNO", "CASPAR", "DENIS", "EDGAR", "FINN",
)
_INITIALS = "ABCDEFGHJKLMNPRSTVW"
_STREETS = (
    "ORCHARD LANE", "MILL ROAD", "HARBOUR STREET", "LINDEN AVENUE", "STATION ROAD", "BIRCH CLOSE",
    "MARKET SQUARE", "CHAPEL WAY", "RIVERSIDE DRIVE", "HIGHFIELD ROAD", "MEADOW VIEW", "KING'S ROW",
)
_TOWNS = (
    "NORTHBRIDGE", "ELMSTEAD", "KESTON VALE", "ASHFORD GREEN", "MARLOW HEATH", "DUNMORE",
    "WESTHAVEN", "BRAMLEY CROSS", "FENWICK", "HOLLOWAY PARK",
)
_ETHNIC_GROUPS = ("", "", "", "WHITE", "ASIAN", "BLACK", "HISPANIC", "MIXED")
_HOSPITAL_STEMS = ("ST. AGATHA", "RIVERVALE", "NORTHGATE", "MERCY HILL", "LAKESIDE", "KINGSMERE",
                   "HOLLOWAY", "ST. BRENDAN", "EASTBROOK", "WILLOWMEAD")
_HOSPITAL_KINDS = ("GENERAL HOSPITAL", "UNIVERSITY MEDICAL CENTER", "REGIONAL HOSPITAL",
                   "ORTHOPAEDIC CLINIC", "TRAUMA CENTRE")
_DEPARTMENTS = ("ORTHOPAEDIC SURGERY", "TRAUMATOLOGY", "SPINE SURGERY", "OR SUITE 3",
                "HYBRID OR", "RADIOLOGY")
_PROCEDURES = (
    "PEDICLE SCREW FIXATION", "INTRAMEDULLARY NAILING", "ORIF WITH PLATE", "K-WIRE FIXATION",
    "CANNULATED SCREW FIXATION", "SPINAL FUSION", "FRACTURE REDUCTION", "HARDWARE REMOVAL",
)

# Root of the UIDs this generator itself owns (implementation class UID of the writer).
DAX_UID_ROOT = "1.2.826.0.1.3680043.10.543"


@dataclass(frozen=True)
class Patient:
    """Patient module content (and the identity behind every other PHI value)."""

    family: str
    given: str
    middle: str
    patient_id: str                 # hospital MRN
    issuer: str                     # issuer of the MRN
    other_ids: tuple[str, ...]      # IDs from other systems (insurance number, former MRN)
    birth_date: dt.date
    sex: str                        # 'M' | 'F'
    size_m: str                     # DS, metres
    weight_kg: str                  # DS, kilograms
    address: str
    phones: tuple[str, ...]
    ethnic_group: str               # '' when not recorded
    comments: str                   # free text naming the patient

    @property
    def name(self) -> str:
        """DICOM person name: FAMILY^GIVEN^MIDDLE."""
        return f"{self.family}^{self.given}^{self.middle}"

    @property
    def display_name(self) -> str:
        """The name as a device prints it on screen: 'FAMILY, GIVEN'."""
        return f"{self.family}, {self.given}"

    def age_at(self, day: dt.date) -> str:
        """DICOM age string (AS) on ``day``: '067Y', or months/weeks/days for infants."""
        years = day.year - self.birth_date.year - ((day.month, day.day) < (self.birth_date.month, self.birth_date.day))
        if years >= 2:
            return f"{years:03d}Y"
        days = (day - self.birth_date).days
        return f"{days // 30:03d}M" if days >= 60 else f"{days:03d}D"


@dataclass(frozen=True)
class StudyContext:
    """One visit: General Study, Patient Study, equipment site and request (order) content."""

    uid_root: str                   # the institution's UID root, '1.2.826.0.1.3680043.10.<n>'
    study_instance_uid: str
    institution_name: str
    institution_address: str
    department: str
    referring_physician: str        # PN
    performing_physician: str       # PN
    operator: str                   # PN, the radiographer at the C-arm
    requesting_physician: str       # PN
    accession_number: str
    study_id: str
    requested_procedure_id: str
    scheduled_step_id: str
    performed_step_id: str
    study_datetime: dt.datetime
    patient_age: str                # AS at the study date
    procedure: str                  # the operation, plain words
    study_description: str          # free text naming the patient
    requested_procedure_description: str  # free text naming the patient and a date
    procedure_code_meaning: str     # CodeMeaning of the procedure code, names the patient
    station_name: str
    station_ae_title: str
    device_serial: str


def make_uid(root: str, rng: np.random.Generator) -> str:
    """A UID under ``root`` drawn from ``rng`` (deterministic; at most 64 characters)."""
    tail = f"{int(rng.integers(1, 10**9))}.{int(rng.integers(10**17, 10**18))}"
    uid = f"{root}.{tail}"
    if len(uid) > 64:
        raise ValueError(f"UID root {root!r} too long")
    return uid


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _digits(rng: np.random.Generator, n: int) -> str:
    return "".join(str(int(d)) for d in rng.integers(0, 10, size=n))


def _phone(rng: np.random.Generator) -> str:
    return f"+44 {int(rng.integers(1200, 1999))} {_digits(rng, 6)}"


def _person(rng: np.random.Generator, title: str = "") -> str:
    """A staff member's PN: FAMILY^GIVEN^^TITLE."""
    family = _pick(rng, _FAMILY_HEADS) + _pick(rng, _FAMILY_TAILS)
    given = _pick(rng, _GIVEN_FEMALE + _GIVEN_MALE)
    return f"{family}^{given}^^{title}" if title else f"{family}^{given}"


def make_patient(rng: np.random.Generator) -> Patient:
    """A fictional patient with every Patient-module attribute filled."""
    sex = "F" if rng.random() < 0.5 else "M"
    family = _pick(rng, _FAMILY_HEADS) + _pick(rng, _FAMILY_TAILS)
    given = _pick(rng, _GIVEN_FEMALE if sex == "F" else _GIVEN_MALE)
    middle = _pick(rng, _INITIALS)
    birth = dt.date(1930, 1, 1) + dt.timedelta(days=int(rng.integers(0, 75 * 365)))
    height = rng.normal(1.64 if sex == "F" else 1.77, 0.07)
    weight = rng.normal(68 if sex == "F" else 82, 12)
    address = (f"{int(rng.integers(1, 240))} {_pick(rng, _STREETS)}, {_pick(rng, _TOWNS)}"
               f" {chr(65 + int(rng.integers(26)))}{chr(65 + int(rng.integers(26)))}{int(rng.integers(1, 30))} "
               f"{int(rng.integers(1, 10))}{chr(65 + int(rng.integers(26)))}{chr(65 + int(rng.integers(26)))}")
    patient_id = str(int(rng.integers(10**7, 10**8)))
    other_ids = (f"NHS{_digits(rng, 10)}", f"OLD-{_digits(rng, 6)}")
    phones = (_phone(rng), _phone(rng))
    comments = (f"{given.title()} {family.title()} - allergic to latex; "
                f"next of kin {_pick(rng, _GIVEN_FEMALE + _GIVEN_MALE).title()} {family.title()} {phones[1]}")
    return Patient(
        family=family, given=given, middle=middle, patient_id=patient_id,
        issuer=_pick(rng, _HOSPITAL_STEMS).replace(". ", "").replace(" ", "") + "-MRN",
        other_ids=other_ids, birth_date=birth, sex=sex,
        size_m=f"{float(np.clip(height, 1.40, 2.05)):.2f}",
        weight_kg=f"{float(np.clip(weight, 40, 150)):.1f}",
        address=address, phones=phones, ethnic_group=_pick(rng, _ETHNIC_GROUPS), comments=comments,
    )


def make_study(patient: Patient, rng: np.random.Generator, *, procedure: str | None = None) -> StudyContext:
    """A fictional visit of ``patient`` (study date 2015-2025) with its institution, staff and order.

    ``procedure`` (plain words, e.g. 'PEDICLE SCREW FIXATION') is drawn when not given.
    """
    root = f"1.2.826.0.1.3680043.10.{int(rng.integers(1000, 100000))}"
    day = dt.date(2015, 1, 1) + dt.timedelta(days=int(rng.integers(0, 11 * 365)))
    when = dt.datetime.combine(day, dt.time(int(rng.integers(7, 19)), int(rng.integers(60)), int(rng.integers(60))))
    procedure = procedure or _pick(rng, _PROCEDURES)
    hospital = f"{_pick(rng, _HOSPITAL_STEMS)} {_pick(rng, _HOSPITAL_KINDS)}"
    patient_words = f"{patient.given.title()} {patient.family.title()}"
    station = f"{_pick(rng, ('CARM', 'OR', 'FLUORO', 'XR'))}{int(rng.integers(1, 20)):02d}"
    return StudyContext(
        uid_root=root,
        study_instance_uid=make_uid(root, rng),
        institution_name=hospital,
        institution_address=f"{int(rng.integers(1, 400))} {_pick(rng, _STREETS)}, {_pick(rng, _TOWNS)}",
        department=_pick(rng, _DEPARTMENTS),
        referring_physician=_person(rng, "DR"),
        performing_physician=_person(rng, "DR"),
        operator=_person(rng),
        requesting_physician=_person(rng, "DR"),
        accession_number=f"A{day:%y}{_digits(rng, 7)}",
        study_id=_digits(rng, 6),
        requested_procedure_id=f"RP{_digits(rng, 8)}",
        scheduled_step_id=f"SPS{_digits(rng, 7)}",
        performed_step_id=f"PPS{_digits(rng, 7)}",
        study_datetime=when,
        patient_age=patient.age_at(day),
        procedure=procedure,
        study_description=f"INTRAOP {procedure} - {patient.family} {patient.given}",
        requested_procedure_description=f"{procedure} for {patient_words} on {day:%d/%m/%Y}",
        procedure_code_meaning=f"{procedure.title()} ({patient_words})",
        station_name=station,
        station_ae_title=f"{station}_{_digits(rng, 2)}",
        device_serial=f"SN{_digits(rng, 9)}",
    )
