"""Measurement: the benchmark harness (phases 3, 4, 7), the record scorer with its bootstrap
intervals, phase 7's evaluation and baselines, and phase 9's report.
"""
