"""The extraction record as a FHIR bundle, for hospital systems that speak FHIR.

Built and validated with the maintained ``fhir.resources`` models (8.x: FHIR R4B, 4.3.0, whose
Observation, DiagnosticReport, MedicationStatement, Condition, Procedure, DocumentReference,
Provenance, Device and Patient are R4's; the library ships no separate 4.0.1 package since
7.0). A ``collection`` Bundle holds:

- a Patient with no data (the page's patient: Condition, Procedure and MedicationStatement need
  a subject; the record holds no demographics, so none is invented);
- a DocumentReference for the source: its SHA-256 as identifier, content type and size, never
  its bytes;
- one Observation per lab value (``valueQuantity`` with its UCUM code where the unit maps,
  else ``valueString``; ``referenceRange``; ``interpretation`` H/L) and a DiagnosticReport that
  lists them; one vital-signs Observation per vital (LOINC and UCUM as FHIR's vital-signs
  profile requires; blood pressure as systolic/diastolic components);
- a MedicationStatement per medication (its text, and a dosage with route and timing text and
  the dose as a quantity where it parses), a Condition per diagnosis, a Procedure per procedure;
- a Device naming the model (folder, served form, settings hash) and a Provenance that the
  Device produced every resource above.

Codes come only from ``tables/fhir_codes.json`` (UCUM units, the vital-signs LOINC codes);
drugs, diagnoses and analytes are text, as FHIR allows, until a table maps them.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime, timezone
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.documentreference import DocumentReference
from fhir.resources.R4B.medicationstatement import MedicationStatement
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.procedure import Procedure
from fhir.resources.R4B.provenance import Provenance

TABLE = Path(__file__).parent / "tables" / "fhir_codes.json"
UCUM = "http://unitsofmeasure.org"
LOINC = "http://loinc.org"
CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
DIAGNOSTIC_SERVICE = "http://terminology.hl7.org/CodeSystem/v2-0074"
DOCUMENT_HASH_SYSTEM = "urn:medvl:document-sha256"
FLAGS = {"H": "High", "L": "Low"}
_NUMBER = r"[-+]?\d+(?:\.\d+)?"


@cache
def codes() -> dict[str, Any]:
    return json.loads(TABLE.read_text())


def _quantity(value: str, unit: str) -> dict[str, Any] | None:
    """A FHIR Quantity when ``value`` is a number; the UCUM code only when the unit maps."""
    if not re.fullmatch(_NUMBER, value.strip()):
        return None
    quantity: dict[str, Any] = {"value": Decimal(value.strip())}  # as printed: "7.20" stays 7.20
    if unit:
        quantity["unit"] = unit
        ucum = codes()["ucum"].get(unit)
        if ucum:
            quantity.update(system=UCUM, code=ucum)
    return quantity


def _reference_range(text: str, unit: str) -> list[dict[str, Any]]:
    match = re.fullmatch(rf"\s*({_NUMBER})\s*-\s*({_NUMBER})\s*", text or "")
    # low above high is a misread (OCR read "0-99" as "66-0" on a test page), not a range: text
    if match and Decimal(match[1]) <= Decimal(match[2]):
        return [{"low": _quantity(match[1], unit), "high": _quantity(match[2], unit)}]
    return [{"text": text}] if text else []


def _category(code: str, display: str) -> list[dict[str, Any]]:
    return [{"coding": [{"system": CATEGORY, "code": code, "display": display}]}]


def lab_observation(lab: dict[str, str], subject: str) -> Observation:
    value = _quantity(lab.get("value", ""), lab.get("unit", ""))
    fields: dict[str, Any] = {"valueQuantity": value} if value else {"valueString": lab.get("value") or "not read"}
    flag = (lab.get("flag") or "").strip().upper()[:1]
    if flag in FLAGS:
        fields["interpretation"] = [{"coding": [{"system": INTERPRETATION, "code": flag, "display": FLAGS[flag]}]}]
    ranges = _reference_range(lab.get("reference_range", ""), lab.get("unit", ""))
    if ranges:
        fields["referenceRange"] = ranges
    return Observation(status="final", category=_category("laboratory", "Laboratory"),
                       code={"text": lab.get("name") or "unnamed analyte"}, subject={"reference": subject}, **fields)


def vital_observation(name: str, text: str, subject: str) -> Observation:
    """A vital sign: LOINC-coded where FHIR's profile names it; the value parsed from its text."""
    known = codes()["vital_signs"].get(name)
    code: dict[str, Any] = {"text": name.replace("_", " ")}
    fields: dict[str, Any] = {}
    if known:
        code["coding"] = [{"system": LOINC, "code": known["loinc"], "display": known["display"]}]
    pressure = re.fullmatch(rf"\s*({_NUMBER})\s*/\s*({_NUMBER})\s*(\S*)\s*", text)
    if known and "components" in known and pressure:
        unit = pressure[3] or "mmHg"
        fields["component"] = [
            {"code": {"coding": [{"system": LOINC, "code": loinc, "display": display}]},
             "valueQuantity": _quantity(pressure[i], unit)}
            for i, (loinc, display) in ((1, known["components"]["systolic"]), (2, known["components"]["diastolic"]))]
    else:
        number = re.match(rf"\s*({_NUMBER})\s*(%|[^\s\d]\S*)?", text)
        quantity = _quantity(number[1], number[2] or "") if number else None
        fields.update({"valueQuantity": quantity} if quantity else {"valueString": text})
    return Observation(status="final", category=_category("vital-signs", "Vital Signs"), code=code,
                       subject={"reference": subject}, **fields)


def medication_statement(med: dict[str, str], subject: str) -> MedicationStatement:
    dosage: dict[str, Any] = {"text": " ".join(v for v in (med.get("dose"), med.get("route"), med.get("frequency")) if v)}
    if med.get("route"):
        dosage["route"] = {"text": med["route"]}
    if med.get("frequency"):
        dosage["timing"] = {"code": {"text": med["frequency"]}}
    dose = re.fullmatch(rf"\s*({_NUMBER})\s*(\S+)?\s*", med.get("dose") or "")
    if dose:
        dosage["doseAndRate"] = [{"doseQuantity": _quantity(dose[1], dose[2] or "")}]
    return MedicationStatement(status="active", medicationCodeableConcept={"text": med.get("name") or "unnamed"},
                               subject={"reference": subject}, dosage=[dosage] if dosage["text"] else None)


def record_bundle(record: dict[str, Any], document_sha256: str, content_type: str, size_bytes: int,
                  model: dict[str, str]) -> Bundle:
    """The record as a validated FHIR Bundle; ``model`` is the audit trail's (path, form, hash)."""
    def urn() -> str:
        return f"urn:uuid:{uuid.uuid4()}"

    patient, source = urn(), urn()
    entries: list[tuple[str, Any]] = [(patient, Patient())]
    document = DocumentReference(
        status="current", identifier=[{"system": DOCUMENT_HASH_SYSTEM, "value": document_sha256}],
        description="The document the record was read from (its SHA-256; no content kept).",
        content=[{"attachment": {"contentType": content_type, "size": size_bytes}}], subject={"reference": patient})
    entries.append((source, document))
    labs = [(urn(), lab_observation(lab, patient)) for lab in record.get("lab_values", [])]
    entries += labs
    if labs:
        entries.append((urn(), DiagnosticReport(
            status="final",
            category=[{"coding": [{"system": DIAGNOSTIC_SERVICE, "code": "LAB", "display": "Laboratory"}]}],
            code={"text": "Laboratory results read from the document"}, subject={"reference": patient},
            result=[{"reference": ref} for ref, _ in labs])))
    entries += [(urn(), vital_observation(name, text, patient)) for name, text in record.get("vitals", {}).items()]
    entries += [(urn(), medication_statement(med, patient)) for med in record.get("medications", [])]
    entries += [(urn(), Condition(code={"text": text}, subject={"reference": patient}))
                for text in record.get("diagnoses", [])]
    entries += [(urn(), Procedure(status="completed", code={"text": text}, subject={"reference": patient}))
                for text in record.get("procedures", [])]
    device = urn()
    produced = [ref for ref, resource in entries if not isinstance(resource, Patient | DocumentReference)]
    entries.append((device, Device(
        deviceName=[{"name": model.get("model_path", "unknown"), "type": "model-name"}],
        version=[{"type": {"text": "served form"}, "value": model.get("served_form", "unknown")},
                 {"type": {"text": "settings hash"}, "value": model.get("settings_hash", "unknown")}])))
    entries.append((urn(), Provenance(
        target=[{"reference": ref} for ref in produced] or [{"reference": patient}],
        recorded=datetime.now(timezone.utc), agent=[{"who": {"reference": device}}],
        entity=[{"role": "source", "what": {"reference": source}}])))
    return Bundle(type="collection", timestamp=datetime.now(timezone.utc),
                  entry=[{"fullUrl": ref, "resource": resource} for ref, resource in entries])
