"""ImageNet-1k, section 3.3.5 and Table 4: ResNet18 merged from two teachers of 20 epochs each (then
20 epochs of importance and 90 of fine-tuning), against one model trained for 90 epochs and one for
150, with the settings of the authors' scripts (REFERENCE.md). The images are streamed from disk,
decoded with Pillow in DataLoader workers, and training runs on any number of GPUs and machines
under torchrun (DistributedDataParallel: NCCL between GPUs, gloo on CPUs).

    python imagenet.py --data DIR                          # one process: one GPU (or the CPU)
    torchrun --nproc-per-node 8 imagenet.py --data DIR     # the 8 GPUs of one machine
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        imagenet.py --data DIR                             # on each of 2 machines: 16 GPUs

DIR is the ImageFolder layout: DIR/train/<wnid>/*.JPEG and DIR/val/<wnid>/*.JPEG (README.md says
how to sort the official val images into class folders); val is the test set, and 10,000 training
images, fixed by --seed, are held out to validate. --batch is the global batch, split over the
ranks; the lr is for a batch of 256 and scales linearly (ours). Results go to --out as in the other
scripts (rank 0 alone writes): results.jsonl with top-1 and top-5 test accuracy, summary.md with
Table 4's rows, a box plot; every epoch ends with a checkpoint, so that a killed job resumes at its
last finished epoch. --out must be on a file system that every machine sees.
"""
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import experiment
import merge
import report
from experiment import AT_LEAST_1, setting

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's channel statistics
EXTENSIONS = {".jpg", ".jpeg", ".png"}


# == Images: listed once, decoded and transformed in the loader's workers ========================

def list_folder(folder):
    """(paths, labels, classes) of folder/<class>/<image>, classes sorted, as ImageFolder lists them."""
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir()) if folder.is_dir() else []
    paths, labels = [], []
    for label, name in enumerate(classes):
        mine = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in EXTENSIONS and p.is_file())
        paths, labels = paths + mine, labels + [label] * len(mine)
    return paths, labels, classes

def random_resized_crop(image, rng, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop(size, scale, ratio) with bicubic resizing, its draws from rng:
    a crop of area share in scale and aspect ratio in ratio (ten tries), else the centre crop."""
    w, h = image.size
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            return image.resize((size, size), 3, box=(left, top, left + cw, top + ch))  # 3: bicubic
    cw, ch = w, h  # the centre crop, its aspect ratio clamped into ratio
    if w / h < ratio[0]:
        ch = round(w / ratio[0])
    elif w / h > ratio[1]:
        cw = round(h * ratio[1])
    box = ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)
    return image.resize((size, size), 3, box=box)

class Images(torch.utils.data.Dataset):
    """Images decoded with Pillow, as floats (3, size, size) normalised with ImageNet's statistics.
    For training, the authors' augmentation (REFERENCE.md): a random resized crop, a flip half the
    time and colour jitter 0.4, their draws fixed by (the epoch's seed, index), so that a resumed epoch
    sees the same images; for evaluation, the shorter side resized to size / 0.95, the centre crop."""

    def __init__(self, paths, labels, size, train):
        self.paths, self.labels, self.size, self.train, self.seed = paths, labels, size, train, 0

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image, ImageEnhance, ImageOps
        with Image.open(self.paths[i]) as image:
            image = image.convert("RGB")
        if self.train:
            rng = np.random.default_rng([self.seed, i])
            image = random_resized_crop(image, rng, self.size)
            image = ImageOps.mirror(image) if rng.random() < 0.5 else image
            for enhance in rng.permutation([ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]):
                image = enhance(image).enhance(rng.uniform(0.6, 1.4))  # colour jitter 0.4
        else:
            scale = self.size / 0.95 / min(image.size)  # timm's crop_pct 0.95
            image = image.resize((max(self.size, round(image.width * scale)),
                                  max(self.size, round(image.height * scale))), 3)
            left, top = (image.width - self.size) // 2, (image.height - self.size) // 2
            image = image.crop((left, top, left + self.size, top + self.size))
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
        return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1), self.labels[i]

class Streamed(merge.Data):
    """merge.Data whose batches stream from disk through DataLoaders: each rank reads its own shard of
    every training epoch (DistributedSampler, reshuffled from the seed), and evaluates whole splits."""

    def __init__(self, splits, s, rank, world, device):
        self.splits, self.s, self.rank, self.world, self._device = splits, s, rank, world, device
        self.metric, self.prepare = "accuracy", None

    device = property(lambda self: self._device)
    size = property(lambda self: len(self.splits["train"]))
    example = property(lambda self: torch.zeros(1, 3, self.s.size, self.s.size, device=self._device))

    def loader(self, split, batch, sampler=None):
        return torch.utils.data.DataLoader(self.splits[split], batch, sampler=sampler, num_workers=self.s.workers,
                                           pin_memory=self._device.type == "cuda", drop_last=sampler is not None)

    def batches(self, size):
        """The training batches of this rank, size / world images each, in an order and with augmentation
        drawn from torch's generator (merge.fit seeds it alike on every rank); progress on rank 0."""
        train = self.splits["train"]
        train.seed = int(torch.randint(2 ** 62, ()))  # the sampler's and the augmentation's seed for this epoch
        sampler = torch.utils.data.DistributedSampler(train, self.world, self.rank, seed=train.seed, drop_last=True)
        loader, started = self.loader("train", size // self.world, sampler), time.time()
        for i, (x, y) in enumerate(loader):
            yield self.to_device(x), y.to(self._device, non_blocking=True)
            if self.rank == 0 and (i + 1) % max(1, len(loader) // 10) == 0:
                seconds = time.time() - started
                experiment.log.info(f"    {i + 1}/{len(loader)} batches, {(i + 1) * size / seconds:.0f} "
                               f"images/s, {seconds / (i + 1) * (len(loader) - i - 1):.0f} s left in the epoch")
        if self.world > 1:  # BatchNorm's statistics: rank 0's on every rank, as timm's distribute_bn
            for buffer in self.trained.buffers():
                dist.broadcast(buffer, 0)

    def to_device(self, x):
        x = x.to(self._device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self._device.type == "cuda" else x

    def wrap(self, model):
        """Channels-last and bf16 autocast on GPUs; DDP across ranks, once the ranks' weights agree."""
        self.trained = model
        if self._device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        if self.world > 1:
            same_on_every_rank(model)
            model = nn.parallel.DistributedDataParallel(model, [self._device] if self._device.type == "cuda" else None)
        return Autocast(model) if self._device.type == "cuda" else model

    @torch.no_grad()
    def accuracies(self, model, split, top=(1, 5)):
        """Top-1 and top-5 accuracy of the model on a whole split, here on every rank alike."""
        model.eval()
        right, count = torch.zeros(len(top), device=self._device), 0
        for x, y in self.loader(split, self.s.batch // self.world):
            with torch.autocast(self._device.type, torch.bfloat16, enabled=self._device.type == "cuda"):
                logits = model(self.to_device(x))
            best = logits.topk(min(max(top), logits.shape[1]), 1).indices  # top-5 of fewer classes: all of them
            y = y.to(self._device)
            right += torch.stack([(best[:, :k] == y[:, None]).any(1).sum() for k in top])
            count += len(y)
        return (right / count).tolist()

    def evaluate(self, model, split="test"):
        return self.accuracies(model, split, top=(1,))[0]

class Autocast(nn.Module):
    """The model under bf16 autocast (mixed precision), its outputs back in float32."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        with torch.autocast("cuda", torch.bfloat16):
            return self.model(x).float()

def same_on_every_rank(model):
    """Fail loudly unless every rank holds the same weights: concatenation and compression run on
    every rank alike, and a rank that drifted would train another model."""
    flat = torch.cat([t.detach().float().flatten() for t in model.state_dict().values()])
    reference = flat.clone()
    dist.broadcast(reference, 0)
    largest = (flat - reference).abs().max()
    dist.all_reduce(largest, dist.ReduceOp.MAX)
    if largest > 0:
        raise RuntimeError(f"the ranks hold different weights (largest difference {largest.item():.3g})")

def load_imagenet(s, rank, world, device):
    """Streamed train / validation / test splits of --data, or one line saying what is wrong."""
    data = Path(s.data)
    paths, labels, classes = list_folder(data / "train")
    test_paths, test_labels, test_classes = list_folder(data / "val")
    if not paths or not test_paths:
        raise experiment.InputError(f"--data {data}: train/<class>/ and val/<class>/ must hold .JPEG images (README.md "
                               "says how to sort ImageNet's val images into class folders)")
    if classes != test_classes:
        raise experiment.InputError(f"--data {data}: train and val have different classes")
    if s.val_images + s.batch > len(paths):
        raise experiment.InputError(f"--val-images {s.val_images} leaves fewer of the {len(paths)} training images than "
                               f"one batch of {s.batch}")
    order = np.random.default_rng(s.seed).permutation(len(paths))
    pick = lambda idx, train: Images([paths[i] for i in idx], [labels[i] for i in idx], s.size, train)
    splits = dict(train=pick(order[s.val_images:], True), val=pick(order[:s.val_images], False),
                  test=Images(test_paths, test_labels, s.size, False))
    experiment.log.info(f"{data}: {len(classes)} classes; train {len(splits['train'])}, validation {s.val_images}, "
                   f"test {len(test_paths)} images; {world} rank(s), batch {s.batch // world} each on {device}")
    return Streamed(splits, s, rank, world, device), len(classes)


# == The protocol of section 3.3.5, with the authors' settings (REFERENCE.md) ====================

@dataclass
class ImageNetSettings(experiment.Settings):
    """ImageNet's settings: experiment.Settings and its own. The phases are given explicitly."""
    metric: ClassVar[str] = "test_accuracy"
    data: str = setting("", "the ImageNet folder: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (no download: "
                            "ImageNet needs a registration)")
    workers: int = setting(8, "DataLoader workers a rank, decoding the images", run_only=True,
                           valid=experiment.NOT_NEGATIVE)
    val_images: int = setting(10_000, "training images held out, fixed by --seed, to validate (ours)",
                              valid=AT_LEAST_1)
    size: int = setting(224, "input side in pixels", valid=(lambda v: v >= 16, "at least 16"))
    width: int = setting(64, "ResNet18's first-stage width (paper: 64; smaller only for quick checks)",
                         valid=AT_LEAST_1)
    short: int = setting(90, "epochs of the second, shorter one model (Table 4: 90; the other has all 150)",
                         valid=AT_LEAST_1)
    phase_epochs: tuple = setting((20, 20, 90, 50, 150), "epochs of the teachers (each), importance, fine-tuning, "
                                  "bo3 models (unused) and one model (section 3.3.5)", nargs=5, type=int,
                                  metavar="EPOCHS")

PAPER = dict(
    out="runs/imagenet", runs=1, epochs=150, strategies="student,one", batch=256, lr=0.1, momentum=0.9,
    weight_decay=1e-4, gate_lr=0.2, lambda_start=0.3, lambda_step=0.2, stack=0,
    paper_epochs=120,  # the importance phase is the paper's own (120 / 6 = 20): lambda is not rescaled
    finetune_lr=0.07, finetune_warmup=2,  # fine-tuning from lr 0.07 after 2 warm-up epochs
    drops_teacher=(9 / 20, 18 / 20), drops_importance=(), drops_finetune=(1 / 3, 2 / 3), drops_one=(1 / 3, 2 / 3))

def parse(argv=None):
    return experiment.parse_settings(argv, ImageNetSettings(**PAPER), __doc__)

def result(model, data):
    top1, top5 = data.accuracies(model, "test")
    return dict(test_accuracy=round(top1, 6), test_top5=round(top5, 6),
                val_accuracy=round(data.evaluate(model, "val"), 6))

def run(s):
    experiment.check_settings(s)
    rank, world = experiment.ranks()
    if s.batch % world or s.stack:
        raise experiment.InputError(f"--batch {s.batch} must split evenly over {world} ranks, and --stack must be 0")
    cuda = experiment.resolve_device(s.device) == "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    data, classes = load_imagenet(s, rank, world, device)
    scaled = dataclasses.replace(s, lr=s.lr * s.batch / 256, finetune_lr=s.finetune_lr * s.batch / 256)  # (ours)
    short = dataclasses.replace(scaled, out=str(Path(s.out) / "one_short"), strategies="one",
                                phase_epochs=s.phase_epochs[:4] + (s.short,))
    make_teacher = lambda: merge.resnet18(classes, s.width)
    rows = []
    for settings, title in ((scaled, "ResNet18 on ImageNet"), (short, f"one model of {s.short} epochs")):
        with experiment.locked(settings):
            rows.append(experiment.run_experiment(settings, title, lambda seed, device: data, make_teacher, result,
                                                  wrap=data.wrap,
                                                  replicas=True))
    if rank == 0:
        write_report(s, rows[0] + [dict(r, strategy=f"one, {s.short} epochs") for r in rows[1]])

def write_report(s, rows):
    """summary.md with Table 4's rows (top-1 and top-5 test accuracy) and the box plot."""
    b = merge.budget(s)
    label = {"one": f"one, {b['one']} epochs"}
    rows = [dict(r, strategy=label.get(r["strategy"], r["strategy"])) for r in rows]
    names = [label.get(name, name) for name in s.strategies.split(",")] + [f"one, {s.short} epochs"]
    table = report.summarize(rows, "test_accuracy", names, extra={
        "top-5 (mean)": lambda mine: f"{np.mean([r['test_top5'] for r in mine]):.4f}"})
    text = (f"# ResNet18 on ImageNet, Table 4: top-1 test accuracy over {s.runs} run(s); the student's epochs: "
            f"{s.teachers} x {b['teacher']} teachers, {b['importance']} importance, {b['finetune']} fine-tuning"
            f"\n\n{table}\n")
    experiment.write_whole(Path(s.out) / "summary.md", text)
    print(text)
    report.plot_box(rows, "test_accuracy", names, Path(s.out) / "box_imagenet.png", "ResNet18 on ImageNet, top-1")

def main(argv=None):
    experiment.main(argv, parse, run)


if __name__ == "__main__":
    main(sys.argv[1:])
