"""What the experiments share: settings and the command line, the run loop with results and resuming
(also over torchrun's ranks or --workers' processes), the summary tables, the bench and the sine's
report. merge.py is the method; read this file to learn how runs are stored, resumed and drawn
(`python merge.py` runs main).

An --out folder holds settings.json (a later command on it must use the same settings), results.jsonl
(one line per finished run and strategy), phases/ (every finished training phase, so that a killed run
resumes), summary.md and the figures. One command at a time uses it (a lock); files are written whole.
"""
import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

import baselines
import merge
import plots
from merge import InputError

# == Settings and the command line ================================================================

STRATEGIES = {**merge.STRATEGIES, **baselines.STRATEGIES}  # by name: the paper's, our controls, the baselines
AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
NOT_NEGATIVE = (lambda v: v >= 0, "0 or more")
POSITIVE = (lambda v: v > 0, "above 0")
FRACTION = (lambda v: 0 < v < 1, "between 0 and 1")
MAX_SEED = 10 ** 9  # phase seeds stay far below 2^63, torch's limit

def setting(default, help, **extra):
    """A settings field with its help text (unit, and where the value comes from) and, as valid,
    the test a number must pass with what it must be."""
    return field(default=default, metadata=dict(help=help, **extra))

@dataclass
class Settings:
    """The settings every experiment has; the defaults are the sine's (section 3.2 and
    REFERENCE.md). Each experiment adds its own fields (SineSettings below, the image scripts')."""
    metric: ClassVar[str] = "test_mse"  # the number every row has, the one the summaries compare
    runs: int = setting(50, "independent runs, each with its own models and seeds", run_only=True,
                        valid=(lambda v: 1 <= v <= merge.MAX_RUNS, f"from 1 to {merge.MAX_RUNS}"))
    seed: int = setting(0, "base seed: run r has the run seed 1000 seed + r (ours)",
                        valid=(lambda v: 0 <= v <= MAX_SEED, f"from 0 to {MAX_SEED}"))
    epochs: int = setting(900, "epochs per strategy, the whole budget; every phase and lr drop scales with it",
                          valid=AT_LEAST_1)
    teachers: int = setting(2, "k, the number of teachers merged into one student (paper: 2)",
                            valid=(lambda v: 2 <= v <= merge.MAX_TEACHERS, f"from 2 to {merge.MAX_TEACHERS}"))
    device: str = setting("auto", "where to train: auto picks cuda when torch sees a GPU",
                          choices=("auto", "cpu", "cuda"), run_only=True)
    out: str = setting("runs/sine", "folder for results.jsonl, summary.md and the figures", run_only=True)
    strategies: str = setting("student,bo3,one", "comma-separated, of student, bo3, one (section 3.1), the controls "
                                                 "random and one_compute (ours), prune and fusion (3.3); more may "
                                                 "be added to an --out later", run_only=True)
    batch: int = setting(32, "examples per SGD step", valid=AT_LEAST_1)
    lr: float = setting(0.01, "SGD learning rate, divided by 10 at each drop", valid=POSITIVE)
    momentum: float = setting(0.9, "SGD momentum", valid=(lambda v: 0 <= v < 1, "from 0 to below 1"))
    weight_decay: float = setting(0.0, "SGD weight decay", valid=NOT_NEGATIVE)
    gate_lr: float = setting(0.1, "learning rate of the gates' own SGD, momentum 0.9, no weight decay",
                             valid=POSITIVE)
    lambda_start: float = setting(0.01, "lambda at the start of the importance phase (Fig. 5)", valid=POSITIVE)
    lambda_step: float = setting(0.05, "lambda += step sqrt(lambda) before each epoch (Fig. 5)", valid=NOT_NEGATIVE)
    paper_epochs: int = setting(900, "the budget the lambda step is tuned for; other budgets rescale the step so "
                                     "that lambda ends where the paper's does (ours)", valid=AT_LEAST_1)
    stack: int = setting(1, "1: train the models of a phase of all runs as one stack (fit_stacked); "
                            "0: one at a time, like the paper's scripts (ours)", run_only=True, choices=(0, 1))
    compile: int = setting(1, "1: torch.compile the stacked step, falling back to eager where it can't (ours)",
                           run_only=True, choices=(0, 1))
    finetune_lr: float = setting(0.0, "lr at the start of fine-tuning; 0: --lr (ImageNet: 0.07)", valid=NOT_NEGATIVE)
    finetune_warmup: int = setting(0, "epochs of linear lr warm-up at the start of fine-tuning (ImageNet: 2)",
                                   valid=NOT_NEGATIVE)
    phase_epochs: tuple = ()  # (teacher, importance, fine-tune, bo3, one) epochs given explicitly (imagenet.py)
    phase_dir: str = field(default="", metadata=dict(run_only=True))  # set by the run loop: --out/phases
    # lr / 10 at these fractions of each phase (3.2: at 250 of 300 epochs, none, at 100 of 150, at 800 of 900)
    drops_teacher: tuple = (5 / 6,)
    drops_importance: tuple = ()
    drops_finetune: tuple = (2 / 3,)
    drops_one: tuple = (8 / 9,)

@dataclass
class SineSettings(Settings):
    """The sine experiment (section 3.2): Settings, and its data."""
    task: str = setting("sine", "experiment (section 3.2); the image experiments have their own scripts",
                        choices=("sine",))
    n_train: int = setting(10_000, "training points (paper: 10,000)", valid=AT_LEAST_1)
    n_val: int = setting(2_000, "validation points, drawn the same way, for choosing bo3 (ours)", valid=AT_LEAST_1)
    n_test: int = setting(10_000, "test points, drawn the same way (ours)", valid=AT_LEAST_1)
    noise: float = setting(0.2, "standard deviation of the noise on y (paper: N(0, 0.2))", valid=NOT_NEGATIVE)
    bench: bool = setting(False, "print the speed of the one-at-a-time and the stacked trainers, then exit",
                          run_only=True)
    workers: int = setting(0, "processes that share the runs, each a rank with one thread (ours); 0: one per CPU "
                              "core, at most 8 and at most --runs, or 1 on a GPU", run_only=True, valid=NOT_NEGATIVE)

def flag(f):
    """The command-line flag of a settings field: n_train -> --n-train."""
    return "--" + f.name.replace("_", "-")

def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)

def check_settings(s):
    """One InputError for the first setting that cannot work, before anything is trained or written."""
    for f in dataclasses.fields(s):
        value, (test, what) = getattr(s, f.name), f.metadata.get("valid", (None, ""))
        if test and not (math.isfinite(value) and test(value)):
            raise InputError(f"{flag(f)} must be {what}, got {value}")
    names = s.strategies.split(",")
    if set(names) - set(STRATEGIES) or len(set(names)) < len(names):
        raise InputError(f"--strategies {s.strategies!r}: name each of {', '.join(STRATEGIES)} at most once, "
                         "with commas between")
    if min(merge.budget(s).values()) < 1:
        enough = next(e for e in range(1, 10_000) if min(merge.budget(dataclasses.replace(s, epochs=e)).values()) >= 1)
        raise InputError(f"--epochs {s.epochs} leaves a phase without epochs for {s.teachers} teachers; "
                         f"use at least {enough}")
    if resolve_device(s.device) == "cuda" and getattr(s, "workers", 0) > 1 and torch.cuda.device_count() < s.workers:
        raise InputError(f"--workers {s.workers} on --device cuda wants a GPU each; torch sees "
                         f"{torch.cuda.device_count()}")
    checked_out(s)

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
        name, text = flag(f), f"{f.metadata['help']} [{value}]"
        if isinstance(value, bool):
            parser.add_argument(name, dest=f.name, action="store_true", help=text)
        elif isinstance(value, tuple):  # file names, epochs
            parser.add_argument(name, dest=f.name, nargs=f.metadata["nargs"], default=value, help=text,
                                type=f.metadata.get("type", str), metavar=f.metadata.get("metavar", "FILE"))
        else:
            parser.add_argument(name, dest=f.name, type=type(value), default=value, choices=f.metadata.get("choices"),
                                help=text)
    args = parser.parse_args(argv)
    return dataclasses.replace(defaults, **{f.name: tuple(v) if isinstance(v := getattr(args, f.name), list) else v
                                            for f in flags})

def parse_with_presets(argv, base, choice, presets, description):
    """parse_settings with defaults that follow one choice (--arch, --experiment): base's fields
    replaced by those of presets[the choice], so that --help shows them."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.error = fail
    pre.add_argument("--" + choice, default=getattr(base, choice), choices=presets)
    chosen = getattr(pre.parse_known_args(argv)[0], choice)
    return parse_settings(argv, dataclasses.replace(base, **{choice: chosen}, **presets[chosen]), description)

# == The --out folder: one command at a time, files written whole, each row read once ===========

def write_whole(path, text):
    """path holds text, or what it held before: never a part (a temporary file, then a rename)."""
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    part.write_text(text)
    part.replace(path)

def checked_out(s):
    """--out as a folder this command may create and write, or one line saying why not."""
    if not s.out.strip():
        raise InputError("--out is empty; name a folder")
    out = Path(s.out)
    for place in [out, *out.parents]:
        if place.exists():
            if not place.is_dir():
                raise InputError(f"--out {out}: {place} is not a folder")
            if not os.access(place, os.W_OK | os.X_OK):
                raise InputError(f"--out {out}: {place} is not writable")
            return out
    return out

def settings_record(s, out):
    """The settings that results in out must share (all but run_only ones), checked with out/settings.json."""
    record = json.loads(json.dumps({f.name: getattr(s, f.name) for f in dataclasses.fields(s)
                                    if not f.metadata.get("run_only")}))
    path = out / "settings.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
            assert isinstance(old, dict)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AssertionError):
            raise InputError(f"{path} is not a settings file; repair or remove it, or use another --out") from None
        defaults = json.loads(json.dumps({f.name: getattr(type(s)(), f.name) for f in dataclasses.fields(s)}))
        changed = [f"{key} {old.get(key)} -> {value}" for key, value in record.items()  # a setting added since, at
                   if old.get(key, defaults.get(key)) != value]  # its default, keeps the experiment as it was
        if changed:
            raise InputError(f"{out} holds results made with other settings ({', '.join(changed)}); "
                             "use another --out")
    return record

def read_rows(out, metric):
    """The rows of out/results.jsonl, one per (run, strategy), and whether it needs a repair: a last line
    cut short by a crash is dropped (its run redone), a repeated row read once; any other bad line refused."""
    path = out / "results.jsonl"
    try:
        text = path.read_text() if path.exists() else ""
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path} ({type(e).__name__}); repair or remove it") from None
    lines, rows, seen = text.splitlines(), [], set()
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            ok = isinstance(row, dict) and type(row.get("run")) is int and row["run"] >= 0 and \
                isinstance(row.get("strategy"), str) and type(row.get(metric)) in (int, float)
        except json.JSONDecodeError:
            ok = False
        if not ok and number == len(lines) and not text.endswith("\n"):
            continue  # the line a crash cut short
        if not ok:
            raise InputError(f"{path}, line {number}, is not a result row ({line[:40]!r}); repair or remove it")
        if (row["run"], row["strategy"]) not in seen:
            seen.add((row["run"], row["strategy"]))
            rows.append(row)
    return rows, len(rows) != len(lines) or bool(text) and not text.endswith("\n")

@contextlib.contextmanager
def locked(s):
    """--out for this command alone: its settings.json and results.jsonl checked first (a wrong one is
    refused before anything is written), then --out/.lock locked until the command ends (fcntl; without
    it, two commands on one --out are the user's to avoid). Over ranks, rank 0 checks and locks, and
    every rank learns its answer: none trains into an --out that rank 0 refused."""
    out, handle, refusal = checked_out(s), contextlib.nullcontext(), None
    if ranks()[0] == 0:
        try:
            handle = lock(s, out)
        except InputError as e:
            refusal = str(e)
    if ranks()[1] > 1:
        answer = [refusal]
        torch.distributed.broadcast_object_list(answer)
        refusal = answer[0]
    if refusal:
        raise InputError(refusal)
    with handle:
        yield out

def lock(s, out):
    """out/.lock, open and locked, after out's settings.json and results.jsonl passed their checks."""
    settings_record(s, out)
    read_rows(out, s.metric)
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / ".lock", "a")
    except OSError as e:
        raise InputError(f"cannot write to --out {out} ({e.strerror or type(e).__name__})") from None
    try:
        import fcntl
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        pass
    except OSError:
        handle.close()
        raise InputError(f"--out {out} is in use by another command; let it finish or use another --out") from None
    return handle

def append_result(out, row):
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")

# == The run loop =================================================================================

STACK_RUNS = 100  # runs trained as one stack at most, so that memory does not grow with --runs

def stack_first_phases(s, todo, make_data, make_teacher, device):
    """The first phases of several strategies that are one computation (fresh models of the teachers'
    architecture, equal epochs and lr drops: the sine's teachers and bo3 models) trained as one stack,
    before the strategies run and load them from --out/phases. todo: strategy -> its runs to do.
    A stack changes no model: each trains on its own data, order and noise (merge.fit_stacked)."""
    groups = {}  # (epochs, drops) -> the phases (name, models a run) and the runs to train them for
    for name, runs in todo.items():
        if merge.first_phase(s, name) and runs:
            phase, copies, epochs, drops = merge.first_phase(s, name)
            group = groups.setdefault((epochs, tuple(drops)), dict(phases=set(), runs=set()))
            group["phases"].add((phase, copies))
            group["runs"] |= set(runs)
    for (epochs, drops), group in groups.items():
        if len(group["phases"]) < 2:
            continue  # one strategy's own phase: it trains it itself
        runs = sorted(group["runs"])
        for chunk in [runs[i:i + STACK_RUNS] for i in range(0, len(runs), STACK_RUNS)]:
            seeds = [merge.run_seed(s.seed, run) for run in chunk]
            datas = [make_data(seed, device) for seed in seeds]
            models = [(phase, merge.phase_seed(seed, phase, i), data) for phase, copies in sorted(group["phases"])
                      for i in range(copies) for seed, data in zip(seeds, datas)]
            merge.train(merge.new_models(make_teacher, [m[1] for m in models], device), [m[2] for m in models], s,
                        epochs, drops, [m[1] for m in models], phase=[m[0] for m in models])

def ranks():
    """(this process's rank, the number of processes): torchrun's, or (0, 1) for a plain python."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

def start_ranks(s):
    """The process group of torchrun's processes: NCCL between GPUs (a rank each), else gloo."""
    if sys.platform == "linux":
        import ctypes
        ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG: killed with its launcher, so no rank outlives a kill
    cuda = resolve_device(s.device) == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.distributed.init_process_group("nccl" if cuda else "gloo")

def workers(s):
    """--workers with 0 resolved: one process per CPU core, at most 8 (each holds its own torch) and at
    most --runs; on a GPU, one."""
    if s.workers or resolve_device(s.device) == "cuda":
        return s.workers or 1
    return min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8, s.runs)

def launch(s, n):
    """This command as n processes, ranks of one process group with one thread each (as torchrun would
    start them): each trains every n-th run, rank 0 writes the rows, which are those of one process (a
    test checks it). On a CPU, n single-threaded processes beat one with n threads: much of a step of the
    small sine models is Python that one thread runs. This process waits, and passes Ctrl-C on."""
    out = checked_out(s)  # a wrong --out is refused here, before any process starts
    settings_record(s, out)
    read_rows(out, s.metric)
    try:  # a free port for the ranks' process group
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
    except OSError as e:
        merge.log.warning(f"note: no local port for {n} processes ({e.strerror or type(e).__name__}); one process trains")
        return run_sine(s)
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(n))
    argv = [f"{flag(f)}={getattr(s, f.name)}"
            for f in dataclasses.fields(s) if "help" in f.metadata and not isinstance(getattr(s, f.name), (bool, tuple))]
    procs = [subprocess.Popen([sys.executable, merge.__file__, *argv], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              start_new_session=True) for r in range(n)]  # Ctrl-C reaches them from here, once
    failed = None  # when the first process failed
    try:
        while any(p.poll() is None for p in procs):
            failed = failed or (time.time() if any(p.poll() for p in procs) else None)
            if failed and time.time() > failed + 10:  # the others did not end with it: they would wait for ever
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
            time.sleep(0.1)
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
    codes = [p.returncode for p in procs]
    if any(codes):  # rank 0's exit code where it has one, else another's; a signal's (negative): 1
        sys.exit(next((code for code in codes if code > 0), 1))

def run_experiment(s, title, make_data, make_teacher, result, replicas=False):
    """The loop of every experiment, inside `with locked(s)`: for each strategy, the runs not yet in
    --out/results.jsonl, in stacks (s.stack) or one at a time; each finished (run, strategy) written at once
    as a JSON line, finished phases kept in --out/phases, so that a killed experiment resumes. make_data(seed,
    device) -> a run's Data; result(model, data) -> its row's numbers. Under torchrun each rank takes whole
    runs and rank 0 writes all rows; with replicas (DDP, imagenet.py) every rank runs every run."""
    (rank, world), device, out = ranks(), resolve_device(s.device), Path(s.out)
    results, repair = read_rows(out, s.metric)
    if rank == 0:
        write_whole(out / "settings.json", json.dumps(settings_record(s, out), indent=1) + "\n")
    if rank == 0 and repair:
        write_whole(out / "results.jsonl", "".join(json.dumps(row) + "\n" for row in results))
        merge.log.info(f"repaired {out / 'results.jsonl'}: a cut or repeated line removed")
    s, done = dataclasses.replace(s, phase_dir=str(out / "phases")), {(r["run"], r["strategy"]) for r in results}
    names, split = s.strategies.split(","), world > 1 and not replicas
    merge.log.info(f"{title}: {s.runs} runs x {len(names)} strategies, {s.epochs} epochs each, on {device}"
                   f"{f' in {world} processes' if world > 1 else ''}; "
                   f"{len(done)} results already in {out}")
    share = slice(rank, None, world) if split else slice(None)  # the runs of this rank
    todo = {name: [run for run in range(s.runs) if (run, name) not in done][share] for name in names}
    if s.stack:
        stack_first_phases(s, todo, make_data, make_teacher, device)
    for name in names:
        size, rows = STACK_RUNS if s.stack else 1, []
        for runs in [todo[name][i:i + size] for i in range(0, len(todo[name]), size)]:
            merge.log.info(f"{name}: runs {runs[0] + 1}-{runs[-1] + 1} of {s.runs}" if len(runs) > 1 else
                           f"{name}: run {runs[0] + 1} of {s.runs}")
            seeds = [merge.run_seed(s.seed, run) for run in runs]
            datas = [make_data(seed, device) for seed in seeds]
            outcomes = STRATEGIES[name](datas, s, make_teacher, seeds)
            for run, seed, data, (model, info) in zip(runs, seeds, datas, outcomes):
                rows.append(dict(run=run, strategy=name, seed=seed, **info, **result(model, data)))
                if rank == 0 and not split:
                    append_result(out, rows[-1])
        if split:  # every rank's rows, to rank 0
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, rows)
            rows = sorted((row for part in gathered for row in part), key=lambda row: row["run"])
            if rank == 0:
                for row in rows:
                    append_result(out, row)
        results += rows
        merge.log.info(f"{name}: {len(rows)} runs written to {out / 'results.jsonl'}")
    return [r for r in results if r["run"] < s.runs]

# == Summaries =====================================================================================

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
        mine = [r for r in rows if r["strategy"] == name]
        stages = np.array([[best(r["teachers_test"]), r["big_student_test"], r["compressed_val"], r["compressed_test"],
                            r[metric]] for r in mine]).reshape(-1, len(STAGES))
        if per_run:
            lines += [f"| {name} | {r['run']} | " + " | ".join(f"{v:.4f}" for v in values) + " |"
                      for r, values in zip(mine, stages)]
        if mine:
            lines.append(f"| {name} | mean of {len(mine)} | " + " | ".join(f"{v:.4f}" for v in stages.mean(0)) + " |")
    return "\n".join(lines)

# == The sine experiment (section 3.2): its rows, report and bench ==============================

def sine_result(model, data):
    """Test and validation MSE, the waves it gets right, and its curve on GRID (Fig. 10)."""
    curve = merge.predict(model, merge.GRID.to(data.x_train.device)).squeeze(1).cpu()
    return dict(test_mse=round(merge.evaluate(model, data, "test"), 6),
                val_mse=round(merge.evaluate(model, data, "val"), 6),
                peaks=merge.count_peaks(curve), curve=[round(v, 4) for v in curve.tolist()])

def run_sine(s):
    with locked(s) as out:
        rows = run_experiment(s, "sine", lambda seed, device: merge.sine_data(s, seed, device), merge.SineMLP,
                              sine_result)
        report_sine(s, rows, out)

def report_sine(s, rows, out):
    """summary.md (Table 1) printed and saved; Figs. 5, 8a, 9, 10 and the kept shares as PNG."""
    if ranks()[0] > 0:
        return  # rank 0 writes
    import matplotlib
    matplotlib.use("Agg")
    names = s.strategies.split(",")
    shares = lambda mine: " / ".join(f"{v:.2f}" for v in np.mean([r["kept_from_teacher"] for r in mine], 0))
    student = {r["run"]: r["test_mse"] for r in rows if r["strategy"] == "student"}  # to compare run by run
    beaten = lambda mine: f"{sum(student[r['run']] < r['test_mse'] for r in mine)}/{len(mine)}"
    table = summarize(rows, "test_mse", names, extra={
        "all 5 peaks": lambda mine: f"{sum(r['peaks'] == 5 for r in mine)}/{len(mine)}",
        "kept from teachers": lambda mine: shares(mine) if "kept_from_teacher" in mine[0] else "",
        "student lower": lambda mine: beaten(mine) if mine[0]["strategy"] != "student" and student.keys() >= {
            r["run"] for r in mine} else ""})
    text = (f"# Sine problem, Table 1: test MSE over {s.runs} runs, {s.epochs} epochs per strategy, "
            f"k = {s.teachers}\n\n{table}\n")
    if any(r["strategy"] in ("student", "random") for r in rows):
        text += f"\nTest MSE at each stage (per run in stages.md):\n\n{stage_table(rows, 'test_mse')}\n"
        write_whole(out / "stages.md", stage_table(rows, "test_mse", per_run=True) + "\n")
    write_whole(out / "summary.md", text)
    print(text)
    importance = merge.budget(s)["importance"]
    plots.plot_lambda(merge.lambda_schedule(importance, s.lambda_start, s.lambda_step, round(s.paper_epochs / 6)),
                merge.lambda_schedule(round(s.paper_epochs / 6), s.lambda_start, s.lambda_step),
                out / "fig5_lambda.png")
    plots.plot_sine_data(merge.sine_data(s, merge.run_seed(s.seed, 0)), out / "fig8a_data.png")
    plots.plot_box(rows, "test_mse", names, out / "fig9_box.png", f"Fig. 9: test MSE over {s.runs} runs")
    plots.plot_curves(rows, names, out / "fig10_curves.png")
    if any(r["strategy"] == "student" for r in rows):
        plots.plot_kept_share(rows, out / "fig2_kept_share.png")
    merge.log.info(f"wrote {out}/summary.md and figures")

def bench(s):
    """Seconds per model-epoch of the sine's teacher and importance phases: fit, one at a time, against the
    stacked trainer at several stack sizes, in this process, on the same data; the median of epochs 2 to 4."""
    device, rows = resolve_device(s.device), []
    data = merge.sine_data(s, 0, device)
    for phase, trainer, R in [("teacher", "one at a time", 1), ("teacher", "stacked", 1), ("teacher", "stacked", 10),
                              ("teacher", "stacked", 50), ("teacher", "stacked", 300),
                              ("teacher", "stacked, eager", 300), ("importance", "one at a time", 1),
                              ("importance", "stacked", 1), ("importance", "stacked", 10), ("importance", "stacked", 50)]:
        models, lambdas = merge.new_models(merge.SineMLP, range(2 * R), device), None
        if phase == "importance":
            models, lambdas = [merge.make_big_student(models[2 * r:2 * r + 2]) for r in range(R)], [1.0] * 4
        history = (merge.fit(models[0], data, s, 4, lambdas=lambdas) if trainer == "one at a time" else
                   merge.fit_stacked(models[:R], [data] * R, dataclasses.replace(s, compile=int(trainer == "stacked")),
                                     4, seeds=range(R), lambdas=lambdas))
        rows.append((phase, trainer, R, float(np.median([h["seconds"] for h in history[1:]])) / R))
        merge.log.info(f"bench: {phase}, {trainer}, {R} models: {rows[-1][3]:.5f} s per model-epoch")
    alone = {phase: sec for phase, trainer, _, sec in rows if trainer == "one at a time"}
    lines = [f"Sine, {s.n_train} points, batch {s.batch}, {torch.get_num_threads()} threads, {device}: seconds per "
             "model-epoch", "", "| phase | trainer | models | s / model-epoch | speed-up |", "|---|---|---|---|---|"]
    lines += [f"| {p} | {t} | {R} | {sec:.5f} | {alone[p] / sec:.1f}x |" for p, t, R, sec in rows]
    print("\n".join(lines))

# == Command line ===================================================================================

def run_task(s):
    check_settings(s)
    if s.bench:
        bench(s)
    elif ranks()[1] == 1 and workers(s) > 1:  # not yet a rank: start the ranks
        launch(s, workers(s))
    else:
        run_sine(s)

class Progress(logging.Handler):
    """Shows merge.log's reports stamped with the seconds since the command began; a phase's epochs as a bar on a
    terminal (epochs done, training error, time left), in a file a line at each fifth of a phase of 20 or more."""

    def __init__(self):
        super().__init__()
        self.start = time.time()

    def emit(self, record):
        done, epochs, error = record.args if hasattr(record, "epochs") else (0, 0, 0)
        if epochs and sys.stdout.isatty():
            left = (time.time() - record.began) / done * (epochs - done)
            print(f"\r    [{'#' * (30 * done // epochs):<30}] {done}/{epochs} epochs, training error {error:.4f}, "
                  f"{left:.0f} s left ", end="\n" if done == epochs else "", flush=True)
        elif not epochs or done % max(1, epochs // 5) == 0 and epochs >= 20:
            print(f"[{time.time() - self.start:7.1f}s] {record.getMessage()}", flush=True)

def show_progress(quiet=False):
    """merge.log's reports on stdout, timed from now (one Progress handler); quiet: warnings only (ranks > 0)."""
    merge.log.handlers = [Progress()]
    merge.log.setLevel(logging.WARNING if quiet else logging.INFO)
    merge.log.propagate = False

def main(argv=None, parse=parse_settings, run=run_task):
    """merge.py's and the scripts' command line: bad input is one line and exit code 2; Ctrl-C one line."""
    s = parse(argv)
    show_progress(quiet=ranks()[0] > 0)
    try:
        if ranks()[1] > 1:
            start_ranks(s)
        run(s)
        if torch.distributed.is_initialized():  # every rank finished before any tears down its process group
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
    except InputError as e:
        if torch.distributed.is_initialized():  # torn down, so that no rank aborts at exit
            torch.distributed.destroy_process_group()
        fail(e) if ranks()[0] == 0 else sys.exit(2)  # rank 0 says it
    except KeyboardInterrupt:
        if ranks()[0] > 0:
            sys.exit(130)
        out = Path(s.out)
        try:
            kept = f"{len(read_rows(out, s.metric)[0])} results in {out / 'results.jsonl'}"
        except Exception:  # noqa: BLE001 - the message must not fail
            kept = f"the results in {out / 'results.jsonl'}"
        if sys.stdout.isatty():
            print()  # end a progress bar's line
        print(f"interrupted: kept {kept} and every finished phase in {out / 'phases'}; the same command "
              "resumes from there", file=sys.stderr)
        sys.exit(130)

