"""The model and its forms: hub snapshot or offline stand-in (with Qwen2.5's tokenizer), loading,
the vision tower's batched windows, fused projections, int4 kernels, quantization (AWQ, NF4),
the served form chosen in one place, and memory and logits measurements of a loaded model.
"""
