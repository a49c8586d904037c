#!/usr/bin/env python3
"""Times Hugging Face transformers' beam-search `generate` with the settings of `detox bench beam`: 64 prompts
of 256 tokens, num_beams 4, 64 new tokens (min_new_tokens = max_new_tokens, so every beam runs every step), on
a T5 checkpoint (e.g. `detox init --size base`'s random flan-t5-base) on the GPU. Prints the median time per
call and the tokens/s of the best hypotheses, as detox's bench does.

    python3 tools/bench_hf_beam.py --model models/flan-t5-base [--dtype float16] [--iters 5]
"""
import argparse
import statistics
import time

import torch
from transformers import T5ForConditionalGeneration


def prompts(batch, src, eos):
    """detox bench's random prompts (src/cli/bench.rs random_prompts): the same ids."""
    rows = [[3 + (r * 7919 + i * 104_729) % 31_000 for i in range(src - 1)] + [eos] for r in range(batch)]
    return torch.tensor(rows)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="T5 checkpoint directory (Hugging Face layout)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--src", type=int, default=256)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--num-beams", type=int, default=4)
    p.add_argument("--iters", type=int, default=5, help="timed calls after one warm-up")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    a = p.parse_args()
    dtype = getattr(torch, a.dtype)
    model = T5ForConditionalGeneration.from_pretrained(a.model, dtype=dtype).cuda().eval()
    ids = prompts(a.batch, a.src, model.config.eos_token_id).cuda()
    mask = torch.ones_like(ids)
    times = []
    with torch.no_grad():
        for it in range(a.iters + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, num_beams=a.num_beams, do_sample=False,
                                 max_new_tokens=a.gen, min_new_tokens=a.gen)
            torch.cuda.synchronize()
            if it > 0:
                times.append(time.perf_counter() - t0)
    assert out.shape == (a.batch, a.gen + 1), out.shape
    t = statistics.median(times)
    print(f"HF beam search: batch {a.batch}, src {a.src}, gen {a.gen}, num_beams {a.num_beams}, {a.model}, "
          f"{a.dtype}, transformers {__import__('transformers').__version__}, {torch.cuda.get_device_name()}")
    print(f"generate     {t * 1e3:9.2f} ms per call, median of {a.iters}  →  {a.batch * a.gen / t:.0f} tokens/s "
          f"of best hypotheses")


if __name__ == "__main__":
    main()
