"""Dollars per million predictions on cloud instances, from throughput measured here.

The price table (`prices.json`) is dated and kept in the repository, so a report says which
prices it used. Throughput scales with the vCPUs of an instance as measured per core on the build
machine: an estimate that holds for this CPU-bound service as long as the instance's cores are as
fast as the build machine's (Arm instances, such as c7g, are not: measure there before buying).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PRICES = Path(__file__).with_name("prices.json")


def price_table() -> dict[str, Any]:
    table: dict[str, Any] = json.loads(PRICES.read_text())
    return table


def usd_per_million(per_core_per_s: float, vcpus: int, usd_per_hour: float) -> float:
    """What a million predictions cost on an instance kept busy at the measured rate."""
    per_hour = per_core_per_s * vcpus * 3600
    return usd_per_hour / per_hour * 1e6


def costs(per_core: dict[str, float]) -> dict[str, Any]:
    """For each system (its predictions per second per core), the cost on every instance."""
    table = price_table()
    rows = [
        {
            **instance,
            "usd_per_million": {
                system: round(usd_per_million(rate, instance["vcpus"], instance["usd_per_hour"]), 4)
                for system, rate in per_core.items()
                if rate > 0
            },
        }
        for instance in table["instances"]
    ]
    return {"prices_as_of": table["as_of"], "note": table["note"], "instances": rows}
