"""Model shapes of the released family (docs/model.md) and a tiny one for tests.

`random-checkpoint` and the benchmarks build checkpoints from these, so real-shape measurements need no
download.
"""

from __future__ import annotations

from typing import Any

_YARN = {
    "rope_type": "yarn",
    "rope_theta": 1_000_000.0,
    "factor": 16.0,
    "original_max_position_embeddings": 16384,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "llama_4_scaling_beta": 0.1,
}

_COMMON: dict[str, Any] = {
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 131072,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 11,
    "mask_token_id": 100,
    "block_size": 32,
    "max_position_embeddings": 262144,
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        **_COMMON,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 256,
        "block_size": 8,
        "max_position_embeddings": 4096,
        "rope_parameters": {**_YARN, "original_max_position_embeddings": 64},
    },
    "3b": {**_COMMON, "hidden_size": 3072, "num_hidden_layers": 26, "intermediate_size": 9216,
           "rope_parameters": dict(_YARN)},
    "8b": {**_COMMON, "hidden_size": 4096, "num_hidden_layers": 34, "intermediate_size": 14336,
           "rope_parameters": dict(_YARN)},
    "14b": {**_COMMON, "hidden_size": 5120, "num_hidden_layers": 40, "intermediate_size": 16384,
            "rope_parameters": {**_YARN, "rope_theta": 1_000_000_000.0}},
}

SIZE_FIELDS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
               "num_key_value_heads", "head_dim", "vocab_size")
