"""What leaves an MST run: the compact sparse file of a model, the model card section, and the push to the Hub.

**Compact file** (:func:`save_sparse` / :func:`load_sparse`): a model's weights as non-zeros plus a bitmask
(``mst_sparse.safetensors``, format in :mod:`mst_hf.io.formats`), about proportional to the density and reloaded
bit-exactly.

**Model card**: :func:`model_card_section` records the schedule (the :class:`MSTConfig` fields), the final sparsity,
the counted FLOP reduction (matmul FLOPs counted by ``mst_hf.flops``, not a measured time) and the perplexity when
the model was evaluated; :func:`write_model_card` puts it into ``README.md`` with the tags ``mst`` and ``sparse``.

**Push**: ``MSTTrainer.push_to_hub()`` (Trainer's own path, with the MST files and card added) or
:func:`push_sparse_to_hub` for a saved directory or a model.
"""

import json
import math
import os
import re
import tempfile

import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData

from ..config import MST_CONFIG_NAME, MSTConfig
from ..masks import MaskState, check_shapes
from ..schedule import LR_SCHEDULES
from ..targets import find_targets, has_peft_layers, unwrap_model
from .attach import as_mask_dict
from .checkpoint import read_saved_info, saved_phase, weights_info
from .files import check_regular_file, write_json
from .formats import (
    MASKS_NAME,
    SPARSE_NAME,
    STATE_NAME,
    read_compact,
    read_mask_file,
    save_masks,
    shared_names,
    sparse_file,
    unverified_aliases,
    write_sparse_file,
)

MST_TAGS = ("mst", "sparse")
CARD_START, CARD_END = "<!-- mst_hf:start -->", "<!-- mst_hf:end -->"
UPLOAD_IGNORE = ["_*", "checkpoint-*", "*.tmp*"]


# ------------------------------------------------------------------------------------------------ compact file
def _plain_model(model):
    model = unwrap_model(model)
    if has_peft_layers(model):  # a PeftModel, a loaded adapter, or a base model with injected LoRA layers
        raise TypeError("This is a PEFT model: merge the adapters first with mst_hf.merge_lora_sparse(peft_model, "
                        "masks), then save or push the merged model.")
    return model


def save_sparse(model, path, masks=None) -> str:
    """Write ``model``'s weights in the compact format; returns the file's path.

    ``path``: a directory (gets ``mst_sparse.safetensors`` and the model's ``config.json``) or a file ending in
    ``.safetensors``. ``masks`` (MaskState, trainer, controller, dict or saved masks path): the matrices to store
    sparse, with exactly these masks (an active weight that is 0.0 stays stored); their pruned weights must be
    ``+0.0`` (true after MST training). ``masks=None``: every float matrix whose non-``+0.0`` entries fit in fewer
    bytes is stored sparse, the rest dense. Either way the file reloads bit-exactly."""
    model = _plain_model(model)
    masks = as_mask_dict(masks)
    path = str(path)
    if path.endswith(".safetensors"):
        file = path
        os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)
        file = os.path.join(path, SPARSE_NAME)
        if hasattr(model, "config") and hasattr(model.config, "save_pretrained"):
            model.config.save_pretrained(path)
    return write_sparse_file(file, model.state_dict(), masks)


def load_sparse(path, model=None, *, allow_unverified: bool = False, **from_config_kwargs):
    """Load a compact file into ``model`` (in place, bit-exactly; returns it), or, with ``model=None``, into a new
    ``AutoModelForCausalLM`` built from the ``config.json`` beside the file in the saved dtype
    (``from_config_kwargs`` such as ``attn_implementation`` are passed on). Names, shapes and dtypes are checked
    before any weight is written. The aliases of a first-release file (format version 1, outside its digest) are
    used only for names the model ties the same way; ``allow_unverified=True`` uses them as they are."""
    file = sparse_file(path)
    dense, _, aliases, verified = read_compact(file)
    if model is None:
        from transformers import AutoConfig, AutoModelForCausalLM

        directory = os.path.dirname(os.path.abspath(file))
        if not os.path.isfile(os.path.join(directory, "config.json")):
            raise ValueError(f"No config.json next to {file!r} to build the model from: pass `model=` (a model of "
                             "the same architecture).")
        floats = [t.dtype for t in dense.values() if t.is_floating_point()]
        from_config_kwargs.setdefault("dtype", max(set(floats), key=floats.count) if floats else None)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory), **from_config_kwargs)
    target = _plain_model(model).state_dict()
    check_shapes({n: tuple(t.shape) for n, t in dense.items()}, target, f"Compact file {file!r}")
    untied = sorted(a for a, n in aliases.items() if target[a].data_ptr() != target[n].data_ptr())
    if untied and not verified and not allow_unverified:
        raise ValueError(unverified_aliases(file, aliases, f", and this {type(model).__name__} has them not tied "
                                            f"({untied[:3]}), so the file alone would decide what they load"))
    for name, t in dense.items():
        if target[name].dtype != t.dtype:
            raise ValueError(
                f"`{name}` is {t.dtype} in {file!r} but {target[name].dtype} in the model. Build the model with the "
                f"saved dtype (e.g. model.to({t.dtype})) or pass model=None."
            )
    for alias, name in shared_names(target).items():  # tied in the model: the file must hold one tensor for both
        tied_in_file = aliases.get(alias) == name or aliases.get(name) == alias
        same = torch.equal(*(dense[n].reshape(-1).view(torch.uint8) for n in (alias, name)))  # bit for bit
        if not tied_in_file and not same:
            raise ValueError(
                f"`{alias}` and `{name}` are one tensor in this {type(model).__name__} (tied) but two different "
                f"tensors in {file!r}: loading would keep only one of them. Build the model untied, as it was saved "
                "(e.g. AutoModelForCausalLM.from_config(config, tie_word_embeddings=False)), or pass model=None to "
                "build it from the saved config.json."
            )
    with torch.no_grad():
        for name, t in dense.items():
            if name not in aliases:
                target[name].copy_(t)
        for alias, name in aliases.items():  # untied in this model: copy the shared tensor to both names
            if target[alias].data_ptr() != target[name].data_ptr():
                target[alias].copy_(dense[name])
    return model


# ------------------------------------------------------------------------------------------------ model card
def collect_metrics(log_history: list[dict] | None, controller=None) -> dict:
    """The latest ``mst/flop_reduction``, FLOP totals and ``eval_loss`` of a Trainer's log history (the controller's
    FLOP meter, when it has one, wins for the FLOP values). An incomplete FLOP count (steps closed with no batch
    counted: a NaN reduction) gives ``mst/uncounted_steps`` instead of a reduction."""
    metrics = {}
    for entry in log_history or []:
        for key in ("mst/flop_reduction", "mst/total_flops", "mst/dense_total_flops", "eval_loss"):
            if key in entry:
                metrics[key] = entry[key]
    flops = getattr(controller, "flops", None)
    if flops is not None and getattr(flops, "total_flops", 0):
        metrics.update({"mst/flop_reduction": float(flops.flop_reduction), "mst/total_flops": float(flops.total_flops),
                        "mst/dense_total_flops": float(flops.dense_total_flops)})
    uncounted = getattr(flops, "uncounted_steps", 0)
    if uncounted or not math.isfinite(metrics.get("mst/flop_reduction", 1.0)):
        metrics.pop("mst/flop_reduction", None)
        metrics["mst/uncounted_steps"] = uncounted
    return metrics


def controller_card_info(controller, step: int | None, total_steps: int | None, metrics: dict | None = None,
                         weights_from=None) -> dict:
    """The dict :func:`model_card_section` reads, from a live controller. ``weights_from``: the checkpoint whose
    weights it holds (``load_best_model_at_end``): its step, phase, attention state and metrics, not ``step``'s."""
    info = controller.config.mst_dict() if isinstance(controller.config, MSTConfig) else {}
    if weights_from is not None:
        info.update(weights_info(weights_from, step), metrics=dict(weights_from.state.get("metrics") or {}))
    else:
        info.update(saved_phase(step, total_steps, controller.config), metrics=dict(metrics or {}))
    info.update(sparsity=controller.masks.sparsity())
    return info


def _refuse_card_value(field: str, value, expected: str):
    raise ValueError(f"Model card: `{field}` is {value!r}, expected {expected}. Fix or remove it where it comes from "
                     f"(the info passed, or mst_config.json / mst_state.json of the saved folder).")


def _card_number(values: dict, key: str, integer: bool = False, finite: bool = False, where: str = ""):
    """``values[key]`` (``None`` when absent), checked to be a number (an int >= 0 with ``integer``; finite with
    ``finite``) before the card formats it."""
    value = values.get(key)
    ok = value is None or (isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
                           and (not integer or value >= 0) and (not finite or math.isfinite(value)))
    if not ok:
        field = f"{where}[{key!r}]" if where else key
        _refuse_card_value(field, value, "an integer >= 0" if integer else "a finite number" if finite else "a number")
    return value


def _cell(text: str) -> str:
    """``text`` kept on one Markdown line and inside one table cell: line breaks as spaces, ``|`` escaped, ``<`` as
    ``&lt;`` (so no value can hold the card's section markers)."""
    return " ".join(text.splitlines()).replace("|", "\\|").replace("<", "&lt;")


def _code_cell(field: str, value) -> str:
    """``value`` as JSON in a code span that nothing in it can end (a longer backtick fence), inside one table cell;
    ``<`` written as the JSON escape ``\\u003c`` (a code span shows ``&lt;`` as is)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError) as err:
        _refuse_card_value(field, value, f"a value JSON can write ({err})")
    text = _cell(text.replace("<", "\\u003c"))
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def model_card_section(info: dict) -> str:
    """Markdown recording an MST model: schedule, final sparsity, counted FLOP reduction, perplexity.

    ``info``: the :class:`MSTConfig` fields plus optional ``saved_at_step``, ``total_steps``, ``saved_in_phase``,
    ``sparsity`` and ``metrics`` (``mst/flop_reduction``, ``eval_loss``), as in ``mst_config.json`` +
    ``mst_state.json``."""
    metrics = info.get("metrics") or {}
    if not isinstance(metrics, dict):
        _refuse_card_value("metrics", metrics, "an object of logged values")
    sparsity, step, total = (_card_number(info, k, integer=k != "sparsity", finite=True)
                             for k in ("sparsity", "saved_at_step", "total_steps"))
    reduction = _card_number(metrics, "mst/flop_reduction", finite=True, where="metrics")
    eval_loss = _card_number(metrics, "eval_loss", where="metrics")
    rows = []
    if sparsity is not None:
        rows.append(("Final global sparsity of the sparsified weights", f"{100 * sparsity:.2f}%"))
    if step is not None:
        of = f" of {total}" if total else ""
        phase = f" (phase: {_cell(str(info['saved_in_phase']))})" if info.get("saved_in_phase") else ""
        rows.append(("Saved after optimizer step", f"{step}{of}{phase}"))
    trained_to = _card_number(info, "trained_to_step", integer=True, finite=True)
    if trained_to is not None and trained_to != step:
        rows.append(("Weights from", f"the best checkpoint, step {step} (`load_best_model_at_end`); training ran on "
                     f"to step {trained_to}, and every row here describes the step the weights come from"))
    if info.get("hsa_active") is not None:
        rows.append(("Sparse attention pattern at save", "on: the model was trained with it up to this step; load it "
                     "with `attn_implementation=\"mst_hsa\"` (after `import mst_hf`) to evaluate it as trained"
                     if info["hsa_active"] else "off (dense causal)"))
    if reduction is not None:
        rows.append(("Counted training FLOP reduction vs. dense",
                     f"{reduction:.3f}x (counted matmul FLOPs, not a measured time)"))
    elif metrics.get("mst/uncounted_steps"):
        missing = _card_number(metrics, "mst/uncounted_steps", integer=True, finite=True, where="metrics")
        rows.append(("Counted training FLOP reduction vs. dense", f"not known: {missing} optimizer step(s) ran "
                     "without their tokens counted"))
    if eval_loss is not None and math.isfinite(eval_loss):
        perplexity = math.exp(eval_loss) if eval_loss < 709.0 else math.inf  # exp overflows past ~709.78
        rows.append(("Perplexity (exp of eval loss)", f"{perplexity:.4g}"))
    fields = [k for k in sorted(info) if k in MSTConfig.__dataclass_fields__ and k != "model_type"
              and k not in ("saved_at_step", "total_steps", "saved_in_phase", "hsa_active", "sparsity", "metrics",
                            "trained_to_step")]
    lines = [
        CARD_START,
        "## Mixed Sparsity Training",
        "",
        "Trained with Mixed Sparsity Training (MST, Hu et al., arXiv:2408.11746) using `mst_hf`. Pruned weights are "
        "stored as exact zeros, so `AutoModelForCausalLM.from_pretrained` loads this model without `mst_hf`; "
        f"`{MASKS_NAME}` holds the masks (bit-packed) and `{MST_CONFIG_NAME}` the schedule; "
        "`mst_hf.load_masks(model, path)` reattaches the masks (to continue training or fine-tune with LoRA).",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
    ]
    if fields:
        lines += ["", "### Schedule (`MSTConfig`)", "", "| field | value |", "|---|---|"]
        lines += [f"| `{k}` | {_code_cell(k, info[k])} |" for k in fields]
    lines += [CARD_END, ""]
    return "\n".join(lines)


def write_model_card(directory: str, info: dict, title: str | None = None) -> str:
    """Put the MST section into ``directory/README.md`` (replacing an earlier one; creating the card if needed) and
    make sure its metadata carries the tags ``mst`` and ``sparse``. Returns the card's path."""
    path = os.path.join(directory, "README.md")
    fix = "Fix its YAML metadata block (between the `---` lines: e.g. `tags` a list of strings) or remove the file."
    if os.path.lexists(path):
        check_regular_file(path, "Model card", "Remove it; a new card is then written.")
        try:
            card = ModelCard.load(path)
        except Exception as err:  # yaml, huggingface_hub or type errors of a hand-edited card
            raise ValueError(f"Model card {path!r} cannot be read ({type(err).__name__}: {err}). {fix}") from err
    else:
        data = ModelCardData(library_name="transformers", tags=list(MST_TAGS))
        title = _cell(str(title or os.path.basename(os.path.normpath(directory))))
        card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {title}\n")
    tags = [card.data.tags] if isinstance(card.data.tags, str) else card.data.tags or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ValueError(f"Model card {path!r}: metadata `tags` is {tags!r}, expected a list of strings. {fix}")
    card.data.tags = tags + [t for t in MST_TAGS if t not in tags]
    text = card.text
    if CARD_START in text and CARD_END in text:
        text = text[: text.index(CARD_START)] + text[text.index(CARD_END) + len(CARD_END):].lstrip("\n")
    if info.get("lr_schedule") in LR_SCHEDULES:  # Trainer's hyperparameter list names the scheduler MST replaced
        named = rf"- lr_scheduler_type: {info['lr_schedule']} (MSTConfig.lr_schedule, in place of the Trainer's \1)"
        text = re.sub(r"^- lr_scheduler_type: ((?!.*MSTConfig\.lr_schedule).*)$", named, text, flags=re.M)
    card.text = text.rstrip("\n") + "\n\n" + model_card_section(info)
    card.save(path)
    return path


# ------------------------------------------------------------------------------------------------ push
def _prepare_model_dir(model, directory: str, masks, mst_config, metrics, compact: bool) -> None:
    model = _plain_model(model)
    model.save_pretrained(directory)
    mask_dict = as_mask_dict(masks)
    if mask_dict is None:  # the pruned positions: every zero of the MST targets
        cfg = mst_config if mst_config is not None else MSTConfig()
        targets = find_targets(model, cfg)
        state = MaskState({n: t.param for n, t in targets.items()},
                          {n: t.param.detach() != 0 for n, t in targets.items()})
    else:
        params = dict(model.named_parameters())
        check_shapes({n: tuple(m.shape) for n, m in mask_dict.items()}, params, "`masks`", exact=False)
        state = MaskState({n: params[n] for n in mask_dict}, mask_dict)
    save_masks(state, directory)
    controller = getattr(masks, "mst", masks)
    if mst_config is None and isinstance(getattr(controller, "config", None), MSTConfig):
        mst_config = controller.config
    info = mst_config.mst_dict() if mst_config is not None else {}
    write_json(os.path.join(directory, MST_CONFIG_NAME), info)
    write_json(os.path.join(directory, STATE_NAME), {"masks_digest": state.digest(), "sparsity": state.sparsity(),
                                                      "metrics": dict(metrics or {})})
    if compact:
        save_sparse(model, os.path.join(directory, SPARSE_NAME), state)


def push_sparse_to_hub(model_or_dir, repo_id: str, *, masks=None, mst_config: MSTConfig | None = None,
                       metrics: dict | None = None, compact: bool = False, token: str | None = None,
                       private: bool | None = None, revision: str | None = None, commit_message: str | None = None,
                       create_pr: bool = False):
    """Upload an MST model to the Hub repo ``repo_id`` (created if needed); returns the commit info.

    ``model_or_dir``: a directory written by ``trainer.save_model()`` (uploaded as is, with its model card section
    written or refreshed; ``checkpoint-*`` folders and temporary files are skipped), or a model, saved into a
    temporary folder with ``mst_masks.safetensors`` (``masks``: MaskState, trainer, controller, dict or path; default:
    the zeros of the MST targets), ``mst_config.json`` (``mst_config``, or the trainer's), ``mst_state.json``
    (``metrics``) and, with ``compact=True``, ``mst_sparse.safetensors``. The card gets the tags ``mst`` and
    ``sparse``."""
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(model_or_dir, (str, os.PathLike)):
            directory = str(model_or_dir)
            if not os.path.isdir(directory):
                raise ValueError(f"`model_or_dir` {directory!r} is not a directory; pass a model or the output of "
                                 "trainer.save_model().")
            if not os.path.isfile(os.path.join(directory, MASKS_NAME)):
                raise ValueError(f"{directory!r} has no {MASKS_NAME}: it was not saved by MSTTrainer. Pass the model "
                                 "itself (with `masks=`) instead.")
            read_mask_file(directory)  # never publish a corrupt mask file
        else:
            directory = tmp
            _prepare_model_dir(model_or_dir, directory, masks, mst_config, metrics, compact)
        write_model_card(directory, read_saved_info(directory), title=repo_id.split("/")[-1])
        api = HfApi(token=token)
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo.repo_id, folder_path=directory, revision=revision, create_pr=create_pr,
                                 commit_message=commit_message or "Upload MST sparse model",
                                 ignore_patterns=list(UPLOAD_IGNORE))
