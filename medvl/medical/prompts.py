"""The prompts the pipeline sends, in one place so training and serving agree."""

from __future__ import annotations

# An OCR-grounded prompt (data.ocr_grounded_prompt) puts the page's OCR text before the
# instruction; training, evaluation and serving build it with :func:`ocr_grounded`.
OCR_HEADER = "OCR text of the page (it may hold reading errors):"

# What /extract asks for, and the shape training targets use (documents.structured()).
EXTRACTION_PROMPT = (
    "Extract the clinical information from this medical document as JSON with keys "
    "medications (name, dose, route, frequency), diagnoses, procedures, lab_values "
    "(name, value, unit, flag) and vitals. Copy values and units exactly."
)

# Benchmark prompts per document kind (phases 3, 4, 7 use the same ones).
BENCHMARK_PROMPTS = {
    "diagnosis_note": "List the diagnoses, vital signs and medications with doses in this note.",
    "radiology_report": "Summarise the findings and impression of this radiology report.",
    "prescription": "List every prescribed drug with its dose, route and frequency.",
    "lab_results": "List each lab test with its value, unit and H/L flag.",
    "discharge_summary": "List the discharge diagnoses, procedures and discharge medications.",
}

# Varied extraction prompts for training samples (at least ten, per the data spec).
TRAINING_PROMPTS = [
    EXTRACTION_PROMPT,
    "Read this document and return its medications, diagnoses, procedures, lab values and vitals as JSON.",
    "What medications, doses and frequencies appear in this document? Answer in JSON.",
    "Extract structured clinical data (medications, diagnoses, labs, vitals) from the image.",
    "Convert this clinical document into JSON: medications, diagnoses, procedures, lab_values, vitals.",
    "Identify every drug with dose, route and frequency, every diagnosis, and every lab result.",
    "Transcribe the key clinical facts of this page into the standard extraction JSON.",
    "Pull out the lab values with units and flags, the vitals and the medication list as JSON.",
    "You are a clinical documentation assistant. Extract the structured record from this scan.",
    "Parse this medical record image and output medications, diagnoses, procedures, labs and vitals.",
    "Give the structured summary of this document: meds (dose/route/frequency), dx, procedures, labs, vitals.",
    "Extract all clinically relevant entities from this document in JSON form.",
]

# Free-text prompts for image-caption sources (ROCO, PubMedVision) whose answers are prose.
DESCRIPTION_PROMPTS = [
    "Describe the findings in this medical image.",
    "What does this medical image show?",
    "Write a radiology-style caption for this image.",
    "Summarise the key clinical findings visible in this image.",
    "Describe this image as a radiologist would in a report.",
    "What abnormalities, if any, are visible in this image?",
    "Provide a concise clinical description of this image.",
    "Explain what this medical image depicts.",
    "Give the imaging modality and the main findings of this image.",
    "Caption this medical image for a clinical report.",
]


def ocr_grounded(instruction: str, ocr_lines: list[str]) -> str:
    """The instruction with the page's OCR lines before it.

    >>> ocr_grounded("List the drugs.", ["Metformin 500 mg PO BID"])
    'OCR text of the page (it may hold reading errors):\\nMetformin 500 mg PO BID\\n\\nList the drugs.'
    """
    text = "\n".join(ocr_lines) if ocr_lines else "(none found)"
    return f"{OCR_HEADER}\n{text}\n\n{instruction}"


def instruction_of(prompt: str) -> str:
    """The instruction of a prompt, without an OCR-grounded prompt's page text."""
    if prompt.startswith(OCR_HEADER):
        return prompt.rsplit("\n\n", 1)[-1]
    return prompt
