#!/usr/bin/env python3
"""Hugging Face transformers as the oracle for a full-size checkpoint, on the GPU machine.

Writes ORACLE.safetensors for the GPU test `cuda::t5::full_size_matches_transformers`:
  - input_ids / lengths: the first N SAMSum test prompts (detox's template), right-padded;
  - greedy: transformers' greedy generations (fp32, max 64 new tokens) for all N;
  - logit_rows / decoder_ids / logits: teacher-forced fp32 logits for the first 8 prompts.
Usage (model from `detox init --size base --out DIR --tokenizer …`):
    python3 tools/full_size_oracle.py --model DIR --data test.jsonl --out ORACLE.safetensors [--n 64]
then  DETOX_FULL_SIZE=DIR DETOX_FULL_SIZE_ORACLE=ORACLE.safetensors .carry/bin/gpu full_size
"""
import argparse
import json

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import T5ForConditionalGeneration

TEMPLATE = "Summarize the following conversation.\n\n{dialogue}\n\nSummary:"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=64)
    a = p.parse_args()
    tok = Tokenizer.from_file(f"{a.model}/tokenizer.json")
    rows = [json.loads(l) for l in open(a.data) if l.strip()][: a.n]
    ids = []
    for r in rows:
        e = tok.encode(TEMPLATE.replace("{dialogue}", r["dialogue"])).ids
        if e[-1] != 1:
            e.append(1)
        if len(e) > 512:
            e = e[:511] + [1]
        ids.append(e)
    width = max(len(e) for e in ids)
    input_ids = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, e in enumerate(ids):
        input_ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    model = T5ForConditionalGeneration.from_pretrained(a.model, dtype=torch.float32).cuda().eval()
    with torch.no_grad():
        greedy = model.generate(input_ids=input_ids.cuda(), attention_mask=mask.cuda(), do_sample=False,
                                num_beams=1, max_new_tokens=a.max_new_tokens).cpu()
        k = min(8, len(ids))
        dec = greedy[:k, :32]
        logits = model(input_ids=input_ids[:k].cuda(), attention_mask=mask[:k].cuda(),
                       decoder_input_ids=dec.cuda()).logits.float().cpu()
    save_file({"input_ids": input_ids.float(), "lengths": mask.sum(1).float(), "greedy": greedy.float(),
               "decoder_ids": dec.float(), "logits": logits}, a.out)
    print(f"wrote {a.out}: {len(ids)} prompts up to {width} tokens; greedy {tuple(greedy.shape)}; logits {tuple(logits.shape)}")


if __name__ == "__main__":
    main()
