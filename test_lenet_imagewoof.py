"""Tests for the Imagewoof experiments: the tests write their own small folders and archives
in the real formats (JPEG and PNG files in the Imagewoof layout, a .tgz); no network."""
import concurrent.futures
import dataclasses
import errno
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lenet_imagewoof as woof
import downloads
import images
import experiment
import merge
import report
import stacked

ROOT = Path(__file__).parent
CLASSES = ("n02086240", "n02087394", "n02088364")
STRATEGIES = ("student", "bo3", "one")


def make_folder(root, n_train=6, n_val=2, classes=CLASSES):
    """Imagewoof layout; image j of class c is one flat colour, red = 60 c + 20 and green =
    30 j + 10, so the pixels tell which file an array came from (JPEG errors are a few units)."""
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for j in range(n):
                image = Image.new("RGB", (48, 36), (60 * c + 20, 30 * j + 10, 200 if split == "val" else 100))
                suffix = (".JPEG", ".png", ".jpg")[j % 3]
                image.save(root / split / name / f"{name}_{j}{suffix}", quality=100)
    return root


def test_loader_gives_shapes_labels_from_folder_names_and_a_disjoint_seeded_split(tmp_path):
    data = make_folder(tmp_path / "woof")
    d = images.load_folder(data, size=28, val_fraction=0.25, seed=1)
    assert d["classes"] == list(CLASSES)
    assert d["x_train"].shape == (14, 28, 28, 3) and d["x_val"].shape == (4, 28, 28, 3)
    assert d["x_test"].shape == (6, 28, 28, 3) and d["x_train"].dtype == np.uint8
    identity = lambda x: [(round((p[0] - 20) / 60), round((p[1] - 10) / 30)) for p in x[:, 14, 14].astype(int)]
    for x, y in ((d["x_train"], d["y_train"]), (d["x_val"], d["y_val"]), (d["x_test"], d["y_test"])):
        assert [c for c, _ in identity(x)] == y.tolist()  # labels follow the folder names
    train_ids, val_ids = set(identity(d["x_train"])), set(identity(d["x_val"]))
    assert not train_ids & val_ids and len(train_ids | val_ids) == 18
    again, other = images.load_folder(data, 28, 0.25, seed=1), images.load_folder(data, 28, 0.25, seed=2)
    assert np.array_equal(again["x_val"], d["x_val"]) and not np.array_equal(other["x_val"], d["x_val"])


def test_images_are_decoded_once_then_read_from_the_cache(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "woof")
    first = images.load_folder(data, size=20)
    assert (data / ".cache" / "train-20.npz").exists() and (data / ".cache" / "val-20.npz").exists()
    monkeypatch.setattr(images, "decode", lambda *a: pytest.fail("decoded again"))
    second = images.load_folder(data, size=20)
    assert all(np.array_equal(first[k], second[k]) for k in ("x_train", "x_test", "y_train"))
    (data / "train" / CLASSES[0] / "extra.jpg").write_bytes((data / "train" / CLASSES[0] / f"{CLASSES[0]}_2.jpg")
                                                             .read_bytes())
    monkeypatch.undo()
    assert len(images.load_folder(data, size=20)["x_train"]) == len(first["x_train"]) + 1  # a new file: rebuilt


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "lenet_imagewoof.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def read_rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_lenet_end_to_end_through_the_command_line_then_resumed_from_the_cache(tmp_path):
    data, out = make_folder(tmp_path / "woof"), tmp_path / "out"
    first = run_cli("--data", data, "--epochs", 6, "--runs", 2, "--out", out, "--device", "cpu")
    assert first.returncode == 0, first.stderr
    rows = read_rows(out)
    assert sorted((r["run"], r["strategy"]) for r in rows) == sorted((run, name) for run in range(2)
                                                                     for name in STRATEGIES)
    assert all(0 <= r["test_accuracy"] <= 1 and 0 <= r["val_accuracy"] <= 1 for r in rows)
    student = next(r for r in rows if r["strategy"] == "student")
    assert len(student["teachers_test"]) == 2 and student["kept_from_teacher"][0] + student["kept_from_teacher"][1] == 1
    summary = (out / "summary.md").read_text()
    assert "LeNet on woof" in summary and all(f"| {name} | 2 |" in summary for name in STRATEGIES)
    assert (out / "box_lenet.png").stat().st_size > 1000 and (out / "fig2_kept_share.png").exists()
    cache = data / ".cache" / "train-28.npz"
    stamp = cache.stat().st_mtime_ns
    second = run_cli("--data", data, "--epochs", 6, "--runs", 3, "--out", out, "--device", "cpu")  # one run more
    assert second.returncode == 0, second.stderr
    assert "6 results already" in second.stdout and cache.stat().st_mtime_ns == stamp  # read, not rebuilt
    assert len(read_rows(out)) == 9 and read_rows(out)[:6] == rows  # the first six kept, not redone
    assert "| student | 3 |" in (out / "summary.md").read_text()


def test_lenet_stacked_as_on_a_gpu_gives_the_rows_of_one_at_a_time_and_a_cut_stack_goes_on(tmp_path, monkeypatch,
                                                                                             capsys):
    """--stack 1, what --stack auto takes on a GPU (eager here): the rows of one model at a time, up to float32
    rounding; Ctrl-C after a stacked phase's first epoch, its state written, and the same command goes on from
    there to the rows of the stack never cut, to the last digit."""
    data = make_folder(tmp_path / "woof")
    args = ["--data", str(data), "--epochs", "6", "--runs", "2", "--device", "cpu", "--compile", "0"]
    woof.main([*args, "--stack", "0", "--out", str(tmp_path / "alone")])
    woof.main([*args, "--stack", "1", "--out", str(tmp_path / "stacked")])
    alone, stack = read_rows(tmp_path / "alone"), read_rows(tmp_path / "stacked")
    assert [(r["run"], r["strategy"]) for r in stack] == [(r["run"], r["strategy"]) for r in alone] and len(stack) == 6
    assert all(mine.keys() == theirs.keys() for mine, theirs in zip(stack, alone))
    assert [r["l_half_end"] for r in stack if "l_half_end" in r] == pytest.approx(
        [r["l_half_end"] for r in alone if "l_half_end" in r], rel=1e-4)
    trained = sorted(p.name for p in (tmp_path / "alone" / "phases").glob("*.pt") if "finetune" not in p.name)
    assert len(trained) == 2 * (2 + 3 + 1 + 1)  # each run's teachers, bo3 models, one model and big student
    for name in trained:  # the weights, up to float32 rounding (fine-tuning follows the keep, a discrete choice)
        mine, theirs = (torch.load(tmp_path / out / "phases" / name) for out in ("stacked", "alone"))
        assert all(torch.allclose(mine[key], theirs[key], rtol=1e-4, atol=1e-6) for key in theirs), name
    monkeypatch.setattr(stacked, "CHECKPOINT_SECONDS", 0)
    save = stacked.save_stack

    def interrupted_after_the_first_epoch(path, state):
        save(path, state)
        raise KeyboardInterrupt
    monkeypatch.setattr(stacked, "save_stack", interrupted_after_the_first_epoch)
    with pytest.raises(SystemExit) as exit_:
        woof.main([*args, "--stack", "1", "--out", str(tmp_path / "cut")])
    assert exit_.value.code == 130 and len(list((tmp_path / "cut" / "phases").glob("*.stack"))) == 1
    monkeypatch.setattr(stacked, "save_stack", save)
    capsys.readouterr()
    woof.main([*args, "--stack", "1", "--out", str(tmp_path / "cut")])
    assert "resumed after epoch 1 of 2" in capsys.readouterr().out
    assert read_rows(tmp_path / "cut") == stack and not list((tmp_path / "cut" / "phases").glob("*.stack"))


@pytest.mark.slow
def test_resnet18_end_to_end_through_the_command_line(tmp_path):
    data, out = make_folder(tmp_path / "woof"), tmp_path / "out"
    result = run_cli("--arch", "resnet18", "--size", 32, "--width", 4, "--data", data, "--epochs", 6,
                     "--runs", 1, "--out", out, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert sorted(r["strategy"] for r in read_rows(out)) == sorted(STRATEGIES)
    assert "ResNet18 on woof" in (out / "summary.md").read_text() and (out / "box_resnet18.png").exists()
    assert json.loads((out / "settings.json").read_text())["batch"] == 32  # ResNet18's paper settings
    assert "n_train" not in json.loads((out / "settings.json").read_text())  # the sine's are not recorded


def test_help_shows_each_architectures_paper_defaults_and_no_sine_flags(capsys):
    def shown(*args):  # the command line's help, in this process
        with pytest.raises(SystemExit) as exit:
            woof.main([*args, "--help"])
        assert exit.value.code == 0
        return capsys.readouterr().out
    lenet, resnet = shown(), shown("--arch", "resnet18")
    assert "[6000]" in lenet and "[28]" in lenet and "--n-train" not in lenet and "--noise" not in lenet
    assert "[600]" in resnet and "[224]" in resnet and "[32]" in resnet
    batch = " ".join(lenet.split("  --batch BATCH")[1].split("  --lr")[0].split())  # LeNet's batch is ours, not the sine's
    assert batch == "examples per SGD step (this experiment's: docs/settings.md) [64]", batch
    assert "sine:" not in lenet and "sine:" not in resnet  # the sine's value, 0.01, is LeNet's too, not its source


def test_stacked_lenet_on_uint8_images_equals_one_at_a_time(tmp_path):
    """The cross-entropy path of fit_stacked, one data set shared by every model, batches
    prepared on the device: each model still trains as fit() trains it alone."""
    d = images.load_folder(make_folder(tmp_path / "woof"), 28)
    s = dataclasses.replace(woof.parse([]), batch=4)
    data = images.image_data(d, "cpu")
    make = lambda: merge.LeNet(3)
    close = lambda a, b: all(torch.allclose(a.state_dict()[n], b.state_dict()[n], rtol=1e-4, atol=1e-6)
                             for n in a.state_dict())
    def new(seeds):
        models = []
        for seed in seeds:
            torch.manual_seed(seed)
            models.append(make())
        return models
    alone, stack = new([1, 2]), new([1, 2])
    for model, seed in zip(alone, [5, 6]):
        stacked.counter_noise(model, seed)
        merge.fit(model, data, s, 2, drops=(0.5,), seed=seed)
    stacked.fit_stacked(stack, [data, data], s, 2, drops=(0.5,), seeds=[5, 6], compile=False)
    assert all(close(a, b) for a, b in zip(alone, stack))
    assert not torch.allclose(alone[0].fc3.weight, make().fc3.weight)  # it did train
    lambdas = merge.lambda_schedule(2, 0.5, 0.5)
    bigs, twins = ([merge.make_big_student(new([1, 2])) for _ in range(2)] for _ in range(2))
    start = bigs[0].gates[0].loc.detach().clone()
    for big, seed in zip(bigs, [7, 8]):
        stacked.counter_noise(big, seed)
        merge.fit(big, data, s, 2, seed=seed, lambdas=lambdas)
    stacked.fit_stacked(twins, [data, data], s, 2, seeds=[7, 8], lambdas=lambdas, compile=False)
    assert all(close(a, b) for a, b in zip(bigs, twins))
    assert (bigs[0].gates[0].loc - start).abs().max() > 1e-3  # the gates moved
    assert not torch.equal(bigs[0].gates[0].loc, bigs[1].gates[0].loc)  # each its own noise and order


def test_batches_are_normalised_with_the_data_sets_own_statistics(tmp_path):
    d = images.load_folder(make_folder(tmp_path / "woof"), 28)
    data = images.image_data(d, "cpu")
    x = data.prepare(data.x_train)
    assert x.shape == (16, 3, 28, 28) and x.dtype == torch.get_default_dtype()
    assert torch.equal(data.prepare(data.x_train, train=True), x)  # LeNet: no augmentation
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-3)
    resnet = images.image_data(d, "cpu", 40, augment=lambda x: images.random_resized_crop_flip(x, 40))
    assert resnet.prepare(resnet.x_test).shape == (6, 3, 40, 40)  # resized on the device
    assert resnet.prepare(resnet.x_train, train=True).shape == (16, 3, 40, 40)


def test_the_augmentation_crops_and_flips_each_example_on_its_own():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 16, 16)
    whole = images.random_resized_crop_flip(x, 16, scale=(1, 1), ratio=(1, 1))  # the whole image, maybe mirrored
    same = [torch.allclose(b, a, atol=1e-5) for a, b in zip(x, whole)]
    mirrored = [torch.allclose(b, a.flip(-1), atol=1e-5) for a, b in zip(x, whole)]
    assert all(s or m for s, m in zip(same, mirrored)) and 16 < sum(mirrored) < 48
    crops = images.random_resized_crop_flip(x[:1].expand(8, -1, -1, -1), 24)
    assert crops.shape == (8, 3, 24, 24)
    assert all(not torch.allclose(crops[i], crops[j]) for i in range(8) for j in range(i))  # each its own crop


@pytest.mark.parametrize("damage, message", [
    ("missing", "no such folder"),
    ("empty", "holds no .jpg"),
    ("classes", "different classes"),
    ("corrupt", "cannot read image"),
    ("one class", "one class only"),
    ("all for validation", "leave none to train on"),
    ("too many pixels", "decompression bomb"),
    ("lr nan", "--lr must be above 0, got nan"),
    ("seed -1", "--seed must be from 0"),
])
def test_bad_data_and_settings_give_one_line_exit_code_2_and_write_nothing(tmp_path, monkeypatch, capsys, damage,
                                                                           message):
    data, args = tmp_path / "woof", []
    if damage == "empty":
        (data / "train" / "a").mkdir(parents=True)
        (data / "val" / "a").mkdir(parents=True)
    elif damage == "one class":
        make_folder(data, classes=CLASSES[:1])
    elif damage != "missing":
        make_folder(data)
    if damage == "classes":
        (data / "val" / CLASSES[2]).rename(data / "val" / "n99999999")
    elif damage == "corrupt":
        (data / "train" / CLASSES[1] / "broken.JPEG").write_bytes(b"\xff\xd8 not really a jpeg")
    elif damage == "too many pixels":  # Pillow's guard against images that would fill the memory
        monkeypatch.setattr("PIL.Image.MAX_IMAGE_PIXELS", 100)
    args = {"all for validation": ["--val-fraction", "0.99"], "lr nan": ["--lr", "nan"],
            "seed -1": ["--seed", "-1"]}.get(damage, [])
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit_:
        woof.main([str(a) for a in ["--data", data, "--out", tmp_path / "out", "--runs", 1, "--epochs", 6, *args]])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists() and sorted(tmp_path.rglob("*")) == before  # no image cache either
    if damage == "corrupt":
        assert "broken.JPEG" in err


def test_an_out_of_other_settings_is_refused_before_the_images_are_decoded_and_cached(tmp_path, capsys):
    """--out's settings.json is checked with the other settings, before the data is read: nothing is written."""
    data, out = tmp_path / "woof", tmp_path / "out"
    make_folder(data)
    args = ["--data", str(data), "--out", str(out), "--runs", "1", "--epochs", "6"]
    out.mkdir()
    (out / "settings.json").write_text(json.dumps(experiment.settings_record(woof.parse(args + ["--lr", "0.02"]), out)))
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit_:
        woof.main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "other settings (lr 0.02 -> 0.01)" in err, err
    assert sorted(tmp_path.rglob("*")) == before  # no .cache in the data folder


def test_the_image_cache_survives_damage_and_sees_a_replaced_image(tmp_path, capsys):
    report.show_progress()  # the command line's reports on stdout
    data = make_folder(tmp_path / "woof")
    image = data / "train" / CLASSES[0] / f"{CLASSES[0]}_0.JPEG"
    first = images.load_split(data, "train", 20)[0]
    (data / ".cache" / "train-20.npz").write_bytes(b"not a zip file")  # damaged: decoded again
    assert np.array_equal(images.load_split(data, "train", 20)[0], first) and "cannot be read" in capsys.readouterr().out
    Image.new("RGB", (48, 36), (250, 250, 250)).save(image)  # the same name, other pixels
    assert images.load_split(data, "train", 20)[0][0, 10, 10, 0] > 240  # not the cached colour (20)
    shutil.rmtree(data / ".cache")
    (data / ".cache").write_text("a file where the cache folder would be")  # cannot be written: decoded anyway
    assert images.load_split(data, "train", 20)[0].shape == first.shape
    assert "cannot write the image cache" in capsys.readouterr().out


def test_a_fifo_and_an_empty_class_folder_are_not_images(tmp_path):
    data = make_folder(tmp_path / "woof")
    os.mkfifo(data / "train" / CLASSES[0] / "pipe.jpg")  # reading it would hang
    for split in ("train", "val"):
        (data / split / "n00000000").mkdir()  # empty: not a class
    paths, labels, classes = images.list_images(data / "train")
    assert classes == list(CLASSES) and len(paths) == 18 and all(p.is_file() for p in paths)


@pytest.mark.parametrize("args, message", [
    (["--arch", "vgg"], "invalid choice"),
    (["--size", "32"], "LeNet takes 28x28"),
    (["--width", "8"], "--width 8 is ResNet18's (--arch resnet18)"),
    (["--arch", "resnet18", "--stack", "1"], "without BatchNorm"),
    (["--runs", "0"], "--runs must be from 1"),
    (["--val-fraction", "1.5"], "--val-fraction"),
])
def test_bad_settings_give_one_line_and_exit_code_2(tmp_path, capsys, monkeypatch, args, message):
    """The first case through the real command line, the others through main(argv) in this process (where a bad
    setting let through fails at once, not after training the default budget)."""
    monkeypatch.setattr(experiment, "run_experiment", lambda *args, **kwargs: pytest.fail("bad input was trained"))
    argv = ["--data", make_folder(tmp_path / "woof"), "--out", tmp_path / "out", *args]
    if message == "invalid choice":
        result = run_cli(*argv)
        code, err = result.returncode, result.stderr
    else:
        with pytest.raises(SystemExit) as exit:
            woof.main([str(a) for a in argv])
        code, err = exit.value.code, capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()


def make_archive(tmp_path):
    make_folder(tmp_path / "src" / "imagewoof2-160")
    archive = tmp_path / "server" / "imagewoof2-160.tgz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "imagewoof2-160", arcname="imagewoof2-160")
    return archive.as_uri(), {"md5": hashlib.md5(archive.read_bytes()).hexdigest()}


def test_the_archive_is_downloaded_verified_and_extracted_once(tmp_path, monkeypatch):
    url, digests = make_archive(tmp_path)
    root = tmp_path / "data"
    folder = downloads.fetch(root, url, digests, "imagewoof2-160")
    assert folder == root / "imagewoof2-160" and len(images.list_images(folder / "train")[0]) == 18
    monkeypatch.setattr(downloads, "download", lambda *a: pytest.fail("downloaded again"))
    assert downloads.fetch(root, url, digests, "imagewoof2-160") == folder


def test_an_archive_put_into_root_by_hand_is_extracted_without_a_download_and_over_a_killed_extraction(
        tmp_path, monkeypatch):
    """The archive that the line without a network asks for, put into --root: verified and extracted, not fetched;
    the scratch folder a killed extraction left is cleared first, not extracted into."""
    url, digests = make_archive(tmp_path)
    root = tmp_path / "data"
    (root / ".imagewoof2-160.partial" / "imagewoof2-160").mkdir(parents=True)
    (root / ".imagewoof2-160.partial" / "imagewoof2-160" / "stale.txt").write_text("a killed extraction's")
    shutil.copy(tmp_path / "server" / "imagewoof2-160.tgz", root)
    monkeypatch.setattr(downloads, "download", lambda *a: pytest.fail("downloaded"))
    folder = downloads.fetch(root, url, digests, "imagewoof2-160")
    assert len(images.list_images(folder / "train")[0]) == 18 and not (folder / "stale.txt").exists()
    assert sorted(p.name for p in root.iterdir()) == ["imagewoof2-160", "imagewoof2-160.tgz"]


def test_an_archive_without_the_folder_is_one_line_and_leaves_no_folder(tmp_path):
    make_folder(tmp_path / "src" / "other")
    archive = tmp_path / "imagewoof2-160.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "other", arcname="other")
    root = tmp_path / "data"
    with pytest.raises(experiment.InputError, match="imagewoof2-160.tgz holds no imagewoof2-160 folder"):
        downloads.fetch(root, archive.as_uri(), {"md5": hashlib.md5(archive.read_bytes()).hexdigest()},
                        "imagewoof2-160")
    assert [p.name for p in root.iterdir()] == ["imagewoof2-160.tgz"]


def test_a_file_matches_where_any_of_its_published_digests_does(tmp_path):
    """matches(): a download must match one of the digests given (Imagewoof's md5 and sha256), not each."""
    path = tmp_path / "archive"
    path.write_bytes(b"an archive")
    md5, sha256 = (hashlib.new(name, b"an archive").hexdigest() for name in ("md5", "sha256"))
    assert downloads.matches(path, {"md5": "0" * 32, "sha256": sha256})
    assert downloads.matches(path, {"md5": md5, "sha256": "0" * 64})
    assert not downloads.matches(path, {"md5": "0" * 32, "sha256": "0" * 64})


def test_a_folder_made_while_this_process_waited_for_the_lock_is_not_made_again(tmp_path, monkeypatch):
    """made_once checks for the folder again once it holds the lock: another process may have made it between
    the first look and the lock."""
    real_open = open

    def open_after_another_made_it(path, mode):
        (tmp_path / "x").mkdir()
        return real_open(path, mode)
    monkeypatch.setattr(downloads, "open", open_after_another_made_it, raising=False)
    assert downloads.made_once(tmp_path, "x", lambda scratch: pytest.fail("made again")) == tmp_path / "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_processes_fetching_at_once_download_and_extract_once(tmp_path, monkeypatch):
    """torchrun's ranks each call fetch on their first run: one downloads and extracts, the others wait for it."""
    url, digests = make_archive(tmp_path)
    real_download, calls = downloads.download, []

    def slow_download(*args):
        calls.append(args)
        time.sleep(0.5)  # the others arrive while the first is still downloading
        real_download(*args)
    monkeypatch.setattr(downloads, "download", slow_download)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:  # flock excludes open files, not only processes
        folders = list(pool.map(lambda _: downloads.fetch(tmp_path / "data", url, digests, "imagewoof2-160"), range(3)))
    assert len(calls) == 1 and folders == [tmp_path / "data" / "imagewoof2-160"] * 3
    assert not (tmp_path / "data" / ".imagewoof2-160.lock").exists()  # gone with the folder made
    assert len(images.list_images(folders[0] / "train")[0]) == 18


def test_a_lock_whose_file_its_holder_removed_is_taken_again_from_the_file_there_now(tmp_path):
    """A waiting process that gets the lock of a file its holder has removed (made_once removes it when done,
    made or failed) waits again on the file there now: it makes nothing while a newcomer holds that one."""
    import fcntl
    lock_file, made = tmp_path / ".x.lock", []
    holder = open(lock_file, "a")
    fcntl.flock(holder, fcntl.LOCK_EX)
    make = lambda scratch: made.append(1) or scratch.mkdir() or scratch  # noqa: E731
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiter = pool.submit(downloads.made_once, tmp_path, "x", make)
        time.sleep(0.3)  # the waiter has opened the file and waits for its lock
        lock_file.unlink()  # the holder fails and removes its file; a newcomer opens and locks a new one
        newcomer = open(lock_file, "a")
        fcntl.flock(newcomer, fcntl.LOCK_EX)
        holder.close()
        time.sleep(0.3)
        assert not made and not waiter.done()  # the waiter waits on the newcomer's lock
        newcomer.close()
        assert waiter.result(timeout=10) == tmp_path / "x" and made == [1]
    assert not lock_file.exists()


def test_an_out_in_use_is_refused_before_the_data_is_read(tmp_path, monkeypatch, capsys):
    """Decoding a new Imagewoof (or checking ImageNet's headers) takes minutes: a busy --out is refused first."""
    import fcntl
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(images, "load_folder", lambda *args, **kwargs: pytest.fail("the data was read"))
    with open(out / ".lock", "a") as held, pytest.raises(SystemExit) as exit_:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another command's
        woof.main(["--data", str(tmp_path / "data"), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err == f"error: --out {out} is in use by another command; let it finish or " \
        "use another --out\n" and [p.name for p in out.iterdir()] == [".lock"]


def test_a_folder_is_recorded_without_the_trailing_slash_of_tab_completion(tmp_path):
    """--out's settings.json compares folders as recorded: data/ must resume the --out of data, also one that
    recorded data/; a folder named mnist stays a folder (./mnist), not the download (mnist)."""
    s = woof.parse(["--data", "runs/mnist/", "--root", "data//", "--out", str(tmp_path)])
    assert (s.data, s.root) == ("runs/mnist", "data")
    assert [woof.parse(["--data", d]).data for d in ("mnist", "mnist/", "./mnist", "/", "")] == \
        ["mnist", "./mnist", "./mnist", "/", ""]
    record = experiment.settings_record(s, tmp_path)
    (tmp_path / "settings.json").write_text(json.dumps(dict(record, data="runs/mnist/", root="data/")))
    assert experiment.settings_record(s, tmp_path) == record  # as recorded before the slash was dropped


def write_idx(path, array):
    """One of MNIST's files in its format: gzipped IDX, unsigned bytes, big-endian sizes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_data_mnist_writes_mnists_files_in_the_imagewoof_layout_once_and_runs_on_them(tmp_path, monkeypatch):
    """--data mnist: MNIST's four files downloaded and verified, each digit's first images written as RGB
    JPEGs in train/digit<d>/ and val/digit<d>/, once; a run of lenet_imagewoof.py trains on them."""
    server, rng = tmp_path / "server", np.random.default_rng(0)
    server.mkdir()
    for prefix, n in (("train", 40), ("t10k", 20)):
        labels = np.arange(n) % 10
        pixels = rng.integers(0, 40, (n, 28, 28)) + 20 * labels[:, None, None]  # digit d is brighter with d
        pixels[:, 10:18, 10:18] = 255 * (np.arange(n) % 2)[:, None, None]  # and the even ones hold a black square
        write_idx(server / f"{prefix}-images-idx3-ubyte.gz", pixels)
        write_idx(server / f"{prefix}-labels-idx1-ubyte.gz", labels)
    monkeypatch.setattr(downloads, "MNIST_URL", server.as_uri() + "/")
    monkeypatch.setattr(downloads, "MNIST_MD5", {name: hashlib.md5((server / name).read_bytes()).hexdigest()
                                              for name in downloads.MNIST_MD5})
    folder = downloads.mnist_folder(tmp_path / "data", 3, 2)
    assert folder == tmp_path / "data" / "mnist-3-2"
    for split, per_class, first in (("train", 3, pixels_of(server / "train-images-idx3-ubyte.gz")),
                                    ("val", 2, pixels_of(server / "t10k-images-idx3-ubyte.gz"))):
        paths, labels, classes = images.list_images(folder / split)
        assert classes == [f"digit{d}" for d in range(10)] and len(paths) == 10 * per_class
        for j in range(per_class):  # image j of digit d is the (j + 1)-th d in the file: index 10 j + d here
            written = np.asarray(Image.open(folder / split / "digit7" / f"{j}.JPEG"))
            assert written.shape == (28, 28, 3) and (written[..., 0] == written[..., 2]).all()
            assert np.abs(written[..., 0].astype(int) - first[10 * j + 7]).mean() < 4  # JPEG's errors
    monkeypatch.setattr(downloads, "download", lambda *a: pytest.fail("downloaded again"))
    monkeypatch.setattr(downloads, "open", lambda *a: pytest.fail("locked"), raising=False)  # a --root only read
    assert downloads.mnist_folder(tmp_path / "data", 3, 2) == folder
    monkeypatch.undo()
    with pytest.raises(experiment.InputError, match="cannot write mnist-3-2 into --root /proc/no/such"):
        downloads.mnist_folder(Path("/proc/no/such"), 3, 2)  # unwritable even for root
    monkeypatch.setattr(downloads, "MNIST_URL", (tmp_path / "nowhere").as_uri() + "/")  # no network
    with pytest.raises(experiment.InputError, match=r"put MNIST's four files \(train-images-idx3-ubyte.gz, .*\) into"):
        downloads.mnist_folder(tmp_path / "offline", 3, 2)
    assert not (tmp_path / "offline").exists()  # no lock file left behind, nor the --root it made
    (tmp_path / "offline").mkdir()
    mine = tmp_path / "offline" / "train-images-idx3-ubyte.gz"  # a user's own copy, not the published file
    mine.write_bytes(b"a copy gzipped again")
    with pytest.raises(experiment.InputError, match=f"{mine} is there but is not the published file"):
        downloads.mnist_folder(tmp_path / "offline", 3, 2)
    assert [p.name for p in (tmp_path / "offline").iterdir()] == [mine.name]
    assert mine.read_bytes() == b"a copy gzipped again"  # kept, not deleted
    monkeypatch.undo()
    (tmp_path / "data" / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"not IDX"))
    with pytest.raises(experiment.InputError, match="not one of MNIST's IDX files"):
        downloads.read_idx(tmp_path / "data" / "t10k-labels-idx1-ubyte.gz")
    cut = tmp_path / "data" / "train-labels-idx1-ubyte.gz"  # its header whole, its last label gone
    cut.write_bytes(gzip.compress(gzip.decompress(cut.read_bytes())[:-1]))
    with pytest.raises(experiment.InputError, match="not one of MNIST's IDX files"):
        downloads.read_idx(cut)
    monkeypatch.setattr(downloads, "mnist_folder", lambda root: folder)  # the command line's --data mnist
    woof.main(["--data", "mnist", "--root", str(tmp_path / "data"), "--epochs", "6", "--runs", "1", "--strategies",
               "one", "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert "LeNet on mnist-3-2" in (tmp_path / "out" / "summary.md").read_text()


def pixels_of(path):
    return np.frombuffer(gzip.decompress(path.read_bytes()), np.uint8, offset=16).reshape(-1, 28, 28)


def test_a_broken_download_is_fetched_again_and_a_wrong_checksum_refused(tmp_path):
    url, digests = make_archive(tmp_path)
    root = tmp_path / "data"
    root.mkdir()
    (root / "imagewoof2-160.tgz").write_bytes(b"the first 10 bytes of a cut download")
    assert (downloads.fetch(root, url, digests, "imagewoof2-160") / "val").is_dir()  # replaced, then extracted
    with pytest.raises(experiment.InputError, match="checksum"):
        downloads.fetch(tmp_path / "elsewhere", url, {"md5": "0" * 32}, "imagewoof2-160")
    assert not (tmp_path / "elsewhere" / "imagewoof2-160").exists()


@pytest.mark.parametrize("folder", ["lenet_mnist_60epochs", "lenet_mnist_12epochs"])
def test_the_readme_reports_what_the_committed_lenet_runs_produced(folder):
    rows = read_rows(ROOT / "figures" / folder)
    settings = json.loads((ROOT / "figures" / folder / "settings.json").read_text())
    names = ["student", "bo3", "one", "prune", "fusion", "random", "one_compute"]  # all seven ran
    assert len(rows) == 3 * len(names) and settings["arch"] == "lenet" and settings["batch"] == 64
    assert images.accuracy_table(rows, names) in (ROOT / "figures" / folder / "summary.md").read_text()
    assert images.accuracy_table(rows, names) in (ROOT / "README.md").read_text()
    assert f"**{settings['epochs']} epochs per strategy**" in (ROOT / "README.md").read_text()


def test_a_download_cut_short_is_fetched_again_and_no_network_is_one_line(tmp_path, monkeypatch):
    url, digests = make_archive(tmp_path)
    real_urlopen, calls = downloads.urllib.request.urlopen, []

    def flaky_urlopen(address):  # the first response ends early: fewer bytes than it announces
        response = real_urlopen(address)
        calls.append(address)
        if len(calls) == 1:
            chunks = iter([response.read()[:100]])
            response.read = lambda n: next(chunks, b"")
        return response
    monkeypatch.setattr(downloads.urllib.request, "urlopen", flaky_urlopen)
    assert (downloads.fetch(tmp_path / "data", url, digests, "imagewoof2-160") / "train").is_dir()
    assert calls.count(url) == 2
    with pytest.raises(experiment.InputError, match="cannot download"):  # and no --root left behind, nor above it
        downloads.fetch(tmp_path / "other" / "root", (tmp_path / "nowhere.tgz").as_uri(), digests, "imagewoof2-160")
    assert not (tmp_path / "other").exists()


def test_the_readme_states_where_lenets_lambda_ends():
    s = woof.parse([])
    importance = merge.budget(s)["importance"]
    end = merge.lambda_schedule(importance, s.lambda_start, s.lambda_step, round(s.paper_epochs / 6))[-1]
    assert f"at {end:.2f})" in (ROOT / "README.md").read_text()


def test_colour_jitter_keeps_images_in_range_and_gives_each_its_own_change():
    torch.manual_seed(0)
    x = torch.rand(16, 3, 8, 8)
    assert torch.allclose(images.color_jitter(x, strength=0.0), x, atol=1e-5)  # no jitter: the same image
    jittered = images.color_jitter(x[:1].expand(16, -1, -1, -1).clone())
    assert jittered.min() >= 0 and jittered.max() <= 1
    assert all(not torch.allclose(jittered[i], jittered[j]) for i in range(16) for j in range(i))
    gray = torch.full((1, 3, 8, 8), 0.5)  # a gray image has no hue or saturation to change
    assert torch.allclose(images.color_jitter(gray, 0.15).std(1), torch.zeros(1, 8, 8), atol=1e-5)


def striped(path, w=48, h=24):
    """An image whose left and right eighths are white and whose middle is black: a centre crop is black."""
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[:, :w // 8], pixels[:, -w // 8:] = 255, 255
    Image.fromarray(pixels).save(path)
    return path


def test_lenet_takes_the_centre_crop_resnet18_the_whole_image_each_cached_apart(tmp_path):
    """LeNet's images are the shorter side resized and the centre crop; ResNet18's the whole image squashed to a
    square (docs/images.md); the two are cached under names of their own."""
    data = make_folder(tmp_path / "woof")
    image = data / "train" / CLASSES[0] / f"{CLASSES[0]}_0.JPEG"
    striped(image.with_suffix(".png"))
    image.unlink()
    crop, whole = images.decode(image.with_suffix(".png"), 12), images.decode(image.with_suffix(".png"), 12, whole=True)
    assert crop.max() == 0 and (whole[:, 0] > 200).all() and (whole[:, -1] > 200).all()
    cropped, squashed = images.load_split(data, "train", 12)[0], images.load_split(data, "train", 12, whole=True)[0]
    assert np.array_equal(cropped[0], crop) and np.array_equal(squashed[0], whole)
    assert np.array_equal(images.load_split(data, "train", 12)[0], cropped)  # read back from its own cache


def test_the_image_cache_sees_a_file_rewritten_at_the_same_size(tmp_path):
    """A replaced image of the same number of bytes (an uncompressed PNG): its modification time tells."""
    data = make_folder(tmp_path / "woof")
    image = data / "train" / CLASSES[0] / f"{CLASSES[0]}_1.png"
    Image.new("RGB", (48, 36), (10, 10, 10)).save(image, compress_level=0)
    first = images.load_split(data, "train", 20)[0]
    size = image.stat().st_size
    Image.new("RGB", (48, 36), (240, 240, 240)).save(image, compress_level=0)
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10 ** 9))  # a coarse clock's tick later
    assert image.stat().st_size == size and first[1, 10, 10, 0] < 20
    assert images.load_split(data, "train", 20)[0][1, 10, 10, 0] > 230


def test_a_random_resized_crop_is_its_drawn_box_resized_and_mirrored_as_drawn(monkeypatch):
    """random_resized_crop_flip samples the box crop_box draws: here 8 wide and 4 high at (3, 5) of a 20 x 16
    image, stretched to 8 x 8 (bilinear), mirrored about half the time."""
    torch.manual_seed(0)
    x = torch.rand(1, 3, 16, 20).expand(64, -1, -1, -1)
    monkeypatch.setattr(images, "crop_box", lambda w, h, rng, scale, ratio: (3, 5, 8, 4))
    out = images.random_resized_crop_flip(x, 8)
    box = torch.nn.functional.interpolate(x[:1, :, 5:9, 3:11], size=(8, 8), mode="bilinear", align_corners=False)
    inner = lambda t: t[..., 1:-1, :]  # the rows the box's own pixels give (at its edges bilinear reads its neighbours)
    same = [torch.allclose(inner(o), inner(box[0]), atol=1e-5) for o in out]
    mirrored = [torch.allclose(inner(o), inner(box[0].flip(-1)), atol=1e-5) for o in out]
    assert all(s or m for s, m in zip(same, mirrored)) and 16 < sum(mirrored) < 48
    monkeypatch.undo()
    boxes, crop_box = [], images.crop_box
    monkeypatch.setattr(images, "crop_box", lambda *args: boxes.append(crop_box(*args)) or boxes[-1])
    images.random_resized_crop_flip(torch.rand(400, 3, 40, 40), 20)  # the authors' scale: 40-80 % of the area
    share = np.array([cw * ch / 1600 for _, _, cw, ch in boxes])
    assert 0.35 < share.min() < 0.45 and 0.75 < share.max() < 0.87


def test_colour_jitters_factors_scale_brightness_blend_contrast_and_saturation_and_turn_the_hue():
    """Each factor as torchvision's ColorJitter applies it (brightness times, contrast about the grey level's
    mean, saturation about each pixel's grey); a hue turned half way round gives each colour its opposite about
    its grey (YIQ), a whole turn the image itself."""
    torch.manual_seed(0)
    x = torch.rand(1, 3, 8, 8) * 0.5 + 0.25
    jitter = lambda *factors: images.color_jitter(x, factors=torch.tensor([factors]))
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    close = lambda a, b: torch.allclose(a, b.clamp(0, 1), atol=1e-5)
    assert close(jitter(1.3, 1, 1, 0), x * 1.3) and close(jitter(1, 1, 1, 0), x)
    assert close(jitter(1, 0.6, 1, 0), (x - gray.mean()) * 0.6 + gray.mean())
    assert close(jitter(1, 1, 0.6, 0), (x - gray) * 0.6 + gray)
    assert close(jitter(1, 1, 1, 0.5), 2 * gray - x) and close(jitter(1, 1, 1, 1.0), x)


def test_evaluation_batches_are_not_augmented_and_training_ones_are_before_normalising(tmp_path):
    """prepare(x) for evaluation: the whole image, resized; for training augment gets floats in [0, 1] (CIFAR's
    padding is black), and the batch is normalised after it."""
    d = images.load_folder(make_folder(tmp_path / "woof"), 28)
    seen = []
    data = images.image_data(d, "cpu", 40, augment=lambda x: seen.append(x) or torch.zeros_like(x[..., :40, :40]))
    floats = data.x_test.permute(0, 3, 1, 2).float() / 255
    resized = torch.nn.functional.interpolate(floats, size=(40, 40), mode="bilinear", antialias=True)
    mean, std = (v.view(1, 3, 1, 1) for v in images.channel_stats(data.x_train))
    assert torch.allclose(data.prepare(data.x_test), (resized - mean) / std, atol=1e-5) and not seen
    assert torch.allclose(data.prepare(data.x_train, train=True), -mean / std * torch.ones(16, 3, 28, 28), atol=1e-6)
    assert len(seen) == 1 and torch.equal(seen[0], data.x_train.permute(0, 3, 1, 2).to(mean.dtype) / 255)


class Stop(Exception):
    pass


@pytest.mark.parametrize("arch", ["lenet", "resnet18"])
def test_each_architecture_reads_and_augments_the_images_as_the_docs_say(tmp_path, monkeypatch, arch):
    """LeNet: centre crops at 28, no augmentation; ResNet18: whole images decoded at 160 (the archive's size),
    for training a random resized crop to --size, flipped, then colour-jittered."""
    data, loaded, given = make_folder(tmp_path / "woof"), [], []
    load = images.load_folder

    def image_data(d, device, size, augment):
        given.append(augment)
        raise Stop
    monkeypatch.setattr(images, "load_folder", lambda *args, **kwargs: loaded.append((args[1], kwargs)) or
                        load(*args, **kwargs))
    monkeypatch.setattr(images, "image_data", image_data)
    with pytest.raises(Stop):
        woof.run(woof.parse(["--arch", arch, "--data", str(data), "--out", str(tmp_path / "out"), "--device", "cpu"]))
    assert loaded == [(28, dict(whole=False)) if arch == "lenet" else (160, dict(whole=True))]
    augment, = given
    if arch == "resnet18":
        calls = []
        monkeypatch.setattr(images, "random_resized_crop_flip", lambda x, size: calls.append(("crop", size)) or x + 1)
        monkeypatch.setattr(images, "color_jitter", lambda x: calls.append("jitter") or x * 2)
        assert torch.equal(augment(torch.zeros(1)), torch.tensor([2.0])) and calls == [("crop", 224), "jitter"]
    else:
        assert augment is None


def test_the_validation_split_is_its_share_rounded_disjoint_and_fixed_by_the_seed():
    train, val = images.split(19, 0.25, seed=4)  # 4.75 images: 5
    assert len(val) == 5 and sorted(np.concatenate([train, val]).tolist()) == list(range(19))
    assert np.array_equal(images.split(19, 0.25, seed=4)[1], val)
    assert len(images.split(19, 3, seed=4)[1]) == 3  # a count (ImageNet's --val-images)


@pytest.mark.parametrize("cut", ["short", "reset"])
def test_a_download_cut_short_leaves_no_file_there_nor_beside_it(tmp_path, monkeypatch, cut):
    """download(): the file appears only whole; a response with fewer bytes than it announced, or a connection
    reset, leaves nothing (verified() then fetches it again, or says so in one line)."""
    url, _ = make_archive(tmp_path)
    real_urlopen = downloads.urllib.request.urlopen

    def cut_urlopen(address):
        response = real_urlopen(address)
        first = [response.read()[:100]]

        def read(n):  # 100 bytes, then the end (short) or a connection reset
            if first:
                return first.pop()
            if cut == "reset":
                raise ConnectionResetError("reset by peer")
            return b""
        response.read = read
        return response
    monkeypatch.setattr(downloads.urllib.request, "urlopen", cut_urlopen)
    (tmp_path / "data").mkdir()
    path = tmp_path / "data" / "imagewoof2-160.tgz"
    if cut == "short":
        downloads.download(url, path, "put it there yourself")
    else:
        with pytest.raises(experiment.InputError, match="cannot download .*reset by peer.*put it there yourself"):
            downloads.download(url, path, "put it there yourself")
    assert not os.listdir(tmp_path / "data")


@pytest.mark.parametrize("damage", ["cut", "outside"])
def test_an_archive_that_fails_to_extract_leaves_no_folder_and_writes_nothing_outside_it(tmp_path, damage):
    """fetch(): extracted whole or not at all, into a scratch folder first; a member that points out of it (an
    archive made to write elsewhere) is refused."""
    archive = tmp_path / "server" / "imagewoof2-160.tgz"
    archive.parent.mkdir()
    make_folder(tmp_path / "src" / "imagewoof2-160", n_train=30)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "imagewoof2-160", arcname="imagewoof2-160")
        if damage == "outside":
            (tmp_path / "src" / "evil.txt").write_text("written outside")
            tar.add(tmp_path / "src" / "evil.txt", arcname="../evil.txt")
    if damage == "cut":  # a whole download of an archive cut at its source: its digest is the published one
        archive.write_bytes(archive.read_bytes()[:archive.stat().st_size * 2 // 3])
    digests, root = {"md5": hashlib.md5(archive.read_bytes()).hexdigest()}, tmp_path / "data"
    with pytest.raises(experiment.InputError, match="not a readable archive"):
        downloads.fetch(root, archive.as_uri(), digests, "imagewoof2-160")
    assert not (root / "imagewoof2-160").exists() and not (root / "evil.txt").exists()
    assert not (tmp_path / "evil.txt").exists()


def test_a_full_disk_while_extracting_is_said_as_such_and_leaves_no_half_extracted_folder(tmp_path, monkeypatch):
    """Not "not a readable archive; delete it": the archive is whole (its digest matched); the disk is full."""
    url, digests = make_archive(tmp_path)
    makefile, written = tarfile.TarFile.makefile, []

    def full_disk(self, member, target):
        written.append(target)
        if len(written) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        makefile(self, member, target)
    monkeypatch.setattr(tarfile.TarFile, "makefile", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        downloads.fetch(tmp_path / "data", url, digests, "imagewoof2-160")
    assert os.listdir(tmp_path / "data") == ["imagewoof2-160.tgz"]  # the archive kept, no .partial folder
