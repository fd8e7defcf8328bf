"""ImageNet streamed from disk (imagenet.py): images decoded with Pillow in DataLoader workers into uint8
crops, each batch jittered and normalised on the device; each rank its own shard of an epoch, under
DistributedDataParallel across GPUs and machines. The crops, jitter and checks are images.py's."""
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import merge
from experiment import InputError, log
from images import centre_crop, check_folder, check_images, color_jitter, crop_box, jitter_factors, opened, split

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's channel statistics

class Images(torch.utils.data.Dataset):
    """Images decoded with Pillow into uint8 (3, size, size) crops, with the colour jitter each is to get
    (jitter_factors; none for evaluation). For training, the authors' augmentation: a random resized crop
    of 8-100 % of the area (bicubic), a flip half the time, colour jitter 0.4 without hue, every draw fixed
    by (the epoch's seed, index), so that a resumed epoch sees the same images; for evaluation, the shorter
    side resized to size / 0.95, the centre crop. Normalising and jittering run on the batch, on the device
    (Streamed): a uint8 crop is a quarter of the floats' bytes to pass between processes."""

    def __init__(self, paths, labels, size, train):
        self.paths, self.labels, self.size, self.train, self.seed = paths, labels, size, train, 0

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        for j in range(i, i + len(self)):  # check_images found every file an image; one may still be cut short
            try:
                image, label = opened(self.paths[j % len(self)]), self.labels[j % len(self)]
                break
            except InputError as e:
                print(f"warning: {e}; the next image takes its place", file=sys.stderr, flush=True)
        factors = torch.zeros(4)
        if self.train:
            rng = np.random.default_rng([self.seed, i])
            left, top, w, h = crop_box(*image.size, rng, scale=(0.08, 1.0))
            image = image.resize((self.size, self.size), 3, box=(left, top, left + w, top + h))  # 3: bicubic
            image = image.transpose(0) if rng.random() < 0.5 else image  # 0: mirrored left to right
            factors = jitter_factors(rng, 0.4, hue=0.0)
        else:
            image = centre_crop(image, self.size, crop_pct=0.95)  # timm's crop_pct 0.95
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1), label, factors

class Streamed(merge.Data):
    """merge.Data whose batches stream from disk through DataLoaders: each rank reads its own shard of
    every training epoch (DistributedSampler, reshuffled from the seed), and evaluates whole splits."""

    def __init__(self, splits, s, rank, world, device):
        self.splits, self.s, self.rank, self.world, self._device = splits, s, rank, world, device
        self.metric, self.prepare = "accuracy", None
        self.mean, self.std = (torch.tensor(v, device=device) for v in (MEAN, STD))

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
        for i, (x, y, factors) in enumerate(loader):
            yield self.to_device(x, factors), y.to(self._device, non_blocking=True)
            if self.rank == 0 and (i + 1) % max(1, len(loader) // 10) == 0:
                seconds = time.time() - started
                log.info(f"    {i + 1}/{len(loader)} batches, {(i + 1) * size / seconds:.0f} "
                         f"images/s, {seconds / (i + 1) * (len(loader) - i - 1):.0f} s left in the epoch")
        if self.world > 1:  # BatchNorm's statistics: rank 0's on every rank, as timm's distribute_bn
            for buffer in self.trained.buffers():
                dist.broadcast(buffer, 0)

    def to_device(self, x, factors=None):
        """uint8 crops as normalised floats on the device, colour-jittered by factors if given."""
        x = x.to(self._device, non_blocking=True).float() / 255
        if factors is not None:
            x = color_jitter(x, factors=factors)
        x = (x - self.mean.view(1, 3, 1, 1)) / self.std.view(1, 3, 1, 1)
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
        for x, y, _ in self.loader(split, self.s.batch // self.world):
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
    """Fail loudly unless every rank holds the same weights: concatenation and compression run on every rank
    alike, and a rank that drifted would train another model."""
    flat = torch.cat([t.detach().float().flatten() for t in model.state_dict().values()])
    reference = flat.clone()
    dist.broadcast(reference, 0)
    largest = (flat - reference).abs().max()
    dist.all_reduce(largest, dist.ReduceOp.MAX)
    if largest > 0:
        raise RuntimeError(f"the ranks hold different weights (largest difference {largest.item():.3g})")

def streamed_folder(s, rank, world, device):
    """(Streamed train / validation / test splits of the folder --data, its number of classes), or one line
    saying what is wrong: --val-images training images, fixed by --seed, validate; val/ is the test set."""
    (paths, labels, classes), (test_paths, test_labels, _) = check_folder(Path(s.data))
    check_images(paths + test_paths)
    if s.val_images + s.batch > len(paths):
        raise InputError(f"--val-images {s.val_images} leaves fewer of the {len(paths)} training images than one "
                         f"batch of {s.batch}")
    train, val = split(len(paths), s.val_images, s.seed)
    pick = lambda idx, train: Images([paths[i] for i in idx], [labels[i] for i in idx], s.size, train)
    splits = dict(train=pick(train, True), val=pick(val, False), test=Images(test_paths, test_labels, s.size, False))
    log.info(f"{s.data}: {len(classes)} classes; train {len(train)}, validation {len(val)}, test {len(test_paths)} "
             f"images; {world} rank(s), batch {s.batch // world} each on {device}")
    return Streamed(splits, s, rank, world, device), len(classes)
