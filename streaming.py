"""ImageNet streamed from disk (imagenet.py): images decoded with Pillow in DataLoader workers into uint8
crops, each batch jittered and normalised on the device; each rank its own shard of an epoch, under
DistributedDataParallel across GPUs and machines. The crops, jitter and checks are images.py's."""
import contextlib
import hashlib
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import merge
import report
import startup
from experiment import InputError, log
from images import (centre_crop, check_folder, check_images, color_jitter, crop_box, jitter_factors, opened,
                    resized_side, split)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's channel statistics

class Images(torch.utils.data.Dataset):
    """Images decoded with Pillow into uint8 (3, size, size) crops, with the colour jitter each is to get
    (jitter_factors; none for evaluation). For training, the authors' augmentation: a random resized crop
    of 8-100 % of the area (bicubic), a flip half the time, colour jitter 0.4 without hue, every draw fixed
    by (the epoch's seed, index), so that a resumed epoch sees the same images; for evaluation, the shorter
    side resized to size / 0.95 rounded down, the centre crop. A JPEG decodes at the smallest of 1, 1/2, 1/4 and 1/8 of
    its size that keeps the crop at size x size pixels or more (Pillow's draft). Normalising and jittering
    run on the batch, on the device (Streamed): a uint8 crop is a quarter of the floats' bytes to pass
    between processes. With raw (--decode gpu), a whole RGB JPEG is handed over undecoded (undecoded)."""

    def __init__(self, paths, labels, size, train, raw=False):
        self.paths, self.labels, self.size, self.train, self.seed, self.raw = paths, labels, size, train, 0, raw

    def __len__(self):
        return len(self.paths)

    def draws(self, w, h, rng):
        """A training image's augmentation, drawn from rng for its size on disk: (crop box, flip, jitter factors)."""
        return crop_box(w, h, rng, scale=(0.08, 1.0)), rng.random() < 0.5, jitter_factors(rng, 0.4, hue=0.0)

    def __getitem__(self, i):
        n, drawn = len(self), []

        # DEVIATION: a JPEG decodes at a smaller scale where its crop keeps full resolution (Pillow's draft), some
        # times faster; its pixels differ a little from a full decode's (the authors' loader decoded in full)
        def at_least(w, h):  # the draws, for the size on disk, then the size to decode to: the crop keeps
            if not self.train:  # size x size pixels or more (a JPEG decodes at 1/2, 1/4, 1/8 where it can)
                return (side * resized_side(self.size, 0.95) / min(w, h) for side in (w, h))
            drawn.append(self.draws(w, h, rng))
            return w * self.size / drawn[-1][0][2], h * self.size / drawn[-1][0][3]
        for j in range(i, i + n):  # check_images found every file an image; one may still be cut short
            rng = np.random.default_rng([self.seed, i])
            try:
                if self.raw and (item := self.undecoded(self.paths[j % n], rng)):
                    return item + (self.labels[j % n],)
                (image, (w, h)), label = opened(self.paths[j % n], at_least), self.labels[j % n]
                break
            except InputError as e:
                print(f"warning: {e}; the next image takes its place", file=sys.stderr, flush=True)
        factors = torch.zeros(4)
        if self.train:
            (left, top, cw, ch), flip, factors = drawn[-1]
            x, y = image.width / w, image.height / h  # the decoder's scale (draft)
            image = image.resize((self.size, self.size), 3, box=(left * x, top * y, (left + cw) * x, (top + ch) * y))
            image = image.transpose(0) if flip else image  # 3: bicubic; 0: mirrored left to right
        else:
            image = centre_crop(image, self.size, crop_pct=0.95)  # timm's crop_pct 0.95
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return (pixels, torch.zeros(6, dtype=torch.int64), factors, label) if self.raw else (pixels, label, factors)

    def undecoded(self, path, rng):
        """--decode gpu: (a whole RGB JPEG's bytes, (width, height, left, top, crop width, crop height), flip,
        jitter factors), the same draws as Pillow's crop; decoded and cropped on the GPU (Streamed.decoded).
        None for another image (PNG, CMYK, grey, cut short: no end marker), which the worker decodes."""
        from PIL import Image
        try:
            with Image.open(path) as image:
                (w, h), whole_jpeg = image.size, image.format == "JPEG" and image.mode == "RGB"
            data = Path(path).read_bytes() if whole_jpeg else b""
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # as opened() says it
            raise InputError(f"cannot read image {path}: {e}") from None
        if not data.endswith(b"\xff\xd9"):
            return None
        if self.train:
            box, flip, factors = self.draws(w, h, rng)  # as Pillow's path draws them
        else:  # the square that centre_crop's resize and crop keep, in the image's own pixels
            side = min(w, h, round(min(w, h) * self.size / resized_side(self.size, 0.95)))
            box, flip, factors = ((w - side) // 2, (h - side) // 2, side, side), False, torch.zeros(4)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), torch.tensor((w, h, *box)), factors, flip

def collate_raw(items):
    """A batch of Images.undecoded items (and of crops the workers decoded): ((JPEGs' bytes and the crops'
    pixels, all in one tensor, a worker's batch passed between processes at once; sizes and boxes (B, 6);
    flips (B,)), labels (B,), factors (B, 4))."""
    data, boxes, factors, flips, labels = zip(*[item if len(item) == 5 else (item[0], item[1], item[2], False, item[3])
                                                for item in items])
    lengths = torch.tensor([d.numel() for d in data])
    return ((torch.cat([d.flatten() for d in data]), lengths, torch.stack(boxes), torch.tensor(flips)),
            torch.tensor(labels), torch.stack(factors))

def has_torchvision():
    """Whether torchvision loads beside this torch, with the decode_jpeg --decode gpu needs."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg  # noqa: F401 - only whether they load beside this torch
        return True
    except Exception:  # noqa: BLE001 - missing, or built for another torch
        return False

class Streamed(merge.Data):
    """merge.Data whose batches stream from disk through DataLoaders: each rank reads its own shard of
    every training epoch (DistributedSampler, reshuffled from the seed), and evaluates every world-th image of a
    split, the counts summed over the ranks."""

    def __init__(self, splits, s, rank, world, device):
        self.splits, self.s, self.rank, self.world, self._device = splits, s, rank, world, device
        self.metric, self.prepare, self.said_one_at_a_time = "accuracy", None, False
        self.mean, self.std = (torch.tensor(v, device=device) for v in (MEAN, STD))
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None  # where prepared readies batches

    device = property(lambda self: self._device)
    size = property(lambda self: len(self.splits["train"]))
    example = property(lambda self: torch.zeros(1, 3, self.s.size, self.s.size, device=self._device))

    def loader(self, split, batch, sampler=None):
        return torch.utils.data.DataLoader(self.splits[split], batch, sampler=sampler,
                                           num_workers=loader_workers(self.s),
                                           pin_memory=self._device.type == "cuda" and not self.splits[split].raw,
                                           drop_last=split == "train",  # validation and test: every image
                                           collate_fn=collate_raw if self.splits[split].raw else None)

    def batches(self, size):
        """The training batches of this rank, size / world images each, in an order and with augmentation
        drawn from torch's generator (merge.fit seeds it alike on every rank); progress on rank 0."""
        train = self.splits["train"]
        train.seed = int(torch.randint(2 ** 62, ()))  # the sampler's and the augmentation's seed for this epoch
        sampler = torch.utils.data.DistributedSampler(train, self.world, self.rank, seed=train.seed, drop_last=True)
        loader, started = self.loader("train", size // self.world, sampler), time.time()
        for i, (x, y) in enumerate(self.prepared(loader, jitter=True)):
            yield x, y
            if self.rank == 0 and (i + 1) % max(1, len(loader) // 10) == 0:
                seconds = time.time() - started
                log.info(f"    {i + 1}/{len(loader)} batches, {(i + 1) * size / seconds:.0f} images/s, "
                         f"{report.duration(seconds / (i + 1) * (len(loader) - i - 1))} left in the epoch")
        # DEVIATION: BatchNorm's statistics are rank 0's on every rank (torchvision's recipe saves rank 0's); the
        # authors' timm configuration averaged them over the ranks
        if self.world > 1:
            with torch.no_grad():  # a pruning mask, a buffer that learns a gradient, stays a leaf (its hook runs)
                for buffer in self.trained.buffers():
                    dist.broadcast(buffer, 0)

    def prepared(self, loader, jitter=False):
        """(x, y) of each of the loader's batches, on the device (to_device; colour-jittered with jitter): the
        next batch made ready in a thread while the caller trains on this one, on a GPU on a CUDA stream of its
        own, so that the host's share of it (--decode gpu's decoding and cropping, launching the kernels) runs
        beside the training step, not between two steps; the loader's batches are fetched here, as before."""
        cuda = self._device.type == "cuda"

        def ready(x, y, factors):  # in the thread
            with torch.cuda.stream(self.side) if cuda else contextlib.nullcontext():
                x, y = self.to_device(x, y, factors if jitter else None)
            return x, y, self.side.record_event() if cuda else None  # done: an event after the batch's work

        def take(pending):  # in the caller's thread: its stream waits for this batch, and keeps its memory
            x, y, done = pending.result()
            if cuda:
                current = torch.cuda.current_stream(self._device)
                current.wait_event(done)
                x.record_stream(current), y.record_stream(current)
            return x, y
        # the thread on this rank's GPU: a new thread's is GPU 0, where every rank would then open a CUDA context
        with ThreadPoolExecutor(1, initializer=torch.cuda.set_device if cuda else None, initargs=(
                self._device.index if self._device.index is not None else torch.cuda.current_device(),) if cuda
                else ()) as executor:
            pending = None
            for batch in loader:
                upcoming = executor.submit(ready, *batch)
                if pending:
                    yield take(pending)
                pending = upcoming
            if pending:
                yield take(pending)

    def to_device(self, x, y, factors=None):
        """(uint8 crops, or raw JPEGs decoded, as normalised floats colour-jittered by factors; their labels),
        on the device, on the current stream."""
        if isinstance(x, tuple):
            x, source = self.decoded(*x)
            y = y[source]  # an image the GPU could not decode: another's in its place, with its label
        else:
            x = x.to(self._device, non_blocking=True).float() / 255
        if factors is not None:
            x = color_jitter(x, factors=factors.to(self._device, non_blocking=True))
        x = (x - self.mean.view(1, 3, 1, 1)) / self.std.view(1, 3, 1, 1)
        x = x.contiguous(memory_format=torch.channels_last) if self._device.type == "cuda" else x
        return x, y.to(self._device, non_blocking=True)

    def decoded(self, data, lengths, boxes, flips):
        """--decode gpu: (a batch of collate_raw's as floats in [0, 1] (B, 3, size, size) on the GPU, the index of
        the image in each place): its JPEGs decoded in one call (torchvision's decode_jpeg, nvJPEG), each
        cropped, resized (bicubic, antialiased) and flipped there (on prepared's stream, beside training). One
        the GPU cannot decode is decoded by the CPU; one neither can (its data damaged) gives way to the next
        image of the batch, with a warning."""
        from torchvision.io import ImageReadMode, decode_jpeg

        def one(d):  # a JPEG on the GPU, else on the CPU, else None
            for device in (self._device, "cpu"):
                try:
                    return decode_jpeg(d, mode=ImageReadMode.RGB, device=device).to(self._device)
                except Exception:  # noqa: BLE001 - nvJPEG or libjpeg refused it
                    if cuda and device is self._device:  # once a failed decoding, if any began, stopped writing
                        torch.cuda.synchronize(self._device)
                    continue
            return None
        data, size = data.split(lengths.tolist()), self.s.size
        jpegs = [d for d, box in zip(data, boxes.tolist()) if box[0]]
        cuda = self._device.type == "cuda"
        if jpegs and cuda:  # torchvision decodes on a stream of its own, without waiting for this one, into memory
            torch.cuda.current_stream(self._device).synchronize()  # taken on this one, which this stream's queued
            # kernels (an earlier batch's) may still use: the GPU check found batches so changed (pytorch/vision#9606)
        try:
            images = iter(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self._device) if jpegs else [])
        except Exception as e:  # noqa: BLE001 - one of them the GPU cannot decode: each alone
            if cuda:  # once the failed call's decoding, if any began, has stopped writing
                torch.cuda.synchronize(self._device)
            if not self.said_one_at_a_time:  # once: where every batch fails (no nvJPEG, say), each is slower
                print(f"note: a batch's JPEGs could not be decoded in one call ({type(e).__name__}: {str(e)[:100]}); "
                      "such batches' JPEGs are then decoded one at a time (on the GPU, else the CPU), slower; "
                      "said once", file=sys.stderr, flush=True)
                self.said_one_at_a_time = True
            images = iter([one(d) for d in jpegs])
        crops = []
        for d, (w, h, left, top, cw, ch), flip in zip(data, boxes.tolist(), flips.tolist()):
            image = next(images) if w else d.view(3, size, size).to(self._device, non_blocking=True)
            if image is None or not w:  # not decoded; or decoded, cropped and flipped by the worker
                crops.append(image if image is None else image.unsqueeze(0).float())
                continue
            crop = image[:, top:top + ch, left:left + cw].unsqueeze(0).float()
            crop = F.interpolate(crop, (size, size), mode="bicubic", align_corners=False, antialias=True)
            crops.append(crop.flip(3) if flip else crop)
        source = [next(j % len(crops) for j in range(i, i + len(crops)) if crops[j % len(crops)] is not None)
                  for i in range(len(crops))]
        if source != list(range(len(crops))):
            print(f"warning: {sum(c is None for c in crops)} JPEG(s) of a batch could not be decoded; the next "
                  "image of the batch takes each place", file=sys.stderr, flush=True)
        x = (torch.cat([crops[j] for j in source]) / 255).clamp(0, 1)
        return x, torch.tensor(source)

    def wrap(self, model):
        """Channels-last and bf16 autocast on GPUs; DDP across ranks, once the ranks' weights agree."""
        self.trained = model
        if self._device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        if self.world > 1:
            same_on_every_rank(model)
            for mask in (buffer for buffer in model.buffers() if buffer.requires_grad):  # pruning's (merge.Mask)
                mask.register_hook(averaged_over_ranks)  # DDP averages the parameters' gradients, not a buffer's
            model = nn.parallel.DistributedDataParallel(model, [self._device] if self._device.type == "cuda" else None)
        # DEVIATION: bf16 autocast, the authors' float16 (bf16 has float32's range: no loss scaling to tune)
        return Autocast(model) if self._device.type == "cuda" else model

    @torch.no_grad()
    def accuracies(self, model, split, top=(1, 5)):
        """Top-1 and top-5 accuracy of the model on a whole split: each rank counts every world-th image, and the
        counts are summed over the ranks (every rank calls this alike, and gets the same numbers)."""
        model.eval()
        right, count = torch.zeros(len(top), device=self._device), torch.zeros((), device=self._device)
        share = range(self.rank, len(self.splits[split]), self.world)
        for x, y in self.prepared(self.loader(split, self.s.batch // self.world, share)):
            with torch.autocast(self._device.type, torch.bfloat16, enabled=self._device.type == "cuda"):
                logits = model(x)
            best = logits.topk(min(max(top), logits.shape[1]), 1).indices  # top-5 of fewer classes: all of them
            right += torch.stack([(best[:, :k] == y[:, None]).any(1).sum() for k in top])
            count += len(y)
        if self.world > 1:
            dist.all_reduce(right), dist.all_reduce(count)
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

def averaged_over_ranks(grad):
    """A gradient averaged over the ranks, as DDP averages the parameters': channel pruning's (dL/dm)^2 of the
    whole batch, the same on every rank (each rank's own had pruned other units on each, and compression failed)."""
    grad = grad.clone()
    dist.all_reduce(grad)
    return grad / dist.get_world_size()

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
    paths, labels, classes, test_paths, test_labels = [], [], [], [], []
    try:  # a rank's folder missing or amiss on its machine alone is its problem, said by every rank
        (paths, labels, classes), (test_paths, test_labels, _) = check_folder(Path(s.data))
        check_images((paths + test_paths)[rank::world], total=len(paths + test_paths))  # each rank reads a share
        problem = None
    except InputError as e:
        problem = str(e)
    if world > 1:  # and every rank learns the first problem any found, or that they list other images
        start = len(str(Path(s.data))) + 1  # the names below --data, as every machine should list them
        names = "\n".join(f"{str(p)[start:]} {y}" for p, y in zip(paths + test_paths, labels + test_labels))
        found = [None] * world
        dist.all_gather_object(found, (problem, len(paths + test_paths), hashlib.sha1(names.encode()).hexdigest()))
        other = next(((r, n) for r, (_, n, digest) in enumerate(found) if digest != found[0][2]), None)
        problem = next((f"rank {r}: {p}" for r, (p, _, _) in enumerate(found) if p), None) or other and (
            f"--data {s.data}: rank {other[0]} lists other images than rank 0 ({other[1]} and {found[0][1]}); every "
            "machine needs the same copy of the data set")
    if problem:
        raise InputError(problem)
    if s.val_images + s.batch > len(paths):
        raise InputError(f"--val-images {s.val_images} leaves fewer of the {len(paths)} training images than one "
                         f"batch of {s.batch}")
    train, val = split(len(paths), s.val_images, s.seed)
    raw = s.decode == "gpu"  # JPEGs handed to the GPU undecoded
    pick = lambda idx, train: Images([paths[i] for i in idx], [labels[i] for i in idx], s.size, train, raw)
    splits = dict(train=pick(train, True), val=pick(val, False),
                  test=Images(test_paths, test_labels, s.size, False, raw))
    log.info(f"{s.data}: {len(classes)} classes; train {len(train)}, validation {len(val)}, test {len(test_paths)} "
             f"images; {world} rank(s), batch {s.batch // world} each on {device}, {loader_workers(s)} loader "
             "workers")
    return Streamed(splits, s, rank, world, device), len(classes)

def same_out_on_every_rank(out, rank, world, patience=120):
    """One line unless every rank sees what rank 0 writes in --out, as a file system that every machine shares
    shows it (a rank that does not waits up to `patience` seconds: NFS may show a new file late)."""
    made, token, found = not out.exists(), f"{os.getpid()} {time.time_ns()}", []  # this job's, no earlier one's
    try:
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / ".ranks").write_text(token)
        dist.broadcast_object_list(sent := [token])  # rank 0's, written before
        seen, start = False, time.monotonic()
        while not seen and time.monotonic() - start < patience:
            with contextlib.suppress(OSError):
                os.listdir(out)  # NFS: a fresh look at the folder, not a cached one
                seen = (out / ".ranks").read_text() == sent[0]
            time.sleep(0 if seen else 1)
        dist.all_gather_object(found := [None] * world, seen)
    finally:  # also where a signal or a failed collective ends it
        if rank == 0:
            (out / ".ranks").unlink(missing_ok=True)
            if made and not (found and all(found)):
                with contextlib.suppress(OSError):  # made, if rank 0 got so far
                    out.rmdir()  # nothing written, as for any bad input
    if not all(found):
        raise InputError(f"--out {out}: rank {found.index(False)} does not see the files rank 0 writes there; put "
                         "--out on a file system that every machine shares")

def loader_workers(s):
    """--workers, or with -1 the CPU cores this process may use (startup.cpu_cores: a container's quota counts)
    shared by the machine's ranks, two a rank left to the rank itself (its training loop, and the thread that
    readies the next batch)."""
    if s.workers >= 0:
        return s.workers
    cores = startup.cpu_cores()
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE") or 1)  # torchrun's, ours
    return max(1, cores // ranks_here - 2)
