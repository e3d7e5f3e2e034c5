"""The phase-7 evaluation suite: hand-written, hard medical documents.

Unlike the generated corpus, these are written by hand to be dense and awkward: stacked
abbreviations (BID, QD, PRN, TID, q8h, COPD, DM2, CKD 3b, NSTEMI), drugs with doses and
routes, lab panels with units, reference ranges and H/L flags, vitals such as
"BP 142/91 mmHg" and "SpO2 94% on 2 L NC", and one noisy, skewed scan. None of them is
generated from a seed, and phase 5 refuses to put any of them in a training split. One case is
a two-page PDF (:func:`multi_page_document`): the discharge summary, then the lab panel.
"""

from __future__ import annotations

from medvl.medical.documents import MedicalDocument


def _med(name: str, dose: str, route: str, frequency: str) -> dict[str, str]:
    return {"name": name, "dose": dose, "route": route, "frequency": frequency}


def _lab(name: str, value: str, unit: str, flag: str, ref: str) -> dict[str, str]:
    return {"name": name, "value": value, "unit": unit, "flag": flag, "reference_range": ref}


def evaluation_documents() -> list[MedicalDocument]:
    """Five documents with their expected records: only what each page prints (a flag or a
    reference range only where the page shows it)."""
    ed_note = MedicalDocument(
        "eval-ed-nstemi", "diagnosis_note", "Harbor View Hospital - ED Physician Note",
        ["Pt: R. Delgado   MRN 4402871   Age/Sex: 71 M   2026-03-14 02:10",
         "CC: substernal CP x 3h, diaphoresis.",
         "PMH: DM2, HTN, COPD, CKD 3b. NKDA.",
         "",
         "Vitals: BP 142/91 mmHg  HR 104 bpm  Temp 37.2 C",
         "RR 22 /min  SpO2 94% on 2 L NC",
         "",
         "ECG: ST depression V4-V6. Troponin I 0.42 ng/mL (H).",
         "A/P: NSTEMI. Start heparin gtt, cardiology consult.",
         "- Aspirin 325 mg PO once, then 81 mg PO QD",
         "- Atorvastatin 80 mg PO QHS",
         "- Metoprolol tartrate 25 mg PO BID",
         "- Nitroglycerin 0.4 mg SL q5min PRN chest pain",
         "Hold Metformin (CKD 3b, contrast)."],
        medications=[_med("Aspirin", "81 mg", "PO", "QD"), _med("Atorvastatin", "80 mg", "PO", "QHS"),
                     _med("Metoprolol tartrate", "25 mg", "PO", "BID"),
                     _med("Nitroglycerin", "0.4 mg", "SL", "q5min PRN")],
        diagnoses=["NSTEMI", "DM2", "HTN", "COPD", "CKD 3b"],
        lab_values=[_lab("Troponin I", "0.42", "ng/mL", "H", "")],
        vitals={"blood_pressure": "142/91 mmHg", "heart_rate": "104 bpm", "temperature": "37.2 C",
                "respiratory_rate": "22 /min", "spo2": "94% on 2 L NC"},
    )
    bmp = MedicalDocument(
        "eval-lab-bmp-cbc", "lab_results", "Clearwater Reference Laboratory - Results",
        ["Patient: T. Osei   MRN 7719024   Collected 2026-05-02 05:55", "",
         f"{'Test':<18}{'Result':>9}  {'Unit':<10}{'Ref range':<14}Flag",
         f"{'Sodium':<18}{'131':>9}  {'mmol/L':<10}{'135-145':<14}L",
         f"{'Potassium':<18}{'5.9':>9}  {'mmol/L':<10}{'3.5-5.1':<14}H",
         f"{'Creatinine':<18}{'2.41':>9}  {'mg/dL':<10}{'0.60-1.20':<14}H",
         f"{'BUN':<18}{'48':>9}  {'mg/dL':<10}{'7-20':<14}H",
         f"{'Glucose':<18}{'212':>9}  {'mg/dL':<10}{'70-99':<14}H",
         f"{'Hemoglobin':<18}{'9.8':>9}  {'g/dL':<10}{'12.0-16.0':<14}L",
         f"{'Platelets':<18}{'188':>9}  {'x10^3/uL':<10}{'150-400':<14}",
         f"{'HbA1c':<18}{'8.7':>9}  {'%':<10}{'4.0-5.6':<14}H", "",
         "Comment: hyperkalemia called to Dr. Ibarra 06:40, read back."],
        lab_values=[_lab("Sodium", "131", "mmol/L", "L", "135-145"), _lab("Potassium", "5.9", "mmol/L", "H", "3.5-5.1"),
                    _lab("Creatinine", "2.41", "mg/dL", "H", "0.60-1.20"), _lab("BUN", "48", "mg/dL", "H", "7-20"),
                    _lab("Glucose", "212", "mg/dL", "H", "70-99"), _lab("Hemoglobin", "9.8", "g/dL", "L", "12.0-16.0"),
                    _lab("Platelets", "188", "x10^3/uL", "", "150-400"), _lab("HbA1c", "8.7", "%", "H", "4.0-5.6")],
    )
    rx = MedicalDocument(
        "eval-rx-copd", "prescription", "Pinecrest Pulmonary Clinic - Prescription",
        ["Pt: M. Haddad   DOB 1954-09-30   Dx: COPD exacerbation, DM2", "",
         "1. Prednisone 40 mg PO QD x 5 days",
         "2. Azithromycin 500 mg PO QD x 3 days",
         "3. Tiotropium 18 mcg INH QD",
         "4. Albuterol 90 mcg INH q4h PRN wheeze",
         "5. Insulin glargine 20 units SC QHS (titrate per BG)",
         "6. Pantoprazole 40 mg PO BID while on steroids", "",
         "Refills: 0 (1-5), 3 (3-4). Substitution permitted.",
         "Prescriber: Dr. K. Lindqvist, MD"],
        medications=[_med("Prednisone", "40 mg", "PO", "QD"), _med("Azithromycin", "500 mg", "PO", "QD"),
                     _med("Tiotropium", "18 mcg", "INH", "QD"), _med("Albuterol", "90 mcg", "INH", "q4h PRN"),
                     _med("Insulin glargine", "20 units", "SC", "QHS"), _med("Pantoprazole", "40 mg", "PO", "BID")],
        diagnoses=["COPD", "DM2"],
    )
    discharge = MedicalDocument(
        "eval-dc-chf-afib", "discharge_summary", "St. Alban General - Discharge Summary",
        ["Pt: E. Kowalczyk   MRN 5520193   Adm 2026-06-01  D/C 2026-06-06",
         "Discharge Dx: 1) CHF exacerbation  2) AFib with RVR  3) AKI on CKD 3b  4) UTI",
         "Procedures: Echocardiogram (EF 35%); Thoracentesis R 900 mL",
         "Course: diuresed 6 L; Creatinine 1.9 mg/dL peak; Potassium 3.3 mmol/L repleted.", "",
         "D/C meds:",
         "- Furosemide 40 mg PO BID",
         "- Apixaban 5 mg PO BID",
         "- Metoprolol tartrate 50 mg PO BID",
         "- Ceftriaxone 1 g IV q24h x 2 more doses, then stop",
         "- Acetaminophen 650 mg PO q6h PRN pain", "",
         "F/u: cardiology 1 wk, BMP in 3 days. Daily weights; call if > 2 kg gain."],
        medications=[_med("Furosemide", "40 mg", "PO", "BID"), _med("Apixaban", "5 mg", "PO", "BID"),
                     _med("Metoprolol tartrate", "50 mg", "PO", "BID"), _med("Ceftriaxone", "1 g", "IV", "q24h"),
                     _med("Acetaminophen", "650 mg", "PO", "q6h PRN")],
        diagnoses=["CHF", "AFib", "AKI", "CKD 3b", "UTI"],
        procedures=["Echocardiogram", "Thoracentesis"],
        # the course prints values and units, no flag or range: the record holds no more
        lab_values=[_lab("Creatinine", "1.9", "mg/dL", "", ""), _lab("Potassium", "3.3", "mmol/L", "", "")],
    )
    scan = MedicalDocument(
        "eval-scan-progress", "diagnosis_note", "Valley Family Practice - Progress Note (scanned)",
        ["Pt: J. Mbeki   Age/Sex: 58 F   Visit 2026-07-19",
         "S: f/u DM2 + HTN, occasional CP on exertion, no SOB.",
         "O: BP 158/96 mmHg  HR 88 bpm  SpO2 97% on RA",
         "   Glucose 184 mg/dL (H)  LDL cholesterol 162 mg/dL (H)", "",
         "A: DM2 uncontrolled; HTN stage 2; HLD; r/o CAD",
         "P: Metformin 1000 mg PO BID",
         "   Lisinopril 20 mg PO QD",
         "   Atorvastatin 40 mg PO QHS",
         "   Gabapentin 300 mg PO TID for neuropathy",
         "   Stress test ordered. RTC 4 wks."],
        medications=[_med("Metformin", "1000 mg", "PO", "BID"), _med("Lisinopril", "20 mg", "PO", "QD"),
                     _med("Atorvastatin", "40 mg", "PO", "QHS"), _med("Gabapentin", "300 mg", "PO", "TID")],
        diagnoses=["DM2", "HTN", "HLD"],  # "r/o CAD" is a diagnosis to rule out, not one made
        lab_values=[_lab("Glucose", "184", "mg/dL", "H", ""), _lab("LDL cholesterol", "162", "mg/dL", "H", "")],
        vitals={"blood_pressure": "158/96 mmHg", "heart_rate": "88 bpm", "spo2": "97% on RA"},
        noise=1.0,
    )
    return [ed_note, bmp, rx, discharge, scan]


MULTI_PAGE_CASE = "eval-pdf-discharge-labs"


def multi_page_document() -> list[MedicalDocument]:
    """The multi-page case's pages, in order: the discharge summary, then the lab panel on page 2
    (a discharge packet as a ward prints it); its expected record is theirs merged, each item
    on its page (:func:`medvl.medical.documents.pdf_ground_truth`)."""
    by_id = {doc.doc_id: doc for doc in evaluation_documents()}
    return [by_id["eval-dc-chf-afib"], by_id["eval-lab-bmp-cbc"]]
