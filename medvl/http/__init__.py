"""The HTTP layer (as vLLM's ``entrypoints/openai/``): the app factory and server, routes, the
OpenAI-compatible chat, request and response schemas, errors, shared state, metrics, upload
limits, the endpoint checker phase 8 runs, and the Gradio demo.
"""
