"""Imagewoof for the experiments of section 3.3 (LeNet: Table 2, Fig. 11; ResNet18: Fig. 12).

So far this file holds the data: fast.ai's imagewoof2-160 archive, downloaded with a
progress bar, verified and extracted once, or any folder in its layout
(train/<class>/*.JPEG, val/<class>/*.JPEG; val is the test set), decoded once with Pillow
and cached as uint8 arrays beside the data, with a validation split held out from train.
The experiments (strategies, results, figures) are still to come (see README.md).

    python lenet_imagewoof.py --data DIR --size 28     # check and cache a data folder
"""
import argparse
import hashlib
import sys
import tarfile
import urllib.request
from pathlib import Path

import numpy as np

import merge

URL = "https://s3.amazonaws.com/fast-ai-imageclas/imagewoof2-160.tgz"
# The archive's published digests (fast.ai's archive, as listed by the catalyst and
# FastAI.jl dataset registries); a download must match one of them.
DIGESTS = {"md5": "fcd23cc7dfce8837c95a8f9d63a128b7",
           "sha256": "663c22f69c2802d85e2a67103c017e047096702ffddf9149a14011b7002539bf"}
EXTENSIONS = {".jpg", ".jpeg", ".png"}  # in any case


# =============================================================================
# The archive: download, verify, extract
# =============================================================================

def matches(path, digests):
    """Whether the file's digest is one of `digests` (name -> hex)."""
    hashes = {name: hashlib.new(name) for name in digests}
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            for h in hashes.values():
                h.update(chunk)
    return any(hashes[name].hexdigest() == value for name, value in digests.items())


def download(url, path):
    """url -> path, with a progress bar, through a .part file so a cut download never
    looks finished."""
    part = path.with_name(path.name + ".part")
    with urllib.request.urlopen(url) as response, open(part, "wb") as f:
        total, done = int(response.headers.get("Content-Length") or 0), 0
        for chunk in iter(lambda: response.read(1 << 20), b""):
            f.write(chunk)
            done += len(chunk)
            if total:
                bar = "#" * (30 * done // total)
                print(f"\r  {path.name} [{bar:<30}] {done / 2**20:.0f}/{total / 2**20:.0f} MiB", end="", flush=True)
    print()
    part.replace(path)


def fetch(root, url=URL, digests=DIGESTS):
    """The extracted archive under root: downloaded and verified (a broken or partial file
    is fetched again, once), extracted once."""
    root.mkdir(parents=True, exist_ok=True)
    name = url.rsplit("/", 1)[1].removesuffix(".tgz")
    folder, archive = root / name, root / f"{name}.tgz"
    if (folder / "train").is_dir() and (folder / "val").is_dir():
        return folder
    for attempt in range(2):
        if not archive.exists():
            merge.log(f"downloading {url}")
            download(url, archive)
        if matches(archive, digests):
            break
        archive.unlink()  # broken or partial
        if attempt:
            raise merge.InputError(f"{url} does not match its published checksum twice; not extracting it")
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")  # refuses absolute paths and links out of root
    if not (folder / "train").is_dir():
        raise merge.InputError(f"{archive} holds no {name}/train folder")
    return folder


# =============================================================================
# Images: list, decode once, cache, split
# =============================================================================

def list_images(folder):
    """(paths, labels, classes) of folder/<class>/<image>; classes are the sorted folder names."""
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir()) if folder.is_dir() else []
    paths, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).iterdir()):
            if path.suffix.lower() in EXTENSIONS:
                paths.append(path)
                labels.append(label)
    return paths, labels, classes


def decode(path, size):
    """RGB uint8 (size, size, 3): the shorter side resized to `size`, then the centre crop."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = size / min(image.size)
            w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
            image = image.resize((w, h), Image.BILINEAR)
            left, top = (w - size) // 2, (h - size) // 2
            return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise merge.InputError(f"cannot read image {path}: {e}") from None


def load_split(data, split, size):
    """(images uint8 (N, size, size, 3), labels int64 (N,), classes) of data/split, decoded
    once and cached as data/.cache/{split}-{size}.npz (rebuilt when the file list changes)."""
    paths, labels, classes = list_images(data / split)
    cache = data / ".cache" / f"{split}-{size}.npz"
    names = np.array([str(p.relative_to(data)) for p in paths])
    if cache.exists():
        with np.load(cache) as saved:
            if np.array_equal(saved["names"], names):
                return saved["images"], saved["labels"], classes
    images = np.stack([decode(p, size) for p in paths])
    cache.parent.mkdir(exist_ok=True)
    np.savez(cache.with_suffix(".tmp.npz"), images=images, labels=np.array(labels), names=names)
    cache.with_suffix(".tmp.npz").replace(cache)
    return images, np.array(labels), classes


def check_folder(data):
    """One clear line for a folder that is not in the Imagewoof layout."""
    if not data.is_dir():
        raise merge.InputError(f"--data {data}: no such folder")
    for split in ("train", "val"):
        paths, _, classes = list_images(data / split)
        if not paths:
            raise merge.InputError(f"--data {data}: {split}/<class>/ holds no .jpg, .jpeg or .png images")
    train, val = list_images(data / "train")[2], list_images(data / "val")[2]
    if train != val:
        raise merge.InputError(f"--data {data}: train and val have different classes "
                               f"({sorted(set(train) ^ set(val))[:3]} in one only)")


def load_imagewoof(data, size, val_fraction=0.1, seed=0):
    """The data set as uint8 arrays: train minus a validation split fixed by seed (for
    choosing bo3 and any selection), val (Imagewoof's val folder, the test set)."""
    check_folder(data)
    images, labels, classes = load_split(data, "train", size)
    test_images, test_labels, _ = load_split(data, "val", size)
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = max(1, round(val_fraction * len(images)))
    val, train = order[:n_val], order[n_val:]
    return dict(x_train=images[train], y_train=labels[train], x_val=images[val], y_val=labels[val],
                x_test=test_images, y_test=test_labels, classes=classes)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = merge.fail
    parser.add_argument("--data", type=Path, help="extracted folder in the Imagewoof layout [download it]")
    parser.add_argument("--root", type=Path, default=Path("data"), help="where the archive goes [data]")
    parser.add_argument("--size", type=int, default=28, help="image side in pixels (LeNet: 28) [28]")
    args = parser.parse_args(argv)
    try:
        data = args.data or fetch(args.root)
        d = load_imagewoof(data, args.size)
        print(f"{data}: {len(d['classes'])} classes; train {len(d['x_train'])}, validation {len(d['x_val'])}, "
              f"test {len(d['x_test'])} images of {args.size}x{args.size}; cached in {data / '.cache'}")
    except merge.InputError as e:
        merge.fail(e)


if __name__ == "__main__":
    main(sys.argv[1:])
