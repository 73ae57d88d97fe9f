"""One synthetic C-arm study, from a seed to DICOM files, ground-truth label rows and planted-PHI rows.

A study is what one patient's procedure leaves in a hospital export: a body region, a mobile C-arm
(fluoroscopy shots, cines, sometimes a 3D-scan sweep) and often radiographs before or after, with
implants appearing once they are placed. Everything is drawn from ``SeedSequence([seed, stream, index])``,
so study ``index`` is the same whichever batch, worker or run produces it.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from tasks.fileio import sha256_file
from tasks.label_schema import BODY_REGIONS, mask_to_png
from tasks.synth.anatomy import build_phantom
from tasks.synth.devices import DeviceModel, devices_for
from tasks.synth.dicom_writer import FileRecord, SeriesPlan, write_study
from tasks.synth.geometry import jitter_pose, random_pose, sweep_poses
from tasks.synth.implants import place_implants
from tasks.synth.phi import make_patient, make_study
from tasks.synth.render import central_transmission, render
from tasks.synth.scene import Exposure

C_ARM_MODALITIES = ("XA", "RF")
RADIOGRAPH_MODALITIES = ("DX", "CR")


@dataclass(frozen=True)
class SynthConfig:
    """How big and how varied a corpus is. Presets below; any field can be overridden."""

    detector_scale: float = 1.0            # pixels per side relative to each device's native detector
    series_per_study: tuple[int, int] = (1, 3)
    sweep_probability: float = 0.12        # a study adds a 3D-scan projection sweep
    sweep_views: tuple[int, int] = (50, 200)
    cine_frames: tuple[int, int] = (4, 12)
    fluoro_shots: tuple[int, int] = (1, 6)  # single-frame shots saved in one fluoroscopy series
    implant_probability: float = 0.7       # a study ends with metal in the patient
    studies_per_patient: int = 2           # consecutive study indices share a patient

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, values: dict) -> "SynthConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


PRESETS: dict[str, SynthConfig] = {
    # native detector sizes, sweeps of 50-200 views: what DAX's data looked like
    "full": SynthConfig(),
    # half-size detectors (~490-1000 px), shorter sweeps: the demo corpus, ~2,000 images in minutes
    "demo": SynthConfig(detector_scale=0.5, sweep_views=(50, 60), sweep_probability=0.1),
    # the labelled evaluation corpus of the heads: the demo's detectors, one study per patient (300 studies: 300
    # patients), a few frames per series and no sweep (near-duplicate views would shrink the patients' weight),
    # more studies with implants; made with its own seed, so its patients are not the pretraining corpus'
    "eval": SynthConfig(detector_scale=0.5, series_per_study=(1, 3), sweep_probability=0.0, cine_frames=(2, 3),
                        fluoro_shots=(1, 3), implant_probability=0.8, studies_per_patient=1),
    # tiny detectors and sweeps: a corpus in seconds, for tests
    "test": SynthConfig(detector_scale=0.25, sweep_views=(3, 4), cine_frames=(2, 3), fluoro_shots=(1, 2),
                        sweep_probability=0.3),
}

# Automatic exposure control: detected quanta per pixel behind the anatomy at the field centre.
# Radiographs get a high dose, fluoroscopy a low one (hence its visible quantum noise).
TARGET_QUANTA = {"radiograph": (1500.0, 4000.0), "fluoro": (60.0, 200.0), "cine": (40.0, 150.0), "sweep": (150.0, 500.0)}
MAX_PHOTONS = 2.0e5  # tube output limit: very thick parts stay underexposed
PROCEDURES = (("pedicle_screw", "PEDICLE SCREW FIXATION"), ("nail", "INTRAMEDULLARY NAILING"),
              ("plate", "ORIF WITH PLATE"), ("cannulated_screw", "CANNULATED SCREW FIXATION"),
              ("kwire", "K-WIRE FIXATION"))
LATERALITY_CODE = {"right": "R", "left": "L", "": ""}


STUDY_STREAM, PATIENT_STREAM = 0, 1


def study_rng(seed: int, index: int, stream: int = STUDY_STREAM) -> np.random.Generator:
    """Independent random streams per (corpus seed, study or patient index)."""
    return np.random.default_rng(np.random.SeedSequence([seed, stream, index]))


def generate_study(root: Path, seed: int, index: int, config: SynthConfig) -> tuple[list[dict], list[dict]]:
    """Write study ``index`` of corpus ``seed`` under ``root``; return (label rows, PHI rows).

    Label rows are one per image (one per frame of a multi-frame file).
    """
    rng = study_rng(seed, index)
    patient_index = index // config.studies_per_patient
    patient = make_patient(study_rng(seed, patient_index, PATIENT_STREAM))
    region = BODY_REGIONS[index % len(BODY_REGIONS)]  # cycling keeps the 11 classes balanced
    phantom = build_phantom(region, rng)
    implants = place_implants(phantom, rng) if rng.random() < config.implant_probability else []
    study = make_study(patient, rng, procedure=procedure_for(implants))

    plans = _plan_series(phantom, implants, study, rng, config)
    files, phi = write_study(root, patient, study, [p for p, _ in plans], rng)

    by_series = {plan.series_number: (plan, with_metal) for plan, with_metal in plans}
    labels: list[dict] = []
    for record in files:
        plan, with_metal = by_series[record.series_number]
        digest = sha256_file(root / record.path)
        for frame, exposure_index in enumerate(record.exposure_indices):
            labels.append(_label_row(record, digest, frame, plan, exposure_index, with_metal,
                                     index, patient_index, phantom.laterality))
    return labels, [p.__dict__ | {"study_index": index} for p in phi]


def procedure_for(implants) -> str:
    """The operation the requested-procedure texts name, after the main implant placed."""
    kinds = {obj.kind for obj in implants}
    for kind, procedure in PROCEDURES:
        if kind in kinds:
            return procedure
    return "FRACTURE REDUCTION"


def _plan_series(phantom, implants, study, rng, config) -> list[tuple[SeriesPlan, bool]]:
    """Decide the study's series, then render them; returns (plan, metal visible) pairs."""
    c_arm = _pick_device(rng, C_ARM_MODALITIES)
    room = _pick_device(rng, RADIOGRAPH_MODALITIES)
    count = int(rng.integers(*config.series_per_study, endpoint=True))
    kinds = [str(k) for k in rng.choice(["fluoro", "cine", "radiograph", "fluoro"], size=count)]
    if rng.random() < config.sweep_probability:
        kinds.insert(int(rng.integers(0, len(kinds) + 1)), "sweep")
    # the first series is often taken before the implant goes in
    preop = bool(implants) and len(kinds) > 1 and rng.random() < 0.4
    start = study.study_datetime

    plans = []
    for number, kind in enumerate(kinds, start=1):
        device = room if kind == "radiograph" else c_arm
        modality = str(rng.choice([m for m in device.modalities if (m in RADIOGRAPH_MODALITIES) == (kind == "radiograph")]))
        detector = device.detector.scaled(config.detector_scale)
        with_metal = bool(implants) and not (preop and number == 1)
        metal = implants if with_metal else []
        poses = _poses(kind, phantom, detector, rng, config)
        target = float(rng.uniform(*TARGET_QUANTA[kind]))
        exposures = [render(phantom, metal, pose, detector, rng, aec_photons(phantom, pose, detector, target))
                     for pose in poses]
        plans.append((SeriesPlan(
            series_number=number, modality=modality, kind=kind, device=device, exposures=exposures,
            poses=poses, multiframe=kind in ("cine", "sweep") and device.multiframe,
            region=phantom.region, laterality=LATERALITY_CODE.get(phantom.laterality, ""),
            acquired_at=start + dt.timedelta(minutes=int(7 * number + rng.integers(0, 6))),
        ), with_metal))
    return plans


def aec_photons(phantom, pose, detector, target_quanta: float) -> float:
    """Unattenuated quanta per pixel that bring the anatomy at the field centre to ``target_quanta``."""
    return min(target_quanta / max(central_transmission(phantom, pose, detector), 1e-9), MAX_PHOTONS)


def _pick_device(rng, modalities) -> DeviceModel:
    candidates = sorted({d for m in modalities for d in devices_for(m)}, key=lambda d: (d.manufacturer, d.model))
    return candidates[int(rng.integers(len(candidates)))]


def _poses(kind, phantom, detector, rng, config):
    if kind == "sweep":
        return sweep_poses(phantom, detector, rng, int(rng.integers(*config.sweep_views, endpoint=True)))
    if kind == "cine":
        first = random_pose(phantom, detector, rng)
        poses = [first]
        for _ in range(int(rng.integers(*config.cine_frames, endpoint=True)) - 1):
            poses.append(jitter_pose(poses[-1], rng))
        return poses
    if kind == "fluoro":  # shots saved during the procedure, typically alternating AP and lateral
        shots = int(rng.integers(*config.fluoro_shots, endpoint=True))
        first_view = int(rng.integers(0, 2))
        return [random_pose(phantom, detector, rng, view=None if rng.random() < 0.3 else ("ap", "lateral")[(first_view + i) % 2])
                for i in range(shots)]
    return [random_pose(phantom, detector, rng, view=str(rng.choice(["ap", "lateral"])))]


def _label_row(record: FileRecord, digest: str, frame: int, plan: SeriesPlan, exposure_index: int,
               with_metal: bool, study_index: int, patient_index: int, laterality: str) -> dict:
    exposure: Exposure = plan.exposures[exposure_index]
    pose = plan.poses[exposure_index]
    return {
        "path": record.path,
        "sha256": digest,
        "frame": frame,
        "frames": record.frames,
        "study_index": study_index,
        "patient_index": patient_index,
        "series_number": record.series_number,
        "series_kind": plan.kind,
        "region": plan.region,
        "laterality": laterality,
        "modality": record.modality,
        "manufacturer": record.manufacturer,
        "model": record.model,
        "detector": plan.device.detector.kind,
        "transfer_syntax_uid": record.transfer_syntax_uid,
        "photometric": record.photometric,
        "bits_stored": record.bits_stored,
        "rows": record.rows,
        "cols": record.cols,
        "pixel_spacing_mm": record.pixel_spacing_mm,
        "primary_deg": float(pose.primary_deg),
        "secondary_deg": float(pose.secondary_deg),
        "sid_mm": float(pose.sid_mm),
        "sod_mm": float(pose.sod_mm),
        "photons_per_px": float(exposure.photons_per_px),
        "has_metal": bool(exposure.metal_mask.any()),
        "implants_present": with_metal,
        "metal_pixels": int(exposure.metal_mask.sum()),
        "metal_mask_png": mask_to_png(exposure.metal_mask),
        "screws": [
            {"head_x": float(s.head_xy[0]), "head_y": float(s.head_xy[1]),
             "tip_x": float(s.tip_xy[0]), "tip_y": float(s.tip_xy[1]),
             "visible": bool(s.visible), "material": s.material}
            for s in exposure.screws
        ],
        "burned_in_text": record.burned_in_text,
        "burned_in_declared": record.burned_in_declared,
    }


def with_overrides(config: SynthConfig, **overrides) -> SynthConfig:
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
