"""`dax connect`: bind a DAX home to the Prefect server that runs the shipped deployments (prefect.yaml).

``prefect deploy`` resolves two Prefect Variables into the deployments when it runs:

    dax_home_id        the id of the home the workers use (`tasks.home.home_id`): the retrain triggers
                       listen to that home's events only, so a staging home reporting to the same server
                       never starts production's retraining
    dax_ingest_source  the export folder the nightly ingestion reads, on the worker's machine

so ``dax connect`` comes before ``prefect deploy --all`` (and again, followed by a deploy, to move the
deployments to another home or export). With ``notify`` (a notification block, ``<block-type>/<name>``,
made by the operator: Slack, Teams, e-mail, a webhook...) it also creates, or replaces, the automation
that notifies that block on each ``dax.ingest.quarantine-alert`` of the home: an ingestion run that
quarantined more than its ``quarantine_alert_share`` of the files it read.
"""
from __future__ import annotations

from pathlib import Path

from tasks.home import home_id
from tasks.ingest.events import QUARANTINE_ALERT, home_resource

__all__ = ["HOME_ID_VARIABLE", "SOURCE_VARIABLE", "connect", "quarantine_alert_automation"]

HOME_ID_VARIABLE = "dax_home_id"
SOURCE_VARIABLE = "dax_ingest_source"

ALERT_SUBJECT = "DAX: quarantine alert on home {{ event.resource.id }}"
ALERT_BODY = """An ingestion run quarantined {{ event.payload.quarantined }} of the {{ event.payload.surveyed }} \
files it read ({{ (100 * event.payload.share) | round(1) }} %, alert above \
{{ (100 * event.payload.threshold) | round(1) }} %).
{% for item in event.payload.reasons %}- {{ item.files }} files: {{ item.reason }}
{% endfor %}What to do: `dax catalog report`, or
dax catalog sql "SELECT reason, count(*) FROM sources WHERE status = 'quarantined' GROUP BY 1 ORDER BY 2 DESC"
"""


def alert_automation_name(home: Path) -> str:
    return f"dax-quarantine-alert-{home_id(home)}"


def connect(home: Path, source: str | None = None, notify: str | None = None) -> dict:
    """Set the Variables for ``home`` (and ``source``), and the quarantine alert when ``notify`` is given."""
    from prefect.variables import Variable

    identity = home_id(home)
    Variable.set(HOME_ID_VARIABLE, identity, overwrite=True)
    if source:
        Variable.set(SOURCE_VARIABLE, str(source), overwrite=True)
    automation = quarantine_alert_automation(home, notify) if notify else None
    return {"home_id": identity, "source": bool(source), "automation": automation}


def quarantine_alert_automation(home: Path, notify: str) -> str:
    """Create (or replace: one per home) the automation notifying block ``notify`` of quarantine alerts."""
    from prefect.automations import Automation, EventTrigger, Posture, SendNotification
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    block_type, _, block_name = notify.partition("/")
    if not block_name:
        raise ValueError(f"--notify takes <block-type>/<name> (e.g. slack-webhook/dax-ops), not {notify!r}")
    name = alert_automation_name(home)
    with get_client(sync_client=True) as client:
        try:
            block = client.read_block_document_by_name(name=block_name, block_type_slug=block_type,
                                                       include_secrets=False)
        except ObjectNotFound:
            raise ValueError(f"no notification block {notify!r} on this Prefect server: create it first "
                             "(`prefect block create <type>` or the UI)") from None
        for existing in client.read_automations_by_name(name=name):
            client.delete_automation(existing.id)
    automation = Automation(
        name=name,
        description="Notify when an ingestion run of this DAX home quarantined more than its alert share.",
        trigger=EventTrigger(expect={QUARANTINE_ALERT},
                             match={"prefect.resource.id": home_resource(home)["prefect.resource.id"]},
                             posture=Posture.Reactive, threshold=1, within=0),
        actions=[SendNotification(block_document_id=block.id, subject=ALERT_SUBJECT, body=ALERT_BODY)],
    ).create()
    return str(automation.id)
