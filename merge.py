"""Merging of neural networks (Pasen and Boza), a reference reproduction in one file.

Two networks of one architecture, trained from different seeds (the *teachers*), are
concatenated layer by layer into a k-times-wider *big student* that outputs their mean
(section 2.1). Stochastic L0 gates learn which units to keep under the auxiliary loss
L_half (section 2.2); the big student is compressed back to the teachers' width
(section 2.3) and fine-tuned. The paper's claim: under the same epoch budget the student
beats the best of three models (bo3) and one model trained for the whole budget.

    pip install -r requirements.txt
    python merge.py --task sine --runs 50      # Table 1, Figs. 5, 8a, 9, 10 -> runs/sine/

The file reads top to bottom in the paper's order: gates and L_half (2.2), concatenation
(2.1), compression (2.3), architectures, training, strategies (3.1) and the baselines the
paper compares with (3.3: channel pruning, model fusion), results, the sine experiment
(3.2), the command line.
Results, machine and budget are in README.md. Every default is the paper's setting unless
its help says (ours).
"""
import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class InputError(ValueError):
    """Bad input from the user: the command line reports it as one line and exit code 2."""


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# =============================================================================
# 2.2  Gates and the auxiliary loss L_half
# =============================================================================

class Gate(nn.Module):
    """Hard-concrete gates over n units (Louizos et al. 2018, "Learning sparse neural
    networks through L0 regularization"), the stochastic gates of section 2.2.

    Training mode draws one gate value per example and unit; eval mode uses the
    deterministic test-time value. `x * gate.sample(x)` gates x; one sample may be applied
    at several points of a forward pass (the shared gate of a ResNet stage, Fig. 6c).
    """
    beta, gamma, zeta = 2 / 3, -0.1, 1.1  # temperature and stretch, fixed as in the paper's scripts

    def __init__(self, n):
        super().__init__()
        self.loc = nn.Parameter(1 + 0.01 * torch.randn(n))  # loc ~ N(1, 0.01^2), P[g > 0] ~ 0.93
        self.register_buffer("noise", None, persistent=False)  # u drawn outside, by fit_stacked

    def sample(self, x):
        """Gate values shaped to multiply x: (B, n) for x (B, n), (B, n, 1, 1) for x (B, n, H, W)."""
        B, n = x.shape[0], len(self.loc)
        if self.training:
            # s = sigmoid((log u - log(1 - u) + loc) / beta),  u ~ U(0, 1)
            u = self.noise if self.noise is not None else torch.rand(B, n, device=x.device, dtype=self.loc.dtype)
            u = u.clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((u.log() - (-u).log1p() + self.loc) / self.beta)
        else:  # DEVIATION: deterministic at test time (the authors' scripts keep sampling, so their
            # logged test numbers are noisy): s = sigmoid(loc), the same for every example
            s = torch.sigmoid(self.loc).expand(B, n)
        # g = clamp(s (zeta - gamma) + gamma, 0, 1): stretching then clamping gives P[g = 0] > 0 and P[g = 1] > 0
        g = (s * (self.zeta - self.gamma) + self.gamma).clamp(0, 1)
        return g.view(B, n, *[1] * (x.dim() - 2))

    def forward(self, x):
        return x * self.sample(x)  # (B, n, H, W) * (B, n, 1, 1), or (B, n) * (B, n)

    def p_open(self):
        return p_open(self.loc)


def p_open(loc):
    """P[g > 0] per unit = sigmoid(loc - beta log(-gamma / zeta))."""
    return torch.sigmoid(loc - Gate.beta * math.log(-Gate.gamma / Gate.zeta))


def gates(model):
    return [m for m in model.modules() if isinstance(m, Gate)]


def l_half(model, keep=0.5):
    """sum over gate layers l of L_half^l = (keep - 1/n sum_i P[g_i > 0])^2   (section 2.2, keep = 1/2).

    With k teachers the big student keeps 1/k of each layer, so keep = 1/k."""
    return sum((keep - gate.p_open().mean()) ** 2 for gate in gates(model))


def lambda_schedule(epochs, start, step, paper_epochs=None):
    """lambda for each epoch of the importance phase: lambda_{t+1} = lambda_t + step sqrt(lambda_t),
    applied once before every epoch (Fig. 5).

    A phase of another length than the paper's (`paper_epochs`) gets the step that ends
    at the paper's final lambda (about 15 for the sine), found by bisection, so that a
    short run still presses the gates to keep exactly 1/k."""
    def schedule(step, n):
        lam, lambdas = start, []
        for _ in range(n):
            lam += step * math.sqrt(lam)
            lambdas.append(lam)
        return lambdas

    # DEVIATION: the paper tunes the step for its budget only; we rescale it for other budgets.
    if paper_epochs is None or paper_epochs == epochs or epochs == 0:
        return schedule(step, epochs)
    target = schedule(step, paper_epochs)[-1]
    low, high = 0.0, step * paper_epochs / epochs * 4
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if schedule(mid, epochs)[-1] < target else (low, mid)
    return schedule((low + high) / 2, epochs)


# =============================================================================
# 2.1  Layerwise concatenation of the teachers into a big student (Figs. 3-4)
# =============================================================================

def concat_weight(weights, position):
    """The big student's weight from k teachers' weights, each (out, in, *kernel):

    first   outputs stacked, the input shared  -> (k out, in, ...)
    middle  block-diagonal, zero elsewhere     -> (k out, k in, ...)  (Fig. 3: the gray zeros may
                                                  become non-zero in training and join the flows)
    last    inputs stacked, divided by k       -> (out, k in, ...)    so the output is the mean
    Teacher i's units occupy block i."""
    k = len(weights)
    if position == "first":
        return torch.cat(weights, 0)
    if position == "last":
        return torch.cat(weights, 1) / k
    out, inp = weights[0].shape[:2]
    big = weights[0].new_zeros(k * out, k * inp, *weights[0].shape[2:])
    for i, w in enumerate(weights):
        big[i * out:(i + 1) * out, i * inp:(i + 1) * inp] = w
    return big


def concat_layer(teachers, position):
    """State of the big student's nn.Linear or nn.Conv2d from the teachers' ones (Fig. 4)."""
    state = {"weight": concat_weight([t.weight.detach() for t in teachers], position)}
    if teachers[0].bias is not None:
        biases = torch.stack([t.bias.detach() for t in teachers])
        state["bias"] = biases.mean(0) if position == "last" else biases.flatten()
    return state


def concat_batchnorm(teachers):
    """State of the big student's nn.BatchNorm2d: weight, bias, running mean and variance stacked.
    (The authors' scripts skip the running statistics, so their big student is not the
    teachers' mean in eval mode.)"""
    state = {name: torch.cat([t.state_dict()[name] for t in teachers])
             for name in ("weight", "bias", "running_mean", "running_var")}
    state["num_batches_tracked"] = teachers[0].num_batches_tracked.clone()
    return state


def concat_network(teachers, first=None, last=None):
    """State of the big student of any module: every Linear, Conv2d and BatchNorm2d inside
    it, Linear/Conv2d named `first` and `last` in those positions, all others in the middle.
    For a ResNet BasicBlock every layer, shortcut included, is in the middle: concat_network(blocks)."""
    state = {}
    for name, module in teachers[0].named_modules():
        parts = [t.get_submodule(name) for t in teachers]
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            position = "first" if name == first else "last" if name == last else "middle"
            layer = concat_layer(parts, position)
        elif isinstance(module, nn.BatchNorm2d):
            layer = concat_batchnorm(parts)
        else:
            continue
        state.update({f"{name}.{key}" if name else key: value for key, value in layer.items()})
    return state


def variant(model, **changes):
    """A fresh network of model's class with some constructor arguments changed (k, gated)."""
    return type(model)(**{**model.hparams, **changes}).to(next(model.parameters()).device)


def make_big_student(teachers):
    """Concatenate k >= 2 teachers of one architecture into a gated network k times as wide
    whose output is the mean of theirs (exactly, in eval mode with the gates open)."""
    if len(teachers) < 2:
        raise InputError(f"make_big_student needs at least 2 teachers, got {len(teachers)}")
    t0 = teachers[0]
    shapes = {name: p.shape for name, p in t0.state_dict().items()}
    for i, t in enumerate(teachers[1:], 1):
        other = {name: p.shape for name, p in t.state_dict().items()}
        if type(t) is not type(t0) or other != shapes or t.hparams != t0.hparams:
            diff = next((n for n in shapes if shapes[n] != other.get(n)), "the architecture")
            raise InputError(f"teachers 0 and {i} differ in shape ({diff}): merging needs one architecture")
    big_student = variant(t0, k=len(teachers), gated=True)
    layers = [name for name, m in t0.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    missing, unexpected = big_student.load_state_dict(
        concat_network(teachers, first=layers[0], last=layers[-1]), strict=False)
    assert not unexpected and all(name.endswith("loc") for name in missing), (missing, unexpected)
    return big_student


# =============================================================================
# 2.3  Compression of the big student (Fig. 7)
# =============================================================================

def slice_layer(module, out_units=None, in_features=None):
    """State of a Linear, Conv2d or BatchNorm2d keeping only some outputs and inputs."""
    state = {}
    for name, tensor in module.state_dict().items():
        if tensor.dim() >= 1 and out_units is not None:
            tensor = tensor[out_units]
        if tensor.dim() >= 2 and in_features is not None:
            tensor = tensor[:, in_features]
        state[name] = tensor.clone()
    return state


def top_units(big_student):
    """The kept units of every unit group: the top 1/k by gate importance loc (the test-time
    gate value clamp(sigmoid(loc) (zeta - gamma) + gamma, 0, 1) ranks the same, with ties)."""
    k = big_student.hparams["k"]
    return [gate.loc.detach().topk(len(gate.loc) // k).indices.sort().values
            for gate, _, _ in big_student.unit_groups()]


def compress(big_student, keep=None):
    """The teachers' architecture holding the kept units of every gated layer (section 2.3).

    keep: one index tensor per unit group (in `unit_groups()` order); top_units() by
    default. Producers lose their dropped outputs (weights, biases, BatchNorm statistics),
    consumers their dropped inputs (a flattened feature map drops all its positions). It
    preserves the gated function exactly when the kept gates are 1 and the dropped are 0
    at test time; the hard-concrete gates under L_half end mostly at those values."""
    keep = top_units(big_student) if keep is None else keep
    out_units, in_features = {}, {}
    for (_, producers, consumers), units in zip(big_student.unit_groups(), keep):
        n = producers[0].weight.shape[0]
        for m in producers:
            out_units[m] = units
        for m in consumers:
            per_unit = m.weight.shape[1] // n  # 1, or H*W after a flatten
            in_features[m] = (units[:, None] * per_unit + torch.arange(per_unit, device=units.device)).flatten()
    state = {}
    for name, m in big_student.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.BatchNorm2d)):
            for key, value in slice_layer(m, out_units.get(m), in_features.get(m)).items():
                state[f"{name}.{key}"] = value
    student = variant(big_student, k=1, gated=False)
    student.load_state_dict(state)
    return student


# =============================================================================
# Architectures. Each takes the teachers' widths, k (the big student has k times every
# width) and gated (gates after the ReLUs, Fig. 6), and lists its unit groups:
# (gate, producers, consumers), the layers whose outputs / inputs a gate's units are.
# =============================================================================

def maybe_gate(n, gated):
    return Gate(n) if gated else nn.Identity()


def chain_groups(gates, layers):
    """Unit groups of a plain chain: gate i sits between layers i and i + 1."""
    return [(g, [a], [b]) for g, a, b in zip(gates, layers, layers[1:])]


class SineMLP(nn.Module):
    """1-100-1 with ReLU (Fig. 8b); the gate after the ReLU (Fig. 6a)."""

    def __init__(self, widths=(100,), k=1, gated=False):
        super().__init__()
        self.hparams = dict(widths=tuple(widths), k=k, gated=gated)
        hidden = k * widths[0]
        self.hidden = nn.Linear(1, hidden)
        self.gates = nn.ModuleList([maybe_gate(hidden, gated)])
        self.out = nn.Linear(hidden, 1)

    def forward(self, x):  # (B, 1) -> (B, 1)
        return self.out(self.gates[0](F.relu(self.hidden(x))))

    def unit_groups(self):
        return chain_groups(self.gates, [self.hidden, self.out])


class LeNet(nn.Module):
    """conv 3->6 (5x5, pad 2), pool, conv 6->16 (5x5), pool, linear 400->120->80->classes,
    for 28x28x3 images (section 3.3.1); a gate after every ReLU (Fig. 6b)."""

    def __init__(self, num_classes=10, widths=(6, 16, 120, 80), k=1, gated=False):
        super().__init__()
        self.hparams = dict(num_classes=num_classes, widths=tuple(widths), k=k, gated=gated)
        c1, c2, f1, f2 = (k * w for w in widths)
        self.conv1 = nn.Conv2d(3, c1, 5, padding=2)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.fc1 = nn.Linear(c2 * 5 * 5, f1)
        self.fc2 = nn.Linear(f1, f2)
        self.fc3 = nn.Linear(f2, num_classes)
        self.gates = nn.ModuleList(maybe_gate(n, gated) for n in (c1, c2, f1, f2))

    def forward(self, x):  # (B, 3, 28, 28) -> (B, classes)
        g1, g2, g3, g4 = self.gates
        x = F.max_pool2d(g1(F.relu(self.conv1(x))), 2)  # (B, c1, 14, 14)
        x = F.max_pool2d(g2(F.relu(self.conv2(x))), 2)  # (B, c2, 5, 5)
        x = g3(F.relu(self.fc1(x.flatten(1))))          # (B, f1)
        x = g4(F.relu(self.fc2(x)))                     # (B, f2)
        return self.fc3(x)

    def unit_groups(self):
        return chain_groups(self.gates, [self.conv1, self.conv2, self.fc1, self.fc2, self.fc3])


class VGG(nn.Module):
    """VGG-11 of the fusion papers: 3x3 convs (pad 1) without bias or BatchNorm, max pools,
    one Linear without bias, for 32x32 images (section 3.3.4); a gate after every ReLU."""

    def __init__(self, num_classes=10, widths=(64, 128, 256, 256, 512, 512, 512, 512),
                 pools=(0, 1, 3, 5, 7), k=1, gated=False):
        super().__init__()
        self.hparams = dict(num_classes=num_classes, widths=tuple(widths), pools=tuple(pools), k=k, gated=gated)
        ws = [k * w for w in widths]
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, padding=1, bias=False) for i, o in zip([3] + ws, ws))
        self.gates = nn.ModuleList(maybe_gate(w, gated) for w in ws)
        self.classifier = nn.Linear(ws[-1], num_classes, bias=False)

    def forward(self, x):  # (B, 3, 32, 32) -> (B, classes)
        for i, (conv, gate) in enumerate(zip(self.convs, self.gates)):
            x = gate(F.relu(conv(x)))
            if i in self.hparams["pools"]:
                x = F.max_pool2d(x, 2)
        return self.classifier(x.flatten(1))  # (B, C, 1, 1) -> (B, C)

    def unit_groups(self):
        return chain_groups(self.gates, [*self.convs, self.classifier])


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-gate-conv3x3-BN, plus the shortcut, then ReLU (He et al. 2016). The
    inner gate follows the first ReLU; the caller passes the stage's shared gate sample g."""

    def __init__(self, cin, cout, stride=1, gated=False):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.gate = maybe_gate(cout, gated)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:  # a 1x1 conv, concatenated and compressed like any conv
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x, g=None):
        out = self.gate(F.relu(self.bn1(self.conv1(x))))
        out = F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))
        return out if g is None else out * g  # (B, C, H, W) * (B, C, 1, 1)


class ResNet(nn.Module):
    """ResNet of BasicBlocks: stem 'imagenet' (7x7/2 conv, max pool) or 'cifar' (3x3 conv).
    Each stage's residual stream has ONE gate, sampled once per forward pass and applied
    wherever the stream is written (Fig. 6c): with separate gates a closed channel would
    turn x + f(x) into 0 + f(x). The stem writes stage 0's stream."""

    def __init__(self, num_classes, widths, depths, stem="cifar", k=1, gated=False):
        super().__init__()
        self.hparams = dict(num_classes=num_classes, widths=tuple(widths), depths=tuple(depths),
                            stem=stem, k=k, gated=gated)
        ws = [k * w for w in widths]
        self.conv = (nn.Conv2d(3, ws[0], 7, 2, 3, bias=False) if stem == "imagenet"
                     else nn.Conv2d(3, ws[0], 3, 1, 1, bias=False))
        self.bn = nn.BatchNorm2d(ws[0])
        self.stages = nn.ModuleList()
        cin = ws[0]
        for s, (w, depth) in enumerate(zip(ws, depths)):
            stride = 1 if s == 0 else 2
            self.stages.append(nn.ModuleList(
                BasicBlock(cin if b == 0 else w, w, stride if b == 0 else 1, gated) for b in range(depth)))
            cin = w
        self.stage_gates = nn.ModuleList(Gate(w) for w in ws) if gated else None
        self.fc = nn.Linear(ws[-1], num_classes)

    def forward(self, x):  # (B, 3, H, W) -> (B, classes)
        x = F.relu(self.bn(self.conv(x)))
        if self.hparams["stem"] == "imagenet":
            x = F.max_pool2d(x, 3, 2, 1)
        for s, blocks in enumerate(self.stages):
            g = self.stage_gates[s].sample(x) if self.stage_gates is not None else None
            if s == 0 and g is not None:
                x = x * g
            for block in blocks:
                x = block(x, g)
        return self.fc(x.mean((2, 3)))

    def unit_groups(self):
        groups = []
        for s, blocks in enumerate(self.stages):
            gate = self.stage_gates[s] if self.stage_gates is not None else None
            producers = [self.conv, self.bn] if s == 0 else list(blocks[0].shortcut)
            consumers = [b.conv1 for b in (blocks if s == 0 else blocks[1:])]
            for b in blocks:
                producers += [b.conv2, b.bn2]
                groups.append((b.gate, [b.conv1, b.bn1], [b.conv2]))
            if s + 1 < len(self.stages):
                consumers += [self.stages[s + 1][0].conv1, self.stages[s + 1][0].shortcut[0]]
            else:
                consumers.append(self.fc)
            groups.append((gate, producers, consumers))
        return groups


def resnet18(num_classes=10, width=64):
    """The standard ImageNet ResNet18: 64/128/256/512, two BasicBlocks a stage."""
    return ResNet(num_classes, (width, 2 * width, 4 * width, 8 * width), (2, 2, 2, 2), "imagenet")


def resnet20(num_classes=100, width=16):
    """CIFAR ResNet20: 3x3 stem to 16, three stages of three BasicBlocks, 16/32/64.
    DEVIATION: 1x1-conv shortcuts where the original ResNet20 pads with zeros, as the
    paper's scripts do (REFERENCE.md), so shortcuts concatenate like any conv."""
    return ResNet(num_classes, (width, 2 * width, 4 * width), (3, 3, 3), "cifar")


def vgg11(num_classes=10, width=64):
    return VGG(num_classes, tuple(width * m for m in (1, 2, 4, 4, 8, 8, 8, 8)))


# =============================================================================
# Settings: one dataclass; the command line is built from it. Defaults are the paper's
# sine protocol (section 3.2 and REFERENCE.md); the image scripts replace some of them.
# =============================================================================

def setting(default, help, **extra):
    return field(default=default, metadata=dict(help=help, **extra))


@dataclass
class Settings:
    unused: ClassVar[tuple] = ()  # fields an experiment does not use: no flag, not in settings.json
    task: str = setting("sine", "experiment (section 3.2); the image experiments have their own scripts",
                        choices=("sine",))
    runs: int = setting(50, "independent runs, each with its own models and seeds", run_only=True)
    seed: int = setting(0, "base seed; run r of seed S uses seed 1000 S + r (ours)")
    epochs: int = setting(900, "epochs per strategy, the whole budget; every phase and lr drop scales with it")
    teachers: int = setting(2, "k, the number of teachers merged into one student")
    device: str = setting("auto", "where to train: auto picks cuda when torch sees a GPU",
                          choices=("auto", "cpu", "cuda"), run_only=True)
    out: str = setting("runs/sine", "folder for results.jsonl, summary.md and the figures", run_only=True)
    strategies: str = setting("student,bo3,one", "comma-separated, of student, bo3, one (section 3.1), prune and "
                                                 "fusion (3.3); more may be added to an --out later", run_only=True)
    n_train: int = setting(10_000, "training points (paper: 10,000)")
    n_val: int = setting(2_000, "validation points, drawn the same way, for choosing bo3 (ours)")
    n_test: int = setting(10_000, "test points, drawn the same way (ours)")
    noise: float = setting(0.2, "standard deviation of the noise on y (paper: N(0, 0.2))")
    batch: int = setting(32, "examples per SGD step")
    lr: float = setting(0.01, "SGD learning rate, divided by 10 at each drop")
    momentum: float = setting(0.9, "SGD momentum")
    weight_decay: float = setting(0.0, "SGD weight decay")
    gate_lr: float = setting(0.1, "learning rate of the gates' own SGD, momentum 0.9")
    lambda_start: float = setting(0.01, "lambda at the start of the importance phase (Fig. 5)")
    lambda_step: float = setting(0.05, "lambda += step sqrt(lambda) before each epoch (Fig. 5)")
    paper_epochs: int = setting(900, "budget the lambda step is tuned for; other budgets rescale the step so "
                                     "lambda ends where the paper's does (ours)")
    stack: int = setting(1, "1: train the models of a phase of all runs as one stack (fit_stacked); "
                            "0: one at a time, like the paper's scripts (ours)", run_only=True)
    compile: int = setting(1, "1: torch.compile the stacked step, falling back to eager where it can't (ours)",
                           run_only=True)
    bench: bool = setting(False, "print the speed of the one-at-a-time and the stacked trainers, then exit",
                          run_only=True)
    # where finished phases are kept for resuming; the experiment sets it inside --out
    phase_dir: str = field(default="", metadata=dict(run_only=True))
    # lr / 10 at these fractions of each phase (section 3.2: teachers and bo3 models at 250 of
    # 300 epochs, the importance phase constant, fine-tuning at 100 of 150, one model at 800 of 900)
    drops_teacher: tuple = (5 / 6,)
    drops_importance: tuple = ()
    drops_finetune: tuple = (2 / 3,)
    drops_one: tuple = (8 / 9,)


def budget(s):
    """Epochs per phase, equal in total for every strategy (section 3.1): student = k teachers
    sharing 2/3, importance 1/6, fine-tune the rest (1/6); bo3 = 3 models of 1/3; one = all."""
    # k > 2 is the paper's future work: the k teachers share the 2/3 so budgets stay equal.
    teacher, importance = round(s.epochs * 2 / 3 / s.teachers), round(s.epochs / 6)
    return dict(teacher=teacher, importance=importance,
                finetune=s.epochs - s.teachers * teacher - importance, bo3=round(s.epochs / 3), one=s.epochs)


def check_settings(s):
    for name in ("runs", "epochs", "n_train", "n_val", "n_test", "batch"):
        if getattr(s, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(s, name)}")
    unknown = set(s.strategies.split(",")) - set(STRATEGIES)
    if unknown:
        raise InputError(f"--strategies: unknown {', '.join(sorted(unknown))}; choose from {', '.join(STRATEGIES)}")
    if not 2 <= s.teachers <= 10:
        raise InputError(f"--teachers must be from 2 to 10, got {s.teachers}")
    if min(budget(s).values()) < 1:
        enough = next(e for e in range(1, 10_000) if min(budget(dataclasses.replace(s, epochs=e)).values()) >= 1)
        raise InputError(f"--epochs {s.epochs} leaves a phase without epochs for {s.teachers} teachers; "
                         f"use at least {enough}")


def resolve_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda, but torch sees no GPU here; use --device cpu or auto")
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


# =============================================================================
# Training: plain SGD for teachers, bo3 and one model and fine-tuning; with a lambda
# schedule, the importance phase of the big student (section 2.2).
# =============================================================================

@dataclass
class Data:
    """Train, validation and test tensors on the training device."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    metric: str = "mse"   # "mse" (lower is better) or "accuracy" (higher is better)
    prepare: object = None  # stored batch -> model input, on the device (uint8 images -> normalised floats)
    augment: object = None  # the same with random augmentation: training batches use it in place of prepare


def model_input(data, x, train=False):
    """A batch of data's stored x as the model takes it."""
    f = (data.augment if train else None) or data.prepare
    return f(x) if f else x


_T0 = time.time()


def log(message):
    print(f"[{time.time() - _T0:7.1f}s] {message}", flush=True)


def lr_at(s, epoch, epochs, drops):
    """s.lr divided by 10 at each fraction of the phase in drops."""
    return s.lr * 0.1 ** sum(epoch >= round(f * epochs) for f in drops)


def report_progress(epoch, epochs, error):
    if (epoch + 1) % max(1, epochs // 5) == 0 and epochs >= 20:
        log(f"    epoch {epoch + 1}/{epochs}, training error {error:.4f}")


def fit(model, data, s, epochs, drops=(), seed=0, lambdas=None, keep=0.5, after_step=None, after_epoch=None):
    """Train one model in place with SGD (the reference loop; fit_stacked is its fast twin).

    With `lambdas` (one per epoch) this is the importance phase: L = L_E + lambda sum_l L_half^l,
    the gates on their own SGD (section 2.2). after_step() and after_epoch(epoch), if given,
    run after every step and epoch (channel pruning uses them). Returns one dict per epoch."""
    torch.manual_seed(seed)  # data order and gate noise
    model.train()
    gate_params = [gate.loc for gate in gates(model)]
    weights = [p for p in model.parameters() if all(p is not q for q in gate_params)]
    opt = torch.optim.SGD(weights, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    gate_opt = torch.optim.SGD(gate_params, lr=s.gate_lr, momentum=0.9) if lambdas is not None else None
    error_loss = F.mse_loss if data.metric == "mse" else F.cross_entropy
    history = []
    for epoch in range(epochs):
        start = time.time()
        for group in opt.param_groups:
            group["lr"] = lr_at(s, epoch, epochs, drops)
        lam = lambdas[epoch] if lambdas is not None else 0.0
        total = torch.zeros((), device=data.x_train.device)
        for idx in torch.randperm(len(data.x_train), device=data.x_train.device).split(s.batch):
            x, y = data.x_train[idx], data.y_train[idx]
            error = error_loss(model(model_input(data, x, train=True)), y)
            loss = error + lam * l_half(model, keep) if gate_opt else error
            opt.zero_grad(set_to_none=True)
            if gate_opt:
                gate_opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if gate_opt:
                gate_opt.step()
            if after_step:
                after_step()
            total += error.detach() * len(idx)
        history.append(dict(epoch=epoch, lam=lam, error=total.item() / len(data.x_train), seconds=time.time() - start,
                            l_half=l_half(model, keep).item() if gate_opt else 0.0,
                            open=[gate.p_open().tolist() for gate in gates(model)]))
        report_progress(epoch, epochs, history[-1]["error"])
        if after_epoch:
            after_epoch(epoch)
    return history


def fit_stacked(models, datas, s, epochs, drops=(), seeds=(0,), lambdas=None, keep=0.5):
    """fit() for many small models of one architecture at once: all runs' models of a phase
    in one stack (torch.func: stack_module_state, then vmap over functional_call).

    The summed loss gives each model exactly its own gradient and SGD with momentum is
    elementwise, so each model trains as fit() would train it alone: on its own data, in its
    own order, with its own gate noise, drawn from its own seed in fit()'s order (a test
    checks the weights agree). The step runs under torch.compile, which fuses the
    elementwise work on the (models, batch, hidden) tensors that dominates the cost.
    Returns one dict per epoch, with one error, P[g > 0] and L_half per model."""
    device = datas[0].x_train.device
    base = copy.deepcopy(models[0]).to("meta")  # the architecture, without weights
    params, buffers = torch.func.stack_module_state(models)
    assert not buffers, "fit_stacked is for networks without BatchNorm statistics"
    params = {name: p.detach().clone() for name, p in params.items()}  # (R, ...) each
    momenta = {name: torch.zeros_like(p) for name, p in params.items()}
    gate_sizes = {name: len(m.loc) for name, m in base.named_modules() if isinstance(m, Gate)}
    is_gate = {name: name.rsplit(".", 1)[0] in gate_sizes for name in params}
    shared = all(d.x_train is datas[0].x_train for d in datas)  # one data set for all: no R copies of it
    X, Y = ((datas[0].x_train, datas[0].y_train) if shared else  # (N, ...) or (R, N, ...)
            (torch.stack([d.x_train for d in datas]), torch.stack([d.y_train for d in datas])))
    N, dtype = len(datas[0].x_train), next(iter(params.values())).dtype
    rows = torch.arange(len(models), device=device)[:, None]
    generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]
    error_loss = F.mse_loss if datas[0].metric == "mse" else F.cross_entropy

    def loss(params, noise, x, y, lam):  # one model: params and noise without the R axis
        error = error_loss(torch.func.functional_call(base, (params, noise), (x,)), y)
        half = sum((keep - p_open(params[f"{name}.loc"]).mean()) ** 2 for name in gate_sizes)  # l_half()
        return error + lam * half, error

    def step(params, momenta, total, x, y, noise, lr, lam):  # x, y (R, B, ...)
        per_model = torch.func.vmap(loss, in_dims=(0, 0, 0, 0, None), randomness="error")

        def summed(params):
            losses, errors = per_model(params, noise, x, y, lam)
            return losses.sum(), errors
        grads, errors = torch.func.grad(summed, has_aux=True)(params)
        for name, p in params.items():  # torch.optim.SGD's update: buf = m buf + d_p; p -= lr buf
            if is_gate[name] and lambdas is None:
                continue
            d_p = grads[name] + s.weight_decay * p if s.weight_decay and not is_gate[name] else grads[name]
            momenta[name].mul_(0.9 if is_gate[name] else s.momentum).add_(d_p)
            p.sub_((s.gate_lr if is_gate[name] else lr) * momenta[name])
        total.add_(errors.detach() * x.shape[1])

    step = compiled(step, s.compile)
    history = []
    for epoch in range(epochs):
        start = time.time()
        lr = torch.tensor(lr_at(s, epoch, epochs, drops), device=device)  # tensors, so that a new value
        lam = torch.tensor(lambdas[epoch] if lambdas is not None else 0.0, device=device)  # needs no recompile
        order = torch.stack([torch.randperm(N, generator=g, device=device) for g in generators])
        X_epoch, Y_epoch = (X[order], Y[order]) if shared else (X[rows, order], Y[rows, order])  # (R, N, ...)
        total = torch.zeros(len(models), device=device)
        for x, y in zip(X_epoch.split(s.batch, dim=1), Y_epoch.split(s.batch, dim=1)):  # (R, B, ...)
            if datas[0].prepare or datas[0].augment:
                x = model_input(datas[0], x.flatten(0, 1), train=True).unflatten(0, x.shape[:2])
            noise = {f"{name}.noise": torch.stack([torch.rand(x.shape[1], n, generator=g, device=device,
                                                              dtype=dtype) for g in generators])
                     for name, n in gate_sizes.items()}  # (R, B, n): fit()'s draws, in the same order
            step(params, momenta, total, x, y, noise, lr, lam)
        opens = [p_open(params[f"{name}.loc"]) for name in gate_sizes]  # (R, n) each
        history.append(dict(epoch=epoch, lam=lam.item(), error=(total / N).tolist(),
                            seconds=time.time() - start, open=[o.tolist() for o in opens],
                            l_half=sum((keep - o.mean(1)) ** 2 for o in opens).tolist() if opens else 0.0))
        report_progress(epoch, epochs, sum(history[-1]["error"]) / len(models))
    for r, model in enumerate(models):
        model.load_state_dict({name: p[r] for name, p in params.items()})
    return history


def compiled(step, use_compile):
    """torch.compile(step); where compiling fails (no C++ compiler, an unsupported platform)
    the eager step, with one line of notice."""
    if not use_compile:
        return step
    torch._dynamo.reset()  # each phase compiles afresh instead of piling up recompiles
    fast = torch.compile(step)

    def call(*args):
        nonlocal fast
        try:
            return fast(*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure means: run eagerly
            if fast is step:
                raise
            log(f"note: torch.compile is unavailable here ({type(e).__name__}); training eagerly")
            fast = step
            return step(*args)
    return call


def train(models, datas, s, epochs, drops, seeds, lambdas=None, keep=0.5, what="models"):
    """Train models[i] on datas[i] from seeds[i]: as one stack when s.stack, else one at a
    time. With s.phase_dir, a model whose phase finished before is loaded, not retrained."""
    paths = [Path(s.phase_dir) / f"{seed}.pt" if s.phase_dir else None for seed in seeds]
    todo = [i for i, path in enumerate(paths) if not (path and path.exists())]
    for i in set(range(len(models))) - set(todo):
        models[i].load_state_dict(torch.load(paths[i], map_location=datas[i].x_train.device))
    log(f"  {what}: {len(todo)} x {epochs} epochs" + (f" ({len(models) - len(todo)} done before)"
                                                       if len(todo) < len(models) else ""))
    if todo and s.stack:
        fit_stacked([models[i] for i in todo], [datas[i] for i in todo], s, epochs, drops,
                    [seeds[i] for i in todo], lambdas, keep)
    else:
        for i in todo:
            fit(models[i], datas[i], s, epochs, drops, seeds[i], lambdas, keep)
    for i in todo:
        if paths[i]:
            paths[i].parent.mkdir(parents=True, exist_ok=True)
            torch.save(models[i].state_dict(), paths[i].with_suffix(".tmp"))
            paths[i].with_suffix(".tmp").replace(paths[i])  # whole or not at all
    return models


@torch.no_grad()
def predict(model, x, prepare=None, batch=256):
    """The model's outputs in eval mode (deterministic gates, BatchNorm's running statistics)."""
    model.eval()
    return torch.cat([model(prepare(xb) if prepare else xb) for xb in x.split(batch)])


def evaluate(model, data, split="test"):
    """data.metric of the model on one split of data: "train", "val" or "test"."""
    x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
    out = predict(model, x, data.prepare)
    return (F.mse_loss(out, y) if data.metric == "mse" else (out.argmax(1) == y).float().mean()).item()


# =============================================================================
# 3.1  Strategies: plain functions of (datas, settings, teacher constructor, seeds) over a
# list of runs (one Data and one seed per run), returning one (model, info) per run.
# Phase seeds: 100 seed + 0..9 teachers, +10 importance, +11 fine-tune, +20..22 bo3, +30 one,
# +40..42 prune (wide, pruning, fine-tune), +50 fusion's fine-tune.
# =============================================================================

def new_models(make_teacher, seeds, device):
    models = []
    for seed in seeds:
        torch.manual_seed(seed)  # initial weights
        models.append(make_teacher().to(device))
    return models


def kept_share(big_student, keep):
    """Share of the kept units that came from each teacher (Fig. 2's idea, as numbers)."""
    k = big_student.hparams["k"]
    counts = sum(torch.bincount(units.cpu() // (len(gate.loc) // k), minlength=k)
                 for (gate, _, _), units in zip(big_student.unit_groups(), keep))
    return [round(c, 4) for c in (counts / counts.sum()).tolist()]


def train_teachers(datas, s, make_teacher, seeds):
    """The k teachers of every run, [[teacher 0, ..., teacher k-1] for each run], from seeds
    100 seed + i: student() and fusion() share them (a kept phase is loaded, not retrained)."""
    k, R = s.teachers, len(datas)
    teacher_seeds = [100 * seed + i for i in range(k) for seed in seeds]  # teacher i of run r at i R + r
    teachers = train(new_models(make_teacher, teacher_seeds, datas[0].x_train.device), datas * k, s,
                     budget(s)["teacher"], s.drops_teacher, teacher_seeds, what=f"teachers ({k} a run)")
    return [[teachers[i * R + r] for i in range(k)] for r in range(R)]


def student(datas, s, make_teacher, seeds):
    """Merging (section 2): k teachers, concatenation, importance, compression, fine-tuning."""
    b, k = budget(s), s.teachers
    teachers = train_teachers(datas, s, make_teacher, seeds)
    big_students = []
    for ts, seed in zip(teachers, seeds):
        torch.manual_seed(100 * seed + 10)  # the gates' initial loc, whichever trainer ran before
        big_students.append(make_big_student(ts))
    lambdas = lambda_schedule(b["importance"], s.lambda_start, s.lambda_step, round(s.paper_epochs / 6))
    train(big_students, datas, s, b["importance"], s.drops_importance, [100 * seed + 10 for seed in seeds],
          lambdas, 1 / k, what=f"big students, importance (lambda {lambdas[0]:.3g} -> {lambdas[-1]:.3g})")
    keeps = [top_units(big) for big in big_students]
    students = [compress(big, keep) for big, keep in zip(big_students, keeps)]
    compressed = [(evaluate(m, d, "val"), evaluate(m, d, "test")) for m, d in zip(students, datas)]
    train(students, datas, s, b["finetune"], s.drops_finetune, [100 * seed + 11 for seed in seeds],
          what="students, fine-tuning")
    outcomes = []
    for ts, big, keep, merged, score, data in zip(teachers, big_students, keeps, students, compressed, datas):
        test = lambda model: round(evaluate(model, data, "test"), 6)
        outcomes.append((merged, dict(teachers_test=[test(t) for t in ts], big_student_test=test(big),
                                      compressed_val=round(score[0], 6), compressed_test=round(score[1], 6),
                                      kept_from_teacher=kept_share(big, keep),
                                      l_half_end=round(l_half(big, 1 / k).item(), 6))))
    return outcomes


def bo3(datas, s, make_teacher, seeds):
    """The best of three models of 1/3 of the budget each, chosen on the validation set.
    DEVIATION: the authors' scripts choose on the test set, which flatters bo3."""
    R, three_seeds = len(datas), [100 * seed + 20 + i for i in range(3) for seed in seeds]
    models = train(new_models(make_teacher, three_seeds, datas[0].x_train.device), datas * 3, s,
                   budget(s)["bo3"], s.drops_teacher, three_seeds, what="bo3 models (3 a run)")
    outcomes = []
    for r, data in enumerate(datas):
        three = [models[i * R + r] for i in range(3)]
        val = [evaluate(m, data, "val") for m in three]
        best = (max if data.metric == "accuracy" else min)(range(3), key=val.__getitem__)  # first on ties
        outcomes.append((three[best], dict(chosen=best, val_of_three=[round(v, 6) for v in val])))
    return outcomes


def one(datas, s, make_teacher, seeds):
    """One model trained for the whole budget."""
    one_seeds = [100 * seed + 30 for seed in seeds]
    models = train(new_models(make_teacher, one_seeds, datas[0].x_train.device), datas, s, budget(s)["one"],
                   s.drops_one, one_seeds, what="one model")
    return [(m, {}) for m in models]


# =============================================================================
# The paper's other comparisons (section 3.3): channel pruning of a double-width network
# (CIFAR-100, Table 2) and model fusion (CIFAR-10, Table 3). Both end in the teachers'
# architecture through compress(), with their own choice of units.
# =============================================================================

class Mask(nn.Module):
    """A fixed 0/1 multiplier per unit in a gate's place, for channel pruning. Its gradient
    dL/dm_c = sum over positions of a_c dL/da_c is the first-order Taylor estimate of the
    loss change from removing unit c (Molchanov et al., CVPR 2019, "Importance Estimation
    for Neural Network Pruning": their importance of a gate, (dL/dm)^2 per batch)."""

    def __init__(self, n, device):
        super().__init__()
        self.register_buffer("m", torch.ones(n, device=device).requires_grad_())  # made on its device: a leaf

    def sample(self, x):
        return self.m.view(1, -1, *[1] * (x.dim() - 2))

    def forward(self, x):
        return x * self.sample(x)


def with_masks(model):
    """Put a Mask in place of every Gate of model; returns them in unit_groups() order. A
    ResNet stage's one shared gate becomes one shared mask: its channels go together."""
    device = next(model.parameters()).device
    for name, module in list(model.named_modules()):
        if isinstance(module, Gate):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Mask(len(module.loc), device))
    return [mask for mask, _, _ in model.unit_groups()]


def prune_channels(model, masks, data, s, epochs, seed):
    """Train on while pruning: (dL/dm)^2 is summed over the batches of an epoch, and after
    each epoch the least important live units of every group are switched off, so that
    each group is down to half its units after `epochs` epochs. Returns the live units."""
    importance = [torch.zeros_like(mask.m) for mask in masks]

    def after_step():
        for total, mask in zip(importance, masks):
            total += mask.m.grad ** 2
            mask.m.grad = None

    def after_epoch(epoch):
        for total, mask in zip(importance, masks):
            live, n = mask.m.detach() > 0, len(mask.m)
            drop = int(live.sum()) - (n - round((epoch + 1) / epochs * (n // 2)))  # live units now -> target
            if drop > 0:
                with torch.no_grad():
                    mask.m[torch.where(live, total, math.inf).topk(drop, largest=False).indices] = 0
            total.zero_()
    fit(model, data, s, epochs, s.drops_importance, seed, after_step=after_step, after_epoch=after_epoch)
    return [mask.m.detach().nonzero().flatten() for mask in masks]


def prune(datas, s, make_teacher, seeds):
    """Channel pruning: a network of double width trained for the teachers' 2/3 of the
    budget, pruned during the next 1/6 until every gated layer has the teachers' width,
    compressed to the teachers' architecture and fine-tuned for the last 1/6."""
    b = budget(s)
    wide_seeds = [100 * seed + 40 for seed in seeds]
    wides = train(new_models(lambda: variant(make_teacher(), k=2), wide_seeds, datas[0].x_train.device), datas,
                  s, s.teachers * b["teacher"], s.drops_teacher, wide_seeds, what="double-width models")
    pruned, infos = [], []
    log(f"  pruning: {len(wides)} x {b['importance']} epochs")
    for wide, data, seed in zip(wides, datas, seeds):
        masked = variant(wide, gated=True)
        masked.load_state_dict(wide.state_dict(), strict=False)  # all but the gates, which become masks
        alive = prune_channels(masked, with_masks(masked), data, s, b["importance"], 100 * seed + 41)
        pruned.append(compress(masked, alive))  # exact: the dropped units are 0 wherever they are written
        infos.append(dict(wide_test=round(evaluate(wide, data), 6), pruned_test=round(evaluate(pruned[-1], data), 6)))
    train(pruned, datas, s, b["finetune"], s.drops_finetune, [100 * seed + 42 for seed in seeds],
          what="pruned models, fine-tuning")
    return list(zip(pruned, infos))


def unit_rows(layer, axis, n):
    """The weights of a layer that belong to each of its n units, one row per unit: what it
    writes (axis 0: weight rows, bias, BatchNorm's weight and bias) or reads (axis 1: weight
    columns, in blocks of H W after a flatten)."""
    if axis == 0:
        return torch.cat([p.detach().reshape(n, -1) for p in layer.parameters()], 1)
    w = layer.weight.detach()
    return w.reshape(w.shape[0], n, -1).transpose(0, 1).reshape(n, -1)


def weight_matching(reference, model, seed=0, max_passes=100):
    """Permutations of model's units that align them with reference's: Git Re-Basin's
    weight matching (Ainsworth et al., ICLR 2023). For one unit group at a time, the linear
    assignment that maximises sum over the group's layers of <W_reference, W_model permuted>,
    the other groups held fixed; repeated until a whole pass changes nothing. Returns one
    index tensor per unit group: compress(model, perms) is model aligned."""
    from scipy.optimize import linear_sum_assignment
    groups = reference.unit_groups()
    perms = [torch.arange(producers[0].weight.shape[0]) for _, producers, _ in groups]
    order = torch.Generator().manual_seed(seed)
    for _ in range(max_passes):
        changed = False
        for i in torch.randperm(len(groups), generator=order).tolist():
            (_, ref_out, ref_in), (_, out, in_) = groups[i], compress(model, perms).unit_groups()[i]
            n = len(perms[i])
            similarity = sum(unit_rows(a, 0, n) @ unit_rows(b, 0, n).T for a, b in zip(ref_out, out))
            similarity = similarity + sum(unit_rows(a, 1, n) @ unit_rows(b, 1, n).T for a, b in zip(ref_in, in_))
            best = torch.as_tensor(linear_sum_assignment(similarity.cpu().numpy(), maximize=True)[1])
            if not torch.equal(best, torch.arange(n)):
                perms[i], changed = perms[i][best], True
        if not changed:
            break
    return perms


def fuse(teachers, seed=0):
    """The mean of the teachers' weights, each aligned to teacher 0 by weight_matching."""
    aligned = [teachers[0]] + [compress(t, weight_matching(teachers[0], t, seed)) for t in teachers[1:]]
    states = [m.state_dict() for m in aligned]
    fused = variant(teachers[0])
    fused.load_state_dict({name: sum(st[name] for st in states) / len(states) if value.is_floating_point()
                           else value for name, value in states[0].items()})
    return fused


def fusion(datas, s, make_teacher, seeds):
    """Model fusion: the student's teachers (the same seeds, so a teacher phase that
    student() kept is reused), aligned and averaged by fuse(), then fine-tuned for the
    student's fine-tuning epochs. There is no importance phase: fusion uses 5/6 of the budget."""
    teachers = train_teachers(datas, s, make_teacher, seeds)
    fused = [fuse(ts, seed) for ts, seed in zip(teachers, seeds)]
    infos = [dict(teachers_test=[round(evaluate(t, data), 6) for t in ts], fused_test=round(evaluate(f, data), 6))
             for ts, f, data in zip(teachers, fused, datas)]
    train(fused, datas, s, budget(s)["finetune"], s.drops_finetune, [100 * seed + 50 for seed in seeds],
          what="fused models, fine-tuning")
    return list(zip(fused, infos))


STRATEGIES = dict(student=student, bo3=bo3, one=one, prune=prune, fusion=fusion)


# =============================================================================
# Results: one JSON line per finished (run, strategy), a settings file that a resumed
# run must match, and the paper's summary statistics.
# =============================================================================

def open_results(out, s):
    """The rows already in out/results.jsonl. A resumed experiment must have the same
    settings (all but the run_only ones); the first call writes them to out/settings.json."""
    settings = {f.name: getattr(s, f.name) for f in dataclasses.fields(s)
                if not f.metadata.get("run_only") and f.name not in s.unused}
    settings = json.loads(json.dumps(settings))
    path = out / "settings.json"
    if path.exists():
        old = json.loads(path.read_text())
        changed = [f"{key} {old.get(key)} -> {value}" for key, value in settings.items() if old.get(key) != value]
        if changed:
            raise InputError(f"{out} holds results made with other settings ({', '.join(changed)}); "
                             "use another --out")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1) + "\n")
    rows, lines = [], (out / "results.jsonl").read_text().splitlines() if (out / "results.jsonl").exists() else []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash: dropped, and its run redone
            pass
    if len(rows) != len(lines):
        (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def append_result(out, row):
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def summarize(rows, metric, strategies, extra=None):
    """Markdown table of min, max, median, mean and std (ddof = 1) of `metric` over runs per
    strategy, the statistics of the paper's Tables 1-2; extra: column -> f(rows) -> str."""
    extra = extra or {}
    lines = ["| strategy | runs | min | max | median | mean | std |" + "".join(f" {c} |" for c in extra),
             "|---|---|---|---|---|---|---|" + "---|" * len(extra)]
    for name in strategies:
        mine = [r for r in rows if r["strategy"] == name]
        if mine:
            v = np.array([r[metric] for r in mine])
            std = f"{v.std(ddof=1):.4f}" if len(v) > 1 else "-"  # no spread from one run
            lines.append(f"| {name} | {len(v)} | {v.min():.4f} | {v.max():.4f} | {np.median(v):.4f} | "
                         f"{v.mean():.4f} | {std} |" + "".join(f" {f(mine)} |" for f in extra.values()))
    return "\n".join(lines)


def run_experiment(s, title, make_data, make_teacher, result):
    """The loop of every experiment (the sine below, the image scripts too): for each strategy,
    the runs not yet in --out/results.jsonl, as one stack (s.stack) or one at a time. Each
    finished (run, strategy) is written at once as one JSON line, and finished phases are kept
    in --out/phases, so an interrupted experiment resumes where it stopped.
    make_data(seed, device) -> the Data of a run; result(model, data) -> the numbers of its row.
    Returns the rows of runs < s.runs."""
    device, out = resolve_device(s.device), Path(s.out)
    strategies = {name: STRATEGIES[name] for name in s.strategies.split(",")}
    results = open_results(out, s)
    s = dataclasses.replace(s, phase_dir=str(out / "phases"))
    done = {(r["run"], r["strategy"]) for r in results}
    log(f"{title}: {s.runs} runs x {len(strategies)} strategies, {s.epochs} epochs each, on {device}; "
        f"{len(done)} results already in {out}")
    for name, strategy in strategies.items():
        todo = [run for run in range(s.runs) if (run, name) not in done]
        for runs in ([todo] if s.stack else [[run] for run in todo]) if todo else []:
            log(f"{name}: runs {runs[0] + 1}-{runs[-1] + 1} of {s.runs}" if len(runs) > 1 else
                f"{name}: run {runs[0] + 1} of {s.runs}")
            seeds = [1000 * s.seed + run for run in runs]
            datas = [make_data(seed, device) for seed in seeds]
            for run, seed, data, (model, info) in zip(runs, seeds, datas, strategy(datas, s, make_teacher, seeds)):
                row = dict(run=run, strategy=name, seed=seed, **info, **result(model, data))
                append_result(out, row)
                results.append(row)
            log(f"{name}: {len(runs)} runs written to {out / 'results.jsonl'}")
    return [r for r in results if r["run"] < s.runs]


# =============================================================================
# Figures, shared by the scripts and the notebook. Each returns its figure; with a
# path it also saves it as PNG.
# =============================================================================

def _finish(fig, path):
    if path:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def plot_lambda(lambdas, paper_lambdas=None, path=None):
    """Fig. 5: lambda over the epochs of the importance phase."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2))
    if paper_lambdas is not None:
        ax.plot(np.linspace(0, 1, len(paper_lambdas)), paper_lambdas, "--", color="gray", label="paper (Fig. 5)")
    ax.plot(np.linspace(0, 1, len(lambdas)), lambdas, label=f"this run, {len(lambdas)} epochs")
    ax.set(xlabel="fraction of the importance phase", ylabel="lambda", title="Fig. 5: lambda schedule")
    ax.legend()
    return _finish(fig, path)


def plot_box(rows, metric, strategies, path=None, title=""):
    """Figs. 9, 11, 12: box plot over runs per strategy; the line is the median, x the mean."""
    import matplotlib.pyplot as plt
    names = [n for n in strategies if any(r["strategy"] == n for r in rows)]
    values = [[r[metric] for r in rows if r["strategy"] == n] for n in names]
    fig, ax = plt.subplots(figsize=(6, 0.6 + 0.7 * len(names)))
    ax.boxplot(values, orientation="horizontal", showmeans=True, meanprops=dict(marker="x", markeredgecolor="k"))
    ax.set_yticks(range(1, len(names) + 1), names)
    ax.set(xlabel=metric.replace("_", " "), title=title)
    return _finish(fig, path)


def sine_curve(x):
    return torch.sin(10 * math.pi * x)


def plot_sine_data(data, path=None):
    """Fig. 8a: the training set and the noise-free curve."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.scatter(data.x_train.cpu(), data.y_train.cpu(), s=1, alpha=0.3, label="training points")
    ax.plot(GRID, sine_curve(GRID), "k", lw=1, label="sin(10 pi x)")
    ax.set(xlabel="x", ylabel="y", title=f"Fig. 8a: {len(data.x_train)} training points")
    ax.legend(loc="upper right")
    return _finish(fig, path)


def plot_curves(rows, strategies, path=None):
    """Fig. 10: the learned curve of every run, overlaid, one panel per strategy."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(strategies), figsize=(4.5 * len(strategies), 3), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], strategies):
        mine = [r for r in rows if r["strategy"] == name]
        for r in mine:
            ax.plot(GRID, r["curve"], lw=0.7, alpha=0.5)
        ax.plot(GRID, sine_curve(GRID), "k--", lw=0.8)
        full = sum(r["peaks"] == 5 for r in mine)
        ax.set(title=f"{name}: {full}/{len(mine)} get all 5 peaks", xlabel="x", ylim=(-1.6, 1.6))
    return _finish(fig, path)


def plot_kept_share(rows, path=None):
    """Fig. 2's idea as numbers: the share of the student's units that each teacher gave."""
    import matplotlib.pyplot as plt
    mine = [r for r in rows if r["strategy"] == "student"]
    shares = np.array([r["kept_from_teacher"] for r in mine])
    fig, ax = plt.subplots(figsize=(max(4, 0.15 * len(mine) + 2), 3))
    bottom = np.zeros(len(mine))
    for i in range(shares.shape[1]):
        ax.bar([r["run"] for r in mine], shares[:, i], bottom=bottom, label=f"teacher {i}")
        bottom += shares[:, i]
    ax.set(xlabel="run", ylabel="share of kept units", title="Which teacher the kept units came from")
    ax.legend(loc="lower right")
    return _finish(fig, path)


# =============================================================================
# 3.2  The sine experiment
# =============================================================================

GRID = torch.linspace(0, 1, 501).unsqueeze(1)  # (501, 1): where curves are drawn and peaks counted


def sine_data(s, seed, device="cpu"):
    """x ~ U(0, 1), y = sin(10 pi x) + N(0, noise^2) (Fig. 8a): train, validation and test
    sets drawn the same way from one seed per run, shared by every strategy of the run.
    DEVIATION: the authors' loaders drew a fresh data set each, never shuffled it, and had
    no validation set."""
    g = torch.Generator().manual_seed(seed)

    def draw(n):
        x = torch.rand(n, 1, generator=g)
        return x.to(device), (sine_curve(x) + s.noise * torch.randn(n, 1, generator=g)).to(device)
    return Data(*draw(s.n_train), *draw(s.n_val), *draw(s.n_test), metric="mse")


def count_peaks(curve):
    """How many of the five waves of sin(10 pi x) a curve on GRID gets right (Fig. 10's
    "peaks"). Wave j spans [0.2 j, 0.2 j + 0.2]: its crest (height 1 at x = 0.2 j + 0.05)
    counts as right when the curve's maximum over [0.2 j, 0.2 j + 0.1] reaches 0.5, and its
    trough (-1 at x = 0.2 j + 0.15) when the minimum over [0.2 j + 0.1, 0.2 j + 0.2] reaches
    -0.5: half the true height. The wave is right when both are. A missed peak is a curve
    that stays flat across a half-wave."""
    x, curve = GRID.squeeze(1), torch.as_tensor(curve)
    crest = lambda j: curve[(x >= 0.2 * j) & (x <= 0.2 * j + 0.1)].max() >= 0.5
    trough = lambda j: curve[(x >= 0.2 * j + 0.1) & (x <= 0.2 * j + 0.2)].min() <= -0.5
    return sum(int(crest(j) and trough(j)) for j in range(5))


def sine_result(model, data):
    """Test and validation MSE, the waves it gets right, and its curve on GRID (Fig. 10)."""
    curve = predict(model, GRID.to(data.x_train.device)).squeeze(1).cpu()
    return dict(test_mse=round(evaluate(model, data, "test"), 6), val_mse=round(evaluate(model, data, "val"), 6),
                peaks=count_peaks(curve), curve=[round(v, 4) for v in curve.tolist()])


def run_sine(s):
    rows = run_experiment(s, "sine", lambda seed, device: sine_data(s, seed, device), SineMLP, sine_result)
    report_sine(s, rows, Path(s.out))


def bench(s):
    """Seconds per model-epoch of the sine's teacher phase: the one-at-a-time loop (fit)
    against the stacked trainer at several stack sizes, in this process, on the same data.
    Steady state: the median of epochs 2 to 4, so warming up and compiling are not counted."""
    device = resolve_device(s.device)
    data = sine_data(s, 0, device)

    def seconds(trainer, R, epochs=4):
        models = new_models(SineMLP, range(R), device)
        if trainer == "one at a time":
            history = fit(models[0], data, s, epochs)
        else:
            history = fit_stacked(models, [data] * R, dataclasses.replace(s, compile=int(trainer == "stacked")),
                                  epochs, seeds=range(R))
        return float(np.median([h["seconds"] for h in history[1:]])) / R

    rows = []
    for trainer, R in [("one at a time", 1), ("stacked", 1), ("stacked", 10), ("stacked", 50),
                       ("stacked", 300), ("stacked, eager", 300)]:
        rows.append((trainer, R, seconds(trainer, R)))
        log(f"bench: {trainer}, {R} models: {rows[-1][2]:.5f} s per model-epoch")
    lines = [f"Sine teacher phase, {s.n_train} points, batch {s.batch}, {torch.get_num_threads()} threads, "
             f"{device}: seconds per model-epoch", "", "| trainer | models | s / model-epoch | speed-up |",
             "|---|---|---|---|"]
    lines += [f"| {t} | {R} | {sec:.5f} | {rows[0][2] / sec:.1f}x |" for t, R, sec in rows]
    print("\n".join(lines))


def report_sine(s, rows, out):
    """summary.md (Table 1) printed and saved; Figs. 5, 8a, 9, 10 and the kept shares as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    names = s.strategies.split(",")
    table = summarize(rows, "test_mse", names, extra={
        "all 5 peaks": lambda mine: f"{sum(r['peaks'] == 5 for r in mine)}/{len(mine)}",
        "kept from teachers": lambda mine: " / ".join(
            f"{v:.2f}" for v in np.mean([r["kept_from_teacher"] for r in mine], 0))
        if "kept_from_teacher" in mine[0] else ""})
    text = (f"# Sine problem, Table 1: test MSE over {s.runs} runs, {s.epochs} epochs per strategy, "
            f"k = {s.teachers}\n\n{table}\n")
    (out / "summary.md").write_text(text)
    print(text)
    importance = budget(s)["importance"]
    plot_lambda(lambda_schedule(importance, s.lambda_start, s.lambda_step, round(s.paper_epochs / 6)),
                lambda_schedule(round(s.paper_epochs / 6), s.lambda_start, s.lambda_step), out / "fig5_lambda.png")
    plot_sine_data(sine_data(s, 1000 * s.seed), out / "fig8a_data.png")
    plot_box(rows, "test_mse", names, out / "fig9_box.png", f"Fig. 9: test MSE over {s.runs} runs")
    plot_curves(rows, names, out / "fig10_curves.png")
    plot_kept_share(rows, out / "fig2_kept_share.png")
    log(f"wrote {out}/summary.md and figures")


# =============================================================================
# Command line
# =============================================================================

def parse_settings(argv=None, defaults=Settings(), description=__doc__):
    """Settings from the command line: one flag per documented field of `defaults`."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = fail  # one line and exit code 2, not a usage dump
    flags = [f for f in dataclasses.fields(defaults) if "help" in f.metadata and f.name not in defaults.unused]
    for f in flags:
        value = getattr(defaults, f.name)
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        text = f"{f.metadata['help']} [{value}]"
        if isinstance(value, bool):
            parser.add_argument(flag, dest=f.name, action="store_true", help=text)
        elif isinstance(value, tuple):  # file names
            parser.add_argument(flag, dest=f.name, nargs=f.metadata["nargs"], default=value, metavar="FILE", help=text)
        else:
            parser.add_argument(flag, dest=f.name, type=type(value), default=value, choices=f.metadata.get("choices"),
                                help=text)
    args = parser.parse_args(argv)
    return dataclasses.replace(defaults, **{f.name: tuple(v) if isinstance(v := getattr(args, f.name), list) else v
                                            for f in flags})


def parse_with_presets(argv, base, choice, presets, description):
    """parse_settings with defaults that follow one choice (--arch, --experiment): base's
    fields replaced by those of presets[the choice], so that --help shows them."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.error = fail
    pre.add_argument("--" + choice, default=getattr(base, choice), choices=presets)
    chosen = getattr(pre.parse_known_args(argv)[0], choice)
    return parse_settings(argv, dataclasses.replace(base, **{choice: chosen}, **presets[chosen]), description)


TASKS = dict(sine=run_sine)


def run_task(s):
    check_settings(s)
    bench(s) if s.bench else TASKS[s.task](s)


def main(argv=None, parse=parse_settings, run=run_task):
    """The command line of merge.py and of the experiment scripts: bad input ends as one
    line on stderr and exit code 2."""
    s = parse(argv)
    try:
        run(s)
    except InputError as e:
        fail(e)


if __name__ == "__main__":
    main()
