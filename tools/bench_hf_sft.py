#!/usr/bin/env python3
"""Times a full-parameter training step of Hugging Face transformers' T5 with the settings of `detox bench sft`:
64 pairs of 512 prompt tokens and 64 target tokens (the same ids, made as tools/bench_hf_beam.py makes them), dropout on, transformers' Adafactor with its
defaults (relative step, parameter scaling), the forward under bf16 autocast over f32 weights, on a T5
checkpoint (e.g. `detox init --size small`'s random flan-t5-small) on the GPU: the PyTorch anchor of detox's
SFT step.

    python3 tools/bench_hf_sft.py --model models/flan-t5-small [--optimizer adamw] [--iters 5]
"""
import argparse
import statistics
import time

import torch
from transformers import T5ForConditionalGeneration
from transformers.optimization import Adafactor

from bench_hf_beam import prompts


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="T5 checkpoint directory (Hugging Face layout)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--src", type=int, default=512)
    p.add_argument("--tgt", type=int, default=64)
    p.add_argument("--optimizer", default="adafactor", choices=["adafactor", "adamw"])
    p.add_argument("--iters", type=int, default=5, help="timed steps after one warm-up")
    a = p.parse_args()
    model = T5ForConditionalGeneration.from_pretrained(a.model, dtype=torch.float32).cuda().train()
    eos = model.config.eos_token_id
    ids, labels = prompts(a.batch, a.src, eos).cuda(), prompts(a.batch, a.tgt, eos).cuda()
    mask = torch.ones_like(ids)
    if a.optimizer == "adafactor":
        opt = Adafactor(model.parameters(), lr=None, scale_parameter=True, relative_step=True, warmup_init=False)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01, fused=True)
    times = []
    for it in range(a.iters + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if it > 0:
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    print(f"HF sft: batch {a.batch}, src {a.src}, tgt {a.tgt}, {a.model}, every weight, {a.optimizer}, bf16 autocast, "
          f"transformers {__import__('transformers').__version__}, {torch.cuda.get_device_name()}")
    print(f"step         {t * 1e3:9.2f} ms median of {a.iters}  →  {a.batch * (a.src + a.tgt) / t:.0f} tokens/s "
          f"(prompt and target); peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
