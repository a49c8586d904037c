#!/usr/bin/env python3
"""The seed-style results table of an experiment directory (tools/experiment.sh's output): for the reference
summaries, the SFT model and each PPO run, the mean toxicity, the share above 0.5, ROUGE-1/2/L against the
references and, for PPO runs, the KL to the SFT model over the last 5 steps.
    python3 tools/results_table.py EXPERIMENT_DIR > table.md
"""
import json
import os
import sys

RUNS = [("SFT model", "eval-sft.json", None), ("detoxified, seed's setting", "eval-ppo-seed.json", "ppo-seed"),
        ("detoxified, larger batch", "eval-ppo-large.json", "ppo-large")]


def main():
    d = sys.argv[1]
    rows, ref = [], None
    for name, file, run in RUNS:
        path = os.path.join(d, file)
        if not os.path.exists(path):
            continue
        e = json.load(open(path))
        ref = ref or e
        kl = "–"
        log = os.path.join(d, run, "log.jsonl") if run else None
        if log and os.path.exists(log):
            steps = [json.loads(l) for l in open(log) if l.strip()]
            tail = steps[-5:]
            kl = f"{sum(s['kl'] for s in tail) / len(tail):.3f}"
        m, r = e["model_summaries"], e["rouge"]
        rows.append(f"| {name} | {m['lead_mean']:.4f} | {100 * m['share_above_half']:.2f}% | {r['rouge1']:.4f} | "
                    f"{r['rouge2']:.4f} | {r['rougeL']:.4f} | {kl} |")
    if ref is None:
        raise SystemExit(f"{d} holds no eval-*.json")
    g = ref["reference"]
    print(f"{ref['dialogues']} SAMSum test dialogues; toxicity from minilm-toxicity.\n")
    print("| summaries | mean toxicity | share > 0.5 | ROUGE-1 | ROUGE-2 | ROUGE-L | KL (last 5 steps) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| reference | {g['lead_mean']:.4f} | {100 * g['share_above_half']:.2f}% | – | – | – | – |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
