#!/usr/bin/env python3
"""Where the fine-tuned model's answer loss sits: per answer token, on validation rows.

Why: the `small` profile's LoRA loss stopped near 2.0 whatever its rank or steps (issue 43);
this says whether that loss is spread over every token or sits on a few kinds (names, digits,
structure) and whether those tokens' text is in the prompt (a copying failure) or not.

    python bench/token_loss.py --workdir /tmp/run-small --model models/small-qwen25-vl-medical-merged --rows 64 --out loss.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from medvl.core.settings import load_settings
from medvl.core.workdir import Workdir
from medvl.model.loading import load_model, load_processor
from medvl.training.trainer import IGNORE_INDEX, VisionChatCollator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--model", required=True, help="model folder, relative to the workdir")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    settings = load_settings("small")
    wd = Workdir.at(args.workdir)
    model_dir = args.workdir / args.model
    processor = load_processor(model_dir, settings, padding_side="right")
    model = load_model(model_dir, settings, dtype=torch.bfloat16).eval()
    formatted = wd.datasets / "formatted"
    rows = json.loads((formatted / "val.json").read_text())[: args.rows]
    collator = VisionChatCollator(processor, settings.train.max_length, formatted)
    tok = processor.tokenizer
    by_kind: dict[str, list[float]] = defaultdict(list)
    examples = []
    for start in range(0, len(rows), 8):
        batch = collator(rows[start:start + 8])
        labels = batch.pop("labels")
        batch = {k: v.to(model.device) for k, v in batch.items()}
        with torch.no_grad():
            logits = model(**batch).logits.float()
        for i in range(logits.shape[0]):
            ids = batch["input_ids"][i]
            target = labels[i, 1:].to(model.device)
            mask = target != IGNORE_INDEX
            loss = torch.nn.functional.cross_entropy(logits[i, :-1][mask], target[mask], reduction="none")
            prompt_text = tok.decode(ids[: int(mask.nonzero()[0])])
            answer_ids = target[mask].tolist()
            pieces = [tok.decode([t]) for t in answer_ids]
            for piece, value in zip(pieces, loss.tolist(), strict=True):
                stripped = piece.strip()
                kind = ("structure" if not stripped or all(c in '{}[]":,' for c in stripped)
                        else "digits" if any(c.isdigit() for c in stripped)
                        else "in_prompt" if stripped in prompt_text
                        else "not_in_prompt")
                by_kind[kind].append(value)
            if len(examples) < 3:
                examples.append({"prompt_tail": prompt_text[-1500:],
                                 "tokens": [[p, round(v, 2)] for p, v in zip(pieces, loss.tolist(), strict=True)]})
    summary = {kind: {"tokens": len(v), "mean_loss": sum(v) / len(v), "share_of_loss": sum(v)}
               for kind, v in by_kind.items()}
    total = sum(s["share_of_loss"] for s in summary.values())
    for s in summary.values():
        s["share_of_loss"] /= total
    args.out.write_text(json.dumps({"model": args.model, "rows": len(rows), "by_kind": summary,
                                    "examples": examples}, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
