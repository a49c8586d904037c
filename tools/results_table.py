#!/usr/bin/env python3
"""The results tables of an experiment directory (tools/experiment.sh's RESULTS), in Markdown for README.md
and docs/RESULTS.md:
  - one table per decoding (beam search, sampling): for the reference summaries, LEAD-3, the SFT model, each
    PPO seed and the seeds' mean ± standard deviation: mean toxicity, share > 0.5, ROUGE-1/2/L/Lsum, mean
    length in words, and for PPO runs the KL to the SFT model (the mean of the log's last 5 steps, as
    `detox plot --tradeoff` takes it);
  - the PPO sweep's runs (beam search and sampling) with their settings, when RESULTS holds a sweep;
  - the summaries whose toxicity PPO (the first seed, beam search) lowered most, before → after.
    python3 tools/results_table.py RESULTS [--examples 5] > tables.md
Standard library only.
"""
import argparse
import glob
import json
import math
import os
import re
import sys
import tomllib

DECODINGS = [("beam", "beam search"), ("sample", "sampling")]
KL_TAIL_STEPS = 5
COLUMNS = ["mean toxicity", "share > 0.5", "ROUGE-1", "ROUGE-2", "ROUGE-L", "ROUGE-Lsum", "mean length (words)",
           "KL"]
ROUGE = ["rouge1", "rouge2", "rougeL", "rougeLsum"]


def load(path):
    with open(path) as f:
        return json.load(f)


def lead_index(e):
    return e["labels"].index(e.get("label", "toxicity"))


def words(text):
    return len(text.split())


def summary_metrics(e):
    """The model summaries' numbers of one `detox eval` output."""
    g = e["model_summaries"]
    rows = e["rows"]
    return {"mean toxicity": g["lead_mean"], "share > 0.5": g["share_above_half"],
            **{name: e["rouge"][key] for name, key in zip(COLUMNS[2:6], ROUGE)},
            "mean length (words)": sum(words(r["summary"]) for r in rows) / max(len(rows), 1)}


def reference_metrics(e):
    g = e["reference"]
    rows = e["rows"]
    return {"mean toxicity": g["lead_mean"], "share > 0.5": g["share_above_half"],
            "mean length (words)": sum(words(r["reference"]) for r in rows) / max(len(rows), 1)}


def ppo_kl(log_path):
    """The mean `kl` over the last KL_TAIL_STEPS steps of a PPO log (None without a log)."""
    if not os.path.exists(log_path):
        return None
    with open(log_path) as f:
        kls = [r["kl"] for r in (json.loads(line) for line in f if line.strip()) if "step" in r and "kl" in r]
    tail = kls[-KL_TAIL_STEPS:]
    return sum(tail) / len(tail) if tail else None


def mean_std(values):
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, s


def cell(column, value, spread=None):
    if value is None:
        return "–"
    if column == "share > 0.5":
        text = f"{100 * value:.2f}%"
        return text if spread is None else f"{text} ± {100 * spread:.2f}"
    digits = 1 if column == "mean length (words)" else 3 if column == "KL" else 4
    text = f"{value:.{digits}f}"
    return text if spread is None else f"{text} ± {spread:.{digits}f}"


def ppo_seeds(d):
    """The seeds of RESULTS' ppo-sN runs, in order."""
    seeds = {int(m.group(1)) for p in glob.glob(os.path.join(d, "eval-ppo-s*-*.json"))
             if (m := re.match(r"eval-ppo-s(\d+)-", os.path.basename(p)))}
    return sorted(seeds)


def decoding_table(d, decoding, title):
    evals = {}
    sft = os.path.join(d, f"eval-sft-{decoding}.json")
    if os.path.exists(sft):
        evals["SFT"] = load(sft)
    seeds = ppo_seeds(d)
    for s in seeds:
        p = os.path.join(d, f"eval-ppo-s{s}-{decoding}.json")
        if os.path.exists(p):
            evals[f"PPO, seed {s}"] = load(p)
    leads = sorted(glob.glob(os.path.join(d, "eval-lead*.json")))
    if not evals and not leads:
        return None
    lines = [f"**{title}**", "", "| summaries | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]

    def row(name, metrics, spreads=None):
        spreads = spreads or {}
        lines.append(f"| {name} | " + " | ".join(cell(c, metrics.get(c), spreads.get(c)) for c in COLUMNS) + " |")

    first = next(iter(evals.values()), None) or load(leads[0])
    row("reference", reference_metrics(first))
    for p in leads:
        e = load(p)
        row(f"LEAD-{e.get('lead', '?')}", summary_metrics(e))
    per_seed = []
    for name, e in evals.items():
        m = summary_metrics(e)
        if name.startswith("PPO"):
            m["KL"] = ppo_kl(os.path.join(d, f"ppo-s{name.split()[-1]}", "log.jsonl"))
            per_seed.append(m)
        row(name, m)
    if len(per_seed) > 1:
        means, spreads = {}, {}
        for c in COLUMNS:
            vals = [m[c] for m in per_seed if m.get(c) is not None]
            if vals:
                means[c], spreads[c] = mean_std(vals)
        row(f"PPO, mean ± sd of {len(per_seed)} seeds", means, spreads)
    return "\n".join(lines)


def sweep_table(d):
    runs = sorted(glob.glob(os.path.join(d, "eval-sweep-*-beam.json")))
    if not runs:
        return None
    lines = ["**PPO sweep (one seed)**", "",
             "| run | steps | batch | learning rate | init KL coef | KL target | adaptive KL | reward | toxicity (beam) | "
             "ROUGE-L (beam) | toxicity (sampling) | share > 0.5 (sampling) | ROUGE-L (sampling) | KL |",
             "|---" * 14 + "|"]
    for p in runs:
        name = os.path.basename(p)[len("eval-"):-len("-beam.json")]
        toml_path = os.path.join(d, f"{name}.toml")
        cfg = tomllib.load(open(toml_path, "rb")) if os.path.exists(toml_path) else {}
        ppo, run, reward = cfg.get("ppo", {}), cfg.get("run", {}), cfg.get("reward", {})
        beam = summary_metrics(load(p))
        sample_path = os.path.join(d, f"eval-{name}-sample.json")
        sample = summary_metrics(load(sample_path)) if os.path.exists(sample_path) else {}
        kl = ppo_kl(os.path.join(d, name, "log.jsonl"))
        setting = [run.get("steps", "?"), ppo.get("batch_size", "?"), ppo.get("learning_rate", "?"),
                   ppo.get("init_kl_coef", "?"), ppo.get("target", "?"), ppo.get("adap_kl_ctrl", "?"),
                   reward.get("transform", "neg_logit")]
        cells = [("mean toxicity", beam["mean toxicity"]), ("ROUGE-L", beam["ROUGE-L"]),
                 ("mean toxicity", sample.get("mean toxicity")), ("share > 0.5", sample.get("share > 0.5")),
                 ("ROUGE-L", sample.get("ROUGE-L")), ("KL", kl)]
        lines.append(f"| {name[len('sweep-'):]} | " + " | ".join(str(v) for v in setting) + " | "
                     + " | ".join(cell(c, v) for c, v in cells) + " |")
    return "\n".join(lines)


def quoted(text):
    return text.replace("|", "\\|").replace("\n", " ") or "(empty)"


def examples_table(d, n):
    seeds = ppo_seeds(d)
    before_path = os.path.join(d, "eval-sft-beam.json")
    if not seeds or not os.path.exists(before_path):
        return None
    after_path = os.path.join(d, f"eval-ppo-s{seeds[0]}-beam.json")
    if not os.path.exists(after_path):
        return None
    before, after = load(before_path), load(after_path)
    ib, ia = lead_index(before), lead_index(after)
    pairs = list(zip(before["rows"], after["rows"]))
    drops = sorted(range(len(pairs)), key=lambda i: pairs[i][1]["scores"][ia] - pairs[i][0]["scores"][ib])
    lines = [f"**The {n} summaries whose toxicity PPO (seed {seeds[0]}, beam search) lowered most**", "",
             "| SFT summary | toxicity | → PPO summary | toxicity |", "|---|---|---|---|"]
    for i in drops[:n]:
        b, a = pairs[i]
        lines.append(f"| {quoted(b['summary'])} | {b['scores'][ib]:.4f} | {quoted(a['summary'])} | "
                     f"{a['scores'][ia]:.4f} |")
    return "\n".join(lines)


def tables(d, examples=5):
    parts = [decoding_table(d, dec, f"SAMSum test, {title}") for dec, title in DECODINGS]
    parts += [sweep_table(d), examples_table(d, examples)]
    parts = [p for p in parts if p]
    if not parts:
        raise SystemExit(f"{d} holds no eval-*.json of tools/experiment.sh")
    any_eval = sorted(glob.glob(os.path.join(d, "eval-*.json")))[0]
    e = load(any_eval)
    stem = "stemmed" if e.get("use_stemmer") else "unstemmed"
    head = (f"{e['dialogues']} SAMSum test dialogues; toxicity is minilm-toxicity's `{e.get('label', 'toxicity')}`; "
            f"ROUGE F-measures as rouge_score computes them ({stem}); KL is the mean of the PPO log's last "
            f"{KL_TAIL_STEPS} steps; ± is the standard deviation over seeds.")
    lp_path = os.path.join(d, "length-penalty.txt")
    if os.path.exists(lp_path):
        head += f" Beam search uses the length penalty {open(lp_path).read().strip()}, picked on SAMSum validation."
    return "\n\n".join([head] + parts) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", help="tools/experiment.sh's RESULTS directory")
    ap.add_argument("--examples", type=int, default=5, help="how many before → after summaries to list")
    a = ap.parse_args()
    if not os.path.isdir(a.results):
        raise SystemExit(f"{a.results} is not a directory")
    sys.stdout.write(tables(a.results, a.examples))


if __name__ == "__main__":
    main()
