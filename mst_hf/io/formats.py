"""The two MST file formats: how they are written, read and validated (files only, no model).

**Mask file** (``mst_masks.safetensors``, :func:`save_masks` / :func:`read_mask_file`). For each target parameter
``name``: the mask bits packed 8 per byte (uint8, :func:`mst_hf.masks.pack_mask`) under ``name`` and the shape
(int64) under ``name.__shape__``; metadata ``format="mst_hf"``, ``version="1"`` and ``digest``, the SHA-256 of the
names and packed masks (:func:`mst_hf.masks.tensor_digest`, equal to :meth:`MaskState.digest`). The shapes are not in
the digest: every reader checks them against the model (a shape that differs from the parameter's is refused). A
mask file without ``digest`` is refused unless the reader passes ``allow_unverified=True``.

**Compact file** (``mst_sparse.safetensors``, :func:`write_sparse_file` / :func:`read_sparse`). For each sparse
matrix ``name``: its non-zeros in row-major order under ``name:values`` (original dtype), its bitmask packed 8 per
byte under ``name:mask`` and its shape under ``name:shape``; every other tensor as is under ``name``. A tensor shared
by several names (a tied LM head) is stored once and the other names listed in the metadata's ``aliases`` (JSON).
Size per sparse matrix: ``density * numel * itemsize + numel / 8`` bytes instead of ``numel * itemsize``. Values are
copied bit for bit (``-0.0`` and active weights that are exactly ``0.0`` included) and pruned positions come back as
``+0.0``, which is what :meth:`MaskState.apply_to_weights` leaves there. Metadata: ``format="mst_hf_sparse"``,
``version="2"``, ``aliases``, ``masks`` (``"given"`` or ``"nonzero"``) and ``digest`` (:func:`sparse_digest`: the
SHA-256 of the :func:`tensor_digest` of every tensor and of every other metadata entry, so an edited alias or version
is caught). Version 1 files (the first release: a digest of the tensors only) are still read; their ``aliases``,
outside that digest, are used only where the model ties the same names, or with ``allow_unverified=True``.

Every file is written atomically with a reproducible header (:mod:`mst_hf.io.files`). Reading refuses
(``ValueError`` naming the file) unreadable, truncated, foreign or malformed files, files whose bytes no longer match
their digest, and paths that are not regular files (a FIFO would block the reader forever). A digest detects damage
and hand edits; it is not a signature: anyone can write a file with a matching digest, so load files from people you
trust.
"""

import hashlib
import json
import os

import torch
from transformers.utils import logging

from ..masks import SHAPE_SUFFIX, MaskState, check_shapes, pack_mask, tensor_digest, unpack_mask
from .files import file_format, read_safetensors, write_safetensors

MASKS_NAME = "mst_masks.safetensors"
STATE_NAME = "mst_state.json"
SPARSE_NAME = "mst_sparse.safetensors"
MASKS_FORMAT, FORMAT_VERSION = "mst_hf", "1"
SPARSE_FORMAT, SPARSE_VERSION = "mst_hf_sparse", "2"  # "1": digest of the tensors only (still read)
logger = logging.get_logger(__name__)
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ------------------------------------------------------------------------------------------------ mask file
def packed_shapes(packed: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of a packed mask state dict (the ``name.__shape__`` entries)."""
    return {name[: -len(SHAPE_SUFFIX)]: tuple(int(x) for x in shape.tolist())
            for name, shape in packed.items() if name.endswith(SHAPE_SUFFIX)}


def packed_digest(packed: dict[str, torch.Tensor]) -> str:
    """Digest of a packed mask state dict, equal to :meth:`MaskState.digest` of the masks it holds."""
    return tensor_digest({k: v for k, v in packed.items() if not k.endswith(SHAPE_SUFFIX)})


def mask_tensors(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unpack a packed mask state dict into ``{name: bool tensor}``."""
    return {name: unpack_mask(packed[name], shape) for name, shape in packed_shapes(packed).items()}


def save_masks(masks: MaskState, directory: str, write: bool = True) -> str:
    """Write ``mst_masks.safetensors`` for ``masks`` into ``directory``; returns the file's path. FSDP2-sharded
    masks are gathered into the full masks first (the same file an unsharded run writes): call it on every rank,
    with ``write`` true on the one that writes."""
    path = os.path.join(directory, MASKS_NAME)
    state = masks.state_dict()
    if not write:
        return path
    os.makedirs(directory, exist_ok=True)
    write_safetensors(path, state, {"format": MASKS_FORMAT, "version": FORMAT_VERSION, "digest": packed_digest(state)})
    return path


def read_mask_file(path: str, allow_unverified: bool = False) -> dict[str, torch.Tensor]:
    """Read and check a mask file (or the ``mst_masks.safetensors`` of a directory); returns its packed state dict.

    Refuses (``ValueError``) a file that is unreadable, truncated, not written by mst_hf, malformed, whose bytes no
    longer match the digest stored when it was written, or that has no digest (every mst_hf writer stores one: a
    file without is hand-made or edited, and nothing would catch a mask bit switched on). ``allow_unverified=True``
    reads a file without digest as it is, with a warning. Nothing is modified."""
    path = os.path.join(path, MASKS_NAME) if os.path.isdir(path) else str(path)
    if not os.path.lexists(path):
        raise FileNotFoundError(
            f"No MST mask file at {path!r}. Pass a directory or checkpoint written by MSTTrainer (it holds "
            f"{MASKS_NAME}) or the path of such a file."
        )
    state, metadata = read_safetensors(path, "MST mask file", "Resume from an earlier checkpoint, or save the "
                                        "masks again.")
    if metadata.get("format") != MASKS_FORMAT:
        raise ValueError(
            f"{path!r} is not an mst_hf mask file (metadata format={metadata.get('format')!r}, expected "
            f"{MASKS_FORMAT!r}). Pass the {MASKS_NAME} written by MSTTrainer or mst_hf.save_masks."
        )
    for name in (k for k in state if not k.endswith(SHAPE_SUFFIX)):
        shape = state.get(name + SHAPE_SUFFIX)
        if shape is None or shape.dtype != torch.int64 or shape.ndim != 1 or bool((shape < 0).any()):
            raise ValueError(f"MST mask file {path!r}: mask `{name}` has no valid int64 shape entry `{name}"
                             f"{SHAPE_SUFFIX}`; the file is malformed. Save the masks again.")
        bits, numel = state[name], int(torch.prod(shape).item())
        if bits.dtype != torch.uint8 or bits.ndim != 1 or bits.numel() != (numel + 7) // 8:
            raise ValueError(f"MST mask file {path!r}: mask `{name}` is {bits.dtype} of shape {tuple(bits.shape)}, "
                             f"expected {(numel + 7) // 8} packed uint8 bytes for shape {tuple(shape.tolist())}; the "
                             "file is malformed. Save the masks again.")
    orphans = sorted(k for k in state if k.endswith(SHAPE_SUFFIX) and k[: -len(SHAPE_SUFFIX)] not in state)
    if orphans:
        raise ValueError(f"MST mask file {path!r} has shape entries without masks: {orphans[:5]}. Save it again.")
    if "digest" not in metadata:
        if not allow_unverified:
            raise ValueError(
                f"MST mask file {path!r} has no `digest` in its metadata, so nothing shows whether its masks were "
                "edited (mst_hf always stores one). Save the masks again from the model they belong to "
                "(mst_hf.save_masks), or, if you trust the file, read it as it is with allow_unverified=True."
            )
        logger.warning("MST mask file %r has no digest; read unverified (allow_unverified=True).", path)
    elif packed_digest(state) != metadata["digest"]:
        raise ValueError(
            f"MST mask file {path!r} is corrupt: its bytes no longer match the digest stored when it was written. "
            "Resume from an earlier checkpoint, or save the masks again."
        )
    return state


# ------------------------------------------------------------------------------------------------ compact file
def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as integers: ``!= 0`` exactly where the value is not ``+0.0`` (``-0.0`` included)."""
    return t.contiguous().view(_INT_VIEW[t.element_size()])


def shared_names(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{alias: first name}`` for the entries of ``state`` that are the same tensor as an earlier one (tied)."""
    first, aliases = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in first and t.numel() > 0:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def write_sparse_file(file: str, state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None) -> str:
    """Write a model state dict in the compact format; returns ``file``.

    ``masks`` (``{name: bool tensor}``): the matrices to store sparse, with exactly these masks (an active weight
    that is 0.0 stays stored); their pruned values must be ``+0.0``. ``masks=None``: every float matrix whose
    non-``+0.0`` entries fit in fewer bytes is stored sparse, the rest dense. Either way the file reloads bit-exactly.
    """
    aliases = shared_names(state)
    if masks is not None:
        masks = {aliases.get(n, n): m for n, m in masks.items()}
        check_shapes({n: tuple(m.shape) for n, m in masks.items()}, state, "`masks`", exact=False)
    tensors = {}
    for name in (n for n in state if n not in aliases):
        t = state[name].detach().cpu().contiguous()
        mask = masks.get(name) if masks is not None else None
        if mask is not None:
            n_bad = int(((_bits(t) != 0) & ~mask).sum())
            if n_bad:
                raise ValueError(
                    f"`{name}` holds {n_bad} values other than +0.0 where its mask prunes: storing it sparse would "
                    "lose them. Zero the pruned weights first (MaskState.apply_to_weights) or pass masks=None."
                )
        elif masks is None and t.is_floating_point() and t.ndim >= 2:
            nonzero = _bits(t) != 0
            if int(nonzero.sum()) * t.element_size() + (t.numel() + 7) // 8 < t.numel() * t.element_size():
                mask = nonzero
        if mask is None:
            tensors[name] = t
        else:
            tensors[name + ":values"] = t[mask]
            tensors[name + ":mask"] = pack_mask(mask)
            tensors[name + ":shape"] = torch.tensor(list(t.shape), dtype=torch.int64)
    metadata = {"format": SPARSE_FORMAT, "version": SPARSE_VERSION, "aliases": json.dumps(aliases),
                "masks": "given" if masks is not None else "nonzero"}
    metadata["digest"] = sparse_digest(tensors, metadata)
    write_safetensors(file, tensors, metadata)
    return file


def sparse_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """The digest a version 2 compact file stores: SHA-256 of the :func:`tensor_digest` of its tensors, then of its
    metadata but ``digest`` itself as sorted compact JSON. Names, shapes, values, aliases and version all count."""
    entries = {k: v for k, v in metadata.items() if k != "digest"}
    h = hashlib.sha256(tensor_digest(tensors).encode())
    h.update(json.dumps(entries, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())
    return h.hexdigest()


def sparse_file(path) -> str:
    """The compact file of ``path`` (a directory: its ``mst_sparse.safetensors``)."""
    path = str(path)
    return os.path.join(path, SPARSE_NAME) if os.path.isdir(path) else path


def _check_aliases(file: str, text: str, stored: set[str]) -> dict[str, str]:
    """The ``aliases`` metadata as ``{alias: stored name}``; ``ValueError`` naming the file, the key, the value and
    the fix when it is not a JSON object of strings, names a tensor the file does not store, chains aliases (a cycle
    included) or would replace a stored tensor."""
    def refuse(problem):
        raise ValueError(f"Compact MST file {file!r}: metadata `aliases` is {text[:200]!r}: {problem}. The file is "
                         "malformed or was edited: save it again from the model (mst_hf.save_sparse).")

    try:
        aliases = json.loads(text)
    except json.JSONDecodeError as err:
        refuse(f"not JSON ({err})")
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        refuse("expected a JSON object {alias: stored tensor name} of strings")
    for alias, name in aliases.items():
        if alias in stored:
            refuse(f"the alias `{alias}` is also a stored tensor, which the alias would replace")
        if name in aliases:
            refuse(f"`{alias}` points at `{name}`, itself an alias (a chain or a cycle)")
        if name not in stored:
            refuse(f"`{alias}` points at `{name}`, which the file does not store")
    return aliases


def read_compact(path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str], bool]:
    """:func:`read_sparse` without the refusal of unverified aliases; the last item says whether the digest covers
    the aliases (version 2, or no aliases)."""
    file = sparse_file(path)
    if not os.path.lexists(file):
        raise FileNotFoundError(f"No compact MST file at {file!r}; write one with mst_hf.save_sparse(model, path).")
    tensors, metadata = read_safetensors(file, "Compact MST file", "Save it again from the model.")
    if metadata.get("format") != SPARSE_FORMAT:
        raise ValueError(f"{file!r} is not a compact mst_hf file (metadata format={metadata.get('format')!r}); "
                         "write it with mst_hf.save_sparse.")
    version = metadata.get("version")
    if version not in ("1", SPARSE_VERSION):
        raise ValueError(f"Compact MST file {file!r} has format version {version!r}; this mst_hf reads versions 1 "
                         f"and {SPARSE_VERSION}. Upgrade mst_hf, or save the file again with this one.")
    expected = sparse_digest(tensors, metadata) if version == SPARSE_VERSION else tensor_digest(tensors)
    if expected != metadata.get("digest"):
        raise ValueError(f"Compact MST file {file!r} is corrupt or was edited: its bytes or metadata do not match the "
                         "digest stored when it was written. Save it again from the model.")
    dense, masks = {}, {}
    for key, t in tensors.items():
        if key.endswith(":values"):
            name = key[: -len(":values")]
            shape, bits = tensors.get(name + ":shape"), tensors.get(name + ":mask")
            if shape is None or bits is None or shape.dtype != torch.int64 or shape.ndim != 1 or (shape < 0).any():
                raise ValueError(f"Compact MST file {file!r}: `{name}` has no valid `{name}:mask` and int64 "
                                 f"`{name}:shape` entries; the file is malformed. Save it again from the model.")
            shape = tuple(int(x) for x in shape.tolist())
            mask = unpack_mask(bits, shape)
            if int(mask.sum()) != t.numel():
                raise ValueError(f"Compact MST file {file!r}: `{name}` has {t.numel()} values for {int(mask.sum())} "
                                 "mask positions; the file is malformed.")
            full = torch.zeros(shape, dtype=t.dtype)
            full[mask] = t
            dense[name], masks[name] = full, mask
        elif not key.endswith((":mask", ":shape")):
            dense[key] = t
    aliases = _check_aliases(file, metadata.get("aliases", "{}"), set(dense))
    for alias, name in aliases.items():
        dense[alias] = dense[name]
    return dense, masks, aliases, version == SPARSE_VERSION or not aliases


def unverified_aliases(file: str, aliases: dict[str, str], tied: str = "") -> str:
    """The message refusing the aliases of a version 1 file (outside its digest); ``tied``: what the model ties."""
    return (f"Compact MST file {file!r} was written by the first release (format version 1), whose digest does not "
            f"cover its metadata: its `aliases` {aliases} decide which stored tensor those names get and cannot be "
            f"checked{tied}. Load it into a model that ties the same names (mst_hf.load_sparse(path, model)), or, "
            "if you trust the file, pass allow_unverified=True; then save it again with mst_hf.save_sparse (format "
            f"version {SPARSE_VERSION}, aliases inside the digest).")


def read_sparse(path, allow_unverified: bool = False):
    """Read a compact file: ``(dense state dict with every alias, {name: bool mask} of the sparse tensors, aliases)``.

    A version 1 file with aliases (outside its digest) is refused unless ``allow_unverified=True``
    (:func:`mst_hf.load_sparse` accepts them for a model that ties the same names)."""
    dense, masks, aliases, verified = read_compact(path)
    if not verified and not allow_unverified:
        raise ValueError(unverified_aliases(sparse_file(path), aliases))
    return dense, masks, aliases


def read_sparse_masks(path) -> dict[str, torch.Tensor]:
    """The masks of a compact file as a packed mask state dict (as in ``mst_masks.safetensors``); the aliases do not
    matter here (only stored tensors have masks)."""
    _, masks, _, _ = read_compact(path)
    out = {}
    for name, mask in masks.items():
        out[name] = pack_mask(mask)
        out[name + SHAPE_SUFFIX] = torch.tensor(list(mask.shape), dtype=torch.int64)
    return out


def read_any_masks(path: str, allow_unverified: bool = False) -> dict[str, torch.Tensor]:
    """Packed masks from a directory, an ``mst_masks.safetensors`` file or a compact ``save_sparse`` file
    (``allow_unverified``: see :func:`read_mask_file`)."""
    path = str(path)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, MASKS_NAME)):
        if os.path.isfile(os.path.join(path, SPARSE_NAME)):
            return read_sparse_masks(os.path.join(path, SPARSE_NAME))
    elif os.path.isfile(path) and file_format(path) == SPARSE_FORMAT:
        return read_sparse_masks(path)
    return read_mask_file(path, allow_unverified)
