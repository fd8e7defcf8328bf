"""The paper's other comparisons (section 3.3), read beside it as merge.py beside sections 2 and 3.1:
the strategies prune and fusion with what they need. Channel pruning of a double-width network
(CIFAR-100, Table 2) with Molchanov et al.'s first-order Taylor importance; model fusion (CIFAR-10,
Table 3) by Git Re-Basin's weight matching. Both are strategies like merge.py's (experiment.STRATEGIES
holds all), choose units of merge.py's unit groups and end in the teachers' architecture through
merge.compress()."""
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

def prune(datas, s, make_teacher, seeds):
    """Channel pruning: a network of double width trained for 2/3 of the budget, pruned to the
    teachers' width over the next 1/6, compressed to their architecture, fine-tuned for 1/6."""
    b, pruned, infos, k = merge.budget(s), [], [], s.teachers
    wides = merge.trained(lambda: merge.variant(make_teacher(), k=2), datas, s, seeds, "wide", 1, k * b["teacher"],
                          s.drops_teacher)
    merge.log.info(f"  pruning: {len(wides)} x {b['importance']} epochs")
    for (wide,), data, seed in zip(wides, datas, seeds):
        masked = merge.variant(wide, gated=True)
        masked.load_state_dict(wide.state_dict(), strict=False)  # all but the gates, which become masks
        alive = prune_channels(masked, with_masks(masked), data, s, b["importance"], merge.phase_seed(seed, "pruning"))
        pruned.append(merge.compress(masked, alive))  # exact: the dropped units are 0 wherever they are written
        infos.append(dict(wide_test=round(merge.evaluate(wide, data), 6),
                          pruned_test=round(merge.evaluate(pruned[-1], data), 6),
                          compute=dict(wide=merge.spent(wide, data, k * b["teacher"]),
                                       pruning=merge.spent(wide, data, b["importance"]),
                                       finetune=merge.spent(pruned[-1], data, b["finetune"]))))
    merge.train(pruned, datas, merge.finetuning(s), b["finetune"], s.drops_finetune,
                [merge.phase_seed(seed, "prune_finetune") for seed in seeds], phase="prune_finetune",
                warmup=s.finetune_warmup)
    return list(zip(pruned, infos))


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

def fusion(datas, s, make_teacher, seeds):
    """Model fusion: the student's teachers, aligned and averaged by fuse(), then fine-tuned for
    the student's fine-tuning epochs. It has no importance phase: it uses 5/6 of the budget."""
    b = merge.budget(s)
    teachers = merge.trained(make_teacher, datas, s, seeds, *merge.first_phase(s, "fusion"))
    fused = [fuse(ts, seed) for ts, seed in zip(teachers, seeds)]
    infos = [dict(teachers_test=[round(merge.evaluate(t, data), 6) for t in ts],
                  fused_test=round(merge.evaluate(f, data), 6),
                  compute=dict(teacher=merge.spent(ts[0], data, b["teacher"], s.teachers),
                               finetune=merge.spent(f, data, b["finetune"])))
             for ts, f, data in zip(teachers, fused, datas)]
    merge.train(fused, datas, merge.finetuning(s), b["finetune"], s.drops_finetune,
                [merge.phase_seed(seed, "fusion_finetune") for seed in seeds], phase="fusion_finetune",
                warmup=s.finetune_warmup)
    return list(zip(fused, infos))

STRATEGIES = dict(prune=prune, fusion=fusion)
