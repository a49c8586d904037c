#!/usr/bin/env python3
"""Writes the reward-model parity fixtures under tests/fixtures/classifier/ with Hugging Face transformers (fp32)
as the oracle:

- minilm/expected.json: what ../shared/models/minilm-toxicity computes on SAMSum test reference summaries, clearly
  toxic sentences, the empty string and texts longer than 512 tokens. The model stays in ../shared; SAMSum rows are
  named by their `id` only (the data set's licence forbids copying it into the project) and tests read the text
  from ../shared/data/samsum/test.jsonl.
- roberta_tiny/: a random-weight RobertaForSequenceClassification with Detoxify `unbiased`'s 16 labels and the real
  roberta-base vocabulary (fp16 safetensors + config.json; the tokenizer stays in ../shared), with expected.json.
- detoxify_original_tiny/: a random-weight BERT classifier written in Detoxify's torch-pickle layout, converted by
  tools/convert_detoxify.py (config.json + model.safetensors kept; the tokenizer stays in ../shared), with the
  probabilities transformers computes from the unconverted weights.

Every expected.json holds, per text, the token ids (the tokenizers library on the same tokenizer.json, truncated at
512 tokens as Detoxify's `tokenizer(..., truncation=True)` does), the logits and the sigmoid probabilities. Weights
are rounded to fp16 before the oracle runs, so transformers and the engine see the same values.

Run from the repository root with the pinned versions of tools/requirements-oracle.txt:
    /opt/oracle/bin/python tools/make_classifier_fixtures.py
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import safetensors
import tokenizers
import torch
import transformers
from safetensors.torch import save_file
from transformers import (AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification,
                          RobertaConfig, RobertaForSequenceClassification)

PINNED = {"torch": "2.11.0", "transformers": "5.17.0", "safetensors": "0.8.0"}
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "tests", "fixtures", "classifier")
SHARED = os.path.join(HERE, "..", "..", "shared")
MAX_TOKENS = 512

DETOXIFY_ORIGINAL_COLUMNS = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]
UNBIASED_LABELS = ["toxicity", "severe_toxicity", "obscene", "identity_attack", "insult", "threat", "sexual_explicit",
                   "male", "female", "homosexual_gay_or_lesbian", "christian", "jewish", "muslim", "black", "white",
                   "psychiatric_or_mental_illness"]

TOXIC = [
    "You are a stupid idiot and I hate you.",
    "Shut up, you worthless piece of garbage.",
    "What a pathetic loser, nobody wants you here.",
    "You're a disgusting moron and everyone laughs at you.",
    "Go to hell, you ugly brainless clown.",
    "This is the dumbest crap I have ever read, you fool.",
    "Only an imbecile like you would write such idiotic trash.",
    "Get lost, you miserable jerk.",
]
BENIGN = [
    "Amanda will bring Jerry some cookies tomorrow.",
    "Hello world",
    "The meeting is moved to Thursday at 3 pm because Tom is ill.",
]


def versions():
    have = {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "tokenizers": tokenizers.__version__}
    for mod, want in PINNED.items():
        if have[mod] != want:
            print(f"warning: {mod} {have[mod]} is not the pinned {want}; fixtures may differ", file=sys.stderr)
    return have


def long_text(toxic_first):
    """Well over 512 tokens of plain prose; the insult sits where truncation keeps it or cuts it off."""
    filler = " ".join(f"On day {i} the group walked along the river, talked about books and had a quiet lunch."
                      for i in range(60))
    return f"{TOXIC[0]} {filler}" if toxic_first else f"{filler} {TOXIC[0]}"


def tokenize(tokenizer_file, texts):
    tok = tokenizers.Tokenizer.from_file(tokenizer_file)
    tok.no_padding()
    tok.enable_truncation(MAX_TOKENS)
    return [e.ids for e in tok.encode_batch(texts)]


def oracle(model, id_lists, pad_id):
    """One right-padded batch through transformers, as Detoxify's predict runs it."""
    width = max(len(x) for x in id_lists)
    ids = torch.full((len(id_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(id_lists):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).logits
    return logits.float()


def randomize(model, seed):
    """Weights large enough that logits spread over several units (transformers' 0.02 init leaves every
    probability at 0.5), rounded to fp16 so the stored file is exactly the model the oracle ran."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
            elif "embeddings" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            p.copy_(p.half().float())
    return model.eval()


def write_expected(out, meta, rows, logits):
    for row, lg in zip(rows, logits):
        row["logits"] = [float(v) for v in lg]
        row["probs"] = [float(v) for v in torch.sigmoid(lg)]
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)
        f.write("\n")


def config_dict(model):
    d = model.config.to_dict()
    for k in ["transformers_version", "_name_or_path", "dtype", "output_hidden_states", "return_dict",
              "output_attentions", "chunk_size_feed_forward", "use_cache", "is_decoder", "add_cross_attention"]:
        d.pop(k, None)
    return d


def save_hf(model, out):
    os.makedirs(out, exist_ok=True)
    sd = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config_dict(model), f, indent=2, sort_keys=True)
        f.write("\n")


def check_reload(out, model, id_lists, pad_id):
    """The directory must mean the same model to transformers itself."""
    again = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    a, b = oracle(again, id_lists, pad_id), oracle(model, id_lists, pad_id)
    assert torch.allclose(a, b, atol=1e-5), f"{out}: reloaded checkpoint disagrees by {(a - b).abs().max()}"


def detoxify_checkpoint(model, base_model, model_name, tokenizer_name, classes, **dataset_args):
    """A dictionary laid out as Detoxify's released checkpoints are: the Hugging Face state dict (with the
    position_ids buffer transformers 3.x saved) and the training config that names the base model."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    prefix = "bert" if model_name.startswith("Bert") else "roberta"
    sd[f"{prefix}.embeddings.position_ids"] = torch.arange(model.config.max_position_embeddings)[None]
    return {
        "state_dict": sd,
        "config": {
            "name": f"tiny_{prefix}",
            "arch": {"type": prefix.upper(), "args": {"num_classes": model.config.num_labels,
                                                      "model_type": base_model, "model_name": model_name,
                                                      "tokenizer_name": tokenizer_name}},
            "dataset": {"type": "JigsawData", "args": {"classes": classes, **dataset_args}},
        },
    }


def tiny_bert(num_labels, seed, hidden=24, heads=12):
    cfg = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                     intermediate_size=2 * hidden, max_position_embeddings=512, type_vocab_size=2,
                     layer_norm_eps=1e-12, pad_token_id=0, num_labels=num_labels,
                     problem_type="multi_label_classification")
    torch.manual_seed(seed)
    return randomize(BertForSequenceClassification(cfg), seed)


def tiny_roberta(num_labels, seed, layers=3, hidden=16, heads=4):
    cfg = RobertaConfig(vocab_size=50265, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * hidden, max_position_embeddings=514, type_vocab_size=1,
                        layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2, num_labels=num_labels,
                        problem_type="multi_label_classification")
    torch.manual_seed(seed)
    return randomize(RobertaForSequenceClassification(cfg), seed)


def convert(ckpt_path, tokenizer, out, *extra):
    cmd = [sys.executable, os.path.join(HERE, "convert_detoxify.py"), ckpt_path, "--tokenizer", tokenizer,
           "--out", out, *extra]
    return subprocess.run(cmd, capture_output=True, text=True)


def make_minilm(meta):
    model_dir = os.path.join(SHARED, "models", "minilm-toxicity")
    tokenizer = os.path.join(model_dir, "tokenizer.json")
    with open(os.path.join(SHARED, "data", "samsum", "test.jsonl")) as f:
        samsum = [json.loads(line) for line in f if line.strip()]
    picked = samsum[::20]
    rows = [{"samsum_test_id": r["id"]} for r in picked]
    texts = [r["summary"] for r in picked]
    own = TOXIC + BENIGN + ["", long_text(False), long_text(True)]
    rows += [{"text": t} for t in own]
    texts += own
    ids = tokenize(tokenizer, texts)
    assert max(len(x) for x in ids) == MAX_TOKENS, "a long text must reach the truncation limit"
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    for row, x in zip(rows, ids):
        row["input_ids"] = x
    logits = oracle(model, ids, 0)
    out = os.path.join(ROOT, "minilm")
    os.makedirs(out, exist_ok=True)
    write_expected(out, {**meta, "model": "../shared/models/minilm-toxicity", "labels": ["toxicity"]}, rows, logits)
    probs = torch.sigmoid(logits[:, 0])
    print(f"minilm: {len(rows)} texts; mean over the SAMSum rows {probs[: len(picked)].mean():.4f}")
    # MODEL_CARD.md's sanity values (0.0028, 0.9984) are reproduced only by padding to 128 tokens with
    # the padding attended to; Detoxify masks padding, as the oracle above does.
    card = [BENIGN[0], TOXIC[0]]
    padded = torch.zeros(2, 128, dtype=torch.long)
    for i, t in enumerate(card):
        x = ids[texts.index(t)]
        padded[i, : len(x)] = torch.tensor(x)
    with torch.no_grad():
        unmasked = torch.sigmoid(model(input_ids=padded).logits[:, 0])
    for i, t in enumerate(card):
        print(f"  {t!r}: masked {probs[texts.index(t)]:.4f}, padded to 128 unmasked {unmasked[i]:.4f}")


def make_roberta(meta):
    tokenizer = os.path.join(SHARED, "tokenizers", "roberta-base", "tokenizer.json")
    model = tiny_roberta(len(UNBIASED_LABELS), seed=11)
    model.config.id2label = dict(enumerate(UNBIASED_LABELS))
    model.config.label2id = {n: i for i, n in enumerate(UNBIASED_LABELS)}
    texts = TOXIC[:4] + BENIGN + [
        "",
        "a",
        "Emoji and accents: café, naïve, 🙂🔥, 東京.",
        # A literal <pad> is tokenized to the pad id: transformers' positions skip it, the attention mask keeps it.
        "before <pad> after",
        "   leading and trailing spaces   ",
        long_text(True),
    ]
    ids = tokenize(tokenizer, texts)
    assert ids[texts.index("Hello world")] == [0, 31414, 232, 2]
    assert 1 in ids[texts.index("before <pad> after")], "the literal <pad> should map to the pad id"
    assert len(ids[-1]) == MAX_TOKENS
    out = os.path.join(ROOT, "roberta_tiny")
    shutil.rmtree(out, ignore_errors=True)
    save_hf(model, out)
    check_reload(out, model, ids, 1)
    write_expected(out, {**meta, "tokenizer": "../shared/tokenizers/roberta-base/tokenizer.json",
                         "labels": UNBIASED_LABELS},
                   [{"text": t, "input_ids": x} for t, x in zip(texts, ids)], oracle(model, ids, 1))
    print(f"roberta_tiny: {len(texts)} texts, {os.path.getsize(os.path.join(out, 'model.safetensors'))} bytes")


def make_detoxify(meta):
    tokenizer = os.path.join(SHARED, "tokenizers", "bert-base-uncased", "tokenizer.json")
    model = tiny_bert(len(DETOXIFY_ORIGINAL_COLUMNS), seed=7)
    texts = TOXIC[:4] + BENIGN + ["", "A", "Numbers 12345 and punctuation?!", long_text(False)]
    ids = tokenize(tokenizer, texts)
    out = os.path.join(ROOT, "detoxify_original_tiny")
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "toxic_original-tiny.ckpt")
        torch.save(detoxify_checkpoint(model, "bert-base-uncased", "BertForSequenceClassification", "BertTokenizer",
                                       DETOXIFY_ORIGINAL_COLUMNS), ckpt)
        converted = os.path.join(tmp, "converted")
        r = convert(ckpt, tokenizer, converted)
        if r.returncode:
            raise SystemExit(f"convert_detoxify.py failed: {r.stderr}")
        print(r.stdout.strip())
        check_reload(converted, model, ids, 0)
        os.makedirs(out)
        for name in ("config.json", "model.safetensors"):
            shutil.copyfile(os.path.join(converted, name), os.path.join(out, name))
    with open(os.path.join(out, "config.json")) as f:
        labels = list(json.load(f)["id2label"].values())
    write_expected(out, {**meta, "tokenizer": "../shared/tokenizers/bert-base-uncased/tokenizer.json",
                         "labels": labels},
                   [{"text": t, "input_ids": x} for t, x in zip(texts, ids)], oracle(model, ids, 0))
    print(f"detoxify_original_tiny: labels {labels}")


def main():
    meta = {"generator": "tools/make_classifier_fixtures.py", "versions": versions()}
    print(f"versions: {meta['versions']}")
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    os.makedirs(ROOT, exist_ok=True)
    make_minilm(meta)
    make_roberta(meta)
    make_detoxify(meta)


if __name__ == "__main__":
    main()
