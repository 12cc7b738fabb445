"""`ElementwiseAdamW`: AdamW whose bias correction counts steps per element, for
``regrow_optimizer_state="restart"``.

torch's AdamW keeps one ``step`` per parameter tensor, so a connection regrown at step ``k`` of a run, its moments
zeroed, gets the bias correction of step ``k + 1`` (about 1): its first update is ``lr (1 - b1) / sqrt(1 - b2)``
(about 0.32 lr for beta2 0.95, 3.2 lr for 0.999) instead of a fresh Adam's ``lr``. Here every element has its own
count ``k_e`` (``state["elem_step"]``, an int32 tensor of the weight's shape, saved and restored with the
optimizer's ``state_dict``), and the update of element ``e`` is

    m_e = b1 m_e + (1 - b1) g_e,   v_e = b2 v_e + (1 - b2) g_e^2
    w_e <- w_e (1 - lr wd) - lr (m_e / (1 - b1^k_e)) / (sqrt(v_e / (1 - b2^k_e)) + eps)

which is torch's AdamW while no count was reset (every ``k_e`` equals ``step``). :meth:`mst_hf.MaskState.set_mask`
zeroes ``exp_avg``, ``exp_avg_sq`` and ``elem_step`` of every changed position, so a regrown weight's first update
is a fresh Adam's first step: ``lr * g / (|g| + eps)``, about ``lr`` in size. The cost is one int32 tensor per
parameter and a few element-wise operations per step (no fused or foreach kernel).
"""

from itertools import chain

import torch

ELEMENT_STEP = "elem_step"  # the per-element step count in each parameter's optimizer state
ELEMENT_STEP_DTYPE = torch.int32


def run_closure(closure):
    """``optimizer.step(closure)``'s loss: the closure called with gradients on (``None`` without one)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def refuse_amsgrad_and_maximize(group: dict, name: str, fix: str) -> None:
    """The AdamW variants of mst_hf implement neither ``amsgrad`` nor ``maximize``: refuse a group that sets them."""
    if group["amsgrad"] or group["maximize"]:
        raise NotImplementedError(f"{name} does not implement `amsgrad` or `maximize`; use {fix}.")


class ElementwiseAdamW(torch.optim.AdamW):
    """``ElementwiseAdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)``: decoupled weight
    decay as :class:`torch.optim.AdamW`, with per-element bias correction (module docstring). ``amsgrad``,
    ``maximize`` and the fused, foreach, capturable and differentiable variants are not offered."""

    counts_element_steps = True  # what :meth:`mst_hf.MaskState.set_mask` checks for regrow_optimizer_state="restart"

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False, fused=False)

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        for group in self.param_groups:
            refuse_amsgrad_and_maximize(group, "ElementwiseAdamW",
                                        "torch.optim.AdamW (with regrow_optimizer_state='zero' or 'warm')")
            lr, eps, decay = float(group["lr"]), group["eps"], group["weight_decay"]
            beta1, beta2 = (float(b) for b in group["betas"])
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if grad.is_sparse:
                    raise NotImplementedError("ElementwiseAdamW does not take sparse gradients.")
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state[ELEMENT_STEP] = torch.zeros_like(param, dtype=ELEMENT_STEP_DTYPE)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                k = state[ELEMENT_STEP].add_(1).to(exp_avg.dtype)  # (shape of param) steps since (re)start
                param.mul_(1 - lr * decay)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                correction1 = 1 - torch.pow(beta1, k)
                correction2_sqrt = (1 - torch.pow(beta2, k)).sqrt_()
                denom = (exp_avg_sq.sqrt() / correction2_sqrt).add_(eps)
                param.addcdiv_(exp_avg / correction1, denom, value=-lr)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """``torch.optim.Optimizer.load_state_dict``, with ``elem_step`` kept as saved: the base class casts every
        non-``step`` state tensor to the parameter's dtype (lossy for a bf16 parameter), so the counts are put back
        afterwards, exactly, as int32."""
        saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        counts = {i: s[ELEMENT_STEP] for i, s in state_dict["state"].items() if ELEMENT_STEP in s}
        super().load_state_dict(state_dict)
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, param in zip(saved_ids, params):
            if saved_id in counts:
                self.state[param][ELEMENT_STEP] = counts[saved_id].to(device=param.device, dtype=ELEMENT_STEP_DTYPE,
                                                                      copy=True)
