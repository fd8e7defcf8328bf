"""What the experiments share: settings and the command line, the run loop with its results and
resuming, the summary tables, the figures, the bench, and the sine experiment's report.

merge.py is the method; read this file only to learn how runs are stored, resumed and drawn.
`python merge.py --task sine --runs 50` runs main() below.

An experiment's --out folder holds settings.json (the settings its results were made with;
a later command on the same folder must use the same ones), results.jsonl (one JSON line per
finished run and strategy, written as soon as it is done), phases/ (every finished training
phase, so a killed run resumes where it stopped), summary.md and the figures.
"""
import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import merge
from merge import InputError


# == Settings and the command line ================================================================

def setting(default, help, **extra):
    """A settings field with its help text: unit, and where the value comes from."""
    return field(default=default, metadata=dict(help=help, **extra))


@dataclass
class Settings:
    """The settings every experiment has; the defaults are the sine's (section 3.2 and
    REFERENCE.md). Each experiment adds its own fields (SineSettings below, the image scripts')."""
    runs: int = setting(50, "independent runs, each with its own models and seeds", run_only=True)
    seed: int = setting(0, "base seed: run r has the run seed 1000 seed + r (ours)")
    epochs: int = setting(900, "epochs per strategy, the whole budget; every phase and lr drop scales with it")
    teachers: int = setting(2, "k, the number of teachers merged into one student (paper: 2)")
    device: str = setting("auto", "where to train: auto picks cuda when torch sees a GPU",
                          choices=("auto", "cpu", "cuda"), run_only=True)
    out: str = setting("runs/sine", "folder for results.jsonl, summary.md and the figures", run_only=True)
    strategies: str = setting("student,bo3,one", "comma-separated, of student, bo3, one (section 3.1), prune and "
                                                 "fusion (3.3); more may be added to an --out later", run_only=True)
    batch: int = setting(32, "examples per SGD step")
    lr: float = setting(0.01, "SGD learning rate, divided by 10 at each drop")
    momentum: float = setting(0.9, "SGD momentum")
    weight_decay: float = setting(0.0, "SGD weight decay")
    gate_lr: float = setting(0.1, "learning rate of the gates' own SGD, momentum 0.9, no weight decay")
    lambda_start: float = setting(0.01, "lambda at the start of the importance phase (Fig. 5)")
    lambda_step: float = setting(0.05, "lambda += step sqrt(lambda) before each epoch (Fig. 5)")
    paper_epochs: int = setting(900, "the budget the lambda step is tuned for; other budgets rescale the step so "
                                     "that lambda ends where the paper's does (ours)")
    stack: int = setting(1, "1: train the models of a phase of all runs as one stack (fit_stacked); "
                            "0: one at a time, like the paper's scripts (ours)", run_only=True)
    compile: int = setting(1, "1: torch.compile the stacked step, falling back to eager where it can't (ours)",
                           run_only=True)
    phase_dir: str = field(default="", metadata=dict(run_only=True))  # set by the run loop: --out/phases
    # lr / 10 at these fractions of each phase (section 3.2: teachers and bo3 models at 250 of
    # 300 epochs, the importance phase constant, fine-tuning at 100 of 150, one model at 800 of 900)
    drops_teacher: tuple = (5 / 6,)
    drops_importance: tuple = ()
    drops_finetune: tuple = (2 / 3,)
    drops_one: tuple = (8 / 9,)


@dataclass
class SineSettings(Settings):
    """The sine experiment (section 3.2): Settings, and its data."""
    task: str = setting("sine", "experiment (section 3.2); the image experiments have their own scripts",
                        choices=("sine",))
    n_train: int = setting(10_000, "training points (paper: 10,000)")
    n_val: int = setting(2_000, "validation points, drawn the same way, for choosing bo3 (ours)")
    n_test: int = setting(10_000, "test points, drawn the same way (ours)")
    noise: float = setting(0.2, "standard deviation of the noise on y (paper: N(0, 0.2))")
    bench: bool = setting(False, "print the speed of the one-at-a-time and the stacked trainers, then exit",
                          run_only=True)


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


MAX_SEED = 10 ** 9  # phase seeds stay below 2^63, torch's limit


def check_settings(s):
    """One InputError for a setting that cannot work, before anything is trained or written."""
    for name in ("runs", "epochs", "batch") + tuple(f for f in ("n_train", "n_val", "n_test") if hasattr(s, f)):
        if getattr(s, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(s, name)}")
    if s.runs > merge.MAX_RUNS or not 0 <= s.seed <= MAX_SEED:  # so that no two runs share a seed
        raise InputError(f"--runs must be at most {merge.MAX_RUNS} and --seed from 0 to {MAX_SEED}; "
                         f"got {s.runs} and {s.seed}")
    unknown = set(s.strategies.split(",")) - set(merge.STRATEGIES)
    if unknown:
        raise InputError(f"--strategies: unknown {', '.join(sorted(unknown))}; "
                         f"choose from {', '.join(merge.STRATEGIES)}")
    if not 2 <= s.teachers <= merge.MAX_TEACHERS:
        raise InputError(f"--teachers must be from 2 to {merge.MAX_TEACHERS}, got {s.teachers}")
    if min(merge.budget(s).values()) < 1:
        enough = next(e for e in range(1, 10_000) if min(merge.budget(dataclasses.replace(s, epochs=e)).values()) >= 1)
        raise InputError(f"--epochs {s.epochs} leaves a phase without epochs for {s.teachers} teachers; "
                         f"use at least {enough}")


def resolve_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda, but torch sees no GPU here; use --device cpu or auto")
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def parse_settings(argv=None, defaults=SineSettings(), description=merge.__doc__):
    """Settings from the command line: one flag per documented field of `defaults`."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = fail  # one line and exit code 2, not a usage dump
    flags = [f for f in dataclasses.fields(defaults) if "help" in f.metadata]
    for f in flags:
        value = getattr(defaults, f.name)
        flag, text = f.metadata.get("flag", "--" + f.name.replace("_", "-")), f"{f.metadata['help']} [{value}]"
        if isinstance(value, bool):
            parser.add_argument(flag, dest=f.name, action="store_true", help=text)
        elif isinstance(value, tuple):  # file names
            parser.add_argument(flag, dest=f.name, nargs=f.metadata["nargs"], default=value, metavar="FILE", help=text)
        else:
            parser.add_argument(flag, dest=f.name, type=type(value), default=value, choices=f.metadata.get("choices"),
                                help=text)
    args = parser.parse_args(argv)
    return dataclasses.replace(defaults, **{f.name: tuple(v) if isinstance(v := getattr(args, f.name), list) else v
                                            for f in flags})


def parse_with_presets(argv, base, choice, presets, description):
    """parse_settings with defaults that follow one choice (--arch, --experiment): base's
    fields replaced by those of presets[the choice], so that --help shows them."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.error = fail
    pre.add_argument("--" + choice, default=getattr(base, choice), choices=presets)
    chosen = getattr(pre.parse_known_args(argv)[0], choice)
    return parse_settings(argv, dataclasses.replace(base, **{choice: chosen}, **presets[chosen]), description)


# == Results: one JSON line per finished (run, strategy), resumed from ==========================

def open_results(out, s):
    """The rows already in out/results.jsonl. A resumed experiment must have the same settings
    (all but the run_only ones); the first call writes them to out/settings.json."""
    settings = json.loads(json.dumps({f.name: getattr(s, f.name) for f in dataclasses.fields(s)
                                      if not f.metadata.get("run_only")}))
    path = out / "settings.json"
    if path.exists():
        old = json.loads(path.read_text())
        changed = [f"{key} {old.get(key)} -> {value}" for key, value in settings.items() if old.get(key) != value]
        if changed:
            raise InputError(f"{out} holds results made with other settings ({', '.join(changed)}); "
                             "use another --out")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1) + "\n")
    rows, lines = [], (out / "results.jsonl").read_text().splitlines() if (out / "results.jsonl").exists() else []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash: dropped, and its run redone
            pass
    if len(rows) != len(lines):
        (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def append_result(out, row):
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def summarize(rows, metric, strategies, extra=None):
    """Markdown table of min, max, median, mean and std (ddof = 1) of `metric` over runs per
    strategy, the statistics of the paper's Tables 1-2; extra: column -> f(rows) -> str."""
    extra = extra or {}
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


def run_experiment(s, title, make_data, make_teacher, result):
    """The loop of every experiment: for each strategy, the runs not yet in --out/results.jsonl,
    as one stack (s.stack) or one at a time. Each finished (run, strategy) is written at once as
    one JSON line, and finished phases are kept in --out/phases, so an interrupted experiment
    resumes where it stopped. make_data(seed, device) -> a run's Data; result(model, data) ->
    the numbers of its row. Returns the rows of runs < s.runs."""
    merge.log.start = time.time()
    device, out = resolve_device(s.device), Path(s.out)
    strategies = {name: merge.STRATEGIES[name] for name in s.strategies.split(",")}
    results = open_results(out, s)
    s = dataclasses.replace(s, phase_dir=str(out / "phases"))
    done = {(r["run"], r["strategy"]) for r in results}
    merge.log(f"{title}: {s.runs} runs x {len(strategies)} strategies, {s.epochs} epochs each, on {device}; "
              f"{len(done)} results already in {out}")
    for name, strategy in strategies.items():
        todo = [run for run in range(s.runs) if (run, name) not in done]
        chunks = [todo] if s.stack else [[run] for run in todo]
        for runs in filter(None, chunks):
            merge.log(f"{name}: runs {runs[0] + 1}-{runs[-1] + 1} of {s.runs}" if len(runs) > 1 else
                      f"{name}: run {runs[0] + 1} of {s.runs}")
            seeds = [merge.run_seed(s.seed, run) for run in runs]
            datas = [make_data(seed, device) for seed in seeds]
            for run, seed, data, (model, info) in zip(runs, seeds, datas, strategy(datas, s, make_teacher, seeds)):
                row = dict(run=run, strategy=name, seed=seed, **info, **result(model, data))
                append_result(out, row)
                results.append(row)
            merge.log(f"{name}: {len(runs)} runs written to {out / 'results.jsonl'}")
    return [r for r in results if r["run"] < s.runs]


# == Figures, shared by the scripts and the notebook; each returns its figure and, given a path,
# saves it as PNG ==================================================================================

def _finish(fig, path):
    if path:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def plot_lambda(lambdas, paper_lambdas=None, path=None):
    """Fig. 5: lambda over the epochs of the importance phase."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2))
    if paper_lambdas is not None:
        ax.plot(np.linspace(0, 1, len(paper_lambdas)), paper_lambdas, "--", color="gray", label="paper (Fig. 5)")
    ax.plot(np.linspace(0, 1, len(lambdas)), lambdas, label=f"this run, {len(lambdas)} epochs")
    ax.set(xlabel="fraction of the importance phase", ylabel="lambda", title="Fig. 5: lambda schedule")
    ax.legend()
    return _finish(fig, path)


def plot_box(rows, metric, strategies, path=None, title=""):
    """Figs. 9, 11, 12: box plot over runs per strategy; the line is the median, x the mean."""
    import matplotlib.pyplot as plt
    names = [n for n in strategies if any(r["strategy"] == n for r in rows)]
    values = [[r[metric] for r in rows if r["strategy"] == n] for n in names]
    fig, ax = plt.subplots(figsize=(6, 0.6 + 0.7 * len(names)))
    ax.boxplot(values, orientation="horizontal", showmeans=True, meanprops=dict(marker="x", markeredgecolor="k"))
    ax.set_yticks(range(1, len(names) + 1), names)
    ax.set(xlabel=metric.replace("_", " "), title=title)
    return _finish(fig, path)


def plot_sine_data(data, path=None):
    """Fig. 8a: the training set and the noise-free curve."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.scatter(data.x_train.cpu(), data.y_train.cpu(), s=1, alpha=0.3, label="training points")
    ax.plot(merge.GRID, merge.sine_curve(merge.GRID), "k", lw=1, label="sin(10 pi x)")
    ax.set(xlabel="x", ylabel="y", title=f"Fig. 8a: {len(data.x_train)} training points")
    ax.legend(loc="upper right")
    return _finish(fig, path)


def plot_curves(rows, strategies, path=None):
    """Fig. 10: the learned curve of every run, overlaid, one panel per strategy."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(strategies), figsize=(4.5 * len(strategies), 3), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], strategies):
        mine = [r for r in rows if r["strategy"] == name]
        for r in mine:
            ax.plot(merge.GRID, r["curve"], lw=0.7, alpha=0.5)
        ax.plot(merge.GRID, merge.sine_curve(merge.GRID), "k--", lw=0.8)
        full = sum(r["peaks"] == 5 for r in mine)
        ax.set(title=f"{name}: {full}/{len(mine)} get all 5 peaks", xlabel="x", ylim=(-1.6, 1.6))
    return _finish(fig, path)


def plot_kept_share(rows, path=None):
    """Fig. 2's idea as numbers: the share of the student's units that each teacher gave."""
    import matplotlib.pyplot as plt
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


# == The sine experiment (section 3.2): its rows, report and bench ==============================

def sine_result(model, data):
    """Test and validation MSE, the waves it gets right, and its curve on GRID (Fig. 10)."""
    curve = merge.predict(model, merge.GRID.to(data.x_train.device)).squeeze(1).cpu()
    return dict(test_mse=round(merge.evaluate(model, data, "test"), 6),
                val_mse=round(merge.evaluate(model, data, "val"), 6),
                peaks=merge.count_peaks(curve), curve=[round(v, 4) for v in curve.tolist()])


def run_sine(s):
    rows = run_experiment(s, "sine", lambda seed, device: merge.sine_data(s, seed, device), merge.SineMLP,
                          sine_result)
    report_sine(s, rows, Path(s.out))


def report_sine(s, rows, out):
    """summary.md (Table 1) printed and saved; Figs. 5, 8a, 9, 10 and the kept shares as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    names = s.strategies.split(",")
    table = summarize(rows, "test_mse", names, extra={
        "all 5 peaks": lambda mine: f"{sum(r['peaks'] == 5 for r in mine)}/{len(mine)}",
        "kept from teachers": lambda mine: " / ".join(
            f"{v:.2f}" for v in np.mean([r["kept_from_teacher"] for r in mine], 0))
        if "kept_from_teacher" in mine[0] else ""})
    text = (f"# Sine problem, Table 1: test MSE over {s.runs} runs, {s.epochs} epochs per strategy, "
            f"k = {s.teachers}\n\n{table}\n")
    (out / "summary.md").write_text(text)
    print(text)
    importance = merge.budget(s)["importance"]
    plot_lambda(merge.lambda_schedule(importance, s.lambda_start, s.lambda_step, round(s.paper_epochs / 6)),
                merge.lambda_schedule(round(s.paper_epochs / 6), s.lambda_start, s.lambda_step),
                out / "fig5_lambda.png")
    plot_sine_data(merge.sine_data(s, merge.run_seed(s.seed, 0)), out / "fig8a_data.png")
    plot_box(rows, "test_mse", names, out / "fig9_box.png", f"Fig. 9: test MSE over {s.runs} runs")
    plot_curves(rows, names, out / "fig10_curves.png")
    plot_kept_share(rows, out / "fig2_kept_share.png")
    merge.log(f"wrote {out}/summary.md and figures")


def bench(s):
    """Seconds per model-epoch of the sine's teacher phase: the one-at-a-time loop (fit) against
    the stacked trainer at several stack sizes, in this process, on the same data. Steady
    state: the median of epochs 2 to 4, so warming up and compiling are not counted."""
    device = resolve_device(s.device)
    data = merge.sine_data(s, 0, device)

    def seconds(trainer, R, epochs=4):
        models = merge.new_models(merge.SineMLP, range(R), device)
        if trainer == "one at a time":
            history = merge.fit(models[0], data, s, epochs)
        else:
            history = merge.fit_stacked(models, [data] * R, dataclasses.replace(s, compile=int(trainer == "stacked")),
                                        epochs, seeds=range(R))
        return float(np.median([h["seconds"] for h in history[1:]])) / R

    rows = []
    for trainer, R in [("one at a time", 1), ("stacked", 1), ("stacked", 10), ("stacked", 50),
                       ("stacked", 300), ("stacked, eager", 300)]:
        rows.append((trainer, R, seconds(trainer, R)))
        merge.log(f"bench: {trainer}, {R} models: {rows[-1][2]:.5f} s per model-epoch")
    lines = [f"Sine teacher phase, {s.n_train} points, batch {s.batch}, {torch.get_num_threads()} threads, "
             f"{device}: seconds per model-epoch", "", "| trainer | models | s / model-epoch | speed-up |",
             "|---|---|---|---|"]
    lines += [f"| {t} | {R} | {sec:.5f} | {rows[0][2] / sec:.1f}x |" for t, R, sec in rows]
    print("\n".join(lines))


# == Command line ===================================================================================

def run_task(s):
    check_settings(s)
    bench(s) if s.bench else run_sine(s)


def main(argv=None, parse=parse_settings, run=run_task):
    """The command line of merge.py and of the experiment scripts: bad input ends as one line on
    stderr and exit code 2."""
    s = parse(argv)
    try:
        run(s)
    except InputError as e:
        fail(e)


if __name__ == "__main__":
    main(sys.argv[1:])
