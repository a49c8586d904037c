#!/usr/bin/env python3
"""Checks that peft loads an adapter directory `detox train` wrote (PEFT's own format), onto the base
model it was trained from, and that the weights it loads are the file's:
    python3 tools/check_peft_adapter.py --model BASE_DIR --adapter CHECKPOINT_DIR
Prints one JSON line; exits non-zero when peft refuses the adapter or a weight differs.
"""
import argparse
import json

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import T5ForConditionalGeneration


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", required=True)
    a = p.parse_args()
    base = T5ForConditionalGeneration.from_pretrained(a.model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, a.adapter).eval()
    saved = load_file(f"{a.adapter}/adapter_model.safetensors")
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    missing = [k for k in saved if k not in loaded]
    worst = max(float((loaded[k] - saved[k]).abs().max()) for k in saved if k in loaded)
    ids = torch.tensor([[71, 10, 7102, 272, 10, 3, 63, 32, 1]])
    dec = torch.tensor([[0, 37, 15, 9]])
    with torch.no_grad():
        on = model(input_ids=ids, decoder_input_ids=dec).logits
        with model.disable_adapter():
            off = model(input_ids=ids, decoder_input_ids=dec).logits
    report = {"adapter": a.adapter, "tensors": len(saved), "missing": missing, "max_abs_diff": worst,
              "adapter_changes_logits": float((on - off).abs().max())}
    print(json.dumps(report))
    if missing or worst > 0:
        raise SystemExit("peft did not load the adapter as written")


if __name__ == "__main__":
    main()
