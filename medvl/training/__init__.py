"""Training: the data of phase 5 (sources, filters, lengths, splits) and the QLoRA trainer of
phase 6 (collator, masking, resume).
"""
