"""Muon for convolution filters, with plain SGD for every other parameter, in one optimizer.

airbench94_muon (Keller Jordan) trains the 3x3 conv filters with Muon (momentum, then the update orthogonalised
by a Newton-Schulz iteration) and BN biases, the whitening bias and the head with Nesterov SGD. One optimizer
holding both kinds of parameter group lets Lightning's automatic optimisation, OneCycle (one ``max_lr`` per
group) and checkpointing treat it like any other.

Hand-written because ``torch.optim.Muon`` takes only 2-D matrices: a conv filter ``(C_out, C_in, kh, kw)`` is
orthogonalised here as the ``(C_out, C_in * kh * kw)`` matrix, as in airbench.

``OneCycle`` is torch's ``OneCycleLR`` with a length that may change mid-run (``--budget`` re-plans it).
"""

from __future__ import annotations

import math

import torch

# Quintic Newton-Schulz coefficients (Muon's): steepest slope at zero, so few steps push every singular value
# into roughly [0.5, 1.5], which trains as well as the exact U V^T of the SVD.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


@torch.no_grad()
def orthogonalize(g: torch.Tensor, steps: int = 3, eps: float = 1e-7) -> torch.Tensor:
    """Approximately ``U V^T`` of a matrix ``g = U S V^T`` ``(m, n)``, by ``steps`` Newton-Schulz iterations.

    bf16 on GPUs (as airbench); float32 elsewhere: CPUs without native bf16 emulate bf16 matmuls, many times slower
    than float32 (docs/results.md, "Precision").
    """
    a, b, c = NS_COEFFICIENTS
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    x = x / (x.norm() + eps)  # the largest singular value is now <= 1
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T  # iterate on the smaller Gram matrix
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon on the parameter groups marked ``muon=True``, SGD with (Nesterov) momentum on the others.

    A Muon group's parameters are conv filters or matrices; each step, per parameter: momentum buffer
    ``m = momentum * m + grad``, Nesterov look-ahead ``grad + momentum * m``, the weight rescaled to norm
    ``sqrt(C_out)`` (the nets' BatchNorm makes the loss blind to filter scale, so this keeps the step size
    relative to the weights fixed instead of letting it shrink as weights grow), then ``-lr`` times the
    orthogonalised update. Their ``weight_decay`` is ignored (the rescaling already bounds the weights).
    The other groups take exactly ``torch.optim.SGD``'s step (coupled L2 decay, no dampening).

    Args:
        params: parameter groups; a group with ``muon=True`` is trained with Muon.
        lr: default learning rate.
        momentum: default momentum.
        nesterov: Nesterov momentum for every group.
        weight_decay: default L2 coefficient of the SGD groups.
        ns_steps: Newton-Schulz iterations per Muon update (airbench94_muon: 3).
    """

    def __init__(self, params, lr: float = 0.01, momentum: float = 0.9, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 3):
        if lr < 0 or momentum < 0 or weight_decay < 0 or ns_steps < 1:
            raise ValueError("Muon needs lr, momentum and weight_decay >= 0 and ns_steps >= 1")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        ns_steps=ns_steps, muon=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, nesterov = group["lr"], group["momentum"], group["nesterov"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not group["muon"] and group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = g.clone()  # as torch's SGD: the first buffer is the gradient
                    buf = state["momentum_buffer"]
                else:
                    buf = state["momentum_buffer"]
                    buf.mul_(momentum).add_(g)
                g = g.add(buf, alpha=momentum) if nesterov else buf
                if group["muon"]:
                    p.mul_(p.size(0) ** 0.5 / p.norm().clamp_min(1e-12))
                    g = orthogonalize(g.reshape(len(g), -1), group["ns_steps"]).view_as(p)
                p.add_(g, alpha=-lr)
        return loss


class OneCycle(torch.optim.lr_scheduler.LRScheduler):
    """The one-cycle schedule of ``torch.optim.lr_scheduler.OneCycleLR`` (same arguments, same LRs and momenta step
    by step), whose ``total_steps`` may be changed at any step: the rest of the schedule stretches or shrinks, each
    phase keeping its share (``OneCycleLR`` fixes its phases when built). From step ``total_steps - 1`` on it
    stays at the end.

    Its state (``state_dict``) is plain numbers; a saved ``OneCycleLR`` state loads into it too (same names).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_lr: list[float], total_steps: int, pct_start: float = 0.3,
                 anneal_strategy: str = "cos", cycle_momentum: bool = True, base_momentum: float = 0.85,
                 max_momentum: float = 0.95, div_factor: float = 25.0, final_div_factor: float = 1e4,
                 three_phase: bool = False):
        if total_steps < 1 or not 0 <= pct_start <= 1 or anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"OneCycle: total_steps {total_steps} must be >= 1, pct_start {pct_start} in [0, 1], "
                             f"anneal_strategy {anneal_strategy!r} 'cos' or 'linear'")
        self.total_steps = total_steps
        self.pct_start, self.anneal_strategy, self.three_phase = pct_start, anneal_strategy, three_phase
        self.max_lrs = list(max_lr)
        self.initial_lrs = [lr / div_factor for lr in self.max_lrs]
        self.min_lrs = [lr / final_div_factor for lr in self.initial_lrs]
        self.cycle_momentum = cycle_momentum
        self.use_beta1 = "betas" in optimizer.defaults
        self.momenta = (max_momentum, base_momentum)  # (at the LR's low ends, at its peak)
        for group, lr in zip(optimizer.param_groups, self.initial_lrs):
            group["lr"] = group["initial_lr"] = lr
            if cycle_momentum:
                self._set_momentum(group, max_momentum)
        super().__init__(optimizer)

    def _set_momentum(self, group: dict, value: float) -> None:
        if self.use_beta1:
            group["betas"] = (value, *group["betas"][1:])
        else:
            group["momentum"] = value

    def _phases(self) -> list[tuple[float, int, int]]:
        """``(end step, start point, end point)`` per phase; points: 0 initial LR / max momentum, 1 peak LR / base
        momentum, 2 final LR / max momentum. End steps as ``OneCycleLR`` computes them."""
        peak = float(self.pct_start * self.total_steps) - 1
        if self.three_phase:
            return [(peak, 0, 1), (2 * peak, 1, 0), (self.total_steps - 1, 0, 2)]
        return [(peak, 0, 1), (self.total_steps - 1, 1, 2)]

    def _anneal(self, start: float, end: float, pct: float) -> float:
        if self.anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def get_lr(self) -> list[float]:
        step = min(self.last_epoch, self.total_steps - 1)  # after the last step: its end value, not an extrapolation
        start_step, phases = 0.0, self._phases()
        for i, (end_step, _, _) in enumerate(phases):  # the phase the step is in (or the last)
            if step <= end_step or i == len(phases) - 1:
                break
            start_step = end_step
        end_step, start_point, end_point = phases[i]
        pct = (step - start_step) / (end_step - start_step)
        momentum = {0: self.momenta[0], 1: self.momenta[1], 2: self.momenta[0]}
        lrs = []
        for group, lows, peak, final in zip(self.optimizer.param_groups, self.initial_lrs, self.max_lrs, self.min_lrs):
            points = (lows, peak, final)
            lrs.append(self._anneal(points[start_point], points[end_point], pct))
            if self.cycle_momentum:
                self._set_momentum(group, self._anneal(momentum[start_point], momentum[end_point], pct))
        return lrs
