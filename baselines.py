"""The paper's other comparisons (section 3.3), the algorithms behind merge.py's strategies prune
and fusion: channel pruning of a double-width network (CIFAR-100, Table 2) with Molchanov et
al.'s first-order Taylor importance, and model fusion (CIFAR-10, Table 3) by Git Re-Basin's
weight matching. Both choose units of merge.py's unit groups and end in the teachers'
architecture through merge.compress()."""
import math

import torch
import torch.nn as nn

import merge

# == Channel pruning ==============================================================================

class Mask(nn.Module):
    """A fixed 0/1 multiplier per unit in a gate's place: (dL/dm)^2 per batch, the first-order Taylor
    estimate of removing a unit, is its importance (Molchanov et al., CVPR 2019)."""

    def __init__(self, n, device):
        super().__init__()
        self.register_buffer("m", torch.ones(n, device=device).requires_grad_())  # made on its device: a leaf

    def sample(self, x):
        return self.m.view(1, -1, *[1] * (x.dim() - 2))

    def forward(self, x):
        return x * self.sample(x)

def with_masks(model):
    """A Mask in place of every Gate (a ResNet stage's shared gate: one shared mask), in group order."""
    device = next(model.parameters()).device
    for name, module in list(model.named_modules()):
        if isinstance(module, merge.Gate):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Mask(len(module.loc), device))
    return [mask for mask, _, _ in model.unit_groups()]

def prune_channels(model, masks, data, s, epochs, seed):
    """Train on while pruning: after each epoch the live units of least (dL/dm)^2 over its batches
    are switched off, so that each group is down to half after `epochs`. Returns the live units."""
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
    merge.fit(model, data, s, epochs, s.drops_importance, seed, after_step=after_step, after_epoch=after_epoch)
    return [mask.m.detach().nonzero().flatten() for mask in masks]

# == Model fusion ==================================================================================

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
            (_, ref_out, ref_in), (_, out, in_) = groups[i], merge.compress(model, perms).unit_groups()[i]
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
    aligned = [teachers[0]] + [merge.compress(t, weight_matching(teachers[0], t, seed)) for t in teachers[1:]]
    states, fused = [m.state_dict() for m in aligned], merge.variant(teachers[0])
    fused.load_state_dict({name: sum(st[name] for st in states) / len(states) if value.is_floating_point()
                           else value for name, value in states[0].items()})
    return fused
