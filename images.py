"""Image data, for every image experiment (lenet_imagewoof.py, cifar.py, imagenet.py; downloads.py fetches
it): folders in ImageFolder's layout listed by one rule, checked, decoded once and cached; CIFAR's pickles;
one validation split; the crops (centre, random resized, padded), flips, colour jitter and normalisation;
data kept on the device as uint8, each batch made floats there (streaming.py streams ImageNet from disk
instead); and the accuracy report of Tables 2 to 4. Where each setting's value comes from: docs/settings.md."""
import functools
import math
import os
import pickle
import stat
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import experiment
import merge
import report
from experiment import InputError, log

# == Folders of images (ImageFolder's layout), decoded once and cached ================================

EXTENSIONS = {".jpg", ".jpeg", ".png"}  # in any case

def folder_name(text):
    """A folder named on the command line (--data, --root), without the trailing slash that tab completion adds:
    data/ and data are one folder to the settings an --out records (experiment.settings_record)."""
    name = text.rstrip("/" + os.sep)
    return name if name and not name.endswith(":") else text  # "/" and Windows' "C:\\" stay as they are

def list_images(folder):
    """(paths, labels, classes) of folder/<class>/<image>: regular files with an image suffix (a FIFO or a
    folder named x.jpg is not one). The classes are the sorted folders that hold images: a class folder
    without any is skipped, so that the splits of one data set give their classes the same indices."""
    paths, labels, classes = [], [], []
    for name in sorted(d.name for d in folder.iterdir() if d.is_dir()) if folder.is_dir() else []:
        mine = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in EXTENSIONS and p.is_file())
        if mine:
            paths, labels, classes = paths + mine, labels + [len(classes)] * len(mine), classes + [name]
    return paths, labels, classes

def check_data(data):
    """One clear line unless the folder --data is there: missing, a file, a name too long, a loop of links."""
    try:
        if stat.S_ISDIR(os.stat(data).st_mode):
            return
        problem = "not a folder"
    except FileNotFoundError:
        problem = "no such folder"
    except OSError as e:
        problem = e.strerror
    name = str(data)
    raise InputError(f"--data {name[:80]}{'...' if len(name) > 80 else ''}: {problem}")

def check_folder(data):
    """data's (train, val) listings, or one clear line for a folder that is not in the layout: train/ and
    val/ hold images of the same classes, at least two."""
    check_data(data)
    listed = [list_images(data / split) for split in ("train", "val")]
    for split, (paths, _, _) in zip(("train", "val"), listed):
        if not paths:
            raise InputError(f"--data {data}: {split}/<class>/ holds no .jpg, .jpeg or .png images")
    train, val = listed[0][2], listed[1][2]
    if train != val:
        raise InputError(f"--data {data}: train and val have different classes with images "
                         f"({sorted(set(train) ^ set(val))[:3]} in one only)")
    if len(train) < 2:
        raise InputError(f"--data {data}: one class only ({train[0]}); classifying needs at least 2")
    return listed

def opened(path, at_least=None):
    """(The RGB Pillow image at path, its size on disk), or one line naming the file (not an image, cut short,
    too many pixels). at_least(width, height) -> the size the decoded image needs: a JPEG then decodes at 1/2,
    1/4 or 1/8 of its size where that still gives it (Pillow's draft, some times faster for a small crop)."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            size = image.size
            if at_least:
                image.draft("RGB", tuple(math.ceil(side) for side in at_least(*size)))
            return image.convert("RGB"), size
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read image {path}: {e}") from None

def check_images(paths, threads=16, total=None):
    """One line naming the first file Pillow cannot open as an image (empty, another format, too many pixels),
    from headers only, so that a bad file stops a run before it trains rather than days into it. A file cut
    short shows only when decoded: Images puts the next image in its place, with a warning. total: of how many
    images paths are this rank's share."""
    from concurrent.futures import ThreadPoolExecutor
    from PIL import Image

    def problem(path):
        try:
            with Image.open(path):
                return None
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            return f"cannot read image {path}: {e}"
    log.info(f"checking {len(paths)} images" if total in (None, len(paths)) else
             f"checking {len(paths)} of {total} images, this process's share")
    with ThreadPoolExecutor(threads) as pool:
        for found in pool.map(problem, paths):
            if found:
                raise InputError(found)

def decode(path, size, whole=False):
    """RGB uint8 (size, size, 3): the whole image resized to size x size (whole), or the centre crop."""
    image, _ = opened(path)
    image = image.resize((size, size), 2) if whole else centre_crop(image, size, resample=2)  # 2: bilinear
    return np.asarray(image, dtype=np.uint8)

def load_split(data, split, size, whole=False):
    """(images uint8 (N, size, size, 3), labels int64 (N,), classes) of data/split, decoded once and cached in
    data/.cache, rebuilt when a file is added, removed or changed (name, size and modification time). A cache
    that cannot be read is rebuilt; one that cannot be written is skipped, with one line each."""
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
        log.info(f"{cache} cannot be read ({type(e).__name__}); decoding the images again")
    images = np.stack([decode(p, size, whole) for p in paths])
    try:
        cache.parent.mkdir(exist_ok=True)
        with report.written_whole(cache) as part, open(part, "wb") as f:
            np.savez(f, images=images, labels=np.array(labels), stamps=stamps)
    except OSError as e:
        log.info(f"cannot write the image cache {cache} ({e.strerror}); the images will be decoded again next time")
    return images, np.array(labels), classes

def split(n, val_fraction, seed):
    """(train, validation) indices of n training images, a share val_fraction held out, drawn by seed.
    DEVIATION: the paper trains on the whole training set; we hold out a validation split to choose bo3."""
    n_val = max(1, round(val_fraction * n)) if val_fraction < 1 else int(val_fraction)  # a share, or a count
    if n_val >= n:
        raise InputError(f"{n} training images leave none to train on after holding out {n_val} to validate; "
                         "lower --val-fraction or add images")
    order = np.random.default_rng(seed).permutation(n)
    return order[n_val:], order[:n_val]

def arrays(images, labels, test_images, test_labels, val_fraction, seed):
    """The dict image_data takes: train minus the validation split, the validation split, the test set."""
    train, val = split(len(images), val_fraction, seed)
    return dict(x_train=images[train], y_train=labels[train], x_val=images[val], y_val=labels[val],
                x_test=test_images, y_test=test_labels)

def load_folder(data, size, val_fraction=0.1, seed=0, whole=False):
    """A folder in ImageFolder's layout as uint8 arrays: train/ minus a validation split fixed by seed (to
    choose bo3), and val/ as the test set (as Imagewoof's val is used)."""
    listed = check_folder(data)
    split(len(listed[0][0]), val_fraction, seed)  # a validation split that leaves none to train on: before decoding
    images, labels, classes = load_split(data, "train", size, whole)
    test_images, test_labels, _ = load_split(data, "val", size, whole)
    return dict(arrays(images, labels, test_images, test_labels, val_fraction, seed), classes=classes)

# == CIFAR's "python version" pickles, read with numpy ===============================================

class BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR batch (a dict of bytes, lists and numpy arrays) and nothing else: a pickle can run
    any code it names, so only numpy's array constructors are allowed."""
    allowed = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}  # bytes, at protocol 2

    def find_class(self, module, name):
        if (module, name) in self.allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR batch")

def read_batches(folder, names, labels_key, classes):
    """Images uint8 (N, 32, 32, 3) and labels int64 (N,) of CIFAR's batch files `names` in folder."""
    images, labels = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise InputError(f"--data {folder}: no {name}")
        try:
            with open(path, "rb") as f:
                batch = BatchUnpickler(f, encoding="bytes").load()
            x, y = np.asarray(batch[b"data"]), np.asarray(batch[labels_key])
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError) as e:
            raise InputError(f"cannot read {path} as a CIFAR batch ({type(e).__name__}: {e})") from None
        if x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
            raise InputError(f"{path}: its data is shaped {x.shape}, not (images, 3072) of 32x32 RGB")
        if not len(x):
            raise InputError(f"{path} holds no images")
        if x.dtype.kind not in "iu" or x.min() < 0 or x.max() > 255:
            raise InputError(f"{path}: its pixels are not integers from 0 to 255 ({x.dtype})")
        if y.shape != (len(x),) or y.dtype.kind not in "iu" or not 0 <= y.min() <= y.max() < classes:
            raise InputError(f"{path}: its labels are not {len(x)} integers from 0 to {classes - 1}")
        images.append(x.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(y.astype(np.int64))
    return np.concatenate(images), np.concatenate(labels)

# == Crops, flips, colour jitter and normalisation =====================================================

def resized_side(size, crop_pct):
    """The shorter side an image is resized to before its centre crop of size: size / crop_pct rounded down, as
    timm's (235 for 224 at 0.95)."""
    return int(size / crop_pct)

def centre_crop(image, size, crop_pct=1.0, resample=3):
    """A Pillow image's shorter side resized to resized_side(size, crop_pct) (3: bicubic), then its centre size x
    size."""
    scale = resized_side(size, crop_pct) / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))), resample)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))

def crop_box(w, h, rng, scale, ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop draw for a w x h image: (left, top, width, height) of an area share in
    scale and an aspect ratio in ratio, anywhere in the image (ten tries, then the centre crop with its
    aspect ratio clamped into ratio); rng a numpy Generator."""
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1)), cw, ch
    cw, ch = (w, round(w / ratio[0])) if w / h < ratio[0] else (round(h * ratio[1]), h) if w / h > ratio[1] else (w, h)
    return (w - cw) // 2, (h - ch) // 2, cw, ch

def random_resized_crop_flip(x, size, scale=(0.4, 0.8), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop(size, scale, ratio) and RandomHorizontalFlip for a batch (B, 3, H, W) on its device,
    in one grid_sample: each example its own crop_box, resized to size x size, mirrored half the time. The
    draws come from torch's generator (merge.fit seeds it for each epoch). The scale (0.4, 0.8) is the
    authors' Imagewoof script's."""
    B, H, W = x.shape[0], x.shape[2], x.shape[3]
    rng = np.random.default_rng(int(torch.randint(2 ** 62, ())))
    boxes = torch.tensor([crop_box(W, H, rng, scale, ratio) for _ in range(B)], dtype=x.dtype, device=x.device)
    left, top, cw, ch = boxes.unbind(1)
    flip = torch.tensor(rng.random(B) < 0.5, device=x.device)
    theta = torch.zeros(B, 2, 3, dtype=x.dtype, device=x.device)  # output grid [-1, 1]^2 -> input coordinates
    theta[:, 0, 0], theta[:, 1, 1] = torch.where(flip, -cw / W, cw / W), ch / H
    theta[:, 0, 2], theta[:, 1, 2] = (2 * left + cw) / W - 1, (2 * top + ch) / H - 1  # the crop's centre
    grid = F.affine_grid(theta, [B, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

def random_crop_flip(x, pad=4):
    """The authors' CIFAR augmentation for a batch (B, 3, H, W) on its device: a random H x W crop of the image
    padded by `pad` on every side, mirrored half the time. The batch is in [0, 1], not yet normalised: the
    padding is black, as torchvision's."""
    B, _, H, W = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = torch.randint(0, 2 * pad + 1, (B, 1), device=x.device) + torch.arange(H, device=x.device)  # (B, H)
    cols = torch.randint(0, 2 * pad + 1, (B, 1), device=x.device) + torch.arange(W, device=x.device)  # (B, W)
    cols = torch.where(torch.rand(B, 1, device=x.device) < 0.5, cols.flip(1), cols)
    crops = padded.permute(0, 2, 3, 1)[torch.arange(B, device=x.device)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return crops.permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W); channels-last batches hung torch 2.13's CPU conv

def jitter_factors(rng, strength, hue=None, count=None):
    """Draws of color_jitter from the numpy Generator rng: brightness, contrast and saturation factors in
    [1 - strength, 1 + strength] and the hue's turn in [-hue, hue] of a full turn (hue: strength if None),
    as float32 (4,), or (count, 4) for count images."""
    hue = strength if hue is None else hue
    shape = (3,) if count is None else (count, 3)
    factors = np.concatenate([rng.uniform(1 - strength, 1 + strength, shape),
                              rng.uniform(-hue, hue, shape[:-1] + (1,))], -1)
    return torch.tensor(factors, dtype=torch.float32)

@functools.lru_cache
def yiq(device):
    """RGB -> YIQ and back (float32), made once for each device: a tensor made on a GPU from numbers waits for it."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64)
    return to_yiq.to(device, torch.float32), torch.linalg.inv(to_yiq).to(device, torch.float32)

def color_jitter(x, strength=0.15, factors=None):
    """torchvision's ColorJitter(brightness, contrast, saturation, hue = strength) for a batch of RGB images
    in [0, 1], (B, 3, H, W), each example its own factors (B, 4) (jitter_factors; drawn from torch's
    generator unless given). DEVIATION: always in this order (torchvision draws an order per image), and
    the hue turned in YIQ space, a close approximation of torchvision's HSV shift."""
    B, device = x.shape[0], x.device
    if factors is None:
        factors = jitter_factors(np.random.default_rng(int(torch.randint(2 ** 62, ()))), strength, count=B)
    brightness, contrast, saturation, hue = (f.view(B, 1, 1, 1) for f in factors.to(device, x.dtype).unbind(1))
    gray = lambda x: (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)  # (B, 1, H, W)
    x = (x * brightness).clamp(0, 1)
    mean = gray(x).mean((2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean).clamp(0, 1)
    x = ((x - gray(x)) * saturation + gray(x)).clamp(0, 1)
    angle = hue.view(B) * 2 * math.pi
    cos, sin, zero, one = angle.cos(), angle.sin(), torch.zeros(B, device=device), torch.ones(B, device=device)
    turn = torch.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos], 1).view(B, 3, 3)  # about the Y axis
    to_yiq, from_yiq = yiq(device)
    matrix = from_yiq @ turn.float() @ to_yiq  # (B, 3, 3), RGB -> RGB
    return torch.einsum("bij,bjhw->bihw", matrix.to(x.dtype), x).clamp(0, 1)

def channel_stats(x):
    """Per-channel mean and std of uint8 images (N, H, W, 3) in [0, 1], in chunks. DEVIATION: the statistics
    of the data in use; the authors' scripts swapped CIFAR's and Imagewoof's."""
    total, squares = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for chunk in x.split(256):
        c = chunk.to(torch.float64) / 255
        total += c.sum((0, 1, 2)).cpu()
        squares += (c * c).sum((0, 1, 2)).cpu()
    n = x.shape[0] * x.shape[1] * x.shape[2]
    mean, dtype = total / n, torch.get_default_dtype()  # the models' parameters' dtype
    return mean.to(dtype), (squares / n - mean ** 2).sqrt().to(dtype)

def image_data(d, device, size=None, augment=None, stats=()):
    """Data holding d's uint8 images (N, H, W, 3) and labels on the device, moved there once. Its prepare(x,
    train) makes a batch floats (B, 3, H, W) in [0, 1], for training augmented by augment(floats) if given,
    then normalised with the channel statistics of d's training images, or with stats (three means, then three
    standard deviations) if given; else resized to size x size if size is given. Nothing crosses between host
    and device. A stack of models trains on it only without augment: its draws would be the stack's, not each
    model's (experiment.phase_trainer)."""
    x_train = torch.as_tensor(d["x_train"]).to(device)
    stats = torch.tensor(stats, dtype=torch.get_default_dtype()).view(2, 3) if stats else channel_stats(x_train)
    mean, std = (v.to(device).view(1, 3, 1, 1) for v in stats)

    def prepare(x, train=False):
        x = x.permute(0, 3, 1, 2).to(mean.dtype) / 255
        if train and augment:
            x = augment(x)
        elif size not in (None, x.shape[-1]):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return ((x - mean) / std).contiguous()  # NCHW, not channels-last
    to = lambda key: torch.as_tensor(d[key]).to(device)
    data = merge.Data(x_train, to("y_train"), to("x_val"), to("y_val"), to("x_test"), to("y_test"),
                      metric="accuracy", prepare=prepare)
    data.augments = augment is not None
    return data

def check_unstacked(s, network, why="it has BatchNorm, whose statistics are each model's own"):
    """One line for --stack 1 with a network that a stack cannot hold."""
    if s.stack == "1":
        raise InputError(f"--stack 1 is for networks without BatchNorm, on data alike for every model; {network} "
                         f"trains one model at a time ({why})")

# == The accuracy report (Tables 2 to 4) =============================================================

def accuracy_result(model, data):
    """The numbers of a row of an image experiment: test and validation accuracy, and top-5 where the data
    gives it (Table 4)."""
    if hasattr(data, "accuracies"):  # streaming.Streamed: top-1 and top-5 in one pass
        top1, top5 = data.accuracies(model, "test")
        return dict(test_accuracy=round(top1, 6), test_top5=round(top5, 6),
                    val_accuracy=round(data.evaluate(model, "val"), 6))
    return dict(test_accuracy=round(data.evaluate(model, "test"), 6), val_accuracy=round(data.evaluate(model, "val"), 6))

ACCURACY_COLUMNS = {"top-5 (mean)": "test_top5", "its teachers (mean)": "teachers_test",
                    "big student (mean)": "big_student_test",
                    "compressed, before fine-tuning (mean)": "compressed_test",
                    "fused, before fine-tuning (mean)": "fused_test", "pruned, before fine-tuning (mean)": "pruned_test"}

def accuracy_table(rows, strategies):
    """The statistics of Tables 2 to 4 of test accuracy per strategy; top-5 where the rows have it; and the
    mean of what came before: the teachers, big students, fused and pruned models."""
    mean_of = lambda key: lambda mine: f"{np.mean([r[key] for r in mine]):.4f}" if key in mine[0] else ""
    return report.summarize(rows, "test_accuracy", strategies, extra={
        column: mean_of(key) for column, key in ACCURACY_COLUMNS.items() if any(key in r for r in rows)})

def report_accuracy(s, rows, strategies, heading, figure, title, note=""):
    """summary.md printed and saved, headed by the network, the data the rows came from and the paper's
    table; the box plot of test accuracies and, with students, the teachers' shares of their units, as PNG."""
    if experiment.ranks()[0] > 0:
        return  # rank 0 writes
    import matplotlib
    matplotlib.use("Agg")
    out, runs = Path(s.out), report.count(s.runs, "run")
    text = f"# {heading}: test accuracy over {runs}\n\n{accuracy_table(rows, strategies)}\n{note}"
    if any(r["strategy"] in ("student", "random") for r in rows):
        text += f"\nTest accuracy at each stage (per run in stages.md):\n\n{report.stage_table(rows, 'test_accuracy')}\n"
        report.write_whole(out / "stages.md", report.stage_table(rows, "test_accuracy", per_run=True) + "\n")
    report.write_whole(out / "summary.md", text)
    print(text)
    report.plot_box(rows, "test_accuracy", strategies, out / figure, f"{title}, test accuracy over {runs}")
    if any(r["strategy"] == "student" for r in rows):
        report.plot_kept_share(rows, out / "fig2_kept_share.png")
    log.info(f"wrote {out}/summary.md and figures")
