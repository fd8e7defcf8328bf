"""CIFAR experiments of section 3.3: ResNet20 on CIFAR-100 against channel pruning (Table 2) and VGG-11 on
CIFAR-10 against model fusion (Table 3), with the method, architectures and strategies of merge.py, the
data of images.py and the settings of docs/settings.md.

The data: the official "python version" archives, downloaded with a progress bar, checked against their
published MD5 sums and extracted once, or --data DIR, the extracted folder (cifar-10-batches-py or
cifar-100-python) or the folder above it. The pickles are read with numpy; the images stay on the training
device as uint8, and each batch is normalised with the statistics of the data set in use (or --mean-std's),
cropped (32 with padding 4) and flipped there. A validation split, fixed by --seed, is held out from the training set to
choose bo3; the test set is used for the final numbers only.

    python cifar.py --experiment resnet20-cifar100   # student, bo3, one, prune: 5 runs x 600 epochs
    python cifar.py --experiment vgg11-cifar10       # student against fusion and its two teachers
    python cifar.py --experiment vgg11-cifar10 --teacher-files A.pt B.pt   # given teachers (state dicts)

Results go to --out as in merge.py: results.jsonl (one line per finished run and strategy; an interrupted
experiment resumes), summary.md (the rows of Tables 2 and 3), a box plot. `python cifar.py --experiment
vgg11-cifar10 --help` shows that experiment's defaults.
"""
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

if __name__ == "__main__":  # a command: Ctrl-C while torch loads gives one line (startup.py)
    import startup
    startup.before_torch()

import torch

import downloads
import experiment
import images
import launcher
import merge
import report
from experiment import AT_LEAST_1, FRACTION, InputError, setting

# The official archives (https://www.cs.toronto.edu/~kriz/cifar.html) and their published MD5 sums.
DATASETS = {
    "cifar10": dict(url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                    md5="c58f30108f718f92721af3b95e74349a", folder="cifar-10-batches-py", classes=10,
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"], labels=b"labels"),
    "cifar100": dict(url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                     md5="eb9058c3a382ffc7106e4002c42a8d85", folder="cifar-100-python", classes=100,
                     train=["train"], test=["test"], labels=b"fine_labels"),
}


def load_cifar(folder, dataset, val_fraction=0.1, seed=0):
    """The data set as uint8 arrays: train minus a validation split fixed by seed, and test; and the folder
    it was read from (folder, or the extracted one in it)."""
    spec = DATASETS[dataset]
    images.check_data(folder)
    if (folder / spec["folder"]).is_dir():  # the folder the archive was extracted into, as torchvision's root
        folder = folder / spec["folder"]
    others = [d["folder"] for d in DATASETS.values() if d is not spec and any(  # it, or the folder above it
        (place / d["train"][0]).is_file() for place in (folder, folder / d["folder"]))]
    if others and not (folder / spec["train"][0]).is_file():
        other = next(name for name, network in NETWORKS.items() if DATASETS[network[0]]["folder"] == others[0])
        raise InputError(f"--data {folder}: no {spec['train'][0]}; this is or holds {others[0]}, the other data set: "
                         f"use --experiment {other}, or name the {spec['folder']} folder")
    if not (folder / spec["train"][0]).is_file():  # neither data set's files
        raise InputError(f"--data {folder}: no CIFAR pickle {spec['train'][0]}; name the extracted {spec['folder']} "
                         f"folder (of the archive {spec['url'].rsplit('/', 1)[1]}) or the folder above it")
    train = images.read_batches(folder, spec["train"], spec["labels"], spec["classes"])
    test = images.read_batches(folder, spec["test"], spec["labels"], spec["classes"])
    return dict(images.arrays(*train, *test, val_fraction, seed), folder=folder)


@dataclass
class CifarSettings(experiment.Settings):
    """The CIFAR experiments' settings: experiment.Settings, and the data's and networks'."""
    metric: ClassVar[str] = "test_accuracy"
    row_keys: ClassVar[tuple] = ("val_accuracy",)
    experiment: str = setting("resnet20-cifar100", "resnet20-cifar100 (Table 2) or vgg11-cifar10 (section 3.3.4); "
                                                   "the other defaults follow it",
                              choices=("resnet20-cifar100", "vgg11-cifar10"))
    data: str = setting("", "the extracted folder (cifar-10-batches-py or cifar-100-python) or the folder above "
                            "it; empty: download the archive into --root", type=images.folder_name)
    root: str = setting("data", "where the downloaded archive is kept and extracted", type=images.folder_name)
    val_fraction: float = setting(0.1, "share of the training set held out, fixed by --seed, to choose bo3 (ours)",
                                  valid=FRACTION)
    width: int = setting(16, "the network's first width (paper: ResNet20 16, VGG-11 64; smaller for quick checks)",
                         valid=AT_LEAST_1)
    teacher_files: tuple = setting((), "k state dicts (--teachers of them) to merge instead of training teachers "
                                       "(OTFusion's VGG-11 checkpoints load as they are)", nargs="+")
    mean_std: tuple = setting((), "the channels' 3 means, then 3 standard deviations, that normalise the images: "
                                  "those the --teacher-files were trained with (OTFusion's: 0.4914 0.4822 0.4465 "
                                  "0.2023 0.1994 0.2010); none: the training split's own (ours)", nargs=6, type=float,
                              metavar="X", valid=(lambda v: 0 < v < 1, "between 0 and 1"))


# lr / 10 "during half and three quarters of the training of one network" (3.3.3): the networks' phases. The
# importance phase's drops the paper names only for LeNet (none, 3.3.1), so here they are the authors'
# configuration's: after 50 and 70 of 100 epochs.
DROPS = dict(drops_teacher=(1 / 2, 3 / 4), drops_importance=(1 / 2, 0.7), drops_finetune=(1 / 2, 3 / 4),
             drops_one=(1 / 2, 3 / 4))
EXPERIMENTS = {  # docs/settings.md gives the source of every value
    "resnet20-cifar100": dict(out="runs/resnet20_cifar100", strategies="student,bo3,one,prune", runs=5, epochs=600,
                              width=16, batch=128, lr=0.1, weight_decay=1e-4, gate_lr=0.2, lambda_start=0.05,
                              lambda_step=0.05, paper_epochs=600, **DROPS),
    # DEVIATION: the paper merges two given teachers (Table 3); here they are trained for 200 epochs each unless
    # --teacher-files gives them, so that the budget is 600 as for ResNet20 (importance 100, fine-tuning 100)
    "vgg11-cifar10": dict(out="runs/vgg11_cifar10", strategies="student,fusion", runs=1, epochs=600, width=64,
                          batch=128, lr=0.05, weight_decay=5e-4, gate_lr=0.2, lambda_start=0.01, lambda_step=0.01,
                          paper_epochs=600, **DROPS),
}
NETWORKS = {"resnet20-cifar100": ("cifar100", "ResNet20", "Table 2", merge.resnet20),
            "vgg11-cifar10": ("cifar10", "VGG-11", "section 3.3.4", merge.vgg11)}
FUSION_NOTE = ("\nfusion is our baseline, Git Re-Basin's weight matching then averaging and the student's fine-tuning "
               "(merge.py). Table 3's fusion rows, OTFusion and GAMF, are quoted from other papers and were not rerun "
               "here: do not compare this row with them.\n")


def parse(argv=None):
    """CifarSettings from the command line, the defaults those of --experiment."""
    return experiment.parse_with_presets(argv, CifarSettings(stack="0"), "experiment", EXPERIMENTS, __doc__)


def check(s):
    experiment.check_settings(s)
    if s.experiment == "resnet20-cifar100":
        images.check_unstacked(s, "ResNet20")
    else:
        images.check_unstacked(s, "VGG-11", "its random crops are drawn for each model")
    if s.teacher_files and (s.runs != 1 or len(s.teacher_files) != s.teachers):
        raise InputError(f"--teacher-files gives the {s.teachers} teachers (--teachers) of one run: pass "
                         f"{s.teachers} files and use --runs 1")


def load_teacher(path, model):
    """model with the weights of the state dict in path. A checkpoint that wraps it ({"model_state_dict": ...})
    or names it differently (OTFusion's features.0.weight ... for our convs.0.weight ...) loads when its
    tensors have our shapes in our order."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no code runs
    except FileNotFoundError:
        raise InputError(f"--teacher-files: no such file {path}") from None
    except OSError as e:  # a folder, a file not readable
        raise InputError(f"--teacher-files: cannot read {path} ({e.strerror})") from None
    except Exception as e:  # noqa: BLE001 - truncated, not a torch file, objects: all one line
        if isinstance(e, pickle.UnpicklingError) and "Unsupported global" in str(e):  # weights_only refused an object
            raise InputError(f"--teacher-files: {path} holds Python objects besides tensors; save its state dict "
                             "alone (torch.save(checkpoint['model_state_dict'], path)) and pass that") from None
        raise InputError(f"--teacher-files: {path} is not a file torch.save wrote, or one cut short "
                         f"({type(e).__name__} while reading it)") from None
    for key in ("model_state_dict", "state_dict"):
        if isinstance(state, dict) and key in state:
            state = state[key]
    ours, kind = model.state_dict(), type(model).__name__
    theirs = [(k, v) for k, v in state.items() if torch.is_tensor(v)] if isinstance(state, dict) else []
    if len(theirs) != len(ours):
        raise InputError(f"--teacher-files: {path} holds {len(theirs)} tensors where a {kind}'s state dict has "
                         f"{len(ours)}")
    for i, ((name, want), (their_name, got)) in enumerate(zip(ours.items(), theirs)):
        if got.shape != want.shape:
            raise InputError(f"--teacher-files: {path}: its tensor {i}, {their_name}, is {tuple(got.shape)} where "
                             f"this {kind}'s {name} is {tuple(want.shape)} (another --width?)")
    model.load_state_dict(dict(zip(ours, (v for _, v in theirs))))
    return model


def run(s):
    check(s)
    dataset, network_name, table, network = NETWORKS[s.experiment]
    spec = DATASETS[dataset]
    make_teacher = lambda: network(spec["classes"], s.width)
    given = [load_teacher(path, make_teacher()) for path in s.teacher_files]  # checked before any download or write
    folder = Path(s.data) if s.data else downloads.fetch(Path(s.root), spec["url"], dict(md5=spec["md5"]), spec["folder"])
    d = load_cifar(folder, dataset, s.val_fraction, s.seed)
    folder = d["folder"]  # the extracted folder, where --data named the one above it
    experiment.log.info(f"{folder}: train {len(d['x_train'])}, validation {len(d['x_val'])}, test {len(d['x_test'])} images")
    if given and not s.mean_std:  # a given teacher sees its inputs as it was trained to only with its statistics
        experiment.log.info("note: --teacher-files without --mean-std: the images are normalised with this training "
                            "split's statistics, which may not be those the teachers were trained with")
    data = images.image_data(d, experiment.resolve_device(s), augment=images.random_crop_flip, stats=s.mean_std)
    title = f"{network_name} on {folder.name}"  # titled by the data it ran on
    with experiment.locked(s) as out:
        given = given if experiment.ranks()[0] == 0 else []  # rank 0 writes
        for i, teacher in enumerate(given):  # the finished teacher phase that student() and fusion() load
            path = out / "phases" / f"teacher-{merge.phase_seed(experiment.run_seed(s.seed, 0), 'teacher', i)}.pt"
            report.save_whole(teacher.state_dict(), path)
        rows = experiment.run_experiment(s, title, lambda seed, device: data, make_teacher, images.accuracy_result)
        if s.teacher_files:  # trained elsewhere, for epochs unknown here: not in the epochs and multiply-adds counted
            rows = [dict(r, compute={phase: c for phase, c in r["compute"].items() if phase != "teacher"})
                    for r in rows]
        strategies = s.strategies.split(",")
        if "student" in strategies:  # each teacher gets rows of its own, as in Table 3
            rows = rows + [dict(run=r["run"], strategy=f"teacher {i}", test_accuracy=acc)
                           for r in rows if r["strategy"] == "student" for i, acc in enumerate(r["teachers_test"])]
            strategies = [f"teacher {i}" for i in range(s.teachers)] + strategies
        per = f"{s.epochs} epochs per strategy" + (", the given teachers' training not counted" if s.teacher_files else "")
        images.report_accuracy(s, rows, strategies, f"{title} (the paper's {table}), {per}",
                               f"box_{s.experiment.replace('-', '_')}.png", title,
                               FUSION_NOTE if "fusion" in strategies else "")


def main(argv=None):
    launcher.guard()  # a rank under torchrun ends quietly on SIGTERM
    experiment.main(argv, parse, run)


if __name__ == "__main__":
    main(sys.argv[1:])
