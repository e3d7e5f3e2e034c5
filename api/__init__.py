"""The HTTP API (FastAPI) and the demo UI (Gradio)."""
