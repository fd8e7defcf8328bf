"""Where merging starts to pay, beyond the paper: the sine protocol at 1/5, 1/2, 1 and 2 times the paper's
budget of 900 epochs per strategy (every phase and lr drop scaled with it, the lambda step rescaled so that
lambda ends where the paper's does), the student against bo3 and one model. Results in --out/epochs180 ...
--out/epochs1800 (each resumable as in merge.py), the table in --out/summary.md, the figure in
--out/fig_budget.png.

    python sine_budgets.py --runs 50          # 4 budgets x 50 runs -> runs/sine_budgets/
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

SHARES = (0.2, 0.5, 1, 2)  # of the paper's budget
NAMES = ("student", "bo3", "one")


@dataclass
class BudgetSettings(sine.SineSettings):
    """The sine's settings; --epochs is the paper's budget, which the study scales."""
    shares: tuple = setting(SHARES, "the budgets of the study, as multiples of --epochs (ours)", nargs="+",
                            type=float, metavar="SHARE", run_only=True, valid=(lambda v: v > 0, "above 0"))


def parse(argv=None):
    return experiment.parse_settings(argv, BudgetSettings(out="runs/sine_budgets", strategies=",".join(NAMES)), __doc__,
                                     hidden=("strategies", "workers", "bench", "task"))  # the study sets


def settings_of(s, share):
    epochs = round(s.epochs * share)
    return dataclasses.replace(s, epochs=epochs, out=str(Path(s.out) / f"epochs{epochs}"))


def budget_table(rows_of):
    """rows_of[epochs] holds the rows of --out/epochs<epochs>: the mean and median test MSE of each strategy,
    and in how many runs the student's is lower than bo3's and one model's (run by run, the same data)."""
    lines = ["| epochs per strategy | student mean | median | bo3 mean | median | one mean | median | "
             "student lower than bo3 | than one |", "|---|---|---|---|---|---|---|---|---|"]
    for epochs, rows in sorted(rows_of.items()):
        by = {name: {r["run"]: r["test_mse"] for r in rows if r["strategy"] == name} for name in NAMES}
        v = {name: np.array(list(by[name].values())) for name in NAMES}
        lower = {name: f"{sum(by['student'][run] < mse for run, mse in by[name].items())}/{len(by[name])}"
                 for name in ("bo3", "one")}
        lines.append(f"| {epochs} | " + " | ".join(f"{v[n].mean():.4f} | {np.median(v[n]):.4f}" for n in NAMES)
                     + f" | {lower['bo3']} | {lower['one']} |")
    return "\n".join(lines)


def plot_budgets(rows_of, path=None):
    """Mean and median test MSE of each strategy against the budget."""
    fig, ax = report.subplots(figsize=(6, 3.6))
    budgets = sorted(rows_of)
    for name, color in zip(NAMES, ("C0", "C1", "C2")):
        values = [[r["test_mse"] for r in rows_of[e] if r["strategy"] == name] for e in budgets]
        ax.plot(budgets, [np.mean(v) for v in values], "o-", color=color, label=f"{name}, mean")
        ax.plot(budgets, [np.median(v) for v in values], "x--", color=color, label=f"{name}, median")
    ax.set_xscale("log")
    ax.set_xticks(budgets, [str(e) for e in budgets])
    ax.minorticks_off()
    n = len([r for r in rows_of[budgets[0]] if r["strategy"] == "student"])
    ax.set(xlabel="epochs per strategy", ylabel="test MSE", title=f"Sine, {n} runs per budget")
    ax.legend(fontsize=7, ncol=2)
    return report._finish(fig, path)


def run(s):
    experiment.check_settings(s, records=False)  # its experiments' folders hold the records
    if set(s.strategies.split(",")) != set(NAMES):
        raise experiment.InputError(f"--strategies: the study compares {','.join(NAMES)}")
    epochs = [settings_of(s, share).epochs for share in s.shares]
    if len(set(epochs)) < len(epochs):
        raise experiment.InputError(f"--shares {' '.join(f'{x:g}' for x in s.shares)} of --epochs {s.epochs} give "
                                    f"{' '.join(map(str, epochs))} epochs: each budget once")
    studies = [(settings_of(s, share).epochs, f"sine, {share} x --epochs {s.epochs} = {settings_of(s, share).epochs} "
                "epochs", settings_of(s, share)) for share in s.shares]
    sine.run_study(s, studies, f"Where merging starts to pay: sine, test MSE over {report.count(s.runs, 'run')} at "
                   "each budget", budget_table, plot_budgets, "fig_budget.png")


def main(argv=None):
    experiment.main(argv, parse, run)


if __name__ == "__main__":
    main(sys.argv[1:])
