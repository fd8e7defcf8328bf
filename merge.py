"""Merging of neural networks (Pasen and Boza), the method alone, to be read top to bottom beside the
paper. k teachers (paper: 2; 2.2's k is a layer's width) of one architecture, from different seeds, are
concatenated into a big student k times as wide (2.1); stochastic L0 gates learn which units to keep under the
auxiliary loss L_half (2.2); the big student is compressed to the teachers' width (2.3) and fine-tuned. The
claim (1, 3.2, 3.3): in the same epoch budget this beats the best of three models (bo3) and one long model.

    python merge.py --task sine --runs 50     # Table 1 and Figs. 5, 8a, 9, 10 -> runs/sine/

Result (50 runs, 900 epochs per strategy; 3 min 27 s to 4 min 48 s on a 2-core AMD EPYC CPU, compiled steps
cached): mean test MSE of the student 0.0759, bo3 0.0866, one model 0.1242; all five peaks in 50/50, 49/50 and
36/50 runs. The run machinery wraps this file from outside: experiment.py, stacked.py (the fast trainer), sine.py."""
import math
import sys
from dataclasses import dataclass, field, replace

if __name__ == "__main__":  # a command: Ctrl-C while torch loads gives one line (startup.py)
    import startup
    startup.before_torch()
import torch
import torch.nn as nn
import torch.nn.functional as F

# == 2.1  Layerwise concatenation of the teachers into a big student (Figs. 3-4) ===================
def concat_weight(weights, position):
    """The big student's weight from k teachers' weights, each (out, in, *kernel); teacher i's units in block i:
    first   outputs stacked, the input shared  -> (k out, in, ...)
    middle  block-diagonal, zero elsewhere     -> (k out, k in, ...)  (Fig. 3: the gray zeros may become
                                                  non-zero in training and join the two flows)
    last    inputs stacked, divided by k       -> (out, k in, ...)    so the output is the mean"""
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

def concat_network(teachers, first=None, last=None):
    """State of the big student of any module (Fig. 4): Linear and Conv2d layers by concat_weight, `first` and
    `last` in those positions, every other (a BasicBlock's convs and 1x1 shortcut too) in the middle; BatchNorm2d's
    running statistics stacked too (the authors' scripts skip them: no mean in eval mode)."""
    state = {}
    for name, module in teachers[0].named_modules():
        parts, prefix = [t.get_submodule(name) for t in teachers], f"{name}." if name else ""
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            position = "first" if name == first else "last" if name == last else "middle"
            state[prefix + "weight"] = concat_weight([p.weight.detach() for p in parts], position)
            if module.bias is not None:
                biases = torch.stack([p.bias.detach() for p in parts])
                state[prefix + "bias"] = biases.mean(0) if position == "last" else biases.flatten()
        elif isinstance(module, nn.BatchNorm2d):
            for key in ("weight", "bias", "running_mean", "running_var"):
                state[prefix + key] = torch.cat([p.state_dict()[key] for p in parts])
            state[prefix + "num_batches_tracked"] = module.num_batches_tracked.clone()
    return state

def variant(model, **changes):
    """A fresh network of model's class with some constructor arguments changed (k, gated)."""
    return type(model)(**{**model.hparams, **changes}).to(next(model.parameters()).device)

def make_big_student(teachers):
    """Concatenate k >= 2 teachers of one architecture into a gated network k times as wide. With
    every gate fully open (test-time value 1) it outputs exactly the teachers' mean; its fresh
    gates (loc ~ 1) are 0.78 at test time, so at first it is not their mean in eval mode."""
    if len(teachers) < 2 or any((type(t), t.hparams) != (type(teachers[0]), teachers[0].hparams) for t in teachers):
        raise ValueError("merging needs at least 2 teachers, all of one architecture and width")
    big_student = variant(teachers[0], k=len(teachers), gated=True)
    layers = [name for name, m in teachers[0].named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    missing, unexpected = big_student.load_state_dict(
        concat_network(teachers, first=layers[0], last=layers[-1]), strict=False)
    assert not unexpected and all(name.endswith("loc") for name in missing), (missing, unexpected)
    return big_student

# == 2.2  Gates, the auxiliary loss L_half and the lambda schedule (Figs. 5-6) =====================
class Gate(nn.Module):
    """Hard-concrete gates over n units (Louizos et al. 2018, "Learning sparse neural networks through
    L0 regularization"): in training a random g in [0, 1] per example and unit, with P[g = 0] > 0 and
    P[g = 1] > 0; in eval mode one fixed value per unit. One sample may gate several places (Fig. 6c)."""
    beta, gamma, zeta = 2 / 3, -0.1, 1.1  # temperature and stretch, fixed as in the authors' scripts
    def __init__(self, n):
        super().__init__()
        self.loc = nn.Parameter(1 + 0.01 * torch.randn(n))  # log alpha (Louizos); the scripts' start: P[g > 0] ~ 0.93
    def noise(self, B, n):
        """u ~ U(0, 1), (B, n), from torch's generator. A trainer may put another source in its
        place (gate.noise = f): the run machinery uses a counter-based one (stacked.py)."""
        return torch.rand(B, n, device=self.loc.device)
    def sample(self, x):
        """Gate values for x's batch size and rank (all it reads of x): (B, n) for x (B, .), (B, n, 1, 1) for 4-D x."""
        B, n = x.shape[0], len(self.loc)
        if self.training:  # the reparameterisation trick: g is a differentiable function of loc, given u
            u = self.noise(B, n).to(self.loc.dtype).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.logit(u) + self.loc) / self.beta)  # s = sigmoid((log u - log(1 - u) + loc) / beta)
        else:  # DEVIATION: deterministic at test time (the authors' scripts keep sampling, so their
            # logged test numbers are noisy): s = sigmoid(loc), the same for every example
            s = torch.sigmoid(self.loc).expand(B, n)
        # g = clamp(s (zeta - gamma) + gamma, 0, 1): stretched, then clamped: P[g = 0] > 0 and P[g = 1] > 0
        g = (s * (self.zeta - self.gamma) + self.gamma).clamp(0, 1)
        return g.view(B, n, *[1] * (x.dim() - 2))
    def forward(self, x):
        return x * self.sample(x)  # (B, n, H, W) * (B, n, 1, 1), or (B, n) * (B, n)

def p_open(loc):
    """P[g > 0] per unit = sigmoid(loc - beta log(-gamma / zeta))."""
    return torch.sigmoid(loc - Gate.beta * math.log(-Gate.gamma / Gate.zeta))

def gates(model):
    return [m for m in model.modules() if isinstance(m, Gate)]

def l_half(locs, share=0.5):
    """sum over gate layers l of L_half^l = (share - 1/n sum_i P[g_i > 0])^2 from each layer's loc, (n,) or (R, n):
    section 2.2's share = 1/2 (it writes k for n). DEVIATION: k > 2 teachers (future work) pass share = 1/k."""
    return sum((share - p_open(loc).mean(-1)) ** 2 for loc in locs)

def lambda_schedule(epochs, start, step, tuned_epochs=None):
    """lambda for each epoch of the importance phase, lambda += step sqrt(lambda) before each (Fig. 5).
    DEVIATION: a step is given for one budget only (Fig. 5's 0.05 for the sine's, the scripts' for the images);
    a phase of another length than `tuned_epochs` gets the step, found by bisection, that ends at that lambda."""
    def schedule(rate, n):  # n epochs' lambdas, stepping by rate
        lam, lambdas = start, []
        for _ in range(n):
            lam += rate * math.sqrt(lam)  # before every epoch, the first too, as the scripts do: epoch 0 at lambda_1
            lambdas.append(lam)
        return lambdas

    if tuned_epochs is None or tuned_epochs == epochs or epochs == 0:
        return schedule(step, epochs)
    target, low, high = schedule(step, tuned_epochs)[-1], 0.0, step
    while schedule(high, epochs)[-1] < target:  # a step too large, then bisection between 0 and it
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if schedule(mid, epochs)[-1] < target else (low, mid)
    return schedule((low + high) / 2, epochs)

# == 2.3  Compression of the big student (Fig. 7) ==================================================
def top_units(big_student):
    """The kept units of every unit group: the top 1/k by loc. The paper keeps "the most important" units;
    ranking by loc (the order of P[g > 0]; of the test-time value too, but for ties where it clamps) is the scripts'."""
    k = big_student.hparams["k"]
    return [gate.loc.detach().topk(len(gate.loc) // k).indices.sort().values
            for gate, _, _ in big_student.unit_groups()]

def compress(big_student, keep=None, fold=False):
    """The teachers' architecture holding the kept units of every unit group (section 2.3; keep: one index
    tensor per group, top_units() by default). The gates are dropped (Fig. 7, the authors' scripts): the gated
    function is kept exactly where kept gates are 1 and dropped ones 0. DEVIATION, fold (ours): each kept unit's
    outgoing weights times its gate's test-time value (exact where dropped gates are 0, not a ResNet stage's)."""
    keep = top_units(big_student) if keep is None else keep
    out_units, in_features, scale = {}, {}, {}
    for (gate, producers, consumers), units in zip(big_student.unit_groups(), keep):
        n = producers[0].weight.shape[0]
        value = (torch.sigmoid(gate.loc) * (gate.zeta - gate.gamma) + gate.gamma).clamp(0, 1).detach() if fold else 0
        for m in producers:
            out_units[m] = units
        for m in consumers:
            per_unit = m.weight.shape[1] // n  # 1, or H*W after a flatten
            in_features[m] = (units[:, None] * per_unit + torch.arange(per_unit, device=units.device)).flatten()
            scale[m] = value[units].repeat_interleave(per_unit) if fold else torch.ones(len(in_features[m]))
    kinds = (nn.Linear, nn.Conv2d, nn.BatchNorm2d)
    state, layers = {}, [(name, m) for name, m in big_student.named_modules() if isinstance(m, kinds)]
    for name, m in layers:  # each with only the kept outputs and inputs
        for key, tensor in m.state_dict().items():
            if tensor.dim() >= 1 and m in out_units:
                tensor = tensor[out_units[m]]
            if tensor.dim() >= 2 and m in in_features:  # a weight: (out, in, ...) * (1, in, 1, ...)
                tensor = tensor[:, in_features[m]] * scale[m].to(tensor).view(1, -1, *[1] * (tensor.dim() - 2))
            state[f"{name}.{key}"] = tensor.clone()
    student = variant(big_student, k=1, gated=False)
    student.load_state_dict(state)
    return student

# == Architectures =================================================================================
# Each takes the teachers' widths, k (k times every width in the big student) and gated (gates after ReLUs, Fig. 6),
# and lists its unit groups: a gate layer's neurons (Fig. 7) with the layers they are outputs of (producers:
# compression keeps their rows) and inputs to (consumers: their columns).
def chain_groups(gates, layers):
    """Unit groups of a plain chain: gate i sits between layers i and i + 1."""
    return [(g, [a], [b]) for g, a, b in zip(gates, layers, layers[1:])]

class SineMLP(nn.Module):
    """1-100-1 with ReLU (Fig. 8b); the gate after the ReLU (Fig. 6a)."""
    def __init__(self, widths=(100,), k=1, gated=False):
        super().__init__()
        self.hparams = dict(widths=tuple(widths), k=k, gated=gated)
        self.hidden = nn.Linear(1, k * widths[0])
        self.gates = nn.ModuleList([Gate(k * widths[0]) if gated else nn.Identity()])
        self.out = nn.Linear(k * widths[0], 1)
    def forward(self, x):  # (B, 1) -> (B, 1)
        return self.out(self.gates[0](F.relu(self.hidden(x))))
    def unit_groups(self):
        return chain_groups(self.gates, [self.hidden, self.out])

class LeNet(nn.Module):
    """conv 3->6 (5x5, pad 2), pool, conv 6->16 (5x5), pool, linear 400->120->80->classes, for 28x28x3 images
    (3.3.1; kernels and padding, which give the 400 inputs, are the scripts'); a gate after every ReLU (Fig. 6b)."""
    def __init__(self, num_classes=10, widths=(6, 16, 120, 80), k=1, gated=False):
        super().__init__()
        self.hparams = dict(num_classes=num_classes, widths=tuple(widths), k=k, gated=gated)
        c1, c2, f1, f2 = (k * w for w in widths)
        self.conv1 = nn.Conv2d(3, c1, 5, padding=2)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.fc1 = nn.Linear(c2 * 5 * 5, f1)
        self.fc2 = nn.Linear(f1, f2)
        self.fc3 = nn.Linear(f2, num_classes)
        self.gates = nn.ModuleList(Gate(n) if gated else nn.Identity() for n in (c1, c2, f1, f2))
    def forward(self, x):  # (B, 3, 28, 28) -> (B, classes)
        g1, g2, g3, g4 = self.gates
        x = F.max_pool2d(g1(F.relu(self.conv1(x))), 2)  # (B, c1, 14, 14)
        x = F.max_pool2d(g2(F.relu(self.conv2(x))), 2)  # (B, c2, 5, 5)
        x = g3(F.relu(self.fc1(x.flatten(1))))          # (B, f1)
        return self.fc3(g4(F.relu(self.fc2(x))))        # (B, f2) -> (B, classes)
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
        self.gates = nn.ModuleList(Gate(w) if gated else nn.Identity() for w in ws)
        self.classifier = nn.Linear(ws[-1], num_classes, bias=False)
    def forward(self, x):  # (B, 3, 32, 32) -> (B, classes)
        for i, (conv, gate) in enumerate(zip(self.convs, self.gates)):
            x = gate(F.relu(conv(x)))
            x = F.max_pool2d(x, 2) if i in self.hparams["pools"] else x
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
        self.gate = Gate(cout) if gated else nn.Identity()
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
    """ResNet of BasicBlocks, stem 'imagenet' (7x7/2 conv, max pool) or 'cifar' (3x3 conv). A stage's
    residual stream has ONE gate, sampled once a forward pass and applied wherever the stream is
    written, the stem for stage 0 (Fig. 6c): separate gates would turn x + f(x) into 0 + f(x)."""
    def __init__(self, num_classes, widths, depths, stem="cifar", k=1, gated=False):
        super().__init__()
        self.hparams = dict(num_classes=num_classes, widths=tuple(widths), depths=tuple(depths), stem=stem, k=k,
                            gated=gated)
        ws = [k * w for w in widths]
        self.conv = nn.Conv2d(3, ws[0], *((7, 2, 3) if stem == "imagenet" else (3, 1, 1)), bias=False)
        self.bn = nn.BatchNorm2d(ws[0])
        self.stages = nn.ModuleList(
            nn.ModuleList(BasicBlock(ws[max(s - 1, 0)] if b == 0 else w, w, 2 if s > 0 and b == 0 else 1, gated)
                          for b in range(depth)) for s, (w, depth) in enumerate(zip(ws, depths)))
        self.stage_gates = nn.ModuleList(Gate(w) for w in ws) if gated else None
        self.fc = nn.Linear(ws[-1], num_classes)
    def forward(self, x):  # (B, 3, H, W) -> (B, classes)
        x = F.relu(self.bn(self.conv(x)))
        if self.hparams["stem"] == "imagenet":
            x = F.max_pool2d(x, 3, 2, 1)
        for s, blocks in enumerate(self.stages):
            g = self.stage_gates[s].sample(x) if self.stage_gates is not None else None
            x = x * g if s == 0 and g is not None else x  # stage 0's stream starts at the stem
            for block in blocks:
                x = block(x, g)
        return self.fc(x.mean((2, 3)))
    def unit_groups(self):
        groups = []
        for s, blocks in enumerate(self.stages):
            gate = self.stage_gates[s] if self.stage_gates is not None else None
            producers = [self.conv, self.bn] if s == 0 else list(blocks[0].shortcut)
            consumers = [b.conv1 for b in blocks[(s > 0):]]  # a later stage's block 0 reads the stage before
            for b in blocks:
                producers += [b.conv2, b.bn2]
                groups.append((b.gate, [b.conv1, b.bn1], [b.conv2]))
            nxt = self.stages[s + 1][0] if s + 1 < len(self.stages) else None
            consumers += [nxt.conv1, nxt.shortcut[0]] if nxt else [self.fc]
            groups.append((gate, producers, consumers))
        return groups

def resnet18(num_classes=10, width=64):
    """The standard ImageNet ResNet18: 64/128/256/512, two BasicBlocks a stage."""
    return ResNet(num_classes, (width, 2 * width, 4 * width, 8 * width), (2, 2, 2, 2), "imagenet")

def resnet20(num_classes=100, width=16):
    """CIFAR ResNet20: 3x3 stem to 16, three stages of three BasicBlocks, 16/32/64. DEVIATION: 1x1-conv
    shortcuts, as the authors' scripts have, where the original pads with zeros: they concatenate like any conv."""
    return ResNet(num_classes, (width, 2 * width, 4 * width), (3, 3, 3), "cifar")

def vgg11(num_classes=10, width=64):
    return VGG(num_classes, tuple(width * m for m in (1, 2, 4, 4, 8, 8, 8, 8)))

# == The method's settings =========================================================================
def setting(default, help):
    """A field of Settings; its help says its unit and where its value comes from."""
    return field(default=default, metadata=dict(help=help))

@dataclass
class Settings:
    """The method's settings, with the sine problem's values (section 3.2); each experiment extends them."""
    epochs: int = setting(900, "epochs per strategy, the whole budget; every phase and lr drop scales with it (3.1)")
    teachers: int = setting(2, "k, the number of teachers merged into one student (paper: 2; at most 10, PHASE_SEEDS)")
    phase_epochs: tuple = ()  # (teacher, importance, fine-tune, bo3, one) epochs given, not from epochs (3.3.5)
    batch: int = setting(32, "examples per SGD step (sine: the authors' scripts)")
    lr: float = setting(0.01, "SGD learning rate, divided by 10 at each drop (sine: 3.2)")
    momentum: float = setting(0.9, "SGD momentum (sine: 3.2)")
    weight_decay: float = setting(0.0, "SGD weight decay (sine: none named by the paper or the scripts, SGD's default)")
    # lr / 10 at these fractions (3.2: teachers, bo3 250/300, fine-tune 100/150, one 800/900; importance: none named)
    drops_teacher: tuple = (5 / 6,)
    drops_importance: tuple = ()
    drops_finetune: tuple = (2 / 3,)
    drops_one: tuple = (8 / 9,)
    # the importance phase (2.2)
    gate_lr: float = setting(0.1, "learning rate of the gates' own SGD, momentum 0.9 (sine: the authors' scripts)")
    lambda_start: float = setting(0.01, "lambda_0, also stepped before epoch 0 (sine: the authors' scripts)")
    lambda_step: float = setting(0.05, "lambda += step sqrt(lambda) before each epoch (sine: Fig. 5)")
    paper_epochs: int = setting(900, "budget whose importance phase (1/6) the lambda step fits; others rescale (ours)")
    fold: int = setting(0, "1: fold the kept gates' test-time values into the next layers at compression (ours)")
    finetune_lr: float = setting(0.0, "lr at the start of fine-tuning; 0: --lr (ImageNet: 0.07, 3.3.5)")
    finetune_warmup: int = setting(0, "N fine-tuning epochs of lr warm-up from lr/(N+1) (ImageNet: 2, authors' config)")

def budget(s):
    """Epochs per phase, equal in total for every strategy (3.1; bo3's off by one where 3 does not divide epochs):
    student = k teachers sharing 2/3 (k > 2: future work), importance 1/6, fine-tune the rest; bo3 3 x 1/3; one all."""
    if s.phase_epochs:
        return dict(zip(("teacher", "importance", "finetune", "bo3", "one"), s.phase_epochs))
    teacher, importance = round(s.epochs * 2 / 3 / s.teachers), round(s.epochs / 6)
    return dict(teacher=teacher, importance=importance,
                finetune=s.epochs - s.teachers * teacher - importance, bo3=round(s.epochs / 3), one=s.epochs)

# == Training ======================================================================================
@dataclass
class Data:
    """Train, validation and test tensors on the device; prepare(x, train) makes a batch the model's input."""
    x_train: torch.Tensor; y_train: torch.Tensor  # noqa: E702 - inputs and targets, pair by pair
    x_val: torch.Tensor; y_val: torch.Tensor  # noqa: E702
    x_test: torch.Tensor; y_test: torch.Tensor  # noqa: E702
    metric: str = "mse"  # "mse" (lower is better) or "accuracy" (higher is better)
    prepare: object = lambda x, train=False: x
    device = property(lambda self: self.x_train.device)
    size = property(lambda self: len(self.x_train))  # training examples
    example = property(lambda self: self.prepare(self.x_train[:1]))  # one input, as the model takes it
    def batches(self, size):
        """The training batches of an epoch in an order drawn from torch's generator, as the model takes them."""
        for idx in torch.randperm(len(self.x_train), device=self.device).split(size):
            yield self.prepare(self.x_train[idx], True), self.y_train[idx]
    def evaluate(self, model, split="test"):
        """The metric of the model on one split: "train", "val" or "test"."""
        x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
        out = predict(model, x, self.prepare)
        return (F.mse_loss(out, y) if self.metric == "mse" else (out.argmax(1) == y).float().mean()).item()

@torch.no_grad()
def predict(model, x, prepare=None, batch=256):
    """The model's outputs in eval mode (deterministic gates, BatchNorm's running statistics)."""
    model.eval()
    return torch.cat([model(prepare(xb) if prepare else xb) for xb in x.split(batch)])

def lr_at(s, epoch, epochs, drops, warmup=0):
    """s.lr / 10 at each fraction of the phase in drops (two may round to one epoch), after `warmup` warm-up epochs."""
    return s.lr * 0.1 ** sum(epoch >= round(f * epochs) for f in drops) * min(1, (epoch + 1) / (warmup + 1))

def epoch_seed(seed, epoch):
    """The seed of one epoch of a phase trained from `seed`: of its data order, gate noise and augmentation."""
    return seed * 100_003 + epoch

def optimizers(model, s, importance=False):
    """SGD for the weights; in the importance phase the gates' own SGD too (the authors' scripts; 2.2 names none)."""
    locs = [gate.loc for gate in gates(model)]
    weights = [p for p in model.parameters() if all(p is not loc for loc in locs)]
    opts = [torch.optim.SGD(weights, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)]
    return opts + ([torch.optim.SGD(locs, lr=s.gate_lr, momentum=0.9)] if importance else [])

def fit(model, data, s, epochs, drops=(), seed=0, lambdas=None, share=0.5, warmup=0, opts=None, start=0,
        after_step=None, after_epoch=None):
    """Train one model in place with SGD, the lr divided by 10 at each fraction of the epochs in drops.
    With `lambdas`, one per epoch, this is the importance phase (2.2): L = L_E + lambda sum_l L_half^l.
    opts and start go on from epoch `start`; after_step() and after_epoch(epoch, history) let a caller
    act between steps and epochs (channel pruning, progress, checkpoints). Returns the history."""
    locs, history = [gate.loc for gate in gates(model)], []
    opts = opts or optimizers(model, s, lambdas is not None)
    error_loss = F.mse_loss if data.metric == "mse" else F.cross_entropy
    for epoch in range(start, epochs):
        model.train()  # again each epoch: an after_epoch that evaluates leaves it in eval mode
        torch.manual_seed(epoch_seed(seed, epoch))  # this epoch's draws: the same whenever it is trained
        opts[0].param_groups[0]["lr"] = lr_at(s, epoch, epochs, drops, warmup)
        total, seen = 0, 0
        for x, y in data.batches(s.batch):
            error = error_loss(model(x), y)
            loss = error + (lambdas[epoch] * l_half(locs, share) if lambdas is not None else 0)  # L_E + lambda L_half
            for opt in opts:
                opt.zero_grad()
            loss.backward()
            for opt in opts:
                opt.step()
            if after_step:
                after_step()
            total, seen = total + error.detach() * len(y), seen + len(y)
        history.append(dict(epoch=epoch, error=float(total / seen)))
        if lambdas is not None:
            history[-1].update(l_half=l_half(locs, share).item(), open=[p_open(loc).tolist() for loc in locs])
        if after_epoch:
            after_epoch(epoch, history)
    return history

def train(models, data, s, epochs, drops, seeds, phase, lambdas=None, share=0.5, warmup=0, **hooks):
    """One phase of a run (3.1): each model fitted with its seed (data order, noise), one after another. Strategies
    take it as an argument; the run machinery passes one that stacks, resumes and keeps finished phases."""
    for model, seed in zip(models, seeds):
        fit(model, data, s, epochs, drops, seed, lambdas, share, warmup, **hooks)
    return models

# == 3.1  Strategies ===============================================================================
# Plain functions of one run: (data, settings, teacher constructor, run seed, train) -> (model, info). A phase trains
# from the seed 100 * run seed + its offset here (+ i for its i-th model: phase_seed). Each strategy asks for every
# phase it needs; the run machinery trains a shared one (teachers, importance) once.
PHASE_SEEDS = dict(teacher=0, importance=10, finetune=11, random=12, bo3=20, one=30, one_compute=31,  # teacher i: + i
                   wide=40, pruning=41, prune_finetune=42, fusion_finetune=50)

def phase_seed(run_seed, phase, i=0):
    return 100 * run_seed + PHASE_SEEDS[phase] + i

def trained(make, data, s, seed, train, phase, epochs, drops, copies=1):
    """`copies` new networks, each initialised from its phase seed, trained for one phase of the run."""
    models, seeds = [], [phase_seed(seed, phase, i) for i in range(copies)]
    for model_seed in seeds:
        torch.manual_seed(model_seed)  # initial weights
        models.append(make().to(data.device))
    return train(models, data, s, epochs, drops, seeds, phase)

def finetune(model, data, s, seed, phase, train):
    """The last phase of student, prune and fusion: budget(s)["finetune"] epochs, from its own lr (ImageNet: 0.07)."""
    train([model], data, replace(s, lr=s.finetune_lr or s.lr), budget(s)["finetune"], s.drops_finetune, [seed],
          phase, warmup=s.finetune_warmup)

def random_units(big_student, seed):
    """1/k of every unit group, drawn at random: the control for the choice by loc (ours)."""
    g, k = torch.Generator().manual_seed(seed), big_student.hparams["k"]
    return [torch.randperm(len(gate.loc), generator=g)[:len(gate.loc) // k].sort().values.to(gate.loc.device)
            for gate, _, _ in big_student.unit_groups()]

def kept_share(big_student, keep):
    """Share of the kept units that came from each teacher (Fig. 2's idea, as numbers)."""
    k = big_student.hparams["k"]
    counts = sum(torch.bincount(units.cpu() // (len(gate.loc) // k), minlength=k)
                 for (gate, _, _), units in zip(big_student.unit_groups(), keep))
    return [round(c, 4) for c in (counts / counts.sum()).tolist()]

def student(data, s, make_teacher, seed, train=train, control=False):
    """Merging (section 2): k teachers, concatenation, importance, compression, fine-tuning. With
    control, the `random` strategy: the same, but 1/k of each unit group kept at random."""
    b, k = budget(s), s.teachers
    teachers = trained(make_teacher, data, s, seed, train, "teacher", b["teacher"], s.drops_teacher, k)
    torch.manual_seed(phase_seed(seed, "importance"))  # the gates' initial loc
    big_student = make_big_student(teachers)
    lambdas = lambda_schedule(b["importance"], s.lambda_start, s.lambda_step, round(s.paper_epochs / 6))
    train([big_student], data, s, b["importance"], s.drops_importance, [phase_seed(seed, "importance")],
          "importance", lambdas, share=1 / k)
    keep = random_units(big_student, phase_seed(seed, "random")) if control else top_units(big_student)
    merged = compress(big_student, keep, s.fold)
    compressed_val, compressed_test = data.evaluate(merged, "val"), data.evaluate(merged, "test")
    finetune(merged, data, s, phase_seed(seed, "finetune"), "random_finetune" if control else "finetune", train)
    return merged, dict(teachers_test=[round(data.evaluate(t), 6) for t in teachers],
                        big_student_test=round(data.evaluate(big_student), 6), compressed_val=round(compressed_val, 6),
                        compressed_test=round(compressed_test, 6), kept_from_teacher=kept_share(big_student, keep),
                        l_half_end=round(l_half([g.loc for g in gates(big_student)], 1 / k).item(), 6))

def random(data, s, make_teacher, seed, train=train):
    """Control (ours): does the gates' choice matter? The student, but 1/k of each unit group kept at random."""
    return student(data, s, make_teacher, seed, train, control=True)

def bo3(data, s, make_teacher, seed, train=train):
    """The best of three models of 1/3 of the budget each, chosen on the validation set (section 1).
    DEVIATION: the authors' scripts choose on the test set, which flatters bo3."""
    three = trained(make_teacher, data, s, seed, train, "bo3", budget(s)["bo3"], s.drops_teacher, 3)
    val = [data.evaluate(m, "val") for m in three]
    best = (max if data.metric == "accuracy" else min)(range(3), key=val.__getitem__)  # the first on ties
    return three[best], dict(chosen=best, val_of_three=[round(v, 6) for v in val])

def one(data, s, make_teacher, seed, train=train, phase="one", epochs=None):
    """One model trained for the whole budget (or for `epochs`)."""
    return trained(make_teacher, data, s, seed, train, phase, epochs or budget(s)["one"], s.drops_one)[0], {}

def macs(model, data):
    """Multiply-adds of one example's forward pass: each Linear's and Conv2d's outputs times its fan-in."""
    counts = []
    hooks = [m.register_forward_hook(lambda m, x, out: counts.append(out[0].numel() * m.weight[0].numel()))
             for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    predict(model, data.example)
    for hook in hooks:
        hook.remove()
    return sum(counts)

def one_compute(data, s, make_teacher, seed, train=train):
    """Control (ours): one model trained for the student's multiply-adds, not its epochs. Budgets in the
    paper are epochs, but the importance phase trains a network k times as wide, costing more."""
    b, teacher = budget(s), make_teacher().to(data.device)
    wider = macs(variant(teacher, k=s.teachers, gated=True), data) / macs(teacher, data)
    epochs = s.teachers * b["teacher"] + round(b["importance"] * wider) + b["finetune"]
    return one(data, s, make_teacher, seed, train, "one_compute", epochs)

# == 3.2  The sine problem =========================================================================
GRID = torch.linspace(0, 1, 501).unsqueeze(1)  # (501, 1): where curves are drawn and peaks counted

def sine_curve(x):
    return torch.sin(10 * math.pi * x)

def sine_data(seed, n_train=10_000, n_val=2_000, n_test=10_000, noise=0.2, device="cpu"):
    """x ~ U(0, 1), y = sin(10 pi x) + N(0, noise^2) (Fig. 8a): train, validation (ours, to choose bo3) and test
    sets drawn alike from one seed per run, shared by its strategies; 0.2 a standard deviation, as in the authors'
    scripts. DEVIATION: their loaders drew a fresh set for each strategy, never shuffled, no validation set."""
    g = torch.Generator().manual_seed(seed)
    def draw(n):
        x = torch.rand(n, 1, generator=g)
        return x.to(device), (sine_curve(x) + noise * torch.randn(n, 1, generator=g)).to(device)
    return Data(*draw(n_train), *draw(n_val), *draw(n_test), metric="mse")

def count_peaks(curve):
    """How many of the five waves of sin(10 pi x) a curve on GRID gets right (Fig. 10's "peaks").
    DEVIATION: the paper counts peaks by eye; ours: wave j counts when the curve reaches half the
    height, 0.5 on [0.2 j, 0.2 j + 0.1] and -0.5 on [0.2 j + 0.1, 0.2 j + 0.2]."""
    x, curve = GRID.squeeze(1), torch.as_tensor(curve)
    crest = lambda j: curve[(x >= 0.2 * j) & (x <= 0.2 * j + 0.1)].max() >= 0.5
    trough = lambda j: curve[(x >= 0.2 * j + 0.1) & (x <= 0.2 * j + 0.2)].min() <= -0.5
    return sum(int(crest(j) and trough(j)) for j in range(5))

# == 3.3  The image experiments' baselines: channel pruning (Table 2) and model fusion (Table 3) ===
class Mask(nn.Module):
    """A fixed 0/1 multiplier per unit in a gate's place: (dL/dm)^2 per batch, the first-order Taylor
    estimate of removing a unit, is its importance (Molchanov et al., CVPR 2019)."""
    def __init__(self, n, device):
        super().__init__()
        self.register_buffer("m", torch.ones(n, device=device).requires_grad_())  # made on its device: a leaf
    def sample(self, x):
        return self.m.view(1, -1, *[1] * (x.dim() - 2))
    def forward(self, x): return x * self.sample(x)  # as Gate's

def with_masks(model):
    """A Mask in place of every Gate (a ResNet stage's shared gate: one shared mask), in group order."""
    device = next(model.parameters()).device
    for name, module in list(model.named_modules()):
        if isinstance(module, Gate):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Mask(len(module.loc), device))
    return [mask for mask, _, _ in model.unit_groups()]

def taylor_pruning(masks, epochs):
    """fit's hooks that prune while training: after each epoch the live units of least (dL/dm)^2 over
    its batches are switched off, so that each group is down to half of its units after `epochs`."""
    importance = [torch.zeros_like(mask.m) for mask in masks]
    def after_step():
        for total, mask in zip(importance, masks):
            total += mask.m.grad ** 2
            mask.m.grad = None
    def after_epoch(epoch, history):
        for total, mask in zip(importance, masks):
            live, n = mask.m.detach() > 0, len(mask.m)
            drop = int(live.sum()) - (n - round((epoch + 1) / epochs * (n // 2)))  # live units now -> target
            if drop > 0:
                with torch.no_grad():
                    mask.m[torch.where(live, total, math.inf).topk(drop, largest=False).indices] = 0
            total.zero_()
    return dict(after_step=after_step, after_epoch=after_epoch)

def prune(data, s, make_teacher, seed, train=train):
    """Channel pruning (3.1): a network of double width trained for 2/3 of the budget, pruned to the teachers'
    width over the next 1/6, compressed to their architecture, fine-tuned for the last 1/6. DEVIATION: the
    paper's pruning method "[4]" could not be checked; ours is Taylor importance pruned epoch by epoch."""
    b = budget(s)
    wide, = trained(lambda: variant(make_teacher(), k=2), data, s, seed, train, "wide", s.teachers * b["teacher"],
                    s.drops_teacher)
    masked = variant(wide, gated=True)
    masked.load_state_dict(wide.state_dict(), strict=False)  # all but the gates, which become masks
    masks = with_masks(masked)
    train([masked], data, s, b["importance"], s.drops_importance, [phase_seed(seed, "pruning")], "pruning",
          **taylor_pruning(masks, b["importance"]))
    pruned = compress(masked, [mask.m.detach().nonzero().flatten() for mask in masks])  # exact: dropped masks are 0
    info = dict(wide_test=round(data.evaluate(wide), 6), pruned_test=round(data.evaluate(pruned), 6))
    finetune(pruned, data, s, phase_seed(seed, "prune_finetune"), "prune_finetune", train)
    return pruned, info

def unit_rows(layer, axis, n):
    """A layer's weights per unit, one row for each of its n units: what it writes (axis 0: weight
    rows, biases) or reads (axis 1: weight columns, in blocks of H W after a flatten)."""
    if axis == 0:
        return torch.cat([p.detach().reshape(n, -1) for p in layer.parameters()], 1)
    w = layer.weight.detach()
    return w.reshape(w.shape[0], n, -1).transpose(0, 1).reshape(n, -1)

def weight_matching(reference, model, seed=0, max_passes=100):
    """Git Re-Basin's weight matching (Ainsworth et al., ICLR 2023): per unit group, the linear
    assignment maximising sum_layers <W_reference, W_model permuted>, the others held fixed,
    until a pass changes nothing. One permutation per group: compress(model, perms) is aligned."""
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
    states, fused = [m.state_dict() for m in aligned], variant(teachers[0])
    fused.load_state_dict({name: sum(st[name] for st in states) / len(states) if value.is_floating_point()
                           else value for name, value in states[0].items()})
    return fused

def fusion(data, s, make_teacher, seed, train=train):
    """Model fusion: the student's teachers, aligned and averaged by fuse(), then fine-tuned for the student's
    fine-tuning epochs (1/6 of the budget; 5/6 with its teachers'). DEVIATION: the paper quotes OTFusion and
    GAMF (Table 3); ours is Git Re-Basin's weight matching and fine-tuning, so its rows are not Table 3's."""
    b = budget(s)
    teachers = trained(make_teacher, data, s, seed, train, "teacher", b["teacher"], s.drops_teacher, s.teachers)
    fused = fuse(teachers, seed)
    info = dict(teachers_test=[round(data.evaluate(t), 6) for t in teachers], fused_test=round(data.evaluate(fused), 6))
    finetune(fused, data, s, phase_seed(seed, "fusion_finetune"), "fusion_finetune", train)
    return fused, info

# The paper's strategies (3.1), our controls and the baselines of section 3.3, by name.
STRATEGIES = dict(student=student, bo3=bo3, one=one, random=random, one_compute=one_compute, prune=prune, fusion=fusion)

if __name__ == "__main__":  # hand over to the run machinery, which imports this file as `merge`: one copy of it
    import sine
    sine.main(sys.argv[1:])
