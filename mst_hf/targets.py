"""Which weight matrices MST sparsifies.

Default: every 2-D projection of the decoder (attention q/k/v/o or GPT-2's fused ``c_attn``/``c_proj``, MLP
up/gate/down or ``c_fc``/``c_proj``) plus the LM head. Position/token embeddings (unless the LM head is tied to
the token embedding), norms and biases stay dense. ``target_modules``/``exclude_modules`` override the default,
PEFT-style: a list of module-name suffixes, or one regex that must match the whole module name.
"""

import re
import sys
from dataclasses import dataclass, field
from fractions import Fraction

from accelerate.utils import extract_model_from_parallel
from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging

from . import allocation
from .allocation import Matmul

logger = logging.get_logger(__name__)

# Per-model-type default projections (module-name suffixes); unknown types use every Linear/Conv1D of the model.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "olmo2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "smollm3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "granite": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    # MoE: the fused 3-D experts are no nn.Linear (they stay dense, see `moe_weights`) and the router must stay
    # dense; gate/up/down_proj name only the dense MLPs of `mlp_only_layers` and Qwen2-MoE's shared expert.
    "qwen2_moe": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3_moe": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


@dataclass(frozen=True)
class TargetWeight(Matmul):
    """One sparsified matrix: the :class:`~mst_hf.allocation.Matmul` record of its name, module and matmul shape
    ``n_in x n_out`` (``is_target`` true), plus the live parameter. ``name`` is the parameter name as in
    ``model.named_parameters()`` (tied weights: the first name). Frozen: when FSDP2 swaps the parameter, the
    controller replaces the record (``dataclasses.replace(t, param=new)``)."""

    param: nn.Parameter = field(kw_only=True, compare=False, repr=False)


@dataclass(frozen=True)
class MoEWeight:
    """A mixture-of-experts matrix that is no nn.Linear, so MST leaves it dense: a fused expert tensor
    ``(n_experts, out, in)``, counted as one ``in x (n_experts * out)`` matrix of which each token uses the
    ``top_k`` experts it is routed to (``tokens_fraction = top_k / n_experts``), or the router (``(n_experts, in)``,
    every token)."""

    name: str
    module_name: str
    n_in: int
    n_out: int
    tokens_fraction: Fraction = Fraction(1)
    is_router: bool = False


def moe_weights(model: nn.Module) -> list[MoEWeight]:
    """The fused expert tensors (3-D parameters of a module named ``*expert*`` or with ``num_experts``, as
    transformers 5 stores ``mlp.experts.gate_up_proj``/``down_proj``) and the router beside them (a sibling module
    with a 2-D ``weight`` of ``n_experts`` rows that is no nn.Linear). ``top_k`` is the config's
    ``num_experts_per_tok``, else the router's ``top_k``."""
    model = unwrap_model(model)
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    modules = dict(model.named_modules())
    first_names: dict[int, str] = {}
    for n, p in model.named_parameters():
        first_names.setdefault(id(p), n)
    seen: set[int] = set()
    found: list[MoEWeight] = []
    for module_name, module in modules.items():
        fused = [p for p in module.parameters(recurse=False) if p.ndim == 3 and id(p) not in seen]
        is_experts = "expert" in module_name.rsplit(".", 1)[-1].lower() or hasattr(module, "num_experts")
        if not fused or not is_experts or isinstance(module, nn.modules.conv._ConvNd):
            continue
        n_experts = int(fused[0].shape[0])
        parent_name = module_name.rpartition(".")[0]
        routers = [(f"{parent_name}.{n}" if parent_name else n, c) for n, c in modules[parent_name].named_children()
                   if c is not module and not isinstance(c, (nn.Linear, Conv1D))
                   and getattr(getattr(c, "weight", None), "ndim", 0) == 2 and c.weight.shape[0] == n_experts]
        top_k = getattr(text, "num_experts_per_tok", None) or next(
            (c.top_k for _, c in routers if isinstance(getattr(c, "top_k", None), int)), None)
        if not isinstance(top_k, int) or not 1 <= top_k <= n_experts:
            logger.warning("MST FLOP count: no top-k (`num_experts_per_tok`) found for the experts of %s; every "
                           "token is counted through all %d experts (an upper bound).", module_name, n_experts)
            top_k = n_experts
        for p in fused:
            seen.add(id(p))
            e, out_dim, in_dim = (int(x) for x in p.shape)
            found.append(MoEWeight(first_names[id(p)], module_name, in_dim, e * out_dim, Fraction(top_k, e)))
        for router_name, router in routers:
            if id(router.weight) not in seen:
                seen.add(id(router.weight))
                n_out, n_in = (int(x) for x in router.weight.shape)
                found.append(MoEWeight(first_names[id(router.weight)], router_name, n_in, n_out, is_router=True))
    return found


def fused_expert_parameters(model: nn.Module) -> list[str]:
    """Names of the fused 3-D MoE expert tensors of `model` (dense under MST: see `moe_weights`)."""
    return [w.name for w in moe_weights(model) if not w.is_router]


def _matches(name: str, spec) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def _shape(module: nn.Module) -> tuple[int, int]:
    weight = module.weight
    if isinstance(module, Conv1D):  # GPT-2 stores (in, out)
        return weight.shape[0], weight.shape[1]
    return weight.shape[1], weight.shape[0]  # nn.Linear stores (out, in)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP / DeepSpeed / FSDP1 / torch.compile wrappers (accelerate's
    ``extract_model_from_parallel``, repeated because the wrappers can nest in either order)."""
    while True:
        inner = extract_model_from_parallel(model, keep_torch_compile=False)
        if inner is model:
            return model
        model = inner


def find_targets(model: nn.Module, mst_config) -> dict[str, TargetWeight]:
    """Map parameter name -> :class:`TargetWeight` for every matrix MST sparsifies, in module order."""
    model = unwrap_model(model)
    param_names = {id(p): n for n, p in model.named_parameters()}
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    input_embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    include = mst_config.target_modules
    if include is None:
        include = DEFAULT_TARGET_MODULES.get(model_type)
    exclude = mst_config.exclude_modules

    targets: dict[str, TargetWeight] = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D)) or getattr(module, "weight", None) is None:
            continue
        if module.weight.ndim != 2 or id(module.weight) not in param_names:
            continue
        is_head = module is output_embeddings
        if is_head:
            if not mst_config.sparsify_lm_head:
                continue
        elif include is not None and not _matches(module_name, include):
            continue
        if exclude is not None and _matches(module_name, exclude):
            continue
        name = param_names[id(module.weight)]
        if name in targets:
            continue
        n_in, n_out = _shape(module)
        tied = input_embeddings is not None and getattr(input_embeddings, "weight", None) is module.weight
        targets[name] = TargetWeight(name, module_name, n_in, n_out, True, is_head, tied, param=module.weight)
    return targets


PEFT_REFUSAL = (
    "MST does not train PEFT adapters: it evolves the masks of the base weights, which a PEFT model freezes. To "
    "LoRA-tune a sparse MST checkpoint, train the PeftModel with plain transformers.Trainer (the frozen base stays "
    "sparse), then merge with mst_hf.merge_lora_sparse(peft_model, masks) to keep the base sparsity."
)


def has_peft_layers(model: nn.Module) -> bool:
    """A PeftModel, a transformers model with a loaded adapter, or a base model PEFT injected layers into (what
    ``PeftModel.get_base_model()`` returns). peft is only consulted when it is already imported."""
    if hasattr(model, "get_base_model") or getattr(model, "_hf_peft_config_loaded", False):
        return True
    peft_tuners = sys.modules.get("peft.tuners.tuners_utils")
    layer_type = getattr(peft_tuners, "BaseTunerLayer", None)
    return layer_type is not None and any(isinstance(m, layer_type) for m in model.modules())


def require_targets(model: nn.Module, mst_config) -> dict[str, TargetWeight]:
    """:func:`find_targets` for training: refuses PEFT models, leaves frozen weights (``requires_grad=False``)
    out with a warning (pruning a weight that never trains would only destroy it), and raises a clear error when
    nothing would be sparsified."""
    inner = unwrap_model(model)
    if has_peft_layers(inner):
        raise NotImplementedError(PEFT_REFUSAL)
    found = find_targets(model, mst_config)
    targets = {name: t for name, t in found.items() if t.param.requires_grad}
    frozen = [name for name in found if name not in targets]
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    if frozen and not targets:
        raise ValueError(
            f"Every weight MST would sparsify in this {type(inner).__name__} is frozen (requires_grad=False): "
            f"{frozen[:4]}{' ...' if len(frozen) > 4 else ''}. MST prunes and regrows weights while they train; "
            "unfreeze them (`model.requires_grad_(True)`) or choose trainable ones with `target_modules`."
        )
    if frozen:
        logger.warning(
            "MST leaves %d frozen weight(s) (requires_grad=False) dense instead of pruning them: %s. Unfreeze them "
            "to sparsify them, or list them in `exclude_modules` to silence this warning.", len(frozen),
            ", ".join(frozen[:6]) + (" ..." if len(frozen) > 6 else ""),
        )
    if not targets:
        raise ValueError(
            f"MST found no weight matrix to sparsify in this {type(inner).__name__} "
            f"(model_type={model_type!r}) with target_modules={mst_config.target_modules!r}, "
            f"exclude_modules={mst_config.exclude_modules!r}, sparsify_lm_head={mst_config.sparsify_lm_head!r}. "
            "Set `target_modules` to the names of its nn.Linear/Conv1D projections."
        )
    _refuse_head_only(inner, found, mst_config, model_type)
    cap = getattr(mst_config, "lm_head_max_sparsity", None)
    if cap is not None and not any(t.is_lm_head for t in targets.values()):
        logger.warning(
            "lm_head_max_sparsity=%s caps the LM head's sparsity, but the head of this %s is not a target "
            "(exclude_modules=%r, or frozen, or no output embedding): the cap has no effect and the head stays dense. "
            "Set lm_head_max_sparsity=None, or stop excluding the head.", cap, type(inner).__name__,
            mst_config.exclude_modules)
    for t in targets.values():
        if not t.param.dtype.is_floating_point:
            raise TypeError(f"Target weight `{t.name}` has dtype {t.param.dtype}; MST needs floating-point weights "
                            "(quantised models are not supported: exclude it with `exclude_modules`).")
    return targets


def check_fused_experts(model: nn.Module, flop_model, mst_config) -> None:
    """Fused 3-D MoE expert tensors are not sparsified (MST targets nn.Linear/Conv1D only), and on a MoE model they
    hold most of a token's matmul FLOPs (``6 * token_numel`` each, out of ``6 * n_token_params`` of ``flop_model``,
    the model's :class:`mst_hf.flops.FlopModel`). So a MoE model is refused, naming them and their share, unless
    `exclude_modules` names the experts' modules (e.g. ``["experts"]``): then they train dense, are counted dense at
    their ``top_k``, and a warning repeats their share. The controller calls this when it is built."""
    experts = [w for w in moe_weights(model) if not w.is_router]
    if not experts or not flop_model.n_token_params:
        return
    fused = sorted({w.name for w in experts})
    share = sum(m.token_numel for m in flop_model.matmuls if m.name in set(fused)) / flop_model.n_token_params
    listed = ", ".join(fused[:4]) + (f" ... ({len(fused) - 4} more)" if len(fused) > 4 else "")
    name = type(unwrap_model(model)).__name__
    exclude = mst_config.exclude_modules
    if exclude is None or not all(_matches(w.module_name, exclude) for w in experts):
        raise NotImplementedError(
            f"MST cannot sparsify the fused MoE expert weights of this {name} ({listed}): they are 3-D tensors, not "
            f"nn.Linear, and they are {100 * share:.1f}% of a token's dense matmul FLOPs, so the model would be far "
            "less sparse than its reported sparsity says. To train it with the experts dense (counted dense at "
            "their top_k) and the other projections sparse, exclude them: `exclude_modules=['experts']`."
        )
    logger.warning("MST leaves the %d fused MoE expert weight(s) of this %s dense (excluded): %s. They are %.1f%% "
                   "of a token's dense matmul FLOPs and are charged dense, so the FLOP reduction stays far below "
                   "what the sparsity of the other weights suggests.", len(fused), name, listed, 100 * share)


def _refuse_head_only(model: nn.Module, found: dict, mst_config, model_type) -> None:
    """Targets that leave only the LM head (names of another architecture, an exclusion of everything else) would
    train the model at full density but for its head and report the head's sparsity as the model's: refused, unless
    the head is named in `target_modules` itself (sparsifying only the head on purpose)."""
    include = mst_config.target_modules
    include = DEFAULT_TARGET_MODULES.get(model_type) if include is None else include
    if not found or any(not t.is_lm_head for t in found.values()) or include is None:
        return
    if any(_matches(t.module_name, include) for t in found.values()):
        return
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = dict.fromkeys(n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                          if isinstance(m, (nn.Linear, Conv1D)) and m is not head)
    raise ValueError(
        f"MST would sparsify only the LM head of this {type(model).__name__} (model_type={model_type!r}): "
        f"target_modules={mst_config.target_modules!r} (in use: {include!r}) with "
        f"exclude_modules={mst_config.exclude_modules!r} matches none of its projections, which are named "
        f"{list(names)}. Set `target_modules` to some of those (or None for the model type's default), or name the "
        "head itself in `target_modules` to sparsify only the head."
    )


def layer_sparsities(model: nn.Module, mst_config, sparsity: float) -> dict[str, float]:
    """``{parameter_name: sparsity}`` the configured allocation gives each target at global ``sparsity``, with the
    LM head capped at ``lm_head_max_sparsity`` when that is set (what the controller allocates).

    Only shapes are read, so a model built on the ``meta`` device works (no memory for weights).
    """
    densities = allocation.layer_densities(find_targets(model, mst_config).values(), mst_config, sparsity)
    return {name: 1.0 - d for name, d in densities.items()}
