"""Plausibility and safety flags on an extracted record.

A misread is dangerous when it looks plausible to a tired reader: "Metformin 50000 mg",
"K+ 45 mmol/L". These rules catch the implausible ones before a person relies on them:

- ``dose_above_max_single`` / ``daily_dose_above_max`` / ``dose_far_below_usual``: a dose
  outside the bundled table of usual adult doses (``tables/doses.json``, source named there),
  with the daily total computed from the frequency (BID, TID, QID, QD, q8h, PRN ...);
- ``unknown_frequency``: a frequency the table cannot interpret;
- ``lab_value_implausible`` / ``lab_unit_mismatch``: a lab value outside the physiologically
  possible range for its unit, or a unit that does not belong to the analyte (``labs.json``);
- ``drug_interaction``: a well-known major interaction between two extracted drugs
  (``interactions.json``; looked up in both orders).

Every flag names the rule, the item, the value and the reason. Flags are informational and
not clinical advice; every result that carries them says so.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

TABLES = Path(__file__).parent / "tables"
DISCLAIMER = "Flags are informational and not clinical advice; verify against the source document."
_UNIT_TO_MG = {"mg": 1.0, "g": 1000.0, "mcg": 0.001, "ug": 0.001, "µg": 0.001}


@dataclass(frozen=True)
class Flag:
    rule: str
    item: str
    value: str
    reason: str
    severity: str = "warning"


class TableError(ValueError):
    """A bundled table is malformed; the message says where."""


# --------------------------------------------------------------------------- tables


@lru_cache(maxsize=1)
def dose_table() -> dict[str, Any]:
    data = json.loads((TABLES / "doses.json").read_text())
    problems = []
    if not data.get("source"):
        problems.append("doses.json: no source")
    for name, row in data.get("drugs", {}).items():
        low, high = row.get("single", [None, None])
        if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and 0 < low <= high):
            problems.append(f"doses.json: {name}: single must be [low, high] with 0 < low <= high")
        daily = row.get("max_daily")
        if daily is not None and (not isinstance(daily, (int, float)) or daily < high):
            problems.append(f"doses.json: {name}: max_daily must be >= the highest single dose")
    if any(not isinstance(v, int) or v < 1 for v in data.get("frequencies_per_day", {}).values()):
        problems.append("doses.json: frequencies_per_day must be positive integers")
    if problems:
        raise TableError("; ".join(problems))
    return data


@lru_cache(maxsize=1)
def lab_table() -> dict[str, Any]:
    data = json.loads((TABLES / "labs.json").read_text())
    problems = [] if data.get("source") else ["labs.json: no source"]
    for name, row in data.get("analytes", {}).items():
        for unit, bounds in row.get("units", {}).items():
            if not (isinstance(bounds, list) and len(bounds) == 2 and bounds[0] < bounds[1]):
                problems.append(f"labs.json: {name} [{unit}]: bounds must be [low, high] with low < high")
    if problems:
        raise TableError("; ".join(problems))
    return data


@lru_cache(maxsize=1)
def interaction_table() -> dict[frozenset[str], str]:
    data = json.loads((TABLES / "interactions.json").read_text())
    if not data.get("source"):
        raise TableError("interactions.json: no source")
    pairs: dict[frozenset[str], str] = {}
    for row in data.get("pairs", []):
        drugs = [d.lower() for d in row.get("drugs", [])]
        if len(set(drugs)) != 2 or not row.get("reason"):
            raise TableError(f"interactions.json: bad pair {row}")
        pairs[frozenset(drugs)] = row["reason"]
    return pairs


# --------------------------------------------------------------------------- parsing


def dose_mg(dose: str) -> float | None:
    """'500 mg' -> 500.0, '1 g' -> 1000.0, '18 mcg' -> 0.018; None for units/kg or unknown units."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(mg|g|mcg|ug|µg)\s*", (dose or "").lower())
    # rounded: 18 * 0.001 is 0.018000000000000002 in floats, which "exceeded" a 0.018 mg maximum
    return round(float(match.group(1)) * _UNIT_TO_MG[match.group(2)], 9) if match else None


def times_per_day(frequency: str) -> int | None:
    """'BID' -> 2, 'q8h PRN' -> 3 (the most a PRN order allows), '' -> None."""
    words = re.sub(r"\bprn\b", "", (frequency or "").lower()).split()
    table = dose_table()["frequencies_per_day"]
    for word in words:
        if word in table:
            return table[word]
        match = re.fullmatch(r"q(\d+)h", word)
        if match and int(match.group(1)) > 0:
            return max(1, 24 // int(match.group(1)))
    return None


def _analyte(name: str) -> tuple[str, dict[str, Any]] | None:
    key = (name or "").strip().lower()
    for analyte, row in lab_table()["analytes"].items():
        if key == analyte or key in row.get("aliases", []):
            return analyte, row
    return None


# --------------------------------------------------------------------------- rules


def medication_flags(med: dict[str, str]) -> list[Flag]:
    name = (med.get("name") or "").strip()
    row = dose_table()["drugs"].get(name.lower())
    flags: list[Flag] = []
    frequency = med.get("frequency") or ""
    per_day = times_per_day(frequency)
    if frequency.strip() and per_day is None and "prn" not in frequency.lower():
        flags.append(Flag("unknown_frequency", name, frequency, f"frequency {frequency!r} is not a recognised schedule",
                          "info"))
    amount = dose_mg(med.get("dose") or "")
    if row is None or amount is None:
        return flags
    low, high = row["single"]
    if amount > high:
        flags.append(Flag("dose_above_max_single", name, med["dose"],
                          f"{name} {med['dose']} exceeds the usual maximum single dose of {high:g} mg"))
    elif amount < low / 10:
        flags.append(Flag("dose_far_below_usual", name, med["dose"],
                          f"{name} {med['dose']} is under a tenth of the usual lowest dose ({low:g} mg): "
                          "possible decimal or unit misread", "info"))
    if per_day and row.get("max_daily") and amount * per_day > row["max_daily"]:
        flags.append(Flag("daily_dose_above_max", name, f"{med['dose']} {frequency}",
                          f"{amount * per_day:g} mg/day exceeds the maximum daily dose of {row['max_daily']:g} mg"))
    return flags


def lab_flags(lab: dict[str, str]) -> list[Flag]:
    found = _analyte(lab.get("name", ""))
    if found is None:
        return []
    analyte, row = found
    unit = (lab.get("unit") or "").strip().lower()
    try:
        value = float(str(lab.get("value", "")).strip())
    except ValueError:
        return []
    if unit not in row["units"]:
        return [Flag("lab_unit_mismatch", lab.get("name", ""), f"{lab.get('value')} {lab.get('unit')}",
                     f"{lab.get('unit')!r} is not a unit for {analyte} (expected one of "
                     f"{', '.join(u for u in row['units'] if u) or 'none'})")]
    low, high = row["units"][unit]
    if not low <= value <= high:
        return [Flag("lab_value_implausible", lab.get("name", ""), f"{lab.get('value')} {lab.get('unit')}",
                     f"{analyte} {value:g} {lab.get('unit')} is outside the physiologically possible range "
                     f"{low:g}-{high:g}: likely a misread or a unit error", "error")]
    return []


def interaction_flags(medications: list[dict[str, str]]) -> list[Flag]:
    names = sorted({(m.get("name") or "").strip().lower() for m in medications if m.get("name")})
    pairs = interaction_table()
    flags = []
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            reason = pairs.get(frozenset((first, second)))
            if reason:
                flags.append(Flag("drug_interaction", f"{first} + {second}", "", reason))
    return flags


def check(structured: dict[str, Any]) -> list[dict[str, str]]:
    """Every flag for one structured record, as plain dicts (JSON-ready)."""
    flags: list[Flag] = []
    medications = [m for m in structured.get("medications", []) if isinstance(m, dict)]
    for med in medications:
        flags += medication_flags(med)
    for lab in structured.get("lab_values", []):
        if isinstance(lab, dict):
            flags += lab_flags(lab)
    flags += interaction_flags(medications)
    return [asdict(f) for f in flags]
