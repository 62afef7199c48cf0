"""Worker for tests/test_distributed.py, run on 2 gloo CPU ranks (not collected by pytest):

    python -m llm_distill.launch --cpu-processes 2 tests/distributed_worker.py OUT_DIR

Shards a tiny Llama teacher with FSDP2 (``prepare_fsdp2_teacher``) and checks, on each rank, what must hold:
parameters really sharded, frozen, eval mode, logits equal to the unsharded model's, the student's mixed
precision applied, and ``evaluate_models`` finishing (no hang) on uneven shards with exact single-process sums.
Then trains: a student sharded with ``fully_shard`` takes 2 KD steps (the library's loss, global token count, loss x
world size as DistillationTrainer does) from the sharded teacher, 2 rows per rank; the gathered weights must equal a
single-process student trained on the same 4-row batches. Writes ``OUT_DIR/rank{r}.json``.
"""

import copy
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from datasets import Dataset
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM

from llm_distill.distributed import is_sharded, prepare_fsdp2_teacher, prepare_teacher
from llm_distill.evaluation import evaluate_models
from llm_distill.losses import distillation_loss


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def collate(rows):
    ids = torch.tensor([r["input_ids"] for r in rows])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def main(out: Path) -> None:
    state = PartialState(cpu=True)  # a bare PartialState() ignores ACCELERATE_USE_CPU (TrainingArguments does not)
    rank, world = state.process_index, state.num_processes
    teacher = tiny_llama(seed=0)
    reference = copy.deepcopy(teacher)
    ids = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(rank))  # different data per rank
    with torch.no_grad():
        expected = reference(input_ids=ids).logits

    sharded = prepare_fsdp2_teacher(teacher)
    full = sum(p.numel() for p in reference.parameters())
    local = sum(p.to_local().numel() for p in sharded.parameters())
    with torch.no_grad():
        logits = sharded(input_ids=ids).logits

    # The trainer's dispatch path with accelerate's real FSDP2 plugin (accelerate itself refuses FSDP on CPU, so
    # its state is stubbed): the student's bf16 MixedPrecisionPolicy makes the teacher compute in bf16.
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, cpu_ram_efficient_loading=False)
    plugin.set_mixed_precision("bf16")
    fake = SimpleNamespace(state=SimpleNamespace(distributed_type=DistributedType.FSDP, fsdp_plugin=plugin),
                           torch_device_mesh=None, parallelism_config=None)
    bf16_teacher = prepare_teacher(tiny_llama(seed=0).train(), fake)
    refused = ""
    plugin.cpu_ram_efficient_loading = True
    try:
        prepare_teacher(tiny_llama(seed=0), fake)
    except ValueError as err:
        refused = str(err)
    seen = []
    bf16_teacher.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, o: seen.append(str(o.dtype)))
    with torch.no_grad():
        bf16_logits = bf16_teacher(input_ids=ids).logits.float()

    # 3 rows over 2 ranks at batch size 1: rank 0 runs 2 batches, rank 1 one; without padding rank 0 would hang.
    rows = Dataset.from_list([
        {"input_ids": torch.randint(1, 64, (10,), generator=torch.Generator().manual_seed(i)).tolist()} for i in range(3)
    ])
    evals = evaluate_models({"teacher": sharded}, rows, collate, batch_size=1)
    local_eval = None
    if rank == 0:  # the reference: the unsharded teacher on this rank alone, over all rows
        with torch.no_grad():
            nll = sum(torch.nn.functional.cross_entropy(reference(input_ids=collate([r])["input_ids"]).logits[0, :-1],
                                                        torch.tensor(r["input_ids"][1:]), reduction="sum").item()
                      for r in rows)
        local_eval = {"nll": nll / (3 * 9), "tokens": 27}

    train = fsdp2_kd_steps(sharded, reference, rank, world)

    result = {
        "rank": rank, "world_size": world, **train, "full_params": full, "local_params": local,
        "all_dtensor": all(isinstance(p, DTensor) for p in sharded.parameters()),
        "requires_grad": any(p.requires_grad for p in sharded.parameters()), "training": sharded.training,
        "is_sharded": is_sharded(sharded), "max_abs_diff": (logits - expected).abs().max().item(),
        "bf16_dtypes": seen, "bf16_max_abs_diff": (bf16_logits - expected).abs().max().item(),
        "bf16_frozen": not bf16_teacher.training and not any(p.requires_grad for p in bf16_teacher.parameters()),
        "bf16_sharded": is_sharded(bf16_teacher), "refused_ram_efficient_loading": refused,
        "eval": evals["teacher"], "reference_eval": local_eval,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def fsdp2_kd_steps(teacher, reference_teacher, rank: int, world: int, steps: int = 2) -> dict:
    """KD training with an FSDP2 student on gloo vs the same steps in one process (the global batch at once)."""
    from torch.distributed.fsdp import fully_shard

    student = tiny_llama(seed=1).train()
    single = copy.deepcopy(student)
    for layer in student.model.layers:
        fully_shard(layer)
    fully_shard(student)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (student, single)]
    losses, single_losses = [], []
    for step in range(steps):
        ids = torch.randint(1, 64, (2 * world, 12), generator=torch.Generator().manual_seed(100 + step))  # (4, 12)
        mine = ids[2 * rank:2 * rank + 2]
        n_items = ids[:, 1:].numel()  # the global count of valid (shifted) labels, as Trainer passes it
        with torch.no_grad():
            t_mine, t_all = teacher(input_ids=mine).logits, reference_teacher(input_ids=ids).logits
        out = distillation_loss(student(input_ids=mine).logits, t_mine, mine, alpha=0.5, temperature=2.0,
                                num_items_in_batch=n_items)
        (out.loss * world).backward()  # FSDP averages gradients over ranks; the loss is already a global mean
        ref = distillation_loss(single(input_ids=ids).logits, t_all, ids, alpha=0.5, temperature=2.0)
        ref.loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
        summed = out.loss.detach().clone()
        torch.distributed.all_reduce(summed)
        losses.append(summed.item())
        single_losses.append(ref.loss.item())
    diffs = [(p.full_tensor() - q).abs().max().item() for p, q in zip(student.parameters(), single.parameters())]
    moved = max((q - p0).abs().max().item() for q, p0 in zip(single.parameters(), tiny_llama(seed=1).parameters()))
    return {"fsdp2_losses": losses, "single_losses": single_losses, "fsdp2_max_weight_diff": max(diffs),
            "fsdp2_student_sharded": all(isinstance(p, DTensor) for p in student.parameters()),
            "single_weights_moved": moved}


if __name__ == "__main__":
    main(Path(sys.argv[1]))
