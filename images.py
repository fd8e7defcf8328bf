"""Image data sets, shared by the image experiments (lenet_imagewoof.py, cifar.py):
archives downloaded with a progress bar, verified and extracted once; images kept on the
training device as uint8, each batch made into normalised floats (and augmented) there;
the rows, summary and box plot of test accuracies (Tables 2 and 3)."""
import hashlib
import shutil
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import experiment
from experiment import InputError, log, write_whole
from merge import Data
from report import plot_box, plot_kept_share, stage_table, summarize


def matches(path, digests):
    """Whether the file's digest is one of `digests` (name -> hex)."""
    hashes = {name: hashlib.new(name) for name in digests}
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            for h in hashes.values():
                h.update(chunk)
    return any(hashes[name].hexdigest() == value for name, value in digests.items())


def download(url, path):
    """url -> path, with a progress bar, through a .part file: path appears only when the
    download is whole (as many bytes as the server announced)."""
    part = path.with_name(path.name + ".part")
    try:
        with urllib.request.urlopen(url) as response, open(part, "wb") as f:
            total, done = int(response.headers.get("Content-Length") or 0), 0
            for chunk in iter(lambda: response.read(1 << 20), b""):
                f.write(chunk)
                done += len(chunk)
                if total:
                    bar = "#" * (30 * done // total)
                    print(f"\r  {path.name} [{bar:<30}] {done / 2**20:.0f}/{total / 2**20:.0f} MiB", end="", flush=True)
    except OSError as e:  # URLError, a connection cut, a full disk
        raise InputError(f"cannot download {url} ({e}); or pass --data DIR with an extracted copy") from None
    print()
    if total and done != total:
        log.info(f"the download stopped at {done} of {total} bytes")
        return
    part.replace(path)


def fetch(root, url, digests, folder):
    """root/folder, extracted from the archive at url: downloaded and verified (a broken or
    partial file is fetched again, once), extracted once, whole or not at all."""
    root.mkdir(parents=True, exist_ok=True)
    archive, target = root / url.rsplit("/", 1)[1], root / folder
    if target.is_dir():
        return target
    for attempt in range(2):
        if not archive.exists():
            log.info(f"downloading {url}")
            download(url, archive)
        if archive.exists() and matches(archive, digests):
            break
        archive.unlink(missing_ok=True)  # broken or partial
        if attempt:
            raise InputError(f"{url} came short or did not match its published checksum twice; not extracting it")
    scratch = root / f".{folder}.extracting"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(scratch, filter="data")  # refuses absolute paths and links out of scratch
    except (tarfile.TarError, OSError, EOFError) as e:
        raise InputError(f"{archive} is not a readable archive ({e}); delete it to fetch it again") from None
    if not (scratch / folder).is_dir():
        raise InputError(f"{archive} holds no {folder} folder")
    (scratch / folder).replace(target)
    shutil.rmtree(scratch)
    return target


def channel_stats(x):
    """Per-channel mean and std of uint8 images (N, H, W, 3) in [0, 1], in chunks.
    DEVIATION: the statistics of the data in use; the authors' scripts swapped CIFAR's and
    Imagewoof's."""
    total, squares = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for chunk in x.split(256):
        c = chunk.to(torch.float64) / 255
        total += c.sum((0, 1, 2)).cpu()
        squares += (c * c).sum((0, 1, 2)).cpu()
    n = x.shape[0] * x.shape[1] * x.shape[2]
    mean = total / n
    dtype = torch.get_default_dtype()  # the models' parameters' dtype
    return mean.to(dtype), (squares / n - mean ** 2).sqrt().to(dtype)


def image_data(d, device, size=None, augment=None):
    """Data holding d's uint8 images (N, H, W, 3) and labels on the device, moved there once. Its
    prepare(x, train) makes a batch floats (B, 3, H, W) in [0, 1], for training augmented by
    augment(floats) if given, then normalised with the channel statistics of d's training images;
    otherwise resized to size x size if size is given. Nothing crosses between host and device."""
    x_train = torch.as_tensor(d["x_train"]).to(device)
    mean, std = (v.to(device).view(1, 3, 1, 1) for v in channel_stats(x_train))

    def prepare(x, train=False):
        x = x.permute(0, 3, 1, 2).to(mean.dtype) / 255
        if train and augment:
            x = augment(x)
        elif size not in (None, x.shape[-1]):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return ((x - mean) / std).contiguous()  # NCHW, not channels-last
    to = lambda key: torch.as_tensor(d[key]).to(device)
    data = Data(x_train, to("y_train"), to("x_val"), to("y_val"), to("x_test"), to("y_test"), metric="accuracy",
                prepare=prepare)
    data.augments = augment is not None  # its models train one at a time: a stack draws no augmentation for each
    return data


def accuracy_result(model, data):
    """The numbers of a row of an image experiment."""
    return dict(test_accuracy=round(data.evaluate(model, "test"), 6), val_accuracy=round(data.evaluate(model, "val"), 6))


ACCURACY_COLUMNS = {"its teachers (mean)": "teachers_test", "big student (mean)": "big_student_test",
                    "compressed, before fine-tuning (mean)": "compressed_test",
                    "fused, before fine-tuning (mean)": "fused_test",
                    "pruned, before fine-tuning (mean)": "pruned_test"}


def accuracy_table(rows, strategies):
    """The statistics of Tables 2 and 3 of test accuracy per strategy, and the mean test
    accuracy of what came before: teachers, big students, fused and pruned models."""
    mean_of = lambda key: lambda mine: f"{np.mean([r[key] for r in mine]):.4f}" if key in mine[0] else ""
    return summarize(rows, "test_accuracy", strategies, extra={
        column: mean_of(key) for column, key in ACCURACY_COLUMNS.items() if any(key in r for r in rows)})


def report_accuracy(s, rows, heading, figure, figure_title, note=""):
    """summary.md printed and saved; the box plot of test accuracies and, with students,
    the teachers' shares of their units, as PNG."""
    if experiment.ranks()[0] > 0:
        return  # rank 0 writes
    import matplotlib
    matplotlib.use("Agg")
    out, names = Path(s.out), s.strategies.split(",")
    text = f"# {heading}: test accuracy over {s.runs} runs\n\n{accuracy_table(rows, names)}\n{note}"
    if any(r["strategy"] in ("student", "random") for r in rows):
        text += f"\nTest accuracy at each stage (per run in stages.md):\n\n{stage_table(rows, 'test_accuracy')}\n"
        write_whole(out / "stages.md", stage_table(rows, "test_accuracy", per_run=True) + "\n")
    write_whole(out / "summary.md", text)
    print(text)
    plot_box(rows, "test_accuracy", names, out / figure, f"{figure_title}, test accuracy over {s.runs} runs")
    if any(r["strategy"] == "student" for r in rows):
        plot_kept_share(rows, out / "fig2_kept_share.png")
    log.info(f"wrote {out}/summary.md and figures")
