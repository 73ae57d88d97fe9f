"""Stage synth: a synthetic C-arm corpus with exact ground truth (the test bed, demo data and
de-identification oracle).

In: a seed, a preset and a study range. Out, under the corpus folder: ``dicom/`` (a hospital-style
export with deliberate PHI in names, headers and pixels), ``labels.parquet`` (region, metal mask,
screws per image) and ``phi.parquet`` (every planted PHI value). ``corpus.py`` is the batch step,
``study.py`` one study; the physics reads top to bottom: primitives, scene, anatomy, implants, metal,
geometry, render, devices, phi, dicom_writer. Only the synth flow, the montage and tests import it.
"""
