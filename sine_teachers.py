"""What the speed buys, beyond the paper: merging 2 to 5 teachers (the paper's future work) on the
sine problem, each k with the paper's full protocol and budget. The k teachers share the
teachers' 2/3 of the budget, so each gets fewer epochs as k grows; bo3 and one model do not
depend on k and are trained once. Results in --out/k2 ... --out/k5 (each resumable as in
merge.py), the table in --out/summary.md, the figure in --out/fig_teachers.png.

    python sine_teachers.py --runs 50          # k = 2, 3, 4, 5: 50 runs each -> runs/sine_teachers/
"""
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":  # a command: Ctrl-C while torch loads gives one line (startup.py)
    import startup
    startup.before_torch()

import numpy as np

import experiment
import report
import sine
from experiment import setting


@dataclass
class TeachersSettings(sine.SineSettings):
    """The sine's settings, and the largest k of the study."""
    most: int = setting(5, "the study merges k = 2, 3, ... up to this many teachers (ours)", run_only=True,
                        valid=(lambda v: 2 <= v <= experiment.MAX_TEACHERS, f"from 2 to {experiment.MAX_TEACHERS}"))


def parse(argv=None):
    return experiment.parse_settings(argv, TeachersSettings(out="runs/sine_teachers"), __doc__,
                                     hidden=("teachers", "strategies", "workers", "bench", "task"))  # the study sets


def settings_of(s, k):
    """The protocol for k teachers: the student for every k, bo3 and one model with k = 2 only."""
    return dataclasses.replace(s, teachers=k, out=str(Path(s.out) / f"k{k}"),
                               strategies="student,bo3,one" if k == 2 else "student")


def teachers_table(rows_of):
    """Table of the study: rows_of[k] holds the rows of --out/k<k>; bo3 and one model are k2's."""
    baseline = {name: [r for r in rows_of[2] if r["strategy"] == name] for name in ("bo3", "one")}
    mean = lambda rows: np.mean([r["test_mse"] for r in rows])
    lines = ["| k | epochs per teacher | student mean | median | std | beats bo3 | beats one | all 5 peaks | "
             "kept from teachers 0, 1, ... |", "|---|---|---|---|---|---|---|---|---|"]
    for k, rows in sorted(rows_of.items()):
        mine = sorted((r for r in rows if r["strategy"] == "student"), key=lambda r: r["run"])
        v = np.array([r["test_mse"] for r in mine])
        beats = {name: sum(a["test_mse"] < b["test_mse"] for a, b in zip(mine, sorted(base, key=lambda r: r["run"])))
                 for name, base in baseline.items()}
        shares = " / ".join(f"{x:.2f}" for x in np.mean([r["kept_from_teacher"] for r in mine], 0))
        std = f"{v.std(ddof=1):.4f}" if len(v) > 1 else "-"  # no spread from one run (as report.summarize)
        lines.append(f"| {k} | {mine[0]['compute']['teacher'][0] // k} | {v.mean():.4f} | {np.median(v):.4f} | "
                     f"{std} | {beats['bo3']}/{len(mine)} | {beats['one']}/{len(mine)} | "
                     f"{sum(r['peaks'] == 5 for r in mine)}/{len(mine)} | {shares} |")
    lines += [f"| bo3 | - | {mean(baseline['bo3']):.4f} | | | | | {sum(r['peaks'] == 5 for r in baseline['bo3'])}/"
              f"{len(baseline['bo3'])} | |",
              f"| one | - | {mean(baseline['one']):.4f} | | | | | {sum(r['peaks'] == 5 for r in baseline['one'])}/"
              f"{len(baseline['one'])} | |"]
    return "\n".join(lines)


def plot_teachers(rows_of, path=None):
    """Test MSE of the student for each k, beside bo3 and one model; and where its units came from."""
    fig, (left, right) = report.subplots(1, 2, figsize=(11, 3.4))
    ks = sorted(rows_of)
    students = [[r["test_mse"] for r in rows_of[k] if r["strategy"] == "student"] for k in ks]
    baseline = [[r["test_mse"] for r in rows_of[2] if r["strategy"] == name] for name in ("bo3", "one")]
    left.boxplot(students + baseline, showmeans=True, meanprops=dict(marker="x", markeredgecolor="k"))
    left.set_xticks(range(1, len(ks) + 3), [f"student\nk = {k}" for k in ks] + ["bo3", "one"])
    left.set(ylabel="test MSE", title=f"{len(students[0])} runs each, the same epoch budget")
    for k in ks:
        shares = np.mean([r["kept_from_teacher"] for r in rows_of[k] if r["strategy"] == "student"], 0)
        right.bar(np.arange(k) + 0.9 * (k - ks[0]) / len(ks) - 0.4, shares, width=0.9 / len(ks), label=f"k = {k}")
    right.axhline(0, color="k", lw=0.5)
    right.set(xlabel="teacher", ylabel="mean share of the kept units", title="Where the kept units come from")
    right.legend()
    return report._finish(fig, path)


def run(s):
    experiment.check_settings(s, records=False)  # its experiments' folders hold the records
    if s.teachers != 2:
        raise experiment.InputError("--teachers is not used: the study merges k = 2, 3, ... up to --most teachers")
    if set(s.strategies.split(",")) != {"student", "bo3", "one"}:
        raise experiment.InputError("--strategies is not used: the study runs the student for every k, bo3 and one "
                                    "model for k = 2")
    studies = [(k, f"sine, k = {k}", settings_of(s, k)) for k in range(2, s.most + 1)]
    sine.run_study(s, studies, f"Merging k teachers on the sine problem: test MSE over {report.count(s.runs, 'run')}, "
                   f"{s.epochs} epochs per strategy", teachers_table, plot_teachers, "fig_teachers.png")


def main(argv=None):
    experiment.main(argv, parse, run)


if __name__ == "__main__":
    main(sys.argv[1:])
