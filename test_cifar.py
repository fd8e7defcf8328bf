"""Tests for cifar.py and the prune and fusion strategies. The tests write tiny CIFAR-10 and
CIFAR-100 pickles in the official format (dicts of bytes keys, uint8 rows of 3072 values,
label lists) and tiny archives of them; no network."""
import hashlib
import json
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import cifar
import downloads
import images
import experiment
import merge

ROOT = Path(__file__).parent


def write_batch(path, n, classes, labels_key, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    data[:, :1024] = (labels * 255 // max(1, classes - 1))[:, None]  # the red plane tells the class: learnable
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"a test batch", labels_key: labels.tolist(), b"data": data,
                     b"filenames": [b"x.png"] * n}, f, protocol=2)


def make_cifar(root, dataset, n=16):
    """The extracted folder of an official archive, with n images per batch file."""
    spec = cifar.DATASETS[dataset]
    folder = root / spec["folder"]
    folder.mkdir(parents=True)
    classes = 4 if dataset == "cifar10" else 5  # labels within range; few, so tiny runs can learn
    for i, name in enumerate(spec["train"] + spec["test"]):
        write_batch(folder / name, n, classes, spec["labels"], seed=i)
    meta = "batches.meta" if dataset == "cifar10" else "meta"
    with open(folder / meta, "wb") as f:
        pickle.dump({b"label_names": [b"c%d" % i for i in range(spec["classes"])]}, f, protocol=2)
    return folder


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "cifar.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def read_rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


# --- the data ----------------------------------------------------------------

def test_the_pickles_load_with_shapes_labels_and_a_disjoint_seeded_split(tmp_path):
    folder = make_cifar(tmp_path, "cifar10")
    d = cifar.load_cifar(folder, "cifar10", val_fraction=0.25, seed=3)
    assert d["x_train"].shape == (60, 32, 32, 3) and d["x_val"].shape == (20, 32, 32, 3)
    assert d["x_test"].shape == (16, 32, 32, 3) and d["x_train"].dtype == np.uint8
    with open(folder / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    assert np.array_equal(d["x_test"][5].transpose(2, 0, 1).reshape(-1), batch[b"data"][5])  # rows -> HWC
    assert d["y_test"].tolist() == batch[b"labels"]
    rows = lambda x: {r.tobytes() for r in x}
    assert not rows(d["x_train"]) & rows(d["x_val"]) and len(rows(d["x_train"]) | rows(d["x_val"])) == 80
    assert np.array_equal(cifar.load_cifar(folder, "cifar10", 0.25, seed=3)["x_val"], d["x_val"])
    hundred = cifar.load_cifar(make_cifar(tmp_path, "cifar100"), "cifar100", 0.25)
    assert hundred["x_train"].shape == (12, 32, 32, 3) and len(hundred["x_test"]) == 16
    parent = cifar.load_cifar(folder.parent, "cifar10", 0.25, seed=3)  # the folder above, as torchvision's root
    assert np.array_equal(parent["x_val"], d["x_val"])


def test_given_statistics_normalise_the_images_instead_of_the_training_splits(tmp_path):
    """--mean-std: the statistics a given teacher was trained with (OTFusion's), not the training split's own."""
    d = cifar.load_cifar(make_cifar(tmp_path, "cifar10"), "cifar10")
    x = torch.as_tensor(d["x_test"][:4])
    floats = x.permute(0, 3, 1, 2).float() / 255
    given = images.image_data(d, "cpu", stats=(0.4914, 0.4822, 0.4465, 0.2023, 0.1994, 0.2010)).prepare(x)
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2023, 0.1994, 0.2010])
    assert torch.allclose(given, (floats - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1), atol=1e-6)
    own_mean, own_std = images.channel_stats(torch.as_tensor(d["x_train"]))
    own = images.image_data(d, "cpu").prepare(x)
    assert torch.allclose(own, (floats - own_mean.view(1, 3, 1, 1)) / own_std.view(1, 3, 1, 1), atol=1e-5)

def test_the_augmentation_crops_with_padding_and_flips_each_example():
    torch.manual_seed(0)
    x = torch.randn(200, 3, 8, 8)
    out = images.random_crop_flip(x, pad=4)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for b in range(200):  # each output is one 8x8 window of the padded image, mirrored or not
        windows = padded[b].unfold(1, 8, 1).unfold(2, 8, 1).permute(1, 2, 0, 3, 4)  # (9, 9, 3, 8, 8)
        assert any(torch.equal(w, out[b]) or torch.equal(w.flip(-1), out[b]) for w in windows.reshape(-1, 3, 8, 8))
    assert (out == x).all((1, 2, 3)).sum() < 50  # most examples moved


def test_a_tampered_pickle_is_refused_before_it_runs_anything(tmp_path):
    folder = make_cifar(tmp_path, "cifar10")

    class Payload:
        def __reduce__(self):
            return (print, ("this ran",))
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": Payload(), b"labels": []}, f)
    with pytest.raises(experiment.InputError, match="data_batch_3.*not part of a CIFAR batch"):
        cifar.load_cifar(folder, "cifar10")


# --- the strategies: fusion and pruning ---------------------------------------------

SMALL = [lambda: merge.SineMLP(), lambda: merge.LeNet(10, (4, 6, 12, 8)),
         lambda: merge.VGG(10, (4, 8, 8, 8, 8, 8, 8, 8)), lambda: merge.resnet20(10, width=4)]


@pytest.mark.parametrize("make", SMALL, ids=["mlp", "lenet", "vgg11", "resnet20"])
def test_weight_matching_recovers_a_permutation_and_fusion_gives_the_teacher_back(make):
    torch.manual_seed(0)
    teacher = make()
    for m in teacher.modules():  # BatchNorms with statistics of their own, so that a wrong match shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.weight.data.normal_()
            m.bias.data.normal_()
    shuffle = [torch.randperm(producers[0].weight.shape[0]) for _, producers, _ in teacher.unit_groups()]
    permuted = merge.compress(teacher, shuffle)  # unit c of permuted is unit shuffle[c] of teacher
    assert any(not torch.equal(a, b) for a, b in zip(permuted.state_dict().values(), teacher.state_dict().values()))
    perms = merge.weight_matching(teacher, permuted, seed=1)
    assert all(torch.equal(p, s.argsort()) for p, s in zip(perms, shuffle))
    fused = merge.fuse([teacher, permuted])
    assert type(fused) is type(teacher)
    assert all(torch.equal(fused.state_dict()[name], value) for name, value in teacher.state_dict().items())


def test_pruning_keeps_the_function_and_ends_in_the_teachers_architecture():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (48, 8, 8, 3), dtype=torch.uint8)
    y = torch.randint(0, 4, (48,))
    data = images.image_data(dict(x_train=x, y_train=y, x_val=x[:8], y_val=y[:8], x_test=x[:16], y_test=y[:16]),
                            "cpu")
    s = merge.Settings(batch=16, lr=0.05)
    make = lambda: merge.resnet20(4, width=4)
    masked = merge.variant(merge.variant(make(), k=2), gated=True)
    masks = merge.with_masks(masked)
    merge.fit(masked, data, s, 3, seed=5, **merge.taylor_pruning(masks, 3))
    alive = [mask.m.detach().nonzero().flatten() for mask in masks]
    assert [len(a) for a in alive] == [len(m.m) // 2 for m in masks] == [4] * 4 + [8] * 4 + [16] * 4
    assert all(int(m.m.sum()) == len(a) for m, a in zip(masks, alive))
    # a residual stage is one group, so one mask: its channel is 0 wherever the stream is
    # written (stem, every block's output), and cutting it out changes nothing
    stage0 = masked.stage_gates[0]
    assert stage0 is masks[3] and all(stage0 is not b.gate for b in masked.stages[0])
    pruned = merge.compress(masked, alive)
    assert torch.allclose(merge.predict(pruned, data.x_test, data.prepare),
                          merge.predict(masked, data.x_test, data.prepare), atol=1e-5)
    fresh = make()
    fresh.load_state_dict(pruned.state_dict())  # strict: the teachers' architecture exactly


# --- the command line ----------------------------------------------------------

@pytest.mark.slow
def test_resnet20_cifar100_end_to_end_with_every_strategy(tmp_path):
    data, out = make_cifar(tmp_path, "cifar100"), tmp_path / "out"
    result = run_cli("--data", data, "--width", 2, "--epochs", 6, "--runs", 2, "--batch", 8, "--out", out,
                     "--device", "cpu")
    assert result.returncode == 0, result.stderr
    rows = read_rows(out)
    strategies = ("student", "bo3", "one", "prune")
    assert sorted((r["run"], r["strategy"]) for r in rows) == sorted((run, n) for run in range(2) for n in strategies)
    summary = (out / "summary.md").read_text()
    assert "ResNet20 on cifar-100-python (the paper's Table 2)" in summary and all(f"| {n} | 2 |" in summary for n in strategies)
    assert "pruned, before fine-tuning" in summary and (out / "box_resnet20_cifar100.png").stat().st_size > 1000
    settings = json.loads((out / "settings.json").read_text())
    assert settings["lr"] == 0.1 and settings["weight_decay"] == 1e-4 and settings["drops_importance"] == [0.5, 0.7]


@pytest.mark.slow
def test_vgg11_cifar10_with_given_teachers_against_fusion(tmp_path):
    data, out = make_cifar(tmp_path, "cifar10"), tmp_path / "out"
    files = []
    for i in range(2):  # OTFusion-style checkpoints: wrapped, with their own names
        torch.manual_seed(i)
        state = merge.vgg11(10, width=2).state_dict()
        names = [f"features.{j}.weight" for j in range(len(state) - 1)] + ["classifier.weight"]
        files.append(tmp_path / f"teacher{i}.pt")
        torch.save({"model_state_dict": dict(zip(names, state.values())), "test_accuracy": 0.5}, files[-1])
    otfusion = (0.4914, 0.4822, 0.4465, 0.2023, 0.1994, 0.2010)  # the statistics the teachers were trained with
    result = run_cli("--experiment", "vgg11-cifar10", "--data", data, "--width", 2, "--epochs", 6, "--batch", 8,
                     "--teacher-files", *files, "--mean-std", *otfusion, "--out", out, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert tuple(json.loads((out / "settings.json").read_text())["mean_std"]) == otfusion
    assert "without --mean-std" not in result.stdout
    rows = read_rows(out)
    assert sorted(r["strategy"] for r in rows) == ["fusion", "student"]
    student, fusion = sorted(rows, key=lambda r: r["strategy"], reverse=True)
    assert student["teachers_test"] == fusion["teachers_test"]  # the same given teachers, loaded, not trained
    assert "teacher: 0 x 2 epochs (2 done before)" in result.stdout
    summary = (out / "summary.md").read_text()
    assert "VGG-11 on cifar-10-batches-py (the paper's section 3.3.4)" in summary and "Table 3" not in summary.split("\n")[0]
    assert "not rerun" in summary  # our fusion is not Table 3's OTFusion or GAMF
    assert all(f"| {n} | 1 |" in summary for n in ("teacher 0", "teacher 1", "student", "fusion"))
    assert "6 epochs per strategy, the given teachers' training not counted" in summary.split("\n")[0]
    assert "| student | 1 |" in summary and student["compute"]["teacher"][0] == 4  # in its row, not in the summary
    table = summary.split("\n\n")[1].splitlines()  # the main table, below the heading
    epochs = {cells[1].strip(): cells[-3].strip() for cells in (line.split("|") for line in table)}  # 3rd last
    assert epochs["student"] == "2" and epochs["fusion"] == "1"  # importance and fine-tuning; fine-tuning
    assert "fused, before fine-tuning" in summary and (out / "box_vgg11_cifar10.png").exists()


def test_vgg11_cifar10_trains_its_own_teachers_once_for_the_student_and_fusion(tmp_path, capsys):
    """Without --teacher-files, VGG-11's two teachers are trained (the preset's schedule), once for both."""
    data, out = make_cifar(tmp_path, "cifar10"), tmp_path / "out"
    cifar.main([str(a) for a in ["--experiment", "vgg11-cifar10", "--data", data, "--width", 2, "--epochs", 6, "--batch",
                                 8, "--runs", 1, "--out", out, "--device", "cpu"]])
    assert "teacher: 2 x 2 epochs\n" in capsys.readouterr().out  # trained here, not loaded
    fusion, student = sorted(read_rows(out), key=lambda row: row["strategy"])
    assert (fusion["strategy"], student["strategy"]) == ("fusion", "student")
    assert student["teachers_test"] == fusion["teachers_test"] and len(student["teachers_test"]) == 2
    assert len(list((out / "phases").glob("teacher-*.pt"))) == 2
    summary = (out / "summary.md").read_text()  # each teacher its row, as in Table 3; our fusion is not theirs
    assert all(f"| {n} | 1 |" in summary for n in ("teacher 0", "teacher 1", "student", "fusion"))
    assert "not rerun" in summary


def test_a_wrapped_checkpoint_of_other_names_loads_its_tensors_in_order(tmp_path):
    """load_teacher: a state dict wrapped as OTFusion's ({"model_state_dict": ...}, or "state_dict"), its names
    not ours (features.0.weight for convs.0.weight), other entries beside its tensors: the tensors, in order."""
    torch.manual_seed(0)
    theirs = merge.vgg11(10, width=2).state_dict()
    names = [f"features.{j}.weight" for j in range(len(theirs) - 1)] + ["classifier.weight"]
    for key in ("model_state_dict", "state_dict"):
        torch.save({key: {"epoch": 7, **dict(zip(names, theirs.values()))}, "test_accuracy": 0.5}, tmp_path / "t.pt")
        mine = cifar.load_teacher(tmp_path / "t.pt", merge.vgg11(10, width=2)).state_dict()
        assert all(torch.equal(mine[name], value) for name, value in theirs.items())


def make_archive(tmp_path, dataset):
    make_cifar(tmp_path / "src", dataset)
    archive = tmp_path / "server" / cifar.DATASETS[dataset]["url"].rsplit("/", 1)[1]
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / cifar.DATASETS[dataset]["folder"], arcname=cifar.DATASETS[dataset]["folder"])
    return archive


def test_the_archive_is_downloaded_checked_and_extracted_once(tmp_path, monkeypatch):
    archive = make_archive(tmp_path, "cifar10")
    spec = dict(cifar.DATASETS["cifar10"], url=archive.as_uri(), md5=hashlib.md5(archive.read_bytes()).hexdigest())
    monkeypatch.setitem(cifar.DATASETS, "cifar10", spec)
    folder = downloads.fetch(tmp_path / "data", spec["url"], dict(md5=spec["md5"]), spec["folder"])
    assert folder == tmp_path / "data" / "cifar-10-batches-py" and (folder / "test_batch").is_file()
    monkeypatch.setattr(downloads, "download", lambda *a: pytest.fail("downloaded again"))
    assert downloads.fetch(tmp_path / "data", spec["url"], dict(md5=spec["md5"]), spec["folder"]) == folder


@pytest.mark.parametrize("damage, message", [
    ("wrong md5", "did not match its published checksum"),
    ("corrupt archive", "not a readable archive"),
    ("missing archive", "cannot download"),
    ("missing folder", "no such folder"),
    ("other data set", "is or holds cifar-100-python, the other data set: use --experiment resnet20-cifar100, or "
                       "name the cifar-10-batches-py folder"),
    ("other data set, above", "is or holds cifar-100-python, the other data set: use --experiment resnet20-cifar100"),
    ("stacked vgg", "VGG-11 trains one model at a time (its random crops are drawn for each model)"),
    ("not a data set", "no CIFAR pickle train; name the extracted cifar-100-python folder (of the archive"),
    ("corrupt pickle", "cannot read"),
    ("missing teacher", "--teacher-files: no such file"),
    ("missing teacher, no download", "--teacher-files: no such file"),
    ("wrong teacher", "holds 10 tensors where a VGG's state dict has 9"),
    ("wider teacher", "another --width"),
    ("broken teacher", "is not a file torch.save wrote"),
    ("text teacher", "is not a file torch.save wrote"),
    ("whole model teacher", "holds Python objects besides tensors; save its state dict alone"),
    ("one teacher", "pass 2 files"),
    ("teachers for two runs", "of one run: pass 2 files and use --runs 1"),
    ("cuda with teachers", "no GPU"),
    ("empty batch", "holds no images"),
    ("missing batch", "no data_batch_4"),
    ("float labels", "labels are not 16 integers"),
    ("pixels out of range", "pixels are not integers from 0 to 255"),
    ("wrong shape", "not (images, 3072)"),
    ("all for validation", "leave none to train on"),
    ("zero deviation", "--mean-std must be between 0 and 1, got 0.0"),
])
def test_bad_input_gives_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys, damage, message):
    out, args = tmp_path / "out", ["--width", "2", "--epochs", "6"]
    if damage in ("wrong md5", "corrupt archive"):
        archive = make_archive(tmp_path, "cifar100")
        if damage == "corrupt archive":
            archive.write_bytes(archive.read_bytes()[:200])
        md5 = "0" * 32 if damage == "wrong md5" else hashlib.md5(archive.read_bytes()).hexdigest()
        monkeypatch.setitem(cifar.DATASETS, "cifar100", dict(cifar.DATASETS["cifar100"], url=archive.as_uri(), md5=md5))
        args += ["--root", tmp_path / "data"]
    elif damage == "missing archive":  # nothing at the address, nothing downloaded before
        monkeypatch.setitem(cifar.DATASETS, "cifar100", dict(cifar.DATASETS["cifar100"],
                                                             url=(tmp_path / "gone.tar.gz").as_uri()))
        args += ["--root", tmp_path / "data"]
    elif damage == "missing folder":
        args += ["--data", tmp_path / "nowhere"]
    elif damage == "stacked vgg":
        args += ["--data", make_cifar(tmp_path, "cifar10"), "--experiment", "vgg11-cifar10", "--stack", "1"]
    elif damage == "not a data set":  # a folder of something else, such as Imagewoof's
        (tmp_path / "woof" / "train").mkdir(parents=True)
        args += ["--data", tmp_path / "woof"]
    elif damage.startswith("other data set"):  # the extracted folder, or the one above it
        folder = make_cifar(tmp_path, "cifar100")
        args += ["--data", folder.parent if damage.endswith("above") else folder, "--experiment", "vgg11-cifar10"]
    elif damage == "corrupt pickle":
        folder = make_cifar(tmp_path, "cifar100")
        (folder / "train").write_bytes((folder / "train").read_bytes()[:500])
        args += ["--data", folder]
    elif damage == "empty batch":
        folder = make_cifar(tmp_path, "cifar100")
        with open(folder / "test", "wb") as f:
            pickle.dump({b"data": np.zeros((0, 3072), np.uint8), b"fine_labels": []}, f)
        args += ["--data", folder]
    elif damage in ("missing batch", "float labels", "pixels out of range", "wrong shape"):
        folder = make_cifar(tmp_path, "cifar10")
        batch = {b"labels": list(range(4)) * 4, b"data": np.zeros((16, 3072), np.int64)}
        if damage == "missing batch":
            (folder / "data_batch_4").unlink()
        elif damage == "float labels":
            batch[b"labels"] = [0.5] * 16
        elif damage == "pixels out of range":
            batch[b"data"][0, 0] = 300
        else:
            batch[b"data"] = np.zeros((8, 6144), np.uint8)
        if damage != "missing batch":
            with open(folder / "data_batch_2", "wb") as f:
                pickle.dump(batch, f, protocol=2)
        args += ["--data", folder, "--experiment", "vgg11-cifar10"]
    elif damage == "missing teacher, no download":  # the files are read before the data set is fetched
        monkeypatch.setattr(cifar.downloads, "fetch", lambda *a: pytest.fail("downloaded before reading the teachers"))
        args += ["--root", tmp_path / "data", "--experiment", "vgg11-cifar10", "--teacher-files", "gone.pt", "gone.pt"]
    elif damage == "zero deviation":
        args += ["--data", make_cifar(tmp_path, "cifar10"), "--mean-std", 0.5, 0.5, 0.5, 0.2, 0.2, 0]
    elif damage == "all for validation":
        args += ["--data", make_cifar(tmp_path, "cifar100"), "--val-fraction", "0.999"]
    else:
        folder = make_cifar(tmp_path, "cifar10")
        files = {"missing teacher": ["missing.pt"] * 2, "wrong teacher": ["lenet.pt"] * 2, "one teacher": ["vgg.pt"],
                 "wider teacher": ["vgg.pt", "wide.pt"], "broken teacher": ["vgg.pt", "broken.pt"],
                 "text teacher": ["vgg.pt", "text.pt"], "whole model teacher": ["vgg.pt", "model.pt"],
                 "cuda with teachers": ["vgg.pt"] * 2, "teachers for two runs": ["vgg.pt"] * 2}[damage]
        torch.save(merge.LeNet().state_dict(), tmp_path / "lenet.pt")
        torch.save(merge.vgg11(10, width=2).state_dict(), tmp_path / "vgg.pt")
        torch.save(merge.vgg11(10, width=4).state_dict(), tmp_path / "wide.pt")
        (tmp_path / "broken.pt").write_bytes((tmp_path / "vgg.pt").read_bytes()[:300])
        (tmp_path / "text.pt").write_text("# not a checkpoint\n")
        torch.save({"model": merge.vgg11(10, width=2)}, tmp_path / "model.pt")  # the module itself, not its state dict
        args += ["--data", folder, "--experiment", "vgg11-cifar10", "--teacher-files", *[tmp_path / f for f in files]]
        args += ["--device", "cuda"] if damage == "cuda with teachers" else []
        args += ["--runs", "2"] if damage == "teachers for two runs" else []
    if damage == "cuda with teachers" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as exit_:
        cifar.main([str(a) for a in args + ["--out", out]])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert not out.exists()  # nothing written: not settings.json, not a given teacher


def test_cifar100_takes_the_fine_labels_of_its_100_classes(tmp_path):
    """The official CIFAR-100 batches hold fine_labels (100 classes) and coarse_labels (20 superclasses)."""
    folder = make_cifar(tmp_path, "cifar100")
    rng = np.random.default_rng(0)
    for name in ("train", "test"):
        fine = rng.integers(0, 100, 16)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (16, 3072), dtype=np.uint8), b"fine_labels": fine.tolist(),
                         b"coarse_labels": (fine // 5).tolist()}, f, protocol=2)
    d = cifar.load_cifar(folder, "cifar100", val_fraction=0.25)
    assert d["y_test"].tolist() == fine.tolist()


def test_the_crop_takes_each_of_its_offsets_and_mirrors_about_half():
    """random_crop_flip: every one of the (2 pad + 1)^2 windows of the padded image, mirrored half the time."""
    torch.manual_seed(0)
    x = torch.rand(1, 3, 8, 8)
    windows = torch.nn.functional.pad(x, (2, 2, 2, 2))[0].unfold(1, 8, 1).unfold(2, 8, 1).permute(1, 2, 0, 3, 4)
    windows = windows.reshape(25, 1, 3 * 64)
    out = images.random_crop_flip(x.expand(500, -1, -1, -1), pad=2)
    plain = (out.reshape(1, 500, -1) == windows).all(-1)  # (25, 500): which window each example is
    mirrored = (out.flip(-1).reshape(1, 500, -1) == windows).all(-1)
    assert ((plain | mirrored).sum(0) >= 1).all()
    assert (plain.any(1) | mirrored.any(1)).all()  # every offset drawn
    assert 200 < mirrored.any(0).sum() < 300


class Stop(Exception):
    pass


@pytest.mark.parametrize("mean_std", [(), (0.4914, 0.4822, 0.4465, 0.2023, 0.1994, 0.2010)])
def test_the_data_is_cropped_and_flipped_for_training_and_normalised_by_mean_std_where_given(tmp_path, monkeypatch,
                                                                                              mean_std):
    given = []

    def image_data(d, device, augment=None, stats=()):
        given.append((augment, stats))
        raise Stop
    monkeypatch.setattr(images, "image_data", image_data)
    with pytest.raises(Stop):
        cifar.run(cifar.parse(["--data", str(make_cifar(tmp_path, "cifar10")), "--experiment", "vgg11-cifar10",
                               "--out", str(tmp_path / "out"), "--device", "cpu", *["--mean-std"] * bool(mean_std),
                               *map(str, mean_std)]))
    assert given == [(images.random_crop_flip, mean_std)]
