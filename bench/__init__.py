"""Measurement and test tooling, outside the product package (as vLLM keeps ``benchmarks/``).

Benchmarks (``perf_*.py``), the reliability run, the endpoint checker phase 8 and the tests
share (``validate.py``), the GPU scripts (``device/``). Everything here imports medvl's public
helpers; nothing in ``medvl/`` or ``api/`` imports from here.
"""
