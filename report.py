"""The results files of a run, made from its state (per seed and strategy: labeled ids and per-iteration
validation Dice): results.csv, per_case_dice.csv, summary.md (the paper's Table 1, the all-data reference and
Wilcoxon tests of all pairs), wilcoxon.csv and, with matplotlib, dice_curve.png (the paper's Fig. 2);
budget.csv (Dice against the voxels annotated so far) and, for a run of region queries (--query patch), the
area under that curve (AUBC) in summary.md and a budget axis in dice_curve.png.

Dice follows MONAI's DiceMetric with ignore_empty=True, as the paper computed it: a class absent from a
case's label has no Dice (NaN) for that case, and a mean over cases uses only the cases where it is present.
"""
import csv
import dataclasses
import io
import warnings

import numpy as np

import files
import regions
import strategies
from train import fmt_s


def write_csv(path, header, rows):
    text = io.StringIO()
    csv.writer(text).writerows([header] + [list(r) for r in rows])
    files.atomic_write_bytes(path, text.getvalue().encode())


BAND_MISSES = 0.1  # a median pseudo-label Dice below this: the band finds something else than the labeled organ


def band_from_labels(hu):
    """A pseudo-label band from the HU inside labeled foreground (its 25th-75th percentile): "LO,HI"."""
    lo, hi = np.percentile(hu, [25, 75])
    return f"{np.floor(lo):.0f},{max(np.ceil(hi), np.floor(lo) + 1):.0f}"


def pseudo_label_report(out, rows, hu_band, spacing_mm, labeled_hu=None):
    """pseudo_labels.csv from rows (case, voxels, Dice against its label or None); warns about empty ones and
    a band that misses the labeled organ, suggesting a band from labeled_hu() (the HU inside the validation
    labels' foreground), computed only then. Returns a one-line summary for the log."""
    ml = [n * float(np.prod(spacing_mm)) / 1000 for _, n, _ in rows]
    write_csv(out / "pseudo_labels.csv", ["case", "voxels", "volume_ml", "dice_vs_label"],
              [(c, n, round(v, 1), "" if d is None else round(float(d), 3)) for (c, n, d), v in zip(rows, ml)])
    empty = [c for c, n, _ in rows if n == 0]
    dice = [d for _, _, d in rows if d is not None and not np.isnan(d)]    # NaN: a label without foreground
    misses = bool(dice) and np.median(dice) < BAND_MISSES
    suggest = ""
    if empty or misses:
        hu = labeled_hu() if labeled_hu else np.zeros(0)
        own = (f"--hu-band {band_from_labels(hu)} (the 25th-75th percentile of HU inside the validation labels' "
               "foreground)") if hu.size else ""
        suggest = " or ".join(([] if hu_band == "auto" else ["--hu-band auto"]) + ([own] if own else [])) \
            or "--hu-band LO,HI around the organ's HU"
    if empty:
        warnings.warn(f"{len(empty)} case(s) have no voxel in the pseudo-label band; try {suggest}")
    if misses:
        warnings.warn(f"the pseudo-label band {hu_band} HU misses the labeled organ: its Dice against the validation "
                      f"labels is {np.median(dice):.2f} (median of {len(dice)}), so the proxy learns another "
                      f"structure. Try {suggest} (pseudo_labels.csv lists each case)")
    return (f"pseudo labels (band {hu_band} HU): median {np.median(ml):.0f} ml, {len(empty)} empty"
            + (f" ({', '.join(empty[:10])})" if empty else "")
            + (f"; Dice against the validation labels: median {np.median(dice):.2f}, lowest {min(dice):.2f}"
               if dice else "") + " -> pseudo_labels.csv")


def records(state):
    """(strategy, seed, iteration counted from 1, state.Record) of every finished iteration in the state."""
    return [(s, seed, j + 1, rec) for seed, by_s in state.items() for s, st in by_s.items()
            for j, rec in enumerate(st.iterations)]


def kind(name):
    """strategies.parse(name); a name it does not know (an older state file) counts as a supervised strategy."""
    try:
        return strategies.parse(name)
    except ValueError:
        return strategies.Strategy(name, proxy=False, acquisition="unknown", semi=False)


def display_name(name):
    """A strategy's name in tables, the all-data reference and the oracles (they read labels not yet
    acquired) marked."""
    return f"{name} (reference)" if kind(name).reference else f"{name} (oracle)" if kind(name).oracle else name


def nanmean(values, axis=None):
    """np.nanmean without its warning: NaN where every value is NaN (a class absent from every case)."""
    values = np.asarray(values, float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis) if values.size else np.nan


def cell(x, digits=4):
    """A Dice value for the CSV files: rounded; NaN (or None) stays NaN, which csv writes as "nan"."""
    return float("nan") if x is None else round(float(x), digits)


def write_reports(out, state, task, n_pool, left_out=None, plot=True, times=None):
    """results.csv, per_case_dice.csv, wilcoxon.csv, summary.md (and dice_curve.png with matplotlib, if `plot`)
    in `out`.

    state: {seed: {strategy: state.RunState}} (run_folder.read_states), a Record's per_case {case: per-class Dice}
    holding NaN for a class absent from the case's label; task: folders.read_task_info; n_pool: pool size (for
    pct_labeled: of the pool's cases, or in a patch run of its voxels); left_out: {case: why} of cases that could
    not be read; times: run_folder.read_times. A NaN is written "nan" in the CSV files; per_case_dice.csv's
    mean_dice is the mean over the classes present in the case. Returns the summary text.
    """
    class_names = [task["labels"].get(c, f"class{c}") for c in range(1, task["num_classes"])]
    names = [f"dice_{n}" for n in class_names]
    header = ["strategy", "seed", "iteration", "n_labeled", "pct_labeled"] + names + ["mean_dice"]
    pct = lambda rec: (100.0 * rec.voxels / rec.pool_voxels if rec.pool_voxels is not None       # patch runs
                       else 100.0 * rec.n_labeled / max(n_pool, 1))
    rows = [[s, seed, j, rec.n_labeled, round(pct(rec), 2)]
            + [cell(d) for d in rec.dice] + [cell(rec.mean_dice)] for s, seed, j, rec in records(state)]
    tested, validation = test_view(state), state    # --n-test: the Dice of cases that chose nothing
    if tested:
        test_rows = [r[:5] + [cell(d) for d in rec.dice] + [cell(rec.mean_dice)]
                     for r, (_, _, _, rec) in zip(rows, records(tested))]
        write_csv(out / "results.csv", header + [f"test_{n}" for n in header[5:]],
                  [r + t[5:] for r, t in zip(rows, test_rows)])
        rows, state = test_rows, tested  # the tables below: the test cases
    else:
        write_csv(out / "results.csv", header, rows)
    write_per_case(out, state, names, validation if tested else None)
    matrix = wilcoxon_matrix(state)
    order, _, p = matrix
    write_csv(out / "wilcoxon.csv", ["strategy"] + [display_name(s) for s in order],
              [[display_name(a)] + ["" if a == b else "n/a" if p[a, b] is None else f"{p[a, b]:.6g}" for b in order]
               for a in order])
    budget = [[s, seed, j, rec.n_labeled, rec.voxels, rec.fg_voxels, cell(rec.mean_dice)]
              for s, seed, j, rec in records(state) if rec.voxels is not None]
    if budget:
        write_csv(out / "budget.csv", ["strategy", "seed", "iteration", "n_labeled", "voxels", "fg_voxels",
                                       "mean_dice"], budget)
    patch = any(rec.pool_voxels is not None for *_, rec in records(state))      # a run of boxes (--query patch)
    summary = (summary_table(task["name"], header, rows, "test" if tested else "validation")
               + empty_note(state, class_names) + "\n"
               + (budget_table(budget) + "\n" if patch else "")
               + wilcoxon_table(matrix, "test" if tested else "validation"))
    if times:
        summary += "\n" + time_table(times)
    if left_out:
        summary += (f"\n## {len(left_out)} case(s) left out: their files could not be read\n\n"
                    + "".join(f"- {c}: {why}\n" for c, why in sorted(left_out.items())))
    files.atomic_write_bytes(out / "summary.md", summary.encode())
    if plot:
        plot_curves(out, budget if patch else rows, "voxels" if patch else "pct")
    return summary


def time_table(times):
    """Markdown: the wall time of each stage (run_folder.read_times: every process's, summed) and its share."""
    wall, stages = times["wall"], sorted(times["stages"].items(), key=lambda kv: (kv[0] == "other", -kv[1]))
    lines = ["## Where the time went", "", "| stage | wall | share |", "|---|---|---|"]
    lines += [f"| {stage} | {fmt_s(s)} | {100 * s / max(wall, 1e-9):.1f} % |" for stage, s in stages]
    lines += [f"| total | {fmt_s(wall)} | 100 % |", "",
              f"Wall seconds of {times['processes']} process(es) (ranks and reruns summed); a stage inside another "
              "counts once; other: start-up, checks, the queue and waits."]
    return "\n".join(lines) + "\n"


def test_view(state):
    """The state with each record's test Dice (--n-test) in place of its validation Dice, or None without one."""
    if not any(rec.test is not None for *_, rec in records(state)):
        return None
    return {seed: {s: dataclasses.replace(st, iterations=[r.with_test_dice() for r in st.iterations])
                   for s, st in by_s.items()} for seed, by_s in state.items()}


def write_per_case(out, state, names, validation=None):
    """per_case_dice.csv: a row per (strategy, seed, iteration, case); with a test set (`validation`: the state
    of the validation Dice, `state` that of the test Dice) a column `set` says which."""
    rows = lambda st, kind: [[s, seed, j, c] + [cell(x) for x in d] + [cell(nanmean(d))] + kind
                             for s, seed, j, rec in records(st) for c, d in rec.per_case.items()]
    header = ["strategy", "seed", "iteration", "case"] + names + ["mean_dice"]
    if validation is None:
        return write_csv(out / "per_case_dice.csv", header, rows(state, []))
    write_csv(out / "per_case_dice.csv", header + ["set"], rows(validation, ["validation"]) + rows(state, ["test"]))


def budget_table(budget):
    """AUBC (regions.aubc: the area under the Dice-against-annotated-voxels curve, over the budget range every
    (strategy, seed) reached, divided by its width) and the last iteration's Dice, mean +- std over seeds.
    budget: budget.csv's rows. The reference is left out (it has one point)."""
    runs = {}
    for s, seed, j, n, voxels, fg, dice in budget:
        if not kind(s).reference:
            runs.setdefault((s, seed), []).append((voxels, fg, dice))
    runs = {key: pts for key, pts in runs.items() if len(pts) > 1}
    if not runs:
        return ""
    lo, hi = max(p[0][0] for p in runs.values()), min(p[-1][0] for p in runs.values())
    lines = [f"## Budget: Dice against annotated voxels (AUBC over {lo}-{hi} voxels, the range every run reached)",
             "", "| strategy | seeds | voxels (last) | foreground share | AUBC | final mean_dice |",
             "|---|---|---|---|---|---|"]
    for s in dict.fromkeys(key[0] for key in runs):
        pts = [p for key, p in runs.items() if key[0] == s]
        area = [regions.aubc([v for v, _, _ in p], [d for _, _, d in p], lo, hi) if lo < hi and
                all(np.isfinite(d) for _, _, d in p) else np.nan for p in pts]
        share = np.mean([p[-1][1] / p[-1][0] for p in pts])
        lines.append(f"| {display_name(s)} | {len(pts)} | {np.mean([p[-1][0] for p in pts]):.0f} | {share:.3f} | "
                     f"{spread(area)} | {spread([p[-1][2] for p in pts])} |")
    return "\n".join(lines + ["", "AUBC: the area under the curve of validation mean Dice against the voxels "
                               "annotated so far (linear between iterations), divided by the range's width: a "
                               "constant Dice d gives d (Zhan et al., IJCAI 2021). n/a: a run without a Dice."]) + "\n"


def summary_table(task_name, header, rows, cases="validation"):
    """Mean +- std over seeds of the last iteration's validation Dice, per strategy (the paper's Table 1), and
    the all-data reference (strategy `full`) in a table of its own under it. A seed's class Dice is already
    the mean over the cases where the class is present; std has ddof 1 (the sample std), "-" for one seed."""
    columns = " | ".join(header[5:])
    table = lambda: ["| strategy | seeds | n_labeled | " + columns + " |", "|---" * (len(header) - 2) + "|"]
    main, ref, single = table(), table(), False
    for strategy in dict.fromkeys(r[0] for r in rows):
        last = max(r[2] for r in rows if r[0] == strategy)
        sel = [r for r in rows if r[0] == strategy and r[2] == last]
        dice = np.array([r[5:] for r in sel], float)                      # (seeds, classes + 1)
        cells = [spread(col) for col in dice.T]
        single |= len(sel) == 1
        (ref if kind(strategy).reference else main).append(
            f"| {display_name(strategy) if kind(strategy).oracle else strategy} | {len(sel)} | {sel[0][3]} | "
            + " | ".join(cells) + " |")
    lines = [f"# {task_name}: {cases} Dice at the last iteration (mean +- std over seeds; std with ddof 1, "
             "the sample std)", ""]
    if cases == "test":
        lines += ["The test cases chose nothing: weights were kept on the validation cases (results.csv has both).",
                  ""]
    lines += main if len(main) > 2 else []
    if len(ref) > 2:
        lines += ["", "Reference (all pool cases labeled: the supplement's \"model that is using all the data\"):",
                  ""] + ref
    if single:
        lines += ["", "A strategy with one seed (n=1) has no std: shown as -."]
    return "\n".join(lines) + "\n"


def spread(values):
    """'mean +- std' over seeds of the non-NaN values (ddof 1), 'mean +- -' for one, 'n/a' for none."""
    v = np.asarray(values, float)
    v = v[~np.isnan(v)]
    if not len(v):
        return "n/a"
    return f"{v.mean():.4f} +- " + (f"{v.std(ddof=1):.4f}" if len(v) > 1 else "-")


def last_per_case(state):
    """[(strategy, {case: per-class Dice list})] of every (seed, strategy) run's last finished iteration."""
    return [(s, st.iterations[-1].per_case) for by_s in state.values() for s, st in by_s.items() if st.iterations]


def empty_note(state, class_names):
    """One line per class that some validation cases lack: they are left out of that class's mean."""
    cases, absent = set(), [set() for _ in class_names]
    for _, per_case in last_per_case(state):
        for c, d in per_case.items():
            cases.add(c)
            for i, x in enumerate(d):
                if x is None or np.isnan(x):
                    absent[i].add(c)
    lines = [f"- {name}: {len(a)} of {len(cases)} validation cases have no {name} in their label and are left "
             "out of its mean (MONAI's rule, DiceMetric ignore_empty)" for name, a in zip(class_names, absent) if a]
    return ("\n" + "\n".join(lines) + "\n") if lines else ""


def case_means(state):
    """{strategy: {case: Dice}}: per case the mean over its present foreground classes, averaged over seeds.
    A case without any foreground class has no value."""
    values = {}
    for strategy, per_case in last_per_case(state):
        for c, d in per_case.items():
            values.setdefault(strategy, {}).setdefault(c, []).append(nanmean(d))
    return {s: {c: float(nanmean(v)) for c, v in cases.items() if not np.isnan(nanmean(v))}
            for s, cases in values.items()}


def wilcoxon_matrix(state):
    """Wilcoxon signed-rank tests (two-sided, scipy) of every pair of strategies on the per-case values of
    case_means, over the cases both have. Returns (strategies by mean Dice, the reference last; {strategy:
    mean}; {(a, b): p-value, or None where fewer than 6 cases differ}). With n differing cases the exact
    two-sided test cannot give p below 2 / 2^n, which reaches 0.05 only from n = 6."""
    per_case = case_means(state)
    means = {s: float(np.mean(list(v.values()))) if v else np.nan for s, v in per_case.items()}
    order = sorted(means, key=lambda s: (kind(s).reference, -np.nan_to_num(means[s], nan=-1.0)))
    p = {(a, a): None for a in order}
    for i, a in enumerate(order):
        for b in order[i + 1:]:
            common = sorted(set(per_case[a]) & set(per_case[b]))
            x, y = [per_case[a][c] for c in common], [per_case[b][c] for c in common]
            n = int(np.count_nonzero(np.subtract(x, y)))
            if 2.0 / 2 ** n >= 0.05:
                p[a, b] = p[b, a] = None
                continue
            from scipy.stats import wilcoxon    # here: a tiny run never pays for importing scipy.stats
            p[a, b] = p[b, a] = float(wilcoxon(x, y).pvalue)
    return order, means, p


def wilcoxon_table(matrix, cases="validation"):
    """wilcoxon_matrix(state) as markdown: a row per strategy with its mean and its p-values against each."""
    order, means, p = matrix
    if len(order) < 2:
        return ""
    lines = ["## Wilcoxon signed-rank tests, all pairs (per-case mean foreground Dice, last iteration, "
             "averaged over seeds)", "", "| strategy | per-case mean | " + " | ".join(map(display_name, order)) + " |",
             "|---" * (len(order) + 2) + "|"]
    for a in order:
        cells = ["-" if a == b else "n/a" if p[a, b] is None else f"{p[a, b]:.3g}" for b in order]
        lines.append(f"| {display_name(a)} | {means[a]:.4f} | " + " | ".join(cells) + " |")
    lines += ["", f"Two-sided p-values over the {cases} cases both strategies have a value for (a case's value is "
              "the mean over its present foreground classes). n/a: fewer than 6 cases differ; with n differing "
              "cases the exact two-sided test cannot give p below 2 / 2^n, so p < 0.05 needs n >= 6."]
    return "\n".join(lines) + "\n"


NO_PLOT_SAID = []         # the missing matplotlib is said once per process


def plot_curves(out, rows, axis="pct"):
    """Dice against percent labeled (axis "pct": results.csv's rows), or against annotated voxels (axis
    "voxels": budget.csv's rows, region queries): solid supervised, dashed semi-supervised (the paper's Fig. 2);
    the all-data reference as a dotted horizontal line. No rows (no finished iteration): no plot."""
    if not rows:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:     # optional: the CSV files hold the same numbers
        if not NO_PLOT_SAID:
            NO_PLOT_SAID.append(True)
            warnings.warn(f"{out / 'dice_curve.png'}: not drawn, matplotlib is not installed (pip install "
                          "matplotlib); results.csv and summary.md hold the same numbers")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy in dict.fromkeys(r[0] for r in rows):
        pts = {}
        for r in rows:
            if r[0] == strategy:
                pts.setdefault(r[4] if axis == "pct" else r[2], []).append((r[4], r[-1]))     # by iteration
        pts = {(np.mean([v for v, _ in p]) if axis == "voxels" else x): [d for _, d in p] for x, p in pts.items()}
        x = sorted(pts)
        if kind(strategy).reference:
            ax.axhline(nanmean(pts[x[-1]]), color="k", linestyle=":", label=f"{strategy} (all pool cases labeled)")
        else:
            ax.plot(x, [nanmean(pts[p]) for p in x], "--" if kind(strategy).semi else "-", marker="o",
                    label=display_name(strategy))
    ax.set(xlabel="% of pool labeled" if axis == "pct" else "voxels annotated (mean over seeds)",
           ylabel="validation mean Dice")
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.atomic_write(out / "dice_curve.png", lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
