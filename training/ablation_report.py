"""Aggregate balancing-ablation results (``training.evaluate`` JSONs) into a Markdown report
and a plot. Used by ``training.gan_ablation``; kept apart so it can be tested on made-up
numbers and rerun on finished runs without training anything."""
from __future__ import annotations

import statistics
import time
from pathlib import Path


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def metric_names(cut_classes: list[str]) -> list[tuple[str, str]]:
    """(key, column title) of every reported metric."""
    return [("accuracy", "accuracy"), ("macro_f1", "macro-F1")] + \
        [(f"recall/{c}", f"recall {c}") for c in cut_classes]


def metric_value(result: dict, key: str) -> float:
    """One metric out of an evaluate JSON."""
    if key.startswith("recall/"):
        return float(result["per_class"][key.split("/", 1)[1]]["recall"])
    return float(result[key])


def aggregate(results: dict[str, dict[int, dict]], cut_classes: list[str]) -> dict[str, dict]:
    """{mode: {metric: (mean, std), "seeds": [...]}} over the seeds each mode finished."""
    table = {}
    for mode, by_seed in results.items():
        if not by_seed:
            continue
        row = {"seeds": sorted(by_seed)}
        for key, _ in metric_names(cut_classes):
            row[key] = mean_std([metric_value(r, key) for r in by_seed.values()])
        table[mode] = row
    return table


def verdict(table: dict[str, dict]) -> str:
    """One line, computed from the numbers: does gan beat reweight on mean macro-F1?"""
    if "gan" not in table or "reweight" not in table:
        return "Verdict: not computable (needs finished 'gan' and 'reweight' runs)."
    (gan, gan_sd), (rew, rew_sd) = table["gan"]["macro_f1"], table["reweight"]["macro_f1"]
    diff = gan - rew
    word = "beats" if diff > 0 else "does not beat"
    caution = " - within one standard deviation, so not conclusive" if abs(diff) <= max(gan_sd, rew_sd) else ""
    best = max(table, key=lambda mode: table[mode]["macro_f1"][0])
    gap = gan - table[best]["macro_f1"][0]
    overall = ("gan is also the best mode." if best == "gan" else
               f"The best mode on mean macro-F1 is {best} ({table[best]['macro_f1'][0]:.4f}; gan {gap:+.4f}).")
    return (f"Verdict: gan {word} reweight on macro-F1 (mean {gan:.4f} vs {rew:.4f}, difference {diff:+.4f} "
            f"over {len(table['gan']['seeds'])} vs {len(table['reweight']['seeds'])} seeds){caution}. {overall}")


def plot(table: dict[str, dict], cut_classes: list[str], path: Path) -> Path:
    """Grouped bars (one group per metric, one bar per mode) with std error bars."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display on a server
    import matplotlib.pyplot as plt

    names = metric_names(cut_classes)
    modes = list(table)
    width = 0.8 / max(1, len(modes))
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(names), 3.8), dpi=120)
    for i, mode in enumerate(modes):
        xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, [table[mode][k][0] for k, _ in names], width, yerr=[table[mode][k][1] for k, _ in names],
               capsize=3, label=f"{mode} (n={len(table[mode]['seeds'])})")
    ax.set_xticks(range(len(names)), [title for _, title in names])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("validation score (mean ± std over seeds)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def markdown(table: dict[str, dict], cut_classes: list[str], context: dict, commands: list[str],
             plot_name: str) -> str:
    """The report text: settings, table, plot, verdict, warnings and exact commands."""
    names = metric_names(cut_classes)
    lines = ["# GAN balancing ablation (issue 4)", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M')} by `python -m training.gan_ablation`; numbers are on "
             f"`{context.get('val')}`, mean ± sample std over seeds.", "",
             "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in context.get("settings", {}).items()]
    lines += ["", "| mode | seeds | " + " | ".join(t for _, t in names) + " |",
              "|---|---|" + "---|" * len(names)]
    for mode, row in table.items():
        cells = " | ".join(f"{row[k][0]:.4f} ± {row[k][1]:.4f}" for k, _ in names)
        lines.append(f"| {mode} | {','.join(map(str, row['seeds']))} | {cells} |")
    lines += ["", f"![ablation]({plot_name})", "", verdict(table), "",
              "How to read it: every run uses the same short schedule and the same real images (cut seed "
              "above), so the table compares balancing modes; its absolute accuracy is far below a full "
              "training run's. The spread is over training seeds. In gan mode each epoch also holds the "
              "synthetic images, so those runs take proportionally more optimiser steps.", ""]
    if context.get("warnings"):
        lines += ["## Warnings", ""] + [f"- {w}" for w in context["warnings"]] + [""]
    lines += ["## Commands", "", "```sh"] + commands + ["```", ""]
    return "\n".join(lines)


def write_report(results: dict[str, dict[int, dict]], cut_classes: list[str], context: dict,
                 commands: list[str], report: Path) -> dict:
    """Write REPORT (.md) and the plot beside it (.png); returns the aggregated table."""
    table = aggregate(results, cut_classes)
    png = plot(table, cut_classes, report.with_suffix(".png")) if table else None
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(markdown(table, cut_classes, context, commands, png.name if png else ""))
    return table
