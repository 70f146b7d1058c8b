"""What every benchmark's JSON report shares: the header (name, date, command, machine)
and the ending (elapsed seconds, the table printed, the file written atomically)."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from index.atomic import atomic_write_text


def report_header(name: str, started: float) -> dict[str, Any]:
    return {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)),
        "command": " ".join(sys.argv),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
    }


def finish_report(report: dict[str, Any], started: float, table: str, out: Path) -> None:
    report["seconds"] = round(time.time() - started, 1)
    print(table)
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    print(f"report: {out}")
