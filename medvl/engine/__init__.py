"""Serving engine (as vLLM's ``engine/``): the continuous-batching scheduler, the slot KV cache
and its compiled decoding step, grammar masks for JSON schemas, image decoding and checks, and
the loader that builds and warms the engine before traffic.
"""
