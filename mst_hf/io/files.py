"""Files written and read safely, whatever their format: atomic writes (a temporary name, then a rename),
reproducible safetensors headers, JSON objects, and nothing opened that is not a regular file.

A process killed mid-write leaves the previous file or none, never half of one. A path that is not a regular file (a
FIFO, a device) is refused before it is opened: opening a FIFO blocks until a writer comes, so a crafted folder
could otherwise hang a resume or :func:`mst_hf.last_complete_checkpoint` forever.
"""

import json
import os
import stat

import torch
from safetensors import safe_open
from safetensors.torch import save_file


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


def check_regular_file(path: str, what: str, fix: str) -> None:
    """Refuse (``ValueError``) a path that is not a regular file: a FIFO blocks whoever opens it until a writer
    comes, a device may never end. Checked with ``os.stat`` before anything opens it; ``FileNotFoundError`` when
    there is nothing there."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path!r} does not exist. {fix}") from None
    except OSError as err:
        raise ValueError(f"{what} {path!r} cannot be read ({err}). {fix}") from err
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else "a device or socket"
        raise ValueError(f"{what} {path!r} is not a regular file but {kind}, so it is not read (opening it could "
                         f"block forever). {fix}")


def read_json(path: str) -> dict:
    """The JSON object in ``path``; ``ValueError`` naming the file when it is unreadable, truncated, no object or
    not a regular file (opened without blocking, then checked, so a FIFO never blocks)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(f"{path!r} is not a regular file")
        with os.fdopen(fd, encoding="utf-8") as f:
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


def read_safetensors(path: str, what: str, fix: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    check_regular_file(path, what, fix)
    try:
        with safe_open(path, framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, (f.metadata() or {})
    except Exception as err:  # safetensors raises SafetensorError, OSError or RuntimeError on bad bytes
        raise ValueError(f"{what} {path!r} is corrupt, truncated or not a safetensors file ({err}). {fix}") from err


def file_format(path: str) -> str | None:
    """The ``format`` entry of a safetensors file's metadata; ``None`` when there is none or the file is unreadable."""
    try:
        check_regular_file(path, "File", "")
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except Exception:  # the reader of the file's own format reports it
        return None
