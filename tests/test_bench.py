"""`trimode bench` smoke test on a tiny random checkpoint (structure and parity checks, no timing thresholds)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from trimode.cli import cli


def test_bench_json_report_with_peers(tiny_checkpoint):
    result = CliRunner().invoke(cli, ["bench", "--model", str(tiny_checkpoint), "--runs", "1", "--warmup", "0",
                                      "--max-new-tokens", "16", "--batch-size", "2", "--peers", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    modes = report["modes"]
    assert set(modes) == {"ar", "diffusion", "spec", "quad"}
    for row in modes.values():
        assert row["tokens"] > 0 and row["forwards"] > 0 and row["tokens_per_s"] > 0
        assert "prefill" in row["step_latency_ms"]
    assert modes["spec"]["matches_ar"] is True  # speculation is AR-exact under greedy decoding
    assert modes["quad"]["matches_ar"] is True
    # AR: 16 tokens each, 1 prefill + 15 decodes each
    assert modes["ar"]["forwards"] == 32 and modes["ar"]["tokens_per_forward"] == round(32 / 30, 3)
    peers = report["peers"]
    assert peers["hf_generate"]["greedy_tokens_match_ours"] is True
    assert {"reference_loops_ar", "reference_loops_diffusion", "reference_loops_spec",
            "reference_loops_quad"} <= set(peers)


def test_bench_runs_each_block_mode_per_block_length(tiny_checkpoint):
    result = CliRunner().invoke(cli, ["bench", "--model", str(tiny_checkpoint), "--runs", "1", "--warmup", "0",
                                      "--max-new-tokens", "8", "--modes", "ar,spec,quad", "--block-length",
                                      "2,4,auto", "--json"])
    assert result.exit_code == 0, result.output
    modes = json.loads(result.output)["modes"]
    assert set(modes) == {"ar", "spec@2", "spec@4", "spec@auto", "quad@2", "quad@4", "quad@auto"}
    assert all(modes[name]["matches_ar"] is True for name in modes if name != "ar")


def test_bench_rejects_unknown_mode(tiny_checkpoint):
    result = CliRunner().invoke(cli, ["bench", "--model", str(tiny_checkpoint), "--modes", "ar,beam"])
    assert result.exit_code == 2 and "unknown mode(s) beam" in result.output
