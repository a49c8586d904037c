#!/usr/bin/env python3
"""Writes tests/fixtures/sft/: one full-parameter supervised fine-tuning step of two tiny T5 v1.1 models in PyTorch,
the oracle for `detox sft`'s backward and optimiser.

For each model (`flan`: untied lm_head, as FLAN-T5 files; `tied`: the head tied to the embedding with T5 v1.0's
d_model^-0.5 rescale), in train mode with dropout_rate 0:
  1. logits of a right-padded batch (`attention_mask` over the prompts, `decoder_input_ids` = the start token then
     the labels shifted right);
  2. `F.cross_entropy(..., ignore_index=-100, label_smoothing=0.1)`, the mean over real target tokens;
  3. `loss.backward()`, the global norm, `clip_grad_norm_` to MAX_GRAD_NORM (small enough to clip);
  4. one `torch.optim.AdamW` step with weight decay on every parameter but the layer norms' scales (as
     transformers' Trainer groups them).
Files per model, under tests/fixtures/sft/<name>/: model/ (config.json, f32 model.safetensors), batch.safetensors
(input_ids, lengths, decoder_input_ids, labels with padding as 0, mask; ids stored as f32, exact below 2^24), grads.safetensors (every parameter's
gradient before clipping, by Hugging Face name), after.safetensors (every parameter after the step) and step.json
(loss, plain cross-entropy without smoothing, gradient norm, hyperparameters).

Run from the repository root with the oracle's Python (tools/requirements-oracle.txt):
    /opt/oracle/bin/python tools/make_sft_fixture.py
"""
import json
import os
import shutil
import sys

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from transformers import T5Config, T5ForConditionalGeneration

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOOLS)
from make_fixtures import save_model  # noqa: E402  (the T5 fixtures' way of writing a model directory)

PINNED = {"torch": "2.11.0", "transformers": "5.17.0"}
OUT = os.path.normpath(os.path.join(TOOLS, "..", "tests", "fixtures", "sft"))
SEED = 20241129
T5_KWARGS = dict(vocab_size=300, d_model=48, d_kv=16, num_heads=3, d_ff=96, num_layers=2, num_decoder_layers=3,
                 relative_attention_num_buckets=8, relative_attention_max_distance=16)
SOURCE_LENGTHS = [9, 5, 12]
TARGET_LENGTHS = [6, 3, 8]
HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, max_grad_norm=0.5,
             label_smoothing=0.1)


def check_versions():
    got = {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__}
    for k, v in PINNED.items():
        if got[k] != v:
            print(f"warning: {k} {got[k]} is not the pinned {v}", file=sys.stderr)


def make(name, tied, gen):
    torch.manual_seed(SEED + (1 if tied else 0))
    cfg = T5Config(feed_forward_proj="gated-gelu", decoder_start_token_id=0, eos_token_id=1, pad_token_id=0,
                   dropout_rate=0.0, tie_word_embeddings=tied, **T5_KWARGS)
    model = T5ForConditionalGeneration(cfg)
    with torch.no_grad():
        for stack in (model.encoder, model.decoder):
            stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight.normal_(0.0, 1.0, generator=gen)
        # Norm scales away from 1, so that their gradients are exercised at a generic point.
        for n, p in model.named_parameters():
            if "layer_norm" in n:
                p.uniform_(0.5, 1.5, generator=gen)
        if not tied:
            model.lm_head.weight = torch.nn.Parameter(0.3 * torch.randn(cfg.vocab_size, cfg.d_model, generator=gen))
    model.config.scale_decoder_outputs = tied
    cfg_dict = cfg.to_dict()
    for k in ["transformers_version", "_name_or_path", "architectures", "id2label", "label2id",
              "scale_decoder_outputs"]:
        cfg_dict.pop(k, None)
    cfg_dict["architectures"] = ["T5ForConditionalGeneration"]
    cfg_dict["tie_word_embeddings"] = tied
    out = os.path.join(OUT, name)
    shutil.rmtree(out, ignore_errors=True)
    save_model(model, cfg_dict, os.path.join(out, "model"), torch.float32, 1, store_lm_head=not tied)

    b, v = len(SOURCE_LENGTHS), cfg.vocab_size
    L, T = max(SOURCE_LENGTHS), max(TARGET_LENGTHS)
    input_ids = torch.zeros(b, L, dtype=torch.long)
    attn = torch.zeros(b, L, dtype=torch.long)
    labels = torch.full((b, T), -100, dtype=torch.long)
    for i, (n, t) in enumerate(zip(SOURCE_LENGTHS, TARGET_LENGTHS)):
        input_ids[i, :n] = torch.randint(2, v, (n,), generator=gen)
        input_ids[i, n - 1] = 1
        attn[i, :n] = 1
        labels[i, :t] = torch.randint(2, v, (t,), generator=gen)
        labels[i, t - 1] = 1
    dec_in = torch.zeros(b, T, dtype=torch.long)
    dec_in[:, 1:] = labels[:, :-1].clamp(min=0)

    model.train()
    logits = model(input_ids=input_ids, attention_mask=attn, decoder_input_ids=dec_in).logits
    loss = F.cross_entropy(logits.reshape(-1, v), labels.reshape(-1), ignore_index=-100,
                           label_smoothing=HYPER["label_smoothing"])
    ce = F.cross_entropy(logits.detach().reshape(-1, v), labels.reshape(-1), ignore_index=-100)
    loss.backward()
    named = dict(model.named_parameters())
    grads = {n: p.grad.detach().clone().contiguous() for n, p in named.items()}
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), HYPER["max_grad_norm"])
    decay = [p for n, p in named.items() if "layer_norm" not in n]
    no_decay = [p for n, p in named.items() if "layer_norm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": HYPER["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"])
    opt.step()
    after = {n: p.detach().clone().contiguous() for n, p in named.items()}

    mask = (labels != -100).float()
    save_file({"input_ids": input_ids.float(), "lengths": attn.sum(1).float(), "decoder_input_ids": dec_in.float(),
               "labels": labels.clamp(min=0).float(), "mask": mask},
              os.path.join(out, "batch.safetensors"), metadata={"format": "pt"})
    save_file(grads, os.path.join(out, "grads.safetensors"), metadata={"format": "pt"})
    save_file(after, os.path.join(out, "after.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "step.json"), "w") as f:
        json.dump({"loss": loss.item(), "ce": ce.item(), "grad_norm": norm.item(), "tied": tied, **HYPER}, f, indent=2)
    print(f"{name}: loss {loss.item():.6f}, gradient norm {norm.item():.6f}, {len(grads)} parameters")


def main():
    check_versions()
    gen = torch.Generator().manual_seed(SEED)
    make("flan", False, gen)
    make("tied", True, gen)


if __name__ == "__main__":
    main()
