"""Tests for merge.py: exact function-preservation checks first, then the pieces of the
method, then the command line end to end. Run: python -m pytest -q -n 2 --dist worksteal"""
import ast
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import merge

ROOT = Path(__file__).parent


@pytest.fixture(autouse=True)
def float64():
    torch.set_default_dtype(torch.float64)  # exactness checks at double precision; conftest.py restores it


# Every architecture at a small width, with an input of the size it expects.
ARCHS = {
    "sine": (lambda: merge.SineMLP(widths=(6,)), (5, 1)),
    "lenet": (lambda: merge.LeNet(num_classes=4, widths=(3, 4, 5, 6)), (3, 3, 28, 28)),
    "vgg11": (lambda: merge.vgg11(num_classes=4, width=2), (3, 3, 32, 32)),
    "resnet20": (lambda: merge.resnet20(num_classes=4, width=3), (3, 3, 16, 16)),
    "resnet18": (lambda: merge.resnet18(num_classes=4, width=3), (3, 3, 32, 32)),
}


def randomize(model, seed):
    """Random weights and BatchNorm running statistics far from their defaults."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if name.endswith("running_var")
                        else torch.randn(t.shape, generator=g) * 0.5)
    return model


def make_teachers(arch, k):
    return [randomize(ARCHS[arch][0](), seed=i).eval() for i in range(k)]


def force_gates(big_student, keep):
    """Test-time gate value exactly 1 on the kept units of every group and exactly 0 elsewhere."""
    for (gate, _, _), units in zip(big_student.unit_groups(), keep):
        loc = torch.full_like(gate.loc, -10.0)
        loc[units] = 10.0
        gate.loc.data = loc


def random_keep(big_student, seed):
    g = torch.Generator().manual_seed(seed)
    k = big_student.hparams["k"]
    return [torch.randperm(len(gate.loc), generator=g)[:len(gate.loc) // k].sort().values
            for gate, _, _ in big_student.unit_groups()]


def last_layer(model):
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]


# ---------------------------------------------------------------------------------------
# Concatenation (section 2.1): the big student outputs the teachers' mean
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("arch", ARCHS)
def test_big_student_outputs_the_teachers_mean(arch, k):
    teachers = make_teachers(arch, k)
    big_student = merge.make_big_student(teachers).eval()
    force_gates(big_student, [torch.arange(len(g.loc)) for g, _, _ in big_student.unit_groups()])  # all open
    x = torch.randn(ARCHS[arch][1])
    mean = torch.stack([t(x) for t in teachers]).mean(0)
    assert torch.allclose(big_student(x), mean, rtol=1e-10, atol=1e-10)


def test_concatenated_basic_block_runs_the_teachers_side_by_side():
    blocks = [randomize(merge.BasicBlock(3, 5, stride=2), i).eval() for i in range(2)]
    big_block = merge.BasicBlock(6, 10, stride=2).eval()
    big_block.load_state_dict(merge.concat_network(blocks))
    x0, x1 = torch.randn(2, 3, 3, 8, 8)
    assert torch.allclose(big_block(torch.cat([x0, x1], 1)), torch.cat([blocks[0](x0), blocks[1](x1)], 1))


def test_teachers_of_different_shapes_are_refused():
    for teachers in ([merge.SineMLP(widths=(6,)), merge.SineMLP(widths=(7,))], [merge.SineMLP(), merge.LeNet()],
                     [merge.SineMLP()]):
        with pytest.raises(ValueError, match="one architecture"):
            merge.make_big_student(teachers)


# ---------------------------------------------------------------------------------------
# Compression (section 2.3): exact with closed / open gates; gives back a teacher
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("arch", ARCHS)
def test_compression_preserves_the_gated_function(arch, k):
    big_student = randomize(merge.make_big_student(make_teachers(arch, k)), seed=7).eval()  # off-diagonal too
    for pattern in range(3):
        keep = random_keep(big_student, pattern)
        force_gates(big_student, keep)
        student = merge.compress(big_student).eval()
        assert type(student) is type(make_teachers(arch, 1)[0])
        fresh = ARCHS[arch][0]()
        fresh.load_state_dict(student.state_dict())  # strict: the teachers' architecture exactly
        x = torch.randn(ARCHS[arch][1])
        assert torch.allclose(student(x), big_student(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("arch", ["sine", "lenet", "vgg11"])
def test_folding_keeps_the_gated_function_with_kept_gates_anywhere_in_between(arch):
    """fold: the kept gates' test-time values go into the next layers' weights, so compression keeps the
    gated function whatever the kept gates' values, where the dropped ones are 0 (--fold 1, ours)."""
    big_student = randomize(merge.make_big_student(make_teachers(arch, 2)), seed=3).eval()
    keep = random_keep(big_student, 1)
    force_gates(big_student, keep)
    for (gate, _, _), units in zip(big_student.unit_groups(), keep):
        gate.loc.data[units] = torch.randn(len(units))  # kept: test-time values between 0 and 1
    x = torch.randn(ARCHS[arch][1])
    assert torch.allclose(merge.compress(big_student, fold=True).eval()(x), big_student(x), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(merge.compress(big_student).eval()(x), big_student(x), atol=1e-3)  # as in the paper


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("arch", ARCHS)
def test_keeping_one_teachers_units_gives_back_that_teacher(arch, k):
    teachers = make_teachers(arch, k)
    big_student = merge.make_big_student(teachers)
    last = last_layer(teachers[0])
    for i, teacher in enumerate(teachers):
        force_gates(big_student, [torch.arange(i * len(g.loc) // k, (i + 1) * len(g.loc) // k)
                                  for g, _, _ in big_student.unit_groups()])
        got, want = merge.compress(big_student).state_dict(), teacher.state_dict()
        for name, value in want.items():
            if name == f"{last}.weight":
                value = value / k  # section 2.1's averaging is still in there
            elif name == f"{last}.bias":
                value = torch.stack([t.state_dict()[name] for t in teachers]).mean(0)
            assert torch.equal(got[name], value) if not name.startswith(last) else torch.allclose(got[name], value)


def test_a_residual_stage_is_kept_or_dropped_as_one_group():
    big_student = merge.make_big_student(make_teachers("resnet20", 2))
    stage_gates = {id(g) for g in big_student.stage_gates}
    groups = [g for g, _, _ in big_student.unit_groups()]
    assert sum(id(g) in stage_gates for g in groups) == 3  # one group per stage, not per block
    assert len(merge.gates(big_student)) == 3 + 9  # 3 shared stage gates + one inner gate per block
    drawn = []  # in training, each stage gate draws its noise once a forward pass, shared by the stage's blocks
    for stage, gate in enumerate(big_student.stage_gates):
        gate.noise = lambda batch, units, stage=stage: drawn.append(stage) or torch.rand(batch, units)
    big_student.train()(torch.randn(3, 3, 16, 16))
    assert drawn == [0, 1, 2]


# ---------------------------------------------------------------------------------------
# Gates and L_half (section 2.2)
# ---------------------------------------------------------------------------------------

def test_p_open_agrees_with_monte_carlo():
    torch.manual_seed(0)
    gate = merge.Gate(6)
    gate.loc.data = torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.0, 4.0])
    frequency = (gate.sample(torch.zeros(200_000, 6)) > 0).double().mean(0)
    assert torch.allclose(frequency, merge.p_open(gate.loc).detach(), atol=0.005)
    assert abs(merge.p_open(merge.Gate(1000).loc).mean().item() - 0.93) < 0.01  # about 0.93 at first


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_the_sampled_gates_follow_p_open_at_another_temperature(monkeypatch, beta):
    """Gate.sample is the paper's formula: change beta and both the samples and p_open follow it."""
    monkeypatch.setattr(merge.Gate, "beta", beta)
    torch.manual_seed(1)
    gate = merge.Gate(5)
    gate.loc.data = torch.tensor([-2.0, -0.5, 0.0, 0.7, 2.0])
    g = gate.sample(torch.zeros(200_000, 5))
    assert torch.allclose((g > 0).double().mean(0), merge.p_open(gate.loc).detach(), atol=0.005)
    # and P[g = 1] = P[s > (1 - gamma) / (zeta - gamma)] = sigmoid(loc - beta log((1 - gamma) / (zeta - 1)))
    p_one = torch.sigmoid(gate.loc - beta * torch.log(torch.tensor((1 - gate.gamma) / (gate.zeta - 1))))
    assert torch.allclose((g == 1).double().mean(0), p_one.detach(), atol=0.005)


def test_a_trainer_may_give_the_gates_its_own_noise():
    gate = merge.Gate(3)
    gate.noise = lambda B, n: torch.full((B, n), 0.5)  # u = 1/2: s = sigmoid(loc / beta)
    want = (torch.sigmoid(gate.loc / gate.beta) * (gate.zeta - gate.gamma) + gate.gamma).clamp(0, 1)
    assert torch.allclose(gate.sample(torch.ones(4, 3)), want.expand(4, 3))


def test_gates_sample_per_example_in_training_and_are_deterministic_in_eval():
    gate = merge.Gate(4)
    x = torch.ones(8, 4, 3, 3)
    g = gate.sample(x)
    assert g.shape == (8, 4, 1, 1) and not torch.equal(g[0], g[1])
    assert ((g >= 0) & (g <= 1)).all()
    gate.eval()
    assert torch.equal(gate(x), gate(x))
    want = (torch.sigmoid(gate.loc) * 1.2 - 0.1).clamp(0, 1)
    assert torch.allclose(gate(x)[:, :, 0, 0], want.expand(8, 4))


@pytest.mark.parametrize("k", [2, 3])
def test_l_half_is_zero_at_exactly_one_kth(k):
    model = merge.make_big_student(make_teachers("lenet", k))
    shift = merge.Gate.beta * torch.log(torch.tensor(-merge.Gate.gamma / merge.Gate.zeta))
    for gate in merge.gates(model):  # P[g > 0] = 1/k for every unit
        gate.loc.data = torch.full_like(gate.loc, torch.logit(torch.tensor(1 / k)) + shift)
    assert merge.l_half([g.loc for g in merge.gates(model)], share=1 / k).item() == pytest.approx(0, abs=1e-24)
    assert merge.l_half([g.loc for g in merge.gates(model)], share=1 / 2 + 0.1).item() > 0
    for gate in merge.gates(model):  # half open, half closed, mean exactly 1/2
        gate.loc.data = torch.tensor([30.0, -30.0]).repeat(len(gate.loc) // 2 + 1)[:len(gate.loc)]
    if all(len(g.loc) % 2 == 0 for g in merge.gates(model)):
        assert merge.l_half([g.loc for g in merge.gates(model)]).item() == pytest.approx(0, abs=1e-12)


def test_l_half_sums_each_layers_squared_distance_from_one_kth():
    """Section 2.2: the sum over layers of (share - the layer's mean P[g > 0])^2."""
    shift = merge.Gate.beta * torch.log(torch.tensor(-merge.Gate.gamma / merge.Gate.zeta))
    loc = lambda p_open: torch.logit(torch.tensor(p_open)) + shift  # noqa: E731 - merge.p_open(loc) = p_open
    layers = [loc([0.9, 0.9]), loc([0.1, 0.3])]  # means 0.9 and 0.2
    assert merge.l_half(layers).item() == pytest.approx((0.5 - 0.9) ** 2 + (0.5 - 0.2) ** 2, rel=1e-9)
    assert merge.l_half(layers, share=1 / 3).item() == pytest.approx((1 / 3 - 0.9) ** 2 + (1 / 3 - 0.2) ** 2, rel=1e-9)


def test_lambda_schedule_follows_fig5_and_ends_at_the_papers_value_when_shortened():
    paper = merge.lambda_schedule(150, 0.01, 0.05)
    assert paper[0] == pytest.approx(0.01 + 0.05 * 0.1)
    assert all(b - a == pytest.approx(0.05 * a ** 0.5) for a, b in zip(paper, paper[1:]))
    assert paper[-1] == pytest.approx(14.47, abs=0.01)  # stepped before each of the 150 epochs, the first too
    for epochs in (1, 10, 600):  # a phase of any length ends at the paper's last lambda
        short = merge.lambda_schedule(epochs, 0.01, 0.05, tuned_epochs=150)
        assert len(short) == epochs and short[-1] == pytest.approx(paper[-1], rel=1e-6)
    assert merge.lambda_schedule(150, 0.01, 0.05, tuned_epochs=150) == paper


def test_the_lr_warms_up_linearly_then_drops_tenfold_at_each_fraction_of_the_phase():
    s = merge.Settings(lr=0.3)
    assert [merge.lr_at(s, e, 9, (1 / 3, 2 / 3), warmup=2) for e in range(9)] == pytest.approx(
        [0.1, 0.2, 0.3, 0.03, 0.03, 0.03, 0.003, 0.003, 0.003])  # ImageNet's fine-tuning: 2 epochs of warm-up
    assert [merge.lr_at(s, e, 3, ()) for e in range(3)] == [0.3] * 3  # no warm-up, no drops: the lr throughout
    assert [merge.lr_at(s, e, 2, (), warmup=2) for e in range(2)] == pytest.approx([0.1, 0.2])  # cut by the phase's end


# ---------------------------------------------------------------------------------------
# Training and the strategies, one run each
# ---------------------------------------------------------------------------------------

def test_budgets_are_equal_and_split_as_in_section_3_1():
    b = merge.budget(merge.Settings())
    assert (b["teacher"], b["importance"], b["finetune"], b["bo3"], b["one"]) == (300, 150, 150, 300, 900)
    for k in (2, 3, 4):
        b = merge.budget(merge.Settings(teachers=k, epochs=120))
        assert k * b["teacher"] + b["importance"] + b["finetune"] == 120


def test_an_epoch_is_the_same_whenever_it_is_trained():
    """fit draws an epoch's order, noise and augmentation from (seed, epoch): two epochs at once, or
    one and then the second on its own with the optimizers' state, give the same model."""
    s, data = merge.Settings(batch=32), merge.sine_data(0, 200, 50, 50)
    torch.manual_seed(0)
    whole = merge.make_big_student([merge.SineMLP(widths=(6,)), merge.SineMLP(widths=(6,))])
    halves = copy.deepcopy(whole)
    lambdas = [0.5, 1.0]
    merge.fit(whole, data, s, 2, seed=4, lambdas=lambdas)
    opts = merge.optimizers(halves, s, importance=True)
    merge.fit(halves, data, s, 1, seed=4, lambdas=lambdas, opts=opts)
    torch.manual_seed(123)  # whatever happened in between
    merge.fit(halves, data, s, 2, seed=4, lambdas=lambdas, opts=opts, start=1)
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), halves.state_dict().values()))


def test_random_keeps_other_units_than_the_gates_on_the_students_phases():
    s, data = merge.Settings(epochs=12), merge.sine_data(0, 200, 50, 50)
    student, mine = merge.student(data, s, merge.SineMLP, 0)
    random, theirs = merge.random(data, s, merge.SineMLP, 0)
    assert mine["teachers_test"] == theirs["teachers_test"] and mine["big_student_test"] == theirs["big_student_test"]
    assert not torch.equal(student.hidden.weight, random.hidden.weight)
    big = merge.make_big_student([merge.SineMLP(), merge.SineMLP()])
    big.gates[0].loc.data = torch.arange(200.0)  # the gates would keep units 100-199
    assert torch.equal(merge.top_units(big)[0], torch.arange(100, 200))
    keep = merge.random_units(big, seed=3)
    assert len(keep[0]) == 100 and keep[0].unique().tolist() == keep[0].tolist()  # 1/k, sorted, no repeats
    assert not torch.equal(keep[0], merge.top_units(big)[0]) and torch.equal(keep[0], merge.random_units(big, 3)[0])
    assert not torch.equal(keep[0], merge.random_units(big, 4)[0])


def test_every_strategy_trains_the_phases_of_its_budget():
    """Each strategy asks its train for the phases of section 3.1 (and ours): their epochs add up."""
    s, data = merge.Settings(epochs=12), merge.sine_data(0, 100, 20, 20)
    for name, strategy in merge.STRATEGIES.items():
        asked = []

        def train(models, data, s, epochs, drops, seeds, phase, *args, **kwargs):
            asked.append((phase, len(models), epochs))
            return merge.train(models, data, s, epochs, drops, seeds, phase, *args, **kwargs)
        model, info = strategy(data, s, merge.SineMLP, 0, train)
        assert type(model) is merge.SineMLP and model.hidden.out_features == 100, name
        epochs = sum(copies * epochs for phase, copies, epochs in asked)
        want = dict(one_compute=2 * 4 + 2 * 2 + 2, fusion=10)  # the wider importance phase; no importance phase
        assert epochs == want.get(name, 12), (name, asked)


@pytest.mark.parametrize("k", [2, 3])
def test_the_students_importance_phase_ends_at_the_papers_lambda_and_aims_at_one_kth(k, monkeypatch):
    """What student() asks of its train for the importance phase (2.2): Fig. 5's schedule over the phase's epochs,
    rescaled to end at the paper's last lambda, and L_half's share 1/k; and --fold 1 reaches compression (ours)."""
    s, data, asked, folded = merge.Settings(epochs=24, teachers=k, fold=1), merge.sine_data(0, 100, 20, 20), {}, []

    def train(models, data, s, epochs, drops, seeds, phase, lambdas=None, share=0.5, warmup=0, **hooks):
        if phase == "importance":
            asked.update(epochs=epochs, lambdas=lambdas, share=share)
        return merge.train(models, data, s, epochs, drops, seeds, phase, lambdas, share, warmup, **hooks)
    compress = merge.compress
    monkeypatch.setattr(merge, "compress", lambda big, keep, fold: folded.append(fold) or compress(big, keep, fold))
    merge.student(data, s, merge.SineMLP, 0, train)
    paper = merge.lambda_schedule(round(s.paper_epochs / 6), s.lambda_start, s.lambda_step)
    assert asked["epochs"] == len(asked["lambdas"]) == merge.budget(s)["importance"] < len(paper)
    assert asked["lambdas"][-1] == pytest.approx(paper[-1], rel=1e-9) and asked["share"] == pytest.approx(1 / k)
    assert folded == [1]


def test_bo3_takes_the_best_of_three_on_the_validation_set_not_the_test_set():
    class Scores:  # model 1 is the best on the validation set, model 0 on the test set (by MSE)
        metric, device = "mse", torch.device("cpu")

        def evaluate(self, model, split="test"):
            return {"val": [0.3, 0.1, 0.2], "test": [0.1, 0.3, 0.2]}[split][model.index]

    def train(models, *args, **kwargs):
        for index, model in enumerate(models):
            model.index = index
        return models
    model, info = merge.bo3(Scores(), merge.Settings(epochs=12), merge.SineMLP, 0, train)
    assert info["chosen"] == model.index == 1 and info["val_of_three"] == [0.3, 0.1, 0.2]
    Scores.metric = "accuracy"  # the higher the better
    assert merge.bo3(Scores(), merge.Settings(epochs=12), merge.SineMLP, 0, train)[1]["chosen"] == 0


def test_kept_share_counts_the_kept_units_of_each_teacher():
    big_student = merge.make_big_student([merge.SineMLP(widths=(4,)), merge.SineMLP(widths=(4,))])
    assert merge.kept_share(big_student, [torch.tensor([0, 1, 2, 5])]) == [0.75, 0.25]  # units 0-3: teacher 0's


def test_macs_counts_each_layers_outputs_times_its_fan_in():
    """Forward multiply-adds of one example, by hand."""
    data = merge.sine_data(0, 10, 2, 2)
    assert merge.macs(merge.SineMLP(), data) == 100 * 1 + 1 * 100
    assert merge.macs(merge.variant(merge.SineMLP(), k=2, gated=True), data) == 200 * 1 + 1 * 200
    x = torch.zeros(4, 28, 28, 3, dtype=torch.uint8)
    images = merge.Data(x, None, x, None, x, None, prepare=lambda x, train=False: x.permute(0, 3, 1, 2).double())
    lenet = 6 * 28 * 28 * (3 * 5 * 5) + 16 * 10 * 10 * (6 * 5 * 5) + 120 * 400 + 80 * 120 + 10 * 80
    assert merge.macs(merge.LeNet(), images) == lenet == 651_200
    big = 12 * 28 * 28 * (3 * 25) + 32 * 10 * 10 * (12 * 25) + 240 * 800 + 160 * 240 + 10 * 160
    assert merge.macs(merge.variant(merge.LeNet(), k=2, gated=True), images) == big  # about 2.9 times


def test_count_peaks_needs_each_crest_and_trough():
    truth = merge.sine_curve(merge.GRID).squeeze(1)
    assert merge.count_peaks(truth) == 5 and merge.count_peaks(torch.zeros_like(truth)) == 0
    flat_crest = truth.clone()
    flat_crest[(merge.GRID.squeeze(1) > 0.4) & (merge.GRID.squeeze(1) < 0.5)] = 0.2  # third crest missed
    flat_trough = truth.clone()
    flat_trough[merge.GRID.squeeze(1) > 0.9] = -0.3  # last trough missed
    assert merge.count_peaks(flat_crest) == 4 and merge.count_peaks(flat_trough) == 4


@pytest.mark.slow
def test_the_method_stands_alone_in_a_folder_of_its_own(tmp_path):
    """merge.py imports the standard library and torch (scipy inside fusion), and runs alone: in a folder
    holding merge.py only, with matplotlib and Pillow unimportable, every strategy runs on the sine."""
    tree = ast.parse((ROOT / "merge.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names} | {node.module.split(".")[0] for node in ast.walk(tree)
                                            if isinstance(node, ast.ImportFrom)}
    assert imported - set(sys.stdlib_module_names) == {"torch", "scipy", "sine", "startup"}  # the last two: in
    main_blocks = [node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
    assert {alias.name for node in main_blocks for inner in ast.walk(node) if isinstance(inner, ast.Import)
            for alias in inner.names} == {"sine", "startup"}  # `if __name__ == "__main__":` blocks alone
    assert sum(1 for _ in open(ROOT / "merge.py")) <= 650
    shutil.copy(ROOT / "merge.py", tmp_path / "merge.py")
    code = """
import sys
for name in ("matplotlib", "PIL", "experiment", "stacked", "sine"):
    sys.modules[name] = None  # import raises ImportError
import merge
s, data = merge.Settings(epochs=12), merge.sine_data(0, 300, 100, 100)
for name, strategy in merge.STRATEGIES.items():
    model, info = strategy(data, s, merge.SineMLP, 0)
    assert type(model) is merge.SineMLP, name
print("alone:", ", ".join(merge.STRATEGIES))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "alone: student, bo3, one, random, one_compute, prune, fusion"


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "merge.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


SMALL = ["--runs", "2", "--epochs", "12", "--n-train", "300", "--n-val", "100", "--n-test", "300", "--compile", "0",
         "--workers", "1"]  # one process: test_experiment.py tries --workers


def here(capsys, *args):
    """merge.py's command line in this process (as test_experiment.py's here): exit code and stdout."""
    import sine
    torch.set_default_dtype(torch.float32)  # as the command line runs; conftest.py restores it
    try:
        sine.main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().out


@pytest.fixture(scope="session")  # once a worker, whatever order the tests run in
def small_run(tmp_path_factory):
    """A short sine run through the real command line; each test below works on a copy of its --out."""
    out = tmp_path_factory.mktemp("small") / "sine"
    first = run_cli(*SMALL, "--out", str(out))
    assert first.returncode == 0, first.stderr
    return out


def test_short_sine_run_writes_everything_and_resumes_without_training(small_run, tmp_path, capsys):
    out = Path(shutil.copytree(small_run, tmp_path / "sine"))
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["run"], r["strategy"]) for r in rows) == sorted(
        (run, name) for run in range(2) for name in ("student", "bo3", "one"))
    for row in rows:  # each row is what its model gives: the fine-tuned student is in phases/
        assert row["seed"] == row["run"] and len(row["curve"]) == len(merge.GRID)
        assert row["peaks"] == merge.count_peaks(torch.tensor(row["curve"]))
        if row["strategy"] == "student":
            shares = row["kept_from_teacher"]  # found through the gates: none would give no shares
            assert len(shares) == 2 and sum(shares) == pytest.approx(1) and min(shares) > 0
            torch.set_default_dtype(torch.float32)  # as the command line ran
            student, data = merge.SineMLP(), merge.sine_data(row["seed"], 300, 100, 300)
            seed = merge.phase_seed(row["seed"], "finetune")
            student.load_state_dict(torch.load(out / "phases" / f"finetune-{seed}.pt"))
            assert row["test_mse"] == round(data.evaluate(student, "test"), 6) > 0
    for figure in ("fig5_lambda", "fig8a_data", "fig9_box", "fig10_curves", "fig2_kept_share"):
        assert (out / f"{figure}.png").stat().st_size > 1000
    summary = (out / "summary.md").read_text()
    assert all(f"| {name} | 2 |" in summary for name in ("student", "bo3", "one"))
    code, printed = here(capsys, *SMALL, "--out", out)  # the same command again, in this process
    assert code == 0
    assert "6 results already" in printed and "  teacher:" not in printed and "  one:" not in printed
    assert (out / "summary.md").read_text() == summary
    assert len((out / "results.jsonl").read_text().splitlines()) == 6


def test_an_interrupted_run_redoes_no_finished_phase(small_run, tmp_path, capsys):
    out = Path(shutil.copytree(small_run, tmp_path / "sine"))
    lines = (out / "results.jsonl").read_text().splitlines()
    students = [line for line in lines if '"strategy": "student"' in line]
    # as if it crashed after the student phases finished, while writing the first student line
    (out / "results.jsonl").write_text("".join(line + "\n" for line in lines if line not in students) + students[0][:40])
    code, again = here(capsys, *SMALL, "--out", out)
    assert code == 0
    assert "teacher: 0 x 4 epochs (4 done before)" in again and "finetune: 0 x 2 epochs (2 done before)" in again
    redone = [line for line in (out / "results.jsonl").read_text().splitlines() if '"strategy": "student"' in line]
    assert [json.loads(line) for line in redone] == [json.loads(line) for line in students]


def test_bad_input_gives_one_line_and_exit_code_2(tmp_path):
    """Through the real command line: argparse's own check here, ours with changed settings below; every case
    in test_experiment.py, in its process."""
    result = run_cli("--task", "mnist", "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "invalid choice" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_gives_one_line_and_exit_code_2(tmp_path, capsys):
    import sine
    with pytest.raises(SystemExit) as end:
        sine.main(["--device", "cuda", "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert end.value.code == 2 and error.count("\n") == 1 and "no GPU" in error
    assert not (tmp_path / "out").exists()


def test_changed_settings_with_the_same_out_are_refused(tmp_path):
    out = tmp_path / "sine"
    out.mkdir()
    (out / "settings.json").write_text(json.dumps({"epochs": 600}))
    result = run_cli("--out", str(out))
    assert result.returncode == 2 and "other settings" in result.stderr and result.stderr.count("\n") == 1
    assert [p.name for p in out.iterdir()] == ["settings.json"]  # nothing written, nothing changed
    assert json.loads((out / "settings.json").read_text()) == {"epochs": 600}


def test_the_readme_reports_what_the_committed_run_produced(tmp_path, capsys):
    """figures/ holds results.jsonl and settings.json of the full run in the README; the
    same command on a copy (in this process) trains nothing and must regenerate the README's table."""
    out = tmp_path / "sine"
    out.mkdir()
    for name in ("results.jsonl", "settings.json"):
        (out / name).write_text((ROOT / "figures" / name).read_text())
    code, printed = here(capsys, "--task", "sine", "--runs", "50", "--strategies",
                         "student,bo3,one,fusion,random,one_compute", "--out", out, "--workers", 1)
    assert code == 0
    assert "300 results already" in printed and "  teacher:" not in printed
    summary = (out / "summary.md").read_text()
    assert summary == (ROOT / "figures" / "summary.md").read_text()
    table = summary.split("\n\n", 1)[1].strip()
    assert table in (ROOT / "README.md").read_text()


def test_stages_md_holds_each_runs_stages_as_committed(tmp_path, capsys, monkeypatch):
    """The committed run's per-run stage table (figures/stages.md), run by run in order, as write_report makes it."""
    import report
    import sine
    for name in [name for name in dir(report) if name.startswith("plot_")]:  # the figures: not here
        monkeypatch.setattr(report, name, lambda *args: None)
    rows = [json.loads(line) for line in (ROOT / "figures" / "results.jsonl").read_text().splitlines()]
    s = sine.SineSettings(runs=50, strategies="student,bo3,one,fusion,random,one_compute")
    sine.write_report(s, rows, tmp_path)
    capsys.readouterr()
    assert (tmp_path / "stages.md").read_text() == (ROOT / "figures" / "stages.md").read_text()


def test_the_readme_reports_the_committed_fold_study():
    """figures/fold holds the student and random of the same 50 runs with --fold 1; the README's table is theirs."""
    import sine
    rows = lambda folder: [json.loads(line) for line in (ROOT / "figures" / folder / "results.jsonl").read_text().splitlines()]
    assert json.loads((ROOT / "figures" / "fold" / "settings.json").read_text())["fold"] == 1
    table = sine.fold_table(rows(""), rows("fold"))
    assert table.count("| 50/50 |") == 2 and table in (ROOT / "README.md").read_text()


def test_the_readme_reports_the_committed_study_of_k_teachers_and_the_bench():
    """figures/sine_teachers holds the rows of sine_teachers.py's run; figures/bench.md what --bench printed;
    figures/gpu the GPU check's report. The tables of the README and docs/speed.md are theirs."""
    import sine_teachers
    readme = (ROOT / "README.md").read_text()
    study = ROOT / "figures" / "sine_teachers"
    rows_of = {int(d.name[1:]): [json.loads(line) for line in (d / "results.jsonl").read_text().splitlines()]
               for d in sorted(study.glob("k*"))}
    assert sorted(rows_of) == [2, 3, 4, 5] and all(len(rows) >= 50 for rows in rows_of.values())
    table = sine_teachers.teachers_table(rows_of)
    assert table in (study / "summary.md").read_text() and table in readme
    speed = (ROOT / "docs" / "speed.md").read_text()
    bench = (ROOT / "figures" / "bench.md").read_text()
    assert "\n".join(line for line in bench.splitlines() if line.startswith("|")) in speed
    gpu = (ROOT / "figures" / "gpu" / "gpu_check_h200.md").read_text().split("\n\n")[1]
    assert gpu.strip() in speed
    h100 = [line.split(" | ")[-4:] for line in speed.splitlines() if line.startswith("| ") and "H100" not in line and
            line.count(" | ") == 5 and any(w in line for w in ("sine", "cached", "LeNet", "ResNet18", "decode"))]
    assert len(h100) >= 8, h100  # the H100 table: each number of its last four columns is in its report(s)
    for reports, numbers in zip(("gpu_check_h100_first_run.md", "gpu_check_h100_second_run.md", "gpu_check_h100.md",
                                 "gpu_check_h100_recheck_*.md"), zip(*h100)):
        text = "".join(path.read_text() for path in (ROOT / "figures" / "gpu").glob(reports))
        for number in (n for cell in numbers for n in re.findall(r"[\d,.]+\d", cell)):
            assert number.replace(",", "") in text, (reports, number)


def test_the_readme_reports_the_committed_study_of_budgets():
    """figures/budget holds the rows of sine_budgets.py at 180, 450, 900 and 1800 epochs, 50 runs each; the
    README's table is theirs, and so is the study's own summary."""
    import sine_budgets
    folders = sorted((ROOT / "figures" / "budget").glob("epochs*"), key=lambda d: int(d.name[6:]))
    rows_of = {int(d.name[6:]): [json.loads(line) for line in (d / "results.jsonl").read_text().splitlines()]
               for d in folders}
    assert sorted(rows_of) == [180, 450, 900, 1800] and all(len(rows) == 150 for rows in rows_of.values())
    assert all(json.loads((d / "settings.json").read_text())["epochs"] == int(d.name[6:]) for d in folders)
    main_run = [json.loads(line) for line in (ROOT / "figures" / "results.jsonl").read_text().splitlines()]
    assert rows_of[900] == [r for r in main_run if r["strategy"] in sine_budgets.NAMES]  # the main run's, copied
    table = sine_budgets.budget_table(rows_of)
    assert table in (ROOT / "figures" / "budget" / "summary.md").read_text() and table in (ROOT / "README.md").read_text()


def test_the_readme_is_short_and_states_every_difference_and_nothing_cites_files_outside():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    differences = readme.split("## Differences from the paper")[1].split("\n## ")[0]
    for item in ("10,000 images", "after epochs 7 and 13", "after 50 and 70", "`--teacher-files`", "160 px",
                 "ranked by `loc`", "standard deviation", "peak criterion", "deterministic at test time", "ddof"):
        assert item in differences, item
    cited = [p.name for p in ROOT.glob("*") if p.suffix in (".py", ".md", ".ipynb") and "REFERENCE" + ".md" in p.read_text()]
    cited += [p.name for p in (ROOT / "docs").glob("*.md") if "REFERENCE" + ".md" in p.read_text()]
    assert cited == []
