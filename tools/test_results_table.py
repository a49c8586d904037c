#!/usr/bin/env python3
"""Tests tools/results_table.py on a small synthetic RESULTS directory laid out as tools/experiment.sh writes
it (eval JSON of `detox eval`, PPO logs, sweep TOMLs); standard library only:
    python3 tools/test_results_table.py
"""
import json
import os
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import results_table  # noqa: E402


def eval_json(tox, share, rouge_l, summaries, scores, lead=None):
    """A `detox eval` output with one label; references of two words each, toxicity 0.01."""
    return {"dialogues": len(summaries), "labels": ["toxicity"], "label": "toxicity", "lead": lead,
            "use_stemmer": True,
            "reference": {"lead_mean": 0.01, "share_above_half": 0.0, "label_means": [["toxicity", 0.01]]},
            "model_summaries": {"lead_mean": tox, "share_above_half": share, "label_means": [["toxicity", tox]]},
            "rouge": {"rouge1": 0.3, "rouge2": 0.1, "rougeL": rouge_l, "rougeLsum": rouge_l + 0.01},
            "rows": [{"summary": s, "reference": "a b", "scores": [p], "reference_scores": [0.01]}
                     for s, p in zip(summaries, scores)]}


class ResultsTable(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        d = self.d = self.tmp.name

        def write(name, value):
            path = os.path.join(d, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(value if isinstance(value, str) else json.dumps(value))

        sft_summaries = ["Amanda a a a a a", "Tom calls Ann", "Kate | hates it"]
        write("eval-lead3.json", eval_json(0.02, 0.0, 0.2, ["x y z"] * 3, [0.02] * 3, lead=3))
        for dec in ["beam", "sample"]:
            write(f"eval-sft-{dec}.json", eval_json(0.3, 0.25, 0.25, sft_summaries, [0.8, 0.05, 0.4]))
            for seed, tox in [(0, 0.1), (1, 0.2), (2, 0.3)]:
                write(f"eval-ppo-s{seed}-{dec}.json",
                      eval_json(tox, 0.1, 0.24, ["Amanda will come", "Tom calls Ann", "Kate\nlikes it"],
                                [0.01, 0.06, 0.1]))
        for seed, kls in [(0, [9, 1, 1, 1, 1, 1]), (1, [2, 2, 2, 2, 2]), (2, [3])]:
            write(f"ppo-s{seed}/log.jsonl", "".join(json.dumps({"step": i + 1, "kl": k}) + "\n"
                                                  for i, k in enumerate(kls)))
        write("eval-sweep-lr-2x-beam.json", eval_json(0.05, 0.01, 0.2, ["a"], [0.05]))
        write("eval-sweep-lr-2x-sample.json", eval_json(0.07, 0.02, 0.15, ["b"], [0.07]))
        write("length-penalty.txt", "1.5\n")
        write("sweep-lr-2x.toml", "[reward]\ntransform = \"neg_prob\"\n[ppo]\nbatch_size = 16\nlearning_rate = 2.82e-5\n"
                                  "init_kl_coef = 0.2\ntarget = 6.0\nadap_kl_ctrl = true\n[run]\nsteps = 50\n")
        write("sweep-lr-2x/log.jsonl", json.dumps({"step": 1, "kl": 0.75}) + "\n")

    def tearDown(self):
        self.tmp.cleanup()

    def run_tool(self, *args):
        out = subprocess.run([sys.executable, os.path.join(HERE, "results_table.py"), self.d, *args],
                             capture_output=True, text=True)
        self.assertEqual(out.returncode, 0, out.stderr)
        return out.stdout

    def row(self, text, table_title, name):
        table = text.split(f"**{table_title}**")[1].split("\n\n**")[0]
        rows = [r for r in table.splitlines() if r.startswith(f"| {name} |")]
        self.assertEqual(len(rows), 1, table)
        return [c.strip() for c in rows[0].strip("|").split("|")]

    def test_rows_per_model_and_decoding(self):
        text = self.run_tool()
        for title in ["SAMSum test, beam search", "SAMSum test, sampling"]:
            ref = self.row(text, title, "reference")
            self.assertEqual(ref[1:4], ["0.0100", "0.00%", "–"])
            self.assertEqual(ref[7], "2.0")  # two words per reference
            lead = self.row(text, title, "LEAD-3")
            self.assertEqual(lead[1], "0.0200")
            self.assertEqual(lead[7], "3.0")
            sft = self.row(text, title, "SFT")
            # mean length of the SFT summaries: (6 + 3 + 4) / 3 words ("|" counts as a word)
            self.assertEqual(sft[1:8], ["0.3000", "25.00%", "0.3000", "0.1000", "0.2500", "0.2600", "4.3"])
            self.assertEqual(sft[8], "–")
            # KL: the mean of each log's last five steps
            self.assertEqual(self.row(text, title, "PPO, seed 0")[8], "1.000")
            self.assertEqual(self.row(text, title, "PPO, seed 1")[8], "2.000")
            self.assertEqual(self.row(text, title, "PPO, seed 2")[8], "3.000")
            mean = self.row(text, title, "PPO, mean ± sd of 3 seeds")
            # toxicity 0.1, 0.2, 0.3: mean 0.2, sample standard deviation 0.1; KL 1, 2, 3: 2 ± 1
            self.assertEqual(mean[1], "0.2000 ± 0.1000")
            self.assertEqual(mean[2], "10.00% ± 0.00")
            self.assertEqual(mean[8], "2.000 ± 1.000")

    def test_sweep_and_examples(self):
        text = self.run_tool("--examples", "2")
        sweep = self.row(text, "PPO sweep (one seed)", "lr-2x")
        self.assertEqual(sweep[1:8], ["50", "16", "2.82e-05", "0.2", "6.0", "True", "neg_prob"])
        self.assertEqual(sweep[8:], ["0.0500", "0.2000", "0.0700", "2.00%", "0.1500", "0.750"])
        self.assertIn("length penalty 1.5, picked on SAMSum validation", text)
        examples = text.split("lowered most**")[1].strip().splitlines()[2:]
        # drops: 0.79 (row 0), 0.30 (row 2), then -0.01 (row 1) is left out with --examples 2
        self.assertEqual(len(examples), 2, examples)
        self.assertTrue(examples[0].startswith("| Amanda a a a a a | 0.8000 | Amanda will come | 0.0100 |"),
                        examples[0])
        self.assertTrue(examples[1].startswith("| Kate \\| hates it | 0.4000 | Kate likes it | 0.1000 |"),
                        examples[1])

    def test_empty_directory_fails_clearly(self):
        with tempfile.TemporaryDirectory() as empty:
            out = subprocess.run([sys.executable, os.path.join(HERE, "results_table.py"), empty],
                                 capture_output=True, text=True)
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("holds no eval-*.json", out.stderr)

    def test_mean_std(self):
        self.assertEqual(results_table.mean_std([1.0]), (1.0, 0.0))
        m, s = results_table.mean_std([1.0, 2.0, 4.0])
        self.assertAlmostEqual(m, 7 / 3)
        self.assertAlmostEqual(s, (((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2) ** 0.5)


if __name__ == "__main__":
    unittest.main()
