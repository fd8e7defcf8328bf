"""The --device cuda path, timed and checked in one go on a machine with a GPU, in under 6 minutes:
the stacked step with and without CUDA graphs, compiled and eager; the whole sine protocol (50 runs),
compiling and again with torch's compiled steps cached; LeNet, 10 runs x 60 epochs, stacked, compiled and
eager; ImageNet's loader and ResNet18 on synthetic JPEGs (the loader alone, the model alone, both; Pillow
and nvJPEG); then, while --budget lasts, where a step of the stacked sine goes (its kernels, their GPU time,
drawing an epoch's orders), the sine protocol on this machine's CPU cores, LeNet with its compiled steps
cached and small runs of each experiment on the GPU against the CPU's rows. Each timing
says how often a CUDA graph could not be recorded (its steps then ran one launch a kernel). It writes its
report to --report as it goes; --only runs some of its steps again.

    python gpu_check.py --report gpu_check.md --lenet-data DIR     # on one GPU
    python gpu_check.py --only imagenet-gpu graphs                 # two steps again, after a change
    python gpu_check.py --device cpu --small                       # the steps a CPU can run, tiny
"""
import argparse
import contextlib
import functools
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

STEPS = ("graphs", "sine", "lenet", "imagenet-cpu", "imagenet-gpu", "lenet-cached", "kernels", "sine-cpu",
         "small-runs")
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

def write_jpegs(folder, count):
    """count natural-looking synthetic JPEGs of ImageNet's size in 10 classes (and 200 to validate), on every core."""
    import multiprocessing
    jobs = [(folder / split / f"n{c:02d}" / f"{j}.JPEG", c * 100_000 + j)
            for split, n in (("train", count // 10), ("val", 20)) for c in range(10) for j in range(n)]
    with multiprocessing.Pool(os.cpu_count()) as pool:
        pool.map(write_jpeg, jobs, chunksize=64)
    return folder

def imagenet_throughput(scratch, device, decode="cpu", workers=None):
    """Images per second of ResNet18's training on ImageNet-sized JPEGs (500 x 375, natural-looking, synthetic)
    at 224 px, batch 256 (on a CPU, a try at 64 px and batch 16): the loader alone (decoding and cropping in its
    workers, or on the GPU with --decode gpu; jitter and normalisation on the device), the model alone (a
    training step on a batch already there, bf16 and channels-last on a GPU), the two together (the loader
    feeding the steps) and an epoch of imagenet.py (its own count, from the start of the epoch)."""
    import imagenet
    import streaming
    import merge
    cuda = device == "cuda"
    size, batch, count = (224, 256, 12_800) if cuda else (64, 16, 640)
    folder, workers = scratch / "imagenet", workers or max(1, (os.cpu_count() or 2) - 2)
    if not folder.exists():
        write_jpegs(folder, count)
    argv = ["--data", folder, "--size", size, "--batch", batch, "--val-images", 4 * batch, "--workers", workers,
            "--device", device, "--decode", decode]
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
    steps = min(30, count // batch - 6)
    batches = data.batches(batch)
    loader = rate(lambda: next(batches) for _ in range(steps))
    batches.close()  # its loader thread ends before the next loader's workers start
    model = merge.resnet18(classes).to(data.device)
    net, opt = data.wrap(model), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def train_step(x, y):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    decoding = float("nan")
    if decode == "gpu":  # the main process's share: a batch decoded, cropped and resized on the GPU
        raw, _, _ = next(iter(data.loader("train", batch)))
        decoding = rate(lambda: data.decoded(*raw) for _ in range(8))
    x, y = next(data.batches(batch))
    alone = rate(lambda: train_step(x, y) for _ in range(23 if cuda else 5))
    raw = [b for _, b in zip(range(3), data.loader("train", batch))]  # prepared's batches, jittered, against
    expected, to_device = [data.to_device(*b) for b in raw], data.to_device  # to_device's, its stream held back

    def held_back(*args):
        if cuda:
            torch.cuda._sleep(200_000_000)  # some 0.1 s of the GPU on prepared's stream, before the batch's work
        return to_device(*args)
    data.to_device = held_back
    prepared = list(data.prepared(raw, jitter=True))
    data.to_device = to_device
    same = max(max((a - b).abs().nan_to_num(float("inf")).max().item(), (c != d).sum().item())
               for (a, c), (b, d) in zip(prepared, expected))  # a NaN counts as infinitely far
    batches = data.batches(batch)
    together = rate(lambda: train_step(*next(batches)) for _ in range(steps))
    batches.close()
    _, _, _, printed = run(imagenet.main, [*argv, "--out", scratch / f"imagenet_out_{decode}", "--strategies", "one",
                                           "--phase-epochs", 1, 1, 1, 1, 1, "--short", 1], device)
    rates = [float(line.split(" images/s")[0].rsplit(" ", 1)[1]) for line in printed.splitlines() if "images/s" in line]
    return dict(size=size, batch=batch, workers=workers, loader=loader, model=alone, together=together,
                decoding=decoding, epoch=rates[len(rates) // 2 - 1] if rates else float("nan"), same=same)

def sine_stack(size, device):
    """size sine MLPs, model r made from seed r."""
    import merge
    models = []
    for seed in range(size):
        torch.manual_seed(seed)
        models.append(merge.SineMLP().to(device))
    return models

def sine_graphs(device):
    """The stacked sine step with and without CUDA graphs of 10 steps, compiled and eager: {(compile, graphs):
    microseconds a step of a stack of 50 models (the median epoch past the first two)}, {compile: the largest
    difference between the weights with graphs and without}, and that between two compilations without graphs,
    the second with torch's compile caches off (so that it chooses its kernels afresh)."""
    import merge
    import stacked
    s, data = merge.Settings(), merge.sine_data(0, 10_000, 100, 100, device=device)
    times, weights = {}, {}
    for use_compile, graphs in ((1, False), (1, device == "cuda"), (1, "again"), (0, False), (0, device == "cuda")):
        models, ends = sine_stack(50, device), []  # on a CPU, a try-out: without graphs throughout
        with torch._inductor.config.patch(force_disable_caches=graphs == "again"):  # compiled afresh, no cache
            stacked.fit_stacked(models, [data] * 50, s, 6, seeds=range(50), compile=use_compile, graphs=graphs is True,
                                after_epoch=lambda epoch, history: ends.append(time.time()))  # a GPU's: late
        steps = -(-10_000 // s.batch)
        times[use_compile, graphs] = float(np.median(np.diff(ends[1:-1]))) / steps * 1e6  # epochs 2-4 (the
        # last epoch's row waits for the GPU's tail alone)
        weights[use_compile, graphs] = torch.cat([p.detach().flatten() for m in models for p in m.parameters()])
    differ = lambda a, b: (weights[a] - weights[b]).abs().max().item()  # noqa: E731
    return times, {c: differ((c, True), (c, False)) if (c, True) in weights else 0.0 for c in (1, 0)}, \
        differ((1, "again"), (1, False))

def broadcast_products(step, use_compile):
    """stacked.compiled(step, use_compile), but with every bmm that has an M, K or N of 1 (a stacked sine step has
    five, two of them outer products that torch 2.13 already decomposes, the others cuBLAS calls on a GPU: torch
    decomposes them only with coordinate descent tuning) as a broadcast product and a sum, which inductor fuses.
    broadcast_products.decomposed counts them. torch's autograd cache is off while it compiles: its key leaves
    out the decompositions, so it would hand back the step compiled without them."""
    import stacked
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.symbolic_shapes import statically_known_true as known
    if not use_compile:  # fit_stacked's compile, resolved by stacked.compiles
        return stacked.compiled(step, False)

    def bmm(a, b):  # (R, M, K) @ (R, K, N)
        broadcast_products.decomposed += 1
        if known(a.shape[2] == 1):
            return a * b
        if known(b.shape[2] == 1):
            return (a * b.transpose(1, 2)).sum(-1, keepdim=True)
        if known(a.shape[1] == 1):
            return (a.transpose(1, 2) * b).sum(1, keepdim=True)
        broadcast_products.decomposed -= 1
        return NotImplemented

    def backend(gm, inputs):
        with torch._functorch.config.patch(enable_autograd_cache=False):
            return compile_fx(gm, inputs, decompositions={**select_decomp_table(), torch.ops.aten.bmm.default: bmm})
    broadcast_products.decomposed = 0
    torch._dynamo.reset()
    return torch.compile(step, backend=backend)

def sine_kernels(device, sizes=(50, 250), epochs=5):
    """Where a step of the stacked sine goes, for stacks of 50 and 250 (the one model's, and the teachers' and
    bo3 models'): {size: (microseconds a step, compiled, 10 steps a CUDA graph; with broadcast_products (its
    microseconds a step, the products decomposed, the weights' largest difference after the epochs) or why it
    failed; kernels a
    step and their GPU time in microseconds, profiled one launch a step, those launched at least once a step;
    milliseconds an epoch to draw its orders, a randperm a model as fit_stacked draws them, and drawn on the CPU,
    pinned and copied instead; milliseconds of steps an epoch; the five kernels of most GPU time, each (name,
    launches a step, microseconds a step))}."""
    import merge
    import stacked
    from torch.profiler import ProfilerActivity, profile
    s, data = merge.Settings(), merge.sine_data(0, 10_000, 100, 100, device=device)
    steps, result = -(-10_000 // s.batch), {}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)  # as imagenet_throughput's
    for size in sizes:
        def train(epochs, **how):
            models = sine_stack(size, device)
            stacked.fit_stacked(models, [data] * size, s, epochs, seeds=range(size), **how)
            return torch.cat([p.detach().flatten() for m in models for p in m.parameters()])

        def timed(compiled=stacked.compiled):  # microseconds a step in the epochs but the first and last; weights
            ends, plain = [], stacked.compiled
            stacked.compiled = compiled
            try:
                weights = train(epochs, graphs=device == "cuda", after_epoch=lambda epoch, h: ends.append(time.time()))
            finally:
                stacked.compiled = plain
            return float(np.median(np.diff(ends[1:-1]))) / steps * 1e6, weights
        step, weights = timed()
        try:
            fused, fused_weights = timed(broadcast_products)
            fused = (fused, broadcast_products.decomposed, (weights - fused_weights).abs().max().item())
        except Exception as e:  # noqa: BLE001 - the variant failed (no compiler?): the other numbers stand
            fused = f"{type(e).__name__}: {str(e)[:100]}"
        train(1, graphs=False)  # compiled again one launch a step, then profiled with torch's compiled step cached
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])) as p:
            train(1, graphs=False)
        kernels = [e for e in p.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA and e.count >= steps]
        orders = []
        for where in (device, "cpu"):
            sync()
            began = time.time()
            for epoch in range(3):
                order = torch.stack([torch.randperm(10_000, device=where, generator=torch.Generator(where).manual_seed(
                    merge.epoch_seed(seed, epoch))) for seed in range(size)])
                order = order.pin_memory().to(device, non_blocking=True) if where != device else order
            sync()
            orders.append((time.time() - began) / 3 * 1e3)
        top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:5]
        result[size] = (step, fused, sum(e.count for e in kernels) / steps,
                        sum(e.self_device_time_total for e in kernels) / steps, *orders, step * steps / 1e3,
                        [(e.key[:80], e.count / steps, e.self_device_time_total / steps) for e in top])
    return result

def run(main, argv, device, log=None):
    """One command line in this process: (seconds, peak GPU memory in MiB, rows, what it printed, also written
    to the file log if given)."""
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
    if log:
        Path(log).write_text(printed.getvalue())
    memory = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0
    out = Path(argv[argv.index("--out") + 1])
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return seconds, memory, rows, printed.getvalue()

def model_epochs(rows):
    return sum(epochs for r in rows for epochs, _ in r["compute"].values())

def largest_difference(rows, reference, metric):
    theirs = {(r["run"], r["strategy"]): r[metric] for r in reference}
    return max(abs(r[metric] - theirs[(r["run"], r["strategy"])]) for r in rows)

def protocol_line(what, device, seconds, rows, metric, lower_is_better):
    """A row of the timing table: what, where, seconds, and each strategy's mean result."""
    means = {}
    for r in rows:
        means.setdefault(r["strategy"], []).append(r[metric])
    results = ", ".join(f"{name} {np.mean(v):.4f}" for name, v in means.items())
    return f"| {what} | {device} | {seconds:.1f} | {len(rows)} rows; mean {metric}: {results} |"

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = lambda message: sys.exit(print(f"error: {message}", file=sys.stderr) or 2)  # one line
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cuda: the check; cpu: a try-out "
                        "of its steps on a machine without a GPU [cuda]")
    parser.add_argument("--report", default="gpu_check.md", help="the report, written as the check goes, and its "
                        "logs in REPORT's name with _logs [gpu_check.md]")
    parser.add_argument("--lenet-data", default="", help="a 10-class folder in the Imagewoof layout for LeNet's "
                        "timing (MNIST written so is the stand-in of the committed report); empty: synthetic images")
    parser.add_argument("--budget", type=float, default=300, help="seconds after which the optional steps (LeNet "
                        "again, where a sine step goes, the CPU's sine protocol, small runs against the CPU's rows) "
                        "are left out [300]")
    parser.add_argument("--small", action="store_true", help="tiny budgets throughout: a try-out of the steps")
    parser.add_argument("--only", nargs="+", choices=STEPS, default=STEPS, metavar="STEP", help="these steps alone "
                        f"(of {', '.join(STEPS)}), a check again after a change [all]")
    args = parser.parse_args(argv)
    if not args.budget >= 0 or args.lenet_data and not Path(args.lenet_data).is_dir():
        parser.error(f"--budget must be 0 or more, got {args.budget}" if not args.budget >= 0 else
                     f"--lenet-data {args.lenet_data} is not a folder")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("torch sees no GPU here; use --device cpu to try the steps on the CPU")
    device, began = args.device, time.time()
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU only"
    report, scratch = Path(args.report), Path(tempfile.mkdtemp())
    logs = report.parent / (report.stem + "_logs")  # what each whole protocol printed
    logs.mkdir(parents=True, exist_ok=True)
    lines = [f"# GPU check: {name}, torch {torch.__version__}, {os.cpu_count()} CPU cores", ""]

    def say(*new):
        lines.extend(new)
        print("\n".join(new), flush=True)
        report.write_text("\n".join(lines) + "\n")

    def step(what, work):
        import stacked
        failures = stacked.Graphs.failures
        try:
            work()
        except Exception as e:  # noqa: BLE001 - report it and go on with the next step
            say(f"{what}: failed: {type(e).__name__}: {str(e)[:300]}", "")
        if stacked.Graphs.failures > failures:
            say(f"{what}: a CUDA graph could not be recorded {stacked.Graphs.failures - failures} time(s); those "
                "blocks ran one launch a kernel (the log says why)", "")

    left_out = []  # the steps asked for and not run, with why, named at the report's end

    def wanted(name, what, why_not="", optional=True):  # optional: left out past --budget
        if name not in args.only:
            return False
        if not why_not and optional and time.time() - began >= args.budget:
            why_not = f"past --budget {args.budget:.0f} s"
        if why_not:
            left_out.append(f"{what} ({why_not})")
        return not why_not

    def graphs():
        say("## The stacked step in blocks of 10 (CUDA graphs)", "")
        times, difference, recompiled = sine_graphs(device)
        for c, how in ((1, "compiled"), (0, "eager")):
            plain, graphed = times[c, False], times[c, device == "cuda"]
            say(f"A stack of 50 sine MLPs, batch 32, {how}: {plain:.0f} us a step one launch a step, {graphed:.0f} "
                f"us a step with 10 steps a CUDA graph ({plain / graphed:.1f}x); largest difference of the weights "
                f"after 6 epochs {difference[c]:.2e}" + (f", and between two compilations without graphs, the "
                f"second with torch's compile caches off, {recompiled:.2e}" if c else "") + ".", "")
    if wanted("graphs", "the stacked step in blocks of 10", optional=False):
        step("CUDA graphs", graphs)

    if {"sine", "lenet"} & set(args.only):
        say("## Whole protocols", "", "| what | device | seconds | results |", "|---|---|---|---|")
    small = ["--n-train", 1000, "--n-val", 200, "--n-test", 1000, "--epochs", 30] if args.small else []
    runs = 4 if args.small else 50
    for i, attempt in enumerate(("compiling", "compiled steps cached by torch")):
        def sine_protocol(attempt=attempt, i=i):
            seconds, _, rows, _ = run(sine.main, ["--runs", runs, *small, "--device", device, "--out",
                                                  scratch / f"sine-{i}"], device, logs / f"sine-{device}-{i}.log")
            say(protocol_line(f"`python merge.py --task sine --runs {runs}`, {attempt}", device, seconds, rows,
                              "test_mse", True))
        if wanted("sine", "the sine protocol", optional=False):
            step("sine protocol", sine_protocol)
    lenet_runs, lenet_epochs = (2, 6) if args.small else (10, 60)

    @functools.cache
    def lenet_data():  # written when a LeNet step first needs it
        return Path(args.lenet_data) if args.lenet_data else write_images(scratch / "woof10", 10, 600, 32)

    def lenet(i, attempt, flags=()):
        argv = ["--data", lenet_data(), "--runs", lenet_runs, "--epochs", lenet_epochs, "--stack", 1, "--device",
                device, *flags, "--out", scratch / f"lenet-{i}"]
        seconds, _, rows, _ = run(lenet_imagewoof.main, argv, device, logs / f"lenet-{i}.log")
        data = f"{lenet_data().name}, stand-in data" if args.lenet_data else "synthetic images"
        say(protocol_line(f"LeNet, {lenet_runs} runs x {lenet_epochs} epochs, stacked, on {data}, {attempt}", device,
                          seconds, rows, "test_accuracy", False))
    if wanted("lenet", "LeNet", optional=False):
        step("LeNet", lambda: lenet(0, "compiled (`--compile 1`)", ["--compile", 1]))
        step("LeNet, eager", lambda: lenet(2, "eager (`--compile 0`)", ["--compile", 0]))

    import streaming
    heading = ["", "## ImageNet's loader and ResNet18 (synthetic JPEGs)", ""]  # said before the first of them
    for decode in ("cpu", "gpu"):
        why_not = "nvJPEG needs the GPU" if device == "cpu" else "" if streaming.has_torchvision() else \
            "torchvision does not load beside this torch"
        if not wanted(f"imagenet-{decode}", f"ImageNet with --decode {decode}", decode == "gpu" and why_not, False):
            continue
        if heading:
            say(*heading)
            heading = []
        def throughput(decode=decode):
            r = imagenet_throughput(scratch, device, decode)
            say(f"ResNet18 at {r['size']} px, batch {r['batch']}, --decode {decode}, on synthetic natural-looking "
                f"JPEGs of ImageNet's size (500 x 375, about 80 KB), {r['workers']} loader workers on "
                f"{os.cpu_count()} CPU cores, {name}: the loader alone {r['loader']:.0f} images/s" +
                (f" (of which decoding and cropping a batch on the GPU, in the main process, alone: {r['decoding']:.0f}"
                 " images/s)" if decode == "gpu" else "") + f", the model alone "
                f"{r['model']:.0f} images/s, the two together {r['together']:.0f} images/s; an epoch of imagenet.py "
                f"{r['epoch']:.0f} images/s from its start (an epoch of ImageNet's 1,281,167 images: about "
                f"{1_281_167 / r['together'] / 60:.0f} min at the rate of the two together). Batches made ready in "
                f"the loader's thread and stream, that stream held back: largest difference from the same batches "
                f"made in the main thread {r['same']:.2e}.", "")
        step(f"ImageNet throughput, --decode {decode}", throughput)

    if wanted("lenet-cached", "LeNet again, its compiled steps cached", "lenet" not in args.only and
              "it needs the lenet step before it"):
        say("", "## LeNet again", "", "| what | device | seconds | results |", "|---|---|---|---|")
        step("LeNet", lambda: lenet(1, "compiled (`--compile 1`), its steps cached by torch", ["--compile", 1]))
    if wanted("kernels", "where a step of the stacked sine goes"):
        say("## Where a step of the stacked sine goes", "")
        def kernels():
            sizes = (4, 8) if args.small else (50, 250)
            for size, (step_us, fused, count, gpu_us, orders, on_cpu, epoch, top) in \
                    sine_kernels(device, sizes).items():
                most = "; ".join(f"`{name}` {n:.0f} a step, {us:.1f} us" for name, n, us in top) or "none profiled"
                graph = "CUDA graph" if device == "cuda" else "block"
                variant = f"failed, {fused}" if isinstance(fused, str) else (
                    f"{fused[0]:.0f} us a step, {fused[1]} matrix products decomposed"
                    + (" (none: it timed the plain step)" if not fused[1] else "")
                    + f", the weights after 5 epochs {fused[2]:.2e} apart")
                say(f"A stack of {size} sine MLPs, compiled, 10 steps a {graph}: {step_us:.0f} us a step (its matrix "
                    f"products of a dimension 1 as broadcast products: {variant}); one "
                    f"launch a step, profiled: {count:.0f} kernels a step, {gpu_us:.0f} us of GPU time a step; an "
                    f"epoch's orders ({size} randperms) {orders:.1f} ms" + (f" (drawn on the CPU, pinned and copied "
                    f"{on_cpu:.1f} ms)" if device == "cuda" else "") + f", against {epoch:.1f} ms of steps an epoch. "
                    f"The kernels of most GPU time: {most}.", "")
        step("kernels", kernels)
    if wanted("sine-cpu", "the sine protocol on this machine's CPU cores",
              device == "cpu" and "with --device cuda only"):
        say("## The sine protocol on this machine's CPU cores", "", "| what | device | seconds | results |",
            "|---|---|---|---|")
        def on_cpu():
            seconds, _, rows, _ = run(sine.main, ["--runs", runs, *small, "--device", "cpu", "--out",
                                                  scratch / "sine-cpu"], "cpu", logs / "sine-cpu.log")
            say(protocol_line(f"`python merge.py --task sine --runs {runs}`", "cpu", seconds, rows, "test_mse", True))
        step("sine protocol on the CPU", on_cpu)
    if wanted("small-runs", "small runs of each experiment against the CPU's rows"):
        say("", "## Small runs, the GPU's rows against the CPU's", "", "| experiment | device | trainer | model-epochs | "
            "seconds | s / model-epoch | peak GPU MiB | largest difference from the CPU's rows |",
            "|---|---|---|---|---|---|---|---|")
        against_cpu(scratch, device, say, args.budget - (time.time() - began))
    if left_out:
        say("", f"Left out: {'; '.join(left_out)}.")
    say("", f"{time.time() - began:.0f} s in all.")

def against_cpu(scratch, device, say, seconds_left):
    """Small runs of each experiment on the CPU and (on a GPU) on the GPU: timings and how far the rows differ."""
    began = time.time()

    def add(what, where, trainer, result, reference=None, metric="test_accuracy"):
        seconds, memory, rows, _ = result
        difference = f"{largest_difference(rows, reference, metric):.2e}" if reference else "-"
        say(f"| {what} | {where} | {trainer} | {model_epochs(rows)} | {seconds:.1f} | "
            f"{seconds / model_epochs(rows):.5f} | {memory:.0f} | {difference} |")
    steps = [
        ("sine, 10 runs x 60 epochs", sine.main, SINE, "test_mse", [("stacked", ["--stack", "1"])]),
        ("LeNet on synthetic images, 2 runs x 12 epochs", lenet_imagewoof.main,
         ["--data", write_images(scratch / "woof"), "--runs", 2, "--epochs", 12, "--compile", 0], "test_accuracy",
         [("stacked", ["--stack", "1"]), ("one at a time", ["--stack", "0"])]),
        ("ResNet20 on synthetic CIFAR-100-format pickles, width 8, 1 run x 6 epochs", cifar.main,
         ["--data", write_cifar(scratch / "cifar"), "--experiment", "resnet20-cifar100", "--width", 8, "--runs", 1,
          "--epochs", 6], "test_accuracy", [("one at a time", ["--stack", "0"])]),
        ("VGG-11 on synthetic CIFAR-10-format pickles, width 8, 1 run x 6 epochs", cifar.main,
         ["--data", scratch / "cifar", "--experiment", "vgg11-cifar10", "--width", 8, "--runs", 1, "--epochs", 6,
          "--compile", 0], "test_accuracy", [("stacked", ["--stack", "1"]), ("one at a time", ["--stack", "0"])]),
    ]
    for i, (what, script, common, metric, trainers) in enumerate(steps):
        for trainer, flags in trainers:
            if time.time() - began > seconds_left:
                say(f"| {what} | - | {trainer} | left out: past --budget |")
                continue
            try:
                on_cpu = run(script, [*common, *flags, "--device", "cpu", "--out", scratch / f"{i}{trainer}cpu"], "cpu")
                if device == "cuda":
                    add(what, "cuda", trainer, run(script, [*common, *flags, "--device", "cuda",
                                                            "--out", scratch / f"{i}{trainer}cuda"], "cuda"),
                        on_cpu[2], metric)
                add(what, "cpu", trainer, on_cpu)
            except Exception as e:  # noqa: BLE001 - report it and go on with the next step
                say(f"| {what} | {device} | {trainer} | failed: {type(e).__name__}: {str(e)[:200]} |")

if __name__ == "__main__":
    main(sys.argv[1:])
