"""Serving fronts over the one scheduler loop: Triton (triton/) and the OpenAI-compatible server (openai/),
plus what they share with the CLI and the Python API - the frontend (frontend.py: text in, jobs out), text
assembly and stop strings (text.py) and chat templates (chat_template.py)."""
