"""The --device cuda path, timed and checked in one go on a machine with a GPU, in some 6 minutes: the
stacked step with and without CUDA graphs, compiled and eager; the whole sine protocol (50 runs),
compiling, again with torch's compiled steps cached, and again with its stacks one after another, as a
CPU trains them, not by turns (the largest difference of its rows is reported); LeNet, 10 runs x 60 epochs,
stacked, compiled and eager; ImageNet's loader and ResNet18 on synthetic JPEGs (the loader alone, the
model alone, both; Pillow and nvJPEG); then, while --budget lasts, LeNet with its compiled steps cached,
where a step of the stacked sine goes (its kernels, their GPU time, drawing an epoch's orders), the sine
protocol on this machine's CPU cores and small runs of each experiment on the GPU against the CPU's rows.
Each timing says how often a CUDA graph could not be recorded (its steps then ran one launch a kernel). It
writes its report to --report as it goes, and each command's output to its log (REPORT_logs/) as it comes; a
step that fails leaves its traceback in REPORT_logs/failed.log, and the check then exits with 1. --only runs
some of its steps again, in this order whatever the order named. The measurements are gpu_timings.py's.

    python gpu_check.py --report gpu_check.md --lenet-data DIR     # on one GPU
    python gpu_check.py --only imagenet-gpu graphs                 # two steps again, after a change
    python gpu_check.py --device cpu --small                       # the steps a CPU can run, tiny (4 min)
"""
import argparse
import functools
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

if __name__ == "__main__":  # as every command: Ctrl-C while torch loads, torch's threads (startup.py)
    import startup
    startup.before_torch()

import numpy as np
import torch

import cifar
import experiment
import images
import lenet_imagewoof
import sine
from gpu_timings import imagenet_epoch, imagenet_throughput, run, sine_graphs, sine_kernels, write_cifar, write_images
from report import write_whole

STEPS = ("graphs", "sine", "lenet", "imagenet-cpu", "imagenet-gpu", "lenet-cached", "kernels", "sine-cpu",
         "small-runs")
SINE = ["--runs", "10", "--epochs", "60", "--n-train", "2000", "--n-val", "500", "--n-test", "2000", "--workers", "1"]

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
    parser.add_argument("--budget", type=float, help="seconds after which the optional steps (LeNet "
                        "again, where a sine step goes, the CPU's sine protocol, small runs against the CPU's rows) "
                        "are left out [300; with --small, none]")
    parser.add_argument("--small", action="store_true", help="tiny budgets throughout, every step: a try-out")
    parser.add_argument("--only", nargs="+", choices=STEPS, default=STEPS, metavar="STEP", help="these steps alone "
                        f"(of {', '.join(STEPS)}), a check again after a change [all]")
    args = parser.parse_args(argv)
    args.budget = args.budget if args.budget is not None else float("inf") if args.small else 300
    if not Path(args.report).name or Path(args.report).is_dir():
        parser.error(f"--report {args.report!r} names no file: give the report's file name")
    if not args.budget >= 0 or args.lenet_data and not Path(args.lenet_data).is_dir():
        parser.error(f"--budget must be 0 or more, got {args.budget}" if not args.budget >= 0 else
                     f"--lenet-data {args.lenet_data} is not a folder")
    try:  # a LeNet step minutes into the check must not be the first to find a folder it cannot use
        images.check_folder(Path(args.lenet_data)) if args.lenet_data and {"lenet", "lenet-cached"} & set(args.only) \
            else None
    except experiment.InputError as e:
        parser.error(f"--lenet-data is not a folder in Imagewoof's layout ({e})")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("torch sees no GPU here; use --device cpu to try the steps on the CPU")
    device, began = args.device, time.time()
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU only"
    report, scratch = Path(args.report), Path(tempfile.mkdtemp())
    logs = report.parent / (report.stem + "_logs")  # what each command printed, and the failed steps' tracebacks
    lines = [f"# GPU check: {name}, torch {torch.__version__}, {os.cpu_count()} CPU cores", ""]
    try:
        logs.mkdir(parents=True, exist_ok=True)
        write_whole(report, "\n".join(lines) + "\n")
        (logs / "failed.log").unlink(missing_ok=True)  # an earlier check's
    except OSError as e:
        parser.error(f"cannot write the report {report} ({e.strerror or e})")

    def say(*new):
        lines.extend(new)
        print("\n".join(new), flush=True)
        write_whole(report, "\n".join(lines) + "\n")  # the whole report, or the one before where a kill stops it

    failed = []  # the steps that failed, named at the report's end; the check then exits with 1

    def step(what, work):
        import stacked
        failures = stacked.Graphs.failures
        try:
            work()
        except Exception as e:  # noqa: BLE001 - report it and go on with the next step
            failed.append(failure(logs, what))
            say(f"{what}: failed: {type(e).__name__}: {str(e)[:300]} (its traceback: {logs / 'failed.log'})", "")
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
        size = 4 if args.small else 50
        for c, plain, graphed, difference, recompiled in sine_graphs(device, size, 1000 if args.small else 10_000):
            how = "compiled" if c else "eager"  # each said as it is measured: a later failure keeps it
            with_graphs = f"{graphed:.0f} us a step with 10 steps a CUDA graph ({plain / graphed:.1f}x); largest " \
                f"difference of the weights after 6 epochs {difference:.2e}" if device == "cuda" else \
                "no CUDA graphs on a CPU"
            say(f"A stack of {size} sine MLPs, batch 32, {how}: {plain:.0f} us a step one launch a step, "
                f"{with_graphs}" + (f"; between two compilations, the second with torch's compile caches off, "
                f"the weights differ by {recompiled:.2e}" if c else "") + ".", "")
    if wanted("graphs", "the stacked step in blocks of 10", optional=False):
        step("CUDA graphs", graphs)

    if {"sine", "lenet"} & set(args.only):
        say("## Whole protocols", "", "| what | device | seconds | results |", "|---|---|---|---|")
    small = ["--n-train", 1000, "--n-val", 200, "--n-test", 1000, "--epochs", 30] if args.small else []
    runs = 4 if args.small else 50
    sine_rows = {}  # of each attempt
    for i, attempt in enumerate(("compiling", "compiled steps cached by torch", "compiled steps cached, the stacks "
                                 "one after another, not by turns (`experiment.OVERLAP_ON_GPU = False`)")):
        def sine_protocol(attempt=attempt, i=i):
            experiment.OVERLAP_ON_GPU = i < 2
            try:
                seconds, _, rows, _ = run(sine.main, ["--runs", runs, *small, "--device", device, "--out",
                                                      scratch / f"sine-{i}"], device, logs / f"sine-{device}-{i}.log")
            finally:
                experiment.OVERLAP_ON_GPU = True
            sine_rows[i] = rows
            apart = "" if i < 2 or 1 not in sine_rows else "; on a CPU stacks never train by turns" if \
                device == "cpu" else \
                f"; largest difference from the rows by turns {largest_difference(rows, sine_rows[1], 'test_mse'):.2e}"
            say(protocol_line(f"`python merge.py --task sine --runs {runs}`, {attempt}", device, seconds, rows,
                              "test_mse", True)[:-2] + apart + " |")
        if wanted("sine", "the sine protocol", optional=False):
            step("sine protocol", sine_protocol)
    lenet_runs, lenet_epochs = (2, 6) if args.small else (10, 60)

    @functools.cache
    def lenet_data():  # written when a LeNet step first needs it
        return Path(args.lenet_data) if args.lenet_data else write_images(scratch / "woof10", 10,
                                                                          60 if args.small else 600, 32)

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
            decoding = f"{r['decoding']:.0f}" if decode == "gpu" else "-"
            say(f"ResNet18 at {r['size']} px, batch {r['batch']}, `--decode {decode}`, on synthetic natural-looking "
                f"JPEGs of ImageNet's size (500 x 375, about 80 KB), {r['workers']} loader workers on "
                f"{os.cpu_count()} CPU cores, {name}, in images/s:", "",
                "| the loader alone | of which decoding and cropping on the GPU | the model alone | the two together "
                "| minutes an epoch of ImageNet (1,281,167 images) |", "|---|---|---|---|---|",
                f"| {r['loader']:.0f} | {decoding} | {r['model']:.0f} | {r['together']:.0f} | "
                f"{1_281_167 / r['together'] / 60:.0f} |", "",
                f"Batches made ready in the loader's thread and stream, that stream held back: largest difference "
                f"from the same batches made in the main thread {r['same']:.2e}.", "")  # said before the epoch runs
            epoch = imagenet_epoch(r["argv"], scratch, device, decode, log=logs / f"imagenet-{decode}.log")
            say(f"An epoch of imagenet.py with these settings, from its start: {epoch:.0f} images/s.", "")
        step(f"ImageNet throughput, --decode {decode}", throughput)

    if wanted("lenet-cached", "LeNet again, its compiled steps cached", "lenet" not in args.only and
              "it needs the lenet step before it"):
        say("", "## LeNet again", "", "| what | device | seconds | results |", "|---|---|---|---|")
        step("LeNet", lambda: lenet(1, "compiled (`--compile 1`), its steps cached by torch", ["--compile", 1]))
    if wanted("kernels", "where a step of the stacked sine goes"):
        say("", "## Where a step of the stacked sine goes", "")
        def kernels():
            sizes = (4, 8) if args.small else (50, 250)
            for size, (step_us, fused, count, gpu_us, orders, on_cpu, epoch, top, unprofiled) in \
                    sine_kernels(device, sizes):  # each size said as it is measured
                most = "; ".join(f"`{name}` {n:.0f} a step, {us:.1f} us" for name, n, us in top) or \
                    f"none profiled{f' (profiling failed: {unprofiled})' if unprofiled else ''}"
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
        say("", "## The sine protocol on this machine's CPU cores", "", "| what | device | seconds | results |",
            "|---|---|---|---|")
        def on_cpu():
            seconds, _, rows, _ = run(sine.main, ["--runs", runs, *small, "--device", "cpu", "--out",
                                                  scratch / "sine-cpu"], "cpu", logs / "sine-cpu.log")
            say(protocol_line(f"`python merge.py --task sine --runs {runs}`", "cpu", seconds, rows, "test_mse", True))
        step("sine protocol on the CPU", on_cpu)
    if wanted("small-runs", "small runs of each experiment against the CPU's rows"):
        say("", "## Small runs, the GPU's rows against the CPU's", "", "| experiment | device | trainer | model-epochs | "
            "seconds | s / model-epoch | peak GPU MiB | largest difference from the CPU's rows (other data orders) |",
            "|---|---|---|---|---|---|---|---|")
        failed += against_cpu(scratch, logs, device, say, args.budget - (time.time() - began))
    if left_out:
        say("", f"Left out: {'; '.join(left_out)}.")
    say("", f"{time.time() - began:.0f} s in all." + (f" Failed: {'; '.join(failed)}." if failed else ""))
    if failed:
        sys.exit(1)

def failure(logs, what):
    """what, after the traceback of the exception being handled is written to stderr and logs/failed.log."""
    trace = traceback.format_exc()
    print(trace, file=sys.stderr)
    with open(logs / "failed.log", "a") as f:
        f.write(f"== {what}\n{trace}\n")
    return what

def against_cpu(scratch, logs, device, say, seconds_left):
    """Small runs of each experiment on the CPU and (on a GPU) on the GPU: timings and how far the rows differ.
    The runs that failed."""
    began, failed = time.time(), []

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
        ("VGG-11 on synthetic CIFAR-10-format pickles, width 8, 1 run x 6 epochs", cifar.main,  # BatchNorm and
         ["--data", scratch / "cifar", "--experiment", "vgg11-cifar10", "--width", 8, "--runs", 1, "--epochs", 6,
          "--compile", 0], "test_accuracy", [("one at a time", ["--stack", "0"])]),  # augmentation: never stacked
    ]
    for i, (what, script, common, metric, trainers) in enumerate(steps):
        for trainer, flags in trainers:
            if time.time() - began > seconds_left:
                say(f"| {what} | - | {trainer} | left out: past --budget |")
                continue
            try:
                on_cpu = run(script, [*common, *flags, "--device", "cpu", "--out", scratch / f"{i}{trainer}cpu"], "cpu",
                             logs / f"small-{i}-{trainer.replace(' ', '-')}-cpu.log")
                add(what, "cpu", trainer, on_cpu)  # said before the GPU's run, which may fail
                if device == "cuda":
                    add(what, "cuda", trainer, run(script, [*common, *flags, "--device", "cuda",
                                                            "--out", scratch / f"{i}{trainer}cuda"], "cuda",
                                                   logs / f"small-{i}-{trainer.replace(' ', '-')}-cuda.log"),
                        on_cpu[2], metric)
            except Exception as e:  # noqa: BLE001 - report it and go on with the next step
                failed.append(failure(logs, f"small run: {what}, {trainer}"))
                say(f"| {what} | {device} | {trainer} | failed: {type(e).__name__}: {str(e)[:200]} |")
    return failed

if __name__ == "__main__":
    main(sys.argv[1:])
