"""A training run's log.jsonl: one JSON object per step, appended as the run goes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_log_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSON object records of a log.jsonl in file order.

    Tolerant of what a crash leaves behind: blank lines, a line cut off part-way (not valid JSON, or
    with damaged bytes) and lines that are not JSON objects are skipped. OSError when unreadable.
    """
    records = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
