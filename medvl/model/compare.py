"""How far one form of a model is from another: next-token logits on the same pages.

Phase 4 compares each 4-bit form with the full-precision model this way (relative L2 of the
logits and whether the top token is the same), so the cost of quantizing is a number.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from medvl.model.loading import input_device


def build_inputs(processor: Any, images: list[Image.Image], prompts: list[str], device: torch.device) -> Any:
    """Chat template + processor for a batch of (image, prompt) user turns."""
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
        add_generation_prompt=True) for p in prompts]
    return processor(text=texts, images=images, padding=True, return_tensors="pt").to(device)


def next_token_logits(model: Any, processor: Any, pages: list[tuple[Path, str]]) -> list[torch.Tensor]:
    """Each (page image, prompt)'s next-token logits after the prompt (one forward pass each), float32."""
    logits = []
    for image_path, prompt in pages:
        with Image.open(image_path) as image:
            inputs = build_inputs(processor, [image.convert("RGB")], [prompt], input_device(model))
        with torch.inference_mode():
            logits.append(model(**inputs).logits[0, -1].float().cpu())
    return logits


def relative_l2(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """||candidate - reference|| / ||reference||: how far a form's logits are from the reference's."""
    candidate, reference = candidate.float().cpu(), reference.float().cpu()
    return float((candidate - reference).norm() / reference.norm())


def logits_agreement(candidate: list[torch.Tensor], reference: list[torch.Tensor]) -> dict[str, Any]:
    """Per-document relative L2 of next-token logits, and how many top tokens are the same."""
    errors = [relative_l2(c, r) for c, r in zip(candidate, reference, strict=True)]
    same_top = sum(int(c.argmax()) == int(r.argmax()) for c, r in zip(candidate, reference, strict=True))
    return {"relative_l2": errors, "relative_l2_mean": sum(errors) / len(errors), "relative_l2_max": max(errors),
            "same_top_token": same_top, "documents": len(errors)}
