"""The fast path beside merge.py: many small models of one architecture trained as one stack (vmap
over functional_call, SGD written out, the step compiled), with gate noise from a counter.

merge.fit draws its gates' u from torch's generator, which a stack cannot share out model by model.
Here u is a hash of (seed, layer, step, index), a counter-based generator like Philox: a model
drawing it alone (counter_noise, given to merge.fit) and the same model inside a stack (KeyedGate)
see the same u, and take the same data orders (merge.epoch_seed), so the stack trains what merge.fit
trains one model at a time: to rounding (1e-12 in float64; test_stacked.py checks it, teacher and
importance phases). Data that is augmented is not for a stack: its draws would
be the stack's, not each model's (experiment.py trains such phases one at a time).
"""
import contextlib
import copy
import errno
import itertools
import logging
import os
import shutil
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

import merge

log = logging.getLogger("merge")

# == Counter-based noise ===========================================================================
# DEVIATION: the runs' gate noise comes from a counter, not from one generator's stream, so that a model gets
# the same numbers alone or in a stack, and a resumed run the same as an unbroken one; alike in distribution.

def mix(x):
    """An integer hash (Mueller's) of the 32 bits of each int32 in x; the products wrap around."""
    x = (x ^ (x >> 16) & 0xFFFF) * 0x45D9F3B  # >> keeps the sign: & 0xFFFF keeps the bits shifted in
    x = (x ^ (x >> 16) & 0xFFFF) * 0x45D9F3B
    return x ^ (x >> 16) & 0xFFFF

def counter(*parts):
    """The key, an int32 tensor, of non-negative integers (seed, layer), each of up to 64 bits."""
    key = torch.zeros((), dtype=torch.int32)
    for half in torch.tensor([[part & 0xFFFFFFFF, part >> 32] for part in parts]).flatten().to(torch.int32):
        key = mix(key ^ half)
    return key

def uniform(key, step, count):
    """count numbers in [0, 1): the top 24 bits of mix(mix(key ^ step) + index), index = 0 ... count - 1."""
    index = torch.arange(count, device=key.device, dtype=torch.int32)
    return (mix(mix(key ^ step) + index) >> 8 & 0xFFFFFF) / 2 ** 24

class CounterNoise:
    """gate.noise of a model trained alone: at its t-th call (the t-th training step), the u of step t."""

    def __init__(self, seed, layer, device, step=0):
        self.key, self.step = counter(seed, layer).to(device), step

    def __call__(self, B, n):
        u = uniform(self.key, self.step, B * n)  # the step a Python int: no copy to a GPU, no wait, each call
        self.step += 1
        return u.view(B, n)

def counter_noise(model, seed, step=0):
    """Every gate of model given counter noise of (seed, its layer), from training step `step` on."""
    noises = [CounterNoise(seed, layer, gate.loc.device, step) for layer, gate in enumerate(merge.gates(model))]
    for gate, noise in zip(merge.gates(model), noises):
        gate.noise = noise
    return noises

class KeyedGate(merge.Gate):
    """A gate of the stack: u from its model's key and the step, buffers that functional_call passes in."""

    def noise(self, B, n):
        return uniform(self.key, self.step, B * n).view(B, n)

# == The stacked trainer ===========================================================================

STEPS_PER_BLOCK = 10  # SGD steps a block: on a GPU one CUDA graph, launched at once (a small stack's step is
# bound by launching its kernels); on a CPU the same steps one after another

def fit_stacked(*args, **kwargs):
    """fit_stacked_epochs run to its end: the phase trained, its history returned."""
    epochs = fit_stacked_epochs(*args, **kwargs)
    while True:
        try:
            next(epochs)
        except StopIteration as end:
            return end.value

def fit_stacked_epochs(models, datas, s, epochs, drops=(), seeds=(0,), lambdas=None, share=0.5, warmup=0,
                       after_epoch=None, compile=True, steps_per_block=STEPS_PER_BLOCK, graphs=None, checkpoint=None):
    """merge.fit for many small models of one architecture without BatchNorm, as one stack, an epoch at a time:
    a generator that yields after each epoch is queued (Lockstep trains other stacks between) and returns the
    history (fit_stacked runs it to its end). The summed loss gives each model its own gradient and SGD is
    elementwise, so each trains as merge.fit trains it alone with counter_noise(model, seed), on its own
    data, order and noise. The step is compiled (compile: see compiles), once a phase: an epoch's short last
    batch runs eagerly where the compiled step cannot take it.
    The steps run in blocks of steps_per_block, each block one CUDA graph where graphs (None: on a GPU).
    after_epoch(epoch, history) is called after each epoch; on a GPU once the next epoch is queued, so that
    the GPU trains on while the host reads an epoch's numbers and draws the next one's orders.
    With a checkpoint (a path), the stack's state is written there after an epoch whenever CHECKPOINT_SECONDS
    have passed since the last, and a stack of the same seeds goes on from it (resumed)."""
    device, models = datas[0].device, [model.train() for model in models]  # gates draw noise, as in merge.fit
    base = copy.deepcopy(models[0]).to("meta")  # the architecture, without weights
    compile = compiles(compile, device, base, epochs)
    gate_names = [name for name, m in base.named_modules() if isinstance(m, merge.Gate)]
    for gate in merge.gates(base):
        gate.__class__ = KeyedGate  # its noise from the buffers key and step below
        gate.register_buffer("key", None, persistent=False)
        gate.register_buffer("step", None, persistent=False)
    params, buffers = torch.func.stack_module_state(models)
    assert not buffers, "fit_stacked is for networks without BatchNorm statistics"
    params = {name: p.detach().clone() for name, p in params.items()}  # (R, ...) each
    momenta = {name: torch.zeros_like(p) for name, p in params.items()}
    is_gate = {name: name.rsplit(".", 1)[0] in gate_names for name in params}
    shared = all(d.x_train is datas[0].x_train for d in datas)  # one data set for all: no R copies of it
    X, Y = ((datas[0].x_train, datas[0].y_train) if shared else  # (N, ...) or (R, N, ...)
            (torch.stack([d.x_train for d in datas]), torch.stack([d.y_train for d in datas])))
    N = len(datas[0].x_train)
    rows = torch.arange(len(models), device=device)[:, None]
    keys = {f"{name}.key": torch.stack([counter(seed, layer) for seed in seeds]).view(-1, 1).to(device)  # (R, 1)
            for layer, name in enumerate(gate_names)}
    error_loss = F.mse_loss if datas[0].metric == "mse" else F.cross_entropy
    # the state the steps change in place: tensors that keep their place, as a CUDA graph needs
    total, step = torch.zeros(len(models), device=device), torch.zeros((), dtype=torch.int32, device=device)
    lr, lam = torch.zeros((), device=device), torch.zeros((), device=device)  # tensors: a new value, no recompile
    state = (params, momenta, total, step, lr, lam)

    def loss(params, keys, x, y, lam, step):  # one model: params and gate keys without the R axis
        steps = {f"{name}.step": step for name in gate_names}
        error = error_loss(torch.func.functional_call(base, (params, keys, steps), (x,)), y)
        return error + lam * merge.l_half([params[f"{name}.loc"] for name in gate_names], share), error

    weight_names = [name for name in params if not is_gate[name]]
    loc_names = [name for name in params if is_gate[name]] if lambdas is not None else []  # importance alone

    def update(params, momenta, total, step, lr, lam, x, y):  # one SGD step of every model; x, y (R, B, ...)
        def summed(params):
            losses, errors = torch.func.vmap(loss, in_dims=(0, 0, 0, 0, None, None), randomness="error")(
                params, keys, x, y, lam, step)
            return losses.sum(), errors
        grads, errors = torch.func.grad(summed, has_aux=True)(params)
        for names, rate, momentum, decay in ((weight_names, lr, s.momentum, s.weight_decay),
                                             (loc_names, s.gate_lr, 0.9, 0)):
            if not names:  # merge.optimizers' two SGDs, each group's tensors at once (foreach: few kernels)
                continue
            p, buf, d_p = ([d[name] for name in names] for d in (params, momenta, grads))
            d_p = torch._foreach_add(d_p, p, alpha=decay) if decay else d_p  # d_p = grad + decay p
            torch._foreach_mul_(buf, momentum)  # buf = momentum buf + d_p
            torch._foreach_add_(buf, d_p)
            torch._foreach_sub_(p, torch._foreach_mul(buf, rate))  # p -= lr buf
        total.add_(errors.detach() * x.shape[1])
        step.add_(1)

    update, history = compiled(update, compile), []
    if compile and COMPILER["works"]:
        log.info("    compiling the stacked step (torch keeps it for later runs)")

    def block(state, x, y):  # steps_per_block steps, or the epoch's last few; x, y (R, steps x batch, ...)
        x = datas[0].prepare(x.flatten(0, 1), True).unflatten(0, x.shape[:2])
        for x_step, y_step in zip(x.split(s.batch, dim=1), y.split(s.batch, dim=1)):  # (R, B, ...)
            for t in (x_step, y_step) if epoch == start else ():  # compiled for any batch size, where it can be
                torch._dynamo.maybe_mark_dynamic(t, 1)
            if x_step.shape[1] == s.batch:
                update(*state, x_step, y_step)
            else:  # an epoch's short last batch: compiled as the others where that took any size, else eagerly
                # (under vmap a conv fixes the batch size: LeNet's step would be compiled twice). This stance
                # evaluates the guards again, as it must, whatever skip_guard_eval_unsafe said
                with torch.compiler.set_stance("eager_on_recompile"):
                    update(*state, x_step, y_step)
    graphs = device.type == "cuda" if graphs is None else graphs
    run_block = Graphs(block, state) if graphs else lambda x, y: block(state, x, y)

    def finish(epoch, numbers, copied=None):  # an epoch's row, once its numbers are on the host
        if copied:
            copied.synchronize()  # waits for this epoch's steps, not for the next epoch's
        history.append(dict(epoch=epoch, error=numbers[0].tolist()))
        if lambdas is not None:
            history[-1].update(l_half=numbers[1].tolist(), open=[p_open.tolist() for p_open in numbers[2:]])
        if after_epoch:
            after_epoch(epoch, history)
    pending = None  # on a GPU, the epoch before: its numbers read once the next epoch is queued behind it
    start, history[:] = resumed(checkpoint, seeds, params, momenta, step, epochs) if checkpoint else (0, [])
    kept = time.time()  # when the state was last written to checkpoint
    due = lambda: checkpoint and time.time() - kept >= CHECKPOINT_SECONDS  # noqa: E731

    def keep(epoch):  # after the epoch's row: the state and the rows agree
        nonlocal kept
        if due():
            save_stack(checkpoint, dict(seeds=list(seeds), epochs=epochs, epoch=epoch, step=int(step),
                                        history=history, params={k: v.cpu() for k, v in params.items()},
                                        momenta={k: v.cpu() for k, v in momenta.items()}))
            kept = time.time()
    for epoch in range(start, epochs):
        total.zero_(), lr.fill_(merge.lr_at(s, epoch, epochs, drops, warmup))
        lam.fill_(lambdas[epoch] if lambdas is not None else 0.0)
        order = torch.stack([torch.randperm(N, device=device, generator=torch.Generator(device).manual_seed(
            merge.epoch_seed(seed, epoch))) for seed in seeds])  # (R, N): merge.fit's orders
        X_epoch, Y_epoch = (X[order], Y[order]) if shared else (X[rows, order], Y[rows, order])  # (R, N, ...)
        with torch.compiler.set_stance(skip_guard_eval_unsafe=epoch > start):  # the first compiled all it needs
            for x, y in zip(X_epoch.split(steps_per_block * s.batch, dim=1),
                            Y_epoch.split(steps_per_block * s.batch, dim=1)):
                run_block(x, y)
        gate_locs = [params[f"{name}.loc"] for name in gate_names]  # (R, n) each
        numbers = [total / N] + ([merge.l_half(gate_locs, share)] + [merge.p_open(loc) for loc in gate_locs]
                                 if lambdas is not None else [])
        del X_epoch, Y_epoch, order, x, y  # not kept while other stacks take their turns
        if not rows_behind(device):
            finish(epoch, numbers)
            keep(epoch)
            yield
            continue
        # on a GPU: the numbers copied to the host as the GPU gets there, while the host queues the next epoch
        numbers = [torch.empty(n.shape, dtype=n.dtype, pin_memory=True).copy_(n, non_blocking=True) for n in numbers]
        copied = torch.cuda.Event()
        copied.record()
        if pending:
            finish(*pending)
        pending = epoch, numbers, copied
        if due():  # this epoch's row now, then the state
            finish(*pending)
            keep(epoch)
            pending = None
        yield
    if pending:
        finish(*pending)
    for r, model in enumerate(models):
        model.load_state_dict({name: p[r] for name, p in params.items()})
    return history

def rows_behind(device):
    """Whether an epoch's numbers are read once the next epoch is queued (at once where a checkpoint is due): on
    a GPU, which trains on meanwhile."""
    return device.type == "cuda"

CHECKPOINT_SECONDS = 60  # a stack's state written at most this often (checkpoint): a kill loses a minute or less

def save_stack(path, state):
    """torch.save(state, path), whole or not at all: a temporary file, then a rename; its folder is made; a full
    disk an OSError (report.save_whole's way, written here so that stacked.py needs no more than merge.py, as in
    the handout; its own name, so that tests can stop a stack's checkpoints alone)."""
    path = Path(path)
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.save(state, part)
        part.replace(path)
    except RuntimeError as e:
        if shutil.disk_usage(part.parent).free >= 1 << 24:  # another failure (a GPU's, say): as it is
            raise
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
    finally:
        part.unlink(missing_ok=True)

def resumed(path, seeds, params, momenta, step, epochs):
    """(the epoch to go on from, the rows so far) of the stack saved at path, its state copied into params,
    momenta and step; (0, []) where there is none, or it is damaged or of other models (with one line)."""
    try:
        state = torch.load(path, map_location=step.device, weights_only=True)
        if state["seeds"] != list(seeds) or state["epochs"] != epochs or any(state[name].keys() != mine.keys() or any(
                state[name][k].shape != v.shape for k, v in mine.items()) for name, mine in
                (("params", params), ("momenta", momenta))):
            raise ValueError("another stack's")
    except FileNotFoundError:
        return 0, []
    except Exception as e:  # noqa: BLE001 - a damaged file, or another stack's: trained from the start
        log.warning(f"  {path} is damaged or another stack's ({type(e).__name__}); training its stack from the start")
        return 0, []
    for name, mine in (("params", params), ("momenta", momenta)):
        for k, v in mine.items():
            v.copy_(state[name][k])
    step.fill_(state["step"])
    log.info(f"    resumed after epoch {state['epoch'] + 1} of {epochs}")
    return state["epoch"] + 1, state["history"]

class Graphs:
    """block(state, x, y), several SGD steps, as CUDA graphs: one recorded for each shape of (x, y), then
    replayed on x and y copied into its inputs, all the steps in one launch instead of hundreds of kernel
    launches each. Before recording, the block runs once on a spare copy of the state (compiling, warming
    up), so that the state moves only when a graph is replayed; where recording fails, the block runs as
    it is, with one notice."""

    failures = 0  # blocks of this process that could not be recorded (gpu_check.py reports them)

    def __init__(self, block, state):
        self.block, self.state, self.graphs, self.pool, self.failed = block, state, {}, None, False

    def __call__(self, x, y):
        if self.failed:
            return self.block(self.state, x, y)
        key = (x.shape, y.shape)
        if key not in self.graphs:
            inputs = x.clone(), y.clone()  # where every replay finds its x and y
            spare = [({k: v.clone() for k, v in t.items()} if isinstance(t, dict) else t.clone()) for t in self.state]
            side = torch.cuda.Stream(x.device) if x.is_cuda else None  # the warm-up on a stream of its own, as
            if side:  # torch's CUDA graphs documentation asks
                side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side) if side else contextlib.nullcontext():
                self.block(spare, *inputs)
            if side:
                torch.cuda.current_stream(x.device).wait_stream(side)
            try:
                self.graphs[key] = self.record(lambda: self.block(self.state, *inputs)), inputs
            except Exception as e:  # noqa: BLE001 - any failure to record means: run the block as it is
                # an error inside the capture surfaces as capture_end's "previous error": the first one named too
                why = ", then ".join(f"{type(c).__name__}: {(str(c).splitlines() or [''])[0][:100]}"
                                     for c in (e.__context__, e) if c)  # each in one line
                log.warning(f"note: CUDA graphs are unavailable here ({why}); one launch a kernel")
                self.failed, Graphs.failures = True, Graphs.failures + 1
                return self.block(self.state, x, y)
        replay, (x_in, y_in) = self.graphs[key]
        x_in.copy_(x), y_in.copy_(y)
        replay()

    def record(self, work):
        """work's kernels as a CUDA graph (nothing runs): its replay; the graphs share one memory pool."""
        torch.cuda.synchronize()
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.current_stream()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                work()
        finally:  # where the capture failed, torch's capture stream can stay current
            torch.cuda.set_stream(stream)
        self.pool = graph.pool()
        return graph.replay

GPU_COMPILE_EPOCHS = 500  # --compile auto: a phase this long compiles a stack of convolutions on a GPU too

def stacks(stack, device):
    """--stack (1, 0 or auto) as whether to train alike phases as one stack; auto: on a GPU, where a stack of
    LeNets trained 10 runs x 60 epochs in 22 s (docs/speed.md), and not on a CPU, where its batched
    convolutions are slower than one model at a time."""
    return stack in (1, "1") or stack == "auto" and torch.device(device).type == "cuda"

def compiles(compile, device, model, epochs):
    """--compile (1, 0 or auto) as whether to compile a phase of epochs. auto compiles, but a stack of
    convolutions on a GPU only for a phase of GPU_COMPILE_EPOCHS or more: LeNet on one H100 compiled for up to
    25 s a phase, and its compiled epochs were 12-16% faster than eager ones, which repaid compiling after some
    330 to 670 epochs; at 10 runs x 60 epochs it took 76 s compiling, 22 s eagerly (docs/speed.md)."""
    if compile == "auto":
        convolutions = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
        return not (device.type == "cuda" and convolutions and epochs < GPU_COMPILE_EPOCHS)
    return compile not in (0, "0")

COMPILED_STEPS = itertools.count()  # numbers the compiled steps of a process: a name each
COMPILER = dict(works=True)  # False once torch.compile failed in this process: later steps run eagerly, unnoted

def compiled(step, use_compile):
    """torch.compile(step), or where that fails (no C++ compiler) the eager step, with a notice. The step gets a
    code object and a name of its own: torch keeps compiled code by code object, and what it learnt of the
    shapes (which to compile as symbols) by name, so each phase compiles afresh for its own sizes instead of
    piling up recompiles on one, and phases trained by turns (Lockstep on a GPU) keep theirs."""
    code = step.__code__.replace(co_name=f"{step.__name__}_{next(COMPILED_STEPS)}")
    step = types.FunctionType(code, step.__globals__, step.__name__, step.__defaults__, step.__closure__)
    fast = torch.compile(step) if use_compile and COMPILER["works"] else step

    def call(*args):
        nonlocal fast
        try:
            return fast(*args)
        except Exception as e:  # noqa: BLE001 - a compiler's failure (torch wraps it in a dynamo error): eagerly
            if "skip_guard_eval_unsafe" in str(e):  # a guard upset (Ctrl-C in it: report.on_interrupt), not the
                with torch.compiler.set_stance("eager_on_recompile"):  # compiler: checked again, never recompiled
                    return fast(*args)
            if fast is step or not isinstance(e, torch._dynamo.exc.TorchDynamoException) or \
                    torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise  # the step's own error (out of memory: not the compiler's); a CUDA graph's is Graphs' to handle
            out = step(*args)  # eagerly: an error here is the step's own (a student's function), raised, no note
            log.warning(f"note: torch.compile failed here ({type(e).__name__}: {str(e)[:200]}); this process trains "
                        "eagerly from now on")
            fast, COMPILER["works"] = step, False
            return out
    return call
