"""The sine experiment (section 3.2) run by the machinery: `python merge.py --task sine` hands over to
main() here. Its settings, the numbers of a row, the report (Table 1, Figs. 5, 8a, 9, 10), the bench of
the stacked trainer, and the command spread over one process per CPU core (--workers)."""
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

import experiment
import launcher
import merge
import report
import stacked
import startup
from experiment import NOT_NEGATIVE, setting

POINTS = (lambda v: 1 <= v <= 10 ** 6, "from 1 to 1,000,000")  # a chunk of runs' data sets is held at once

@dataclass
class SineSettings(experiment.Settings):
    """The sine experiment: the method's and the runs' settings (their defaults are the sine's), and its data."""
    row_keys: ClassVar[tuple] = ("val_mse", "peaks", "curve")
    # --device auto keeps the sine on the CPU, where the README's rows come from to the last digit (a GPU draws
    # other orders); --device cuda takes the GPU, the faster: 39-50 s on one H100 (docs/speed.md)
    gpu_pays: ClassVar[bool] = False
    task: str = setting("sine", "experiment (section 3.2); the image experiments have their own scripts",
                        choices=("sine",))
    n_train: int = setting(10_000, "training points (3.2: 10,000)", valid=POINTS)
    n_val: int = setting(2_000, "validation points, drawn the same way, for choosing bo3 (ours)", valid=POINTS)
    n_test: int = setting(10_000, "test points, drawn the same way (the authors' scripts)", valid=POINTS)
    noise: float = setting(0.2, "standard deviation of the noise on y (3.2: N(0, 0.2))", valid=NOT_NEGATIVE)
    bench: bool = setting(False, "print the speed of the one-at-a-time and the stacked trainers, then exit", run_only=True)
    workers: int = setting(0, "processes that share the runs, each a rank with one thread (ours), never more than "
                                  "--runs; 0: one per CPU core (a container's CPU quota counts), at most 8, or 1 on a GPU",
                           valid=NOT_NEGATIVE, run_only=True)

def data(s, seed, device="cpu"):
    return merge.sine_data(seed, s.n_train, s.n_val, s.n_test, s.noise, device)

def result(model, data):
    """Test and validation MSE, the waves it gets right, and its curve on GRID (Fig. 10)."""
    curve = merge.predict(model, merge.GRID.to(data.device)).squeeze(1).cpu()
    return dict(test_mse=round(data.evaluate(model, "test"), 6), val_mse=round(data.evaluate(model, "val"), 6),
                peaks=merge.count_peaks(curve), curve=[round(v, 4) for v in curve.tolist()])

def run(s):
    with experiment.locked(s) as out:
        rows = experiment.run_experiment(s, "sine", lambda seed, device: data(s, seed, device), merge.SineMLP, result)
        write_report(s, rows, out)

def run_study(s, studies, heading, table, plot, figure):
    """A study of several sine experiments, each of studies [(key, title, settings)] in its own --out folder:
    all checked before any trains, each run (resumable) and reported there; then the study's table(rows_of),
    headed, in s.out/summary.md, and its plot(rows_of, path) as s.out/figure."""
    if s.bench:
        raise experiment.InputError("--bench times the sine's trainers: python merge.py --task sine --bench")
    if s.workers > 1:
        raise experiment.InputError("--workers is not used: a study trains in one process")
    out, marker = Path(s.out), {"study": type(s).__name__}  # study.json: this folder is this study's
    if (out / "settings.json").exists() or (out / "results.jsonl").exists():
        raise experiment.InputError(f"--out {out} holds an experiment's results; a study's experiments go in folders "
                                    "of their own below its --out: use another")
    try:
        other = (out / "study.json").exists() and (out / "study.json").read_text() != json.dumps(marker)
    except (OSError, UnicodeDecodeError):  # unreadable: not this study's either
        other = True
    if other:
        raise experiment.InputError(f"--out {out} holds another study (its study.json); use another --out")
    for _, title, settings in studies:
        try:
            experiment.check_settings(settings)
        except experiment.InputError as e:  # named: the study made these settings, not the command line
            raise experiment.InputError(f"{title}: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    report.write_whole(out / "study.json", json.dumps(marker))
    rows_of = {}
    for key, title, settings in studies:
        with experiment.locked(settings) as folder:
            rows_of[key] = experiment.run_experiment(settings, title, lambda seed, device: data(settings, seed, device),
                                                     merge.SineMLP, result)
            write_report(settings, rows_of[key], folder)
    text = f"# {heading}\n\n{table(rows_of)}\n"
    report.write_whole(out / "summary.md", text)
    print(text)
    plot(rows_of, out / figure)

def write_report(s, rows, out):
    """summary.md (Table 1) printed and saved; Figs. 5, 8a, 9, 10 and the kept shares as PNG."""
    if experiment.ranks()[0] > 0:
        return  # rank 0 writes
    import matplotlib
    matplotlib.use("Agg")
    names, runs = s.strategies.split(","), report.count(s.runs, "run")
    shares = lambda mine: " / ".join(f"{v:.2f}" for v in np.mean([r["kept_from_teacher"] for r in mine], 0))
    student = {r["run"]: r["test_mse"] for r in rows if r["strategy"] == "student"}  # to compare run by run
    beaten = lambda mine: f"{sum(student[r['run']] < r['test_mse'] for r in mine)}/{len(mine)}"
    table = report.summarize(rows, "test_mse", names, extra={
        "all 5 peaks": lambda mine: f"{sum(r['peaks'] == 5 for r in mine)}/{len(mine)}",
        "kept from teachers": lambda mine: shares(mine) if "kept_from_teacher" in mine[0] else "",
        "student lower": lambda mine: beaten(mine) if mine[0]["strategy"] != "student" and student.keys() >= {
            r["run"] for r in mine} else ""})
    text = (f"# Sine problem, Table 1: test MSE over {runs}, {s.epochs} epochs per strategy, "
            f"k = {s.teachers}\n\n{table}\n")
    if any(r["strategy"] in ("student", "random") for r in rows):
        text += f"\nTest MSE at each stage (per run in stages.md):\n\n{report.stage_table(rows, 'test_mse')}\n"
        report.write_whole(out / "stages.md", report.stage_table(rows, "test_mse", per_run=True) + "\n")
    report.write_whole(out / "summary.md", text)
    print(text)
    importance = merge.budget(s)["importance"]
    report.plot_lambda(merge.lambda_schedule(importance, s.lambda_start, s.lambda_step, round(s.paper_epochs / 6)),
                       merge.lambda_schedule(round(s.paper_epochs / 6), s.lambda_start, s.lambda_step),
                       out / "fig5_lambda.png")
    report.plot_sine_data(data(s, experiment.run_seed(s.seed, 0)), out / "fig8a_data.png")
    report.plot_box(rows, "test_mse", names, out / "fig9_box.png", f"Fig. 9: test MSE over {runs}")
    report.plot_curves(rows, names, out / "fig10_curves.png")
    if any(r["strategy"] == "student" for r in rows):
        report.plot_kept_share(rows, out / "fig2_kept_share.png")
    experiment.log.info(f"wrote {out}/summary.md and figures")

def fold_table(rows, folded):
    """The fold study: the student and the random control, compressed as the paper does (rows) and with the
    kept gates folded into the next layer (folded rows, --fold 1): test MSE compressed and at the end."""
    lines = ["| strategy | compression | compressed, before fine-tuning (test, mean) | final (test, mean) | median | "
             "all 5 peaks | student lower |", "|---|---|---|---|---|---|---|"]
    for name in ("student", "random"):
        for how, these in (("gates dropped (paper)", rows), ("gates folded (--fold 1)", folded)):
            student = {r["run"]: r["test_mse"] for r in these if r["strategy"] == "student"}  # the same compression
            mine = [r for r in these if r["strategy"] == name]
            final = [r["test_mse"] for r in mine]
            lower = f"{sum(student[r['run']] < r['test_mse'] for r in mine)}/{len(mine)}" if name == "random" else ""
            lines.append(f"| {name} | {how} | {np.mean([r['compressed_test'] for r in mine]):.4f} | "
                         f"{np.mean(final):.4f} | {np.median(final):.4f} | {sum(r['peaks'] == 5 for r in mine)}/"
                         f"{len(mine)} | {lower} |")
    return "\n".join(lines)

def bench(s):
    """Seconds per model-epoch of the sine's teacher and importance phases: merge.fit, one at a time, against
    the stacked trainer at several stack sizes, in this process, on the same data; the median of epochs 2 to 4."""
    device, rows = experiment.resolve_device(s), []
    sine = data(s, 0, device)
    for phase, trainer, R in [("teacher", "one at a time", 1), ("teacher", "stacked", 1), ("teacher", "stacked", 10),
                              ("teacher", "stacked", 50), ("teacher", "stacked", 300),
                              ("teacher", "stacked, eager", 300), ("teacher", "stacked, 1 step a block", 50),
                              ("importance", "one at a time", 1),
                              ("importance", "stacked", 1), ("importance", "stacked", 10), ("importance", "stacked", 50)]:
        models, lambdas, times = [], None, [time.time()]
        for seed in range(2 * R):
            torch.manual_seed(seed)
            models.append(merge.SineMLP().to(device))
        if phase == "importance":
            models, lambdas = [merge.make_big_student(models[2 * r:2 * r + 2]) for r in range(R)], [1.0] * 5
        clock = lambda epoch, history: times.append(time.time())
        if trainer == "one at a time":
            stacked.counter_noise(models[0], 0)
            merge.fit(models[0], sine, s, 5, lambdas=lambdas, after_epoch=clock)
        else:
            stacked.fit_stacked(models[:R], [sine] * R, s, 5, seeds=range(R), lambdas=lambdas, after_epoch=clock,
                                compile=trainer != "stacked, eager", steps_per_block=1 if "1 step" in trainer else 10)
        # epochs 2 to 4: on a GPU fit_stacked reads an epoch once the next is queued, the last alone without one
        rows.append((phase, trainer, R, float(np.median(np.diff(times)[1:-1])) / R))
        experiment.log.info(f"bench: {phase}, {trainer}, {R} models: {rows[-1][3]:.5f} s per model-epoch")
    alone = {phase: sec for phase, trainer, _, sec in rows if trainer == "one at a time"}
    lines = [f"Sine, {s.n_train} points, batch {s.batch}, {torch.get_num_threads()} threads, {device}: seconds per "
             "model-epoch", "", "| phase | trainer | models | s / model-epoch | speed-up |", "|---|---|---|---|---|"]
    lines += [f"| {p} | {t} | {R} | {sec:.5f} | {alone[p] / sec:.1f}x |" for p, t, R, sec in rows]
    print("\n".join(lines))

# == One process per core ==========================================================================

def workers(s):
    """--workers with 0 resolved: one process per CPU core it may use (startup.cpu_cores), at most 8 (each holds
    its own torch); on a GPU, one. Never more than --runs: a process without a run would idle."""
    if s.workers or experiment.resolve_device(s) == "cuda":
        return min(s.workers or 1, s.runs)
    return min(startup.cpu_cores(), 8, s.runs)

# == The command line ==============================================================================

def parse(argv=None):
    return experiment.parse_settings(argv, SineSettings(), merge.__doc__)

def run_task(s):
    experiment.check_settings(s, records=not s.bench)  # the bench writes nothing to --out
    if not s.bench and experiment.resolve_device(s) == "cuda" and experiment.ranks()[1] == 1 and \
            workers(s) > torch.cuda.device_count():
        raise experiment.InputError(f"--workers {s.workers} on the GPU: each worker takes a GPU of its own, and torch "
                                    f"sees {torch.cuda.device_count()}")
    if s.bench:
        bench(s)
    elif experiment.ranks()[1] == 1 and workers(s) > 1:  # not yet a rank: start the ranks
        launcher.launch(s, workers(s), merge.__file__, run)
    else:
        if experiment.resolve_device(s) == "cpu":  # one thread, as each of several processes has: a step of these
            torch.set_num_threads(1)  # small models is no faster with two, and much slower on a core another job uses
        run(s)

def main(argv=None):
    launcher.guard()
    experiment.main(argv, parse, run_task)

if __name__ == "__main__":  # the command is merge.py's, which hands over to main() here
    asked = bool({"-h", "--help"} & set(sys.argv[1:]))  # help asked for is not bad input: exit code 0
    sys.exit(print(f"{'' if asked else 'error: '}sine.py is the machinery of the sine experiment: run python merge.py "
                   "--task sine ... (python merge.py --help: its settings)", file=sys.stdout if asked else sys.stderr)
             or (0 if asked else 2))
