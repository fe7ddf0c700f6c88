"""trimode as an NVIDIA Dynamo backend (`trimode serve ENGINE --api dynamo`, docs/scale-out.md).

events.py   the page allocator's published pages as Dynamo KV events (stored / removed, the same hash chain)
requests.py Dynamo's token-in/token-out request as trimode `Settings`, and results as Dynamo chunks
worker.py   the `LLMEngine` of one served model (a mode of the engine) and the deployment serving them all

Only worker.py imports `dynamo` (installed by `make dynamo`); the other two are plain Python.
"""
