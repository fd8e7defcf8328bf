"""The figures, shared by the experiment scripts and the notebooks: small plot_* functions, each
returning its figure and, given a path, saving it as a PNG (whole: a temporary file, then a
rename) and closing it."""
import os

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

import merge


def _finish(fig, path):
    """Save fig as a PNG at path, whole, and close it; without a path, return it open."""
    if path:
        part = path.with_name(f".{path.name}.{os.getpid()}.part")
        fig.savefig(part, dpi=110, bbox_inches="tight", format="png")
        part.replace(path)
        plt.close(fig)
    return fig

def plot_lambda(lambdas, paper_lambdas=None, path=None):
    """Fig. 5: lambda over the epochs of the importance phase."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    if paper_lambdas is not None:
        ax.plot(np.linspace(0, 1, len(paper_lambdas)), paper_lambdas, "--", color="gray", label="paper (Fig. 5)")
    ax.plot(np.linspace(0, 1, len(lambdas)), lambdas, label=f"this run, {len(lambdas)} epochs")
    ax.set(xlabel="fraction of the importance phase", ylabel="lambda", title="Fig. 5: lambda schedule")
    ax.legend()
    return _finish(fig, path)

def plot_box(rows, metric, strategies, path=None, title=""):
    """Figs. 9, 11, 12: box plot over runs per strategy; the line is the median, x the mean."""
    names = [n for n in strategies if any(r["strategy"] == n for r in rows)]
    values = [[r[metric] for r in rows if r["strategy"] == n] for n in names]
    fig, ax = plt.subplots(figsize=(6, 0.6 + 0.7 * len(names)))
    horizontal = dict(orientation="horizontal") if matplotlib.__version_info__ >= (3, 10) else dict(vert=False)
    ax.boxplot(values, showmeans=True, meanprops=dict(marker="x", markeredgecolor="k"), **horizontal)
    ax.set_yticks(range(1, len(names) + 1), names)
    ax.set(xlabel=metric.replace("_", " "), title=title)
    return _finish(fig, path)

def plot_sine_data(data, path=None):
    """Fig. 8a: the training set and the noise-free curve."""
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.scatter(data.x_train.cpu(), data.y_train.cpu(), s=1, alpha=0.3, label="training points")
    ax.plot(merge.GRID, merge.sine_curve(merge.GRID), "k", lw=1, label="sin(10 pi x)")
    ax.set(xlabel="x", ylabel="y", title=f"Fig. 8a: {len(data.x_train)} training points")
    ax.legend(loc="upper right")
    return _finish(fig, path)

def plot_curves(rows, strategies, path=None):
    """Fig. 10: the learned curve of every run, overlaid, one panel per strategy with rows."""
    names = [n for n in strategies if any(r["strategy"] == n for r in rows)]
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        mine = [r for r in rows if r["strategy"] == name]
        for r in mine:
            ax.plot(merge.GRID, r["curve"], lw=0.7, alpha=0.5)
        ax.plot(merge.GRID, merge.sine_curve(merge.GRID), "k--", lw=0.8)
        ax.set(title=f"{name}: {sum(r['peaks'] == 5 for r in mine)}/{len(mine)} get all 5 peaks", xlabel="x",
               ylim=(-1.6, 1.6))
    return _finish(fig, path)

def plot_kept_share(rows, path=None):
    """Fig. 2's idea as numbers: the share of the student's units that each teacher gave."""
    mine = [r for r in rows if r["strategy"] == "student"]
    shares = np.array([r["kept_from_teacher"] for r in mine])
    fig, ax = plt.subplots(figsize=(max(4, 0.15 * len(mine) + 2), 3))
    bottom = np.zeros(len(mine))
    for i in range(shares.shape[1]):
        ax.bar([r["run"] for r in mine], shares[:, i], bottom=bottom, label=f"teacher {i}")
        bottom += shares[:, i]
    ax.set(xlabel="run", ylabel="share of kept units", title="Which teacher the kept units came from")
    ax.legend(loc="lower right")
    return _finish(fig, path)
