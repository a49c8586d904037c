#!/usr/bin/env python3
"""Converts a Detoxify checkpoint (a torch pickle of {"state_dict", "config"}) into the Hugging Face layout that
`detox score` and the PPO reward load: config.json, model.safetensors (fp16 by default) and tokenizer.json.

Detoxify stores no transformers config of its own: `config["arch"]["args"]["model_type"]` names the Hugging Face
base model (bert-base-uncased for `original`, roberta-base for `unbiased`) whose config it was built from. The
sizes that the weights fix (vocabulary, hidden size, layers, intermediate size, positions, labels) are read from the
state dict; what they cannot tell (attention heads, LayerNorm eps, pad id) comes from the known base models below,
or from a Hugging Face config.json given with --hf-config (Detoxify's `huggingface_config_path`).

    /opt/oracle/bin/python tools/convert_detoxify.py toxic_original-c1212f89.ckpt \\
        --tokenizer ../shared/tokenizers/bert-base-uncased/tokenizer.json --out models/detoxify-original

The checkpoint is read with torch.load(weights_only=True), which refuses arbitrary pickled objects; --trust-pickle
lifts that for a file whose origin you trust.
"""
import argparse
import json
import os
import re
import shutil
import sys

import torch
from safetensors.torch import save_file

# Detoxify's load_checkpoint renames the Jigsaw column names to these.
RENAMED = {"toxic": "toxicity", "identity_hate": "identity_attack", "severe_toxic": "severe_toxicity"}

# The `unbiased` model predicts 16 outputs but its config lists only the first 7 as classes; the other 9 are the
# identity subgroups of the Jigsaw Unintended Bias data, in this order.
UNBIASED_CLASSES = ["toxicity", "severe_toxicity", "obscene", "identity_attack", "insult", "threat",
                    "sexual_explicit"]
UNBIASED_IDENTITIES = ["male", "female", "homosexual_gay_or_lesbian", "christian", "jewish", "muslim", "black",
                       "white", "psychiatric_or_mental_illness"]

ARCHS = {"BertForSequenceClassification": "bert", "RobertaForSequenceClassification": "roberta"}

# What the weights cannot tell, for the base models Detoxify builds on (their Hugging Face config.json values).
KNOWN_BASES = {
    "bert-base-uncased": {"model_type": "bert", "num_attention_heads": 12, "layer_norm_eps": 1e-12,
                          "pad_token_id": 0, "hidden_act": "gelu"},
    "roberta-base": {"model_type": "roberta", "num_attention_heads": 12, "layer_norm_eps": 1e-5,
                     "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "hidden_act": "gelu"},
}


class ConversionError(Exception):
    pass


def load_checkpoint(path, trust_pickle):
    if not os.path.isfile(path):
        raise ConversionError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or others depending on the damage
        msg = str(e)
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", msg)
        if refused and not trust_pickle:
            raise ConversionError(
                f"{path} holds a pickled {refused.group(1)}, which torch.load(weights_only=True) refuses to load. "
                "If you trust where the file comes from, pass --trust-pickle") from e
        reason = re.search(r"WeightsUnpickler error:\s*(.+)", msg)
        reason = reason.group(1) if reason else msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
        raise ConversionError(f"{path} is not a readable torch checkpoint ({reason})") from e


def field(obj, keys, what):
    """obj[keys[0]][keys[1]]..., naming the whole path when a level is missing."""
    cur = obj
    for i, k in enumerate(keys):
        if not isinstance(cur, dict) or k not in cur:
            path = "".join(f'["{x}"]' for x in keys[: i + 1])
            raise ConversionError(f"{what} has no checkpoint{path}; is it a Detoxify checkpoint?")
        cur = cur[k]
    return cur


def shape_of(sd, name, ndim, path):
    if name not in sd:
        raise ConversionError(f"{path}: tensor {name} is missing from the state dict")
    t = sd[name]
    if not torch.is_tensor(t) or t.dim() != ndim:
        raise ConversionError(f"{path}: {name} should be a {ndim}-dimensional tensor")
    return list(t.shape)


def label_names(classes, num_classes, dataset_args, path):
    names = [RENAMED.get(c, c) for c in classes]
    if len(names) > num_classes:
        raise ConversionError(f"{path}: {len(names)} class names for a model with {num_classes} outputs")
    extra = num_classes - len(names)
    identities = dataset_args.get("identity_classes")
    if extra and isinstance(identities, list) and len(identities) == extra:
        names += list(identities)
    elif extra and names == UNBIASED_CLASSES and extra == len(UNBIASED_IDENTITIES):
        names += UNBIASED_IDENTITIES
    else:
        names += [f"label_{i}" for i in range(len(names), num_classes)]
    if len(set(names)) != len(names):
        raise ConversionError(f"{path}: class names are not unique: {names}")
    return names


def build_config(ckpt, sd, base, path):
    args = field(ckpt, ["config", "arch", "args"], path)
    model_name = field(ckpt, ["config", "arch", "args", "model_name"], path)
    num_classes = field(ckpt, ["config", "arch", "args", "num_classes"], path)
    dataset_args = field(ckpt, ["config", "dataset", "args"], path)
    classes = field(ckpt, ["config", "dataset", "args", "classes"], path)
    if model_name not in ARCHS:
        raise ConversionError(f"{path}: model_name {model_name!r} is not supported; detox runs "
                              + " and ".join(sorted(ARCHS)) + " (Detoxify's original and unbiased models)")
    prefix = ARCHS[model_name]
    if base["model_type"] != prefix:
        raise ConversionError(f"{path}: the base config is model_type {base['model_type']!r} but model_name "
                              f"{model_name} needs {prefix!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConversionError(f"{path}: num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ConversionError(f"{path}: dataset classes must be a list of names, got {classes!r}")

    vocab, hidden = shape_of(sd, f"{prefix}.embeddings.word_embeddings.weight", 2, path)
    positions = shape_of(sd, f"{prefix}.embeddings.position_embeddings.weight", 2, path)[0]
    types = shape_of(sd, f"{prefix}.embeddings.token_type_embeddings.weight", 2, path)[0]
    layer_ids = {int(m.group(1)) for k in sd for m in [re.match(rf"{prefix}\.encoder\.layer\.(\d+)\.", k)] if m}
    layers = len(layer_ids)
    if layers == 0 or layer_ids != set(range(layers)):
        raise ConversionError(f"{path}: encoder layers {sorted(layer_ids)} are not numbered 0..N-1")
    intermediate = shape_of(sd, f"{prefix}.encoder.layer.0.intermediate.dense.weight", 2, path)[0]
    head = "classifier.weight" if prefix == "bert" else "classifier.out_proj.weight"
    outputs = shape_of(sd, head, 2, path)[0]
    if outputs != num_classes:
        raise ConversionError(f"{path}: {head} has {outputs} outputs but num_classes is {num_classes}")
    heads = base["num_attention_heads"]
    if hidden % heads:
        raise ConversionError(f"{path}: hidden size {hidden} is not divisible by {heads} attention heads; pass "
                              "--hf-config with the model's num_attention_heads")
    derived = {"vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
               "intermediate_size": intermediate, "max_position_embeddings": positions, "type_vocab_size": types}
    for k, v in derived.items():
        if k in base and base[k] != v:
            raise ConversionError(f"{path}: the weights have {k} {v} but the base config says {base[k]}")

    labels = label_names(classes, num_classes, dataset_args, path)
    config = {
        "architectures": [model_name],
        "model_type": prefix,
        **derived,
        "num_attention_heads": heads,
        "hidden_act": base.get("hidden_act", "gelu"),
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "initializer_range": 0.02,
        "layer_norm_eps": base["layer_norm_eps"],
        "pad_token_id": base["pad_token_id"],
        "position_embedding_type": "absolute",
        "problem_type": "multi_label_classification",
        "id2label": {str(i): n for i, n in enumerate(labels)},
        "label2id": {n: i for i, n in enumerate(labels)},
        "detoxify": {"checkpoint": os.path.basename(path), "base_model": args.get("model_type")},
    }
    for k in ("bos_token_id", "eos_token_id"):
        if k in base:
            config[k] = base[k]
    return config


def base_config(ckpt, hf_config, path):
    if hf_config:
        try:
            with open(hf_config) as f:
                base = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConversionError(f"cannot read --hf-config {hf_config}: {e}") from e
        missing = [k for k in ("model_type", "num_attention_heads", "layer_norm_eps", "pad_token_id") if k not in base]
        if missing:
            raise ConversionError(f"--hf-config {hf_config} lacks {', '.join(missing)}")
        return base
    name = field(ckpt, ["config", "arch", "args", "model_type"], path)
    if name not in KNOWN_BASES:
        raise ConversionError(f"{path}: base model {name!r} is not one this converter knows ("
                              + ", ".join(sorted(KNOWN_BASES)) + "); pass its config.json with --hf-config")
    return dict(KNOWN_BASES[name])


def check_tokenizer(tokenizer, vocab):
    if not os.path.isfile(tokenizer):
        raise ConversionError(f"tokenizer file {tokenizer} does not exist")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return
    try:
        size = Tokenizer.from_file(tokenizer).get_vocab_size(with_added_tokens=True)
    except Exception as e:
        raise ConversionError(f"cannot load tokenizer {tokenizer}: {e}") from e
    if size > vocab:
        raise ConversionError(f"tokenizer {tokenizer} has {size} tokens but the model's embedding has only {vocab} "
                              "rows: is it the tokenizer of this model's base?")


def convert(checkpoint, tokenizer, out, hf_config=None, dtype="fp16", trust_pickle=False):
    ckpt = load_checkpoint(checkpoint, trust_pickle)
    if not isinstance(ckpt, dict):
        raise ConversionError(f"{checkpoint} holds a {type(ckpt).__name__}, not a Detoxify "
                              '{"state_dict", "config"} dictionary')
    sd = field(ckpt, ["state_dict"], checkpoint)
    if not isinstance(sd, dict):
        raise ConversionError(f"{checkpoint}: state_dict is a {type(sd).__name__}, not a dictionary of tensors")
    config = build_config(ckpt, sd, base_config(ckpt, hf_config, checkpoint), checkpoint)
    check_tokenizer(tokenizer, config["vocab_size"])

    target = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    tensors, skipped = {}, []
    for name, t in sd.items():
        # Integer buffers (position_ids, token_type_ids) are rebuilt by every loader; only weights travel.
        if not torch.is_tensor(t) or not t.is_floating_point():
            skipped.append(name)
            continue
        if target == torch.float16 and t.abs().max().item() > torch.finfo(torch.float16).max:
            raise ConversionError(f"{checkpoint}: {name} has values beyond the fp16 range; use --dtype fp32")
        tensors[name] = t.detach().to(target).contiguous()

    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    shutil.copyfile(tokenizer, os.path.join(out, "tokenizer.json"))
    return config, skipped


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="Detoxify .ckpt file (torch pickle)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json of the base model, copied into --out")
    p.add_argument("--out", required=True, help="directory to write config.json, model.safetensors, tokenizer.json")
    p.add_argument("--hf-config", help="Hugging Face config.json of the base model, for bases not known here")
    p.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16", help="storage type of the weights")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow arbitrary pickled objects (torch.load weights_only=False)")
    a = p.parse_args(argv)
    try:
        config, skipped = convert(a.checkpoint, a.tokenizer, a.out, a.hf_config, a.dtype, a.trust_pickle)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    labels = list(config["id2label"].values())
    print(f"wrote {a.out}: {config['architectures'][0]}, {config['num_hidden_layers']} layers, hidden "
          f"{config['hidden_size']}, {len(labels)} labels ({', '.join(labels)})"
          + (f"; left out non-weight entries {', '.join(skipped)}" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
