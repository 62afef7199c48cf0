"""Process peak memory of held-out evaluation vs a training step (issue 18: "the process peak is the training peak").

    python scripts/bench_eval_memory.py                          # V = 32,000, batch 8 x 256, hidden 128 (seconds)
    python scripts/bench_eval_memory.py --vocab 151936 --batch 2 --seq 256

Each phase runs in its own fresh process on the same random Llama teacher / student (built from configs, nothing
downloaded) and the same batch; the figure is the growth of the process's peak RSS (``ru_maxrss``) over the
process after loading, so the weights and imports cancel out:

- ``train step (memory-lean loss)``: one ``DistillationTrainer`` step (forward KL, ``loss_chunk_size`` 256), the
  student's optimiser created beforehand;
- ``evaluation (lean path)``: ``llm_distill.evaluation.evaluate_models`` (teacher + student, as distill scores them);
- ``evaluation (full logits)``: the same sums from each model's own ``B x S x V`` logits (what evaluation did
  before issue 18).

Writes ``bench_results/eval_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHASES = ("train step (memory-lean loss)", "evaluation (lean path)", "evaluation (full logits)")


def _models(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(seed, layers, hidden):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=max(512, args.seq)))

    teacher, student = make(1, 2, 2 * args.hidden), make(2, 2, args.hidden)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    return teacher, student, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _phase(args) -> float:
    import torch

    from llm_distill.evaluation import evaluate_models

    teacher, student, batch = _models(args)
    from datasets import Dataset

    rows = Dataset.from_list([{"input_ids": r.tolist(), "labels": r.tolist()} for r in batch["input_ids"]])

    def collate(rs):
        ids = torch.tensor([r["input_ids"] for r in rs])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([r["labels"] for r in rs])}

    trainer = None
    if args.phase == PHASES[0]:
        from llm_distill.config import DistillationConfig
        from llm_distill.trainer import DistillationTrainer

        config = DistillationConfig(output_dir="outputs/bench_eval_memory", report_to="none", use_cpu=True,
                                    alpha=1.0, loss_chunk_size=256)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, data_collator=collate)
        trainer.create_optimizer()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if trainer is not None:
        trainer.training_step(trainer.model, dict(batch), (batch["labels"][:, 1:] != -100).sum())
        trainer.optimizer.step()
    elif args.phase == PHASES[1]:
        evaluate_models({"teacher": teacher, "student": student}, rows, collate, batch_size=args.batch)
    else:
        with torch.no_grad():
            for model in (teacher, student):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                logits = logits[:, :-1].reshape(-1, args.vocab).float()
                torch.nn.functional.cross_entropy(logits, batch["labels"][:, 1:].reshape(-1), reduction="sum")
                del logits
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # KiB -> MiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="bench_results/eval_memory.json")
    args = parser.parse_args()
    if args.phase:
        print(json.dumps({"peak_growth_mib": _phase(args)}))
        return
    common = ["--vocab", str(args.vocab), "--hidden", str(args.hidden), "--batch", str(args.batch), "--seq",
              str(args.seq)]
    result = {}
    for phase in PHASES:
        out = subprocess.run([sys.executable, __file__, *common, "--phase", phase], capture_output=True, text=True,
                             check=True)
        result[phase] = json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_mib"]
    full = args.batch * args.seq * args.vocab * 4 / 2**20
    print(f"\nV {args.vocab:,}, batch {args.batch} x {args.seq}, teacher 2 x {2 * args.hidden}, student 2 x "
          f"{args.hidden}; one fp32 B x S x V logits tensor = {full:,.0f} MiB\n")
    print("| phase | peak RSS growth over the loaded process (MiB) |\n| --- | ---: |")
    for phase, mib in result.items():
        print(f"| {phase} | {mib:,.0f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": "python " + " ".join(sys.argv), "args": vars(args),
                                          "peak_growth_mib": result}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
