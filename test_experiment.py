"""Tests for experiment.py, the machinery around the method: bad input and damaged project files
give one line and exit code 2 and write nothing; one command at a time per --out; rows are
read once; every subset of strategies reports; Ctrl-C says what was kept; the experiments'
presets are docs/settings.md's. Most bad inputs share this process through main(argv)."""
import ast
import copy
import dataclasses
import datetime
import errno
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
import weakref
from pathlib import Path

import pytest
import torch

import cifar
import experiment
import imagenet
import launcher
import lenet_imagewoof as woof
import merge
import report
import sine

ROOT = Path(__file__).parent
SMALL = ["--runs", "2", "--epochs", "12", "--n-train", "300", "--n-val", "100", "--n-test", "300", "--compile", "0",
         "--workers", "1"]


@pytest.fixture(autouse=True)
def float32():
    torch.set_default_dtype(torch.float32)  # as the command line runs; conftest.py restores it


def files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def here(capsys, *args):
    """merge.py's command line (sine.main) in this process, as cli gives it: exit code, stdout and stderr."""
    try:
        sine.main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    printed = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, printed.out, printed.err)


def nothing_trained(monkeypatch):
    """A bad setting let through fails its test at once, not after training the default budget."""
    monkeypatch.setattr(experiment, "run_experiment", lambda *args, **kwargs: pytest.fail("bad input was trained"))
    monkeypatch.setattr(launcher, "launch", lambda *args, **kwargs: pytest.fail("bad input started the workers"))


def main(argv, capsys):
    """here(argv): (exit code, what it wrote to stderr)."""
    result = here(capsys, *argv)
    return result.returncode, result.stderr


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, str(ROOT / "merge.py"), *map(str, args)], capture_output=True, text=True,
                          timeout=600, **kwargs)


@pytest.fixture(scope="session")  # once a worker, whatever order the tests run in
def finished(tmp_path_factory):
    """A small sine experiment with every strategy, run once through the command line."""
    out = tmp_path_factory.mktemp("finished") / "sine"
    result = cli(*SMALL, "--strategies", ",".join(experiment.STRATEGIES), "--out", out)
    assert result.returncode == 0, result.stderr
    assert "teacher and bo3: 10 x 4 epochs" in result.stdout  # one stack for both, random's and fusion's teachers
    assert "importance: 2 x 2 epochs" in result.stdout  # trained once for student and random
    return out


def copy_of(finished, tmp_path):
    return Path(shutil.copytree(finished, tmp_path / "sine"))


# -- bad input: one line, exit code 2, nothing written ----------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--paper-epochs", "3"], "--paper-epochs must be at least 4 (its sixth"),  # rounds to 0: crashed in training
    (["--lambda-start", "-1"], "--lambda-start must be above 0"),
    (["--lambda-step", "-1"], "--lambda-step must be 0 or more"),
    (["--seed", "100000000000000000"], "--seed must be from 0 to"),
    (["--seed", "-1"], "--seed must be from 0 to"),
    (["--lr", "nan"], "--lr must be above 0, got nan"),
    (["--lr", "inf"], "--lr must be above 0 and at most 1e9, got inf"),
    (["--lr", "-1"], "--lr must be above 0"),
    (["--gate-lr", "0"], "--gate-lr must be above 0"),
    (["--noise", "nan"], "--noise must be 0 or more, got nan"),
    (["--momentum", "nan"], "--momentum must be from 0 to below 1"),
    (["--momentum", "1"], "--momentum must be from 0 to below 1"),
    (["--weight-decay", "-0.1"], "--weight-decay must be 0 or more"),
    (["--lambda-start", "nan"], "--lambda-start must be above 0, got nan"),
    (["--runs", "100000"], "--runs must be from 1 to 1000"),
    (["--lr", "1e300"], "--lr must be above 0 and at most 1e9, got 1e+300"),
    (["--n-train", "1000000000"], "--n-train must be from 1 to 1,000,000, got 1000000000"),
    (["--seed", "-1"], "--seed must be from 0 to 1000000000, got -1"),
    (["--runs", "0"], "--runs must be from 1 to 1000"),
    (["--teachers", "11"], "--teachers must be from 2 to 10"),
    (["--teachers", "1"], "--teachers must be from 2 to 10"),
    (["--task", "mnist"], "invalid choice"),
    (["--epochs", "-5"], "--epochs must be at least 1"),
    (["--batch", "0"], "--batch must be at least 1"),
    (["--n-train", "0"], "--n-train must be from 1 to 1,000,000"),
    (["--epochs", "3"], "every budget from 6 epochs on works"),
    (["--epochs", "5"], "every budget from 6 epochs on works"),  # though 4 works: rounding leaves gaps
    (["--stack", "2"], "invalid choice"),
    (["--workers", "-1"], "--workers must be 0 or more"),
    (["--fold", "2"], "--fold must be 0 or 1"),
    (["--runs", "many"], "invalid int value"),
    (["--strategies", ""], "--strategies '': name each of student"),
    (["--strategies", "student,student"], "at most once"),
    (["--strategies", "student,sutdent"], "name each of"),
])
def test_bad_settings_give_one_line_exit_code_2_and_write_nothing(tmp_path, capsys, monkeypatch, args, message):
    nothing_trained(monkeypatch)
    code, err = main([*args, "--out", tmp_path / "out"], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert files(tmp_path) == []


@pytest.mark.parametrize("stack", ["1", "0"])
def test_a_diverged_phase_stops_the_run_with_one_line_and_writes_no_row_of_nans(tmp_path, capsys, stack):
    out = tmp_path / "out"
    code, err = main([*SMALL, "--lr", "1000", "--stack", stack, "--out", out], capsys)
    assert code == 2 and err.count("\n") == 1 and "the teacher phase of seed 0 diverged" in err, err
    assert not (out / "results.jsonl").exists() and not list((out / "phases").glob("*.pt"))

@pytest.mark.parametrize("script, args, message", [
    ("sine_budgets", ["--epochs", "12", "--teachers", "3"], "sine, 0.2 x --epochs 12 = 2 epochs: --epochs 2 leaves"),
    ("sine_teachers", ["--epochs", "7"], "sine, k = 3: --epochs 7 leaves a phase without epochs for 3 teachers"),
    ("sine_teachers", ["--teachers", "3"], "--teachers is not used"),
    ("sine_teachers", ["--strategies", "student,prune"], "--strategies is not used"),
    ("sine_teachers", ["--bench"], "--bench times the sine's trainers: python merge.py --task sine --bench"),
    ("sine_budgets", ["--bench"], "--bench times the sine's trainers"),
    ("sine_budgets", ["--shares", "1", "0.5", "1"], "--shares 1 0.5 1 of --epochs 900 give 900 450 900 epochs"),
    ("sine_budgets", ["--epochs", "12", "--shares", "0.5", "0.51"], "give 6 6 epochs: each budget once"),
    ("sine_teachers", ["--workers", "2"], "--workers is not used: a study trains in one process"),
])
def test_a_study_names_which_of_its_experiments_a_setting_fails(tmp_path, capsys, script, args, message):
    with pytest.raises(SystemExit) as exit_:
        __import__(script).main([*args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert files(tmp_path) == []


def test_a_study_of_k_teachers_grows_on_its_out_and_keeps_what_it_ran(tmp_path, capsys):
    """sine_teachers.py --most 2, then --most 3 on the same --out: k = 2's rows are kept, k = 3's added."""
    import sine_teachers
    args = ["--runs", "1", *SMALL[2:], "--out", str(tmp_path / "study")]
    sine_teachers.main([*args, "--most", "2"])
    k2 = (tmp_path / "study" / "k2" / "results.jsonl").read_text()
    capsys.readouterr()
    sine_teachers.main([*args, "--most", "3"])
    printed = capsys.readouterr().out
    assert "3 results already" in printed and (tmp_path / "study" / "k2" / "results.jsonl").read_text() == k2
    assert len((tmp_path / "study" / "k3" / "results.jsonl").read_text().splitlines()) == 1
    assert "| 3 |" in (tmp_path / "study" / "summary.md").read_text()
    # A study's folder is its own (study.json): an experiment, or the other study, refused there, and a study
    # refused in an experiment's folder; one line each, nothing written.
    import sine_budgets
    before, sine_out = files(tmp_path), tmp_path / "study" / "k2"  # an experiment's folder
    refusals = [(sine.main, [*SMALL, "--out", tmp_path / "study"], "holds a study, its experiments in folders"),
                (sine_budgets.main, [*args, "--shares", "1"], "holds another study (its study.json)"),
                (sine_teachers.main, [*args[:-1], sine_out], "holds an experiment's results; a study's experiments")]
    for command, argv, message in refusals:
        with pytest.raises(SystemExit) as exit_:
            command([str(a) for a in argv])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert files(tmp_path) == before and (tmp_path / "study" / "k2" / "results.jsonl").read_text() == k2
    (tmp_path / "study" / "study.json").unlink()  # a study made before study.json: known by its folders
    code, err = main([*SMALL, "--out", tmp_path / "study"], capsys)
    assert code == 2 and "holds a study" in err and not (tmp_path / "study" / "settings.json").exists(), err
    (tmp_path / "study" / "k2").rename(tmp_path / "study" / "epochs900")  # sine_budgets.py's, before study.json
    (tmp_path / "study" / "k3").rename(tmp_path / "study" / "epochs180")
    code, err = main([*SMALL, "--out", tmp_path / "study"], capsys)
    assert code == 2 and "holds a study" in err and not (tmp_path / "study" / "settings.json").exists(), err


def test_a_bad_out_gives_one_line_exit_code_2_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "a file").write_text("not a folder")
    cases = {str(tmp_path / "a file"): "is not a folder", str(tmp_path / "a file" / "inside"): "is not a folder",
             "/dev/null": "is not a folder", "": "--out is empty", " ": "--out is empty",
             "/proc/no/such/folder": "cannot write to --out",  # unwritable even for root
             str(tmp_path / ("x" * 300) / "out"): "File name too long", "/x" * 2200: "File name too long"}
    if os.geteuid() != 0:  # root writes into any folder
        (tmp_path / "locked").mkdir(mode=0o500)
        cases[str(tmp_path / "locked" / "out")] = "is not writable"
    before = files(tmp_path)
    for out, message in cases.items():
        code, err = main(["--out", out, "--runs", "1", "--epochs", "6"], capsys)
        assert code == 2 and err.count("\n") == 1 and message in err, (out, err)
    assert files(tmp_path) == before


def test_settings_of_another_experiment_in_the_same_out_are_refused(finished, tmp_path, capsys, monkeypatch):
    out = copy_of(finished, tmp_path)
    before = {p: (out / p).read_bytes() for p in files(out) if (out / p).is_file()}
    code, err = main([*SMALL, "--lr", "0.02", "--out", out], capsys)
    assert code == 2 and err.count("\n") == 1 and "other settings (lr 0.01 -> 0.02)" in err
    assert {p: (out / p).read_bytes() for p in files(out) if (out / p).is_file()} == before
    benched = []  # --bench writes nothing to --out, so whatever settings --out holds, it runs
    monkeypatch.setattr(sine, "bench", benched.append)
    assert main([*SMALL, "--lr", "0.02", "--bench", "--out", out], capsys)[0] == 0 and len(benched) == 1


@pytest.mark.parametrize("damage, message", [
    ("a line that is a number", "results.jsonl, line 1, is not a result row"),
    ("a row without run", "results.jsonl, line 2, is not a result row"),
    ("a row without its metric", "results.jsonl, line 3, is not a result row"),
    ("a row without its curve", "results.jsonl, line 2, is not a result row"),
    ("a row of another seed", "results.jsonl, line 1, is not a result row"),
    ("a row whose metric is NaN", "results.jsonl, line 3, is not a result row"),
    ("results.jsonl a folder", "cannot read"),
    ("empty settings.json", "settings.json is not a settings file"),
    ("truncated settings.json", "settings.json is not a settings file"),
    ("settings.json a list", "settings.json is not a settings file"),
])
def test_damaged_project_files_are_refused_with_one_line_naming_them(finished, tmp_path, capsys, damage, message):
    out = copy_of(finished, tmp_path)
    rows, settings = (out / "results.jsonl").read_text().splitlines(), (out / "settings.json").read_text()
    if damage == "a line that is a number":
        rows[0] = "42"
    elif damage == "a row without run":
        rows[1] = json.dumps({k: v for k, v in json.loads(rows[1]).items() if k != "run"})
    elif damage == "a row without its metric":
        rows[2] = json.dumps({k: v for k, v in json.loads(rows[2]).items() if k != "test_mse"})
    elif damage == "a row without its curve":
        rows[1] = json.dumps({k: v for k, v in json.loads(rows[1]).items() if k not in ("peaks", "curve")})
    elif damage == "a row of another seed":
        rows[0] = json.dumps(dict(json.loads(rows[0]), seed=999))
    elif damage == "a row whose metric is NaN":
        rows[2] = json.dumps(dict(json.loads(rows[2]), test_mse=float("nan")))
    (out / "results.jsonl").write_text("".join(row + "\n" for row in rows))
    if damage == "results.jsonl a folder":
        (out / "results.jsonl").unlink()
        (out / "results.jsonl").mkdir()
    elif "settings.json" in damage:
        (out / "settings.json").write_text({"empty settings.json": "", "truncated settings.json": settings[:30],
                                            "settings.json a list": "[1, 2]"}[damage])
    before = {p: (out / p).read_bytes() for p in files(out) if (out / p).is_file()}
    code, err = main([*SMALL, "--strategies", ",".join(experiment.STRATEGIES), "--out", out], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert {p: (out / p).read_bytes() for p in files(out) if (out / p).is_file()} == before


def test_a_damaged_phase_file_is_trained_again_with_one_line(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    phase = sorted((out / "phases").glob("teacher-*.pt"))[0]
    phase.write_bytes(phase.read_bytes()[:100])
    rows = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("".join(r + "\n" for r in rows if '"student"' not in r))
    again = here(capsys, *SMALL, "--strategies", ",".join(experiment.STRATEGIES), "--out", out)
    assert again.returncode == 0, again.stderr
    assert f"{phase} is damaged" in again.stdout and "teacher: 1 x 4 epochs (3 done before)" in again.stdout
    redone = [json.loads(r) for r in (out / "results.jsonl").read_text().splitlines() if '"student"' in r]
    assert redone == [json.loads(r) for r in rows if '"student"' in r]  # the same teacher again, the same rows


def test_a_phase_file_of_another_model_is_trained_again_and_leaves_the_model_as_it_was(tmp_path):
    """load(): a file that torch reads but that is not this model's (a key missing) is no finished phase, and the
    model keeps its own start rather than the weights the file shares with it."""
    model, path = merge.SineMLP(), tmp_path / "teacher-0.pt"
    before = {name: t.clone() for name, t in model.state_dict().items()}
    torch.save({name: t + 1 for name, t in before.items() if name != "out.bias"}, path)
    assert not experiment.load(model, path, "cpu")
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())
    torch.save({name: t + 1 for name, t in before.items()}, path)
    assert experiment.load(model, path, "cpu") and torch.equal(model.out.bias, before["out.bias"] + 1)


def test_a_damaged_epoch_checkpoint_is_trained_again_with_one_line(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    rows = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("".join(r + "\n" for r in rows if '"one"' not in r))
    for phase in (out / "phases").glob("one-*.pt"):  # one model's phase, unfinished: a checkpoint of garbage
        phase.unlink()
        phase.with_suffix(".epochs").write_bytes(b"PK\x03\x04 a cut zip")
    again = here(capsys, *SMALL, "--strategies", "one", "--stack", "0", "--out", out)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count(".epochs is damaged") == 2 and "training its phase from the start" in again.stdout
    redone = {r["run"]: r["test_mse"] for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())
              if r["strategy"] == "one"}
    assert redone == pytest.approx({r["run"]: r["test_mse"] for r in map(json.loads, rows) if r["strategy"] == "one"},
                                   abs=2e-6)  # one at a time: the stack's rows up to float32 rounding
    assert not list((out / "phases").glob("*.epochs"))


def test_an_epoch_checkpoint_whose_optimizers_do_not_load_trains_the_phase_from_the_models_own_start(tmp_path):
    """fit_one: a checkpoint whose model loads but whose optimizers' state is missing (a foreign or older file) is
    damaged: the phase starts over from the weights the model had, to the model trained without that file."""
    s, data = sine.parse([]), merge.sine_data(0, 30, 10, 10)
    a = dict(phase="one", epochs=2, drops=s.drops_one, lambdas=None, share=0.5, warmup=0, hooks={})
    start = merge.SineMLP()
    alone = copy.deepcopy(start)
    experiment.fit_one(alone, data, s, a, 7, tmp_path / "alone.epochs", 0, lambda model: model)
    checkpoint = tmp_path / "one-7.epochs"
    torch.save(dict(model={name: t + 1 for name, t in start.state_dict().items()}, epoch=0), checkpoint)
    experiment.fit_one(start, data, s, a, 7, checkpoint, 0, lambda model: model)
    assert all(torch.equal(t, alone.state_dict()[name]) for name, t in start.state_dict().items())


def test_a_stacked_phase_cut_short_goes_on_from_its_checkpoint_to_the_same_rows(finished, tmp_path, capsys,
                                                                                  monkeypatch):
    """Ctrl-C in the one model's stacked phase, on a new --out, after its state was written (every epoch
    here): the same command goes on from there, to the rows of a run never cut, and leaves no checkpoint."""
    import stacked
    out = tmp_path / "sine"
    rows = [r for r in (finished / "results.jsonl").read_text().splitlines() if '"one"' in r]
    monkeypatch.setattr(stacked, "CHECKPOINT_SECONDS", 0)
    save, saves = stacked.save_stack, []

    def interrupted_after_the_fifth(path, state):
        save(path, state)
        saves.append(state["epoch"])
        if len(saves) == 5:
            raise KeyboardInterrupt
    monkeypatch.setattr(stacked, "save_stack", interrupted_after_the_fifth)
    assert here(capsys, *SMALL, "--strategies", "one", "--out", out).returncode == 130
    assert len(list((out / "phases").glob("one-*.stack"))) == 1 and saves == [0, 1, 2, 3, 4]
    again = here(capsys, *SMALL, "--strategies", "one", "--out", out)
    assert again.returncode == 0 and "resumed after epoch 5 of 12" in again.stdout, again.stdout
    assert (out / "results.jsonl").read_text().splitlines() == rows  # the run's never cut, to the last digit
    assert not list((out / "phases").glob("*.stack")) and not list(out.rglob("*.part"))


def test_an_importance_phase_cut_short_one_model_at_a_time_goes_on_from_its_checkpoint_to_the_same_rows(
        tmp_path, capsys, monkeypatch):
    """Ctrl-C after the big student's first epoch of importance (--stack 0, a checkpoint every epoch): the
    same command goes on from there, its gates' optimizer and noise's step restored, to the rows of a run
    never cut, to the last digit."""
    args = [*SMALL, "--strategies", "student", "--stack", "0"]
    assert here(capsys, *args, "--out", tmp_path / "uncut").returncode == 0
    save, cut = report.save_whole, tmp_path / "cut"

    def interrupted_after_importance_began(state, path):
        save(state, path)
        if Path(path).name.startswith("importance-") and Path(path).suffix == ".epochs":
            raise KeyboardInterrupt
    monkeypatch.setattr(report, "save_whole", interrupted_after_importance_began)
    assert here(capsys, *args, "--out", cut).returncode == 130
    assert len(list((cut / "phases").glob("importance-*.epochs"))) == 1
    monkeypatch.setattr(report, "save_whole", save)
    again = here(capsys, *args, "--out", cut)
    assert again.returncode == 0 and "resumed after epoch 1 of 2" in again.stdout, again.stdout
    assert (cut / "results.jsonl").read_text() == (tmp_path / "uncut" / "results.jsonl").read_text()
    assert not list((cut / "phases").glob("*.epochs"))


def test_a_full_disk_gives_one_line_and_leaves_no_part_file(tmp_path, capsys, monkeypatch):
    for error in (errno.ENOSPC, errno.EROFS):  # a full disk, one made read-only under the run
        def full(obj, path, error=error):  # as torch.save into such a file system: some bytes, then the error
            Path(path).write_bytes(b"half a phase")
            raise OSError(error, os.strerror(error), str(path))
        monkeypatch.setattr(experiment.torch, "save", full)
        code, err = main([*SMALL, "--out", tmp_path / str(error)], capsys)
        assert code == 1 and err.count("\n") == 1 and f"{os.strerror(error)} writing in" in err and "phases" in err, err
        assert not [p for p in (tmp_path / str(error)).rglob("*") if p.name.endswith(".part")]

    def torch_full(obj, path):  # as torch.save says it: a RuntimeError, the disk then without room
        Path(path).write_bytes(b"half a phase")
        raise RuntimeError("basic_ios::clear: iostream error")
    monkeypatch.setattr(experiment.torch, "save", torch_full)
    monkeypatch.setattr(report.shutil, "disk_usage", lambda folder: types.SimpleNamespace(free=4096))
    code, err = main([*SMALL, "--out", tmp_path / "torch"], capsys)
    assert code == 1 and err.count("\n") == 1 and "No space left on device writing in" in err and "phases" in err, err
    assert not [p for p in (tmp_path / "torch").rglob("*") if p.name.endswith(".part")]
    with pytest.raises(RuntimeError, match="CUDA error"):  # torch.save's other failures, with room left, as they are
        monkeypatch.setattr(report.shutil, "disk_usage", lambda folder: types.SimpleNamespace(free=1 << 30))
        monkeypatch.setattr(experiment.torch, "save", lambda obj, path: (_ for _ in ()).throw(RuntimeError("CUDA error")))
        report.save_whole({}, tmp_path / "model.pt")
    for error, named in ((errno.ENOSPC, True), (errno.ECONNRESET, False)):  # a write's, a download's
        with pytest.raises(OSError) as raised, report.written_whole(tmp_path / "file") as part:
            part.write_text("half")
            raise OSError(error, os.strerror(error))
        assert raised.value.filename == (str(tmp_path / "file") if named else None)
    if Path("/dev/full").exists():  # a row's write into a full disk: its error names no file, append_row names it
        with pytest.raises(OSError) as full_disk:
            report.append_row(Path("/dev/full"), {"test_mse": 0.05})
        assert full_disk.value.errno == errno.ENOSPC and full_disk.value.filename == "/dev/full"


def test_only_a_last_line_cut_short_is_dropped_and_a_file_without_its_last_newline_is_repaired(tmp_path):
    """read_rows: a last line a crash cut short (no newline after it) is dropped, and the file marked for repair;
    a bad line anywhere else, a bad last line that ends with its newline, or a row of a negative run is refused;
    whole rows without the last newline, or a row repeated, are kept once, the file marked for repair (the next
    row would join a line without its newline)."""
    s, path = sine.parse([]), tmp_path / "results.jsonl"
    rows = [json.dumps(dict(run=run, strategy="one", seed=experiment.run_seed(0, run), test_mse=0.1,
                            **{key: 0 for key in s.row_keys})) for run in range(3)]

    def read(text):
        path.write_text(text)
        return experiment.read_rows(tmp_path, s)
    assert read("".join(row + "\n" for row in rows)) == ([json.loads(row) for row in rows], False)
    assert read("\n".join(rows)) == ([json.loads(row) for row in rows], True)
    assert read("".join(row + "\n" for row in rows + rows[:1])) == ([json.loads(row) for row in rows], True)
    assert read("\n".join(rows[:2] + [rows[2][:30]])) == ([json.loads(row) for row in rows[:2]], True)
    negative = json.dumps(dict(json.loads(rows[0]), run=-1, seed=experiment.run_seed(0, -1)))
    for lines, number in (([rows[0], "{\"run\"", rows[2]], 2), (rows[:2] + [rows[2][:30] + "\n"], 3),
                          ([rows[0], negative, rows[2] + "\n"], 2)):
        with pytest.raises(experiment.InputError, match=f"results.jsonl, line {number}, is not a result row"):
            read("\n".join(lines))


# -- one command at a time, rows read once ------------------------------------------------------

@pytest.mark.slow
def test_two_commands_on_one_out_are_refused_and_rows_stay_unique(tmp_path, capsys):
    """The second command is main(argv) in this process: it meets the lock at once, while the first trains."""
    out = tmp_path / "sine"
    args = [*SMALL, "--out", out]
    first = subprocess.Popen([sys.executable, str(ROOT / "merge.py"), *map(str, args)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    while not (out / "settings.json").exists() and first.poll() is None:
        time.sleep(0.02)
    code, err = main(args, capsys)
    assert code == 2 and err.count("\n") == 1 and "in use by another command" in err, \
        f"first command still running: {first.poll() is None}; {err}"
    assert first.wait(timeout=300) == 0
    keys = [(r["run"], r["strategy"]) for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())]
    assert len(keys) == len(set(keys)) == 6
    assert main(args, capsys)[0] == 0  # free again once the first is done


def test_an_out_in_use_is_refused_by_every_process_before_any_trains(tmp_path):
    """With --workers 2 rank 0 finds the lock taken, and rank 1 learns it before it trains its share."""
    import fcntl
    out = tmp_path / "sine"
    out.mkdir()
    with open(out / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = cli(*SMALL, "--workers", "2", "--out", out)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "in use by another command" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # no phases/, no rows, no settings.json


def test_rank_0_alone_checks_and_every_rank_learns_its_refusal(monkeypatch):
    """rank_0_decides over 2 ranks: rank 0 runs the check and broadcasts its refusal (or None); rank 1 does not
    check, and raises rank 0's refusal (the process group stood in by its broadcast)."""
    said = []  # what rank 0 broadcast, in order

    def broadcast(objects):
        if experiment.ranks()[0] == 0:
            said.append(objects[0])
        else:
            objects[0] = said.pop(0)
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", broadcast)
    monkeypatch.setenv("WORLD_SIZE", "2")

    def refuse():
        raise experiment.InputError("--out x is in use by another command")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(experiment.InputError, match="^--out x is in use by another command$"):
        experiment.rank_0_decides(refuse)
    assert experiment.rank_0_decides(lambda: 42) == 42 and said == ["--out x is in use by another command", None]
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(experiment.InputError, match="^--out x is in use by another command$"):
        experiment.rank_0_decides(lambda: pytest.fail("rank 1 checked"))
    assert experiment.rank_0_decides(lambda: pytest.fail("rank 1 checked")) is None and said == []


def test_an_out_is_the_commands_alone_while_it_runs_and_without_locks_it_goes_on_with_a_note(tmp_path, monkeypatch):
    """locked(s): --out/.lock held while its block runs (another command is refused), free after it; a file system
    without locks (flock: ENOLCK, some NFS mounts) is not "in use": lock() goes on and says so."""
    import fcntl
    with experiment.locked(sine.parse(["--out", str(tmp_path / "out")])) as out:
        assert report.held(out / ".lock")
        with pytest.raises(experiment.InputError, match="is in use by another command"):
            experiment.lock(out)
    assert not report.held(out / ".lock")
    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks")
    said = []
    monkeypatch.setattr(experiment.log, "warning", said.append)
    monkeypatch.setattr(fcntl, "flock", no_locks)
    experiment.lock(out).close()
    assert said == [f"note: --out {out} cannot be locked (No locks); use it once at a time"]


def test_a_repeated_row_is_read_once_and_a_last_line_without_newline_kept(finished, tmp_path, capsys, monkeypatch):
    out = copy_of(finished, tmp_path)
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines + [lines[0]]))  # a repeat, and no newline at the end
    damaged, write_text = (out / "results.jsonl").read_text(), Path.write_text

    def full(path, text, *args, **kwargs):  # the repair's write into a full disk: half of it, then ENOSPC
        if "results.jsonl" not in path.name:
            return write_text(path, text, *args, **kwargs)
        write_text(path, text[:len(text) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(Path, "write_text", full)
    code, err = main([*SMALL, "--strategies", ",".join(experiment.STRATEGIES), "--out", out], capsys)
    assert code == 1 and "No space left on device" in err and (out / "results.jsonl").read_text() == damaged, err
    monkeypatch.setattr(Path, "write_text", write_text)  # the repair written whole, or not at all
    again = here(capsys, *SMALL, "--strategies", ",".join(experiment.STRATEGIES), "--out", out)
    assert again.returncode == 0, again.stderr
    assert f"{len(lines)} results already" in again.stdout and "repaired" in again.stdout
    assert (out / "results.jsonl").read_text() == "".join(line + "\n" for line in lines)
    assert "| student | 2 |" in (out / "summary.md").read_text()  # not 3


def test_phases_of_several_strategies_in_one_stack_give_the_rows_of_one_at_a_time(finished, tmp_path, capsys):
    """The sine's teachers and bo3 models have equal epochs and drops: the run loop trains them as
    one stack before the strategies run. Each model's result is what it is trained alone."""
    alone = tmp_path / "alone"
    result = here(capsys, *SMALL, "--stack", "0", "--strategies", "student,bo3,one", "--out", alone)
    assert result.returncode == 0, result.stderr
    rows = lambda out: {(r["run"], r["strategy"]): r for r in map(json.loads, open(out / "results.jsonl"))}
    stacked = rows(finished)
    for key, row in rows(alone).items():
        assert row["test_mse"] == pytest.approx(stacked[key]["test_mse"], abs=2e-6), key
    assert (finished / "phases" / f"bo3-{merge.phase_seed(experiment.run_seed(0, 1), 'bo3', 2)}.pt").exists()


def test_only_alike_phases_share_a_stack_each_model_with_its_own_seed(tmp_path):
    """The run loop's trainer stacks a phase of every run (seeds 30 and 1030), but not phases of another length
    (one model's 12 epochs, one_compute's 14) or another lr; each model's phase file is named by its seed."""
    s, data = sine.parse(["--compile", "0"]), merge.sine_data(0, 30, 10, 10)
    ask = lambda phase, seed, epochs, s=s: dict(job={}, models=[merge.SineMLP()], data=data, s=s, epochs=epochs,
                                                drops=s.drops_one, seeds=[seed], phase=phase, lambdas=None, share=0.5,
                                                warmup=0, hooks={})
    asked = [ask("one", 30, 12), ask("one_compute", 31, 14), ask("one", 1030, 12),
             ask("one", 2030, 12, dataclasses.replace(s, lr=0.1))]
    trainings = experiment.phase_trainer(tmp_path)(asked)
    assert [[(seed, path.name) for _, seed, path, _ in t["todo"]] for t in trainings] == [
        [(30, "one-30.pt"), (1030, "one-1030.pt")], [(31, "one_compute-31.pt")], [(2030, "one-2030.pt")]]
    assert all(t["stacked"] for t in trainings) and files(tmp_path) == []  # trained only as they are run


def test_phases_by_turns_as_on_a_gpu_give_the_same_rows(finished, tmp_path, monkeypatch, capsys):
    """On a GPU the run loop trains its stacks by turns, an epoch each, and the jobs of a phase that is over go
    on at once: the student's importance phase starts while the one model still trains. Here on the CPU."""
    class ByTurns(experiment.lockstep.Lockstep):
        def __init__(self, fit_phases, overlap=False):
            super().__init__(fit_phases, overlap=True)
    monkeypatch.setattr(experiment.lockstep, "Lockstep", ByTurns)
    said = []
    monkeypatch.setattr(report.Progress, "emit", lambda self, record: said.append(record.getMessage().strip()))
    strategies = "student,random,bo3,one,prune"  # twins (the teachers of student and random), a phase not stacked
    assert main([*SMALL, "--strategies", strategies, "--out", tmp_path / "sine"], capsys)[0] == 0
    last_of_one = next(i for i, line in enumerate(said) if line.startswith("one: epoch 12/12,"))
    assert said.index("importance: 2 x 2 epochs") < last_of_one, said
    rows = lambda out: {(r["run"], r["strategy"]): r for r in map(json.loads, open(out / "results.jsonl"))}
    theirs = rows(finished)
    for key, row in rows(tmp_path / "sine").items():
        assert row["test_mse"] == pytest.approx(theirs[key]["test_mse"], abs=2e-6), key


def test_one_process_trains_the_sine_with_one_thread_as_each_of_several_does(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        main([*SMALL, "--strategies", "one", "--out", tmp_path / "out"], capsys)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("workers, runs, expected", [("5", "2", 2), ("3", "50", 3), ("100", "50", 50)])
def test_no_more_workers_than_runs(workers, runs, expected):
    assert sine.workers(sine.parse(["--workers", workers, "--runs", runs, "--device", "cpu"])) == expected


@pytest.mark.slow
def test_workers_share_the_runs_unequally_and_give_the_rows_of_one_process(finished, tmp_path):
    """--workers 2 where one run is left to train (run 1, its rows and phases gone): one process trains it, the
    other has nothing to do and neither waits for ever; rank 0 writes every row once, as one process made them."""
    out = copy_of(finished, tmp_path)
    for phase in (out / "phases").iterdir():  # run 1's phases: seeds 100 to 199 (100 x run seed + offset)
        if int(phase.stem.split("-")[-1]) // 100 == 1:
            phase.unlink()
    theirs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in theirs if r["run"] == 0))
    result = cli(*SMALL[:-2], "--workers", "2", "--strategies", ",".join(experiment.STRATEGIES), "--out", out)
    assert result.returncode == 0, result.stderr
    assert "in 2 processes" in result.stdout and "teacher and bo3: 5 x 4 epochs" in result.stdout  # run 1 alone
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    key = lambda r: (r["run"], r["strategy"])
    assert sorted(map(key, rows)) == sorted(map(key, theirs)) and len(rows) == 2 * len(experiment.STRATEGIES)
    theirs = {key(r): r for r in theirs}
    for row in rows:
        assert row["test_mse"] == pytest.approx(theirs[key(row)]["test_mse"], abs=2e-6)
    assert "| student | 2 |" in (out / "summary.md").read_text()


def test_without_a_local_port_one_process_trains_with_a_note(finished, tmp_path, monkeypatch, capsys):
    class NoPort:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, address):
            raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(launcher.socket, "socket", NoPort)
    out = tmp_path / "sine"
    sine.main([*SMALL, "--workers", "2", "--strategies", "bo3", "--out", str(out)])
    assert "note: no local port for 2 processes (Permission denied); one process trains" in capsys.readouterr().out
    theirs = {r["run"]: r for r in map(json.loads, open(finished / "results.jsonl")) if r["strategy"] == "bo3"}
    for row in map(json.loads, open(out / "results.jsonl")):
        assert row["test_mse"] == pytest.approx(theirs[row["run"]]["test_mse"], abs=2e-6)


def test_runs_in_smaller_stacks_give_the_same_rows(finished, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(experiment, "STACK_RUNS", 1)  # memory bounded by the stack, not by --runs
    out = tmp_path / "sine"
    assert main([*SMALL, "--strategies", "bo3,student", "--out", out], capsys)[0] == 0
    rows = lambda out: {(r["run"], r["strategy"]): r for r in map(json.loads, open(out / "results.jsonl"))}
    mine, theirs = rows(out), rows(finished)
    for key, row in mine.items():
        assert row["test_mse"] == pytest.approx(theirs[key]["test_mse"], abs=2e-6)


# -- every subset of strategies, Ctrl-C, progress ------------------------------------------------

def test_one_strategy_alone_runs_and_reports(tmp_path, capsys):
    result = here(capsys, *SMALL, "--strategies", "one", "--out", tmp_path / "one")
    assert result.returncode == 0 and "damaged" not in result.stdout, result.stderr  # no phase file yet: no news
    assert "| one | 2 |" in (tmp_path / "one" / "summary.md").read_text()


def test_the_summary_shows_the_strategies_named_and_results_keep_every_row(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    assert main([*SMALL, "--strategies", "bo3", "--out", out], capsys)[0] == 0
    summary = (out / "summary.md").read_text()
    assert "| bo3 | 2 |" in summary and summary.count("| 2 |") == 1 and "at each stage" not in summary
    assert len((out / "results.jsonl").read_text().splitlines()) == 2 * len(experiment.STRATEGIES)
    assert main([*SMALL, "--runs", "1", "--strategies", "bo3", "--out", out], capsys)[0] == 0  # fewer runs: run 0's
    assert "| bo3 | 1 |" in (summary := (out / "summary.md").read_text()) and "test MSE over 1 run," in summary


def test_the_kept_share_figure_numbers_its_runs_in_whole_numbers_one_run_too():
    import matplotlib
    matplotlib.use("Agg")
    for runs in (1, 2, 50):
        rows = [dict(strategy="student", run=run, kept_from_teacher=[0.5, 0.5]) for run in range(runs)]
        ax = report.plot_kept_share(rows).axes[0]
        ax.figure.canvas.draw()
        assert all(tick == int(tick) for tick in ax.get_xticks()), ax.get_xticks()


def test_every_subset_of_strategies_reports(finished, tmp_path, monkeypatch, capsys):
    drawn = []
    for name in [name for name in dir(report) if name.startswith("plot_")]:  # which figures, not how they look
        monkeypatch.setattr(report, name, lambda *args: drawn.append(next(a.name for a in args if isinstance(a, Path))))
    rows = [json.loads(line) for line in (finished / "results.jsonl").read_text().splitlines()]
    names = list(experiment.STRATEGIES)
    for k in range(1, len(names) + 1):
        for subset in itertools.combinations(names, k):
            s = sine.SineSettings(runs=2, epochs=12, strategies=",".join(subset))
            sine.write_report(s, [r for r in rows if r["strategy"] in subset], tmp_path)
            summary = (tmp_path / "summary.md").read_text()
            assert all(f"| {name} | 2 |" in summary for name in subset) and summary.count("| 2 |") == k
            assert ("fig2_kept_share.png" in drawn) == ("student" in subset)
            drawn.clear()
    capsys.readouterr()


@pytest.mark.parametrize("stack", ["1", "0"])  # a stack's epochs (lockstep's turns), one model's (fit_one)
def test_a_ctrl_c_that_torch_swallows_still_ends_the_run_at_the_next_epoch(tmp_path, capsys, monkeypatch, stack):
    """A compiled step's guard takes a KeyboardInterrupt for a failed check and goes on, and a weakref callback
    only prints it: report.on_interrupt, SIGINT's handler, remembers it and the next epoch's report raises it."""
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # put back after the test
    previous = signal.getsignal(signal.SIGINT)
    data = sine.data

    def swallowed(*args, **kwargs):  # Ctrl-C lands where torch catches it
        try:
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        except KeyboardInterrupt:
            pass
        return data(*args, **kwargs)
    monkeypatch.setattr(sine, "data", swallowed)
    try:
        code, err = main([*SMALL, "--stack", stack, "--out", tmp_path / "out"], capsys)
        assert code == 130 and err.count("\n") == 1 and err.startswith("interrupted: "), err
        assert not list((tmp_path / "out" / "phases").glob("*.pt"))  # stopped in its first phase, after an epoch
        assert stack == "1" or list((tmp_path / "out" / "phases").glob("*.epochs"))  # kept before it stopped
        assert report.interrupted and sys.unraisablehook is report.quiet_interrupts
        holder = type("Holder", (), {})()
        reference = weakref.ref(holder, report.on_interrupt)  # raised in a callback, where Python can only print it
        del holder
        assert reference() is None and capsys.readouterr().err == ""
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.setattr(sine, "data", data)
    if stack == "0":  # the flag does not outlive its command: the next, in this process, runs to its end
        assert main([*SMALL, "--stack", stack, "--out", tmp_path / "out"], capsys)[0] == 0


def test_an_interrupted_commands_line_says_what_it_kept(tmp_path):
    out = tmp_path / "out"
    assert report.kept(out, lambda: 3) == "nothing had finished; the same command starts again"
    out.mkdir()
    (out / "settings.json").write_text("{}")
    assert report.kept(out, lambda: 3) == f"kept 3 results in {out / 'results.jsonl'} and every finished phase and " \
        f"checkpoint in {out / 'phases'}; the same command resumes from there"
    assert report.kept(out, lambda: 1 / 0).startswith("kept the results in")  # a damaged file: said all the same
    assert report.kept(out, lambda: 0) == "nothing had finished; the same command starts again"
    (out / "phases").mkdir()
    (out / "phases" / "teacher-0.stack").write_text("")  # a phase's checkpoint
    assert report.kept(out, lambda: 0) == f"kept every finished phase and checkpoint in {out / 'phases'}; the same " \
        "command resumes from there"  # no rows yet: results.jsonl not named
    (out / "study.json").write_text("{}")
    assert report.kept(out, lambda: 3).startswith(f"kept every finished phase and row in the folders below {out};")


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_ctrl_c_ends_with_one_line_saying_what_was_kept(tmp_path, workers):
    out = tmp_path / "sine"
    run = subprocess.Popen([sys.executable, str(ROOT / "merge.py"), *SMALL[:2], "--epochs", "600", *SMALL[4:],
                            "--workers", workers, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    while not (out / "settings.json").exists() and run.poll() is None:
        time.sleep(0.05)
    time.sleep(1)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130 and err.count("\n") == 1, err
    if any((out / "phases").glob("*")):  # a phase, or a stack's checkpoint, kept
        assert f"interrupted: kept every finished phase and checkpoint in {out / 'phases'}" in err, err
    else:
        assert err == "interrupted: nothing had finished; the same command starts again\n"


def test_ctrl_c_while_torch_loads_is_one_line_too(tmp_path):
    run = subprocess.Popen([sys.executable, str(ROOT / "merge.py"), *SMALL, "--out", str(tmp_path / "sine")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    maps = Path(f"/proc/{run.pid}/maps")  # torch's library mapped: startup.py's handler is in place, and the
    while run.poll() is None and maps.exists() and "libtorch" not in maps.read_text():  # rest of torch takes
        time.sleep(0.01)  # seconds to import
    time.sleep(0 if maps.exists() else 0.3)  # no /proc (macOS): a while
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130 and err == "interrupted while starting\n", err
    assert not (tmp_path / "sine").exists()


RANK_TERMINATED = """
import logging, os, signal, sys, time, torch, launcher
os.environ.update(MERGE_LAUNCHER=str(os.getppid())) if sys.argv[2] == "launcher" else os.environ.update(WORLD_SIZE="2")
launcher.guard()
if sys.argv[1] == "connected":
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
class Callback:  # SIGTERM while Python runs a callback whose exceptions it prints and ignores, an import's say
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(1000))  # the handler runs here
Callback()
print("still running", flush=True)
logging.getLogger("merge").warning("note: torch.compile failed here")  # a compiled step cut short's
time.sleep(30)
"""


@pytest.mark.parametrize("state, started_by", [("connecting", "launcher"), ("connected", "launcher"),
                                               ("connected", "torchrun")])
def test_sigterm_ends_a_rank_with_exit_code_130_and_nothing_printed_wherever_it_comes(state, started_by):
    """launcher.py stops its ranks by SIGTERM (Ctrl-C, a failed rank), as torchrun and schedulers do theirs:
    each ends with 130 and prints nothing, also when SIGTERM comes in a callback, where SystemExit is printed
    and ignored (a second later there; nothing logged in that second)."""
    run = subprocess.run([sys.executable, "-c", RANK_TERMINATED, state, started_by], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert run.returncode == 130 and run.stderr == "", run.stderr
    assert run.stdout == ("still running\n" if state == "connected" else "")


def test_sine_py_run_as_a_command_names_the_command_in_one_line(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "sine.py"), "--runs", "2"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "python merge.py --task sine" in run.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_closed_pipe_ends_the_run_quietly_as_head_would_have_it(tmp_path):
    """python merge.py ... | head -1: exit code 1 and nothing on stderr (no traceback), the rows so far kept."""
    run = subprocess.Popen([sys.executable, str(ROOT / "merge.py"), *SMALL, "--out", str(tmp_path / "sine")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "sine: 2 runs" in run.stdout.readline()
    run.stdout.close()  # as head does after its line
    assert run.wait(timeout=120) == 1 and run.stderr.read() == ""
    assert (tmp_path / "sine" / "settings.json").exists()

def workers_of(parent):
    """{rank: pid} of the worker processes that merge.py started."""
    children = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
    environ = lambda pid: dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
    return {int(environ(pid)["RANK"]): int(pid) for pid in children}


@pytest.mark.slow
@pytest.mark.parametrize("killed", ["worker 1", "the launcher"])
def test_a_killed_process_leaves_no_orphan_and_the_launcher_says_which(tmp_path, killed):
    out = tmp_path / "sine"
    run = subprocess.Popen([sys.executable, str(ROOT / "merge.py"), *SMALL[:2], "--epochs", "600", *SMALL[4:-2],
                            "--workers", "2", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    while not (out / "settings.json").exists() and run.poll() is None:
        time.sleep(0.05)
    ranks = workers_of(run.pid)
    assert sorted(ranks) == [0, 1]
    os.kill(ranks[1] if killed == "worker 1" else run.pid, signal.SIGKILL)
    _, err = run.communicate(timeout=60)
    deadline = time.time() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in ranks.values()) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in ranks.values())  # no worker outlives it
    if killed == "worker 1":
        assert run.returncode == 1 and err.count("\n") == 1 and "worker 1 of 2" in err and "signal 9" in err, err


def test_progress_is_a_bar_on_a_terminal_and_lines_in_a_file_or_pipe(monkeypatch, capsys):
    report.show_progress()
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    report.progress(20, "one", began=time.time() - 5)(9, [dict(error=[0.2, 0.3])])
    bar = capsys.readouterr().out
    assert bar.startswith("\r    one: [###############               ] 10/20 epochs") and "5 s left" in bar
    assert "training error 0.2500" in bar  # the mean over a stack
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    report.progress(20)(3, [dict(error=0.25)])
    report.progress(20)(5, [dict(error=0.25)])
    assert capsys.readouterr().out.count("\n") == 1  # one line at each fifth of the phase: epoch 4 of 20
    monkeypatch.setattr(report.Progress, "QUIET", 0)  # slow epochs: a line each, whatever the phase's length
    report.progress(6)(0, [dict(error=0.25)])
    report.progress(6)(1, [dict(error=0.25)])
    assert capsys.readouterr().out.count("epoch") == 2


def test_a_log_gets_a_line_at_each_fifth_of_a_long_phase_and_after_each_quiet_spell(monkeypatch, capsys):
    """In a file or a pipe: a phase of 20 epochs says epochs 4, 8, ... 20; a short one whose epochs take 10 s
    says one line each time 30 s have passed since the last line (clock stood in by a list)."""
    now = [0.0]
    monkeypatch.setattr(report, "time", types.SimpleNamespace(time=lambda: now[0]))
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    report.show_progress()
    said = lambda: [line.split("epoch ")[1].split(",")[0] for line in capsys.readouterr().out.splitlines()]
    for epoch in range(20):
        report.progress(20, began=0)(epoch, [dict(error=0.25)])
    assert said() == ["4/20", "8/20", "12/20", "16/20", "20/20"]
    for epoch in range(12):
        now[0] += 10
        report.progress(12, began=0)(epoch, [dict(error=0.25)])
    assert said() == ["4/12", "8/12", "12/12"]
    after_epoch = report.progress(150, "one", began=now[0])  # ImageNet's: 18 minutes an epoch, lines within it
    for epoch in range(3):
        for batch in range(10):
            now[0] += 108
            report.log.info(f"    {batch + 1}/10 batches")
        after_epoch(epoch, [dict(error=0.25)])
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if "epoch" in line] == [  # each epoch's line, however many came between
        f"[{now:7.1f}s]     one: epoch {e}/150, training error 0.2500, {left} left in the phase"
        for e, now, left in ((1, 1200, "44.7 h"), (2, 2280, "44.4 h"), (3, 3360, "44.1 h"))] and len(lines) == 33


def test_a_line_on_a_terminal_goes_above_the_bar_which_is_drawn_again(monkeypatch, capsys):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    report.show_progress()
    report.progress(20, "one", began=time.time() - 5)(9, [dict(error=0.25)])
    report.log.info("    5/10 batches")
    out = capsys.readouterr().out
    bar = "    one: [###############               ] 10/20 epochs, training error 0.2500, 5 s left"
    assert out.startswith(f"\r{bar}\x1b[K\r\x1b[K[") and out.endswith(f"s]     5/10 batches\n{bar}"), repr(out)


def test_a_file_or_figure_whose_write_fails_keeps_what_it_held_and_leaves_no_part(tmp_path, monkeypatch):
    import matplotlib.figure
    matplotlib.use("Agg")
    path = tmp_path / "summary.md"
    path.write_text("before")
    with pytest.raises(UnicodeEncodeError):
        report.write_whole(path, "after \ud800")  # fails as it writes
    assert path.read_text() == "before" and files(tmp_path) == ["summary.md"]

    def cut(fig, target, **kwargs):  # a figure's save cut short by a full disk
        Path(target).write_bytes(b"half a figure")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", cut)
    with pytest.raises(OSError):
        report.plot_lambda([0.1, 0.2], path=path)
    assert path.read_text() == "before" and files(tmp_path) == ["summary.md"]


def test_the_figures_draw_each_strategys_own_numbers(monkeypatch):
    """Fig. 9's boxes (a strategy without rows left out), Fig. 10's count of curves with all 5 peaks, and the kept
    shares stacked run by run."""
    import matplotlib.axes
    matplotlib.use("Agg")
    boxes = []
    monkeypatch.setattr(matplotlib.axes.Axes, "boxplot", lambda ax, values, **kwargs: boxes.append(values))
    rows = [dict(strategy=name, run=run, test_mse=mse, peaks=peaks, curve=[0.0] * len(merge.GRID))
            for name, run, mse, peaks in (("bo3", 0, 0.3, 5), ("bo3", 1, 0.2, 4), ("one", 0, 0.1, 5))]
    ax = report.plot_box(rows, "test_mse", ["student", "bo3", "one"]).axes[0]
    assert boxes == [[[0.3, 0.2], [0.1]]] and [t.get_text() for t in ax.get_yticklabels()] == ["bo3", "one"]
    axes = report.plot_curves(rows, ["student", "bo3", "one"]).axes
    assert [ax.get_title() for ax in axes] == ["bo3: 1/2 get all 5 peaks", "one: 1/1 get all 5 peaks"]
    shares = [dict(strategy="student", run=run, kept_from_teacher=[0.25, 0.75]) for run in range(2)]
    bars = report.plot_kept_share(shares).axes[0].patches
    assert [(bar.get_y(), bar.get_height()) for bar in bars] == [(0, 0.25), (0, 0.25), (0.25, 0.75), (0.25, 0.75)]


def test_the_sines_figures_draw_its_test_mse_its_own_lambdas_and_run_0s_data(monkeypatch, tmp_path, capsys):
    drawn = {}
    for name in [name for name in dir(report) if name.startswith("plot_")]:
        monkeypatch.setattr(report, name, lambda *args, name=name: drawn.setdefault(name, args))
    rows = [json.loads(line) for line in (ROOT / "figures" / "results.jsonl").read_text().splitlines()]
    s = sine.SineSettings(runs=50, epochs=12, n_train=300, strategies="student,bo3,one")
    sine.write_report(s, rows, tmp_path)
    capsys.readouterr()
    assert drawn["plot_box"][1:3] == ("test_mse", ["student", "bo3", "one"])
    ours, papers = drawn["plot_lambda"][:2]  # 2 importance epochs, rescaled to end where the paper's 150 end
    assert len(ours) == 2 and len(papers) == 150 and ours[-1] == pytest.approx(papers[-1])
    assert torch.equal(drawn["plot_sine_data"][0].x_train, sine.data(s, experiment.run_seed(s.seed, 0)).x_train)


def test_a_rank_whose_runs_are_done_waits_a_week_for_the_others_rows(tmp_path, monkeypatch):
    """Over ranks each trains every world-th run, then waits in all_gather_object for the others' rows (cifar.py's
    5 runs on 8 GPUs: three ranks have none), hours at the paper's budgets: through a gloo group that waits a
    week, not the main group, whose collectives keep NCCL's 10 minutes (rank 0 of 2, the other rank stood in)."""
    waits = []
    monkeypatch.setattr(experiment, "ranks", lambda: (0, 2))
    monkeypatch.setattr(torch.distributed, "new_group", lambda **kwargs: waits.append(kwargs) or "the rows' group")
    monkeypatch.setattr(torch.distributed, "all_gather_object", lambda gathered, rows, group: (
        waits.append(group), gathered.__setitem__(slice(None), [rows, []])))  # rank 1's share: no run
    s = sine.parse([*SMALL[2:], "--runs", "1", "--strategies", "one", "--out", str(tmp_path / "out")])
    (tmp_path / "out").mkdir()  # as experiment.locked leaves it
    rows = experiment.run_experiment(s, "sine", lambda seed, device: sine.data(s, seed, device), merge.SineMLP,
                                     sine.result)
    assert waits == [dict(backend="gloo", timeout=datetime.timedelta(days=7)), "the rows' group"]
    assert [(r["run"], r["strategy"]) for r in rows] == [(0, "one")]


def test_workers_0_is_a_process_per_core_the_quota_allows_at_most_8_and_runs(monkeypatch):
    import startup
    monkeypatch.setattr(startup, "usable_cores", lambda: 48)
    for cores, runs, expected in ((16, 50, 8), (3, 50, 3), (16, 2, 2)):
        monkeypatch.setattr(startup, "cpu_cores", lambda: cores)  # a container's quota of cores
        assert sine.workers(sine.parse(["--runs", str(runs), "--device", "cpu"])) == expected


@pytest.mark.parametrize("study, fixed", [("sine_teachers", ["--teachers", "--strategies", "--workers", "--bench"]),
                                          ("sine_budgets", ["--strategies", "--workers", "--bench"])])
def test_a_studys_help_leaves_out_the_flags_it_fixes_and_still_refuses_them(study, fixed, capsys):
    """A flag the study sets itself is taken only to be refused with its reason (the cases above): --help leaves
    it out, and shows the rest."""
    module = __import__(study)
    with pytest.raises(SystemExit):
        module.parse(["--help"])
    shown = capsys.readouterr().out
    assert "--epochs" in shown and "--runs" in shown and not [f for f in fixed + ["--task"] if f in shown], shown
    assert module.parse(["--workers", "2"]).workers == 2  # still parsed, for the run's one line


def test_a_studys_experiments_are_its_k_or_budget_each_in_a_folder_of_its_own():
    """k teachers share the teachers' 2/3 of the budget, and only k = 2 runs bo3 and one model; a budget scales
    --epochs, and the lambda step is rescaled so that lambda ends where the paper's 150 importance epochs end."""
    import sine_budgets
    import sine_teachers
    s = sine_teachers.parse(["--out", "study"])
    for k in (2, 3, 5):
        mine = sine_teachers.settings_of(s, k)
        assert (mine.teachers, mine.out, mine.epochs) == (k, str(Path("study") / f"k{k}"), 900)
        assert merge.budget(mine)["teacher"] == round(600 / k) and mine.strategies.split(",")[1:] == (
            ["bo3", "one"] if k == 2 else [])
    s = sine_budgets.parse(["--out", "study"])
    paper = merge.lambda_schedule(150, s.lambda_start, s.lambda_step)
    for share, epochs in zip(sine_budgets.SHARES, (180, 450, 900, 1800)):
        mine = sine_budgets.settings_of(s, share)
        assert (mine.epochs, mine.out) == (epochs, str(Path("study") / f"epochs{epochs}"))
        importance = merge.budget(mine)["importance"]
        lambdas = merge.lambda_schedule(importance, mine.lambda_start, mine.lambda_step, round(mine.paper_epochs / 6))
        assert len(lambdas) == epochs // 6 and lambdas[-1] == pytest.approx(paper[-1])


def test_a_studys_figure_draws_each_ks_students_and_each_budgets_means_and_medians(monkeypatch):
    import matplotlib.axes
    import sine_budgets
    import sine_teachers
    matplotlib.use("Agg")
    boxes = []
    monkeypatch.setattr(matplotlib.axes.Axes, "boxplot", lambda ax, values, **kwargs: boxes.append(values))
    row = lambda name, mse, k=2: dict(strategy=name, run=0, test_mse=mse, kept_from_teacher=[1 / k] * k)
    rows_of = {2: [row("student", 0.1), row("bo3", 0.2), row("one", 0.3)], 3: [row("student", 0.4, 3)]}
    sine_teachers.plot_teachers(rows_of)
    assert boxes == [[[0.1], [0.4], [0.2], [0.3]]]
    rows_of = {e: [dict(strategy=name, run=run, test_mse=mse * e) for name in sine_budgets.NAMES
                   for run, mse in enumerate((0.1, 0.2, 0.6))] for e in (180, 900)}
    lines = sine_budgets.plot_budgets(rows_of).axes[0].get_lines()
    assert [list(line.get_xdata()) for line in lines] == [[180, 900]] * 6
    assert [list(line.get_ydata()) for line in lines[:2]] == [pytest.approx([54, 270]), pytest.approx([36, 180])]


class Rank:  # a rank that launcher.launch started, without a process: it ends at once with its code, or runs on
    def __init__(self, code):
        self.returncode, self.pid = code, 4242

    def poll(self):
        return self.returncode

    def send_signal(self, signum):
        self.returncode = -signum

    def wait(self, timeout=None):
        return self.returncode

    def kill(self):
        self.returncode = -signal.SIGKILL


def test_the_launcher_starts_each_rank_as_torchrun_would_with_every_setting(monkeypatch, capsys):
    """RANK and LOCAL_RANK r of WORLD_SIZE n, the free port found, one thread each, the command's settings (a
    list's too); a rank's exit code is the command's, and a rank killed by a signal is named."""
    class Free(socket.socket):
        def getsockname(self):
            return ("127.0.0.1", 45678)
    monkeypatch.setattr(launcher.socket, "socket", Free)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    started, codes = [], []
    monkeypatch.setattr(launcher.subprocess, "Popen", lambda argv, env, **kwargs: started.append((argv, env)) or
                        Rank(codes.pop(0)))
    s = imagenet.parse(["--data", "x", "--phase-epochs", "1", "2", "3", "4", "5", "--lr", "0.02", "--runs", "2"])
    codes[:] = [0, 0, 0]
    before = signal.getsignal(signal.SIGTERM)
    launcher.launch(s, 3, "imagenet.py", run=None)
    assert signal.getsignal(signal.SIGTERM) is before  # as this process had it (Ctrl-C's while the ranks ran)
    assert [argv[:2] for argv, _ in started] == [[sys.executable, "imagenet.py"]] * 3
    assert all(imagenet.parse(argv[2:]) == s for argv, _ in started)
    for r, (_, env) in enumerate(started):
        assert {name: env[name] for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                                              "OMP_NUM_THREADS", "MERGE_LAUNCHER")} == dict(
            RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="3", MASTER_ADDR="127.0.0.1", MASTER_PORT="45678",
            OMP_NUM_THREADS="1", MERGE_LAUNCHER=str(os.getpid()))
    for ranks, code, said in (([2, None], 2, ""), ([None, -signal.SIGKILL], 1, "worker 1 of 2 (pid 4242) was ended "
                                                                               "by signal 9 (SIGKILL)")):
        codes[:] = ranks
        with pytest.raises(SystemExit) as exit_:
            launcher.launch(s, 2, "imagenet.py", run=None)
        assert exit_.value.code == code and said in capsys.readouterr().err
        assert signal.getsignal(signal.SIGTERM) is before


def test_a_resumed_phases_bar_tells_the_time_left_at_this_processs_pace_after_its_first_epoch(monkeypatch, capsys):
    """fit_one and a stack's checkpoint go on from epoch 500 of 600. The first epoch takes 60 s (compiling): no
    time left yet, not 99 minutes; then 2 s an epoch, 98 epochs left."""
    now = [0.0]
    monkeypatch.setattr(report, "time", types.SimpleNamespace(time=lambda: now[0]))
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    report.show_progress()
    after_epoch = report.progress(600, "teacher")  # made as the phase resumes
    now[0] += 60
    after_epoch(500, [dict(error=0.25)])
    assert capsys.readouterr().out.endswith("501/600 epochs, training error 0.2500\x1b[K")
    now[0] += 2
    after_epoch(501, [dict(error=0.25)])
    assert "502/600 epochs, training error 0.2500, 3 min left" in capsys.readouterr().out  # 196 s


def test_the_study_of_k_teachers_of_one_run_shows_no_spread():
    import warnings

    import sine_teachers
    row = lambda name, k=2: dict(strategy=name, run=0, test_mse=0.1, peaks=5, kept_from_teacher=[0.5, 0.5],
                                 compute=dict(teacher=[k * 4, 0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning of numpy's either
        table = sine_teachers.teachers_table({2: [row("student"), row("bo3"), row("one")]})
    assert "| 2 | 4 | 0.1000 | 0.1000 | - | 0/1 |" in table


# -- the experiments' settings are docs/settings.md's ----------------------------------------------

PARSERS = {"sine": lambda: sine.parse([]), "lenet": lambda: woof.parse([]),
           "resnet18": lambda: woof.parse(["--arch", "resnet18"]), "resnet20-cifar100": lambda: cifar.parse([]),
           "vgg11-cifar10": lambda: cifar.parse(["--experiment", "vgg11-cifar10"]), "imagenet": lambda: imagenet.parse([])}


def documented_settings():
    """(experiment, setting, value) of every row of docs/settings.md whose value is in backticks."""
    rows = []
    for line in (ROOT / "docs" / "settings.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0] in PARSERS and cells[2].startswith("`"):
            rows.append((cells[0], cells[1], ast.literal_eval(cells[2].strip("`"))))
    return rows


def test_the_settings_table_covers_every_experiment_and_setting():
    rows = documented_settings()
    assert {name for name, _, _ in rows} == set(PARSERS) and len(rows) >= 90
    for name in PARSERS:
        mine = {setting for n, setting, _ in rows if n == name}
        assert {"batch", "lr", "momentum", "weight_decay", "gate_lr", "lambda_start", "lambda_step"} <= mine, name


@pytest.mark.parametrize("name, setting, value", documented_settings())
def test_every_preset_is_the_documented_setting(name, setting, value):
    s = PARSERS[name]()
    if setting == "phases":  # teacher, importance, fine-tune, bo3 model and one model epochs
        b = merge.budget(s)
        got = (b["teacher"], b["importance"], b["finetune"], b["bo3"], b["one"])
    else:
        got = getattr(s, setting)
    assert got == pytest.approx(value), (name, setting)


@pytest.mark.parametrize("args, message", [([], "no GPU"), (["--device", "cpu", "--budget", "-5"], "--budget must be"),
                                           (["--device", "cpu", "--lenet-data", "/no/such"], "is not a folder"),
                                           (["--device", "cpu", "--lenet-data", str(ROOT / "docs")],
                                            "not a folder in Imagewoof's layout (--data"),
                                           (["--device", "cpu", "--only", "sine", "nothing"], "invalid choice")])
def test_the_gpu_check_without_a_gpu_or_with_a_bad_setting_is_bad_input(tmp_path, capsys, args, message):
    import gpu_check
    if torch.cuda.is_available() and not args:
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main([*args, "--report", str(tmp_path / "report.md")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and message in err and files(tmp_path) == []


@pytest.mark.parametrize("report", ["", "a folder"])
def test_the_gpu_check_refuses_a_report_that_names_no_file_and_writes_nothing(tmp_path, capsys, monkeypatch, report):
    import gpu_check
    (tmp_path / "a folder").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--device", "cpu", "--report", report])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "names no file" in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a folder"]


def test_the_gpu_check_keeps_what_a_failed_step_said_and_exits_with_1(tmp_path, capsys, monkeypatch):
    """A failed step: its traceback on stderr and in the logs, the report names it, the exit code is 1; a command
    run leaves its output, and its worker processes' (file descriptors 1 and 2), in its log as it comes."""
    import gpu_check
    import gpu_timings

    def fails(*args):
        raise IndexError("a step's bug")
    monkeypatch.setattr(gpu_check, "sine_graphs", fails)
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--device", "cpu", "--only", "graphs", "--report", str(tmp_path / "r.md")])
    failed = (tmp_path / "r_logs" / "failed.log").read_text()
    assert exit_.value.code == 1 and "IndexError: a step's bug" in capsys.readouterr().err
    assert "== CUDA graphs" in failed and "in fails" in failed and "Failed: CUDA graphs." in (tmp_path / "r.md").read_text()

    def command(argv):  # a script's main: a line of its own, one of a worker process, then its error and exit code
        print("training")
        subprocess.run([sys.executable, "-c", "print('from a worker')"])
        sys.exit(print("error: --lr must be positive", file=sys.stderr) or 2)
    with pytest.raises(RuntimeError, match=r"exit code 2: error: --lr must be positive"):
        gpu_timings.run(command, ["--out", tmp_path / "out"], "cpu", tmp_path / "command.log")
    assert (tmp_path / "command.log").read_text().split("\n") == ["training", "from a worker",
                                                                  "error: --lr must be positive", ""]
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--device", "cpu", "--report", str(tmp_path / "r.md" / "inside a file.md")])
    assert exit_.value.code == 2 and "cannot write the report" in capsys.readouterr().err


def test_the_gpu_check_says_each_measurement_as_it_is_made(tmp_path, capsys, monkeypatch):
    """A later part's failure keeps what was measured before it: the compiled graphs' row when the eager ones fail,
    ImageNet's loader and model when imagenet.py's epoch fails (its traceback kept whole), each stack size of the
    kernels, whose failed profile is named."""
    import gpu_check

    def graphs(*args):
        yield 1, 200.0, 200.0, 0.0, 0.0
        raise IndexError("the eager step's bug")

    def epoch_fails(*args, **kwargs):
        raise ValueError("an epoch's bug")

    def kernels(device, sizes):
        yield sizes[0], (100.0, "RuntimeError: no compiler", 0.0, 0.0, 0.5, 0.6, 30.0, [], "RuntimeError: no CUPTI")
        raise IndexError("the larger stack's bug")
    monkeypatch.setattr(gpu_check, "sine_graphs", graphs)
    monkeypatch.setattr(gpu_check, "imagenet_throughput", lambda *args: dict(
        size=64, batch=16, workers=1, loader=400.0, model=30.0, together=28.0, decoding=float("nan"), same=0.0,
        argv=[]))
    monkeypatch.setattr(gpu_check, "imagenet_epoch", epoch_fails)
    monkeypatch.setattr(gpu_check, "sine_kernels", kernels)
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--device", "cpu", "--only", "graphs", "imagenet-cpu", "kernels", "--report",
                        str(tmp_path / "r.md")])
    said, failed = (tmp_path / "r.md").read_text(), (tmp_path / "r_logs" / "failed.log").read_text()
    assert exit_.value.code == 1 and "compiled: 200 us a step" in said and "batch 32, eager" not in said
    assert "| 400 | - | 30 | 28 |" in said and "ValueError: an epoch's bug" in said and "in epoch_fails" in failed
    assert "A stack of 50 sine MLPs, compiled, 10 steps a block: 100 us a step" in said
    assert "none profiled (profiling failed: RuntimeError: no CUPTI)" in said
    assert "Failed: CUDA graphs; ImageNet throughput, --decode cpu; kernels." in said
    capsys.readouterr()


def test_stack_auto_stacks_on_a_gpu_alone():
    import stacked
    assert woof.parse([]).stack == "auto" and sine.parse([]).stack == "1"  # LeNet's default; the sine's
    assert stacked.stacks("auto", "cuda") and not stacked.stacks("auto", "cpu")
    assert stacked.stacks("1", "cpu") and not stacked.stacks("0", torch.device("cuda", 0))


def test_more_sine_workers_than_gpus_is_bad_input(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a machine with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, err = main([*SMALL, "--device", "cuda", "--workers", 2, "--out", tmp_path / "sine"], capsys)
    assert code == 2 and err == "error: --workers 2 on the GPU: each worker takes a GPU of its own, and torch sees 1\n"
    assert not list(tmp_path.iterdir())


def test_device_auto_takes_a_gpu_but_for_the_sine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a machine with a GPU
    assert experiment.resolve_device(sine.parse([])) == "cpu"  # where the README's rows come from
    assert experiment.resolve_device(sine.parse(["--device", "cuda"])) == "cuda"  # asked for: given
    assert experiment.resolve_device(woof.parse(["--arch", "resnet18"])) == "cuda"
    assert experiment.resolve_device(imagenet.parse([])) == "cuda"
