#!/usr/bin/env python3
"""The reference side of benchmarks/throughput.py: sentence-transformers' own trainer on the same
rows, in the same batches (sequential batch sampler over a file already in batch order).

Run directly (1 process) or under torchrun (DDP, gloo). Writes per-step end times (rank 0) to --out.
"""
import argparse
import json
import os
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--save", default=None, help="save the trained model here (a whole recipe's wall-clock)")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--max-seq-length", type=int, default=128)
    args = ap.parse_args()

    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.sampler import DefaultBatchSampler
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rows = [json.loads(l) for l in open(args.data)]
    ds = Dataset.from_dict({k: [r[k] for r in rows] for k in ("anchor", "positive", "negative")})
    model = SentenceTransformer(args.model, device=args.device)
    model.max_seq_length = args.max_seq_length
    loss = MultipleNegativesRankingLoss(model, scale=20.0, gather_across_devices=world > 1)

    def sequential(dataset, batch_size, drop_last, valid_label_columns=None, generator=None, seed=0):
        return DefaultBatchSampler(SequentialSampler(dataset), batch_size=batch_size, drop_last=drop_last,
                                   valid_label_columns=valid_label_columns, generator=generator, seed=seed)

    times = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter())

    targs = SentenceTransformerTrainingArguments(
        output_dir=os.path.dirname(args.out) + "/st-tmp", per_device_train_batch_size=args.batch,
        max_steps=args.steps, learning_rate=args.lr, warmup_steps=0, weight_decay=0.01, max_grad_norm=1.0,
        lr_scheduler_type="linear", bf16=args.precision == "bf16", fp16=args.precision == "fp16",
        use_cpu=args.device == "cpu", logging_steps=10_000,
        save_strategy="no", report_to="none", seed=42, dataloader_drop_last=True, batch_sampler=sequential,
        ddp_backend="gloo" if world > 1 else None, disable_tqdm=True)
    trainer = SentenceTransformerTrainer(model=model, args=targs, train_dataset=ds, loss=loss,
                                         callbacks=[StepTimes()])
    trainer.train()
    if args.save:
        model.save(args.save)
    if int(os.environ.get("RANK", "0")) == 0:
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() and args.device != "cpu" else 0.0
        with open(args.out, "w") as f:
            json.dump({"step_end_times": times, "peak_gib": peak}, f)
    if world > 1:
        torch.distributed.barrier()
        os._exit(0)


if __name__ == "__main__":
    main()
