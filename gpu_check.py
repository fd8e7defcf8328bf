"""The --device cuda path, checked in one go on a machine with a GPU: a short sine run on the GPU
and on the CPU (do the rows agree?), the bench, and each image script at a tiny budget, stacked
where that applies. It prints a report of seconds per model-epoch, stacked and one at a time,
peak GPU memory, and how far the GPU's rows are from the CPU's, and writes it to --report.

    python gpu_check.py --report gpu_check.md      # a few minutes on one GPU
    python gpu_check.py --device cpu               # the same steps on the CPU alone, to try it out
"""
import argparse
import contextlib
import io
import json
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import cifar
import lenet_imagewoof
import sine

SINE = ["--runs", "10", "--epochs", "60", "--n-train", "2000", "--n-val", "500", "--n-test", "2000", "--workers", "1"]


def write_images(root, classes=4, per_class=24, size=40):
    """A small folder in the Imagewoof layout: class c is a bright square in corner c, on noise."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", per_class // 3)):
        for c in range(classes):
            (root / split / f"class{c}").mkdir(parents=True)
            for j in range(n):
                pixels = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
                row, col = divmod(c % 4, 2)
                pixels[row * size // 2:(row + 1) * size // 2, col * size // 2:(col + 1) * size // 2] += 120
                Image.fromarray(pixels).save(root / split / f"class{c}" / f"{j}.JPEG")
    return root


def write_cifar(root, n=200):
    """The official CIFAR pickles, small: CIFAR-10's 5 training batches and test batch, CIFAR-100's
    train and test files; class c's images are brighter with c."""
    rng = np.random.default_rng(0)
    for folder, names, key, classes in (("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] +
                                         ["test_batch"], b"labels", 10),
                                        ("cifar-100-python", ["train", "test"], b"fine_labels", 100)):
        (root / folder).mkdir(parents=True)
        for name in names:
            labels = rng.integers(0, classes, n)
            data = rng.integers(0, 100, (n, 3072), dtype=np.uint8) + (labels[:, None] * 150 // classes).astype(np.uint8)
            with open(root / folder / name, "wb") as f:
                pickle.dump({b"data": data, key: labels.tolist()}, f)
    return root


def write_jpeg(args):
    """A natural-looking synthetic photo of ImageNet's usual size (500 x 375): a smooth field of colours with
    texture on it, about 80 KB as a JPEG (random noise would decode some 3x slower than photos)."""
    path, seed = args
    from PIL import Image
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
    pixels = np.asarray(field, dtype=np.float32) + rng.normal(0, 11, (375, 500, 1)) + rng.normal(0, 5, (375, 500, 3))
    pixels[:, :, seed % 3] *= 0.7  # the class's colour
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def imagenet_throughput(scratch, device, workers=None):
    """Images per second of ResNet18's training on ImageNet-sized JPEGs (500 x 375, natural-looking, synthetic)
    at 224 px, batch 256 (on a CPU, a try at 64 px and batch 16): the loader alone (decoding and cropping in its
    workers, uint8 crops handed over, jitter and normalisation on the device), the model alone (a training step
    on a batch already there, bf16 and channels-last on a GPU) and end to end (an epoch of imagenet.py)."""
    import multiprocessing
    import imagenet
    import streaming
    import merge
    cuda = device == "cuda"
    size, batch, count = (224, 256, 12_800) if cuda else (64, 16, 640)
    folder, workers = scratch / "imagenet", workers or max(1, (os.cpu_count() or 2) - 2)
    jobs = [(folder / split / f"n{c:02d}" / f"{j}.JPEG", c * 100_000 + j)
            for split, n in (("train", count // 10), ("val", 20)) for c in range(10) for j in range(n)]
    with multiprocessing.Pool(os.cpu_count()) as pool:
        pool.map(write_jpeg, jobs, chunksize=64)
    argv = ["--data", folder, "--size", size, "--batch", batch, "--val-images", 4 * batch, "--workers", workers,
            "--device", device]
    s = imagenet.parse([str(a) for a in argv])
    data, classes = streaming.streamed_folder(s, 0, 1, torch.device("cuda", 0) if cuda else torch.device("cpu"))
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def rate(steps, warm=3):
        """Images per second of the steps past the first `warm` (loaders starting, kernels compiling)."""
        for i, step in enumerate(steps):
            if i == warm:
                sync()
                started = time.time()
            step()
        sync()
        return (i + 1 - warm) * batch / (time.time() - started)
    batches = data.batches(batch)
    loader = rate(lambda: next(batches) for _ in range(min(30, count // batch - 6)))
    model = merge.resnet18(classes).to(data.device)
    net, opt = data.wrap(model), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = next(data.batches(batch))

    def train_step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    alone = rate(train_step for _ in range(23 if cuda else 5))
    _, _, _, printed = run(imagenet.main, [*argv, "--out", scratch / "imagenet_out", "--strategies", "one",
                                           "--phase-epochs", 1, 1, 1, 1, 1, "--short", 1], device)
    rates = [float(line.split(" images/s")[0].rsplit(" ", 1)[1]) for line in printed.splitlines() if "images/s" in line]
    return dict(size=size, batch=batch, workers=workers, loader=loader, model=alone, end_to_end=rates[len(rates) // 2])


def run(main, argv, device):
    """One command line in this process: (seconds, peak GPU memory in MiB, rows, what it printed)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    printed, started = io.StringIO(), time.time()
    with contextlib.redirect_stdout(printed):
        try:
            main([str(a) for a in argv])
        except SystemExit as e:
            if e.code:
                raise RuntimeError(f"{argv}: exit code {e.code}") from None
    seconds = time.time() - started
    memory = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0
    out = Path(argv[argv.index("--out") + 1])
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return seconds, memory, rows, printed.getvalue()


def model_epochs(rows):
    return sum(epochs for r in rows for epochs, _ in r["compute"].values())


def largest_difference(rows, reference, metric):
    theirs = {(r["run"], r["strategy"]): r[metric] for r in reference}
    return max(abs(r[metric] - theirs[(r["run"], r["strategy"])]) for r in rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--report", default="gpu_check.md")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: torch sees no GPU here; use --device cpu to try the steps on the CPU", file=sys.stderr)
        sys.exit(2)  # bad input, as every script's
    device = args.device
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU only"
    lines = [f"# GPU check: {name}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads", "",
             "| experiment | device | trainer | model-epochs | seconds | s / model-epoch | peak GPU MiB | "
             "largest difference from the CPU's rows |", "|---|---|---|---|---|---|---|---|"]
    report = Path(args.report)

    def add(what, where, trainer, result, reference=None, metric="test_accuracy"):
        seconds, memory, rows, _ = result
        difference = f"{largest_difference(rows, reference, metric):.2e}" if reference else "-"
        lines.append(f"| {what} | {where} | {trainer} | {model_epochs(rows)} | {seconds:.1f} | "
                     f"{seconds / model_epochs(rows):.5f} | {memory:.0f} | {difference} |")
        print(lines[-1], flush=True)
        report.write_text("\n".join(lines) + "\n")

    print("\n".join(lines), flush=True)
    scratch = Path(tempfile.mkdtemp())
    steps = [
        ("sine, 10 runs x 60 epochs", sine.main, SINE, "test_mse", [("stacked", ["--stack", "1"])]),
        ("LeNet on synthetic images, 2 runs x 12 epochs", lenet_imagewoof.main,
         ["--data", write_images(scratch / "woof"), "--runs", 2, "--epochs", 12, "--compile", 0], "test_accuracy",
         [("stacked", ["--stack", "1"]), ("one at a time", ["--stack", "0"])]),
        ("ResNet18 on synthetic images at 64 px, width 8, 1 run x 6 epochs", lenet_imagewoof.main,
         ["--arch", "resnet18", "--size", 64, "--width", 8, "--data", scratch / "woof", "--runs", 1, "--epochs", 6],
         "test_accuracy", [("one at a time", ["--stack", "0"])]),
        ("ResNet20 on synthetic CIFAR-100-format pickles, width 8, 1 run x 6 epochs", cifar.main,
         ["--data", write_cifar(scratch / "cifar"), "--experiment", "resnet20-cifar100", "--width", 8, "--runs", 1,
          "--epochs", 6], "test_accuracy", [("one at a time", ["--stack", "0"])]),
        ("VGG-11 on synthetic CIFAR-10-format pickles, width 8, 1 run x 6 epochs", cifar.main,
         ["--data", scratch / "cifar", "--experiment", "vgg11-cifar10", "--width", 8, "--runs", 1, "--epochs", 6,
          "--compile", 0], "test_accuracy", [("stacked", ["--stack", "1"]), ("one at a time", ["--stack", "0"])]),
    ]
    for i, (what, script, common, metric, trainers) in enumerate(steps):
        for trainer, flags in trainers:
            try:
                on_cpu = run(script, [*common, *flags, "--device", "cpu", "--out", scratch / f"{i}{trainer}cpu"], "cpu")
                if device == "cuda":
                    add(what, "cuda", trainer, run(script, [*common, *flags, "--device", "cuda",
                                                            "--out", scratch / f"{i}{trainer}cuda"], "cuda"),
                        on_cpu[2], metric)
                add(what, "cpu", trainer, on_cpu)
            except Exception as e:  # noqa: BLE001 - report it and go on with the next step
                lines.append(f"| {what} | {device} | {trainer} | failed: {type(e).__name__}: {str(e)[:200]} |")
                print(lines[-1], flush=True)
    try:
        r = imagenet_throughput(scratch, device)
        lines += ["", f"ResNet18 at {r['size']} px, batch {r['batch']}, on synthetic natural-looking JPEGs of ImageNet's "
                      f"size (500 x 375, about 80 KB), {r['workers']} loader workers on {os.cpu_count()} CPU cores, "
                      f"{name}: the loader alone {r['loader']:.0f} images/s, the model alone {r['model']:.0f} images/s, "
                      f"end to end {r['end_to_end']:.0f} images/s (an epoch of ImageNet's 1,281,167 images would take "
                      f"about {1_281_167 / r['end_to_end'] / 60:.0f} min at that rate)."]
    except Exception as e:  # noqa: BLE001 - report it and go on with the bench
        lines += ["", f"ImageNet throughput: failed: {type(e).__name__}: {str(e)[:300]}"]
    report.write_text("\n".join(lines) + "\n")
    print(lines[-1], flush=True)
    lines += ["", "## The bench (sine), on " + device, ""]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        sine.main(["--bench", "--device", device])
    lines += [line for line in printed.getvalue().splitlines() if line.startswith("|") or line.startswith("Sine")]
    report.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-12:]))


if __name__ == "__main__":
    main(sys.argv[1:])
