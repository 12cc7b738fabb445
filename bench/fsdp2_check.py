"""MST under FSDP2 on one GPU (an FSDP2 world of size 1 is a real FSDP2 run: DTensor parameters, sharded masks,
all-gather / reduce-scatter through NCCL), in bf16.

    torchrun --nproc_per_node 1 bench/fsdp2_check.py --out $OUT/fsdp2

1. ``masks``: a Llama trained with the custom loop of ``MSTController`` twice, unsharded and under
   ``fully_shard`` (bf16 weights): the masks after every topology update and the final weights must be identical;
   also the time of an update step against a plain step.
2. ``trainer``: peak GPU memory of ``MSTTrainer`` against plain ``Trainer`` under FSDP2 (accelerate's FSDP2
   plugin, ``bf16=True``: fp32 sharded master weights, bf16 compute), same model and steps, and the bytes the
   mask state holds.
3. ``resume``: ``MSTTrainer`` under FSDP2 saved with ``SHARDED_STATE_DICT`` (distributed checkpoint) and resumed
   in a new Trainer: the final masks must equal those of the uninterrupted run; the saved ``mst_masks.safetensors``
   must hold the full masks the run had in memory at that step.

Dense attention throughout (``hsa_pattern="dense"``): the checks are about the weight masks.
Writes ``fsdp2_check.md`` (a table) and ``fsdp2_check.json`` under ``--out``. About one minute on an H200.
``--device cpu`` runs part 1 alone on CPU (gloo), as a smoke test of the script.
"""

import argparse
import json
import os
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

from mst_hf import MSTConfig, MSTController, MSTTrainer, sharding


def llama(hidden: int, layers: int, vocab: int, seed: int = 0, inter: int | None = None):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter or int(2.75 * hidden), num_hidden_layers=layers,
                         num_attention_heads=max(hidden // 64, 1), num_key_value_heads=max(hidden // 128, 1),
                         vocab_size=vocab, max_position_embeddings=1024, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ 1. masks
def custom_loop(model, config: MSTConfig, steps: int, device, seq: int = 256, batch: int = 8) -> dict:
    ctl = MSTController(model, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    masks, times = {}, {"update": [], "plain": []}
    vocab = model.config.vocab_size
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
        ctl.before_forward(step, steps, {"input_ids": ids})
        model(input_ids=ids, labels=ids).loss.backward()
        sync(device)
        start = time.perf_counter()
        record = ctl.after_backward(step, steps, optimizer)
        sync(device)
        elapsed = time.perf_counter() - start
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ctl.after_optimizer_step()
        if step > 0:  # step 0 includes first-call overheads
            times["update" if record is not None else "plain"].append(elapsed)
        if record is not None:
            masks[step] = {n: ctl.masks.full_mask(n).cpu() for n in ctl.masks.masks}
    weights = {n: sharding.full(p.detach()).float().cpu() for n, p in model.named_parameters()}
    zero = all(bool((sharding.local(ctl.masks.params[n].detach())[~m] == 0).all()) for n, m in ctl.masks.masks.items())
    return {"masks": masks, "weights": weights, "times": times, "zero": zero}


def check_masks(device, dtype) -> dict:
    config = MSTConfig(update_interval=4, initial_sparsity=0.5, final_sparsity=0.8, grow_method="mixed", seed=1,
                       hsa_pattern="dense")
    steps, size, seq = (40, (512, 4, 4096), 256) if device.type == "cuda" else (12, (64, 2, 256), 32)  # cpu: smoke
    plain = custom_loop(llama(*size).to(device, dtype), config, steps, device, seq)
    fsdp = custom_loop(shard(llama(*size).to(device, dtype)), config, steps, device, seq)
    same_masks = plain["masks"].keys() == fsdp["masks"].keys() and all(
        torch.equal(plain["masks"][s][n], fsdp["masks"][s][n]) for s in plain["masks"] for n in plain["masks"][s])
    same_weights = all(torch.equal(plain["weights"][n], fsdp["weights"][n]) for n in plain["weights"])
    mean = lambda xs: 1e3 * sum(xs) / max(len(xs), 1)  # noqa: E731
    return {"updates": len(plain["masks"]), "masks_identical": same_masks, "weights_identical": same_weights,
            "pruned_zero_fsdp": fsdp["zero"],
            "after_backward_ms": {"plain": {"update": mean(plain["times"]["update"]),
                                            "other": mean(plain["times"]["plain"])},
                                  "fsdp2": {"update": mean(fsdp["times"]["update"]),
                                            "other": mean(fsdp["times"]["plain"])}}}


# ------------------------------------------------------------------------------------------------ 2./3. Trainer
from mst_step import Tokens  # noqa: E402 (bench/ is the script's folder: synthetic token rows)


def trainer_args(out: str, steps: int, state_dict_type: str = "SHARDED_STATE_DICT", **kw) -> TrainingArguments:
    settings = dict(output_dir=out, max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-3, bf16=True,
                    report_to=[], logging_steps=10, save_strategy="no", seed=0, data_seed=0, dataloader_num_workers=0,
                    fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                            "state_dict_type": state_dict_type, "reshard_after_forward": True})
    settings.update(kw)
    return TrainingArguments(**settings)


def peak_memory(mst: bool, out: str) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = llama(1024, 8, 32000)
    args = trainer_args(out, steps=20)
    data = Tokens(256, 512, 32000)
    if mst:
        config = MSTConfig(update_interval=5, initial_sparsity=0.5, final_sparsity=0.8, seed=0, hsa_pattern="dense")
        trainer = MSTTrainer(model=model, args=args, train_dataset=data, mst_config=config)
    else:
        trainer = Trainer(model=model, args=args, train_dataset=data)
    start = time.perf_counter()
    trainer.train()
    torch.cuda.synchronize()
    result = {"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30, "seconds": time.perf_counter() - start,
              "params": sum(p.numel() for p in trainer.model.parameters())}
    if mst:
        masks = trainer.mst.masks
        result.update(mask_bytes=sum(m.numel() * m.element_size() for m in masks.masks.values()),
                      masked_weights=sum(p.numel() for p in masks.params.values()), sparsity=masks.sparsity(),
                      sharded=sharding.any_sharded(masks.params.values()))
    del trainer, model
    return result


def check_resume(out: str) -> dict:
    from transformers import TrainerCallback

    from mst_hf.io.formats import mask_tensors, read_mask_file

    config = MSTConfig(update_interval=2, initial_sparsity=0.5, final_sparsity=0.8, seed=0, hsa_pattern="dense")
    data = Tokens(128, 128, 2048)
    at_save = {}

    class AtSave(TrainerCallback):  # the masks in memory when checkpoint-6 is written (not checkpoint-12's)
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 6:
                at_save.update({n: trainer.mst.masks.full_mask(n).cpu() for n in trainer.mst.masks.masks})

    def run(directory):
        args = trainer_args(directory, 12, "SHARDED_STATE_DICT", save_strategy="steps", save_steps=6)
        trainer = MSTTrainer(model=llama(256, 2, 2048), args=args, train_dataset=data, mst_config=config)
        return trainer

    trainer = run(os.path.join(out, "uninterrupted"))
    trainer.add_callback(AtSave())
    trainer.train()
    full = {n: trainer.mst.masks.full_mask(n).cpu() for n in trainer.mst.masks.masks}
    sharded = sharding.any_sharded(trainer.mst.masks.params.values())
    checkpoint = os.path.join(out, "uninterrupted", "checkpoint-6")
    on_disk = mask_tensors(read_mask_file(checkpoint))
    resumed_trainer = run(os.path.join(out, "resumed"))
    resumed_trainer.train(resume_from_checkpoint=checkpoint)
    resumed = {n: resumed_trainer.mst.masks.full_mask(n).cpu() for n in resumed_trainer.mst.masks.masks}
    return {"resumed_masks_identical": full.keys() == resumed.keys() and all(torch.equal(full[n], resumed[n])
                                                                            for n in full),
            "checkpoint_has_dcp": any(n.startswith("pytorch_model_fsdp") for n in os.listdir(checkpoint)),
            "mask_file_is_full_masks": on_disk.keys() == at_save.keys() and all(torch.equal(on_disk[n], at_save[n])
                                                                               for n in on_disk),
            "masks_sharded": sharded}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="29561").items():
        os.environ.setdefault(key, value)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    report = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        parts = {"masks": lambda: check_masks(device, torch.bfloat16)}
        if device.type == "cuda":
            parts["trainer"] = lambda: {"plain": peak_memory(False, tmp), "mst": peak_memory(True, tmp)}
            parts["resume"] = lambda: check_resume(tmp)
        for name, part in parts.items():  # a failing part is reported, the others still run
            try:
                report[name] = part()
            except Exception as err:  # noqa: BLE001
                traceback.print_exc()
                report[name] = {"error": f"{type(err).__name__}: {err}"}
            with open(os.path.join(args.out, "fsdp2_check.json"), "w") as f:
                json.dump(report, f, indent=2)
    lines = [f"# MST under FSDP2, world size 1 ({report['device']}, torch {report['torch']}, bf16)", "",
             "| check | result |", "|---|---|"]
    lines += [f"| {name} failed | {part['error']} |" for name, part in report.items()
              if isinstance(part, dict) and "error" in part]
    m = report["masks"] if "error" not in report["masks"] else None
    lines += [] if m is None else [
              f"| custom loop: masks after {m['updates']} updates identical to the unsharded run | "
              f"{m['masks_identical']} |",
              f"| custom loop: final weights identical | {m['weights_identical']} |",
              f"| pruned weights exactly 0 on the shards | {m['pruned_zero_fsdp']} |"]
    for kind in ("plain", "fsdp2") if m is not None else ():
        t = m["after_backward_ms"][kind]
        lines.append(f"| `after_backward` ms, {kind}: update step / other step | {t['update']:.1f} / "
                     f"{t['other']:.2f} |")
    if "error" not in report.get("trainer", {"error": None}):
        p, q = report["trainer"]["plain"], report["trainer"]["mst"]
        lines += [f"| peak GPU memory, plain Trainer (FSDP2, {p['params'] / 1e6:.0f}M params) | "
                  f"{p['peak_allocated_gib']:.2f} GiB |",
                  f"| peak GPU memory, MSTTrainer (FSDP2) | {q['peak_allocated_gib']:.2f} GiB "
                  f"({q['peak_allocated_gib'] - p['peak_allocated_gib']:+.2f} GiB) |",
                  f"| mask state | {q['mask_bytes'] / 2**20:.1f} MiB = {q['mask_bytes'] / q['masked_weights']:.2f} "
                  f"bytes per masked weight (sharded: {q['sharded']}) |",
                  f"| wall time 20 steps, plain / MST | {p['seconds']:.1f} s / {q['seconds']:.1f} s |"]
    if "error" not in report.get("resume", {"error": None}):
        r = report["resume"]
        lines += [f"| MSTTrainer resume from SHARDED_STATE_DICT: masks identical | {r['resumed_masks_identical']} |",
                  f"| checkpoint holds a distributed checkpoint | {r['checkpoint_has_dcp']} |",
                  f"| saved mst_masks.safetensors = the full masks in memory | {r['mask_file_is_full_masks']} |",
                  f"| masks were sharded (DTensor parameters) | {r['masks_sharded']} |"]
    with open(os.path.join(args.out, "fsdp2_check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
