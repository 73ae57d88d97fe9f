"""An auditor's HTML report of the catalog, from the published snapshot.

One self-contained file: inline CSS, charts as base64 PNG (matplotlib's Agg canvas, no GUI and no
global backend switch), and under every section the SQL that produced it, so an auditor can re-run it
with ``dax catalog query``. Every value is HTML-escaped. Dates in the catalog are de-identified
(shifted per patient): the report says so wherever it shows them.
"""
from __future__ import annotations

import base64
import datetime as dt
import decimal
import html
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.ingest.catalog import fetch, open_snapshot, snapshot_path

REPORT_FILE = "catalog-report.html"


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    sql: str
    note: str = ""
    chart: str | None = None     # "bar" or "barh": column 0 labels, column 1 values


# Each file's latest outcome: `sources` keeps every outcome (a file a run skipped for its modality and a later
# run ingested has both rows); the report counts a file once, as it stands.
FILES = """\
WITH files AS (SELECT * FROM sources QUALIFY row_number() OVER (PARTITION BY sha256 ORDER BY recorded_at DESC) = 1)
"""
SECTIONS = (
    Section("totals", "Totals", FILES + """\
SELECT
  (SELECT count(*) FROM files)                         AS files,
  (SELECT coalesce(sum(size_bytes), 0)::BIGINT FROM files) AS source_bytes,
  (SELECT count(*) FROM images)                        AS images,
  (SELECT count(*) FROM shards)                        AS shards,
  (SELECT coalesce(sum(bytes), 0)::BIGINT FROM shards) AS shard_bytes,
  (SELECT count(*) FROM runs)                          AS runs"""),
    Section("status", "Files by status", FILES + """\
SELECT status, count(*) AS files, coalesce(sum(size_bytes), 0)::BIGINT AS bytes
FROM files
GROUP BY status
ORDER BY files DESC, status""", note="Each file counted once, by its latest outcome.", chart="bar"),
    Section("reasons", "Quarantine and skip reasons", FILES + """\
SELECT status, coalesce(reason, '(no reason recorded)') AS reason, count(*) AS files
FROM files
WHERE status IN ('quarantined', 'skipped')
GROUP BY ALL
ORDER BY status, files DESC, reason"""),
    Section("modality", "Images by modality", """\
SELECT coalesce(modality, '(unknown)') AS modality, count(*) AS images
FROM images
GROUP BY ALL
ORDER BY images DESC, modality""", chart="bar"),
    Section("device", "Images by manufacturer and model", """\
SELECT coalesce(nullif(manufacturer, ''), '(unknown)') || ' / ' || coalesce(nullif(model, ''), '(unknown)')
         AS manufacturer_model,
       count(*) AS images
FROM images
GROUP BY ALL
ORDER BY images DESC, manufacturer_model""", chart="barh"),
    Section("month", "Images by study year-month (shifted dates)", """\
SELECT coalesce(strftime(study_date, '%Y-%m'), '(no date)') AS study_month_shifted, count(*) AS images
FROM images
GROUP BY ALL
ORDER BY study_month_shifted""",
            note="Study dates are de-identified: each patient's dates are shifted by a keyed offset of "
                 "1 to 10 years, so months show the shape of the data, not when the studies happened.",
            chart="bar"),
    Section("subjects", "Patients, studies and series", """\
SELECT count(DISTINCT patient_key) AS patients,
       count(DISTINCT study_key)   AS studies,
       count(DISTINCT series_key)  AS series,
       count(DISTINCT source_sha256) AS source_files
FROM images""", note="Counted over pseudonymous keys; the catalog holds no original identifiers."),
    Section("runs", "Runs", """\
SELECT run_id, status, started_at, finished_at, round(seconds, 1) AS seconds,
       files, unchanged, surveyed, ingested, duplicates, skipped, quarantined, images, shards,
       code_version, recipe_sha256, secret_fingerprint
FROM runs
ORDER BY started_at, run_id""", note="Times are UTC."),
)


def write_report(home: Path, out: Path) -> Path:
    """Write the report for the snapshot in ``home`` to ``out`` (a file, or a folder to put it in)."""
    out = Path(out)
    if out.is_dir():
        out = out / REPORT_FILE
    con = open_snapshot(home)
    try:
        results = {s.key: fetch(con, s.sql) for s in SECTIONS}
        meta = dict(fetch(con, "SELECT key, value FROM meta")[2])
    finally:
        con.close()
    document = _render(results, meta, snapshot_path(home).name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(document, encoding="utf-8")
    os.replace(tmp, out)
    return out


# --- rendering -----------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;max-width:1100px;color:#1d2430;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2.2rem;border-bottom:1px solid #d5dae1;padding-bottom:.2rem}
.meta{color:#5b6573;font-size:.9rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.88rem}
th,td{border:1px solid #d5dae1;padding:.25rem .55rem;text-align:left;vertical-align:top}
th{background:#eef1f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.8rem;word-break:break-all}
.cards{display:flex;flex-wrap:wrap;gap:.8rem;margin:.8rem 0}
.card{border:1px solid #d5dae1;border-radius:6px;padding:.6rem 1rem;min-width:8rem}
.card .v{font-size:1.4rem;font-weight:600}.card .k{color:#5b6573;font-size:.8rem}
.note{background:#fff8e1;border-left:3px solid #f0b400;padding:.4rem .7rem;font-size:.88rem}
details{margin:.3rem 0 1rem}summary{cursor:pointer;color:#3b5b8c;font-size:.85rem}
pre{background:#f5f7fa;border:1px solid #d5dae1;padding:.6rem;overflow-x:auto;font-size:.8rem}
img.chart{max-width:100%;height:auto;border:1px solid #eef1f5}
.empty{color:#5b6573;font-style:italic}
"""

_NUMERIC = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UBIGINT", "DOUBLE", "FLOAT")


def _e(value: Any) -> str:
    return html.escape("" if value is None else _fmt(value), quote=True)


def _fmt(value: Any) -> str:
    if isinstance(value, dt.datetime):
        return value.isoformat(sep=" ", timespec="seconds")
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal) and value == value.to_integral_value():
        value = int(value)         # sum() of BIGINT is HUGEINT, which reaches Python as a Decimal
    if isinstance(value, (float, decimal.Decimal)):
        return f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _table(names: list[str], types: list[str], rows: list[tuple]) -> str:
    if not rows:
        return '<p class="empty">no rows</p>'
    head = "".join(f"<th>{_e(n)}</th>" for n in names)
    classes = []
    for name, sqltype in zip(names, types):
        if sqltype in _NUMERIC or sqltype.startswith("DECIMAL"):
            classes.append(' class="num"')
        elif name.endswith(("sha256", "fingerprint")) or name == "run_id":
            classes.append(' class="mono"')
        else:
            classes.append("")
    body = "".join("<tr>" + "".join(f"<td{c}>{_e(v)}</td>" for c, v in zip(classes, row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _chart(kind: str, title: str, names: list[str], rows: list[tuple]) -> str:
    if not rows:
        return ""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    labels = [str(r[0]).replace("$", r"\$") for r in rows]   # "$" would start matplotlib mathtext
    values = [r[1] or 0 for r in rows]
    height = max(2.6, 0.32 * len(rows) + 1.2) if kind == "barh" else 3.2
    fig = Figure(figsize=(8, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if kind == "barh":
        ax.barh(labels[::-1], values[::-1], color="#4c72b0")
        ax.set_xlabel(names[1])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        ax.bar(labels, values, color="#4c72b0")
        ax.set_ylabel(names[1])
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if len(labels) > 6:
            ax.tick_params(axis="x", labelrotation=60)
    ax.set_title(title, fontsize=11)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img class="chart" alt="{_e(title)}" src="data:image/png;base64,{data}">'


def _render(results: dict[str, tuple[list[str], list[str], list[tuple]]], meta: dict[str, str],
            snapshot_name: str) -> str:
    generated = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>DAX catalog report</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>DAX catalog report</h1>",
        f'<p class="meta">From the published snapshot <code>{_e(snapshot_name)}</code>, published '
        f"{_e(meta.get('snapshot_published_at', 'unknown'))}; schema version {_e(meta.get('schema_version', '?'))}; "
        f"report generated {_e(generated)}. The catalog names files by SHA-256 and people, studies and series "
        "by keyed pseudonyms only.</p>",
    ]
    for section in SECTIONS:
        names, types, rows = results[section.key]
        parts.append(f'<section id="{_e(section.key)}"><h2>{_e(section.title)}</h2>')
        if section.note:
            parts.append(f'<p class="note">{_e(section.note)}</p>')
        if section.key == "totals" and rows:
            cards = "".join(f'<div class="card"><div class="v">{_e(v)}</div><div class="k">{_e(n)}</div></div>'
                            for n, v in zip(names, rows[0]))
            parts.append(f'<div class="cards">{cards}</div>')
        else:
            if section.chart:
                parts.append(_chart(section.chart, section.title, names, rows))
            parts.append(_table(names, types, rows))
        parts.append(f"<details><summary>SQL</summary><pre><code>{_e(section.sql)}</code></pre></details></section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
