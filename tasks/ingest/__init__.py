"""Stage ingest: raw DICOM in, de-identified shards and a catalog out. No PHI leaves this stage.

In: a DICOM export folder (only ever read) and the de-identification secret. Out, under DAX_HOME:
WebDataset shards (``shards.py``), the DuckDB catalog and its published snapshot (``catalog.py``,
queried by ``labels.py`` and ``report.py``), quarantined files with reasons, and Prefect events
(``events.py``). Per file: ``survey`` (hash, header peek) -> ``triage`` -> ``burned_in`` text ->
``deidentify`` (with ``deid_plan``'s recorded plans) -> ``normalize``; ``steps.py`` holds the batch
steps as Prefect tasks.
"""
import logging


class _DeidImportNotice(logging.Filter):
    """deid 0.4.13 imports pydicom's deprecated ``pixel_data_handlers``, and pydicom logs a WARNING about it
    in every process that imports deid: nothing DAX or its user can act on. Drops that one message."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("The 'pydicom.pixel_data_handlers' module will be removed")


logging.getLogger("pydicom").addFilter(_DeidImportNotice())
