"""The medical domain: the extraction record and its schema, the lexicon and its tables, the
plausibility flags, the synthetic document generator and evaluation suite, prompts, and the OCR
rules baseline. Knows nothing of models, engines or phases.
"""
