#!/usr/bin/env python3
"""Writes the T5 parity fixtures under tests/fixtures/t5/ with Hugging Face transformers + peft as the oracle.

Each fixture is a tiny T5 v1.1 (gated-gelu) with random weights and real structure, stored the way a user's
checkpoint would be (config.json + safetensors, a PEFT adapter directory, a TRL-style value head), plus
expected.safetensors holding the inputs and what transformers computes from them in fp32.

Run from the repository root, with the pinned versions of tools/requirements-oracle.txt:
    python3 -m venv /opt/oracle && /opt/oracle/bin/pip install -r tools/requirements-oracle.txt
    /opt/oracle/bin/python tools/make_fixtures.py
The GPU machine has these versions installed; there, plain `python3 tools/make_fixtures.py` works too.
"""
import json
import math
import os
import shutil
import sys

import torch
import transformers
import peft
from safetensors.torch import save_file
from transformers import T5Config, T5ForConditionalGeneration
from transformers.activations import NewGELUActivation
from transformers.models.t5.modeling_t5 import T5Attention, T5LayerNorm

PINNED = {"transformers": "5.17.0", "peft": "0.21.0"}
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")


def check_versions():
    for mod, want in PINNED.items():
        have = sys.modules[mod].__version__
        if have != want:
            print(f"warning: {mod} {have} is not the pinned {want}; fixtures may differ", file=sys.stderr)


def as_f32(t):
    return t.detach().to(torch.float32).contiguous()


def ragged_ids(gen, batch, lengths, vocab, last):
    """Right-padded ids (pad 0) ending in `last` (EOS for a tokenized prompt)."""
    width = max(lengths)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, : n - 1] = torch.randint(3, vocab, (n - 1,), generator=gen)
        ids[b, n - 1] = last
        mask[b, :n] = 1
    return ids, mask


def save_model(model, cfg_dict, out, dtype, shards, store_lm_head):
    os.makedirs(out, exist_ok=True)
    sd = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    for k in ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]:
        sd.pop(k, None)
    if not store_lm_head:
        sd.pop("lm_head.weight", None)
    if shards == 1:
        save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    else:
        names = sorted(sd)
        per = math.ceil(len(names) / shards)
        weight_map = {}
        for i in range(shards):
            part = names[i * per : (i + 1) * per]
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: sd[k] for k in part}, os.path.join(out, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg_dict, f, indent=2, sort_keys=True)


def make_t5_fixture(name, seed, cfg_kwargs, *, style, dtype, shards, lora_targets, lora_r, lora_alpha,
                    enc_lengths, dec_len, gen_tokens, lora_b_std=0.5):
    """style: 'flan' (untied lm_head, tie_word_embeddings false, as real FLAN-T5 files),
    'tf5' (what transformers 5 saves: tied, scale_decoder_outputs false, no lm_head in the file),
    'v1.0' (tied with the d_model^-0.5 rescale, scale_decoder_outputs absent)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    out = os.path.join(ROOT, "t5", name)
    shutil.rmtree(out, ignore_errors=True)

    cfg = T5Config(feed_forward_proj="gated-gelu", decoder_start_token_id=0, eos_token_id=1, pad_token_id=0,
                   dropout_rate=0.1, **cfg_kwargs)
    model = T5ForConditionalGeneration(cfg).eval()
    # Widen the relative-bias table so the bias visibly shapes attention at these tiny sizes.
    with torch.no_grad():
        for stack in (model.encoder, model.decoder):
            stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight.normal_(0.0, 1.0)
        if style == "flan":
            model.lm_head.weight = torch.nn.Parameter(torch.randn(cfg.vocab_size, cfg.d_model, generator=gen))
        if style != "flan":
            model.shared.weight.copy_(model.lm_head.weight)

    cfg_dict = cfg.to_dict()
    for k in ["transformers_version", "_name_or_path", "architectures", "id2label", "label2id"]:
        cfg_dict.pop(k, None)
    cfg_dict["architectures"] = ["T5ForConditionalGeneration"]
    if style == "flan":
        cfg_dict["tie_word_embeddings"] = False
        cfg_dict.pop("scale_decoder_outputs", None)
    elif style == "tf5":
        cfg_dict["tie_word_embeddings"] = True
        cfg_dict["scale_decoder_outputs"] = False
    else:
        cfg_dict["tie_word_embeddings"] = True
        cfg_dict.pop("scale_decoder_outputs", None)

    batch = len(enc_lengths)
    # With tied embeddings EOS's output row is also its input embedding: end the prompts with another
    # id there, so that tuning EOS's logit below leaves the encoder's inputs alone.
    input_ids, attn = ragged_ids(gen, batch, enc_lengths, cfg.vocab_size, last=1 if style == "flan" else 2)
    dec_ids = torch.randint(3, cfg.vocab_size, (batch, dec_len), generator=gen)
    dec_ids[:, 0] = 0
    model.config.scale_decoder_outputs = style == "v1.0"
    # Random weights almost never choose EOS: point EOS's output row at one state of a greedy run and
    # take the weakest strength at which some runs stop and others do not.
    with torch.no_grad():
        run = greedy(model, input_ids, attn, gen_tokens)
        o = model(input_ids=input_ids, attention_mask=attn, decoder_input_ids=run, output_hidden_states=True)
        h = o.decoder_hidden_states[-1]
        target = h[0, gen_tokens // 2] - h.mean(dim=(0, 1))
        row = model.lm_head.weight
        direction = target / target.norm() * row.norm(dim=1).mean()

        def stops_at(boost):
            row[1] = direction * boost
            return [r.tolist().index(1) if 1 in r else None for r in greedy(model, input_ids, attn, gen_tokens)]

        runs = [(float(b), stops_at(b)) for b in torch.linspace(0.2, 4.0, 96)]
        mixed = [(b, st) for b, st in runs if len(set(st)) > 1 and any(p is not None for p in st)]
        late = [(b, st) for b, st in mixed if any(p is not None and p >= 2 for p in st)]
        if not mixed:
            raise SystemExit(f"{name}: no EOS strength gives greedy runs of different lengths")
        stops_at((late or mixed)[0][0])
        # Round the weights to the stored dtype so transformers and the engine see the same values.
        for p in model.parameters():
            p.copy_(p.to(dtype).to(torch.float32))
    save_model(model, cfg_dict, out, dtype, shards, store_lm_head=(style == "flan"))

    expected = {"input_ids": input_ids, "attention_mask": attn, "decoder_input_ids": dec_ids}
    with torch.no_grad():
        enc = model.encoder(input_ids=input_ids, attention_mask=attn).last_hidden_state
        logits = model(input_ids=input_ids, attention_mask=attn, decoder_input_ids=dec_ids).logits
        greedy_ids = greedy(model, input_ids, attn, gen_tokens)
    expected.update(encoder_output=enc, logits=logits, greedy=greedy_ids)

    # A PEFT LoRA adapter with non-zero B, saved the way peft saves it.
    lcfg = peft.LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.05, target_modules=lora_targets,
                           bias="none", task_type="SEQ_2_SEQ_LM")
    pmodel = peft.get_peft_model(model, lcfg).eval()
    with torch.no_grad():
        for n, p in pmodel.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, lora_b_std, generator=gen)
    pmodel.save_pretrained(os.path.join(out, "adapter"))
    os.remove(os.path.join(out, "adapter", "README.md"))
    v_w = torch.randn(1, cfg.d_model, generator=gen) * 0.3
    v_b = torch.randn(1, generator=gen)
    save_file({"v_head.summary.weight": v_w, "v_head.summary.bias": v_b},
              os.path.join(out, "adapter", "value_head.safetensors"))
    with torch.no_grad():
        o = pmodel(input_ids=input_ids, attention_mask=attn, decoder_input_ids=dec_ids, output_hidden_states=True)
        hidden = o.decoder_hidden_states[-1]
        values = (hidden @ v_w.T + v_b).squeeze(-1)
        greedy_lora = greedy(pmodel, input_ids, attn, gen_tokens)
    expected.update(logits_lora=o.logits, values_lora=values, greedy_lora=greedy_lora)

    save_file({k: as_f32(v) for k, v in expected.items()}, os.path.join(out, "expected.safetensors"))

    # The files on disk must mean the same model to transformers itself.
    reloaded = T5ForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        again = reloaded(input_ids=input_ids, attention_mask=attn, decoder_input_ids=dec_ids).logits
    assert torch.allclose(again, logits, atol=1e-5), f"{name}: reloaded checkpoint disagrees"
    ends = [(row == 1).nonzero().flatten().tolist()[:1] for row in greedy_ids]
    differs = greedy_ids.shape != greedy_lora.shape or not torch.equal(greedy_ids, greedy_lora)
    print(f"{name}: greedy EOS positions {ends}; LoRA greedy differs: {differs}")


def greedy(model, input_ids, attn, n):
    """Hugging Face generate; when the decoder is deeper than the encoder, transformers 5.17 sizes
    generate's KV cache by the encoder depth and fails, so argmax over full forwards instead."""
    if model.config.num_decoder_layers <= model.config.num_layers:
        return model.generate(input_ids=input_ids, attention_mask=attn, max_new_tokens=n, do_sample=False,
                              num_beams=1)
    ids = torch.zeros(input_ids.shape[0], 1, dtype=torch.long)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    for _ in range(n):
        nxt = model(input_ids=input_ids, attention_mask=attn, decoder_input_ids=ids).logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.zeros_like(nxt), nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        done |= nxt == 1
        if done.all():
            break
    return ids


def make_op_fixtures():
    torch.manual_seed(0)
    out = os.path.join(ROOT, "ops.safetensors")
    x = torch.linspace(-8, 8, 161)
    rel = torch.arange(-300, 301)
    t = {"gelu_x": x, "gelu_y": NewGELUActivation()(x), "rel": rel.float()}
    for bidir in (True, False):
        for nb, md in ((32, 128), (16, 24), (8, 20)):
            b = T5Attention._relative_position_bucket(rel, bidirectional=bidir, num_buckets=nb, max_distance=md)
            t[f"bucket_{'bi' if bidir else 'causal'}_{nb}_{md}"] = b.float()
    norm = T5LayerNorm(48, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        h = torch.randn(5, 48) * 30
        t.update(rms_x=h, rms_w=norm.weight.detach().clone(), rms_y=norm(h))
    save_file({k: as_f32(v) for k, v in t.items()}, out)


def main():
    check_versions()
    os.makedirs(ROOT, exist_ok=True)
    make_op_fixtures()
    make_t5_fixture("flan_small", 1,
                    dict(vocab_size=320, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2,
                         num_decoder_layers=2, relative_attention_num_buckets=8,
                         relative_attention_max_distance=20),
                    style="flan", dtype=torch.float32, shards=1, lora_targets=["q", "v"], lora_r=4,
                    lora_alpha=8, enc_lengths=[23, 9, 16], dec_len=11, gen_tokens=14)
    make_t5_fixture("odd_bf16", 2,
                    dict(vocab_size=288, d_model=48, d_kv=20, num_heads=3, d_ff=96, num_layers=3,
                         num_decoder_layers=2, relative_attention_num_buckets=16,
                         relative_attention_max_distance=24),
                    style="tf5", dtype=torch.bfloat16, shards=1,
                    lora_targets=["q", "k", "v", "o", "wi_0", "wi_1", "wo"], lora_r=3, lora_alpha=6,
                    enc_lengths=[30, 12, 5, 19], dec_len=9, gen_tokens=12, lora_b_std=0.2)
    make_t5_fixture("sharded_f16", 3,
                    dict(vocab_size=256, d_model=32, d_kv=16, num_heads=2, d_ff=64, num_layers=2,
                         num_decoder_layers=3, relative_attention_num_buckets=32,
                         relative_attention_max_distance=128),
                    style="v1.0", dtype=torch.float16, shards=2, lora_targets=["q", "k"], lora_r=2,
                    lora_alpha=2, enc_lengths=[7, 14], dec_len=8, gen_tokens=10, lora_b_std=2.0)


if __name__ == "__main__":
    main()
