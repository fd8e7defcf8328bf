"""What a run reports, shared by the experiment scripts and the notebooks: its progress while it trains,
the summary tables (the paper's Tables 1-4, and the stages of the student) and the figures, small plot_*
functions, each returning its figure and, given a path, saving it as a PNG (whole: a temporary file,
then a rename) and closing it."""
import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

import merge

log = logging.getLogger("merge")  # what the runs report; Progress shows it

# == Ctrl-C ========================================================================================

interrupted = False  # Ctrl-C has come (on_interrupt)

def on_interrupt(*_):
    """SIGINT's handler (experiment.main): KeyboardInterrupt now, and again once the epoch is kept (experiment's
    fit_one, lockstep's turn) should torch swallow this one: a compiled step's guard takes it for a failed check,
    and a weakref callback prints it and goes on (catch_interrupts keeps that quiet)."""
    global interrupted
    interrupted = True
    raise KeyboardInterrupt

def catch_interrupts():
    """Ctrl-C ends the command however deep in torch it lands (on_interrupt); a KeyboardInterrupt raised where
    Python can only print it (a weakref callback, a __del__) is not printed: the epoch's end raises it again."""
    global interrupted
    interrupted = False  # a command run again in one process (a notebook's) starts afresh
    if threading.current_thread() is threading.main_thread():  # where signals are handled
        signal.signal(signal.SIGINT, on_interrupt)
    if sys.unraisablehook is not quiet_interrupts:
        quiet_interrupts.previous, sys.unraisablehook = sys.unraisablehook, quiet_interrupts

def quiet_interrupts(unraisable):
    if not issubclass(unraisable.exc_type, KeyboardInterrupt):
        quiet_interrupts.previous(unraisable)  # the hook it took the place of

def kept(out, count_rows):
    """What an interrupted command's last line says it kept in out (count_rows(): its rows; it may fail)."""
    if (out / "study.json").exists():  # a study's runs (sine_teachers.py, sine_budgets.py) have folders below it
        return f"kept every finished phase and row in the folders below {out}; the same command resumes from there"
    try:
        count = count_rows()
    except Exception:  # noqa: BLE001 - the message must not fail
        count = None
    if not (out / "settings.json").exists() or count == 0 and not any((out / "phases").glob("*")):
        return "nothing had finished; the same command starts again"
    rows = "" if count == 0 else f"{'the' if count is None else count} results in {out / 'results.jsonl'} and "
    return f"kept {rows}every finished phase and checkpoint in {out / 'phases'}; the same command resumes from there"

# == Files written whole, and locks ===============================================================

WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS)  # a file's write failed

@contextlib.contextmanager
def written_whole(path):
    """A temporary name beside path to write to; renamed to path when the block ends, removed if it fails:
    path holds the whole new file or what it held before, never a part, and nothing is left behind."""
    path = Path(path)
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        yield part
        part.replace(path)
    except OSError as e:
        if e.filename is None and e.errno in WRITE_ERRORS:  # a write's error names no file: this one
            e.filename = str(path)  # (experiment.main says where); a download's own errors stay as they are
        raise
    finally:
        part.unlink(missing_ok=True)

def write_whole(path, text):
    """path holds text, or what it held before (written_whole)."""
    with written_whole(path) as part:
        part.write_text(text)

def save_whole(obj, path):
    """torch.save, whole or not at all (written_whole). Its folder is made. torch says a full disk by a
    RuntimeError: where the disk has no room left (under 16 MiB), it becomes the OSError it is (ENOSPC)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with written_whole(path) as part:
        try:
            torch.save(obj, part)
        except RuntimeError as e:
            if shutil.disk_usage(part.parent).free >= 1 << 24:  # another failure (a GPU's, say): as it is
                raise
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e

def held(path):
    """Whether another process holds the lock of the file at path now (fcntl.flock): a look that writes nothing,
    so that a command refuses a busy --out before it reads its data (experiment.lock takes the lock later).
    False where there is no such file, or no locks (Windows, some NFS or Lustre mounts)."""
    try:
        import fcntl
        with open(path) as handle:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a holder's exclusive lock refuses even this one;
            # shared, as a file open for reading may take it (NFS refuses it an exclusive one); let go as it closes
        return False
    except BlockingIOError:
        return True
    except (ImportError, OSError):
        return False

def append_row(path, row):
    """row as one more JSON line of path: a crash can cut its last line alone (experiment.read_rows drops it)."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as e:
        if e.filename is None and e.errno in WRITE_ERRORS:  # a write's error names no file: this one
            e.filename = str(path)
        raise

# == Progress ======================================================================================

class Progress(logging.Handler):
    """Shows log's reports stamped with the seconds since the command began; a phase's epochs as a bar on a
    terminal (epochs done, training error, time left; other lines above it), in a file or a pipe a line at each
    fifth of a phase of 20 or more epochs, and at an epoch's end whenever QUIET seconds have passed since the
    last epoch's line (slow epochs: each), with the time left in the phase."""
    QUIET = 30

    def __init__(self):
        super().__init__()
        self.start = self.last = time.time()  # last: when an epoch's line was last printed
        self.bar = ""  # a phase's bar on a terminal, until its last epoch

    def emit(self, record):
        done, epochs, error = record.args if hasattr(record, "epochs") else (0, 0, 0)
        first, began = getattr(record, "clock", (0, 0))  # this process's pace, an epoch, from the clock's start
        left = done > first and f", {duration((time.time() - began) / (done - first) * (epochs - done))} left"
        if epochs and sys.stdout.isatty():
            phase = f"{record.phase}: " if getattr(record, "phase", "") else ""
            self.bar = f"    {phase}[{'#' * (30 * done // epochs):<30}] {done}/{epochs} epochs, training error " \
                f"{error:.4f}{left or ''}"
            print(f"\r{self.bar}\x1b[K",  # \x1b[K clears the rest of the line: a longer bar's
                  end="\n" if done == epochs else "", flush=True)
            self.bar = "" if done == epochs else self.bar
        elif not epochs or done % max(1, epochs // 5) == 0 and epochs >= 20 or time.time() - self.last > self.QUIET:
            above = "\r\x1b[K" if self.bar and sys.stdout.isatty() else ""  # a line above the bar, then the bar
            print(f"{above}[{time.time() - self.start:7.1f}s] {record.getMessage()}"
                  f"{f'{left} in the phase' if left and done < epochs else ''}", flush=True)
            print(self.bar if above else "", end="", flush=True)
            self.last = time.time() if epochs else self.last

def duration(seconds):
    """Seconds as a person reads them: 45 s, 12 min, 3.5 h."""
    return f"{seconds:.0f} s" if seconds < 100 else f"{seconds / 60:.0f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"

def count(n, noun):
    """1 run, 50 runs."""
    return f"{n} {noun}{'s' * (n != 1)}"

def show_progress(quiet=False):
    """log's reports on stdout, timed from now (one Progress handler); quiet: warnings only (ranks > 0)."""
    log.handlers = [Progress()]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False

def progress(epochs, name="", began=None):
    """after_epoch that reports each epoch of a phase (its name) to log (Progress: a bar, or a line now and then).
    The time left is paced from the end of the first epoch reported, whose compiling and warming up would make it
    seem hours (a resumed phase's first is later than 0); began: from when epoch 0 began instead."""
    clock = [] if began is None else [0, began]  # (epochs done, time) the pace is counted from

    def report(epoch, history):
        clock[:] = clock or [epoch + 1, time.time()]
        error = np.mean(history[-1]["error"])
        log.info(f"    {name}{': ' if name else ''}epoch %d/%d, training error %.4f", epoch + 1, epochs, error,
                 extra=dict(epochs=epochs, clock=tuple(clock), phase=name))
    return report


# == Tables ========================================================================================

def summarize(rows, metric, strategies, extra=None):
    """Markdown table of min, max, median, mean and std (ddof = 1) of `metric` over runs per strategy (Tables
    1-2), extra columns (name -> f(rows) -> str), and the mean epochs and forward multiply-adds of training."""
    total = lambda i, form: lambda mine: format(np.mean([sum(c[i] for c in r["compute"].values()) for r in mine]),
                                                form) if all("compute" in r for r in mine) else ""
    extra = {**(extra or {}), "epochs": total(0, ".0f"), "multiply-adds": total(1, ".3g")}
    lines = ["| strategy | runs | min | max | median | mean | std |" + "".join(f" {c} |" for c in extra),
             "|---|---|---|---|---|---|---|" + "---|" * len(extra)]
    for name in strategies:
        mine = [r for r in rows if r["strategy"] == name]
        if mine:
            v = np.array([r[metric] for r in mine])
            std = f"{v.std(ddof=1):.4f}" if len(v) > 1 else "-"  # no spread from one run
            lines.append(f"| {name} | {len(v)} | {v.min():.4f} | {v.max():.4f} | {np.median(v):.4f} | "
                         f"{v.mean():.4f} | {std} |" + "".join(f" {f(mine)} |" for f in extra.values()))
    return "\n".join(lines)

STAGES = ("best teacher (test)", "big student after importance (test)", "compressed, before fine-tuning (val)",
          "compressed, before fine-tuning (test)", "final (test)")

def stage_table(rows, metric, per_run=False):
    """The metric at each stage of the student and of the random control: the better teacher, the big student
    after importance, the compressed student before fine-tuning, the final one; per run (per_run), and means."""
    best = max if metric == "test_accuracy" else min
    lines = ["| strategy | run | " + " | ".join(STAGES) + " |", "|---|---|" + "---|" * len(STAGES)]
    for name in ("student", "random"):
        mine = sorted((r for r in rows if r["strategy"] == name), key=lambda r: r["run"])
        stages = np.array([[best(r["teachers_test"]), r["big_student_test"], r["compressed_val"], r["compressed_test"],
                            r[metric]] for r in mine]).reshape(-1, len(STAGES))
        if per_run:
            lines += [f"| {name} | {r['run']} | " + " | ".join(f"{v:.4f}" for v in values) + " |"
                      for r, values in zip(mine, stages)]
        if mine:
            lines.append(f"| {name} | mean of {len(mine)} | " + " | ".join(f"{v:.4f}" for v in stages.mean(0)) + " |")
    return "\n".join(lines)

# == Figures =======================================================================================

def subplots(*args, **kwargs):
    """matplotlib's plt.subplots, pyplot imported at the first figure: a process that draws none (a rank
    other than 0, a launcher, a refused command) starts a second sooner."""
    import matplotlib.pyplot as plt
    return plt.subplots(*args, **kwargs)

def _finish(fig, path):
    """Save fig as a PNG at path, whole, and close it; without a path, return it open."""
    if path:
        try:
            with written_whole(path) as part:
                fig.savefig(part, dpi=110, bbox_inches="tight", format="png")
        finally:
            import matplotlib.pyplot as plt
            plt.close(fig)
    return fig

def plot_lambda(lambdas, paper_lambdas=None, path=None):
    """Fig. 5: lambda over the epochs of the importance phase."""
    fig, ax = subplots(figsize=(5, 3.2))
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
    fig, ax = subplots(figsize=(6, 0.6 + 0.7 * len(names)))
    import matplotlib
    horizontal = dict(orientation="horizontal") if matplotlib.__version_info__ >= (3, 10) else dict(vert=False)
    ax.boxplot(values, showmeans=True, meanprops=dict(marker="x", markeredgecolor="k"), **horizontal)
    ax.set_yticks(range(1, len(names) + 1), names)
    ax.set(xlabel=metric.replace("_", " "), title=title)
    return _finish(fig, path)

def plot_sine_data(data, path=None):
    """Fig. 8a: the training set and the noise-free curve."""
    fig, ax = subplots(figsize=(7, 3))
    ax.scatter(data.x_train.cpu(), data.y_train.cpu(), s=1, alpha=0.3, label="training points")
    ax.plot(merge.GRID, merge.sine_curve(merge.GRID), "k", lw=1, label="sin(10 pi x)")
    ax.set(xlabel="x", ylabel="y", title=f"Fig. 8a: {len(data.x_train)} training points")
    ax.legend(loc="upper right")
    return _finish(fig, path)

def plot_curves(rows, strategies, path=None):
    """Fig. 10: the learned curve of every run, overlaid, one panel per strategy with rows."""
    names = [n for n in strategies if any(r["strategy"] == n for r in rows)]
    fig, axes = subplots(1, len(names), figsize=(4.5 * len(names), 3), sharey=True, squeeze=False)
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
    fig, ax = subplots(figsize=(max(4, 0.15 * len(mine) + 2), 3))
    bottom = np.zeros(len(mine))
    for i in range(shares.shape[1]):
        ax.bar([r["run"] for r in mine], shares[:, i], bottom=bottom, label=f"teacher {i}")
        bottom += shares[:, i]
    for i in range(1, shares.shape[1]):  # an equal share from each teacher
        ax.axhline(i / shares.shape[1], color="k", lw=0.6, ls="--")
    ax.set(xlabel="run", ylabel="share of kept units", title="Which teacher the kept units came from")
    ax.xaxis.get_major_locator().set_params(integer=True, min_n_ticks=1)  # runs are whole numbers, one run too
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1))  # beside the bars, not over them
    return _finish(fig, path)
