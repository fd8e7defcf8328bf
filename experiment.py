"""The run machinery around merge.py, shared by every experiment: settings and the command line, the --out
folder, the trainer the strategies are given (finished phases kept, epoch checkpoints, alike phases of all runs as
one stack) and runs over processes (torchrun's ranks). An --out folder, one command's at a time (a lock), holds
settings.json (later commands' must match), results.jsonl (a line per run and strategy), phases/ (each finished
phase: a killed run resumes), summary.md and the figures."""
import argparse
import contextlib
import copy
import dataclasses
import datetime
import errno
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

import lockstep
import merge
import report
import stacked

log = report.log  # what the runs report, shown by report.Progress

class InputError(ValueError):
    """Bad input from the user: the command line reports it as one line and exit code 2."""

# == Settings and the command line =================================================================

STRATEGIES = merge.STRATEGIES
MAX_RUNS, MAX_SEED = 1000, 10 ** 9  # run seeds 1000 * seed + run; phase seeds stay far below 2^63, torch's limit
MAX_TEACHERS, LARGEST = 10, 10 ** 9  # merge.PHASE_SEEDS' teacher offsets 0 to 9; any number (1e300 overflows float32)
AT_LEAST_1, NOT_NEGATIVE = (lambda v: v >= 1, "at least 1"), (lambda v: v >= 0, "0 or more")
POSITIVE, FRACTION = (lambda v: v > 0, "above 0"), (lambda v: 0 < v < 1, "between 0 and 1")
VALID = dict(  # what the numbers of merge.Settings and Settings must be (a tuple's: each), checked before anything runs
    epochs=AT_LEAST_1, batch=AT_LEAST_1, lr=POSITIVE, momentum=(lambda v: 0 <= v < 1, "from 0 to below 1"),
    weight_decay=NOT_NEGATIVE, gate_lr=POSITIVE, lambda_start=POSITIVE, lambda_step=NOT_NEGATIVE,
    paper_epochs=(lambda v: v >= 4, "at least 4 (its sixth, the importance phase the lambda step fits: an epoch)"),
    finetune_lr=NOT_NEGATIVE, finetune_warmup=NOT_NEGATIVE, fold=(lambda v: v in (0, 1), "0 or 1"),
    phase_epochs=AT_LEAST_1, teachers=(lambda v: 2 <= v <= MAX_TEACHERS, f"from 2 to {MAX_TEACHERS}"),
    runs=(lambda v: 1 <= v <= MAX_RUNS, f"from 1 to {MAX_RUNS}"),
    seed=(lambda v: 0 <= v <= MAX_SEED, f"from 0 to {MAX_SEED}"))

def setting(default, help, **extra):
    """A settings field: its help (unit, and where its value comes from) and, for the command line, choices,
    valid (a test, what it asks), run_only (how to run, not what: a later command may change it), type (from text)."""
    return dataclasses.field(default=default, metadata=dict(help=help, **extra))

@dataclass
class Settings(merge.Settings):
    """merge.Settings and what every experiment adds: runs, seeds, where to train and to write."""
    metric: ClassVar[str] = "test_mse"  # the number every row has, the one the summaries compare
    row_keys: ClassVar[tuple] = ()  # what else every row of the experiment holds, for its report
    gpu_pays: ClassVar[bool] = True  # whether --device auto takes a GPU torch sees (the sine's keeps its CPU rows)
    runs: int = setting(50, "independent runs, each with its own models and seeds", run_only=True)
    seed: int = setting(0, "base seed: run r has the run seed 1000 * seed + r (ours)")
    device: str = setting("auto", "where to train: auto, a GPU torch sees where one pays (not the sine's; speed.md)",
                          run_only=True, choices=("auto", "cpu", "cuda"))
    out: str = setting("runs/sine", "folder for results.jsonl, summary.md and the figures", run_only=True)
    strategies: str = setting("student,bo3,one", "comma-separated, of student, bo3, one (section 3.1), the controls "
                              "random and one_compute (ours), prune and fusion (3.3); more may be added to an --out "
                              "later", run_only=True)
    stack: str = setting("1", "1: alike phases of all runs trained as one stack (stacked.py, ours); 0: one at a time "
                         "(the authors' scripts); auto: 1 on a GPU, else 0", run_only=True, choices=("auto", "1", "0"))
    compile: str = setting("auto", "1: torch.compile the stacked step (eager where it can't); 0: eager; auto: 1, but "
                           f"0 for convolutions on a GPU in phases under {stacked.GPU_COMPILE_EPOCHS} epochs (faster: "
                           "docs/speed.md); GPU steps as CUDA graphs (ours)", run_only=True, choices=("auto", "1", "0"))

def flag(f):  # the command-line flag of a settings field: n_train -> --n-train
    return "--" + f.name.replace("_", "-")

def fail(message):
    sys.exit(print(f"error: {message}", file=sys.stderr) or 2)

def check_settings(s, records=True):
    """One InputError for the first setting that cannot work, before anything is trained or written; with
    records, --out's files too (settings.json, results.jsonl), before data is read (over ranks, rank 0's)."""
    for f in dataclasses.fields(s):
        value, (test, what) = getattr(s, f.name), VALID.get(f.name, f.metadata.get("valid", (None, "")))
        for v in value if isinstance(value, tuple) else (value,):  # a tuple's every element
            if test and not (math.isfinite(v) and test(v) and abs(v) <= LARGEST):
                raise InputError(f"{flag(f)} must be {what}{' and at most 1e9' * (test(v) and v > LARGEST)}, got {v}")
    if set(names := s.strategies.split(",")) - set(STRATEGIES) or len(set(names)) < len(names):
        raise InputError(f"--strategies {s.strategies!r}: name each of {', '.join(STRATEGIES)} at most once, "
                         "with commas between")
    short = lambda e: min(merge.budget(dataclasses.replace(s, epochs=e)).values()) < 1  # noqa: E731
    if short(s.epochs):  # rounding leaves gaps: 4 and 6 epochs work for 2 teachers, 5 does not
        raise InputError(f"--epochs {s.epochs} leaves a phase without epochs for {s.teachers} teachers; every "
                         f"budget from {1 + max(e for e in range(1, 10_000) if short(e))} epochs on works")
    resolve_device(s)
    out = checked_out(s)
    if records:  # and an --out in use, before the data is read: lock() refuses it where report.held finds it so
        rank_0_decides(lambda: (settings_record(s, out), read_rows(out, s), report.held(out / ".lock") and lock(out)))

def rank_0_decides(check):
    """check() on rank 0 alone, and its InputError raised on every rank: none goes on where rank 0 stopped."""
    try:
        value, refusal = check() if ranks()[0] == 0 else None, None
    except InputError as e:
        value, refusal = None, str(e)
    if ranks()[1] > 1:
        torch.distributed.broadcast_object_list(answer := [refusal])
        refusal = answer[0]
    if refusal:
        raise InputError(refusal)
    return value

def resolve_device(s):  # --device as cpu or cuda
    if s.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda, but torch sees no GPU here; use --device cpu or auto")
    return ("cuda" if torch.cuda.is_available() and s.gpu_pays else "cpu") if s.device == "auto" else s.device

def parse_settings(argv, defaults, description, hidden=()):
    """Settings from the command line: one flag per documented field of `defaults` (those in hidden taken, to be
    refused with a reason, but not shown by --help)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = fail  # one line and exit code 2, not a usage dump
    flags = [f for f in dataclasses.fields(defaults) if "help" in f.metadata]
    image = defaults.metric != Settings.metric  # an image experiment: the sources merge.Settings names are the sine's
    for f in flags:
        value, text = getattr(defaults, f.name), f.metadata["help"]
        if text.endswith(")") and not f.metadata.get("run_only") and (value != f.default or image and "sine: " in text):
            text = text.rsplit(" (", 1)[0] + " (this experiment's: docs/settings.md)"
        name, text = flag(f), argparse.SUPPRESS if f.name in hidden else f"{text} [{value}]"
        if isinstance(value, bool):
            parser.add_argument(name, dest=f.name, action="store_true", help=text)
        elif isinstance(value, tuple):  # file names, epochs
            parser.add_argument(name, dest=f.name, nargs=f.metadata["nargs"], default=value, help=text,
                                type=f.metadata.get("type", str), metavar=f.metadata.get("metavar", "FILE"))
        else:
            parser.add_argument(name, dest=f.name, type=f.metadata.get("type", type(value)), default=value,
                                choices=f.metadata.get("choices"), help=text)
    args = parser.parse_args(argv)
    return dataclasses.replace(defaults, **{f.name: tuple(v) if isinstance(v := getattr(args, f.name), list) else v
                                            for f in flags})

def parse_with_presets(argv, base, choice, presets, description):
    """parse_settings with base's defaults replaced by presets[one choice (--arch, --experiment)], shown by --help."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.error = fail
    pre.add_argument("--" + choice, default=getattr(base, choice), choices=presets)
    chosen = getattr(pre.parse_known_args(argv)[0], choice)
    return parse_settings(argv, dataclasses.replace(base, **{choice: chosen}, **presets[chosen]), description)

# == The --out folder: one command at a time, files written whole, each row read once ==============

def checked_out(s):
    """--out as a folder this command may create and write, or one line saying why not."""
    if not s.out.strip():
        raise InputError("--out is empty; name a folder")
    out = Path(s.out)
    try:
        place = next(place for place in [out, *out.parents] if place.exists())  # "." or "/" at the latest
    except OSError as e:  # a name too long for the file system
        raise InputError(f"--out {s.out[:80]}{'...' if len(s.out) > 80 else ''}: {e.strerror}") from None
    if not place.is_dir() or not os.access(place, os.W_OK | os.X_OK):
        raise InputError(f"--out {out}: {place} is not {'writable' if place.is_dir() else 'a folder'}")
    return out

def settings_record(s, out):
    """The settings that results in out must share (all but run_only ones), checked with out/settings.json."""
    study = [out / "study.json", *out.glob("k[0-9]*/settings.json"), *out.glob("epochs[0-9]*/settings.json")]
    if any(p.exists() for p in study):  # sine_teachers.py's, sine_budgets.py's (also one older than study.json)
        raise InputError(f"{out} holds a study, its experiments in folders of their own; use another --out")
    record = json.loads(json.dumps({f.name: getattr(s, f.name) for f in dataclasses.fields(s)
                                    if not f.metadata.get("run_only")}))
    if (path := out / "settings.json").exists():
        try:
            old = json.loads(path.read_text())
            assert isinstance(old, dict)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AssertionError):
            raise InputError(f"{path} is not a settings file; repair or remove it, or use another --out") from None
        defaults = json.loads(json.dumps({f.name: getattr(type(s)(), f.name) for f in dataclasses.fields(s)}))
        old.update({f.name: f.metadata["type"](old[f.name]) for f in dataclasses.fields(s)  # as the command
                    if "type" in f.metadata and isinstance(old.get(f.name), str)})  # line reads them: data/ is data
        changed = [f"{key} {old.get(key)} -> {value}" for key, value in record.items()  # a setting added since, at
                   if old.get(key, defaults.get(key)) != value]  # its default, keeps the experiment as it was
        if changed:
            raise InputError(f"{out} holds results made with other settings ({', '.join(changed)}); use another --out")
    return record

def read_rows(out, s):
    """The rows of out/results.jsonl, one per (run, strategy), and whether it needs a repair: a last line
    cut short by a crash is dropped (its run redone), a repeated row read once; any other bad line refused,
    such as a row of another experiment or seed, or one whose number is not finite."""
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
                isinstance(row.get("strategy"), str) and type(row.get(s.metric)) in (int, float) and \
                math.isfinite(row[s.metric]) and row.get("seed") == run_seed(s.seed, row["run"]) and \
                all(key in row for key in s.row_keys)
        except json.JSONDecodeError:
            ok = False
        if not ok and number == len(lines) and not text.endswith("\n"):
            continue  # the line a crash cut short
        if not ok:
            raise InputError(f"{path}, line {number}, is not a result row of this experiment, seed and metric "
                             f"({line[:40]!r}); repair or remove it")
        if (row["run"], row["strategy"]) not in seen:
            seen.add((row["run"], row["strategy"]))
            rows.append(row)
    return rows, len(rows) != len(lines) or bool(text) and not text.endswith("\n")

@contextlib.contextmanager
def locked(s):
    """--out for this command alone (its files checked by check_settings): --out/.lock locked until the command
    ends (fcntl). Over ranks, rank 0 locks, and none trains into an --out that rank 0 could not lock."""
    out = checked_out(s)
    with rank_0_decides(lambda: lock(out)) or contextlib.nullcontext():
        yield out

def lock(out):
    """out/.lock, open and locked."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / ".lock", "a")
    except OSError as e:
        raise InputError(f"cannot write to --out {out} ({e.strerror or type(e).__name__})") from None
    try:
        import fcntl
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise InputError(f"--out {out} is in use by another command; let it finish or use another --out") from None
    except (ImportError, OSError) as e:  # no fcntl (Windows), or a file system without locks (some NFS or Lustre)
        log.warning(f"note: --out {out} cannot be locked ({getattr(e, 'strerror', None) or e}); use it once at a time")
    return handle

# == Training, from outside the method =============================================================

def phase_trainer(phases, rank=0, wrap=lambda model: model):
    """fit_phases for Lockstep: each model kept as phases/<phase>-<seed>.pt, loaded if there (a damaged file trained
    again); the rest trained as one stack of alike phases (--stack 1) or one at a time, checkpointed (fit_one)."""
    def fit_phases(asked):  # Lockstep's trainings, one for each group of alike phases
        groups, starts = {}, {}  # alike phases; how each phase's models started
        for a in asked:
            model, data, s = a["models"][0], a["data"], a["s"]
            cost = len(a["models"]) * a["epochs"]  # epochs, and forward multiply-adds (a step costs about three)
            a["job"].setdefault("compute", {})[a["phase"]] = [cost, cost * data.size * merge.macs(model, data)]
            stack = stacked.stacks(s.stack, data.device) and not a["hooks"] and not list(model.buffers()) and \
                not getattr(data, "augments", False)  # a stack holds no BatchNorm, draws no augmentation a model
            kind = (stack, type(model), repr(model.hparams), a["epochs"], a["drops"], repr(a["lambdas"]), a["share"],
                    a["warmup"], s.lr, s.batch, data.size, data.metric, str(data.device))
            group = groups.setdefault(kind, dict(stacked=stack, asked=[], todo=[], loaded=0, twins={}))
            group["asked"].append(a)
            for model, seed in zip(a["models"], a["seeds"]):
                path, start = phases / f"{a['phase']}-{seed}.pt", [float(t.sum()) for t in model.state_dict().values()]
                if path in starts:  # a phase asked twice (random's and the student's teachers): trained once
                    assert starts[path] == start and path in group["twins"], f"{path} asked for twice, not alike"
                    group["twins"][path].append(model)
                    continue
                group["twins"][path], starts[path] = [model], start
                if load(model, path, data.device):
                    group["loaded"] += 1
                else:
                    group["todo"].append((model, seed, path, a))
        return [dict(group, jobs=[a["job"] for a in group["asked"]], epochs=fit_group(group))
                for group in groups.values()]

    def fit_group(group):  # a generator: yields between the epochs of a stack
        todo, done = group["todo"], f" ({group['loaded']} done before)" if group["loaded"] else ""
        name = " and ".join(dict.fromkeys(a["phase"] for a in group["asked"]))  # its phases, each named once
        log.info(f"  {name}: {len(todo)} x {group['asked'][0]['epochs']} epochs{done}")
        if todo and group["stacked"]:
            a, stack_file = todo[0][3], todo[0][2].with_suffix(".stack")  # the stack's checkpoint
            yield from stacked.fit_stacked_epochs([t[0] for t in todo], [t[3]["data"] for t in todo], a["s"],
                a["epochs"], a["drops"], [t[1] for t in todo], a["lambdas"], a["share"], a["warmup"],
                report.progress(a["epochs"], name), a["s"].compile, checkpoint=rank == 0 and stack_file)
        for model, seed, path, a in todo:
            if not group["stacked"]:
                fit_one(model, a["data"], a["s"], a, seed, path.with_suffix(".epochs"), rank, wrap)
            if not all(p.isfinite().all() for p in model.parameters()):  # not kept, and no row of NaNs written
                raise InputError(f"the {a['phase']} phase of seed {seed} diverged (its weights are no longer finite); "
                                 "try a smaller --lr or --gate-lr in another --out")
            if rank == 0:  # the only writer among the ranks
                report.save_whole(model.state_dict(), path)
                path.with_suffix(".epochs").unlink(missing_ok=True), path.with_suffix(".stack").unlink(missing_ok=True)
        for first, *twins in group["twins"].values():
            for twin in twins:
                twin.load_state_dict(first.state_dict())
    return fit_phases

def load(model, path, device):
    """Whether model now holds the finished phase in path; False when there is none, or a damaged one."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        copy.deepcopy(model).load_state_dict(state)  # raises on a wrong file before model changes
        model.load_state_dict(state)
        return True
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file; none at all is no news
        if not isinstance(e, FileNotFoundError):
            log.warning(f"  {path} is damaged ({type(e).__name__}); training its model again")
        return False

def fit_one(model, data, s, a, seed, checkpoint, rank, wrap):
    """merge.fit of one model with counter noise and a checkpoint after each epoch, on from it if one is
    there (a damaged one is trained again, with one line); under DDP the ranks' noise differs."""
    noises = stacked.counter_noise(model, seed + (rank << 48))
    net = wrap(model)
    opts, start, history = merge.optimizers(net, s, a["lambdas"] is not None), 0, []
    if checkpoint.exists():
        saved = {name: t.clone() for name, t in model.state_dict().items()}
        try:
            state = torch.load(checkpoint, map_location=data.device, weights_only=True)
            model.load_state_dict(state["model"])
            for opt, opt_state in zip(opts, state["opts"], strict=True):
                opt.load_state_dict(opt_state)
            start, history = state["epoch"] + 1, state["history"]
            for noise in noises:
                noise.step = state["step"]
            log.info(f"    resumed after epoch {start} of {a['epochs']}")
        except Exception as e:  # noqa: BLE001 - a damaged or foreign checkpoint
            log.warning(f"  {checkpoint} is damaged ({type(e).__name__}); training its phase from the start")
            model.load_state_dict(saved)
            opts, start, history = merge.optimizers(net, s, a["lambdas"] is not None), 0, []
    report_epoch, hooks = report.progress(a["epochs"], f"{a['phase']} (seed {seed})"), a["hooks"]

    def after_epoch(epoch, epoch_history):
        history.append(epoch_history[-1])
        report_epoch(epoch, history)
        hooks.get("after_epoch", lambda *_: None)(epoch, history)
        if rank == 0:  # the other ranks hold the same
            report.save_whole(dict(model=model.state_dict(), opts=[opt.state_dict() for opt in opts], epoch=epoch,
                            step=noises[0].step if noises else 0, history=history), checkpoint)
        if report.interrupted:  # a Ctrl-C that torch swallowed (report.on_interrupt), now that the epoch is kept
            raise KeyboardInterrupt
    merge.fit(net, data, s, a["epochs"], a["drops"], seed, a["lambdas"], a["share"], a["warmup"], opts, start,
              hooks.get("after_step"), after_epoch)
    for gate in merge.gates(model):
        del gate.noise  # torch's generator again
    return history

# == Runs, over processes ==========================================================================

STACK_RUNS = 100  # runs in lockstep at most, so that memory does not grow with --runs
OVERLAP_ON_GPU = True  # Lockstep's stacks by turns on a GPU, side by side (gpu_check.py times it without too)

def ranks():  # (this process's rank, the number of processes): torchrun's (or launcher.py's), or (0, 1)
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

def start_ranks(s):
    """The ranks' process group (NCCL between GPUs, else gloo); a rank ends within a second of its launcher's end."""
    launcher = int(os.environ.get("MERGE_LAUNCHER", 0)) or os.getppid()

    def watch():
        while os.getppid() == launcher:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()
    if cuda := resolve_device(s) == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.distributed.init_process_group("nccl" if cuda else "gloo")

def run_experiment(s, title, make_data, make_teacher, result, replicas=False, wrap=lambda model: model):
    """The loop of every experiment, inside `with locked(s)`: the (run, strategy) pairs not yet in results.jsonl
    run in Lockstep, STACK_RUNS runs at a time; make_data(seed, device) -> a run's Data, result(model, data) ->
    its row's numbers. One process writes each row at once; over ranks each takes every world-th run of a chunk
    and rank 0 writes the chunk's rows, or with replicas (DDP) every rank runs every run."""
    (rank, world), device, out = ranks(), resolve_device(s), Path(s.out)
    results, repair = read_rows(out, s)
    if rank == 0:
        report.write_whole(out / "settings.json", json.dumps(settings_record(s, out), indent=1) + "\n")
    if rank == 0 and repair:
        report.write_whole(out / "results.jsonl", "".join(json.dumps(row) + "\n" for row in results))
        log.info(f"repaired {out / 'results.jsonl'}: a cut or repeated line removed")
    names, split = s.strategies.split(","), world > 1 and not replicas
    waiting = split and torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(days=7))  # NCCL: 10 min
    done = {(r["run"], r["strategy"]) for r in results}
    log.info(f"{title}: {report.count(s.runs, 'run')} x {len(names)} strategies, {merge.budget(s)['one']} epochs each, "
             f"on {device}{f' in {world} processes' if world > 1 else ''}; {len(done)} results already in {out}")
    todo = [run for run in range(s.runs) if any((run, name) not in done for name in names)]
    trainer = phase_trainer(out / "phases", rank if replicas else 0, wrap)
    for chunk in [todo[i:i + STACK_RUNS * world] for i in range(0, len(todo), STACK_RUNS * world)]:
        chunk = chunk[rank::world] if split else chunk  # every rank goes through as many chunks, some maybe empty
        log.info(f"runs {', '.join(map(str, chunk[:3]))}{', ...' if len(chunk) > 3 else ''} of 0 to {s.runs - 1} (as "
                 f"the rows number them{f'; {len(chunk)} in this process' if split else ''}), in lockstep")
        datas, rows = {run: make_data(run_seed(s.seed, run), device) for run in chunk}, []
        jobs = [dict(run=run, strategy=name, work=lambda train, run=run, name=name: STRATEGIES[name](
            datas[run], s, make_teacher, run_seed(s.seed, run), train)) for name in names for run in chunk
            if (run, name) not in done]
        def finished(job, outcome):  # a job's row, written as it comes
            model, info = outcome
            rows.append(dict(run=job["run"], strategy=job["strategy"], seed=run_seed(s.seed, job["run"]), **info,
                             compute=job.get("compute", {}), **result(model, datas[job["run"]])))
            if rank == 0 and not split:
                report.append_row(out / "results.jsonl", rows[-1])
        lockstep.Lockstep(trainer, overlap=device == "cuda" and OVERLAP_ON_GPU).run(jobs, finished)
        if split:  # every rank's rows, to rank 0
            log.info("  waiting for the other processes' runs of this chunk")
            torch.distributed.all_gather_object(gathered := [None] * world, rows, group=waiting)  # for hours maybe
            rows = sorted((row for part in gathered for row in part), key=lambda row: (row["run"], row["strategy"]))
            for row in rows if rank == 0 else ():
                report.append_row(out / "results.jsonl", row)
        results += rows
    log.info(f"{len(results)} results in {out / 'results.jsonl'}")
    return [r for r in results if r["run"] < s.runs and r["strategy"] in names]  # what summary.md reports

def run_seed(seed, run):
    return 1000 * seed + run

# == The command line ==============================================================================

def main(argv, parse, run):
    """Every script's command line: bad input is one line and exit code 2; Ctrl-C one line and 130."""
    report.catch_interrupts()  # Ctrl-C is KeyboardInterrupt again, past the imports, even where torch catches it
    s = parse(argv)
    report.show_progress(quiet=ranks()[0] > 0)
    try:
        if ranks()[1] > 1:
            start_ranks(s)
        run(s)
        if torch.distributed.is_initialized():  # every rank finished before any tears down its process group
            torch.distributed.barrier(), torch.distributed.destroy_process_group()
            sys.stdout.flush(), sys.stderr.flush(), os._exit(0)  # no teardown, where gloo can abort a finished rank
    except InputError as e:
        if torch.distributed.is_initialized():  # torn down, so that no rank aborts at exit
            torch.distributed.destroy_process_group()
        fail(e) if ranks()[0] == 0 else sys.exit(2)  # rank 0 says it
    except RuntimeError as e:  # another rank died, and with it the process group: one line, not gloo's traceback
        if ranks()[1] == 1 or not any(word in str(e) for word in ("gloo", "NCCL", "closed by peer")):
            raise
        if not os.environ.get("MERGE_LAUNCHER"):  # else launcher.py names the dead worker itself
            print(f"error: rank {ranks()[0]}: another rank ended ({str(e).splitlines()[0][-100:]})", file=sys.stderr)
        os._exit(1)  # not destroy_process_group(): it would wait for the dead
    except OSError as e:  # a full disk, a read-only one, a name too long: one line, and nothing half-written
        if e.errno == errno.EPIPE:  # stdout's reader has gone (`| head`): the run ends quietly, as a Unix tool does
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno()), sys.exit(1)
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG):
            raise
        print(f"error: {e.strerror}{f' writing in {Path(e.filename).parent}' if e.filename else ''}; every finished "
              "phase and row is kept, and the same command resumes once there is room", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        out = Path(s.out) if ranks()[0] == 0 else sys.exit(130)
        print(end="\n" if sys.stdout.isatty() else "")  # end a progress bar's line
        print(f"interrupted: {report.kept(out, lambda: len(read_rows(out, s)[0]))}", file=sys.stderr)
        sys.exit(130)
