"""LoRA (PEFT) on a sparse MST checkpoint, and merging back without losing the sparsity.

The workflow::

    base = AutoModelForCausalLM.from_pretrained(mst_dir)          # pruned weights are exact zeros
    peft_model = get_peft_model(base, LoraConfig(...))             # the base is frozen: its zeros stay zeros
    Trainer(peft_model, ...).train()                               # plain Trainer: MSTTrainer refuses PEFT models
    merged = mst_hf.merge_lora_sparse(peft_model, mst_dir)         # as sparse as the base

The LoRA update ``B A`` is dense, so a plain ``merge_and_unload`` fills every pruned position of the adapted
matrices. :func:`merge_lora_sparse` merges and then re-applies the base masks: the merged model keeps the base's
sparsity exactly, and **the LoRA delta on pruned positions is dropped** (only its part on active weights is kept).
Compare the merged model's loss with the unmerged ``PeftModel``'s to see what that costs for your adapter.
"""

import torch

from ..io.attach import as_mask_dict, named_base_params
from ..masks import MaskState, check_shapes


def merge_lora_sparse(peft_model, masks, safe_merge: bool = False, adapter_names: list[str] | None = None):
    """Merge the adapters of ``peft_model`` into its base and re-apply the base ``masks``; returns the merged model.

    ``masks``: the base model's masks (a directory or file saved by MSTTrainer / ``save_sparse``, a
    :class:`MaskState`, or a dict name -> bool tensor), named as in the plain base model. They are checked against
    the model (names, shapes) before anything is merged. The LoRA delta on pruned positions is dropped."""
    if not hasattr(peft_model, "merge_and_unload"):
        raise TypeError(f"`peft_model` must be a peft.PeftModel (with merge_and_unload), got "
                        f"{type(peft_model).__name__}. A plain model has nothing to merge: use mst_hf.load_masks.")
    mask_dict = as_mask_dict(masks)
    if mask_dict is None:
        raise ValueError("`masks` is required: pass the MST checkpoint directory the base model was loaded from "
                         "(it holds mst_masks.safetensors) or its MaskState.")
    check_shapes({n: tuple(m.shape) for n, m in mask_dict.items()}, named_base_params(peft_model),
                 "`masks` (against the base model of this PeftModel)", exact=False)
    merged = peft_model.merge_and_unload(safe_merge=safe_merge, adapter_names=adapter_names)
    merged_params = dict(merged.named_parameters())
    MaskState({n: merged_params[n] for n in mask_dict}, mask_dict).apply_to_weights()
    return merged


@torch.no_grad()
def pruned_nonzeros(model, masks) -> int:
    """Number of weights of ``model`` (plain or PEFT-wrapped: its base weights) that are non-zero where ``masks``
    prune; 0 for a model that kept its sparsity."""
    params = named_base_params(model)
    return sum(int((params[n].detach() != 0)[~m.to(params[n].device)].sum()) for n, m in as_mask_dict(masks).items())
