#!/usr/bin/env python3
"""Checks that transformers loads a model directory `detox sft` saved, with every weight and nothing else, and
generates from it what detox generates: greedy decoding of the same prompts must give the same tokens.
    python3 tools/check_hf_export.py --model DIR --detox SUMMARIES.jsonl --data DATA.jsonl [--limit N]
        [--max-new-tokens M] [--device cuda]
SUMMARIES.jsonl is `detox summarize --model DIR --input DATA.jsonl`'s output (greedy, the same M). Prints one
JSON line with the count of identical generations; exits non-zero when loading reports missing or unexpected
weights.
"""
import argparse
import json

import torch
from transformers import PreTrainedTokenizerFast, T5ForConditionalGeneration

TEMPLATE = "Summarize the following conversation.\n\n{dialogue}\n\nSummary:"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--detox", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--limit", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    model, info = T5ForConditionalGeneration.from_pretrained(a.model, dtype=torch.float32, output_loading_info=True)
    model = model.to(a.device).eval()
    tok = PreTrainedTokenizerFast(tokenizer_file=f"{a.model}/tokenizer.json", eos_token="</s>", pad_token="<pad>")
    rows = [json.loads(l) for l in open(a.data) if l.strip()][: a.limit]
    ours = [json.loads(l)["tokens"] for l in open(a.detox) if l.strip()][: a.limit]
    same, first_diff = 0, []
    for i, (row, want) in enumerate(zip(rows, ours)):
        enc = tok(TEMPLATE.format(dialogue=row["dialogue"]), truncation=True, max_length=512, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**{k: v.to(a.device) for k, v in enc.items()}, do_sample=False, num_beams=1,
                                 max_new_tokens=a.max_new_tokens, min_new_tokens=0)
        got = out[0, 1:].tolist()
        if 1 in got:
            got = got[: got.index(1) + 1]
        if got == want:
            same += 1
        else:
            k = next((j for j, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
            first_diff.append({"row": i, "position": k})
    report = {"model": a.model, "missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
              "prompts": len(ours), "identical": same, "diverging": first_diff}
    print(json.dumps(report))
    if info["missing_keys"] or info["unexpected_keys"]:
        raise SystemExit("transformers did not load every weight of the saved model")


if __name__ == "__main__":
    main()
