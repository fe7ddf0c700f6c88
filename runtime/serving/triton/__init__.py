"""Triton Inference Server: the Python-backend model (model.py), its request parser (request.py), the model
repository writer (repo.py) and the bundled tritonserver's process (server.py)."""
