"""CIFAR experiments of section 3.3: ResNet20 on CIFAR-100 against channel pruning
(Table 2) and VGG-11 on CIFAR-10 against model fusion (Table 3), with the method,
architectures and strategies of merge.py.

The data: the official "python version" archives, downloaded with a progress bar, checked
against their published MD5 sums and extracted once, or --data DIR, the extracted folder
(cifar-10-batches-py or cifar-100-python). The pickles are read with numpy; the images
stay on the training device as uint8, and each batch is normalised with the statistics of
the data set in use, cropped (32 with padding 4) and flipped there. A validation split,
fixed by --seed, is held out from the training set to choose bo3; the test set is used for
the final numbers only.

    python cifar.py --experiment resnet20-cifar100   # student, bo3, one, prune: 5 runs x 600 epochs
    python cifar.py --experiment vgg11-cifar10       # student against fusion and its two teachers
    python cifar.py --experiment vgg11-cifar10 --teacher-files A.pt B.pt   # given teachers (state dicts)

Results go to --out as in merge.py: results.jsonl (one line per finished run and
strategy; an interrupted experiment resumes), summary.md (the rows of Tables 2 and 3),
a box plot. Defaults are the paper's settings (REFERENCE.md) but where marked (ours);
`python cifar.py --experiment vgg11-cifar10 --help` shows that experiment's.
"""
import dataclasses
import pickle
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

# The official archives (https://www.cs.toronto.edu/~kriz/cifar.html) and their published MD5 sums.
DATASETS = {
    "cifar10": dict(url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                    md5="c58f30108f718f92721af3b95e74349a", folder="cifar-10-batches-py", classes=10,
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"], labels=b"labels"),
    "cifar100": dict(url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                     md5="eb9058c3a382ffc7106e4002c42a8d85", folder="cifar-100-python", classes=100,
                     train=["train"], test=["test"], labels=b"fine_labels"),
}


# =============================================================================
# Data: the pickles, read with numpy
# =============================================================================

class BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR batch (a dict of bytes, lists and numpy arrays) and nothing else:
    a pickle can run any code it names, so only numpy's array constructors are allowed."""
    allowed = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}  # bytes, as Python 3 writes them at protocol 2

    def find_class(self, module, name):
        if (module, name) in self.allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR batch")


def read_batches(folder, names, labels_key, classes):
    """Images uint8 (N, 32, 32, 3) and labels int64 (N,) of the batch files `names`."""
    images, labels = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            other = [d["folder"] for d in DATASETS.values() if (folder / d["train"][0]).is_file()]
            raise experiment.InputError(f"--data {folder}: no {name}" + (f"; this looks like {other[0]}, the other "
                                                                    "data set" if other else ""))
        try:
            with open(path, "rb") as f:
                batch = BatchUnpickler(f, encoding="bytes").load()
            x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            y = np.asarray(batch[labels_key], dtype=np.int64)
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError) as e:
            raise experiment.InputError(f"cannot read {path} as a CIFAR batch ({type(e).__name__}: {e})") from None
        if not len(x):
            raise experiment.InputError(f"{path} holds no images")
        if len(y) != len(x) or not 0 <= y.min() <= y.max() < classes:
            raise experiment.InputError(f"{path}: labels do not fit its {len(x)} images of {classes} classes")
        images.append(x)
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


def load_cifar(folder, dataset, val_fraction=0.1, seed=0):
    """The data set as uint8 arrays: train minus a validation split fixed by seed, and test."""
    spec = DATASETS[dataset]
    if not folder.is_dir():
        raise experiment.InputError(f"--data {folder}: no such folder")
    if (folder / spec["folder"]).is_dir():  # the folder the archive was extracted into, as torchvision's root
        folder = folder / spec["folder"]
    images, labels = read_batches(folder, spec["train"], spec["labels"], spec["classes"])
    test_images, test_labels = read_batches(folder, spec["test"], spec["labels"], spec["classes"])
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = max(1, round(val_fraction * len(images)))
    if n_val >= len(images):
        raise experiment.InputError(f"--data {folder}: {len(images)} training images leave none to train on after "
                               f"--val-fraction {val_fraction}")
    val, train = order[:n_val], order[n_val:]
    return dict(x_train=images[train], y_train=labels[train], x_val=images[val], y_val=labels[val],
                x_test=test_images, y_test=test_labels)


def random_crop_flip(x, pad=4):
    """The paper's CIFAR augmentation for a whole batch (B, 3, H, W) on its device: a random
    H x W crop of the image padded by `pad` on every side, mirrored half the time.
    The batch is in [0, 1], not yet normalised: the padding is black, as torchvision's."""
    B, _, H, W = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = torch.randint(0, 2 * pad + 1, (B, 1), device=x.device) + torch.arange(H, device=x.device)  # (B, H)
    cols = torch.randint(0, 2 * pad + 1, (B, 1), device=x.device) + torch.arange(W, device=x.device)  # (B, W)
    flip = torch.rand(B, 1, device=x.device) < 0.5
    cols = torch.where(flip, cols.flip(1), cols)
    batch = torch.arange(B, device=x.device)[:, None, None]
    crops = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, 3)
    return crops.permute(0, 3, 1, 2).contiguous()  # channels-last batches hung torch 2.13's CPU conv backward


# =============================================================================
# The experiments: the paper's settings (REFERENCE.md)
# =============================================================================

@dataclass
class CifarSettings(experiment.Settings):
    """The CIFAR experiments' settings: experiment.Settings, and the data's and networks'."""
    metric: ClassVar[str] = "test_accuracy"
    experiment: str = setting("resnet20-cifar100", "resnet20-cifar100 (Table 2) or vgg11-cifar10 (section 3.3.4); "
                                                   "the other defaults follow it",
                              choices=("resnet20-cifar100", "vgg11-cifar10"))
    data: str = setting("", "the extracted folder (cifar-10-batches-py or cifar-100-python); empty: download "
                            "the archive into --root")
    root: str = setting("data", "where the downloaded archive is kept and extracted")
    val_fraction: float = setting(0.1, "share of the training set held out, fixed by --seed, to choose bo3 (ours)",
                                  valid=FRACTION)
    width: int = setting(16, "the network's first width (paper: ResNet20 16, VGG-11 64; smaller for quick checks)",
                         valid=AT_LEAST_1)
    teacher_files: tuple = setting((), "k state dicts (--teachers of them) to merge instead of training teachers "
                                       "(OTFusion's VGG-11 checkpoints load as they are)", nargs="+")


EXPERIMENTS = {
    "resnet20-cifar100": dict(
        out="runs/resnet20_cifar100", strategies="student,bo3,one,prune", runs=5, epochs=600, width=16,
        batch=128, lr=0.1, weight_decay=1e-4, gate_lr=0.2, lambda_start=0.05, lambda_step=0.05, paper_epochs=600,
        drops_teacher=(1 / 2, 3 / 4), drops_importance=(1 / 2, 0.7), drops_finetune=(1 / 2, 3 / 4),
        drops_one=(1 / 2, 3 / 4)),
    "vgg11-cifar10": dict(
        # ours: the paper merges two given teachers; here they are trained for 200 epochs each,
        # so that the budget is 600 as for ResNet20 (importance 100 and fine-tuning 100, the paper's)
        out="runs/vgg11_cifar10", strategies="student,fusion", runs=1, epochs=600, width=64,
        batch=128, lr=0.05, weight_decay=5e-4, gate_lr=0.2, lambda_start=0.01, lambda_step=0.01, paper_epochs=600,
        drops_teacher=(1 / 2, 3 / 4), drops_importance=(1 / 2, 0.7), drops_finetune=(1 / 2, 3 / 4),
        drops_one=(1 / 2, 3 / 4)),
}
NETWORKS = {"resnet20-cifar100": ("cifar100", "ResNet20 on CIFAR-100", "Table 2", merge.resnet20),
            "vgg11-cifar10": ("cifar10", "VGG-11 on CIFAR-10", "section 3.3.4", merge.vgg11)}
FUSION_NOTE = ("\nfusion is our baseline, Git Re-Basin's weight matching then averaging and the student's fine-tuning "
               "(merge.py). Table 3's fusion rows, OTFusion and GAMF, are quoted from other papers and were not rerun "
               "here: do not compare this row with them.\n")


def parse(argv=None):
    """CifarSettings from the command line, the defaults those of --experiment."""
    return experiment.parse_with_presets(argv, CifarSettings(stack=0), "experiment", EXPERIMENTS, __doc__)


def check(s):
    experiment.check_settings(s)
    if s.experiment == "resnet20-cifar100" and s.stack:
        raise experiment.InputError("--stack 1 is for networks without BatchNorm; ResNet20 trains one model at a time")
    if s.teacher_files and (s.runs != 1 or len(s.teacher_files) != s.teachers):
        raise experiment.InputError(f"--teacher-files gives the {s.teachers} teachers (--teachers) of one run: pass "
                               f"{s.teachers} files and use --runs 1")


def load_teacher(path, model):
    """model with the weights of the state dict in path. A checkpoint that wraps it
    ({"model_state_dict": ...}) or names it differently (OTFusion's features.0.weight ...
    for our convs.0.weight ...) loads when its tensors have our shapes in our order."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no code runs
    except pickle.UnpicklingError:
        raise experiment.InputError(f"--teacher-files: {path} holds Python objects besides tensors; save its state dict "
                               "alone (torch.save(checkpoint['model_state_dict'], path)) and pass that") from None
    except Exception as e:  # noqa: BLE001 - missing, truncated, not a torch file: all one line
        raise experiment.InputError(f"--teacher-files: cannot read {path} ({type(e).__name__})") from None
    for key in ("model_state_dict", "state_dict"):
        if isinstance(state, dict) and key in state:
            state = state[key]
    ours, kind = model.state_dict(), type(model).__name__
    theirs = [(k, v) for k, v in state.items() if torch.is_tensor(v)] if isinstance(state, dict) else []
    if len(theirs) != len(ours):
        raise experiment.InputError(f"--teacher-files: {path} holds {len(theirs)} tensors, a {kind} {len(ours)}")
    for i, ((name, want), (their_name, got)) in enumerate(zip(ours.items(), theirs)):
        if got.shape != want.shape:
            raise experiment.InputError(f"--teacher-files: {path}: its tensor {i}, {their_name}, is {tuple(got.shape)} "
                                   f"where this {kind}'s {name} is {tuple(want.shape)} (another --width?)")
    model.load_state_dict(dict(zip(ours, (v for _, v in theirs))))
    return model


def run(s):
    check(s)
    dataset, title, table, network = NETWORKS[s.experiment]
    spec = DATASETS[dataset]
    folder = Path(s.data) if s.data else images.fetch(Path(s.root), spec["url"], dict(md5=spec["md5"]),
                                                      spec["folder"])
    d = load_cifar(folder, dataset, s.val_fraction, s.seed)
    experiment.log.info(f"{folder}: train {len(d['x_train'])}, validation {len(d['x_val'])}, test {len(d['x_test'])} images")
    make_teacher = lambda: network(spec["classes"], s.width)
    given = [load_teacher(path, make_teacher()) for path in s.teacher_files]  # all checked before writing
    data = images.image_data(d, experiment.resolve_device(s.device), augment=random_crop_flip)
    with experiment.locked(s) as out:
        given = given if experiment.ranks()[0] == 0 else []  # rank 0 writes
        for i, teacher in enumerate(given):  # the finished teacher phase that student() and fusion() load
            path = out / "phases" / f"teacher-{merge.phase_seed(experiment.run_seed(s.seed, 0), 'teacher', i)}.pt"
            experiment.save_whole(teacher.state_dict(), path)
        rows = experiment.run_experiment(s, title, lambda seed, device: data, make_teacher, images.accuracy_result)
        if "student" in s.strategies.split(","):  # each teacher gets rows of its own, as in Table 3
            rows = rows + [dict(run=r["run"], strategy=f"teacher {i}", test_accuracy=acc)
                           for r in rows if r["strategy"] == "student" for i, acc in enumerate(r["teachers_test"])]
            s = dataclasses.replace(s, strategies=",".join([f"teacher {i}" for i in range(s.teachers)] + [s.strategies]))
        images.report_accuracy(s, rows, f"{title}, {table}, {s.epochs} epochs per strategy",
                               f"box_{s.experiment.replace('-', '_')}.png", title,
                               FUSION_NOTE if "fusion" in s.strategies.split(",") else "")


def main(argv=None):
    experiment.main(argv, parse, run)


if __name__ == "__main__":
    main(sys.argv[1:])
