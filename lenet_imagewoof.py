"""Imagewoof experiments of section 3.3: LeNet (3.3.1, Table 2, Fig. 11) and ResNet18 (3.3.2, Fig. 12), with
the method, architectures and strategies of merge.py, the data of images.py and the settings of
docs/settings.md.

The data: fast.ai's imagewoof2-160 archive, downloaded with a progress bar, verified and extracted once, or
--data DIR, any folder in its layout (train/<class>/*.JPEG, val/<class>/*.JPEG; val is the test set), or
--data mnist, MNIST's original files downloaded, verified and written in that layout once (600 training and 200
test images of each digit, as JPEGs: the stand-in of the README's results, not the paper's data). Images
are decoded once with Pillow and cached as uint8 arrays beside the data; a validation split, fixed by --seed,
is held out from train for choosing bo3. The whole set stays on the training device as uint8; each batch is
normalised (and for ResNet18 augmented) there.

    python lenet_imagewoof.py                                # LeNet, the paper's budget: 10 runs x 6000 epochs
    python lenet_imagewoof.py --arch resnet18                # ResNet18 at 224 px: 5 runs x 600 epochs (a GPU's work)
    python lenet_imagewoof.py --data mnist --epochs 60 --runs 3  # minutes on a CPU, on MNIST (README.md)

Results go to --out as in merge.py: results.jsonl (one line per finished run and strategy; an interrupted
experiment resumes), summary.md (Table 2's rows, headed by the data they ran on), the box plot.
`python lenet_imagewoof.py --arch resnet18 --help` shows ResNet18's defaults.
"""
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

if __name__ == "__main__":  # a command: Ctrl-C while torch loads gives one line (startup.py)
    import startup
    startup.before_torch()

import downloads
import experiment
import images
import launcher
import merge
from experiment import AT_LEAST_1, FRACTION, setting

URL = "https://s3.amazonaws.com/fast-ai-imageclas/imagewoof2-160.tgz"
# The archive's published digests (fast.ai's archive, as listed by the catalyst and
# FastAI.jl dataset registries); a download must match one of them.
DIGESTS = {"md5": "fcd23cc7dfce8837c95a8f9d63a128b7",
           "sha256": "663c22f69c2802d85e2a67103c017e047096702ffddf9149a14011b7002539bf"}


def data_folder(text):
    """--data as images.folder_name spells it; a folder named mnist, as tab completion gives it (mnist/), stays a
    folder: ./mnist, not the download."""
    name = images.folder_name(text)
    return "./mnist" if name == "mnist" and text != "mnist" else name


@dataclass
class ImageSettings(experiment.Settings):
    """The Imagewoof experiments' settings: experiment.Settings, and the data's and networks'."""
    metric: ClassVar[str] = "test_accuracy"
    row_keys: ClassVar[tuple] = ("val_accuracy",)
    arch: str = setting("lenet", "lenet (section 3.3.1) or resnet18 (3.3.2); the other defaults follow it",
                        choices=("lenet", "resnet18"))
    data: str = setting("", "an extracted folder in the Imagewoof layout; empty: download imagewoof2-160 "
                            "into --root; mnist: MNIST written in that layout into --root, the README's stand-in "
                            "(a folder named mnist: ./mnist)", type=data_folder)
    root: str = setting("data", "where downloads are kept: the archive and its folder, or MNIST's files and theirs",
                        type=images.folder_name)
    size: int = setting(28, "input side in pixels (LeNet 28, ResNet18 224); images are decoded once at up to "
                            "160, the archive's size, and resized on the device",
                        valid=(lambda v: v >= 8, "at least 8"))
    val_fraction: float = setting(0.1, "share of train held out, fixed by --seed, to choose bo3 (ours)",
                                  valid=FRACTION)
    width: int = setting(64, "ResNet18's first-stage width (paper: 64; smaller only for quick checks)",
                         valid=AT_LEAST_1)


LR_DROPS = (1 / 2, 3 / 4)  # lr / 10 in the third and in the last quarter of every phase but the importance phase
PAPER = {  # docs/settings.md gives the source of every value
    "lenet": dict(out="runs/lenet_imagewoof", runs=10, epochs=6000, size=28,
                  batch=64,  # ours: the paper gives no batch size for LeNet
                  paper_epochs=600),  # ours: no LeNet lambda in the paper; lambda ends where ResNet18's does (6.55)
    "resnet18": dict(out="runs/resnet18_imagewoof", runs=5, epochs=600, size=224, batch=32, paper_epochs=600),
}
COMMON = dict(lr=0.01, momentum=0.9, weight_decay=0.0, gate_lr=0.2, lambda_start=0.01, lambda_step=0.05,
              stack="auto",  # stacked on a GPU; on a CPU its batched convolutions are slower than one at a time
              drops_teacher=LR_DROPS, drops_importance=(), drops_finetune=LR_DROPS, drops_one=LR_DROPS)
NAMES = {"lenet": ("LeNet", "Table 2, Fig. 11"), "resnet18": ("ResNet18", "Fig. 12")}


def parse(argv=None):
    """ImageSettings from the command line, the defaults those of --arch."""
    return experiment.parse_with_presets(argv, ImageSettings(**COMMON), "arch", PAPER, __doc__)


def check(s):
    experiment.check_settings(s)
    if s.arch == "lenet" and s.size != 28:
        raise experiment.InputError(f"LeNet takes 28x28 images (section 3.3.1); --size {s.size} would not fit its "
                                    "first linear layer")
    if s.arch == "lenet" and s.width != 64:
        raise experiment.InputError(f"--width {s.width} is ResNet18's (--arch resnet18); LeNet's widths are the paper's")
    if s.arch == "resnet18":
        images.check_unstacked(s, "ResNet18")


def run(s):
    check(s)
    if s.data == "mnist":  # the README's stand-in
        folder = downloads.mnist_folder(Path(s.root))
    else:
        folder = Path(s.data) if s.data else downloads.fetch(Path(s.root), URL, DIGESTS, "imagewoof2-160")
    # ResNet18 as the authors' script: whole images, squashed to a square (test images resized to 224 whole,
    # no crop), training crops of 40-80 % of the area, flips and colour jitter (docs/settings.md).
    # DEVIATION: images are decoded at 160 px (the archive's size) and the crops drawn from the squashed image.
    resnet = s.arch == "resnet18"
    d = images.load_folder(folder, min(s.size, 160), s.val_fraction, s.seed, whole=resnet)
    classes = len(d["classes"])
    experiment.log.info(f"{folder}: {classes} classes; train {len(d['x_train'])}, validation {len(d['x_val'])}, "
                        f"test {len(d['x_test'])} images")
    augment = (lambda x: images.color_jitter(images.random_resized_crop_flip(x, s.size))) if resnet else None
    data = images.image_data(d, experiment.resolve_device(s), s.size, augment)

    def make_teacher():
        return merge.resnet18(classes, s.width) if resnet else merge.LeNet(classes)
    # every run shares the data; runs differ in initial weights, data order and gate noise
    name, paper = NAMES[s.arch]
    title = f"{name} on {folder.name}"  # titled by the data it ran on, which may be a stand-in
    with experiment.locked(s):
        rows = experiment.run_experiment(s, title, lambda seed, device: data, make_teacher, images.accuracy_result)
        images.report_accuracy(s, rows, s.strategies.split(","), f"{title} (the paper's {paper}: Imagewoof), "
                               f"{s.epochs} epochs per strategy", f"box_{s.arch}.png", title)


def main(argv=None):
    launcher.guard()  # a rank under torchrun ends quietly on SIGTERM
    experiment.main(argv, parse, run)


if __name__ == "__main__":
    main(sys.argv[1:])
