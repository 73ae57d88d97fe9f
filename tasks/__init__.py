"""The pipeline's steps: plain, testable functions, wrapped as Prefect tasks, one package per stage.

    synth/     seeds                       ->  a synthetic C-arm DICOM export + labels.parquet + phi.parquet
    ingest/    a raw DICOM export (read)   ->  de-identified WebDataset shards + the DuckDB catalog
    pretrain/  catalog images              ->  a DINO backbone, registered in MLflow
    heads/     a backbone + labels         ->  heads on the frozen backbone, evaluated, registered
    release/   registered models           ->  aliases (@champion), predictions on new DICOM files

Shared by all: ``label_schema`` (the 11 body regions), ``home`` (DAX_HOME), ``fileio``, ``version``. The
layers and what may import what are import-linter contracts in ``pyproject.toml``.
"""
