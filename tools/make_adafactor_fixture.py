#!/usr/bin/env python3
"""Writes tests/fixtures/adafactor/: three steps of `transformers.optimization.Adafactor` on a few small tensors,
the oracle for the engine's Adafactor (src/backend/cpu/optim.rs, and through it the CUDA kernels).

Tensors: `a` [6, 5] and `b` [4, 5] (2-D: factored second moments; the engine also stacks them into one [10, 5]
weight of two parts, which must match them updated apart) and `c` [7] (1-D: unfactored). Each step draws new
gradients of varied scale. Cases, one optimizer each (argument names as transformers'):
  relative: lr=None, relative_step=True, scale_parameter=True, warmup_init=False (transformers' defaults);
  warmup:   lr=None, relative_step=True, scale_parameter=True, warmup_init=True;
  external: lr=0.01, relative_step=False, scale_parameter=False, beta1=0.9, weight_decay=0.1, clip_threshold=0.5,
            decay_rate=-0.7, eps=(1e-30, 1e-3).
Files: <case>.safetensors with `<t>.param.0` (initial), and for each step s = 1..3 `<t>.grad.<s>` and
`<t>.param.<s>` (after the step); cases.json with each case's arguments.

Run from the repository root with the oracle's Python (tools/requirements-oracle.txt):
    /work/oracle-venv/bin/python tools/make_adafactor_fixture.py
"""
import json
import os

import torch
import transformers
from safetensors.torch import save_file
from transformers.optimization import Adafactor

PINNED = {"torch": "2.11.0", "transformers": "5.17.0"}
OUT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures",
                                    "adafactor"))
SEED = 20261202
SHAPES = {"a": (6, 5), "b": (4, 5), "c": (7,)}
STEPS = 3
CASES = {
    "relative": dict(lr=None, relative_step=True, scale_parameter=True, warmup_init=False),
    "warmup": dict(lr=None, relative_step=True, scale_parameter=True, warmup_init=True),
    "external": dict(lr=0.01, relative_step=False, scale_parameter=False, warmup_init=False, beta1=0.9,
                     weight_decay=0.1, clip_threshold=0.5, decay_rate=-0.7, eps=(1e-30, 1e-3)),
}
# transformers' defaults for the arguments a case leaves out, recorded so the test reads every value.
DEFAULTS = dict(eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, beta1=None, weight_decay=0.0)


def run(case):
    gen = torch.Generator().manual_seed(SEED)
    params = {n: torch.nn.Parameter(torch.randn(s, generator=gen) * 0.5) for n, s in SHAPES.items()}
    out = {f"{n}.param.0": p.detach().clone() for n, p in params.items()}
    opt = Adafactor(list(params.values()), **CASES[case])
    for step in range(1, STEPS + 1):
        for n, p in params.items():
            g = torch.randn(p.shape, generator=gen) * (0.1 * step)
            p.grad = g
            out[f"{n}.grad.{step}"] = g.clone()
        opt.step()
        for n, p in params.items():
            out[f"{n}.param.{step}"] = p.detach().clone()
    return out


def main():
    for pkg, want in PINNED.items():
        have = (torch if pkg == "torch" else transformers).__version__.split("+")[0]
        if have != want:
            print(f"warning: {pkg} {have}, fixtures were made with {want}")
    os.makedirs(OUT, exist_ok=True)
    meta = {}
    for case in CASES:
        save_file(run(case), os.path.join(OUT, f"{case}.safetensors"), metadata={"format": "pt"})
        meta[case] = {**DEFAULTS, **CASES[case]}
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump({"steps": STEPS, "cases": meta}, f, indent=2)
    print(f"wrote {OUT}: {', '.join(CASES)}")


if __name__ == "__main__":
    main()
