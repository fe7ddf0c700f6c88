"""The OpenAI-compatible HTTP server: FastAPI app (server.py), request bodies (protocol.py), metrics."""
