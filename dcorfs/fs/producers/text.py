"""Text views of a resource: metadata.json, logs/<name>.txt, tables/<name>.csv, dataset.json.

They are made from dcserv's answers (`metadata`, `logs`, `tables`) and CKAN's package record,
so they say exactly what DCOR says. Numbers in CSV use Python's shortest round-trip form;
missing values (JSON null, which dcserv sends for NaN) are written as `nan`.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any


def json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def log_bytes(lines: list[Any]) -> bytes:
    return "".join(f"{line}\n" for line in lines).encode()


def _flat(row: Any) -> list[Any]:
    if isinstance(row, list):
        return [value for item in row for value in _flat(item)]
    return [row]


def _cell(value: Any) -> Any:
    if value is None:
        return "nan"
    if isinstance(value, float):
        return repr(value)
    return value


def table_bytes(table: Any) -> bytes:
    """dcserv's `[columns, rows]` as CSV: a header of column names, one line per record."""
    columns, rows = table
    records = [_flat(row) for row in rows]
    if not columns:
        width = max((len(r) for r in records), default=0)
        columns = [f"column{i}" for i in range(width)]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for record in records:
        writer.writerow([_cell(v) for v in record])
    return out.getvalue().encode()
