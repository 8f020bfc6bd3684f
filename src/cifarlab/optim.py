"""Muon for convolution filters, with plain SGD for every other parameter, in one optimizer.

airbench94_muon (Keller Jordan) trains the 3x3 conv filters with Muon (momentum, then the update orthogonalised
by a Newton-Schulz iteration) and BN biases, the whitening bias and the head with Nesterov SGD. One optimizer
holding both kinds of parameter group lets Lightning's automatic optimisation, OneCycle (one ``max_lr`` per
group) and checkpointing treat it like any other.

Hand-written because ``torch.optim.Muon`` takes only 2-D matrices: a conv filter ``(C_out, C_in, kh, kw)`` is
orthogonalised here as the ``(C_out, C_in * kh * kw)`` matrix, as in airbench.
"""

from __future__ import annotations

import torch

# Quintic Newton-Schulz coefficients (Muon's): steepest slope at zero, so few steps push every singular value
# into roughly [0.5, 1.5], which trains as well as the exact U V^T of the SVD.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


@torch.no_grad()
def orthogonalize(g: torch.Tensor, steps: int = 3, eps: float = 1e-7) -> torch.Tensor:
    """Approximately ``U V^T`` of a matrix ``g = U S V^T`` ``(m, n)``, by ``steps`` Newton-Schulz iterations.

    bf16 on GPUs (as airbench); float32 elsewhere: CPUs without native bf16 emulate bf16 matmuls, many times slower
    than float32 (docs/benchmarks.md, "Precision: bf16 only where the CPU has it").
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
