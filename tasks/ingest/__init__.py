"""Stage ingest: raw DICOM in, de-identified shards and a catalog out. No PHI leaves this stage.

In: a DICOM export folder (only ever read) and the de-identification secret. Out, under DAX_HOME:
WebDataset shards (``shards.py``), the DuckDB catalog and its published snapshot (``catalog.py``,
queried by ``labels.py`` and ``report.py``), quarantined files with reasons, and Prefect events
(``events.py``). Per file: ``survey`` (hash, header peek) -> ``triage`` -> ``burned_in`` text ->
``deidentify`` (with ``deid_plan``'s recorded plans) -> ``normalize``; ``steps.py`` holds the batch
steps as Prefect tasks.
"""
