#!/usr/bin/env python3
"""The anchor for `detox score`: transformers scoring SAMSum's test reference summaries with a
Hugging Face-layout classifier on the GPU, end to end (tokenization included), the way a Detoxify user
runs it: batches of 64 in input order, padded and truncated at 512, sigmoid of the logits.
Prints one JSON object: seconds per pass (median of 3 after a warm-up) and the mean toxicity.
    python3 tools/score_baseline.py --classifier DIR --data test.jsonl [--dtype fp16|fp32]
"""
import argparse
import json
import time

import torch
from transformers import BertForSequenceClassification, PreTrainedTokenizerFast


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--classifier", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"])
    p.add_argument("--batch", type=int, default=64)
    a = p.parse_args()
    dtype = torch.float16 if a.dtype == "fp16" else torch.float32
    texts = [json.loads(l)["summary"] for l in open(a.data) if l.strip()]
    tok = PreTrainedTokenizerFast(tokenizer_file=f"{a.classifier}/tokenizer.json", pad_token="[PAD]")
    model = BertForSequenceClassification.from_pretrained(a.classifier, dtype=dtype).cuda().eval()

    def one_pass():
        probs = []
        with torch.no_grad():
            for i in range(0, len(texts), a.batch):
                enc = tok(texts[i:i + a.batch], padding=True, truncation=True, max_length=512, return_tensors="pt")
                out = model(**{k: v.cuda() for k, v in enc.items()}).logits.float()
                probs.append(torch.sigmoid(out)[:, 0].cpu())
        torch.cuda.synchronize()
        return torch.cat(probs)

    one_pass()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        probs = one_pass()
        times.append(time.perf_counter() - t0)
    times.sort()
    print(json.dumps({"anchor": "transformers", "dtype": a.dtype, "texts": len(texts), "batch": a.batch,
                      "seconds": times[1], "texts_per_s": len(texts) / times[1],
                      "mean_toxicity": float(probs.mean()), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
