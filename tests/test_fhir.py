"""The record as a FHIR bundle: validated by the FHIR library, values, units and flags where they belong."""

import json
from decimal import Decimal

from fhir.resources.R4B.bundle import Bundle

from medvl.medical.documents import KINDS, generate_document
from medvl.medical.fhir import LOINC, UCUM, record_bundle

MODEL = {"model_path": "models/tiny-qwen25-vl-base", "served_form": "bf16", "settings_hash": "abc123"}
SHA = "0" * 63 + "1"


def resources(bundle: Bundle, kind: str) -> list:
    return [e.resource for e in bundle.entry if e.resource.get_resource_type() == kind]


def bundle_of(record: dict) -> Bundle:
    bundle = record_bundle(record, SHA, "image/png", 4321, MODEL)
    # what a receiving system parses: the JSON validates against the library's models again
    return Bundle.model_validate_json(bundle.model_dump_json())


def test_lab_values_become_observations_with_ucum_units_ranges_and_flags():
    for seed in range(40):
        doc = generate_document(seed, "lab_results")
        bundle = bundle_of(json.loads(doc.target_answer()))
        labs = [o for o in resources(bundle, "Observation") if o.category[0].coding[0].code == "laboratory"]
        assert len(labs) == len(doc.lab_values) > 0
        for lab, obs in zip(doc.lab_values, labs, strict=True):
            assert obs.code.text == lab["name"]
            assert obs.valueQuantity.value == Decimal(lab["value"]) and obs.valueQuantity.unit == lab["unit"]
            assert obs.valueQuantity.system == UCUM and obs.valueQuantity.code  # every printed unit maps
            low, high = lab["reference_range"].split("-")
            assert (obs.referenceRange[0].low.value, obs.referenceRange[0].high.value) == (Decimal(low), Decimal(high))
            if lab["flag"]:
                assert obs.interpretation[0].coding[0].code == lab["flag"][0].upper()
            else:
                assert obs.interpretation is None
        report = resources(bundle, "DiagnosticReport")[0]
        assert len(report.result) == len(labs)


def test_vitals_meds_conditions_procedures_and_provenance():
    doc = generate_document(3, "diagnosis_note")
    record = json.loads(doc.target_answer())
    bundle = bundle_of(record)
    vitals = {o.code.coding[0].code: o for o in resources(bundle, "Observation")
              if o.category[0].coding[0].code == "vital-signs"}
    assert vitals["85354-9"].code.coding[0].system == LOINC
    systolic, diastolic = (c.valueQuantity for c in vitals["85354-9"].component)
    assert f"{systolic.value}/{diastolic.value} mmHg" == record["vitals"]["blood_pressure"]
    assert systolic.code == "mm[Hg]" and vitals["8867-4"].valueQuantity.code == "/min"
    assert vitals["8310-5"].valueQuantity.code == "Cel"
    meds = resources(bundle, "MedicationStatement")
    assert [m.medicationCodeableConcept.text for m in meds] == [m["name"] for m in record["medications"]]
    first = record["medications"][0]
    assert meds[0].dosage[0].route.text == first["route"] and meds[0].dosage[0].timing.code.text == first["frequency"]
    assert [c.code.text for c in resources(bundle, "Condition")] == record["diagnoses"]
    patient = next(e.fullUrl for e in bundle.entry if e.resource.get_resource_type() == "Patient")
    assert all(r.subject.reference == patient for r in resources(bundle, "Condition") + meds)
    provenance, device = resources(bundle, "Provenance")[0], resources(bundle, "Device")[0]
    produced = {e.fullUrl for e in bundle.entry if e.resource.get_resource_type() not in
                ("Patient", "DocumentReference", "Device", "Provenance")}
    assert {t.reference for t in provenance.target} == produced
    assert device.deviceName[0].name == MODEL["model_path"]
    assert {v.value for v in device.version} == {"bf16", "abc123"}
    document = resources(bundle, "DocumentReference")[0]
    assert document.identifier[0].value == SHA and document.content[0].attachment.data is None


def test_what_does_not_parse_stays_text_and_nothing_is_invented():
    record = {"medications": [{"name": "Mystery drug", "dose": "two tabs", "route": "", "frequency": ""}],
              "diagnoses": [], "procedures": [], "vitals": {"pain_score": "7/10 at rest"},
              "lab_values": [{"name": "Lactate", "value": "pending", "unit": "furlongs", "flag": "",
                              "reference_range": "see lab"},
                             {"name": "Ketones", "value": "1.5", "unit": "furlongs", "flag": "", "reference_range": ""},
                             {"name": "LDL cholesterol", "value": "48", "unit": "mg/dL", "flag": "",
                              "reference_range": "66-0"}]}
    bundle = bundle_of(record)
    pending, ketones, ldl = [o for o in resources(bundle, "Observation") if o.category[0].coding[0].code == "laboratory"]
    # a range whose low is above its high (an OCR misread of "0-99") is kept as text, not structured
    assert ldl.referenceRange[0].text == "66-0" and ldl.referenceRange[0].low is None
    assert pending.valueString == "pending" and pending.valueQuantity is None
    assert pending.referenceRange[0].text == "see lab"
    assert ketones.valueQuantity.unit == "furlongs" and ketones.valueQuantity.code is None  # no UCUM invented
    pain = [o for o in resources(bundle, "Observation") if o.category[0].coding[0].code == "vital-signs"][0]
    assert pain.code.coding is None and pain.code.text == "pain score"  # no LOINC for what the table lacks
    med = resources(bundle, "MedicationStatement")[0]
    assert med.dosage[0].doseAndRate is None and med.dosage[0].text == "two tabs"
    empty = bundle_of({"medications": [], "diagnoses": [], "procedures": [], "lab_values": [], "vitals": {}})
    assert sorted(e.resource.get_resource_type() for e in empty.entry) == [
        "Device", "DocumentReference", "Patient", "Provenance"]


def test_every_kind_of_document_gives_a_valid_bundle():
    for i, kind in enumerate(KINDS * 5):
        record = json.loads(generate_document(1000 + i, kind).target_answer())
        bundle = bundle_of(record)
        assert bundle.type == "collection" and len(bundle.entry) >= 4
