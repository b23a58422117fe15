"""The results files of a run, made from its state (per seed and strategy: labeled ids and per-iteration
validation Dice): results.csv, per_case_dice.csv, summary.md (the paper's Table 1 with Wilcoxon tests) and,
with matplotlib, dice_curve.png (the paper's Fig. 2).
"""
import csv
import io
import warnings

import numpy as np

import data
import strategies


def write_csv(path, header, rows):
    text = io.StringIO()
    csv.writer(text).writerows([header] + [list(r) for r in rows])
    data.atomic_write_bytes(path, text.getvalue().encode())


def pseudo_label_report(out, rows, hu_band, spacing_mm):
    """pseudo_labels.csv from rows (case, voxels, Dice against its label or None); warns about empty ones.
    Returns a one-line summary for the log."""
    ml = [n * float(np.prod(spacing_mm)) / 1000 for _, n, _ in rows]
    write_csv(out / "pseudo_labels.csv", ["case", "voxels", "volume_ml", "dice_vs_label"],
              [(c, n, round(v, 1), "" if d is None else round(float(d), 3)) for (c, n, d), v in zip(rows, ml)])
    empty, dice = [c for c, n, _ in rows if n == 0], [d for _, _, d in rows if d is not None]
    if empty:
        warnings.warn(f"{len(empty)} case(s) have no voxel in the pseudo-label band; try --hu-band auto")
    return (f"pseudo labels (band {hu_band} HU): median {np.median(ml):.0f} ml, {len(empty)} empty"
            + (f" ({', '.join(empty[:10])})" if empty else "")
            + (f"; Dice against the validation labels: median {np.median(dice):.2f}, lowest {min(dice):.2f}"
               if dice else "") + " -> pseudo_labels.csv")


def records(state):
    """(strategy, seed, iteration counted from 1, record) of every finished iteration in the state."""
    return [(s, seed, j + 1, rec) for seed, by_s in state.items() for s, st in by_s.items()
            for j, rec in enumerate(st["iterations"])]


def write_reports(out, state, task, n_pool, left_out=None):
    """results.csv, per_case_dice.csv, summary.md (and dice_curve.png with matplotlib) in the folder `out`.

    state: {seed: {strategy: {"iterations": [record]}}} as in state/; task: data.read_task_info;
    n_pool: pool size (for pct_labeled); left_out: {case: why} of cases that could not be read.
    Returns the summary text.
    """
    names = [f"dice_{task['labels'].get(c, f'class{c}')}" for c in range(1, task["num_classes"])]
    header = ["strategy", "seed", "iteration", "n_labeled", "pct_labeled"] + names + ["mean_dice"]
    rows = [[s, seed, j, rec["n_labeled"], round(100.0 * rec["n_labeled"] / max(n_pool, 1), 2)]
            + [round(d, 4) for d in rec["dice"]] + [round(rec["mean_dice"], 4)] for s, seed, j, rec in records(state)]
    write_csv(out / "results.csv", header, rows)
    per_case = [[s, seed, j, c] + [round(x, 4) for x in d]
                for s, seed, j, rec in records(state) for c, d in rec["per_case"].items()]
    write_csv(out / "per_case_dice.csv", ["strategy", "seed", "iteration", "case"] + names, per_case)
    summary = summary_table(task["name"], header, rows) + "\n" + wilcoxon_table(state)
    if left_out:
        summary += (f"\n## {len(left_out)} case(s) left out: their files could not be read\n\n"
                    + "".join(f"- {c}: {why}\n" for c, why in sorted(left_out.items())))
    data.atomic_write_bytes(out / "summary.md", summary.encode())
    plot_curves(out, rows)
    return summary


def summary_table(task_name, header, rows):
    """Mean +- std over seeds of the last iteration's validation Dice, per strategy (the paper's Table 1)."""
    lines = [f"# {task_name}: validation Dice at the last iteration (mean +- std over seeds)", "",
             "| strategy | seeds | n_labeled | " + " | ".join(header[5:]) + " |", "|---" * (len(header) - 2) + "|"]
    for strategy in dict.fromkeys(r[0] for r in rows):
        last = max(r[2] for r in rows if r[0] == strategy)
        sel = [r for r in rows if r[0] == strategy and r[2] == last]
        dice = np.array([r[5:] for r in sel], float)
        cells = [f"{m:.4f} +- {s:.4f}" for m, s in zip(dice.mean(0), dice.std(0))]
        lines.append(f"| {strategy} | {len(sel)} | {sel[0][3]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def wilcoxon_table(state):
    """Wilcoxon signed-rank p-values of every strategy against the best one, on per-case mean foreground Dice
    at the last iteration, averaged over seeds (scipy). With n differing cases the exact two-sided test cannot
    give p below 2 / 2^n, so under 6 cases the table says so instead of printing a p-value."""
    from scipy.stats import wilcoxon
    per_case = {}
    for by_strategy in state.values():
        for strategy, st in by_strategy.items():
            for c, d in (st["iterations"][-1]["per_case"].items() if st["iterations"] else ()):
                per_case.setdefault(strategy, {}).setdefault(c, []).append(float(np.mean(d)))
    if len(per_case) < 2:
        return ""
    per_case = {s: {c: float(np.mean(v)) for c, v in cases.items()} for s, cases in per_case.items()}
    means = {s: np.mean(list(v.values())) for s, v in per_case.items()}
    best = max(means, key=means.get)
    lines = [f"## Wilcoxon signed-rank test against {best} (per-case mean foreground Dice, last iteration)", "",
             "| strategy | mean Dice | p-value |", "|---|---|---|"]
    for s in sorted(means, key=lambda s: -means[s]):
        common = sorted(set(per_case[s]) & set(per_case[best]))
        a, b = [per_case[s][c] for c in common], [per_case[best][c] for c in common]
        n = int(np.count_nonzero(np.subtract(a, b)))
        if s == best:
            cell = "-"
        elif 2.0 / 2 ** n >= 0.05:
            cell = f"not testable: {n} differing cases (p < 0.05 needs at least 6)"
        else:
            cell = f"{wilcoxon(a, b).pvalue:.3g}"
        lines.append(f"| {s} | {means[s]:.4f} | {cell} |")
    return "\n".join(lines) + "\n"


def _semi(name):
    """Whether a strategy named in a state file is semi-supervised (a name from an older version: False)."""
    try:
        return strategies.parse(name).semi
    except ValueError:
        return False


def plot_curves(out, rows):
    """Dice against percent labeled: solid supervised, dashed semi-supervised (the paper's Fig. 2)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:     # optional: the CSV files hold the same numbers
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy in dict.fromkeys(r[0] for r in rows):
        pts = {}
        for r in rows:
            if r[0] == strategy:
                pts.setdefault(r[4], []).append(r[-1])
        x = sorted(pts)
        ax.plot(x, [np.mean(pts[p]) for p in x], "--" if _semi(strategy) else "-", marker="o", label=strategy)
    ax.set(xlabel="% of pool labeled", ylabel="validation mean Dice")
    ax.legend(fontsize=7)
    fig.tight_layout()
    data.atomic_write(out / "dice_curve.png", lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
