"""Tests for the Imagewoof data layer: the tests write their own small folders and archives
in the real formats (JPEG and PNG files in the Imagewoof layout, a .tgz); no network."""
import hashlib
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lenet_imagewoof as woof
import merge

ROOT = Path(__file__).parent
CLASSES = ("n02086240", "n02087394", "n02088364")


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
    d = woof.load_imagewoof(data, size=28, val_fraction=0.25, seed=1)
    assert d["classes"] == list(CLASSES)
    assert d["x_train"].shape == (14, 28, 28, 3) and d["x_val"].shape == (4, 28, 28, 3)
    assert d["x_test"].shape == (6, 28, 28, 3) and d["x_train"].dtype == np.uint8
    identity = lambda x: [(round((p[0] - 20) / 60), round((p[1] - 10) / 30)) for p in x[:, 14, 14].astype(int)]
    for x, y in ((d["x_train"], d["y_train"]), (d["x_val"], d["y_val"]), (d["x_test"], d["y_test"])):
        assert [c for c, _ in identity(x)] == y.tolist()  # labels follow the folder names
    train_ids, val_ids = set(identity(d["x_train"])), set(identity(d["x_val"]))
    assert not train_ids & val_ids and len(train_ids | val_ids) == 18
    again, other = woof.load_imagewoof(data, 28, 0.25, seed=1), woof.load_imagewoof(data, 28, 0.25, seed=2)
    assert np.array_equal(again["x_val"], d["x_val"]) and not np.array_equal(other["x_val"], d["x_val"])


def test_images_are_decoded_once_then_read_from_the_cache(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "woof")
    first = woof.load_imagewoof(data, size=20)
    assert (data / ".cache" / "train-20.npz").exists() and (data / ".cache" / "val-20.npz").exists()
    monkeypatch.setattr(woof, "decode", lambda *a: pytest.fail("decoded again"))
    second = woof.load_imagewoof(data, size=20)
    assert all(np.array_equal(first[k], second[k]) for k in ("x_train", "x_test", "y_train"))
    (data / "train" / CLASSES[0] / "extra.jpg").write_bytes((data / "train" / CLASSES[0] / f"{CLASSES[0]}_2.jpg")
                                                             .read_bytes())
    monkeypatch.undo()
    assert len(woof.load_imagewoof(data, size=20)["x_train"]) == len(first["x_train"]) + 1  # a new file: rebuilt


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "lenet_imagewoof.py"), *args],
                          capture_output=True, text=True, timeout=300)


def test_a_good_folder_through_the_command_line(tmp_path):
    result = run_cli("--data", str(make_folder(tmp_path / "woof")), "--size", "28")
    assert result.returncode == 0, result.stderr
    assert "3 classes" in result.stdout and "test 6 images" in result.stdout


@pytest.mark.parametrize("damage, message", [
    ("missing", "no such folder"),
    ("empty", "holds no .jpg"),
    ("classes", "different classes"),
    ("corrupt", "cannot read image"),
])
def test_bad_data_folders_give_one_line_and_exit_code_2(tmp_path, damage, message):
    data = tmp_path / "woof"
    if damage == "empty":
        (data / "train" / "a").mkdir(parents=True)
        (data / "val" / "a").mkdir(parents=True)
    elif damage == "classes":
        make_folder(data)
        (data / "val" / CLASSES[2]).rename(data / "val" / "n99999999")
    elif damage == "corrupt":
        make_folder(data)
        (data / "train" / CLASSES[1] / "broken.JPEG").write_bytes(b"\xff\xd8 not really a jpeg")
    result = run_cli("--data", str(data))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr
    if damage == "corrupt":
        assert "broken.JPEG" in result.stderr


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
    folder = woof.fetch(root, url, digests)
    assert folder == root / "imagewoof2-160" and len(woof.list_images(folder / "train")[0]) == 18
    monkeypatch.setattr(woof, "download", lambda *a: pytest.fail("downloaded again"))
    assert woof.fetch(root, url, digests) == folder


def test_a_broken_download_is_fetched_again_and_a_wrong_checksum_refused(tmp_path):
    url, digests = make_archive(tmp_path)
    root = tmp_path / "data"
    root.mkdir()
    (root / "imagewoof2-160.tgz").write_bytes(b"the first 10 bytes of a cut download")
    assert (woof.fetch(root, url, digests) / "val").is_dir()  # replaced, then extracted
    with pytest.raises(merge.InputError, match="checksum"):
        woof.fetch(tmp_path / "elsewhere", url, {"md5": "0" * 32})
    assert not (tmp_path / "elsewhere" / "imagewoof2-160").exists()
