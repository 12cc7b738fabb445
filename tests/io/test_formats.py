"""The two file formats: files laid out by hand exactly as the first release wrote them still load; the one digest
is the SHA-256 the files store."""

import hashlib

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mst_hf
from mst_hf.io import formats

from ..helpers import tiny_gpt2

NAMES = [f"transformer.h.{i}.{m}.weight" for i in range(2)
         for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def hand_masks(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    return {n: torch.rand(params[n].shape, generator=g) < 0.3 for n in NAMES}


def sha256_of(entries):
    """name, then raw bytes, in name order: the digest the first release stored (computed here without mst_hf)."""
    h = hashlib.sha256()
    for name in sorted(entries):
        h.update(name.encode())
        h.update(entries[name])
    return h.hexdigest()


def write_v1_mask_file(path, masks):
    tensors, payload = {}, {}
    for name, mask in masks.items():
        bits = np.packbits(mask.flatten().numpy().astype(np.uint8), bitorder="little")
        tensors[name] = torch.from_numpy(bits)
        tensors[name + ".__shape__"] = torch.tensor(list(mask.shape), dtype=torch.int64)
        payload[name] = bits.tobytes()
    save_file(tensors, str(path), metadata={"format": "mst_hf", "version": "1", "digest": sha256_of(payload)})
    return sha256_of(payload)


def test_a_mask_file_laid_out_by_the_first_release_loads(tmp_path):
    model = tiny_gpt2()
    masks = hand_masks(model)
    digest = write_v1_mask_file(tmp_path / "mst_masks.safetensors", masks)
    loaded = mst_hf.load_masks(model, str(tmp_path), apply=False)
    assert all(torch.equal(loaded.masks[n], masks[n]) for n in NAMES)
    assert loaded.digest() == digest  # MaskState.digest is the digest the file stores


TIED = '{"lm_head.weight": "transformer.wte.weight"}'


def write_v1_compact_file(path, model, masks, aliases=TIED, skip=("lm_head.weight",)):
    """A compact file as the first release wrote it (its digest covers the tensors, not the metadata): the names in
    ``skip`` are not stored, ``aliases`` is the metadata text. Returns the model's state dict."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in masks:
                p.mul_(masks[name]).add_(0.0)
    state = model.state_dict()
    tensors = {}
    for name, t in state.items():
        if name in skip:  # an alias: not stored
            continue
        if name in masks:
            tensors[name + ":values"] = t[masks[name]].contiguous()
            bits = np.packbits(masks[name].flatten().numpy().astype(np.uint8), bitorder="little")
            tensors[name + ":mask"] = torch.from_numpy(bits)
            tensors[name + ":shape"] = torch.tensor(list(t.shape), dtype=torch.int64)
        else:
            tensors[name] = t.contiguous()
    digest = sha256_of({k: v.numpy().tobytes() for k, v in tensors.items()})
    metadata = {"format": "mst_hf_sparse", "version": "1", "aliases": aliases, "masks": "given", "digest": digest}
    save_file(tensors, str(path), metadata=metadata)
    return state


def test_a_compact_file_laid_out_by_the_first_release_loads(tmp_path):
    model = tiny_gpt2()
    masks = hand_masks(model)
    state = write_v1_compact_file(tmp_path / "m.safetensors", model, masks)  # lm_head tied to wte: an alias

    fresh = mst_hf.load_sparse(str(tmp_path / "m.safetensors"), tiny_gpt2(seed=5))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    reread = mst_hf.load_masks(tiny_gpt2(), str(tmp_path / "m.safetensors"), apply=False)
    assert all(torch.equal(reread.masks[n], masks[n]) for n in NAMES)


def test_the_one_digest_is_sha256_of_names_and_bytes():
    tensors = {"b": torch.arange(5, dtype=torch.int16), "a": torch.tensor([1.5, -0.0]).to(torch.bfloat16)}
    expected = sha256_of({k: v.view(torch.uint8).numpy().tobytes() for k, v in tensors.items()})
    assert mst_hf.masks.tensor_digest(tensors) == expected


def test_a_mask_file_with_too_few_bytes_is_refused_by_name(tmp_path):
    model = tiny_gpt2()
    masks = hand_masks(model)
    write_v1_mask_file(tmp_path / "mst_masks.safetensors", masks)
    state = formats.read_mask_file(str(tmp_path))
    state[NAMES[0]] = state[NAMES[0]][:-1]
    save_file(state, str(tmp_path / "mst_masks.safetensors"), metadata={"format": "mst_hf", "version": "1"})
    with pytest.raises(ValueError, match=r"mst_masks.safetensors.*c_attn.weight.*malformed"):
        formats.read_mask_file(str(tmp_path))


# ---------------------------------------------------------------------------------------------- what is refused
def rewrite(path, tensors=None, **metadata):
    """Rewrite a safetensors file by hand: its tensors (or ``tensors``), metadata replaced (``None`` drops a key)."""
    with safe_open(str(path), framework="pt") as f:
        old, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    meta.update(metadata)
    meta = {k: v for k, v in meta.items() if v is not None}
    save_file(old if tensors is None else tensors, str(path), metadata=meta)


def test_a_mask_file_without_its_digest_is_refused_unless_asked_for(tmp_path):
    """64 pruned positions switched on by hand and the digest dropped: refused, naming the file and the opt-in."""
    model = tiny_gpt2()
    masks = hand_masks(model)
    formats.save_masks(mst_hf.MaskState({n: p for n, p in model.named_parameters() if n in masks}, masks), tmp_path)
    edited = masks[NAMES[0]].clone()
    edited.view(-1)[(~edited).view(-1).nonzero()[:64, 0]] = True
    packed = formats.read_mask_file(str(tmp_path))
    packed[NAMES[0]] = mst_hf.masks.pack_mask(edited)
    rewrite(tmp_path / formats.MASKS_NAME, packed, digest=None)
    with pytest.raises(ValueError, match=r"mst_masks\.safetensors.*no `digest`.*allow_unverified=True"):
        mst_hf.load_masks(tiny_gpt2(), str(tmp_path))
    loaded = mst_hf.load_masks(tiny_gpt2(), str(tmp_path), allow_unverified=True)  # asked for: read as it is
    assert torch.equal(loaded.masks[NAMES[0]], edited)


def test_an_edited_alias_of_a_compact_file_is_refused(tmp_path):
    """The aliases decide which tensor a name gets: an edit that would load the token embedding into an untied LM
    head breaks the digest."""
    untied = tiny_gpt2(seed=2, tie_word_embeddings=False)
    mst_hf.save_sparse(untied, str(tmp_path))
    rewrite(tmp_path / formats.SPARSE_NAME, aliases=TIED)
    with pytest.raises(ValueError, match=r"mst_sparse\.safetensors.*digest"):
        mst_hf.load_sparse(str(tmp_path))


def test_a_first_release_alias_is_read_only_for_a_model_that_ties_the_same_names(tmp_path):
    """A first-release file's aliases are outside its digest: a model that does not tie them is refused (the file
    would decide which tensor its LM head gets) unless asked for."""
    model = tiny_gpt2(seed=2, tie_word_embeddings=False)
    write_v1_compact_file(tmp_path / "m.safetensors", model, hand_masks(model))
    with pytest.raises(ValueError, match=r"m\.safetensors.*`aliases`.*not tied.*allow_unverified=True"):
        mst_hf.load_sparse(str(tmp_path / "m.safetensors"), tiny_gpt2(seed=3, tie_word_embeddings=False))
    loaded = mst_hf.load_sparse(str(tmp_path / "m.safetensors"), tiny_gpt2(seed=3, tie_word_embeddings=False),
                                allow_unverified=True)
    assert torch.equal(loaded.lm_head.weight, model.transformer.wte.weight)


MALFORMED_ALIASES = {
    "not JSON": '{"lm_head.weight": ',
    "a list": '["lm_head.weight"]',
    "a number as target": '{"lm_head.weight": 5}',
    "an unknown target": '{"lm_head.weight": "transformer.nope.weight"}',
    "a cycle": '{"lm_head.weight": "transformer.x.weight", "transformer.x.weight": "lm_head.weight"}',
    "an alias over a stored tensor": '{"transformer.wpe.weight": "transformer.wte.weight"}',
}


@pytest.mark.parametrize("case", list(MALFORMED_ALIASES))
def test_malformed_aliases_are_refused_naming_file_key_and_value(case, tmp_path):
    model = tiny_gpt2()
    write_v1_compact_file(tmp_path / "m.safetensors", model, hand_masks(model), aliases=MALFORMED_ALIASES[case])
    with pytest.raises(ValueError, match=r"m\.safetensors.*`aliases`.*save it again"):
        formats.read_sparse(str(tmp_path / "m.safetensors"))


# ---------------------------------------------------------------------------------------------- reproducible bytes
def test_the_same_masks_and_weights_give_the_same_bytes(tmp_path):
    """safetensors writes its metadata in hash-map order (it changes from one call to the next); the files must not.
    """
    model = tiny_gpt2()
    masks = hand_masks(model)
    state = mst_hf.MaskState({n: p for n, p in model.named_parameters() if n in masks}, masks)
    state.apply_to_weights()
    mask_bytes = {formats.save_masks(state, str(tmp_path / f"m{i}")) and
                  (tmp_path / f"m{i}" / formats.MASKS_NAME).read_bytes() for i in range(8)}
    sparse_bytes = {open(mst_hf.save_sparse(model, str(tmp_path / f"s{i}.safetensors"), masks=masks), "rb").read()
                    for i in range(8)}
    assert len(mask_bytes) == 1 and len(sparse_bytes) == 1
    assert formats.read_mask_file(str(tmp_path / "m0"))[NAMES[0]].numel() > 0  # still a valid file
