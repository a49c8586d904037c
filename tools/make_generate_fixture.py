#!/usr/bin/env python3
"""Writes tests/fixtures/t5/generate/: what Hugging Face transformers' `generate` returns in fp32 for fixture
models of tools/make_fixtures.py under greedy decoding with logits processors and beam search: flan_small on
prompts of several lengths, and odd_bf16, whose greedy runs choose the pad id (= the decoder start token), so
that whether the processors see the start token shows.

cases.json lists, per model, each case's `generate` arguments; expected.safetensors holds each model's
prompts (`MODEL.input_ids`, `MODEL.attention_mask`) and each case's output ids `MODEL.CASE` `[batch, 1 + n]`
(decoder start first, EOS filling the rows that end early, as generate returns them).

Run from the repository root with the pinned versions of tools/requirements-oracle.txt:
    /opt/oracle/bin/python tools/make_generate_fixture.py
"""
import json
import os
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import T5ForConditionalGeneration

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "t5")
OUT = os.path.join(ROOT, "generate")
MAX_NEW = 14

# Hugging Face's names; every case also passes max_new_tokens and do_sample=False.
CASES = [
    ("greedy_ngram2", dict(num_beams=1, no_repeat_ngram_size=2)),
    ("greedy_rep", dict(num_beams=1, repetition_penalty=1.3)),
    ("greedy_ngram3_rep_min", dict(num_beams=1, no_repeat_ngram_size=3, repetition_penalty=1.3, min_new_tokens=5)),
    ("beam2", dict(num_beams=2)),
    ("beam2_ngram2", dict(num_beams=2, no_repeat_ngram_size=2)),
    ("beam2_rep", dict(num_beams=2, repetition_penalty=1.3)),
    ("beam4", dict(num_beams=4)),
    ("beam4_ngram3", dict(num_beams=4, no_repeat_ngram_size=3)),
    ("beam4_rep", dict(num_beams=4, repetition_penalty=1.3)),
    ("beam4_lp0.5", dict(num_beams=4, length_penalty=0.5)),
    ("beam4_lp2", dict(num_beams=4, length_penalty=2.0)),
    ("beam4_early", dict(num_beams=4, early_stopping=True)),
    ("beam4_never_lp2", dict(num_beams=4, early_stopping="never", length_penalty=2.0)),
    ("beam4_min8", dict(num_beams=4, min_new_tokens=8)),
    ("beam3_ngram2_rep", dict(num_beams=3, no_repeat_ngram_size=2, repetition_penalty=1.3)),
]
# odd_bf16 repeats the pad id: bans and penalties of the start token decide its outputs.
ODD_CASES = [
    ("greedy_ngram1", dict(num_beams=1, no_repeat_ngram_size=1)),
    ("greedy_ngram2", dict(num_beams=1, no_repeat_ngram_size=2)),
    ("greedy_rep", dict(num_beams=1, repetition_penalty=1.5)),
    ("beam2_ngram1", dict(num_beams=2, no_repeat_ngram_size=1)),
    ("beam3_ngram2", dict(num_beams=3, no_repeat_ngram_size=2)),
    ("beam4_rep", dict(num_beams=4, repetition_penalty=1.5)),
    ("beam4_ngram3_lp0.5", dict(num_beams=4, no_repeat_ngram_size=3, length_penalty=0.5)),
]


def prompts(vocab, lengths, seed):
    """Right-padded random prompts ending in EOS (1), pad 0."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, : n - 1] = torch.randint(3, vocab, (n - 1,), generator=gen)
        ids[b, n - 1] = 1
        mask[b, :n] = 1
    return ids, mask


def run_cases(name, ids, mask, cases, expected):
    model = T5ForConditionalGeneration.from_pretrained(os.path.join(ROOT, name), dtype=torch.float32).eval()
    expected[f"{name}.input_ids"] = ids.float()
    expected[f"{name}.attention_mask"] = mask.float()
    with torch.no_grad():
        plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False)
        for case, kw in cases:
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False, **kw)
            expected[f"{name}.{case}"] = out.float()
            same = out.shape == plain.shape and torch.equal(out, plain)
            print(f"{name} {case}: {tuple(out.shape)}{' (same as greedy)' if same else ''}")
    return [dict(name=case, max_new_tokens=MAX_NEW, **kw) for case, kw in cases]


def main():
    if transformers.__version__ != "5.17.0":
        print(f"warning: transformers {transformers.__version__} is not the pinned 5.17.0", file=sys.stderr)
    from safetensors.torch import load_file
    expected = {}
    # flan_small's own prompts (whose EOS row make_fixtures.py tuned so that generations end at
    # different lengths), then random ones of other lengths.
    own = load_file(os.path.join(ROOT, "flan_small", "expected.safetensors"))
    more, more_mask = prompts(320, [23, 5, 17, 11, 30, 8], seed=11)
    width = max(own["input_ids"].shape[1], more.shape[1])
    pad = lambda t: torch.nn.functional.pad(t.long(), (0, width - t.shape[1]))
    ids = torch.cat([pad(own["input_ids"]), pad(more)])
    mask = torch.cat([pad(own["attention_mask"]), pad(more_mask)])
    models = {"flan_small": run_cases("flan_small", ids, mask, CASES, expected)}
    odd = load_file(os.path.join(ROOT, "odd_bf16", "expected.safetensors"))
    models["odd_bf16"] = run_cases("odd_bf16", odd["input_ids"].long(), odd["attention_mask"].long(), ODD_CASES,
                                   expected)
    os.makedirs(OUT, exist_ok=True)
    save_file({k: v.contiguous() for k, v in expected.items()}, os.path.join(OUT, "expected.safetensors"))
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump({"models": models}, f, indent=1)


if __name__ == "__main__":
    main()
