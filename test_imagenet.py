"""Tests for imagenet.py and the runs over ranks, on the CPU with gloo: a tiny ImageFolder the tests
write runs end to end in one process and over the ranks imagenet.py --processes starts; DDP (under
torchrun) really averages; a killed 2-process run resumes at its last finished epoch; runs spread
over torchrun's ranks give the rows of a plain run, each once; the loader's draft and GPU decoding."""
import atexit
import dataclasses
import gc
import hashlib
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import experiment
import imagenet
import images
import startup
import streaming

ROOT = Path(__file__).parent
TINY = ["--width", 4, "--size", 32, "--batch", 8, "--val-images", 4, "--workers", 0, "--device", "cpu"]


def write_folder(root, classes=3, n_train=12, n_val=4):
    """The ImageFolder layout: class c's images are brighter in channel c, of several sizes."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(classes):
            (root / split / f"n0{c}").mkdir(parents=True)
            for j in range(n):
                pixels = rng.integers(0, 100, (40 + 7 * j, 48, 3), dtype=np.uint8)
                pixels[..., c] += 120
                Image.fromarray(pixels).save(root / split / f"n0{c}" / f"{j}.JPEG")
    return root


@pytest.fixture(scope="session")  # once a worker, whatever order the tests run in
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("imagenet") / "data")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args, processes=1, **kwargs):
    """imagenet.py (or another script) through torchrun with `processes`, or a plain python for 1."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port",
               str(free_port())] if processes > 1 else [sys.executable]  # a port of its own: tests run side by side
    environment = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([*command, *map(str, args)], cwd=ROOT, env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def finished(process):
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output[-3000:]
    return output


def rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def protocol_ran(out, output, student_epochs, one, short):
    """The rows, summary and figure of a whole run of imagenet.py with the student and one model."""
    main, short_rows = rows(out), rows(out / "one_short")
    assert sorted(r["strategy"] for r in main) == ["one", "student"] and [r["strategy"] for r in short_rows] == ["one"]
    assert all(0 <= r["test_accuracy"] <= r["test_top5"] <= 1 for r in main + short_rows)
    student, = [r for r in main if r["strategy"] == "student"]
    assert sum(epochs for epochs, _ in student["compute"].values()) == student_epochs
    summary = (out / "summary.md").read_text()
    assert "Table 4" in summary and "test accuracy over 1 run\n" in summary and f"| one, {one} epochs | 1 |" in summary
    assert summary.count(f"| one, {short} epochs | 1 |") == 1  # its row, once
    assert "images/s" in output and (out / "box_imagenet.png").exists()
    assert f"strategies, {one} epochs each" in output and f"one model of {short} epochs: 1 run x 1 strategies, " \
        f"{short} epochs each" in output  # the budget --phase-epochs gives, not --epochs
    assert not list(out.glob("phases/*.epochs"))  # the epoch checkpoints go once their phase is done


def test_the_protocol_runs_end_to_end(folder, tmp_path, capsys):
    """One process, this one (main(argv)); the command line on two: the test of a killed run below."""
    out = tmp_path / "out"
    imagenet.main([str(a) for a in ["--data", folder, "--out", out, *TINY, "--phase-epochs", 2, 1, 2, 1, 3, "--short", 2]])
    printed = capsys.readouterr()
    protocol_ran(out, printed.out + printed.err, 2 * 2 + 1 + 2, 3, 2)


def test_without_one_the_shorter_one_model_is_not_trained_either(folder, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "one_short").mkdir(parents=True)
    (out / "one_short" / "settings.json").write_text("another run's")  # not read, let alone refused
    imagenet.main([str(a) for a in ["--data", f"{folder}/", "--out", out, *TINY, "--phase-epochs", 1, 1, 1, 1, 2,
                                    "--short", 1, "--strategies", "bo3"]])
    assert [r["strategy"] for r in rows(out)] == ["bo3"] and os.listdir(out / "one_short") == ["settings.json"]
    summary = (out / "summary.md").read_text()
    assert "| bo3 | 1 |" in summary and "| one" not in summary and "one model of" not in capsys.readouterr().out
    assert json.loads((out / "settings.json").read_text())["data"] == str(folder)  # tab completion's slash gone


@pytest.mark.slow
def test_ddp_averages_the_gradients_of_the_ranks(folder, tmp_path):
    """From the same weights, one epoch on 2 processes with 4 images a rank gives the weights of one
    process with 8 (LeNet: no BatchNorm, whose statistics are each rank's own); each rank evaluates its share of
    the test and validation images, and the counts summed give one process's accuracies (a rank's share alone
    gives others); channel pruning's masks, whose gradients DDP leaves alone, are the same on every rank, half of
    each group kept (each rank's own had failed compression)."""
    script = tmp_path / "one_epoch.py"
    script.write_text(f"""
import torch, torch.distributed as dist
import experiment, imagenet, merge, streaming
rank, world = experiment.ranks()
if world > 1:
    dist.init_process_group("gloo")
s = imagenet.parse(["--data", "{folder}", "--size", "28", "--batch", "8", "--val-images", "4", "--workers", "0"])
data, classes = streaming.streamed_folder(s, rank, world, torch.device("cpu"))
torch.manual_seed(0)
model = merge.LeNet(classes)
torch.save(model.state_dict(), f"{tmp_path}/start.pt")
class Brightest(torch.nn.Module):  # the brightest channel's class, or the next one for about half the images
    seen = torch.zeros(())  # images this rank evaluates: its share
    def forward(self, x):
        self.seen += len(x)
        means = x.mean((2, 3))
        return torch.where((means.sum(1) * 10).floor()[:, None] % 2 == 1, means.roll(1, 1), means)
evaluated = [data.accuracies(Brightest(), split) for split in ("test", "val")]
seen = Brightest.seen.clone()
if world > 1:  # a rank's share alone: its counts not summed
    summed, dist.all_reduce = dist.all_reduce, lambda *args: None
    evaluated += [data.accuracies(Brightest(), split) for split in ("test", "val")]
    dist.all_reduce = summed
merge.fit(data.wrap(model), data, s, 2, drops=(0.5,), seed=3)  # DDP over the ranks, as the runs do
masked = merge.variant(model, k=2, gated=True)  # as merge.prune: a wide network, masks in its gates' place
masks = merge.with_masks(masked)
merge.fit(data.wrap(masked), data, s, 2, seed=4, **merge.taylor_pruning(masks, 2))
pruned = merge.compress(masked, [mask.m.detach().nonzero().flatten() for mask in masks])
torch.save(dict(model.state_dict(), evaluated=torch.tensor(evaluated[:2]), seen=seen,
                share=torch.tensor(evaluated[2:] or evaluated),
                **{{f"pruned.{{k}}": v for k, v in pruned.state_dict().items()}},
                **{{f"mask{{i}}": mask.m.detach() for i, mask in enumerate(masks)}}),
           f"{tmp_path}/rank{{rank}}-of-{{world}}.pt")
if world > 1:  # as experiment.main does: no rank leaves while another still talks to it
    dist.barrier()
    dist.destroy_process_group()
""")
    runpy.run_path(str(script))  # one process: this one
    finished(launch(script, processes=2))
    alone, *ranks = (torch.load(tmp_path / name) for name in ("rank0-of-1.pt", "rank0-of-2.pt", "rank1-of-2.pt"))
    assert ranks[0]["seen"] + ranks[1]["seen"] == alone.pop("seen") == 12 + 4 and ranks[0].pop("seen") < 16
    assert not torch.equal(alone.pop("share"), ranks[0].pop("share"))  # a share's accuracies: not the split's
    for name, value in alone.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # every rank holds the same weights and masks
        if name.startswith("mask"):  # half of each group kept (which half may differ from one process's: units
            assert value.sum() == ranks[0][name].sum() == len(value) // 2  # whose gradients were 0 tie)
        elif not name.startswith("pruned"):
            assert torch.allclose(ranks[0][name], value, atol=1e-6), name
    start = torch.load(tmp_path / "start.pt")
    assert not torch.allclose(alone["fc3.weight"], start["fc3.weight"], atol=1e-3)  # it did train


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_at_its_last_epoch_with_the_rows_of_an_unbroken_one(folder, tmp_path):
    """Ranks that imagenet.py --processes 2 starts itself (torchrun's are the other tests'): the whole protocol
    runs on two; killed with its launcher, it resumes at the last finished epoch, to the same rows."""
    args = ["imagenet.py", "--data", folder, *TINY, "--phase-epochs", 1, 1, 1, 1, 16, "--short", 1]
    unbroken = finished(launch(*args, "--out", tmp_path / "unbroken", "--processes", 2))
    protocol_ran(tmp_path / "unbroken", unbroken, 2 * 1 + 1 + 1, 16, 1)
    out = tmp_path / "killed"
    first = launch(*args, "--out", out, "--processes", 2, start_new_session=True)
    while not list(out.glob("phases/one-*.epochs")) and first.poll() is None:
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)  # the launcher; its ranks end themselves within a second, mid-phase: their
    # half-second watch is well under the 15 epochs left (0.13 s each, 2 ranks on 2 idle cores; 2 s in all)
    first.communicate(timeout=60)
    time.sleep(1)
    assert not (out / "results.jsonl").exists() or not rows(out)
    again = finished(launch(*args, "--out", out, "--processes", 2))
    assert "resumed after epoch" in again and "resumed" not in unbroken
    assert rows(out) == rows(tmp_path / "unbroken")


@pytest.mark.slow
def test_runs_spread_over_ranks_give_the_rows_of_a_plain_run_each_once(tmp_path):
    import test_lenet_imagewoof
    data = test_lenet_imagewoof.make_folder(tmp_path / "woof")
    args = ["lenet_imagewoof.py", "--data", data, "--epochs", 6, "--runs", 3, "--device", "cpu"]
    finished(launch(*args, "--out", tmp_path / "plain"))
    finished(launch(*args, "--out", tmp_path / "ranks", processes=2))
    key = lambda row: (row["run"], row["strategy"])
    spread, plain = rows(tmp_path / "ranks"), rows(tmp_path / "plain")
    assert len({key(r) for r in spread}) == len(spread) == 9 and sorted(spread, key=key) == sorted(plain, key=key)
    assert (tmp_path / "ranks" / "summary.md").read_text() == (tmp_path / "plain" / "summary.md").read_text()
    # (a run over ranks that resumes: test_experiment.py's workers that share the runs unequally)


@pytest.mark.parametrize("damage, message", [
    ("missing", "no such folder"),
    ("none", "--data is needed"),
    ("empty", "holds no .jpg, .jpeg or .png images"),
    ("classes", "different classes"),
    ("validation", "leaves fewer of the"),
    ("no epochs", "--phase-epochs must be at least 1, got 0"),
    ("epochs", "--epochs stays 150"),
    ("short", "--short 3: the second one model is the shorter, at most --phase-epochs' one model (2)"),
    ("empty image", "cannot read image"),
    ("text as an image", "cannot read image"),
    ("bad image in val only", "cannot read image"),
    ("too many pixels", "cannot read image"),
    ("long name", "File name too long"),
    ("decode gpu", "--decode gpu needs a GPU and torchvision"),
])
def test_a_wrong_folder_or_setting_gives_one_line_and_exit_code_2(folder, tmp_path, capsys, damage, message):
    data = tmp_path / "nowhere" if damage == "missing" else "" if damage == "none" else folder
    if damage == "classes":
        data = write_folder(tmp_path / "data")
        (data / "val" / "n02").rename(data / "val" / "n09")
    if damage == "empty":
        data = tmp_path / "empty"
        for split in ("train", "val"):
            (data / split / "n01").mkdir(parents=True)
    if damage in ("empty image", "text as an image", "bad image in val only", "too many pixels"):
        data = write_folder(tmp_path / "data")
        split = "val" if damage == "bad image in val only" else "train"
        bad = data / split / "n01" / "bad.JPEG"
        if damage == "too many pixels":  # 20000 x 20000 declared in its header: Pillow's decompression bomb
            Image.new("L", (1, 1)).save(bad.with_suffix(".png"))
            raw = bytearray(bad.with_suffix(".png").read_bytes())
            raw[16:24] = (20000).to_bytes(4, "big") * 2
            raw[29:33] = zlib.crc32(raw[12:29]).to_bytes(4, "big")  # the header's checksum again
            bad.with_suffix(".png").write_bytes(bytes(raw))
        else:
            bad.write_text("" if damage == "empty image" else "not an image")
    if damage == "long name":
        data = tmp_path / ("x" * 300)
    extra = {"validation": ["--val-images", 1000], "no epochs": ["--phase-epochs", 0, 1, 1, 1, 1],
             "epochs": ["--epochs", 6], "decode gpu": ["--decode", "gpu"],
             "short": ["--phase-epochs", 1, 1, 1, 1, 2, "--short", 3]}.get(damage, [])
    with pytest.raises(SystemExit) as exit_:
        imagenet.main([str(a) for a in ["--data", data, "--out", tmp_path / "out", *TINY, *extra]])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_the_ranks_share_the_check_of_the_headers_and_each_learns_a_problem_any_found(tmp_path, monkeypatch,
                                                                                       capsys):
    """Every start reads each image's header once, spread over the ranks; a bad file in one rank's share
    stops every rank with its line."""
    experiment.report.show_progress()  # log's lines on stdout, as the command line shows them
    data = write_folder(tmp_path / "data")
    bad = data / "train" / "n01" / "bad.JPEG"
    bad.write_text("not an image")
    s = imagenet.parse(["--data", str(data), *map(str, TINY)])
    paths = images.list_images(data / "train")[0] + images.list_images(data / "val")[0]
    owner, shares, real_check = paths.index(bad) % 2, {}, streaming.check_images  # owner: whose share holds it
    for rank in (0, 1):
        monkeypatch.setattr(streaming, "check_images", lambda share, total, rank=rank: (
            shares.update({rank: share}), real_check(share, total=total)))

        def all_gather_object(found, mine, rank=rank):  # the process group's part: the other rank's answer
            found[:] = [mine if r == rank else (f"cannot read image {bad}" if r == owner else None, *mine[1:])
                        for r in (0, 1)]  # (its problem, and its listing as this rank's)
        monkeypatch.setattr(streaming.dist, "all_gather_object", all_gather_object)
        with pytest.raises(experiment.InputError, match="bad.JPEG"):
            streaming.streamed_folder(s, rank, 2, torch.device("cpu"))
    assert sorted(shares[0] + shares[1]) == sorted(paths) and not set(shares[0]) & set(shares[1])
    printed = capsys.readouterr()
    assert f"checking {len(shares[0])} of {len(paths)} images, this process's share" in printed.out + printed.err


def test_ranks_that_list_other_images_stop_with_one_line(tmp_path, monkeypatch):
    """Machines with copies of --data of their own: one that lacks an image (or holds another) would draw another
    validation split and count other batches; every rank stops with one line instead."""
    data = write_folder(tmp_path / "data")
    s = imagenet.parse(["--data", str(data), *map(str, TINY)])
    monkeypatch.setattr(streaming.dist, "all_gather_object", lambda found, mine: found.__setitem__(
        slice(None), [mine, (None, mine[1] - 1, "another listing")]))  # rank 1's copy lacks an image
    with pytest.raises(experiment.InputError, match=r"rank 1 lists other images than rank 0 \(47 and 48\); every "
                                                    "machine needs the same copy"):
        streaming.streamed_folder(s, 0, 2, torch.device("cpu"))
    monkeypatch.setattr(streaming.dist, "all_gather_object", lambda found, mine: found.__setitem__(
        slice(None), [mine, ("--data x: no such folder", 0, "")]))  # rank 1's machine lacks the folder
    with pytest.raises(experiment.InputError, match="rank 1: --data x: no such folder"):
        streaming.streamed_folder(s, 0, 2, torch.device("cpu"))
    shared = []  # and as rank 1 there: its problem is said by every rank, not alone by an exit with nothing said
    monkeypatch.setattr(streaming.dist, "all_gather_object", lambda found, mine: (
        shared.append(mine), found.__setitem__(slice(None), [(None, 48, "rank 0's"), mine])))
    with pytest.raises(experiment.InputError, match=f"rank 1: --data {tmp_path / 'gone'}: "):
        streaming.streamed_folder(imagenet.parse(["--data", str(tmp_path / "gone"), *map(str, TINY)]), 1, 2,
                                  torch.device("cpu"))
    assert shared[0][1:] == (0, hashlib.sha1(b"").hexdigest())


@pytest.mark.parametrize("seen_by_rank_1", [True, False])
def test_every_rank_must_see_the_out_that_rank_0_writes(tmp_path, monkeypatch, seen_by_rank_1):
    """--out on a disk of each machine's own: rank 0's files unseen by another rank, which would train again
    what rank 0 kept. Rank 0 writes a token there, each rank reads it, and it is gone after; where a rank did
    not see it, every rank stops with one line and --out is left as it was (here: not made)."""
    out, gathered = tmp_path / "out", []
    monkeypatch.setattr(streaming.dist, "broadcast_object_list", lambda objects: None)  # rank 0: its own token

    def all_gather_object(found, seen):
        gathered.append(seen)
        found[:] = [seen, seen_by_rank_1]
    monkeypatch.setattr(streaming.dist, "all_gather_object", all_gather_object)
    if seen_by_rank_1:
        streaming.same_out_on_every_rank(out, 0, 2)
        assert gathered == [True] and sorted(out.iterdir()) == []
    else:
        with pytest.raises(experiment.InputError, match=f"--out {out}: rank 1 does not see the files rank 0 writes "
                                                        "there; put --out on a file system that every machine shares"):
            streaming.same_out_on_every_rank(out, 0, 2)
        assert gathered == [True] and not out.exists()
    monkeypatch.setattr(streaming.dist, "broadcast_object_list", lambda objects: objects.__setitem__(0, "rank 0's"))
    monkeypatch.setattr(streaming.dist, "all_gather_object", lambda found, seen: (
        gathered.append(seen), found.__setitem__(slice(None), [True, seen])))
    out.mkdir(exist_ok=True)
    (out / ".ranks").write_text("an earlier job's")  # as rank 1 on a disk of its own, an earlier job's token there
    with pytest.raises(experiment.InputError, match="rank 1 does not see"):
        streaming.same_out_on_every_rank(out, 1, 2, patience=0.2)
    assert gathered[-1] is False
    later = threading.Timer(0.5, (out / ".ranks").write_text, ["rank 0's"])  # NFS shows rank 0's file late
    later.start()
    streaming.same_out_on_every_rank(out, 1, 2, patience=5)
    assert gathered[-1] is True


@pytest.mark.slow
def test_under_torchrun_an_out_of_other_settings_is_refused_before_any_rank_reads_the_images(tmp_path):
    """Rank 0 reads --out's files before the ranks read the images' headers, and every rank stops: the line is
    the refusal's, not the bad image's that reading the headers would have found."""
    data, out = write_folder(tmp_path / "data"), tmp_path / "out"
    (data / "train" / "n01" / "bad.JPEG").write_text("not an image")
    out.mkdir()
    other = imagenet.parse(["--data", str(data), "--out", str(out), *map(str, TINY), "--lr", "0.2"])
    (out / "settings.json").write_text(json.dumps(experiment.settings_record(imagenet.runs_settings(other)[0], out)))
    process = launch("imagenet.py", "--data", data, "--out", out, *TINY, processes=2)
    output = process.communicate(timeout=300)[0]
    assert process.returncode != 0 and "error: " in output and "holds results made with other settings" in output
    assert "bad.JPEG" not in output and sorted(p.name for p in out.iterdir()) == ["settings.json"], output[-2000:]


def test_an_image_cut_short_is_replaced_by_the_next_with_a_warning(tmp_path, capsys):
    data = write_folder(tmp_path / "data")
    whole = (data / "train" / "n01" / "3.JPEG").read_bytes()
    (data / "train" / "n01" / "3.JPEG").write_bytes(whole[:len(whole) // 2])  # its header fine, its pixels cut
    imagenet.main([str(a) for a in ["--data", data, "--out", tmp_path / "out", *TINY, "--phase-epochs", 1, 1, 1, 1, 1,
                                    "--short", 1, "--strategies", "one"]])
    output = capsys.readouterr().err
    assert "3.JPEG" in output and "the next image takes its place" in output
    summary = (tmp_path / "out" / "summary.md").read_text()  # the two one models of 1 epoch, each its own row:
    assert "| one, 1 epochs | 1 |" in summary and "| one, 1 epochs (one_short) | 1 |" in summary, summary


def test_its_own_settings_never_meet_the_shared_checks(monkeypatch):
    """--workers is imagenet.py's DataLoader workers and sine.py's processes: the shared checks read
    neither, so eight loader workers on a machine that reports one GPU are accepted."""
    import sine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    s = imagenet.parse(["--data", "x", "--workers", "8", "--device", "cuda", "--out", "/nonexistent-parent/out"])
    assert s.workers == 8
    experiment.check_settings(s)  # no "--workers 8 on --device cuda wants a GPU each"
    shared = {f.name for f in dataclasses.fields(experiment.Settings)}
    for own in (imagenet.ImageNetSettings, sine.SineSettings):
        mine = {f.name for f in dataclasses.fields(own)} - shared
        assert "workers" in mine


def test_loader_workers_by_default_share_the_machines_cores_among_its_ranks(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(48)), raising=False)
    monkeypatch.setattr(startup, "CGROUPS", tmp_path)  # no quota, whatever the machine of the test's
    monkeypatch.setattr(startup, "OWN_CGROUP", tmp_path / "none")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's 4 ranks on this machine
    assert streaming.loader_workers(imagenet.parse(["--data", "x"])) == 10  # 48 cores / 4, less two a rank
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert streaming.loader_workers(imagenet.parse(["--data", "x"])) == 46
    assert streaming.loader_workers(imagenet.parse(["--data", "x", "--workers", "0"])) == 0  # in the rank itself
    monkeypatch.setenv("WORLD_SIZE", "16")  # torchrun over 2 machines: 8 ranks on this one
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert streaming.loader_workers(imagenet.parse(["--data", "x"])) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "24")  # 2 cores a rank: still one worker
    assert streaming.loader_workers(imagenet.parse(["--data", "x"])) == 1
    with pytest.raises(experiment.InputError, match="--workers must be -1 or more, got -2"):
        experiment.check_settings(imagenet.parse(["--data", "x", "--workers", "-2"]))


def test_a_containers_cpu_quota_limits_the_cores_a_run_takes(monkeypatch, tmp_path):
    """cgroup v2: the least quota of the process's group and those above it (Docker's --cpus 6 in a group
    of 8 cores, on a machine of 48); "max" is none, and 1.5 cores' quota is 1 core. cgroup v1: the quota
    at the cpu controller's root, as a container sees its own group; -1 is none."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(48)), raising=False)
    monkeypatch.setattr(startup, "CGROUPS", tmp_path)
    monkeypatch.setattr(startup, "OWN_CGROUP", tmp_path / "membership")
    (tmp_path / "membership").write_text("0::/machine/job\n")
    (tmp_path / "machine" / "job").mkdir(parents=True)
    (tmp_path / "cpu.max").write_text("max 100000\n")  # the root's: no quota
    assert startup.cpu_cores() == 48
    (tmp_path / "machine" / "cpu.max").write_text("800000 100000\n")
    (tmp_path / "machine" / "job" / "cpu.max").write_text("600000 100000\n")
    assert startup.cpu_cores() == 6
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert streaming.loader_workers(imagenet.parse(["--data", "x"])) == 1  # 6 cores / 2, less two a rank
    (tmp_path / "machine" / "cpu.max").write_text("150000 100000\n")
    assert startup.cpu_cores() == 1
    (tmp_path / "machine" / "cpu.max").write_text("50000 100000\n")  # Docker's --cpus 0.5: a core, not none
    assert startup.cpu_cores() == 1
    (tmp_path / "membership").write_text("12:cpu,cpuacct:/\n")  # cgroup v1 only: its quota at the root
    assert startup.cpu_cores() == 48  # none written
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # none
    assert startup.cpu_cores() == 48
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
    assert startup.cpu_cores() == 4
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")  # half a core: one
    assert startup.cpu_cores() == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("6400000\n")  # 64 cores' quota: the 48 it may run on
    assert startup.cpu_cores() == 48
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("0\n")  # damaged files: no quota read, no error
    (tmp_path / "membership").write_bytes(b"0::/machine/\xff\n")
    assert startup.cpu_cores() == 48


def test_a_command_starts_no_more_torch_threads_than_its_cpu_quota_allows(monkeypatch, tmp_path):
    """startup.before_torch, which every command runs before torch loads: OMP_NUM_THREADS, which torch reads
    as it loads, at the quota's cores where they are fewer than the cores the process may run on; none
    without a quota (torch's own default); a count given is kept. And gc.freeze is made to run at exit."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(startup, "CGROUPS", tmp_path)
    monkeypatch.setattr(startup, "OWN_CGROUP", tmp_path / "membership")
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # pytest's Ctrl-C stays, and its exit
    exit_handlers = []
    monkeypatch.setattr(atexit, "register", exit_handlers.append)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    (tmp_path / "membership").write_text("0::/\n")
    startup.before_torch()
    assert "OMP_NUM_THREADS" not in os.environ
    (tmp_path / "cpu.max").write_text("300000 100000\n")
    startup.before_torch()
    assert os.environ["OMP_NUM_THREADS"] == "3"
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    startup.before_torch()
    assert os.environ["OMP_NUM_THREADS"] == "2"
    assert exit_handlers == [gc.freeze] * 3  # a command calls it once, first: at exit it runs last


def photo(path, w=500, h=375, seed=0):
    """A smooth JPEG of a photo's size, so that decoding at a smaller scale changes little."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC).save(path, quality=95)
    return path


def crops(images, seed=5):
    images.seed = seed
    return [images[i] for i in range(len(images))]


def test_a_jpeg_decodes_at_the_smallest_scale_that_keeps_its_crop(tmp_path, monkeypatch):
    """Pillow's draft: a 500 x 375 JPEG of which a 32 x 32 crop is taken decodes at 1/2 to 1/8 scale; the crops
    are close to those of a full decode, with the same draws, and the same again for a resumed epoch."""
    import streaming
    from PIL import JpegImagePlugin
    paths = [photo(tmp_path / f"{i}.JPEG", seed=i) for i in range(6)]
    for train in (True, False):
        images = streaming.Images(paths, list(range(6)), 32, train)
        scales = []
        draft = JpegImagePlugin.JpegImageFile.draft
        monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                            lambda self, mode, size: scales.append(draft(self, mode, size)[1][2] / 500) or None)
        small = crops(images)
        monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", lambda self, mode, size: None)  # full decodes
        whole = crops(images)
        assert min(scales) <= 0.25 and len(scales) == 6, scales
        for (a, label_a, factors_a), (b, label_b, factors_b) in zip(small, whole):
            assert a.shape == b.shape == (3, 32, 32) and label_a == label_b and torch.equal(factors_a, factors_b)
            assert 0 < (a.float() - b.float()).abs().mean() < 3  # of 255: decoded at a smaller scale, yet close
        monkeypatch.undo()
        assert all(torch.equal(a[0], b[0]) for a, b in zip(crops(images), crops(images)))  # the same epoch again


def test_evaluation_resizes_the_shorter_side_to_224_over_0_95_rounded_down_as_timm():
    """timm's crop_pct 0.95 at 224: the shorter side to floor(235.8) = 235, then the centre 224 x 224."""
    pixels = np.random.default_rng(0).integers(0, 256, (470, 940, 3), dtype=np.uint8)  # 940 wide, 470 high
    image = Image.fromarray(pixels)
    left, top = (470 - 224) // 2, (235 - 224) // 2
    timm = image.resize((470, 235), 3).crop((left, top, left + 224, top + 224))  # 3: bicubic
    assert np.array_equal(np.asarray(images.centre_crop(image, 224, crop_pct=0.95)), np.asarray(timm))

@pytest.mark.parametrize("decoder", ["Pillow", pytest.param("torchvision", marks=pytest.mark.skipif(
    not streaming.has_torchvision(), reason="torchvision does not load beside this torch"))])
def test_decoding_on_the_gpu_crops_as_the_workers_do(tmp_path, monkeypatch, capsys, decoder):
    """--decode gpu, its plumbing on the CPU: the workers hand JPEGs over undecoded (another image, here a PNG
    and a JPEG cut short, decoded as before), collate_raw batches them, and Streamed.decoded gives crops close to
    Pillow's, with the same draws; torchvision's decode_jpeg on the CPU where it loads, else Pillow in its place
    (where a JPEG that neither decodes is the one of a given length)."""
    import io
    import types
    from torch.utils.data import DataLoader

    def decode_jpeg(data, mode=None, device=None):
        def one(d):
            if len(d) == len(damaged):
                raise RuntimeError("damaged data")
            return torch.from_numpy(np.array(Image.open(io.BytesIO(d.numpy().tobytes())).convert("RGB"))
                                    ).permute(2, 0, 1).contiguous()
        return [one(d) for d in data] if isinstance(data, list) else one(data)
    if decoder == "Pillow":
        monkeypatch.setitem(sys.modules, "torchvision.io", types.SimpleNamespace(
            decode_jpeg=decode_jpeg, ImageReadMode=types.SimpleNamespace(RGB=3)))
    paths = [photo(tmp_path / f"{i}.JPEG", seed=i) for i in range(5)]
    Image.open(paths[4]).save(tmp_path / "4.png")
    paths.append(tmp_path / "4.png")
    whole = paths[0].read_bytes()
    (tmp_path / "cut.JPEG").write_bytes(whole[:len(whole) // 2])
    paths.append(tmp_path / "cut.JPEG")
    damaged = b"x" * 7
    s = imagenet.parse(["--data", "x", "--size", "32", "--workers", "0"])
    for train in (True, False):
        pillow, raw = (streaming.Images(paths, list(range(7)), 32, train, raw) for raw in (False, True))
        pillow.seed = raw.seed = 3
        data = streaming.Streamed(dict(pillow=pillow, raw=raw), s, 0, 1, torch.device("cpu"))
        (x_pillow, y_pillow, f_pillow), = DataLoader(pillow, 7)
        (x_raw, y_raw, f_raw), = data.loader("raw", 7)
        data_, lengths, boxes, flips = x_raw  # the PNG decoded by the worker (no box), the rest JPEGs' bytes
        assert lengths[5] == 3 * 32 * 32 and boxes[5].eq(0).all() and boxes[[0, 1, 2, 3, 4, 6], 0].eq(500).all()
        assert len(data_) == lengths.sum() and (~flips if not train else flips).any()
        assert torch.equal(y_pillow, y_raw) and torch.equal(f_pillow, f_raw)  # labels, jitter: the same draws
        a, (b, source) = x_pillow.float() / 255, data.decoded(*x_raw)
        assert a.shape == b.shape == (7, 3, 32, 32) and source.tolist() == list(range(7))
        assert (a - b).abs().mean() < 0.02  # two bicubic resizes of the same crops and flips
    damaged = paths[2].read_bytes()  # one neither the GPU nor the CPU decodes: the next image in its place
    if decoder == "torchvision":  # the real one: that JPEG's bytes without JPEG's first marker
        start = int(x_raw[1][:2].sum())
        x_raw[0][start:start + 2] = 0
    x, y = data.to_device(x_raw, y_raw)
    assert torch.equal(y, y_raw[[0, 1, 3, 3, 4, 5, 6]]) and torch.equal(x[2], x[3])
    data.to_device(x_raw, y_raw)
    err = capsys.readouterr().err
    assert err.count("1 JPEG(s) of a batch could not be decoded") == 2  # the warning at each of the two batches
    assert err.count("decoded one at a time") == 1  # the note, once


def test_over_ranks_it_starts_itself_a_wrong_setting_is_the_last_line_and_nothing_is_written(folder, tmp_path):
    """--processes 2: a --batch the ranks cannot split is refused before they start, in one line, exit code 2
    (an --out in use, or a file that is not an image, is rank 0's line for all: test_experiment.py's sine
    checks the same launcher)."""
    out = tmp_path / "out"
    process = launch("imagenet.py", "--data", folder, "--out", out, *TINY, "--processes", 2, "--batch", 7)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 2 and output.count("\n") == 1 and "split evenly over 2 ranks" in output, output
    assert not out.exists()


def test_the_next_batch_is_made_ready_in_a_thread_while_this_one_trains():
    """Streamed.prepared: batches in the loader's order, each put on the device (to_device) in a thread of its own
    one batch ahead, so that the next is decoded and cropped while the caller trains on this one; a batch that
    fails raises in the caller, in its place."""
    import threading

    import streaming
    data, ready, trained = streaming.Streamed({}, None, 0, 1, torch.device("cpu")), {}, []

    def to_device(x, y, factors=None):
        assert threading.current_thread() is not threading.main_thread() and factors is not None
        if int(y[0]) == 3:
            raise ValueError("batch 3 is damaged")
        ready.setdefault(int(y[0]), threading.Event()).set()
        return x, y
    data.to_device = to_device
    loader = [(torch.full((2,), i), torch.tensor([i]), torch.zeros(1, 4)) for i in range(5)]
    with pytest.raises(ValueError, match="batch 3"):
        for x, y in data.prepared(loader, jitter=True):
            i = int(y[0])
            assert x.tolist() == [i, i]
            if i < 2:  # batch i + 1 is made ready while batch i is held here
                assert ready.setdefault(i + 1, threading.Event()).wait(timeout=10), f"batch {i + 1} waited for {i}"
            trained.append(i)
    assert trained == [0, 1, 2]


def noise_png(path, w=80, h=60, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def test_a_training_crop_is_its_drawn_box_resized_bicubic_and_mirrored_as_drawn_per_epoch_and_image(tmp_path):
    """Streamed training crops: the draws (box of 8-100 % of the area, flip half the time, jitter 0.4 in
    brightness, contrast and saturation, no hue) fixed by (the epoch's seed, the image); evaluation: the
    shorter side to size / 0.95, the centre crop, no flip, no jitter."""
    paths = [noise_png(tmp_path / f"{i}.png", seed=i) for i in range(4)]
    train, test = (streaming.Images(paths, [0, 1, 2, 3], 16, train) for train in (True, False))
    for i, (pixels, label, factors) in enumerate(crops(train, seed=7)):
        (left, top, cw, ch), flip, drawn = train.draws(80, 60, np.random.default_rng([7, i]))
        crop = Image.open(paths[i]).convert("RGB").resize((16, 16), Image.BICUBIC, box=(left, top, left + cw, top + ch))
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT) if flip else crop
        assert torch.equal(pixels, torch.from_numpy(np.array(crop)).permute(2, 0, 1)) and torch.equal(factors, drawn)
        assert label == i
    others = crops(train, seed=8)  # the next epoch draws anew; this one again, the same
    assert all(not torch.equal(a[0], b[0]) for a, b in zip(crops(train, seed=7), others))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) for a, b in zip(crops(train, 8), others))
    assert len({tuple(train.draws(80, 60, np.random.default_rng([7, i]))[0]) for i in range(4)}) == 4
    for i, (pixels, label, factors) in enumerate(crops(test, seed=7)):
        crop = images.centre_crop(Image.open(paths[i]).convert("RGB"), 16, crop_pct=0.95)
        assert torch.equal(pixels, torch.from_numpy(np.array(crop)).permute(2, 0, 1)) and not factors.any()
    draws = [train.draws(500, 375, np.random.default_rng([1, i])) for i in range(400)]
    share = np.array([cw * ch / (500 * 375) for (_, _, cw, ch), _, _ in draws])
    factors = torch.stack([f for _, _, f in draws])
    assert 0.08 <= share.min() < 0.1 and 0.9 < share.max() <= 1 and 150 < sum(flip for _, flip, _ in draws) < 250
    assert 0.6 <= factors[:, :3].min() < 0.62 and 1.38 < factors[:, :3].max() <= 1.4 and not factors[:, 3].any()


def test_a_jpeg_decodes_with_at_least_as_many_pixels_as_its_crop_takes(tmp_path, monkeypatch):
    """Pillow's draft may shrink a JPEG only as far as its crop keeps full resolution: the drawn box, in the
    decoded image, at least size x size pixels (training); the shorter side at least size / 0.95 (evaluation)."""
    paths, found = [photo(tmp_path / f"{i}.JPEG", seed=i) for i in range(8)], []
    opened, crop_box = streaming.opened, streaming.crop_box
    monkeypatch.setattr(streaming, "opened", lambda *args: found.append(opened(*args)) or found[-1])
    monkeypatch.setattr(streaming, "crop_box", lambda *args, **kwargs: found.append(crop_box(*args, **kwargs)) or
                        found[-1])
    crops(streaming.Images(paths, list(range(8)), 64, True))
    for box, (image, (w, h)) in zip(found[0::2], found[1::2]):
        assert box[2] * image.width / w >= 64 and box[3] * image.height / h >= 64, (box, image.size)
    found.clear()  # 92: a quarter of 375 (94 rows) holds 92 but not the 96 that 92 / 0.95 takes
    crops(streaming.Images(paths, list(range(8)), 92, False))
    assert all(min(image.size) >= images.resized_side(92, 0.95) for image, _ in found)
    assert min(image.width for image, _ in found) < 500  # some did decode at a smaller scale


def test_each_rank_streams_its_own_share_of_an_epoch_reshuffled_every_epoch(monkeypatch):
    """batches(8) over 2 ranks: 4 images a batch on each, the two ranks' shares of an epoch disjoint and
    together the whole training split; the next epoch in another order, the same epoch in the same. An epoch
    that does not split evenly leaves some images out, none twice; at its end every rank takes rank 0's
    BatchNorm statistics."""
    monkeypatch.setattr(streaming.Images, "__getitem__", lambda self, i: (torch.tensor(self.paths[i]), 0,
                                                                          torch.zeros(4)))  # its index
    s = imagenet.parse(["--data", "x", "--workers", "0"])
    train, seen, broadcast = streaming.Images(list(range(32)), [0] * 32, 32, True), [], []
    monkeypatch.setattr(streaming.dist, "broadcast", lambda tensor, src: broadcast.append((tensor, src)))

    def epoch(rank, seed, size=8):
        data = streaming.Streamed(dict(train=train), s, rank, 2, torch.device("cpu"))
        data.prepared = lambda loader, jitter: ((x, y) for x, y, _ in loader)
        data.trained = torch.nn.BatchNorm1d(1)
        torch.manual_seed(seed)
        batches = [x.tolist() for x, _ in data.batches(size)]
        seen.append(train.seed)
        assert [(id(t), src) for t, src in broadcast] == [(id(t), 0) for t in data.trained.buffers()]
        broadcast.clear()
        return batches
    first, second = epoch(0, 1), epoch(1, 1)
    assert [len(b) for b in first + second] == [4] * 8
    assert sorted(sum(first + second, [])) == list(range(32))
    assert epoch(0, 1) == first and epoch(0, 2) != first and seen[0] == seen[2] != seen[3]
    train.paths = list(range(35))  # 17 a rank, none repeated for an 18th; 5 batches of 3 a rank: 30 seen once
    shares = sum(epoch(0, 1, size=6) + epoch(1, 1, size=6), [])
    assert len(shares) == 30 and len(set(shares)) == 30


def test_batches_become_floats_jittered_for_training_only_normalised_with_imagenets_statistics():
    data = streaming.Streamed({}, None, 0, 1, torch.device("cpu"))
    x, y = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8), torch.tensor([0, 1])
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    dark = torch.tensor([[0.5, 1, 1, 0]] * 2)  # brightness halved
    (evaluated, labels), = data.prepared([(x, y, dark)])  # evaluation: its factors are not applied
    assert torch.allclose(evaluated, (x / 255 - mean) / std, atol=1e-6) and torch.equal(labels, y)
    (trained, _), = data.prepared([(x, y, dark)], jitter=True)
    assert torch.allclose(trained, (x / 255 * 0.5 - mean) / std, atol=1e-6)


def test_the_validation_split_is_held_out_of_train_by_the_seed_and_evaluated_as_the_test_set(folder):
    """--val-images of train, fixed by --seed, disjoint from the images trained on, cropped as the test set;
    at most all but one batch; --decode gpu: every split's JPEGs handed over undecoded."""
    def splits(seed, *args):
        s = imagenet.parse([str(a) for a in ["--data", folder, *TINY, "--seed", seed, *args]])
        return streaming.streamed_folder(s, 0, 1, torch.device("cpu"))[0].splits
    mine = splits(0)
    train, val, test = mine["train"], mine["val"], mine["test"]
    assert (train.train, val.train, test.train) == (True, False, False)
    assert len(val.paths) == 4 and len(train.paths) == 32 and not set(val.paths) & set(train.paths)
    assert all(p.parent.name == f"n0{label}" for p, label in zip(train.paths + val.paths, train.labels + val.labels))
    assert splits(0)["val"].paths == val.paths and splits(1)["val"].paths != val.paths
    assert not any(split.raw for split in mine.values())
    assert all(split.raw for split in splits(0, "--decode", "gpu").values())
    assert len(splits(0, "--val-images", 36 - 8)["train"].paths) == 8  # one batch of 8 left to train on
    with pytest.raises(experiment.InputError, match="--val-images 29 leaves fewer of the 36 training images than "
                                                    "one batch of 8"):
        splits(0, "--val-images", 29)


class Indexed(torch.utils.data.Dataset):
    """Image i: a (3, 2, 2) uint8 crop of the value i, its label i % 6, no jitter (as evaluation gives)."""
    raw, train = False, False

    def __len__(self):
        return 7

    def __getitem__(self, i):
        return torch.full((3, 2, 2), i, dtype=torch.uint8), i % 6, torch.zeros(4)


def test_accuracies_count_each_image_of_a_split_once_as_top_1_and_top_5():
    """Streamed.accuracies over 7 images in batches of 2 (the last of 1, kept), not jittered: a model that ranks
    image i's class at place RANKS[i] (of 6 classes) is right in top-1 for 2 of them, in top-5 for 5."""
    ranks = [0, 1, 4, 5, 0, 2, 5]
    s = imagenet.parse(["--data", "x", "--workers", "0", "--batch", "2"])
    data = streaming.Streamed(dict(test=Indexed()), s, 0, 1, torch.device("cpu"))
    seen = []

    class Model(torch.nn.Module):
        def forward(self, x):  # the image's index back from its normalised pixels
            i = ((x[:, 0, 0, 0] * streaming.STD[0] + streaming.MEAN[0]) * 255).round().long()
            seen.extend(i.tolist())
            label, rank = i % 6, torch.tensor(ranks)[i]
            return -((torch.arange(6)[None] - label[:, None] + rank[:, None]) % 6).float()
    top1, top5 = data.accuracies(Model(), "test")
    assert sorted(seen) == list(range(7))
    assert top1 == pytest.approx(sum(r < 1 for r in ranks) / 7) and top5 == pytest.approx(sum(r < 5 for r in ranks) / 7)
    assert data.evaluate(Model()) == pytest.approx(top1)


def test_every_rank_finds_that_its_weights_are_the_same_as_rank_0s_or_stops(monkeypatch):
    """same_on_every_rank: rank 0's weights broadcast, the largest difference of any rank all-reduced; any
    difference, however small, stops the run in one line."""
    model, others = torch.nn.Linear(3, 2), []

    def broadcast(tensor, src):  # rank 0's weights: here the other rank's
        assert src == 0
        tensor.copy_(others[-1])
    monkeypatch.setattr(streaming.dist, "broadcast", broadcast)
    monkeypatch.setattr(streaming.dist, "all_reduce", lambda tensor, op: None)
    flat = torch.cat([t.detach().flatten() for t in model.state_dict().values()])
    others.append(flat.clone())
    streaming.same_on_every_rank(model)
    changed = flat.clone()
    changed[0] = torch.nextafter(changed[0], torch.tensor(1e9))  # one weight of rank 0's the next float up
    others.append(changed)
    with pytest.raises(RuntimeError, match="different weights"):
        streaming.same_on_every_rank(model)


def test_the_lr_scales_with_the_batch_and_the_shorter_one_model_has_short_epochs():
    """runs_settings: lr and fine-tuning lr for a batch of 256, linear in --batch; --out/one_short: one, --short."""
    s = imagenet.parse(["--data", "x", "--batch", "512", "--phase-epochs", "2", "3", "4", "5", "6", "--short", "1"])
    main, short = imagenet.runs_settings(s)
    assert (main.lr, main.finetune_lr) == pytest.approx((2 * s.lr, 2 * s.finetune_lr)) and main.phase_epochs == \
        s.phase_epochs
    assert (short.lr, short.finetune_lr, short.strategies, short.phase_epochs) == \
        (main.lr, main.finetune_lr, "one", (2, 3, 4, 5, 1)) and Path(short.out) == Path(s.out) / "one_short"


def test_the_checks_take_each_setting_at_its_limit_and_refuse_it_past(monkeypatch):
    """--short up to the one model's epochs; --decode gpu on a GPU with torchvision; --processes under our own
    launcher (not torchrun's), a GPU each."""
    def check(*args, world=1):
        imagenet.check(imagenet.parse(["--data", "x", "--out", "/nonexistent/out", *args]), world)
    check("--phase-epochs", "1", "1", "1", "1", "2", "--short", "2")
    monkeypatch.setattr(experiment, "resolve_device", lambda s: "cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(streaming, "has_torchvision", lambda: False)
    with pytest.raises(experiment.InputError, match="needs a GPU and torchvision"):
        check("--decode", "gpu")
    monkeypatch.setattr(streaming, "has_torchvision", lambda: True)
    check("--decode", "gpu")
    check("--processes", "2")
    with pytest.raises(experiment.InputError, match="--processes 3 on --device cuda wants a GPU each"):
        check("--processes", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")  # a rank: torchrun's, or launcher.py's with MERGE_LAUNCHER
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", lambda objects: None)  # rank 0's refusal
    with pytest.raises(experiment.InputError, match="under torchrun"):
        check("--processes", "2", world=2)
    monkeypatch.setenv("MERGE_LAUNCHER", str(os.getpid()))
    check("--processes", "2", world=2)


def test_with_processes_a_setting_the_ranks_cannot_take_is_refused_before_any_starts(monkeypatch):
    monkeypatch.setattr(imagenet.launcher, "launch", lambda *args: pytest.fail("the ranks started"))
    with pytest.raises(experiment.InputError, match="--batch 7 must split evenly over 2 ranks"):
        imagenet.start(imagenet.parse(["--data", "x", "--processes", "2", "--batch", "7", "--device", "cpu"]))


def test_an_out_of_other_settings_is_refused_in_one_line_before_the_images_are_read(folder, tmp_path, capsys,
                                                                                     monkeypatch):
    """--out's settings.json against the settings it records (the lr scaled by --batch), before any header is
    read (under torchrun: the slow test above)."""
    out = tmp_path / "out"
    out.mkdir()
    args = [str(a) for a in ["--data", folder, "--out", out, *TINY]]
    other = imagenet.runs_settings(imagenet.parse(args + ["--lr", "0.2"]))[0]
    (out / "settings.json").write_text(json.dumps(experiment.settings_record(other, out)))
    monkeypatch.setattr(streaming, "check_images", lambda *args, **kwargs: pytest.fail("the images were read"))
    with pytest.raises(SystemExit) as exit_:
        imagenet.main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "holds results made with other settings" in err, err
