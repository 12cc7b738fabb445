"""The two MST file formats: how they are written, read and validated (files only, no model).

**Mask file** (``mst_masks.safetensors``, :func:`save_masks` / :func:`read_mask_file`). For each target parameter
``name``: the mask bits packed 8 per byte (uint8, :func:`mst_hf.masks.pack_mask`) under ``name`` and the shape
(int64) under ``name.__shape__``; metadata ``format="mst_hf"``, ``version="1"`` and ``digest``, the SHA-256 of the
packed masks (:func:`mst_hf.masks.tensor_digest`, equal to :meth:`MaskState.digest`).

**Compact file** (``mst_sparse.safetensors``, :func:`write_sparse_file` / :func:`read_sparse`). For each sparse
matrix ``name``: its non-zeros in row-major order under ``name:values`` (original dtype), its bitmask packed 8 per
byte under ``name:mask`` and its shape under ``name:shape``; every other tensor as is under ``name``. A tensor shared
by several names (a tied LM head) is stored once and the other names listed in the metadata's ``aliases`` (JSON).
Size per sparse matrix: ``density * numel * itemsize + numel / 8`` bytes instead of ``numel * itemsize``. Values are
copied bit for bit (``-0.0`` and active weights that are exactly ``0.0`` included) and pruned positions come back as
``+0.0``, which is what :meth:`MaskState.apply_to_weights` leaves there. Metadata: ``format="mst_hf_sparse"``,
``version="1"``, ``masks`` (``"given"`` or ``"nonzero"``) and ``digest`` (:func:`tensor_digest` of every tensor).

Every file is written under a temporary name and renamed (:func:`atomic_write`), so a process killed mid-write
leaves the previous file or none, never half of one. Reading refuses (``ValueError`` naming the file) unreadable,
truncated, foreign or malformed files and files whose bytes no longer match their digest.
"""

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..masks import SHAPE_SUFFIX, MaskState, check_shapes, pack_mask, tensor_digest, unpack_mask

MASKS_NAME = "mst_masks.safetensors"
STATE_NAME = "mst_state.json"
SPARSE_NAME = "mst_sparse.safetensors"
MASKS_FORMAT, FORMAT_VERSION = "mst_hf", "1"
SPARSE_FORMAT, SPARSE_VERSION = "mst_hf_sparse", "1"
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ------------------------------------------------------------------------------------------------ atomic writes
def atomic_write(path: str, write) -> None:
    """Call ``write(tmp_path)``, then rename ``tmp_path`` to ``path`` (atomic on POSIX)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, data: dict) -> None:
    """Write ``data`` as indented JSON with sorted keys, atomically."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")

    atomic_write(path, write)


def read_json(path: str) -> dict:
    """The JSON object in ``path``; ``ValueError`` naming the file when it is unreadable, truncated or no object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path!r} is corrupt or unreadable ({err}). Resume from an earlier checkpoint.") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path!r} must hold a JSON object, got {type(data).__name__}. Resume from an earlier "
                         "checkpoint.")
    return data


def write_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically, with a canonical header: the same tensors and metadata give the same
    bytes (safetensors itself writes the metadata in hash-map order, which changes from one call to the next)."""

    def write(tmp):
        save_file(tensors, tmp, metadata=metadata)
        _canonical_header(tmp)

    atomic_write(path, write)


def _canonical_header(path: str) -> None:
    """Rewrite a safetensors header in place: ``__metadata__`` first with sorted keys, then the tensor entries in
    data order. Only the order of JSON keys changes, so the header keeps its length and the data its offsets."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        metadata = header.pop("__metadata__", None)
        ordered = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
        ordered.update(sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"], kv[0])))
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > size:  # never seen (same keys, same escaping); keep the file as safetensors wrote it
            return
        f.seek(8)
        f.write(text + b" " * (size - len(text)))


def _read_safetensors(path: str, what: str, fix: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(path, framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, (f.metadata() or {})
    except Exception as err:  # safetensors raises SafetensorError, OSError or RuntimeError on bad bytes
        raise ValueError(f"{what} {path!r} is corrupt, truncated or not a safetensors file ({err}). {fix}") from err


def file_format(path: str) -> str | None:
    """The ``format`` entry of a safetensors file's metadata; ``None`` when there is none or the file is unreadable."""
    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except Exception:  # the reader of the file's own format reports it
        return None


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


def read_mask_file(path: str) -> dict[str, torch.Tensor]:
    """Read and check a mask file (or the ``mst_masks.safetensors`` of a directory); returns its packed state dict.

    Refuses (``ValueError``) a file that is unreadable, truncated, not written by mst_hf, malformed, or whose bytes
    no longer match the digest stored when it was written. Nothing is modified."""
    path = os.path.join(path, MASKS_NAME) if os.path.isdir(path) else str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No MST mask file at {path!r}. Pass a directory or checkpoint written by MSTTrainer (it holds "
            f"{MASKS_NAME}) or the path of such a file."
        )
    state, metadata = _read_safetensors(path, "MST mask file", "Resume from an earlier checkpoint, or save the "
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
    if "digest" in metadata and packed_digest(state) != metadata["digest"]:
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
                "masks": "given" if masks is not None else "nonzero", "digest": tensor_digest(tensors)}
    write_safetensors(file, tensors, metadata)
    return file


def sparse_file(path) -> str:
    """The compact file of ``path`` (a directory: its ``mst_sparse.safetensors``)."""
    path = str(path)
    return os.path.join(path, SPARSE_NAME) if os.path.isdir(path) else path


def read_sparse(path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
    """Read a compact file: ``(dense state dict with every alias, {name: bool mask} of the sparse tensors, aliases)``.
    """
    file = sparse_file(path)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"No compact MST file at {file!r}; write one with mst_hf.save_sparse(model, path).")
    tensors, metadata = _read_safetensors(file, "Compact MST file", "Save it again from the model.")
    if metadata.get("format") != SPARSE_FORMAT:
        raise ValueError(f"{file!r} is not a compact mst_hf file (metadata format={metadata.get('format')!r}); "
                         "write it with mst_hf.save_sparse.")
    if tensor_digest(tensors) != metadata.get("digest"):
        raise ValueError(f"Compact MST file {file!r} is corrupt: its bytes do not match the digest stored when it "
                         "was written. Save it again from the model.")
    dense, masks = {}, {}
    for key, t in tensors.items():
        if key.endswith(":values"):
            name = key[: -len(":values")]
            shape = tuple(int(x) for x in tensors[name + ":shape"].tolist())
            mask = unpack_mask(tensors[name + ":mask"], shape)
            if int(mask.sum()) != t.numel():
                raise ValueError(f"Compact MST file {file!r}: `{name}` has {t.numel()} values for {int(mask.sum())} "
                                 "mask positions; the file is malformed.")
            full = torch.zeros(shape, dtype=t.dtype)
            full[mask] = t
            dense[name], masks[name] = full, mask
        elif not key.endswith((":mask", ":shape")):
            dense[key] = t
    aliases = json.loads(metadata.get("aliases", "{}"))
    for alias, name in aliases.items():
        dense[alias] = dense[name]
    return dense, masks, aliases


def read_sparse_masks(path) -> dict[str, torch.Tensor]:
    """The masks of a compact file as a packed mask state dict (as in ``mst_masks.safetensors``)."""
    _, masks, _ = read_sparse(path)
    out = {}
    for name, mask in masks.items():
        out[name] = pack_mask(mask)
        out[name + SHAPE_SUFFIX] = torch.tensor(list(mask.shape), dtype=torch.int64)
    return out


def read_any_masks(path: str) -> dict[str, torch.Tensor]:
    """Packed masks from a directory, an ``mst_masks.safetensors`` file or a compact ``save_sparse`` file."""
    path = str(path)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, MASKS_NAME)):
        if os.path.isfile(os.path.join(path, SPARSE_NAME)):
            return read_sparse_masks(os.path.join(path, SPARSE_NAME))
    elif os.path.isfile(path) and file_format(path) == SPARSE_FORMAT:
        return read_sparse_masks(path)
    return read_mask_file(path)
