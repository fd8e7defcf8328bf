"""Imagewoof experiments of section 3.3: LeNet (3.3.1, Table 2, Fig. 11) and ResNet18
(3.3.2, Fig. 12), with the method, architectures and strategies of merge.py.

The data: fast.ai's imagewoof2-160 archive, downloaded with a progress bar, verified and
extracted once, or --data DIR, any folder in its layout (train/<class>/*.JPEG,
val/<class>/*.JPEG; val is the test set). Images are decoded once with Pillow and cached as
uint8 arrays beside the data; a validation split, fixed by --seed, is held out from train
for choosing bo3. The whole set stays on the training device as uint8; each batch is
normalised (and for ResNet18 augmented) there.

    python lenet_imagewoof.py                                # LeNet, the paper's budget: 10 runs x 6000 epochs
    python lenet_imagewoof.py --arch resnet18                # ResNet18 at 224 px: 5 runs x 600 epochs (a GPU's work)
    python lenet_imagewoof.py --data DIR --epochs 60 --runs 3    # minutes on a CPU (README.md)

Results go to --out as in merge.py: results.jsonl (one line per finished run and
strategy; an interrupted experiment resumes), summary.md (Table 2's rows), the box plot.
Defaults are the paper's settings (REFERENCE.md), but for LeNet's batch size and lambda
schedule, which the paper does not give (ours, README.md). `python lenet_imagewoof.py
--arch resnet18 --help` shows ResNet18's defaults.
"""
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import experiment
import images
import merge
from experiment import setting

URL = "https://s3.amazonaws.com/fast-ai-imageclas/imagewoof2-160.tgz"
# The archive's published digests (fast.ai's archive, as listed by the catalyst and
# FastAI.jl dataset registries); a download must match one of them.
DIGESTS = {"md5": "fcd23cc7dfce8837c95a8f9d63a128b7",
           "sha256": "663c22f69c2802d85e2a67103c017e047096702ffddf9149a14011b7002539bf"}
EXTENSIONS = {".jpg", ".jpeg", ".png"}  # in any case


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


# =============================================================================
# ResNet18's augmentation, on batches on the device
# =============================================================================

def random_resized_crop_flip(x, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """The usual ImageNet training augmentation (torchvision's RandomResizedCrop(size) and
    RandomHorizontalFlip) for a whole batch (B, 3, H, W) on its device, in one grid_sample:
    each example its own crop of area share in `scale` and aspect ratio in `ratio`, anywhere
    in the image, resized to size x size and mirrored half the time.
    DEVIATION: the paper does not spell out its augmentation; this is the standard recipe.
    A crop wider than the image is clamped to it, where torchvision would redraw."""
    B, device = x.shape[0], x.device
    area = torch.empty(B, device=device).uniform_(*scale)
    aspect = torch.empty(B, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
    w, h = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)  # shares of the side
    flip = torch.where(torch.rand(B, device=device) < 0.5, -1.0, 1.0)
    theta = torch.zeros(B, 2, 3, device=device)  # output grid [-1, 1]^2 -> input coordinates
    theta[:, 0, 0], theta[:, 1, 1] = w * flip, h
    theta[:, 0, 2] = (2 * torch.rand(B, device=device) - 1) * (1 - w)  # the crop's centre
    theta[:, 1, 2] = (2 * torch.rand(B, device=device) - 1) * (1 - h)
    grid = F.affine_grid(theta, [B, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


# =============================================================================
# The experiments (section 3.3): the paper's settings per architecture (REFERENCE.md)
# =============================================================================

@dataclass
class ImageSettings(experiment.Settings):
    """The Imagewoof experiments' settings: experiment.Settings, and the data's and networks'."""
    arch: str = setting("lenet", "lenet (section 3.3.1) or resnet18 (3.3.2); the other defaults follow it",
                        choices=("lenet", "resnet18"))
    data: str = setting("", "an extracted folder in the Imagewoof layout; empty: download imagewoof2-160 "
                            "into --root")
    root: str = setting("data", "where the downloaded archive is kept and extracted")
    size: int = setting(28, "input side in pixels (LeNet 28, ResNet18 224); images are decoded once at up to "
                            "160, the archive's size, and resized on the device")
    val_fraction: float = setting(0.1, "share of train held out, fixed by --seed, to choose bo3 (ours)")
    width: int = setting(64, "ResNet18's first-stage width (paper: 64; smaller only for quick checks)")


LR_DROPS = (1 / 2, 3 / 4)  # lr / 10 in the third and in the last quarter of every phase but the importance phase
PAPER = {
    "lenet": dict(out="runs/lenet_imagewoof", runs=10, epochs=6000, size=28,
                  batch=64,  # ours: the paper gives no batch size for LeNet
                  paper_epochs=600),  # ours: no LeNet lambda in the paper; lambda ends where ResNet18's does
    "resnet18": dict(out="runs/resnet18_imagewoof", runs=5, epochs=600, size=224, batch=32, paper_epochs=600),
}
COMMON = dict(lr=0.01, momentum=0.9, weight_decay=0.0, gate_lr=0.2, lambda_start=0.01, lambda_step=0.05,
              stack=0,  # fit_stacked's batched convolutions are slower than one model at a time on a CPU
              drops_teacher=LR_DROPS, drops_importance=(), drops_finetune=LR_DROPS, drops_one=LR_DROPS)
TITLES = {"lenet": ("LeNet", "fig11_box.png", "Fig. 11"), "resnet18": ("ResNet18", "fig12_box.png", "Fig. 12")}


def parse(argv=None):
    """ImageSettings from the command line, the defaults those of --arch."""
    return experiment.parse_with_presets(argv, ImageSettings(**COMMON), "arch", PAPER, __doc__)


def check(s):
    experiment.check_settings(s)
    if s.arch == "lenet" and s.size != 28:
        raise merge.InputError(f"LeNet takes 28x28 images (section 3.3.1); --size {s.size} would not fit its "
                               "first linear layer")
    if s.arch == "resnet18" and s.stack:
        raise merge.InputError("--stack 1 is for networks without BatchNorm; ResNet18 trains one model at a time")
    if not 0 < s.val_fraction < 1 or s.size < 8 or s.width < 1:
        raise merge.InputError("--val-fraction must be in (0, 1), --size at least 8 and --width at least 1")


def run(s):
    check(s)
    folder = Path(s.data) if s.data else images.fetch(Path(s.root), URL, DIGESTS, "imagewoof2-160")
    d = load_imagewoof(folder, min(s.size, 160), s.val_fraction, s.seed)
    classes = len(d["classes"])
    merge.log(f"{folder}: {classes} classes; train {len(d['x_train'])}, validation {len(d['x_val'])}, "
              f"test {len(d['x_test'])} images")
    data = images.image_data(d, experiment.resolve_device(s.device), s.size, augment=(
        lambda x: random_resized_crop_flip(x, s.size)) if s.arch == "resnet18" else None)

    def make_teacher():
        return merge.LeNet(classes) if s.arch == "lenet" else merge.resnet18(classes, s.width)
    # every run shares the data; runs differ in initial weights, data order and gate noise
    name, figure, figure_title = TITLES[s.arch]
    rows = experiment.run_experiment(s, f"{name} on {folder.name}", lambda seed, device: data, make_teacher,
                                images.accuracy_result)
    images.report_accuracy(s, rows, f"{name} on {folder.name}, Table 2, {s.epochs} epochs per strategy", figure,
                           f"{figure_title}: {name} on {folder.name}")


def main(argv=None):
    experiment.main(argv, parse, run)


if __name__ == "__main__":
    main(sys.argv[1:])
