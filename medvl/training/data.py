"""Phase 5: training data from three hub datasets, or the offline synthetic corpus.

Sources (each streamed or range-read, so 3000 rows never cost a 13 GB download):

- ROCO radiology (image + caption), parquet on the hub, ``image``/``image_id``/``caption``;
- FreedomIntelligence/PubMedVision, config ``PubMedVision_Alignment_VQA`` (JSON rows with
  ``id``, ``image`` [paths inside images_*.zip], ``conversations`` [human/gpt turns]); the
  images are read one by one out of the remote zip archives by HTTP range requests;
- MTSamples (medical transcriptions, text only), rendered onto white pages in a monospace font.

Each adapter separates *fetching* (network) from *parsing a row of the real schema* (pure),
so parsing is tested offline on fixtures. A failed source is logged in one line with its
reason and the next mirror is tried; no single failure blocks the pipeline. Synthetic medical
documents (medvl.medical.documents) always join, and fill the whole set when no hub is reachable.

Every sample becomes a Qwen2.5-VL conversation: a user turn (image + one of the varied
prompts) and an assistant turn (the answer). Samples with a missing/unreadable image or a
text under ``min_text_chars`` are discarded and counted; duplicates are removed by content
hash; protected documents (phase-3 test set, phase-7 evaluation suite) never enter a split.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import random
import re
import textwrap
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from medvl.core.parallel import process_map
from medvl.core.settings import DataSettings, Settings
from medvl.medical.documents import (
    SYNTHETIC_SEED,
    MedicalDocument,
    benchmark_documents,
    corpus,
    generated_png,
    load_font,
)
from medvl.medical.prompts import DESCRIPTION_PROMPTS, EXTRACTION_PROMPT, TRAINING_PROMPTS, instruction_of

log = logging.getLogger(__name__)



@dataclass
class Sample:
    """One training example before it is written: image bytes plus prompt and answer."""

    sample_id: str
    source: str
    image_bytes: bytes
    prompt: str
    answer: str
    text: str  # the text whose length and hash decide filtering and de-duplication
    # Samples cut from one source document (the pages of a transcription) share a group and
    # always land in the same split, so no test page has its neighbours in training.
    group: str = ""

    def content_hash(self) -> str:
        return text_hash(self.text)


@dataclass
class SourceReport:
    """What happened to one source; becomes a row of download_summary.json."""

    name: str
    status: str = "not tried"
    repo: str | None = None
    attempts: list[dict[str, str]] = field(default_factory=list)
    rows_read: int = 0
    kept: int = 0
    discarded: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "repo": self.repo, "attempts": self.attempts,
                "rows_read": self.rows_read, "kept": self.kept, "discarded": dict(self.discarded)}


class Rejected(ValueError):
    """A row that cannot become a sample; the message is the counted reason."""


def text_hash(text: str) -> str:
    """Hash of text after case and whitespace normalisation (catches trivial duplicates)."""
    normal = re.sub(r"\s+", " ", text.strip().lower())
    return hashlib.sha256(normal.encode()).hexdigest()[:20]


def verified_image(data: bytes | None) -> bytes:
    """Return the bytes if they decode to an image; raise :class:`Rejected` otherwise."""
    if not data:
        raise Rejected("missing image")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except Exception:
        raise Rejected("unreadable image") from None
    return data


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def check_text(text: str, min_chars: int) -> str:
    text = (text or "").strip()
    if len(text) < min_chars:
        raise Rejected("text too short")
    return text


# --------------------------------------------------------------------------- row parsers


def parse_roco_row(row: dict[str, Any], rng: random.Random, min_chars: int) -> Sample:
    """ROCO: {"image": {"bytes", "path"} (undecoded Image feature), "image_id", "caption"}."""
    caption = check_text(row.get("caption", ""), min_chars)
    image = row.get("image") or {}
    data = verified_image(image.get("bytes") if isinstance(image, dict) else None)
    return Sample(f"roco-{row.get('image_id')}", "roco", data, rng.choice(DESCRIPTION_PROMPTS),
                  caption, caption)


def parse_pubmedvision_row(row: dict[str, Any], rng: random.Random, min_chars: int,
                           read_image: Callable[[str], bytes | None]) -> Sample:
    """PubMedVision: {"id", "image": [path, ...], "conversations": [{"from", "value"}, ...]}.

    Rows with several images are discarded ("several images"): their question and answer
    may describe any of them, and every image costs up to the profile's visual-token budget
    (640 tokens for 7b), so two would not fit train.max_length 1024 beside the answer.
    A row without an ``id`` gets one from a hash of its content (else every such sample
    would be ``pmv-None`` and their images would overwrite one another).
    """
    turns = row.get("conversations") or []
    human = next((t["value"] for t in turns if t.get("from") == "human"), "")
    answer = check_text(next((t["value"] for t in turns if t.get("from") == "gpt"), ""), min_chars)
    paths = row.get("image") or []
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise Rejected("missing image")
    if len(paths) > 1:
        raise Rejected("several images")
    data = verified_image(read_image(paths[0]))
    prompt = human.replace("<image>", "").strip() or rng.choice(DESCRIPTION_PROMPTS)
    row_id = row.get("id") or hashlib.sha256(json.dumps([paths, turns], sort_keys=True).encode()).hexdigest()[:12]
    return Sample(f"pmv-{row_id}", "pubmedvision", data, prompt, answer, answer)


def parse_mtsamples_row(row: dict[str, Any], rng: random.Random, min_chars: int, page_chars: int,
                        max_pages: int) -> list[Sample]:
    """MTSamples as on the hub (argilla/medical-domain): {"id", "text", "prediction": [{"label"}]}.

    The Kaggle-style schema ({"transcription", "medical_specialty", "description"}) is read too.
    A transcription (up to ~2,400 characters in most rows, far more in some) is cut at line or
    word boundaries into pages of at most ``page_chars`` characters, each rendered and answered
    on its own, so that every answer fits train.max_length beside its page image (a whole
    transcription, ~600 tokens, plus a ~616-token page does not fit 1024). The first
    ``max_pages`` pages are kept: more would let MTSamples outnumber the image sources.
    """
    text = check_text(row.get("text") or row.get("transcription") or "", min_chars)
    prediction = row.get("prediction") or []
    specialty = (prediction[0].get("label") if prediction else None) or row.get("medical_specialty") or "Unknown"
    specialty = str(specialty).strip()
    base = f"mts-{row.get('id') or hashlib.sha256(text.encode()).hexdigest()[:12]}"
    pages = paginate(text, page_chars)[:max_pages]
    samples = []
    for number, page_text in enumerate(pages, start=1):
        answer = f"Medical specialty: {specialty}\nTranscription:\n{page_text}"
        sample_id = base if len(pages) == 1 else f"{base}-p{number}"
        samples.append(Sample(sample_id, "mtsamples", png_bytes(render_transcription(page_text, specialty)),
                              "Transcribe this medical document and name its medical specialty.", answer,
                              page_text, group=base))
    return samples


def paginate(text: str, max_chars: int) -> list[str]:
    """Cut text into pages of at most ``max_chars`` characters, at line breaks where possible,
    else between words; nothing is dropped but the whitespace at a cut."""
    lines: list[str] = []
    for line in text.strip().splitlines():
        lines.extend(textwrap.wrap(line, max_chars, break_long_words=True, replace_whitespace=False)
                     if len(line) > max_chars else [line])
    pages: list[str] = []
    current = ""
    for line in lines:
        joined = f"{current}\n{line}" if current else line
        if len(joined) <= max_chars:
            current = joined
            continue
        pages.append(current)
        current = line
    if current.strip():
        pages.append(current)
    return [page for page in pages if page.strip()]


def render_transcription(text: str, specialty: str) -> Image.Image:
    """A text-only transcription on a white page, monospace, wrapped to the page width."""
    font = load_font(17, monospace=True)
    lines = [f"MEDICAL TRANSCRIPTION - {specialty.upper()}", ""]
    for paragraph in text.replace(",\n", ", ").splitlines():
        lines.extend(textwrap.wrap(paragraph, width=88) or [""])
    lines = lines[:60]
    page = Image.new("RGB", (1000, max(1294, 60 + 22 * len(lines))), "white")
    draw = ImageDraw.Draw(page)
    for i, line in enumerate(lines):
        draw.text((40, 40 + 22 * i), line, font=font, fill=(10, 10, 10))
    return page


def synthetic_samples(count: int, rng: random.Random) -> Iterator[tuple[MedicalDocument, Sample]]:
    """Synthetic documents with structured JSON targets (the shape /extract returns), their
    pages rendered over every core (thousands of pages for the `small` profile)."""
    docs = corpus(SYNTHETIC_SEED, count, prefix="syn")
    pages = process_map(generated_png, [(SYNTHETIC_SEED + i, "syn") for i in range(count)],
                        desc="rendering synthetic pages")
    for doc, page in zip(docs, pages, strict=True):
        yield doc, Sample(doc.doc_id, "synthetic", page, rng.choice(TRAINING_PROMPTS), doc.target_answer(), doc.text)


# --------------------------------------------------------------------------- reviewed pages


def pixel_hash(data: bytes) -> str:
    """A page's identity by its pixels, not its file's bytes: the review store keeps the page as
    the server decoded it and re-encoded it, so the same page arrives as other PNG bytes."""
    with Image.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB")
        return hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()


def reviewed_samples(path: Path, rng: random.Random, report: SourceReport) -> tuple[list[Sample], dict[str, str]]:
    """Training samples from an export of the review store (``GET /review/export``: one JSON line
    per page of an accepted or corrected document, medvl/review/store.py): the page, one of the
    training prompts, and the record as the reviewer left it, written as every synthetic answer
    is (:func:`medvl.medical.records.record_answer`). A row that is not JSON, lacks a field, has
    no readable image or a record the schema refuses is counted and dropped. Returns the samples
    and each document's review status (accepted or corrected), by document id."""
    from medvl.medical.records import record_answer

    samples, statuses = [], {}
    lines = path.read_text(encoding="utf-8").splitlines()
    report.status, report.repo = "ok", str(path)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        report.rows_read += 1
        try:
            row = json.loads(line)
            image = verified_image(base64.b64decode(row["image_png_base64"], validate=True))
            answer = record_answer(row["record"])
            doc_id, page = str(row["document_id"]), int(row["page"])
        except Rejected as why:
            report.discarded[str(why)] += 1
            continue
        except (ValueError, KeyError, TypeError) as exc:
            report.discarded[f"malformed row ({type(exc).__name__})"] += 1
            log.debug("reviewed row %d dropped: %s", number, type(exc).__name__)
            continue
        sample_id = f"rev-{doc_id[:12]}-p{page}"
        statuses[doc_id] = str(row.get("status", ""))
        samples.append(Sample(sample_id, "reviewed", image, rng.choice(TRAINING_PROMPTS), answer,
                              text=f"reviewed page {row.get('page_sha256') or pixel_hash(image)}", group=doc_id))
    report.kept = len(samples)
    return samples, statuses


def admit_reviewed(reviewed: list[Sample], splits: dict[str, list[Sample]], protected_pixels: set[str],
                   counts: Counter) -> list[Sample]:
    """The reviewed samples that may train: never a page of the validation or test split, of the
    phase-3 test set or the evaluation suite (``protected_pixels``), nor one already among the
    other samples or seen earlier in the export (both compared by :func:`pixel_hash`)."""
    held_out = {pixel_hash(s.image_bytes) for name in ("val", "test") for s in splits[name]} | protected_pixels
    seen = {pixel_hash(s.image_bytes) for s in splits["train"]}
    kept = []
    for sample in reviewed:
        key = pixel_hash(sample.image_bytes)
        if key in held_out:
            counts["reviewed: a validation, test or evaluation page"] += 1
        elif key in seen:
            counts["reviewed: duplicate page"] += 1
        else:
            seen.add(key)
            kept.append(sample)
    return kept


def protected_pixels(test_images: Path) -> set[str]:
    """The pixels of every page that must never train: phase 3's test pages as it wrote them and
    the evaluation suite's pages as phase 7 renders them."""
    from medvl.medical.documents import document_png
    from medvl.medical.suite import evaluation_documents

    pages = [path.read_bytes() for path in sorted(test_images.glob("*.png"))]
    pages += [document_png(doc) for doc in evaluation_documents()]
    return {pixel_hash(page) for page in pages}


# --------------------------------------------------------------------------- hub fetching

# name -> candidate (repo, config, split) mirrors tried in order
HUB_SOURCES: dict[str, list[tuple[str, str | None, str]]] = {
    "roco": [("mdwiratathya/ROCO-radiology", None, "train"), ("eltorio/ROCO-radiology", None, "train")],
    "pubmedvision": [("FreedomIntelligence/PubMedVision", "PubMedVision_Alignment_VQA", "train"),
                     ("FreedomIntelligence/PubMedVision", "PubMedVision_InstructionTuning_VQA", "train")],
    "mtsamples": [("argilla/medical-domain", None, "train")],
}


def check_dataset_reachable(repo: str, timeout_s: float = 10.0) -> None:
    """One fast request before streaming, so an unreachable hub costs seconds, not minutes."""
    import os

    from huggingface_hub import HfApi

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ConnectionError("HF_HUB_OFFLINE is set")
    HfApi().dataset_info(repo, timeout=timeout_s)


def stream_rows(repo: str, config: str | None, split: str, limit: int | None,
                undecoded_image: bool = False) -> Iterator[dict[str, Any]]:
    """Stream rows with ``datasets`` (no full download); images left undecoded when asked."""
    from datasets import Image as ImageFeature
    from datasets import load_dataset

    check_dataset_reachable(repo)
    ds = load_dataset(repo, config, split=split, streaming=True)
    if undecoded_image:
        ds = ds.cast_column("image", ImageFeature(decode=False))
    for i, row in enumerate(ds):
        if limit and i >= limit:
            break
        yield row


class RemoteZipImages:
    """Read single images out of PubMedVision's images_*.zip by HTTP range requests.

    Opening a remote zip reads only its central directory (the end of the file); each image
    read afterwards fetches just that member's bytes.
    """

    def __init__(self, repo: str, archives: int = 20) -> None:
        from huggingface_hub import HfFileSystem

        self.fs = HfFileSystem()
        self.repo = repo
        self.archives = archives
        self.index: dict[str, zipfile.ZipFile] = {}
        self.opened = 0

    def _open_next(self) -> bool:
        if self.opened >= self.archives:
            return False
        handle = self.fs.open(f"datasets/{self.repo}/images_{self.opened}.zip", "rb", block_size=2**20)
        archive = zipfile.ZipFile(handle)
        for name in archive.namelist():
            self.index[Path(name).name] = archive
        self.opened += 1
        return True

    def __call__(self, path: str) -> bytes | None:
        name = Path(path).name
        while name not in self.index and self._open_next():
            pass
        archive = self.index.get(name)
        if archive is None:
            return None
        member = next(n for n in archive.namelist() if Path(n).name == name)
        return archive.read(member)


def fetch_source(name: str, settings: Settings, rng: random.Random, raw_dir: Path,
                 report: SourceReport) -> list[Sample]:
    """Try each mirror of a source until one yields rows; record every failure's reason."""
    d = settings.data
    limit = {"roco": d.roco_max, "pubmedvision": d.pubmedvision_max, "mtsamples": d.mtsamples_max or None}[name]
    if not d.use_hub:
        report.status = "skipped"
        report.attempts.append({"repo": "-", "error": "disabled by data.use_hub=false"})
        log.info("%s: skipped (data.use_hub=false)", name)
        return []
    for repo, config, split in HUB_SOURCES[name]:
        try:
            rows = stream_rows(repo, config, split, limit, undecoded_image=(name == "roco"))
            reader = RemoteZipImages(repo) if name == "pubmedvision" else None
            samples = parse_rows(name, rows, rng, d, report, reader)
        except Exception as exc:  # network, auth, schema drift: try the next mirror
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            report.attempts.append({"repo": repo, "error": reason})
            log.warning("%s: %s unavailable (%s)", name, repo, reason)
            continue
        report.status, report.repo = "ok", repo
        save_raw(raw_dir / name, samples)
        return samples
    report.status = "failed"
    return []


def collect_samples(settings: Settings, raw_dir: Path) -> tuple[list[Sample], dict[str, SourceReport]]:
    """Every source's samples and its report: the hub sources, each tried mirror by mirror, then
    the synthetic corpus (always part of the mix; the whole of it offline), filtered alike.

    One ``random.Random(data.split_seed)`` draws the prompts, in this order, so a rerun with
    the same settings makes the same samples."""
    rng = random.Random(settings.data.split_seed)
    reports = {name: SourceReport(name) for name in (*HUB_SOURCES, "synthetic")}
    samples: list[Sample] = []
    for name in HUB_SOURCES:
        samples += fetch_source(name, settings, rng, raw_dir, reports[name])
    synthetic = reports["synthetic"]
    for _, sample in synthetic_samples(settings.data.synthetic_documents, rng):
        synthetic.rows_read += 1
        try:
            check_text(sample.text, settings.data.min_text_chars)
        except Rejected as exc:
            synthetic.discarded[str(exc)] += 1
            continue
        samples.append(sample)
    synthetic.status, synthetic.kept = "ok", synthetic.rows_read - sum(synthetic.discarded.values())
    synthetic.repo = "medvl.medical.documents (generated offline)"
    return samples, reports


def hub_sources_ok(reports: dict[str, SourceReport]) -> list[str]:
    return [name for name in HUB_SOURCES if reports[name].status == "ok"]


def parse_rows(name: str, rows: Iterable[dict[str, Any]], rng: random.Random, d: DataSettings,
               report: SourceReport, read_image: Callable[[str], bytes | None] | None = None) -> list[Sample]:
    """Parse rows of one source's schema, counting every discarded row by reason."""
    samples = []
    for row in rows:
        report.rows_read += 1
        try:
            if name == "roco":
                samples.append(parse_roco_row(row, rng, d.min_text_chars))
            elif name == "pubmedvision":
                samples.append(parse_pubmedvision_row(row, rng, d.min_text_chars, read_image or (lambda _: None)))
            else:
                samples.extend(parse_mtsamples_row(row, rng, d.min_text_chars, d.mtsamples_page_chars,
                                                   d.mtsamples_pages_per_row))
        except Rejected as why:
            report.discarded[str(why)] += 1
    report.kept = len(samples)
    return samples


def save_raw(folder: Path, samples: list[Sample]) -> None:
    """Keep what was fetched under datasets/raw/<name>/ (rows.jsonl + images/)."""
    from medvl.core.io import atomic_write_bytes, atomic_write_text

    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for s in samples:
        atomic_write_bytes(folder / "images" / f"{s.sample_id}.{image_extension(s.image_bytes)}", s.image_bytes)
        lines.append(json.dumps({"id": s.sample_id, "prompt": s.prompt, "answer": s.answer}))
    atomic_write_text(folder / "rows.jsonl", "\n".join(lines) + "\n")


def image_extension(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as img:
        return {"JPEG": "jpg", "PNG": "png"}.get(img.format or "", "png")


# --------------------------------------------------------------------------- assembling


def protected_hashes(settings: Settings) -> set[str]:
    """Documents that must never be trained on: the phase-3 test set and the phase-7 suite."""
    from medvl.medical.suite import evaluation_documents

    docs = benchmark_documents(settings.bench.document_seed, settings.bench.num_documents)
    docs += evaluation_documents()
    return {text_hash(doc.text) for doc in docs}


def deduplicate(samples: list[Sample], protected: set[str], counts: Counter) -> list[Sample]:
    """Drop protected documents and repeated content (by text hash and by image hash)."""
    seen_text: set[str] = set()
    seen_image: set[str] = set()
    kept = []
    for s in samples:
        text_key = s.content_hash()
        image_key = hashlib.sha256(s.image_bytes).hexdigest()
        if text_key in protected:
            counts["protected (test/eval document)"] += 1
        elif text_key in seen_text or image_key in seen_image:
            counts["duplicate"] += 1
        else:
            seen_text.add(text_key)
            seen_image.add(image_key)
            kept.append(s)
    return kept


def ground_prompts(samples: list[Sample], cache: Path | None = None) -> list[Sample]:
    """Each sample with its page's OCR text before the instruction (data.ocr_grounded_prompt),
    read once here so that training, and the test split phase 7 scores, see the text the
    server's OCR gives it (:func:`medvl.medical.ocr.grounded_prompt`), read by the runtime the
    server uses (api.ocr_backend, set by the caller with :func:`medvl.medical.ocr.use_backend`).

    The pages are read over worker processes (:func:`medvl.medical.ocr.read_pages`). With
    ``cache`` (a folder),
    each page's lines are kept there by the page's SHA-256 and the reader
    (:func:`medvl.medical.ocr.reader`), and a page read before is not read again: a rerun of
    phase 5 with other settings (a reviewed-records export, a split) read 1,500 pages again in
    404 s on a GPU host's 16 cores (docs/results/h200/README.md, run 3)."""
    from medvl.core.io import atomic_write_json
    from medvl.medical import ocr
    from medvl.medical.prompts import ocr_grounded

    ocr.load()  # raises OcrUnavailable here, once, rather than in every worker
    keys = [f"{ocr.reader()}-{hashlib.sha256(s.image_bytes).hexdigest()}" for s in samples]
    lines: dict[str, list[str]] = {}
    if cache is not None:
        for key in set(keys):
            path = cache / key[-2:] / f"{key}.json"
            if path.is_file():
                lines[key] = json.loads(path.read_text())["lines"]
    todo = {key: s.image_bytes for key, s in zip(keys, samples, strict=True) if key not in lines}
    if cache is not None and lines:
        log.info("OCR for grounded prompts: %d of %d pages read before (%s)", len(set(keys)) - len(todo),
                 len(set(keys)), cache)
    read = ocr.read_pages(list(todo.values()), "OCR for grounded prompts") if todo else []
    for key, page_lines in zip(todo, read, strict=True):
        lines[key] = page_lines
        if cache is not None:
            atomic_write_json(cache / key[-2:] / f"{key}.json", {"lines": page_lines})
    return [replace(s, prompt=ocr_grounded(s.prompt, lines[key])) for s, key in zip(samples, keys, strict=True)]


def drop_too_long(samples: list[Sample], processor: Any, max_length: int) -> tuple[list[Sample], dict[str, Any]]:
    """Keep the samples whose prompt, image and answer fit ``max_length``; report the rest.

    Counted once, here, with the training processor's arithmetic (:func:`medvl.training.trainer.token_count`),
    rather than in the collator, which runs in dataloader worker processes and on every epoch.
    A sample that does not fit is dropped rather than cut: a cut answer never trains its
    closing ``<|im_end|>``, so the model would learn not to stop.
    """
    from tqdm import tqdm

    from medvl.core.stats import summarize
    from medvl.training.trainer import token_count

    kept: list[Sample] = []
    lengths, trained = [], []
    too_long: Counter = Counter()
    examples = []
    for sample in tqdm(samples, desc="counting tokens", unit="sample", mininterval=5):
        with Image.open(io.BytesIO(sample.image_bytes)) as img:
            size = img.size
        total, answer = token_count(processor, conversation(sample, "")["messages"], size)
        lengths.append(float(total))
        trained.append(float(answer))
        if total <= max_length:
            kept.append(sample)
            continue
        too_long[sample.source] += 1
        if len(examples) < 5:
            examples.append({"id": sample.sample_id, "tokens": total})
    dropped = sum(too_long.values())
    return kept, {"max_length": max_length, "samples_checked": len(samples), "too_long": dropped,
                  "too_long_fraction": dropped / len(samples) if samples else 0.0,
                  "too_long_by_source": dict(too_long), "too_long_examples": examples,
                  "policy": "dropped, never cut (a cut answer never trains its closing <|im_end|>)",
                  "tokens": summarize(lengths), "answer_tokens": summarize(trained)}


def as_served(samples: list[Sample]) -> list[Sample]:
    """The test split's record pages asked what /extract asks (:data:`EXTRACTION_PROMPT`), so
    phase 7 scores the product's request and phase 8 can compare the server with it answer by
    answer; training keeps the varied prompts. Free-text samples keep theirs."""
    return [replace(s, prompt=EXTRACTION_PROMPT) if s.source == "synthetic" else s for s in samples]


def per_split(transform: Callable[[list[Sample]], list[Sample]],
              splits: dict[str, list[Sample]]) -> dict[str, list[Sample]]:
    """``transform`` over every split's samples at once (one pool of OCR workers, one length
    report), each split keeping its own transformed samples, in order; ``transform`` may drop
    samples but not reorder them."""
    everything = [(name, s) for name, rows in splits.items() for s in rows]
    out = transform([s for _, s in everything])
    if len(out) == len(everything):  # one result per sample (new objects, e.g. grounded prompts)
        names = [name for name, _ in everything]
    else:  # samples were dropped: the survivors are the very objects given
        where = {id(s): name for name, s in everything}
        names = [where[id(s)] for s in out]
    regrouped: dict[str, list[Sample]] = {name: [] for name in splits}
    for name, sample in zip(names, out, strict=True):
        regrouped[name].append(sample)
    return regrouped


def split(samples: list[Sample], seed: int, val_fraction: float, test_fraction: float) -> dict[str, list[Sample]]:
    """Shuffle with ``seed`` (order-independent: sorted by id first) and cut train/val/test.

    Whole groups move together (the pages of one transcription), so a split holds either all
    of a source document or none of it; test and val take groups until they reach their share.
    """
    groups: dict[str, list[Sample]] = {}
    for sample in sorted(samples, key=lambda s: s.sample_id):
        groups.setdefault(sample.group or sample.sample_id, []).append(sample)
    ordered = [groups[key] for key in sorted(groups)]
    random.Random(seed).shuffle(ordered)
    n = len(samples)
    wanted = {"test": max(1, round(n * test_fraction)) if n >= 3 else 0,
              "val": max(1, round(n * val_fraction)) if n >= 3 else 0}
    out: dict[str, list[Sample]] = {"test": [], "val": [], "train": []}
    for group in ordered:
        name = next((k for k in ("test", "val") if len(out[k]) < wanted[k]), "train")
        out[name].extend(group)
    return out


def conversation(sample: Sample, image_rel: str) -> dict[str, Any]:
    """The Qwen2.5-VL chat format: user (image + prompt), assistant (answer)."""
    return {
        "id": sample.sample_id,
        "source": sample.source,
        "image": image_rel,
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.prompt}]},
            {"role": "assistant", "content": [{"type": "text", "text": sample.answer}]},
        ],
    }


def write_splits(splits: dict[str, list[Sample]], formatted: Path) -> dict[str, list[dict[str, Any]]]:
    from medvl.core.io import atomic_write_bytes, atomic_write_json

    images = formatted / "images"
    images.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[dict[str, Any]]] = {}
    for name, samples in splits.items():
        rows = []
        for s in samples:
            rel = f"images/{s.sample_id}.{image_extension(s.image_bytes)}"
            atomic_write_bytes(formatted / rel, s.image_bytes)
            rows.append(conversation(s, rel))
        atomic_write_json(formatted / f"{name}.json", rows)
        out[name] = rows
    return out


def answer_stats(rows: list[dict[str, Any]]) -> dict[str, float]:
    from medvl.core.stats import summarize

    return summarize([float(len(r["messages"][1]["content"][0]["text"])) for r in rows])


def summarize_splits(splits: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    everything = [r for rows in splits.values() for r in rows]
    return {
        "counts": {name: len(rows) for name, rows in splits.items()},
        "counts_by_source": {name: dict(Counter(r["source"] for r in rows)) for name, rows in splits.items()},
        "prompt_distribution": dict(Counter(instruction_of(r["messages"][0]["content"][1]["text"])
                                            for r in everything).most_common()),
        "answer_chars": answer_stats(everything),
    }
