"""Plot tokens per forward and tokens/s per mode and block length from `trimode bench --output` reports.

    pip install matplotlib
    python benchmarks/plot_modes.py benchmarks/results_modes_b1.json benchmarks/results_modes_b4.json \
        -o benchmarks/modes_demo.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def series(report: dict) -> dict[str, dict[str, tuple[float, float]]]:
    """mode -> block length -> (tokens per forward, tokens/s)."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for name, row in report["modes"].items():
        mode, _, length = name.partition("@")
        out.setdefault(mode, {})[length or "-"] = (row["tokens_per_forward"], row["tokens_per_s"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = [json.loads(p.read_text()) for p in args.reports]
    fig, axes = plt.subplots(len(reports), 2, figsize=(11, 3.6 * len(reports)), squeeze=False)
    for row_axes, report in zip(axes, reports, strict=True):
        data = series(report)
        lengths = sorted({k for v in data.values() for k in v if k != "-"}, key=lambda k: (k == "auto", k.zfill(4)))
        ar_tpf, ar_tps = data.get("ar", {}).get("-", (1.0, 0.0))
        for column, (index, label) in enumerate(((0, "tokens per forward"), (1, "tokens / s"))):
            ax = row_axes[column]
            width = 0.38
            for shift, mode in ((-width / 2, "spec"), (width / 2, "quad")):
                values = [data.get(mode, {}).get(k, (0, 0))[index] for k in lengths]
                bars = ax.bar([i + shift for i in range(len(lengths))], values, width, label=mode)
                ax.bar_label(bars, fmt="%.2f" if index == 0 else "%.0f", fontsize=7)
            ax.axhline(ar_tpf if index == 0 else ar_tps, color="gray", linestyle="--", label="ar")
            ax.set_xticks(range(len(lengths)), [f"L={k}" for k in lengths])
            ax.set_title(f"{label}, batch {report['batch_size']} ({report['date']}, {report['threads']} thread)")
            ax.legend(fontsize=8)
    fig.suptitle("demo model, held-out prompts, 64 new tokens, greedy (tokens equal AR's in every bar)")
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
