"""Measurement and test tooling, outside the product package (as vLLM keeps ``benchmarks/``).

Benchmarks (``perf_*.py``), the reliability and soak runs, the GPU scripts (``device/``). The
endpoint checker that phase 8 and the tests share is inside the package
(``medvl/http/validate.py``), since a phase runs it.
Everything here imports medvl; nothing in ``medvl/`` imports from here (an import contract).
"""
