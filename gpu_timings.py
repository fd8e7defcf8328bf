"""What gpu_check.py measures, beside it: synthetic data in the real formats (an Imagewoof-layout folder,
CIFAR pickles, natural-looking JPEGs of ImageNet's size), ImageNet's loader and ResNet18 images/s, and the
stacked sine step: with and without CUDA graphs, where its time goes (kernels, data orders, its matrix
products fused). Each is a function gpu_check.py calls and reports; none writes a report itself."""
import contextlib
import json
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch

def write_images(root, classes=4, per_class=24, size=40):
    """A small folder in the Imagewoof layout: class c (of at most 16) is a bright square in cell c of a 4 x 4
    grid, on noise."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", per_class // 3)):
        for c in range(classes):
            (root / split / f"class{c}").mkdir(parents=True)
            for j in range(n):
                pixels = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
                row, col = divmod(c % 16, 4)
                pixels[row * size // 4:(row + 1) * size // 4, col * size // 4:(col + 1) * size // 4] += 120
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

def imagenet_throughput(scratch, device, decode="cpu", workers=-1):
    """Images per second of ResNet18's training on ImageNet-sized JPEGs (500 x 375, natural-looking, synthetic)
    at 224 px, batch 256 (on a CPU, a try at 64 px and batch 16): the loader alone (decoding and cropping in its
    workers, or on the GPU with --decode gpu; jitter and normalisation on the device), the model alone (a
    training step on a batch already there, bf16 and channels-last on a GPU) and the two together (the loader
    feeding the steps); and argv, imagenet.py's settings of these runs (for imagenet_epoch)."""
    import imagenet
    import streaming
    import merge
    cuda = device == "cuda"
    size, batch, count = (224, 256, 12_800) if cuda else (64, 16, 640)
    folder = scratch / "imagenet"
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
    return dict(size=size, batch=batch, workers=streaming.loader_workers(s), loader=loader, model=alone, together=together,
                decoding=decoding, same=same, argv=argv)

def imagenet_epoch(argv, scratch, device, decode, log="imagenet.log"):
    """Images per second of an epoch of imagenet.py with imagenet_throughput's argv, its own count from the
    start of the epoch (NaN where it printed none)."""
    import imagenet
    _, _, _, printed = run(imagenet.main, [*argv, "--out", scratch / f"imagenet_out_{decode}", "--strategies", "one",
                                           "--phase-epochs", 1, 1, 1, 1, 1, "--short", 1], device, log)
    rates = [float(line.split(" images/s")[0].rsplit(" ", 1)[1]) for line in printed.splitlines() if "images/s" in line]
    return rates[len(rates) // 2 - 1] if rates else float("nan")

def sine_stack(size, device):
    """size sine MLPs, model r made from seed r."""
    import merge
    models = []
    for seed in range(size):
        torch.manual_seed(seed)
        models.append(merge.SineMLP().to(device))
    return models

def sine_graphs(device, size=50, points=10_000):
    """The stacked sine step with and without CUDA graphs of 10 steps, compiled, then eager, each yielded as soon
    as it is measured: (compile, microseconds a step of a stack of `size` models on `points` points without
    graphs, and with them (the median epoch past the first two), the largest difference between the weights
    with graphs and without, and compiled, that between two compilations without graphs, the second with torch's
    compile caches off (so that it chooses its kernels afresh); eager, None). On a CPU, no graphs."""
    import merge
    import stacked
    s, data = merge.Settings(), merge.sine_data(0, points, 100, 100, device=device)
    graphs = device == "cuda"
    for use_compile, variants in ((1, (False, graphs, "again")), (0, (False, graphs))):
        times, weights = {}, {}
        for variant in dict.fromkeys(variants):  # a CPU's False once
            models, ends = sine_stack(size, device), []
            with torch._inductor.config.patch(force_disable_caches=variant == "again"):  # afresh, no cache
                stacked.fit_stacked(models, [data] * size, s, 6, seeds=range(size), compile=use_compile,
                                    graphs=variant is True,
                                    after_epoch=lambda epoch, history: ends.append(time.time()))  # a GPU's: late
            steps = -(-points // s.batch)
            times[variant] = float(np.median(np.diff(ends[1:-1]))) / steps * 1e6  # epochs 2-4 (the last
            # epoch's row waits for the GPU's tail alone)
            weights[variant] = torch.cat([p.detach().flatten() for m in models for p in m.parameters()])
        differ = lambda a, b: (weights[a] - weights[b]).abs().max().item() if a in weights else 0.0  # noqa: E731
        yield use_compile, times[False], times.get(True, times[False]), differ(True, False), \
            differ("again", False) if use_compile else None

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
    bo3 models'), each size yielded as soon as it is measured: (size, (microseconds a step, compiled, 10 steps a
    CUDA graph; with broadcast_products (its microseconds a step, the products decomposed, the weights' largest
    difference after the epochs) or why it failed; kernels a step and their GPU time in microseconds, profiled
    one launch a step, those launched at least once a step;
    milliseconds an epoch to draw its orders, a randperm a model as fit_stacked draws them, and drawn on the CPU,
    pinned and copied instead; milliseconds of steps an epoch; the five kernels of most GPU time, each (name,
    launches a step, microseconds a step); why profiling failed, or "")). A failed profile leaves the rest."""
    import merge
    import stacked
    from torch.profiler import ProfilerActivity, profile
    s, data = merge.Settings(), merge.sine_data(0, 10_000, 100, 100, device=device)
    steps = -(-10_000 // s.batch)
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
        kernels, unprofiled = [], ""
        try:
            train(1, graphs=False)  # compiled again one launch a step, then profiled with the compiled step cached
            with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])) \
                    as p:
                train(1, graphs=False)
            kernels = [e for e in p.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA and
                       e.count >= steps - 1]  # at least once a step (the short last step may have kernels of its own)
        except Exception as e:  # noqa: BLE001 - no profiler here (CUPTI): the timings stand
            unprofiled = f"{type(e).__name__}: {str(e)[:100]}"
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
        yield size, (step, fused, sum(e.count for e in kernels) / steps,
                     sum(e.self_device_time_total for e in kernels) / steps, *orders, step * steps / 1e3,
                     [(e.key[:80], e.count / steps, e.self_device_time_total / steps) for e in top], unprofiled)

def run(main, argv, device, log):
    """One command line in this process: (seconds, peak GPU memory in MiB, rows, what it printed). What it and
    its worker processes print goes to the file log as it comes, so that a command that fails or is cut off
    leaves what it said there; a failed command raises with its error line."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    sys.stdout.flush(), sys.stderr.flush()
    code, started = 0, time.time()
    with open(log, "w", buffering=1) as file, contextlib.redirect_stdout(file), contextlib.redirect_stderr(file):
        saved = os.dup(1), os.dup(2)
        os.dup2(file.fileno(), 1), os.dup2(file.fileno(), 2)  # the workers' output too, which is not sys.stdout's
        try:
            main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
        finally:
            file.flush()
            for fd, old in zip((1, 2), saved):
                os.dup2(old, fd), os.close(old)
    seconds, printed = time.time() - started, Path(log).read_text(errors="replace")
    if code:
        said = [line for line in printed.splitlines() if line.startswith(("error:", "interrupted"))]
        raise RuntimeError(f"{' '.join(map(str, argv))}: exit code {code}: " + (said[-1] if said else f"see {log}"))
    memory = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0
    out = Path(argv[argv.index("--out") + 1])
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return seconds, memory, rows, printed
