"""Synthetic medical documents with their ground truth, rendered to PNG.

The hub is out of reach here, yet benchmarks, training and evaluation all need medical
documents whose content is known exactly. This module writes five kinds (diagnosis note,
radiology report, prescription, lab results, discharge summary) from tables of real drugs,
doses, conditions, lab analytes and reference ranges, with the abbreviations clinicians
write (BID, TID, QD, PRN, COPD, DM2, CKD ...).

Everything is driven by one ``random.Random(seed)``: the same seed gives the same text and
the same pixels. Each document keeps its ground truth (terms, values, and the structured
record that the API's /extract returns) next to the exact lines that get drawn.
"""

from __future__ import annotations

import hashlib
import io
import random
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFilter, ImageFont

from medvl.core.io import atomic_write_bytes, atomic_write_json
from medvl.medical.lexicon import CONDITIONS, DRUGS, LABS, PROCEDURES, RADIOLOGY

HOSPITALS = ["St. Mary Medical Center", "Riverside General Hospital", "Northgate Clinic",
             "Lakeview University Hospital", "Mercy Regional Health"]
PHYSICIANS = ["Dr. A. Patel", "Dr. L. Nguyen", "Dr. M. Okafor", "Dr. S. Kim", "Dr. R. Garcia",
              "Dr. J. Weber"]
FIRST = ["John", "Maria", "Wei", "Fatima", "Robert", "Aisha", "Carlos", "Elena", "David", "Priya"]
LAST = ["Smith", "Garcia", "Chen", "Khan", "Johnson", "Okoye", "Rossi", "Novak", "Brown", "Singh"]

KINDS = ("diagnosis_note", "radiology_report", "prescription", "lab_results", "discharge_summary")

# --------------------------------------------------------------------------- data model


@dataclass
class MedicalDocument:
    """One document: the exact lines drawn on the page plus what a reader should extract."""

    doc_id: str
    kind: str
    title: str
    lines: list[str]
    medications: list[dict[str, str]] = field(default_factory=list)
    diagnoses: list[str] = field(default_factory=list)
    procedures: list[str] = field(default_factory=list)
    lab_values: list[dict[str, str]] = field(default_factory=list)
    vitals: dict[str, str] = field(default_factory=dict)
    findings: list[str] = field(default_factory=list)
    noise: float = 0.0

    @property
    def text(self) -> str:
        return "\n".join([self.title, *self.lines])

    @property
    def expected_terms(self) -> list[str]:
        """Words a correct reading must name: drugs, conditions, analytes, findings."""
        terms = [m["name"] for m in self.medications]
        terms += self.diagnoses + self.procedures + self.findings
        terms += [lab["name"] for lab in self.lab_values]
        terms += [m["frequency"] for m in self.medications]
        return _unique(terms)

    @property
    def expected_values(self) -> list[str]:
        """Numbers with units a correct reading must copy: doses, lab values, vitals."""
        values = [m["dose"] for m in self.medications]
        values += [lab["value"] for lab in self.lab_values]
        values += list(self.vitals.values())
        return _unique(values)

    def structured(self) -> dict[str, Any]:
        """The record in the shape the API's /extract returns (the training target)."""
        return {
            "medications": self.medications,
            "diagnoses": self.diagnoses,
            "procedures": self.procedures,
            "lab_values": self.lab_values,
            "vitals": self.vitals,
        }

    def target_answer(self) -> str:
        from medvl.medical.records import record_answer

        return record_answer(self.structured())

    def ground_truth(self) -> dict[str, Any]:
        return {
            "doc_id": self.doc_id,
            "kind": self.kind,
            "expected_terms": self.expected_terms,
            "expected_values": self.expected_values,
            "structured": self.structured(),
            "findings": self.findings,
            "text": self.text,
        }

    def content_hash(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(i for i in items if i))


# --------------------------------------------------------------------------- generators


def _header(rng: random.Random, kind_title: str) -> tuple[str, list[str]]:
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    mrn = rng.randint(1_000_000, 9_999_999)
    date = f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    age = rng.randint(24, 91)
    sex = rng.choice(["M", "F"])
    return f"{rng.choice(HOSPITALS)} - {kind_title}", [
        f"Patient: {name}    MRN: {mrn}    Age/Sex: {age} {sex}",
        f"Date: {date}    Attending: {rng.choice(PHYSICIANS)}",
        "",
    ]


def _medications(rng: random.Random, k: int) -> list[dict[str, str]]:
    meds = []
    for name, doses, route, freqs in rng.sample(DRUGS, k):
        meds.append({"name": name, "dose": rng.choice(doses), "route": route,
                     "frequency": rng.choice(freqs)})
    return meds


def _med_line(m: dict[str, str]) -> str:
    return f"{m['name']} {m['dose']} {m['route']} {m['frequency']}"


def _conditions(rng: random.Random, k: int) -> list[str]:
    """Each condition written the way notes write it: abbreviation or full name."""
    out = []
    for full, abbr in rng.sample(CONDITIONS, k):
        out.append(abbr if abbr and rng.random() < 0.6 else full)
    return out


def _labs(rng: random.Random, k: int) -> list[dict[str, str]]:
    labs = []
    for name, unit, low, high, decimals in rng.sample(LABS, k):
        roll = rng.random()
        span = high - low
        if roll < 0.25:
            value, flag = high + span * rng.uniform(0.1, 0.8), "H"
        elif roll < 0.4 and low > 0:
            value, flag = max(low * rng.uniform(0.5, 0.9), 10 ** -decimals), "L"
        else:
            value, flag = rng.uniform(low, high), ""
        text = f"{value:.{decimals}f}"
        labs.append({"name": name, "value": text, "unit": unit, "flag": flag,
                     "reference_range": f"{low:.{decimals}f}-{high:.{decimals}f}"})
    return labs


def _vitals(rng: random.Random) -> dict[str, str]:
    o2 = rng.choice(["on RA", "on 2 L NC", "on 4 L NC"])
    return {
        "blood_pressure": f"{rng.randint(96, 178)}/{rng.randint(56, 104)} mmHg",
        "heart_rate": f"{rng.randint(52, 124)} bpm",
        "temperature": f"{rng.uniform(36.1, 39.4):.1f} C",
        "respiratory_rate": f"{rng.randint(12, 28)} /min",
        "spo2": f"{rng.randint(88, 100)}% {o2}",
    }


def _vital_lines(v: dict[str, str]) -> list[str]:
    return [f"BP {v['blood_pressure']}   HR {v['heart_rate']}   Temp {v['temperature']}",
            f"RR {v['respiratory_rate']}   SpO2 {v['spo2']}"]


def _diagnosis_note(rng: random.Random, doc_id: str) -> MedicalDocument:
    title, lines = _header(rng, "Progress Note")
    dx = _conditions(rng, rng.randint(2, 3))
    meds = _medications(rng, rng.randint(2, 4))
    vitals = _vitals(rng)
    lines += ["Chief complaint: " + rng.choice(["shortness of breath", "chest pain",
                                                 "fatigue and polyuria", "productive cough"]),
              f"History: {rng.randint(45, 88)} y/o with PMH of {', '.join(dx)}.", "",
              "Vitals:", *_vital_lines(vitals), "", "Assessment:"]
    lines += [f"{i}. {d}" for i, d in enumerate(dx, 1)]
    lines += ["", "Plan / Medications:"] + [f"- {_med_line(m)}" for m in meds]
    lines += ["", "Follow up in clinic in 2 weeks. Return precautions given."]
    return MedicalDocument(doc_id, "diagnosis_note", title, lines, medications=meds,
                           diagnoses=dx, vitals=vitals)


def _radiology_report(rng: random.Random, doc_id: str) -> MedicalDocument:
    """The record holds the exam (an imaging procedure) and the diagnosis the impression prints;
    the indication is why the exam was asked for, not a diagnosis, so it stays out of it."""
    modality, findings, impressions, diagnosis = rng.choice(RADIOLOGY)
    title, lines = _header(rng, "Radiology Report")
    chosen = rng.sample(findings, rng.randint(2, len(findings)))
    indication = _conditions(rng, 1)[0]
    lines += [f"Exam: {modality}", f"Indication: {indication}, evaluate.",
              "Comparison: None available.", "", "Findings:"]
    lines += [f"- {sentence}" for _, sentence in chosen]
    lines += ["", "Impression:", *[f"{i}. {s}" for i, s in enumerate(impressions, 1)]]
    return MedicalDocument(doc_id, "radiology_report", title, lines, diagnoses=[diagnosis],
                           procedures=[modality], findings=[term for term, _ in chosen])


def _prescription(rng: random.Random, doc_id: str) -> MedicalDocument:
    title, lines = _header(rng, "Prescription")
    meds = _medications(rng, rng.randint(2, 5))
    dx = _conditions(rng, 1)
    lines += [f"Diagnosis: {dx[0]}", "", "Rx:"]
    for i, m in enumerate(meds, 1):
        lines += [f"{i}. {_med_line(m)}", f"   Disp: #{rng.choice([30, 60, 90])}  Refills: {rng.randint(0, 5)}"]
    lines += ["", "Substitution permitted.", f"Prescriber: {rng.choice(PHYSICIANS)}   DEA: on file"]
    return MedicalDocument(doc_id, "prescription", title, lines, medications=meds, diagnoses=dx)


def _lab_results(rng: random.Random, doc_id: str) -> MedicalDocument:
    title, lines = _header(rng, "Laboratory Results")
    labs = _labs(rng, rng.randint(5, 9))
    lines += ["Specimen: Blood, venous   Collected: 06:40", "",
              f"{'Test':<18}{'Result':>9}  {'Unit':<10}{'Ref range':<14}Flag"]
    for lab in labs:
        lines.append(f"{lab['name']:<18}{lab['value']:>9}  {lab['unit']:<10}"
                     f"{lab['reference_range']:<14}{lab['flag']}")
    lines += ["", "H = above reference range, L = below reference range.",
              "Critical values called to the ordering provider."]
    return MedicalDocument(doc_id, "lab_results", title, lines, lab_values=labs)


def _discharge_summary(rng: random.Random, doc_id: str) -> MedicalDocument:
    title, lines = _header(rng, "Discharge Summary")
    dx = _conditions(rng, rng.randint(3, 4))
    meds = _medications(rng, rng.randint(3, 5))
    procs = rng.sample(PROCEDURES, rng.randint(1, 2))
    # The course prints a lab's value, unit and flag but no reference range: the record holds
    # the same (a range in the target would teach the model to state what the page does not).
    labs = [{**lab, "reference_range": ""} for lab in _labs(rng, 2)]
    lines += [f"Admission diagnosis: {dx[0]}", "Discharge diagnoses:"]
    lines += [f"  {i}. {d}" for i, d in enumerate(dx, 1)]
    lines += ["", f"Procedures: {'; '.join(procs)}", "",
              "Hospital course: Treated and improved. "
              + "; ".join(f"{lab['name']} {lab['value']} {lab['unit']}" + (f" ({lab['flag']})" if lab["flag"] else "")
                          for lab in labs) + ".",
              "", "Discharge medications:"]
    lines += [f"- {_med_line(m)}" for m in meds]
    lines += ["", "Condition at discharge: stable. Follow up with PCP in 1 week."]
    return MedicalDocument(doc_id, "discharge_summary", title, lines, medications=meds,
                           diagnoses=dx, procedures=procs, lab_values=labs)


_BUILDERS = {
    "diagnosis_note": _diagnosis_note,
    "radiology_report": _radiology_report,
    "prescription": _prescription,
    "lab_results": _lab_results,
    "discharge_summary": _discharge_summary,
}


def generate_document(seed: int, kind: str | None = None, prefix: str = "doc") -> MedicalDocument:
    """One document from one seed; ``kind`` None picks one from the seed too."""
    rng = random.Random(seed)
    kind = kind or rng.choice(KINDS)
    if kind not in _BUILDERS:
        raise ValueError(f"unknown document kind {kind!r}; one of {', '.join(KINDS)}")
    return _BUILDERS[kind](rng, f"{prefix}-{kind}-{seed}")


def benchmark_documents(seed: int, count: int = 5) -> list[MedicalDocument]:
    """The phase-3 benchmark set: one of each kind first, so five covers all five kinds."""
    return [generate_document(seed + i, KINDS[i % len(KINDS)], prefix="test") for i in range(count)]


# Seeds of the synthetic training corpus (phase 5): far from the benchmark (1234...) and eval seeds.
SYNTHETIC_SEED = 100_000
# Seeds of AWQ's calibration pages (phase 4, and phase 7's fine-tuned model): the training
# generator's documents, but none that phase 5 splits (so none is a phase-7 test page).
CALIBRATION_SEED = 200_000
# Seeds of a stand-in's pre-training pages (phase 2, medvl.training.pretrain): none of them is
# a page phase 5 splits, AWQ calibrates on, phase 3 benchmarks or the suite holds.
PRETRAIN_SEED = 1_000_000
# Seeds of the pages bench/review_loop.py files for review and corrects (issue 48): pages of
# nobody else, so none is a test, evaluation, calibration, training or pre-training page.
REVIEW_SEED = 2_000_000


def corpus(start_seed: int, count: int, prefix: str = "syn") -> list[MedicalDocument]:
    return [generate_document(start_seed + i, prefix=prefix) for i in range(count)]


# --------------------------------------------------------------------------- rendering

PAGE_WIDTH = 1000
MARGIN = 48
_FONT_DIRS = ["/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu",
              "/usr/local/share/fonts"]


@lru_cache(maxsize=16)
def load_font(size: int, monospace: bool = False) -> ImageFont.FreeTypeFont:
    """DejaVu when installed; otherwise Pillow's bundled FreeType font (always present)."""
    name = "DejaVuSansMono.ttf" if monospace else "DejaVuSans.ttf"
    for folder in _FONT_DIRS:
        path = Path(folder) / name
        if path.is_file():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size=size)


TITLE_Y = MARGIN - 10
BODY_TOP = MARGIN + 50
LINE_HEIGHT = 28


def line_positions(doc: MedicalDocument) -> list[tuple[int, str]]:
    """(y, text) of every body line, top to bottom: the page layout, shared with tests."""
    return [(BODY_TOP + i * LINE_HEIGHT, line) for i, line in enumerate(doc.lines)]


def body_font(doc: MedicalDocument, monospace: bool | None = None) -> ImageFont.FreeTypeFont:
    """Lab tables use a monospace font so their columns line up."""
    return load_font(19, monospace=doc.kind == "lab_results" if monospace is None else monospace)


def render_document(doc: MedicalDocument, monospace: bool | None = None) -> Image.Image:
    """Draw the title and lines on a white page (about US-letter proportions)."""
    font = body_font(doc, monospace)
    height = max(1294, BODY_TOP + MARGIN + LINE_HEIGHT * len(doc.lines))
    page = Image.new("RGB", (PAGE_WIDTH, height), "white")
    draw = ImageDraw.Draw(page)
    draw.rectangle([0, 0, PAGE_WIDTH, 6], fill=(22, 74, 140))
    draw.text((MARGIN, TITLE_Y), doc.title, font=load_font(28), fill=(22, 74, 140))
    draw.line([MARGIN, MARGIN + 32, PAGE_WIDTH - MARGIN, MARGIN + 32], fill=(120, 120, 120), width=2)
    for y, line in line_positions(doc):
        draw.text((MARGIN, y), line, font=font, fill=(15, 15, 15))
    if doc.noise > 0:
        page = _scan_noise(page, doc.noise, int(doc.content_hash(), 16) % (2**32))
    return page


def _scan_noise(page: Image.Image, amount: float, seed: int) -> Image.Image:
    """A cheap photocopy look: slight rotation, blur and speckle, seeded for determinism."""
    rng = random.Random(seed)
    page = page.rotate(rng.uniform(-1.5, 1.5), fillcolor="white", resample=Image.BICUBIC)
    page = page.filter(ImageFilter.GaussianBlur(radius=0.6 * amount))
    draw = ImageDraw.Draw(page)
    w, h = page.size
    for _ in range(int(4000 * amount)):
        x, y = rng.randrange(w), rng.randrange(h)
        shade = rng.randint(90, 200)
        draw.point((x, y), fill=(shade, shade, shade))
    return page


def document_png(doc: MedicalDocument) -> bytes:
    """The rendered page as PNG bytes (what phase 5 stores and the API is sent)."""
    buffer = io.BytesIO()
    render_document(doc).save(buffer, format="PNG")
    return buffer.getvalue()


def generated_png(seed_and_prefix: tuple[int, str]) -> bytes:
    """The page :func:`generate_document` makes for ``(seed, prefix)``, as PNG bytes: the unit of
    work phases 2 and 5 spread over worker processes (:func:`medvl.core.parallel.process_map`)."""
    seed, prefix = seed_and_prefix
    return document_png(generate_document(seed, prefix=prefix))


def save_document(doc: MedicalDocument, folder: Path) -> tuple[Path, Path]:
    """Write ``<doc_id>.png`` and ``<doc_id>.json`` (ground truth) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    render_document(doc).save(buffer, format="PNG", optimize=False)
    image_path = folder / f"{doc.doc_id}.png"
    truth_path = folder / f"{doc.doc_id}.json"
    atomic_write_bytes(image_path, buffer.getvalue())
    atomic_write_json(truth_path, {**doc.ground_truth(), "document": asdict(doc)})
    return image_path, truth_path


# --------------------------------------------------------------------------- multi-page PDFs

PDF_RESOLUTION = 150  # dpi a page image is placed at: the render DPI read-back uses (api.pdf_render_dpi)
PDF_JPEG_QUALITY = 90  # Pillow embeds RGB pages as JPEG; 90 keeps small print legible
_PDF_DATE = time.gmtime(1_767_225_600)  # 2026-01-01 UTC, fixed, so the same pages give the same bytes


def document_pdf(docs: list[MedicalDocument]) -> bytes:
    """The documents as the pages of one PDF, each page its rendered image at 150 dpi: what a
    scanner or a fax server sends (image pages, no text layer). Deterministic bytes."""
    pages = [render_document(doc) for doc in docs]
    buffer = io.BytesIO()
    pages[0].save(buffer, format="PDF", save_all=True, append_images=pages[1:], resolution=PDF_RESOLUTION,
                  quality=PDF_JPEG_QUALITY, creationDate=_PDF_DATE, modDate=_PDF_DATE, producer="medvl")
    return buffer.getvalue()


def packet_documents(seed: int) -> list[MedicalDocument]:
    """Phase 3's two-page PDF: a discharge summary, then lab results on page 2 (two generated
    pages; their headers name different patients, as the generator draws each header)."""
    return [generate_document(seed, "discharge_summary", prefix="packet"),
            generate_document(seed + 1, "lab_results", prefix="packet")]


def pdf_document_id(seed: int) -> str:
    """The two-page PDF's name among phase 3's benchmark documents."""
    return f"test-pdf-{seed}"


def pdf_ground_truth(doc_id: str, docs: list[MedicalDocument]) -> dict[str, Any]:
    """A PDF's truth: each page's, and the document's record merged as /extract merges a PDF's
    pages (:func:`medvl.medical.records.merge_pages`), with each item's page."""
    from medvl.medical.records import merge_pages

    structured, items, _ = merge_pages([doc.structured() for doc in docs])
    return {"doc_id": doc_id, "kind": "pdf", "pages": [doc.ground_truth() for doc in docs],
            "structured": structured, "items": items, "text": "\f".join(doc.text for doc in docs)}


def save_pdf_document(doc_id: str, docs: list[MedicalDocument], folder: Path) -> tuple[Path, Path]:
    """Write ``<doc_id>.pdf`` (one page per document) and ``<doc_id>.json`` (its truth) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    pdf_path, truth_path = folder / f"{doc_id}.pdf", folder / f"{doc_id}.json"
    atomic_write_bytes(pdf_path, document_pdf(docs))
    atomic_write_json(truth_path, pdf_ground_truth(doc_id, docs))
    return pdf_path, truth_path


def tokenizer_corpus(count: int = 400) -> list[str]:
    """Text the stand-in tokenizer is trained on: document text and JSON answers."""
    texts: list[str] = []
    for doc in corpus(10_000, count, prefix="tok"):
        texts.append(doc.text)
        texts.append(doc.target_answer())
    return texts
