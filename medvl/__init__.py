"""medvl: a phase-gated pipeline that quantizes, QLoRA-fine-tunes, benchmarks and serves
Qwen2.5-VL-7B-Instruct for medical document understanding.

Every phase script in ``scripts/`` and the API import their logic from here, so nothing
that decides a number or a file layout lives in two places.
"""

__version__ = "0.1.0"
