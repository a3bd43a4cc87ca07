"""The PNG of a throughput result: decode tokens/s and KV held in memory, per system, for each
(context, batch, storage profile) of the run.

    python -m benchmarks.throughput_plot results/throughput.json     # writes results/throughput.png
(benchmarks/throughput.py writes it beside its JSON itself.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    # Stock rows (no budget) hold everything: one stands for every profile and budget of its
    # (context, batch).
    case = lambda r: (r["context"], r["batch"], r.get("profile") or "native", r.get("budget_tokens") or 0)  # noqa: E731
    cases = sorted({case(r) for r in rows if r.get("budget_tokens")} or {case(r) for r in rows})
    systems = list(dict.fromkeys(r["system"] for r in rows))
    value = {(r["system"], *case(r)): r for r in rows}
    held_all = {(r["system"], r["context"], r["batch"]): r for r in rows if not r.get("budget_tokens")}
    sweep = len({c[3] for c in cases}) > 1
    one_setting = len({c[:3] for c in cases}) == 1  # a budget sweep of one (context, batch, profile)
    width = 0.8 / len(systems)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, key, title in zip(axes, ("tokens_per_s", "kv_memory_mb"), ("decode tokens/s", "KV held in memory, MB")):
        for i, system in enumerate(systems):
            ys = [(value.get((system, *c)) or held_all.get((system, *c[:2])) or {}).get(key) or 0 for c in cases]
            ax.bar([x + i * width for x in range(len(cases))], ys, width, label=system)
        ax.set_xticks([x + width * (len(systems) - 1) / 2 for x in range(len(cases))],
                      [_label(c, sweep, one_setting) for c in cases])
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    setting = f"{cases[0][0]} tokens x {cases[0][1]}, " if sweep and one_setting else ""
    fig.suptitle(f"{result.get('engine', 'vllm')} engine, {setting}M={result.get('budget_tokens')} tokens, "
                 f"{result.get('max_new_tokens')} new tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _label(case: tuple, sweep: bool, one_setting: bool) -> str:
    context, batch, profile, budget = case
    parts = [] if sweep and one_setting else [f"{context} tok x {batch}"]
    if profile != "native":
        parts.append(profile)
    if sweep:
        parts.append(f"M={budget}")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    src = Path(args[0])
    plot(json.loads(src.read_text()), src.with_suffix(".png"))
    print(src.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
