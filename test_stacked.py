"""Tests for stacked.py, the fast path: given the same counter noise, the stacked trainer trains
exactly what merge.fit trains one model at a time (teacher and importance phases, eager and
compiled); a compiler that fails falls back to eager with one notice; Lockstep runs the plain
strategies of merge.py so that their phases stack, and changes no model."""
import contextlib
import errno
import functools
import logging
import os
import shutil
import sys
import threading
import types
from pathlib import Path

import pytest
import torch

import lockstep
import merge
import stacked

# inductor's C++ code generation, which torch.compile on a CPU needs (without it a step runs eagerly, with a notice)
needs_compiler = pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "clang++" if sys.platform == "darwin" else
                                                                    "g++")), reason="no C++ compiler for inductor")


@pytest.fixture(autouse=True)
def float64():
    torch.set_default_dtype(torch.float64)  # exactness at double precision; conftest.py restores it


def settings(**changes):
    return merge.Settings(**changes)


def fresh(seeds, width=8):
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        models.append(merge.SineMLP(widths=(width,)))
    return models


def same(a, b, tolerance):
    return all(torch.allclose(a.state_dict()[n], b.state_dict()[n], **tolerance) for n in a.state_dict())


@pytest.mark.parametrize("use_compile", [0, pytest.param(1, marks=[needs_compiler, pytest.mark.slow])])
def test_the_stack_trains_what_merge_fit_trains_given_the_same_noise(use_compile, monkeypatch, caplog):
    monkeypatch.setattr(stacked.log, "propagate", True)  # to caplog, whatever a Progress handler did
    caplog.set_level(logging.WARNING, logger="merge")
    s = settings(weight_decay=1e-2, momentum=0.8)  # on the weights, not on the gates (their SGD's momentum 0.9)
    datas = [merge.sine_data(seed, 200, 50, 50) for seed in (0, 1)]  # 200 points: a last batch of 8
    tolerance = dict(rtol=1e-6, atol=1e-6) if use_compile else dict(rtol=1e-12, atol=1e-12)
    # the teacher phase: SGD with an lr drop (and fine-tuning's warm-up: half the lr in epoch 0)
    alone, stack, histories = fresh([5, 6]), fresh([5, 6]), []
    for model, data, seed in zip(alone, datas, [5, 6]):
        stacked.counter_noise(model, seed)
        histories.append(merge.fit(model, data, s, 3, drops=(0.5,), seed=seed, warmup=1))
    seen = []  # after_epoch's calls: (epoch, rows so far)
    history = stacked.fit_stacked(stack, datas, s, 3, drops=(0.5,), seeds=[5, 6], warmup=1, compile=use_compile,
                                  after_epoch=lambda epoch, rows: seen.append((epoch, len(rows))))
    assert all(same(a, b, tolerance) for a, b in zip(alone, stack))
    assert seen == [(0, 1), (1, 2), (2, 3)]  # each epoch's row, in order, the last one's too
    for r, model_history in enumerate(histories):  # merge.fit's rows, model by model
        assert [h["epoch"] for h in history] == [h["epoch"] for h in model_history]
        assert torch.allclose(torch.tensor([h["error"][r] for h in history]),
                              torch.tensor([h["error"] for h in model_history]), **tolerance)
    assert not torch.allclose(alone[0].out.weight, fresh([5])[0].out.weight)  # it did train
    # the importance phase: gates, L_half and the gates' own SGD
    lambdas = merge.lambda_schedule(3, 0.5, 0.5)
    bigs = [merge.make_big_student(fresh([2 * r, 2 * r + 1])) for r in (0, 1)]
    twins = [merge.make_big_student(fresh([2 * r, 2 * r + 1])) for r in (0, 1)]
    histories = []
    for big, data, seed in zip(bigs, datas, [7, 8]):
        stacked.counter_noise(big, seed)
        histories.append(merge.fit(big, data, s, 3, seed=seed, lambdas=lambdas))
    history = stacked.fit_stacked([twin.eval() for twin in twins], datas, s, 3, seeds=[7, 8], lambdas=lambdas,
                                  compile=use_compile)  # in train mode, whatever mode a model was left in
    assert all(same(a, b, tolerance) for a, b in zip(bigs, twins))
    for r, model_history in enumerate(histories):  # the gates' L_half and open probabilities, epoch by epoch
        for mine, theirs in zip(history, model_history):
            assert abs(mine["l_half"][r] - theirs["l_half"]) < 1e-6
            assert len(mine["open"]) == len(theirs["open"]) == len(merge.gates(bigs[r]))  # a row for each gate layer
            assert all(torch.allclose(torch.tensor(a[r]), torch.tensor(b), **tolerance)
                       for a, b in zip(mine["open"], theirs["open"]))
    assert not torch.allclose(bigs[0].gates[0].loc, twins[1].gates[0].loc)  # each its own noise and data
    assert (bigs[0].gates[0].loc - 1).abs().max() > 0.05  # the gates moved
    assert "failed here" not in caplog.text  # compiled, not fallen back to eager


def test_big_students_of_three_teachers_train_in_a_stack_as_alone_toward_a_third():
    """The importance phase at k = 3: L_half's share 1/3 reaches the stack as it reaches merge.fit."""
    s, lambdas = settings(), merge.lambda_schedule(3, 0.5, 0.5)
    datas = [merge.sine_data(seed, 200, 50, 50) for seed in (0, 1)]
    big_students = lambda: [merge.make_big_student(fresh([3 * r, 3 * r + 1, 3 * r + 2])) for r in (0, 1)]  # noqa: E731
    alone, stack, histories = big_students(), big_students(), []
    for big_student, data, seed in zip(alone, datas, [7, 8]):
        stacked.counter_noise(big_student, seed)
        histories.append(merge.fit(big_student, data, s, 3, seed=seed, lambdas=lambdas, share=1 / 3))
    history = stacked.fit_stacked(stack, datas, s, 3, seeds=[7, 8], lambdas=lambdas, share=1 / 3, compile=0)
    assert all(same(a, b, dict(rtol=1e-12, atol=1e-12)) for a, b in zip(alone, stack))
    for r, model_history in enumerate(histories):  # the rows' L_half, toward a third too
        assert [h["l_half"][r] for h in history] == pytest.approx([h["l_half"] for h in model_history], abs=1e-12)


def test_a_conv_stack_compiles_its_step_once_a_phase_its_short_last_batch_eagerly(monkeypatch):
    """Under vmap a convolution fixes the compiled step's batch size: an epoch's short last batch would compile
    LeNet's step a second time in every phase. It runs eagerly instead, and the stack trains what it trains
    uncompiled (torch.compile's graph capture here, without inductor's code generation: seconds, not minutes)."""
    import numpy as np

    import images
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(fn, backend="eager"))
    rng, n = np.random.default_rng(0), 80  # batch 32: a last batch of 16
    d = {f"x_{split}": rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8) for split in ("train", "val", "test")}
    d.update({f"y_{split}": rng.integers(0, 10, n) for split in ("train", "val", "test")})
    data, s, results = images.image_data(d, "cpu"), settings(), []
    for use_compile in (1, 0):
        torch.manual_seed(0)
        models = [merge.LeNet() for _ in range(2)]
        torch._dynamo.utils.counters.clear()  # of this phase alone
        stacked.fit_stacked(models, [data] * 2, s, 2, seeds=[0, 1], compile=use_compile)
        if use_compile:
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
        results.append(models)
    assert all(same(a, b, dict(rtol=1e-12, atol=1e-12)) for a, b in zip(*results))


def test_stacks_trained_by_turns_train_what_each_trains_alone_compiled(monkeypatch):
    """Lockstep on a GPU trains its stacks an epoch at a time by turns. Each phase's compiled step has a code
    object and a name of its own: one graph each, compiled for its own sizes (only the batch a symbol, not
    the stack's size or the widths another phase had), and each trains what it trains alone (torch.compile's
    graph capture with a backend that runs the captured graph, without inductor's code generation)."""
    real_compile, symbols = torch.compile, []

    def backend(graph, inputs):  # how many sizes of the graph's inputs are symbols
        values = [node.meta.get("example_value") for node in graph.graph.nodes if node.op == "placeholder"]
        symbols.append(sum(not isinstance(n, int) for x in values if isinstance(x, torch.Tensor) for n in x.shape))
        return graph.forward
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(fn, backend=backend))
    s, datas = settings(), [merge.sine_data(seed, 200, 50, 50) for seed in (0, 1, 2)]
    lambdas = merge.lambda_schedule(3, 0.5, 0.5)
    make = [lambda: fresh([3, 4]), lambda: [merge.make_big_student(fresh(pair)) for pair in ([5, 6], [7, 8], [9, 10])]]
    phases = [dict(datas=datas[:2], seeds=[3, 4], drops=(0.5,)), dict(datas=datas, seeds=[7, 8, 9], lambdas=lambdas)]
    alone = [m() for m in make]
    for models, phase in zip(alone, phases):
        stacked.fit_stacked(models, s=s, epochs=3, compile=False, **phase)
    by_turns = [m() for m in make]
    torch._dynamo.utils.counters.clear()
    turns = [stacked.fit_stacked_epochs(models, s=s, epochs=3, **phase) for models, phase in zip(by_turns, phases)]
    for _ in range(4):  # three epochs each, then the end
        for epochs in turns:
            next(epochs, None)
    for mine, theirs in zip(by_turns, alone):
        assert all(same(a, b, dict(rtol=1e-12, atol=1e-12)) for a, b in zip(mine, theirs))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2 and len(symbols) == 2
    assert symbols == [2, 2], symbols  # the batch of x and of y; the rest numbers (one name for both: 19 symbols)
    assert not same(alone[1][0], merge.make_big_student(fresh([5, 6])), dict(rtol=1e-3, atol=1e-3))  # trained


def test_counter_noise_is_uniform_and_another_for_every_seed_layer_and_step():
    noise = stacked.CounterNoise(seed=3, layer=0, device="cpu")
    u, next_u = noise(1000, 100), noise(1000, 100)
    assert u.shape == (1000, 100) and 0 <= u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    assert not torch.equal(u, next_u)  # the next step
    assert torch.equal(next_u, stacked.CounterNoise(3, 0, "cpu", step=1)(1000, 100))  # from step 1 on, as resumed
    big_student = merge.make_big_student(fresh([1, 2]))
    stacked.counter_noise(big_student, 3, step=1)
    assert torch.equal(next_u, big_student.gates[0].noise(1000, 100))
    assert not torch.equal(u, stacked.CounterNoise(4, 0, "cpu")(1000, 100))
    assert not torch.equal(u, stacked.CounterNoise(3 + (1 << 48), 0, "cpu")(1000, 100))  # a seed's high bits count
    assert not torch.equal(u, stacked.CounterNoise(3, 1, "cpu")(1000, 100))
    assert torch.equal(u, stacked.CounterNoise(3, 0, "cpu")(1000, 100))


def test_a_failing_compiler_falls_back_to_eager_with_one_notice(monkeypatch, caplog):
    def broken_compile(fn, **kwargs):  # as torch.compile fails without a C++ compiler
        def call(*args):
            raise torch._inductor.exc.InductorError(RuntimeError("InvalidCxxCompiler: No working C++ compiler"), None)
        return call
    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setitem(stacked.COMPILER, "works", True)  # as a process starts; restored after the test
    monkeypatch.setattr(stacked.log, "propagate", True)  # to caplog, whatever a Progress handler did
    s, data = settings(), merge.sine_data(0, 200, 50, 50)
    compiled, eager = fresh([3]), fresh([3])
    with caplog.at_level(logging.INFO, logger=stacked.log.name):
        stacked.fit_stacked(compiled, [data], s, 2, seeds=[3])
        monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("a later phase tried compiling again"))
        stacked.fit_stacked(fresh([4]), [data], s, 1, seeds=[4])  # the next phase: eagerly, no second notice
    stacked.fit_stacked(eager, [data], s, 2, seeds=[3], compile=False)
    assert torch.equal(compiled[0].out.weight, eager[0].out.weight)
    assert sum("torch.compile failed here" in r.getMessage() for r in caplog.records) == 1
    assert sum("compiling the stacked step" in r.getMessage() for r in caplog.records) == 1  # not the later phase


@pytest.mark.parametrize("compiled_error", ["out of memory", "a student's bug, traced"])
def test_the_steps_own_error_is_raised_not_taken_for_a_compiler_failure(monkeypatch, caplog, compiled_error):
    """Out of memory in a compiled step is the step's. A student's function that fails (exercises.ipynb) fails
    under torch.compile's tracing too, as a dynamo error; run eagerly, it fails again. Either is raised as the
    step's, with no note that compiling failed."""
    def compiled_step(*args):
        if compiled_error == "out of memory":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        raise torch._dynamo.exc.TorchRuntimeError("Dynamo failed to run FX node with fake tensors")
    def step(x):
        raise ValueError("the student's l_half: mean of an empty list")
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compiled_step)
    call = stacked.compiled(step, True)
    with caplog.at_level(logging.WARNING), pytest.raises(
            torch.OutOfMemoryError if compiled_error == "out of memory" else ValueError):
        call(torch.ones(3))
    assert caplog.text == ""


def test_compile_auto_compiles_but_a_short_phase_of_convolutions_on_a_gpu(monkeypatch):
    """--compile auto compiles on a CPU, and on a GPU the sine's MLPs; LeNet's convolutions train eagerly on a
    GPU in a phase too short to repay compiling (docs/speed.md). 1 and 0 do as they say, as strings too."""
    cpu, gpu, mlp, lenet = torch.device("cpu"), torch.device("cuda"), merge.SineMLP(), merge.LeNet()
    short, long = stacked.GPU_COMPILE_EPOCHS - 1, stacked.GPU_COMPILE_EPOCHS
    auto = [stacked.compiles("auto", device, model, short) for device in (cpu, gpu) for model in (mlp, lenet)]
    assert auto == [True, True, True, False]
    assert stacked.compiles("auto", gpu, lenet, long)
    assert all(stacked.compiles(c, gpu, lenet, short) for c in ("1", 1, True))
    assert not any(stacked.compiles(c, cpu, mlp, long) for c in ("0", 0, False))
    monkeypatch.setattr(torch, "compile", lambda *args, **kwargs: pytest.fail("compiled with --compile 0"))
    stacked.fit_stacked(fresh([3]), [merge.sine_data(0, 64, 16, 16)], settings(), 1, seeds=[3], compile="0")


def test_guards_skipped_in_a_phase_count_again_after_it(monkeypatch):
    """(torch.compile's graph capture, without inductor's code generation: the guards are dynamo's.)"""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(fn, backend="eager"))
    s, data = settings(), merge.sine_data(0, 64, 16, 16)
    stacked.fit_stacked(fresh([1]), [data], s, 2, seeds=[1])
    double = torch.compile(lambda x: x * 2)
    assert double(torch.ones(3)).dtype == torch.get_default_dtype()
    assert double(torch.ones(3, dtype=torch.int64)).dtype == torch.int64  # a guard chose a new graph


def test_a_guard_upset_in_a_phase_is_checked_again_not_taken_for_a_compiler_failure(monkeypatch, caplog):
    """Where a step's guards are skipped (a phase past its first epoch), one that fails (Ctrl-C inside it, which
    torch takes for a failed check; here an input of a dtype never compiled) makes torch refuse to recompile:
    the step is checked again and run eagerly that once, with no note that compiling failed (graph
    capture only, as above)."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(fn, backend="eager"))
    call = stacked.compiled(lambda x: x * 2, True)
    assert call(torch.ones(3, dtype=torch.float32)).tolist() == [2] * 3
    with caplog.at_level(logging.WARNING), torch.compiler.set_stance(skip_guard_eval_unsafe=True):
        assert call(torch.ones(3, dtype=torch.int64)).tolist() == [2] * 3  # torch alone: a RuntimeError
        assert call(torch.ones(3, dtype=torch.float32)).tolist() == [2] * 3
    assert caplog.text == ""  # not "torch.compile failed here (RuntimeError: ...); ... eagerly"


def test_lockstep_stacks_the_phases_of_all_runs_and_changes_no_model():
    """Every strategy of merge.py, two runs, in Lockstep with a trainer that stacks alike phases,
    gives the models of the plain strategies, one run after another, with the same noise."""
    s = settings(epochs=12)
    datas = {seed: merge.sine_data(seed, 200, 50, 50) for seed in (0, 1)}
    asked = []

    def fit_phases(phases):  # the stack of every phase asked for in a round, as experiment.py's trainer does
        asked.append([(p["phase"], len(p["models"])) for p in phases])
        for p in phases:  # alike phases: the same epochs, drops and lambdas; here one stack each
            stacked.fit_stacked(p["models"], [p["data"]] * len(p["models"]), p["s"], p["epochs"], p["drops"],
                                p["seeds"], p["lambdas"], p["share"], p["warmup"], compile=False) if not p["hooks"] else \
                plain(p["models"], p["data"], p["s"], p["epochs"], p["drops"], p["seeds"], p["phase"], p["lambdas"],
                      p["share"], p["warmup"], **p["hooks"])

    def plain(models, data, s, epochs, drops, seeds, phase, lambdas=None, share=0.5, warmup=0, **hooks):
        for model, seed in zip(models, seeds):
            stacked.counter_noise(model, seed)
        return merge.train(models, data, s, epochs, drops, seeds, phase, lambdas, share, warmup, **hooks)

    results = {}
    jobs = [dict(key=(name, seed), work=lambda train, name=name, seed=seed: merge.STRATEGIES[name](
        datas[seed], s, merge.SineMLP, seed, train)) for name in merge.STRATEGIES for seed in (0, 1)]
    lockstep.Lockstep(fit_phases).run(jobs, lambda job, outcome: results.__setitem__(job["key"], outcome))
    assert len(results) == 2 * len(merge.STRATEGIES)
    assert {("teacher", 2), ("bo3", 3), ("one", 1)} <= set(asked[0]), asked  # round 1: every run
    assert len(asked[0]) == 2 * len(merge.STRATEGIES)  # every strategy's first phase, for each run
    for (name, seed), (model, info) in results.items():
        alone, alone_info = merge.STRATEGIES[name](datas[seed], s, merge.SineMLP, seed, plain)
        assert same(model, alone, dict(rtol=1e-9, atol=1e-12)), name
        assert info.keys() == alone_info.keys()


def test_lockstep_ends_with_a_jobs_own_error_and_hands_on_no_result_for_it():
    """A strategy that fails (a bug, a GPU out of memory) ends the run with its error, after the rows of the jobs
    finished before it; none is made for it."""
    def failing(train):
        train([], None, None, 1, (), [0], "teacher")
        raise ValueError("a strategy's bug")
    finished = []
    with pytest.raises(ValueError, match="a strategy's bug"):
        lockstep.Lockstep(lambda asked: None).run([dict(work=failing), dict(work=lambda train: "done")],
                                                  lambda job, result: finished.append(result))
    assert finished == ["done"]


def test_lockstep_jobs_run_on_the_ranks_gpu_not_gpu_0(monkeypatch):
    """A job's thread starts on GPU 0; where CUDA is in use (rank 3's GPU, stood in), each job sets the rank's
    GPU first, so that what it starts there (a DataLoader's pinning thread) opens no context on GPU 0."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    devices = {}
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: devices.setdefault(threading.get_ident(), d))
    ran = []
    lockstep.Lockstep(lambda asked: None).run([dict(work=lambda train: ran.append(threading.get_ident()))
                                               for _ in range(2)], lambda job, result: None)
    assert len(ran) == 2 and all(devices.get(ident) == 3 for ident in ran)


def test_lockstep_by_turns_gives_each_stack_a_cuda_stream_and_lets_jobs_go_on_when_theirs_is_over(monkeypatch):
    """overlap (on a GPU): the trainings take turns, an epoch each, every stacked one on a CUDA stream of its own
    that waits for the work before it, and the jobs go on, on the default stream after its last kernels, as soon
    as their own is over (torch.cuda's streams played by stand-ins, to run on a CPU)."""
    class Stream:
        def __init__(self, name="stream"):
            self.name, self.waited_for = name, []

        def wait_stream(self, other):
            self.waited_for.append(other)
    default, on = Stream("default"), []

    @contextlib.contextmanager
    def stream(s):
        on.append(s)
        yield
        on.pop()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: on[-1] if on else default)
    turns = []

    def epochs(name, n):
        for epoch in range(n):
            turns.append((name, epoch, torch.cuda.current_stream()))
            yield

    def fit_phases(asked):
        return [dict(jobs=[a["job"]], stacked=a["phase"] != "plain", epochs=epochs(a["phase"], a["epochs"]))
                for a in asked]

    def work(*phases):
        def run(train):
            for phase, n in phases:
                train([], None, None, n, (), [], phase)
            return phases[-1][0]
        return run
    jobs = [dict(work=work(("short", 2), ("after", 1))), dict(work=work(("long", 5))), dict(work=work(("plain", 3)))]
    finished = []
    lockstep.Lockstep(fit_phases, overlap=True).run(jobs, lambda job, result: finished.append(result))
    names = [name for name, _, _ in turns]
    assert names.index("after") < len(names) - 1 - names[::-1].index("long")  # begun while "long" trained on
    assert [name for name, epoch, _ in turns if epoch == 0] == ["short", "long", "plain", "after"]
    streams = {name: {s for n, _, s in turns if n == name} for name in ("short", "after", "long", "plain")}
    assert streams["plain"] == {default} and all(len(streams[name]) == 1 for name in streams)
    mine = [next(iter(streams[name])) for name in ("short", "after", "long")]
    assert len(set(mine)) == 3 and default not in mine  # a stream of its own each
    assert all(s.waited_for == [default] for s in mine) and set(mine) <= set(default.waited_for)
    assert sorted(finished) == ["after", "long", "plain"]

    def failing(name, n):  # a training that fails while another is in flight: the run ends with its error
        yield
        raise RuntimeError("out of memory")
    def fit_phases(asked):
        return [dict(jobs=[a["job"]], stacked=True, epochs=(failing if a["phase"] == "short" else epochs)(
            a["phase"], a["epochs"])) for a in asked]
    with pytest.raises(RuntimeError, match="out of memory"):
        lockstep.Lockstep(fit_phases, overlap=True).run([dict(work=work(("short", 2))), dict(work=work(("long", 5)))],
                                                       lambda job, result: None)


def test_blocks_of_steps_train_what_one_step_at_a_time_trains():
    """A block of several SGD steps per launch (on a GPU one CUDA graph) gives the rows of one step a launch:
    teacher and importance phases, with a last block and a last batch shorter than the others (200 points)."""
    s, datas = settings(), [merge.sine_data(seed, 200, 50, 50) for seed in (0, 1)]
    lambdas = merge.lambda_schedule(3, 0.5, 0.5)
    for phase_lambdas in (None, lambdas):
        results = []
        for steps_per_block in (1, 4):
            models = fresh([3, 4]) if phase_lambdas is None else [merge.make_big_student(fresh(pair))
                                                                  for pair in ([3, 4], [5, 6])]
            history = stacked.fit_stacked(models, datas, s, 3, drops=(0.5,), seeds=[3, 4], lambdas=phase_lambdas,
                                          compile=False, steps_per_block=steps_per_block)
            results.append((models, [h["error"] for h in history]))
        (one, errors_one), (blocks, errors_blocks) = results
        assert all(same(a, b, dict(rtol=0, atol=0)) for a, b in zip(one, blocks))
        assert errors_one == errors_blocks


class Replayed(stacked.Graphs):
    """Graphs on a CPU: 'recording' keeps the work, 'replaying' runs it, so the bookkeeping around the CUDA
    graphs (inputs copied in, the warm-up on a spare state, one recording per shape) runs as on a GPU."""
    recorded = []

    def record(self, work):
        Replayed.recorded.append(work)
        return work


def test_graphs_warm_up_on_a_spare_state_and_replay_on_their_own_inputs(monkeypatch):
    s, data = settings(), merge.sine_data(0, 200, 50, 50)
    plain, graphed = fresh([3]), fresh([3])
    stacked.fit_stacked(plain, [data], s, 2, seeds=[3], compile=False, steps_per_block=4)
    monkeypatch.setattr(stacked, "Graphs", Replayed)
    monkeypatch.setattr(Replayed, "recorded", [])  # this test's recordings alone
    history = stacked.fit_stacked(graphed, [data], s, 2, seeds=[3], compile=False, steps_per_block=4, graphs=True)
    assert len(Replayed.recorded) == 2  # 200 points: blocks of 4 x 32 and the last of 72 (two steps of 32, one of 8)
    assert torch.equal(plain[0].out.weight, graphed[0].out.weight) and len(history) == 2


def test_on_a_gpu_an_epochs_row_comes_once_the_next_is_queued_and_before_its_checkpoint(tmp_path, monkeypatch):
    """The GPU's way (rows_behind), run on the CPU with pinned memory and CUDA's event stood in: an epoch's
    numbers are copied behind its steps and read once the next epoch is queued, the last at the end, with the
    same models and rows as the CPU's way; a checkpoint due after an epoch comes after that epoch's row, so
    that the state written and its rows agree."""
    events, saved = [], []

    class Event:  # torch.cuda.Event, the order of its calls
        def record(self):
            events.append("record")

        def synchronize(self):
            events.append("synchronize")

    def train(checkpoint_seconds):  # the models, history, rows, and how many rows there were after each yield
        monkeypatch.setattr(stacked, "CHECKPOINT_SECONDS", checkpoint_seconds)
        models, rows, after_each = fresh([3, 4]), [], []
        epochs = stacked.fit_stacked_epochs(models, [data, data], s, 4, seeds=[3, 4], compile=False,
                                            checkpoint=tmp_path / "stack", after_epoch=lambda e, h: rows.append(e))
        while True:
            try:
                next(epochs)
            except StopIteration as end:
                return models, end.value, rows, after_each
            after_each.append(len(rows))

    s, data, empty = settings(), merge.sine_data(0, 200, 50, 50), torch.empty
    monkeypatch.setattr(stacked, "save_stack", lambda path, state: saved.append(len(state["history"])))
    cpu, cpu_history, cpu_rows, cpu_after_each = train(float("inf"))
    assert cpu_rows == [0, 1, 2, 3] and cpu_after_each == [1, 2, 3, 4]
    monkeypatch.setattr(stacked, "rows_behind", lambda device: True)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch, "empty", lambda *shape, pin_memory=False, **how: empty(*shape, **how))
    gpu, gpu_history, gpu_rows, gpu_after_each = train(float("inf"))  # never a checkpoint: each row behind
    assert gpu_history == cpu_history and gpu_rows == [0, 1, 2, 3] and gpu_after_each == [0, 1, 2, 3]
    assert all(same(a, b, dict(rtol=0, atol=0)) for a, b in zip(cpu, gpu)) and saved == []
    assert events == ["record", "record", "synchronize", "record", "synchronize", "record", "synchronize",
                      "synchronize"]  # each epoch's numbers read after the next is queued, the last at the end
    events.clear()
    _, history, rows, after_each = train(0)  # a checkpoint after every epoch: each epoch's row first
    assert history == cpu_history and after_each == [1, 2, 3, 4] and saved == [1, 2, 3, 4]
    assert events == ["record", "synchronize"] * 4


class FailsToRecord(stacked.Graphs):
    """Graphs whose recording fails as a CUDA capture does when an operation inside it is not allowed: the
    operation's error, then capture_end's own in its place."""

    def record(self, work):
        try:
            raise RuntimeError("operation not permitted when stream is capturing")
        except RuntimeError:  # noqa: B904 - as torch.cuda.graph's exit raises it: the first error its context
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture\n"
                               "CUDA kernel errors might be asynchronously reported at some other API call")


def test_a_block_that_cannot_be_recorded_runs_as_it_is_and_the_note_names_the_first_error(monkeypatch, caplog):
    s, data = settings(), merge.sine_data(0, 200, 50, 50)
    plain, graphed = fresh([3]), fresh([3])
    stacked.fit_stacked(plain, [data], s, 2, seeds=[3], compile=False, steps_per_block=4)
    monkeypatch.setattr(stacked, "Graphs", FailsToRecord)
    monkeypatch.setattr(FailsToRecord, "failures", 0)
    monkeypatch.setattr(stacked.log, "propagate", True)  # to caplog, whatever a Progress handler did
    with caplog.at_level(logging.INFO, logger="merge"):
        stacked.fit_stacked(graphed, [data], s, 2, seeds=[3], compile=False, steps_per_block=4, graphs=True)
    assert torch.equal(plain[0].out.weight, graphed[0].out.weight) and FailsToRecord.failures == 1
    assert caplog.text.count("CUDA graphs are unavailable here (RuntimeError: operation not permitted when stream "
                             "is capturing, then RuntimeError: CUDA error: operation failed due to a previous") == 1
    assert "asynchronously" not in caplog.text  # each error in one line


@pytest.mark.parametrize("phase, use_compile", [("importance", 0), pytest.param("teacher", 1, marks=needs_compiler)])
def test_a_stack_cut_short_goes_on_from_its_checkpoint_to_the_same_models(tmp_path, monkeypatch, caplog, phase,
                                                                          use_compile):
    """A stack's phase, its state written after every epoch, started again on fresh models from the state after
    epoch 2 of 4: the same models and rows as the phase never cut. The importance phase has it all (weights,
    gates, both momenta, the noise's step); compiled, the first epoch after the checkpoint compiles the step,
    as the first of a phase does, and nothing falls back to eager."""
    monkeypatch.setattr(stacked, "CHECKPOINT_SECONDS", 0)
    monkeypatch.setattr(stacked.log, "propagate", True)  # to caplog, whatever a Progress handler did
    s, checkpoint, after_two = settings(), tmp_path / f"{phase}.stack", tmp_path / "after epoch 2.stack"
    lambdas = merge.lambda_schedule(4, 0.5, 0.5) if phase == "importance" else None
    datas = [merge.sine_data(seed, 200, 50, 50) for seed in (0, 1)]  # a short last batch, too
    fresh_stack = (lambda: [merge.make_big_student(fresh([2 * r, 2 * r + 1])) for r in (0, 1)]) if lambdas else \
        (lambda: fresh([5, 6]))
    save = stacked.save_stack

    def saved(path, state):  # as written, and a copy of the state after epoch 2: where a kill would leave it
        save(path, state)
        if state["epoch"] == 1:
            save(after_two, state)
    monkeypatch.setattr(stacked, "save_stack", saved)
    whole, again = fresh_stack(), fresh_stack()
    fit = functools.partial(stacked.fit_stacked, datas=datas, s=s, epochs=4, seeds=[3, 4], lambdas=lambdas,
                            compile=use_compile)
    rows = fit(whole, checkpoint=checkpoint)
    with caplog.at_level(logging.INFO, logger="merge"):
        assert fit(again, checkpoint=after_two) == rows
    assert "resumed after epoch 2 of 4" in caplog.text and "failed here" not in caplog.text
    assert all(same(a, b, dict(rtol=0, atol=0)) for a, b in zip(whole, again))
    if not use_compile:  # a stack of other seeds, epochs or shapes does not take it; a damaged file: from the start
        monkeypatch.setattr(stacked, "CHECKPOINT_SECONDS", float("inf"))  # none written below
        other = fresh_stack()
        with caplog.at_level(logging.INFO, logger="merge"):
            fit(other, seeds=[5, 6], checkpoint=checkpoint)
        assert "is damaged or another stack's (ValueError)" in caplog.text
        assert not same(other[0], whole[0], dict(rtol=0, atol=0))
        longer = merge.lambda_schedule(5, 0.5, 0.5)  # a phase of 5 epochs: another lr and lambda schedule
        narrower = [merge.make_big_student(fresh([2 * r, 2 * r + 1], width=4)) for r in (0, 1)]  # other shapes
        for models, changes in ((fresh_stack(), dict(epochs=5, lambdas=longer)), (narrower, {})):
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="merge"):
                fit(models, checkpoint=after_two, **changes)
            assert "is damaged or another stack's (ValueError)" in caplog.text and "resumed" not in caplog.text
        damaged, restarted = tmp_path / "damaged.stack", fresh_stack()
        damaged.write_bytes(b"half a stack")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="merge"):
            fit(restarted, checkpoint=damaged)
        assert "is damaged or another stack's" in caplog.text and "resumed" not in caplog.text
        assert all(same(a, b, dict(rtol=0, atol=0)) for a, b in zip(restarted, whole))  # trained from the start


def test_a_stack_writes_its_checkpoint_at_most_every_checkpoint_seconds(tmp_path, monkeypatch):
    """Epochs of 25 s on a clock of the test's: the state written after the first epoch that ends 60 s or more after
    the last write (or the start), and the time counted afresh from each write."""
    clock, written = [0.0], []
    monkeypatch.setattr(stacked, "time", types.SimpleNamespace(time=lambda: clock[0]))
    monkeypatch.setattr(stacked, "save_stack", lambda path, state: written.append(state["epoch"]))
    monkeypatch.setattr(stacked, "CHECKPOINT_SECONDS", 60)

    def a_25_second_epoch(epoch, rows):
        clock[0] += 25
    stacked.fit_stacked(fresh([1]), [merge.sine_data(0, 64, 16, 16)], settings(), 6, seeds=[1], compile=False,
                        after_epoch=a_25_second_epoch, checkpoint=tmp_path / "teacher.stack")
    assert written == [2, 5]  # at 75 s and at 150 s


def test_a_stacks_checkpoint_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """torch.save failing halfway (a full disk: an OSError of ENOSPC; another failure as it is) leaves the checkpoint
    before it as it was, and no part file."""
    path = tmp_path / "phases" / "teacher.stack"
    stacked.save_stack(path, dict(epoch=0))
    real_save = torch.save

    def half(obj, f):  # as torch.save on a full disk: some bytes written, then torch's error
        Path(f).write_bytes(b"half a stack")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    monkeypatch.setattr(torch, "save", half)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: types.SimpleNamespace(free=0))  # the disk full
    with pytest.raises(OSError) as raised:
        stacked.save_stack(path, dict(epoch=1))
    assert raised.value.errno == errno.ENOSPC
    assert torch.load(path, weights_only=True) == dict(epoch=0) and os.listdir(path.parent) == [path.name]
    monkeypatch.setattr(shutil, "disk_usage", lambda p: types.SimpleNamespace(free=1 << 30))  # another failure
    with pytest.raises(RuntimeError, match="write failed"):
        stacked.save_stack(path, dict(epoch=1))
    assert torch.load(path, weights_only=True) == dict(epoch=0) and os.listdir(path.parent) == [path.name]
    monkeypatch.setattr(torch, "save", real_save)
    stacked.save_stack(path, dict(epoch=1))
    assert torch.load(path, weights_only=True) == dict(epoch=1) and os.listdir(path.parent) == [path.name]
