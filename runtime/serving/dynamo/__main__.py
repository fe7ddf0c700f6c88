"""`python -m trimode.runtime.serving.dynamo ENGINE [--mode M]`: one served model through Dynamo's own `run()`
(`trimode serve ENGINE --api dynamo` serves every mode in one process)."""

from dynamo.common.backend.run import run

from .worker import TrimodeLLMEngine

if __name__ == "__main__":
    run(TrimodeLLMEngine)
