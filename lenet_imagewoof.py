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
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

import experiment
import images
import merge
from experiment import AT_LEAST_1, FRACTION, setting

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
    """(paths, labels, classes) of folder/<class>/<image>: regular files with an image suffix
    (a FIFO or a folder named x.jpg is skipped); classes are the sorted folders holding images."""
    paths, labels, classes = [], [], []
    if not folder.is_dir():
        return paths, labels, classes
    for name in sorted(d.name for d in folder.iterdir() if d.is_dir()):
        mine = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in EXTENSIONS and p.is_file())
        if mine:
            paths += mine
            labels += [len(classes)] * len(mine)
            classes.append(name)
    return paths, labels, classes


def decode(path, size, whole=False):
    """RGB uint8 (size, size, 3): the whole image resized to size x size (whole), or the shorter
    side resized to `size`, then the centre crop."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if whole:
                return np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.uint8)
            scale = size / min(image.size)
            w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
            image = image.resize((w, h), Image.BILINEAR)
            left, top = (w - size) // 2, (h - size) // 2
            return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # not an image, cut short, too many pixels
        raise experiment.InputError(f"cannot read image {path}: {e}") from None


def load_split(data, split, size, whole=False):
    """(images uint8 (N, size, size, 3), labels int64 (N,), classes) of data/split, decoded once
    and cached in data/.cache, rebuilt when a file is added, removed or changed (name, size and
    modification time). A cache that cannot be read is rebuilt; one that cannot be written is
    skipped, with one line each."""
    paths, labels, classes = list_images(data / split)
    cache = data / ".cache" / f"{split}-{size}{'-whole' if whole else ''}.npz"
    stamps = np.array([f"{p.relative_to(data)} {p.stat().st_size} {p.stat().st_mtime_ns}" for p in paths])
    try:
        with np.load(cache) as saved:
            if np.array_equal(saved["stamps"], stamps):
                return saved["images"], saved["labels"], classes
    except FileNotFoundError:
        pass
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: decode again
        experiment.log.info(f"{cache} cannot be read ({type(e).__name__}); decoding the images again")
    images = np.stack([decode(p, size, whole) for p in paths])
    try:
        cache.parent.mkdir(exist_ok=True)
        np.savez(cache.with_suffix(".part.npz"), images=images, labels=np.array(labels), stamps=stamps)
        cache.with_suffix(".part.npz").replace(cache)
    except OSError as e:
        experiment.log.info(f"cannot write the image cache {cache} ({e.strerror}); the images will be decoded again next time")
    return images, np.array(labels), classes


def check_folder(data):
    """One clear line for a folder that is not in the Imagewoof layout."""
    if not data.is_dir():
        raise experiment.InputError(f"--data {data}: no such folder")
    for split in ("train", "val"):
        if not list_images(data / split)[0]:
            raise experiment.InputError(f"--data {data}: {split}/<class>/ holds no .jpg, .jpeg or .png images")
    train, val = list_images(data / "train")[2], list_images(data / "val")[2]
    if train != val:
        raise experiment.InputError(f"--data {data}: train and val have different classes with images "
                               f"({sorted(set(train) ^ set(val))[:3]} in one only)")
    if len(train) < 2:
        raise experiment.InputError(f"--data {data}: one class only ({train[0]}); classifying needs at least 2")


def load_imagewoof(data, size, val_fraction=0.1, seed=0, whole=False):
    """The data set as uint8 arrays: train minus a validation split fixed by seed (for choosing
    bo3 and any selection), val (Imagewoof's val folder, the test set)."""
    check_folder(data)
    images, labels, classes = load_split(data, "train", size, whole)
    test_images, test_labels, _ = load_split(data, "val", size, whole)
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = max(1, round(val_fraction * len(images)))
    if n_val >= len(images):
        raise experiment.InputError(f"--data {data}: {len(images)} training images leave none to train on after "
                               f"--val-fraction {val_fraction}; lower it or add images")
    val, train = order[:n_val], order[n_val:]
    return dict(x_train=images[train], y_train=labels[train], x_val=images[val], y_val=labels[val],
                x_test=test_images, y_test=test_labels, classes=classes)


# =============================================================================
# ResNet18's augmentation, on batches on the device
# =============================================================================

def random_resized_crop_flip(x, size, scale=(0.4, 0.8), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop(size, scale) and RandomHorizontalFlip of torchvision for a whole batch
    (B, 3, H, W) on its device, in one grid_sample: each example its own crop of area share in
    `scale` and aspect ratio in `ratio`, anywhere in the image, resized to size x size and
    mirrored half the time. The scale (0.4, 0.8) is the authors' script's (REFERENCE.md).
    DEVIATION: a crop wider than the image is clamped to it, where torchvision would redraw."""
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


def color_jitter(x, strength=0.15):
    """torchvision's ColorJitter(brightness, contrast, saturation, hue = strength) for a batch of
    RGB images in [0, 1], (B, 3, H, W), each example its own factors: brightness, contrast and
    saturation scaled by a factor in [1 - strength, 1 + strength], the hue turned by up to
    strength of a full turn. DEVIATION: always in this order (torchvision draws an order per
    batch), and the hue turned in YIQ space, a close approximation of torchvision's HSV shift."""
    B, device = x.shape[0], x.device
    factor = lambda: torch.empty(B, 1, 1, 1, device=device).uniform_(1 - strength, 1 + strength)
    gray = lambda x: (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)  # (B, 1, H, W)
    x = (x * factor()).clamp(0, 1)                                               # brightness
    mean = gray(x).mean((2, 3), keepdim=True)
    x = ((x - mean) * factor() + mean).clamp(0, 1)                               # contrast
    x = ((x - gray(x)) * factor() + gray(x)).clamp(0, 1)                          # saturation
    angle = torch.empty(B, device=device).uniform_(-strength, strength) * 2 * math.pi
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=device)
    cos, sin, zero, one = angle.cos(), angle.sin(), torch.zeros(B, device=device), torch.ones(B, device=device)
    turn = torch.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos], 1).view(B, 3, 3)  # about the Y axis
    matrix = torch.linalg.inv(to_yiq) @ turn @ to_yiq                            # (B, 3, 3), RGB -> RGB
    return torch.einsum("bij,bjhw->bihw", matrix.to(x.dtype), x).clamp(0, 1)   # hue


# =============================================================================
# The experiments (section 3.3): the paper's settings per architecture (REFERENCE.md)
# =============================================================================

@dataclass
class ImageSettings(experiment.Settings):
    """The Imagewoof experiments' settings: experiment.Settings, and the data's and networks'."""
    metric: ClassVar[str] = "test_accuracy"
    arch: str = setting("lenet", "lenet (section 3.3.1) or resnet18 (3.3.2); the other defaults follow it",
                        choices=("lenet", "resnet18"))
    data: str = setting("", "an extracted folder in the Imagewoof layout; empty: download imagewoof2-160 "
                            "into --root")
    root: str = setting("data", "where the downloaded archive is kept and extracted")
    size: int = setting(28, "input side in pixels (LeNet 28, ResNet18 224); images are decoded once at up to "
                            "160, the archive's size, and resized on the device",
                        valid=(lambda v: v >= 8, "at least 8"))
    val_fraction: float = setting(0.1, "share of train held out, fixed by --seed, to choose bo3 (ours)",
                                  valid=FRACTION)
    width: int = setting(64, "ResNet18's first-stage width (paper: 64; smaller only for quick checks)",
                         valid=AT_LEAST_1)


LR_DROPS = (1 / 2, 3 / 4)  # lr / 10 in the third and in the last quarter of every phase but the importance phase
PAPER = {
    "lenet": dict(out="runs/lenet_imagewoof", runs=10, epochs=6000, size=28,
                  batch=64,  # ours: the paper gives no batch size for LeNet
                  paper_epochs=600),  # ours: no LeNet lambda in the paper; lambda ends where ResNet18's does (6.55)
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
        raise experiment.InputError(f"LeNet takes 28x28 images (section 3.3.1); --size {s.size} would not fit its "
                               "first linear layer")
    if s.arch == "resnet18" and s.stack:
        raise experiment.InputError("--stack 1 is for networks without BatchNorm; ResNet18 trains one model at a time")


def run(s):
    check(s)
    folder = Path(s.data) if s.data else images.fetch(Path(s.root), URL, DIGESTS, "imagewoof2-160")
    # ResNet18 as the authors' script: whole images, squashed to a square (test images resized to 224
    # whole, no crop), training crops of 40-80 % of the area, flips and colour jitter (REFERENCE.md).
    # DEVIATION: the crops are drawn from the squashed image, not from the original's aspect.
    resnet = s.arch == "resnet18"
    d = load_imagewoof(folder, min(s.size, 160), s.val_fraction, s.seed, whole=resnet)
    classes = len(d["classes"])
    experiment.log.info(f"{folder}: {classes} classes; train {len(d['x_train'])}, validation {len(d['x_val'])}, "
              f"test {len(d['x_test'])} images")
    augment = (lambda x: color_jitter(random_resized_crop_flip(x, s.size))) if resnet else None
    data = images.image_data(d, experiment.resolve_device(s.device), s.size, augment)

    def make_teacher():
        return merge.resnet18(classes, s.width) if resnet else merge.LeNet(classes)
    # every run shares the data; runs differ in initial weights, data order and gate noise
    name, figure, figure_title = TITLES[s.arch]
    with experiment.locked(s):
        rows = experiment.run_experiment(s, f"{name} on {folder.name}", lambda seed, device: data, make_teacher,
                                         images.accuracy_result)
        images.report_accuracy(s, rows, f"{name} on {folder.name}, Table 2, {s.epochs} epochs per strategy", figure,
                               f"{figure_title}: {name} on {folder.name}")


def main(argv=None):
    experiment.main(argv, parse, run)


if __name__ == "__main__":
    main(sys.argv[1:])
