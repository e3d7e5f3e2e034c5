"""The medical vocabulary: one place for everything that recognises medical terms.

Scoring, the gates, the OCR + rules baseline, the fallback parser of answers that are not
JSON, and the synthetic-document generator all read these tables: real drug names with their
usual doses, routes and frequencies; conditions with the abbreviations clinicians write; lab
analytes with units and adult reference ranges; radiology exams with their findings; and
procedures. The generator's own drawing tables (hospitals, names, phrasing) stay in
:mod:`medvl.medical.documents`; the usual-dose table the plausibility flags use is ``tables/doses.json``.
"""

from __future__ import annotations

from functools import lru_cache

# name, doses, route, frequencies
DRUGS: list[tuple[str, list[str], str, list[str]]] = [
    ("Metformin", ["500 mg", "850 mg", "1000 mg"], "PO", ["BID", "QD"]),
    ("Lisinopril", ["5 mg", "10 mg", "20 mg"], "PO", ["QD"]),
    ("Atorvastatin", ["20 mg", "40 mg", "80 mg"], "PO", ["QHS", "QD"]),
    ("Amlodipine", ["5 mg", "10 mg"], "PO", ["QD"]),
    ("Metoprolol tartrate", ["25 mg", "50 mg"], "PO", ["BID"]),
    ("Warfarin", ["2.5 mg", "5 mg"], "PO", ["QD"]),
    ("Furosemide", ["20 mg", "40 mg"], "IV", ["BID", "QD"]),
    ("Insulin glargine", ["10 units", "20 units"], "SC", ["QHS"]),
    ("Albuterol", ["90 mcg", "2.5 mg"], "INH", ["q4h PRN", "q6h PRN"]),
    ("Amoxicillin", ["500 mg", "875 mg"], "PO", ["TID", "BID"]),
    ("Omeprazole", ["20 mg", "40 mg"], "PO", ["QD"]),
    ("Levothyroxine", ["50 mcg", "75 mcg", "100 mcg"], "PO", ["QD"]),
    ("Prednisone", ["10 mg", "20 mg", "40 mg"], "PO", ["QD"]),
    ("Aspirin", ["81 mg", "325 mg"], "PO", ["QD"]),
    ("Clopidogrel", ["75 mg"], "PO", ["QD"]),
    ("Gabapentin", ["100 mg", "300 mg"], "PO", ["TID"]),
    ("Sertraline", ["50 mg", "100 mg"], "PO", ["QD"]),
    ("Acetaminophen", ["500 mg", "650 mg"], "PO", ["q6h PRN", "q8h PRN"]),
    ("Ondansetron", ["4 mg"], "IV", ["q8h PRN"]),
    ("Heparin", ["5000 units"], "SC", ["q8h", "q12h"]),
    ("Ceftriaxone", ["1 g", "2 g"], "IV", ["q24h"]),
    ("Vancomycin", ["1 g", "1.25 g"], "IV", ["q12h"]),
    ("Tiotropium", ["18 mcg"], "INH", ["QD"]),
    ("Losartan", ["25 mg", "50 mg", "100 mg"], "PO", ["QD"]),
    ("Hydrochlorothiazide", ["12.5 mg", "25 mg"], "PO", ["QD"]),
    ("Apixaban", ["2.5 mg", "5 mg"], "PO", ["BID"]),
    ("Pantoprazole", ["40 mg"], "IV", ["QD", "BID"]),
    ("Morphine", ["2 mg", "4 mg"], "IV", ["q4h PRN"]),
    ("Azithromycin", ["250 mg", "500 mg"], "PO", ["QD"]),
    ("Enoxaparin", ["40 mg", "1 mg/kg"], "SC", ["QD", "q12h"]),
]

# full name, abbreviation (None when clinicians write it out)
CONDITIONS: list[tuple[str, str | None]] = [
    ("Type 2 diabetes mellitus", "DM2"),
    ("Hypertension", "HTN"),
    ("Chronic obstructive pulmonary disease", "COPD"),
    ("Chronic kidney disease stage 3b", "CKD 3b"),
    ("Congestive heart failure", "CHF"),
    ("Atrial fibrillation", "AFib"),
    ("Community-acquired pneumonia", "CAP"),
    ("Non-ST-elevation myocardial infarction", "NSTEMI"),
    ("Hyperlipidemia", "HLD"),
    ("Hypothyroidism", None),
    ("Urinary tract infection", "UTI"),
    ("Gastroesophageal reflux disease", "GERD"),
    ("Asthma", None),
    ("Deep vein thrombosis", "DVT"),
    ("Acute kidney injury", "AKI"),
    ("Coronary artery disease", "CAD"),
    ("Major depressive disorder", "MDD"),
    ("Osteoarthritis", "OA"),
]

# name, unit, low, high, decimals
LABS: list[tuple[str, str, float, float, int]] = [
    ("Hemoglobin", "g/dL", 12.0, 16.0, 1),
    ("WBC", "x10^3/uL", 4.0, 11.0, 1),
    ("Platelets", "x10^3/uL", 150, 400, 0),
    ("Sodium", "mmol/L", 135, 145, 0),
    ("Potassium", "mmol/L", 3.5, 5.1, 1),
    ("Chloride", "mmol/L", 98, 107, 0),
    ("Bicarbonate", "mmol/L", 22, 29, 0),
    ("BUN", "mg/dL", 7, 20, 0),
    ("Creatinine", "mg/dL", 0.6, 1.2, 2),
    ("Glucose", "mg/dL", 70, 99, 0),
    ("HbA1c", "%", 4.0, 5.6, 1),
    ("ALT", "U/L", 7, 56, 0),
    ("AST", "U/L", 10, 40, 0),
    ("TSH", "mIU/L", 0.4, 4.0, 2),
    ("Troponin I", "ng/mL", 0.0, 0.04, 2),
    ("INR", "ratio", 0.8, 1.2, 1),
    ("LDL cholesterol", "mg/dL", 0, 99, 0),
    ("Magnesium", "mg/dL", 1.7, 2.2, 1),
]

# modality, findings (term, sentence), impressions, and the diagnosis the impression prints (word
# for word: a radiology report's record lists what the radiologist concluded, not the indication
# that asked for the exam).
RADIOLOGY: list[tuple[str, list[tuple[str, str]], list[str], str]] = [
    ("Chest X-ray PA and lateral", [
        ("consolidation", "Right lower lobe consolidation with air bronchograms."),
        ("pleural effusion", "Small left pleural effusion blunting the costophrenic angle."),
        ("cardiomegaly", "Mild cardiomegaly with cardiothoracic ratio 0.56."),
        ("pneumothorax", "No pneumothorax."),
        ("pulmonary edema", "Interstitial pulmonary edema with Kerley B lines."),
    ], ["Findings consistent with pneumonia.", "Recommend follow-up imaging in 6 weeks."], "pneumonia"),
    ("CT abdomen and pelvis with contrast", [
        ("cholelithiasis", "Cholelithiasis without CT evidence of cholecystitis."),
        ("hepatic steatosis", "Diffuse hepatic steatosis."),
        ("appendicitis", "Dilated appendix measuring 11 mm with periappendiceal fat stranding."),
        ("renal cyst", "Simple 2.1 cm left renal cyst (Bosniak I)."),
        ("free fluid", "No free fluid or free air."),
    ], ["Acute appendicitis without perforation.", "Incidental Bosniak I renal cyst."], "Acute appendicitis"),
    ("CT chest pulmonary angiogram", [
        ("pulmonary embolism", "Filling defect in the right lower lobe segmental artery."),
        ("nodule", "4 mm solid nodule in the right upper lobe."),
        ("emphysema", "Centrilobular emphysema, upper lobe predominant."),
        ("lymphadenopathy", "No mediastinal lymphadenopathy."),
    ], ["Segmental pulmonary embolism on the right.", "Fleischner follow-up for the nodule."], "pulmonary embolism"),
    ("MRI brain without contrast", [
        ("infarct", "Acute infarct in the left MCA territory on DWI."),
        ("white matter hyperintensities", "Scattered periventricular white matter hyperintensities."),
        ("mass effect", "No mass effect or midline shift."),
        ("hemorrhage", "No intracranial hemorrhage."),
    ], ["Acute left MCA infarct.", "Chronic small vessel ischemic change."], "Acute left MCA infarct"),
]

PROCEDURES = [
    "Cardiac catheterization", "Echocardiogram", "Colonoscopy", "Central line placement",
    "Thoracentesis", "Percutaneous coronary intervention", "Upper endoscopy", "Lumbar puncture",
]

# Drugs the hand-written evaluation suite (medvl/medical/suite.py) names that the generator never draws.
SUITE_ONLY_DRUGS = ["Nitroglycerin"]

# Words any medical answer uses, beside the names above (gate 3/4/7: does a real model's answer
# read as medicine at all?).
GENERIC_WORDS = ["mg", "mmHg", "diagnosis", "medication", "dose", "patient", "BID", "TID", "QD", "PRN"]


@lru_cache(maxsize=1)
def terms() -> tuple[str, ...]:
    """Every drug, condition (name and abbreviation), analyte, procedure and radiology finding
    name, longest first (so that "Metoprolol tartrate" is matched before a shorter name)."""
    words = {name for name, *_ in DRUGS} | set(SUITE_ONLY_DRUGS) | {lab[0] for lab in LABS} | set(PROCEDURES)
    for full, abbr in CONDITIONS:
        words |= {full} | ({abbr} if abbr else set())
    for _, findings, _, diagnosis in RADIOLOGY:
        words |= {term for term, _ in findings} | {diagnosis}
    return tuple(sorted(words, key=len, reverse=True))
