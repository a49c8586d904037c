#!/usr/bin/env python3
"""Tests tools/convert_detoxify.py end to end with transformers as the oracle (CI has no torch, so this runs by
hand with the oracle venv):

    /opt/oracle/bin/python tools/test_convert_detoxify.py

Small BERT and RoBERTa classifiers with random weights are written in Detoxify's checkpoint layout, converted, and
the converted directory must give transformers the probabilities of the unconverted model, with Detoxify's label
names. When a detox binary is at $DETOX_BIN or target/release/detox, `detox score` on the converted directory must
agree too; without one that check says it skipped. Bad inputs must fail with a message naming the problem.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import unittest

import torch
from transformers import AutoModelForSequenceClassification

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_classifier_fixtures import (BENIGN, DETOXIFY_ORIGINAL_COLUMNS, SHARED, TOXIC,  # noqa: E402
                                      UNBIASED_LABELS, convert, detoxify_checkpoint, long_text, oracle, tiny_bert,
                                      tiny_roberta, tokenize)

BERT_TOKENIZER = os.path.join(SHARED, "tokenizers", "bert-base-uncased", "tokenizer.json")
ROBERTA_TOKENIZER = os.path.join(SHARED, "tokenizers", "roberta-base", "tokenizer.json")
TEXTS = TOXIC[:3] + BENIGN + ["", long_text(False)]
ORIGINAL_LABELS = ["toxicity", "severe_toxicity", "obscene", "threat", "insult", "identity_attack"]
DETOX_BIN = os.environ.get("DETOX_BIN") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target",
                                                        "release", "detox")


class ConvertDetoxify(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = self.tmp.name

    def tearDown(self):
        self.tmp.cleanup()

    def save(self, ckpt, name="model.ckpt"):
        path = os.path.join(self.dir, name)
        torch.save(ckpt, path)
        return path

    def convert_ok(self, ckpt_path, tokenizer, *extra):
        out = os.path.join(self.dir, "out")
        r = convert(ckpt_path, tokenizer, out, *extra)
        self.assertEqual(r.returncode, 0, r.stderr)
        return out

    def convert_fails(self, ckpt_path, tokenizer, *extra):
        r = convert(ckpt_path, tokenizer, os.path.join(self.dir, "bad"), *extra)
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        self.assertTrue(r.stderr.startswith("error: "), r.stderr)
        self.assertNotIn("Traceback", r.stderr)
        return r.stderr

    def agree(self, model, out, tokenizer, pad_id, labels, atol=1e-5):
        """The converted directory, read by transformers and by detox, against the unconverted model."""
        with open(os.path.join(out, "config.json")) as f:
            config = json.load(f)
        self.assertEqual(list(config["id2label"].values()), labels)
        ids = tokenize(tokenizer, TEXTS)
        want = torch.sigmoid(oracle(model, ids, pad_id))
        again = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
        got = torch.sigmoid(oracle(again, ids, pad_id))
        self.assertLessEqual((got - want).abs().max().item(), atol)
        self.assert_engine_agrees(out, want, labels)
        return want

    def assert_engine_agrees(self, out, want, labels):
        if not os.path.isfile(DETOX_BIN):
            print(f"\nSKIPPED detox score check: no binary at {DETOX_BIN} (cargo build --release)", file=sys.stderr)
            return
        rows = "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(TEXTS))
        r = subprocess.run([DETOX_BIN, "score", "--classifier", out, "--input", "-", "--field", "text"],
                           input=rows, capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        got = [json.loads(line) for line in r.stdout.splitlines()]
        reported = 7 if labels == UNBIASED_LABELS else len(labels)
        for i, row in enumerate(got):
            self.assertEqual(row["id"], i)
            for j, label in enumerate(labels[:reported]):
                self.assertAlmostEqual(row[label], want[i, j].item(), delta=1e-4, msg=f"row {i} {label}")

    def test_original_bert_converts_with_detoxify_label_names(self):
        model = tiny_bert(6, seed=1)
        ckpt = self.save(detoxify_checkpoint(model, "bert-base-uncased", "BertForSequenceClassification",
                                             "BertTokenizer", DETOXIFY_ORIGINAL_COLUMNS))
        out = self.convert_ok(ckpt, BERT_TOKENIZER)
        self.assertEqual(sorted(os.listdir(out)), ["config.json", "model.safetensors", "tokenizer.json"])
        from safetensors import safe_open
        with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
            self.assertNotIn("bert.embeddings.position_ids", f.keys())
            self.assertEqual(f.get_tensor("classifier.weight").dtype, torch.float16)
        probs = self.agree(model, out, BERT_TOKENIZER, 0, ORIGINAL_LABELS)
        self.assertGreater(probs.std().item(), 0.05, "random weights should spread the probabilities")

    def test_unbiased_roberta_gets_its_identity_labels(self):
        model = tiny_roberta(16, seed=2, layers=2, hidden=24, heads=12)
        ckpt = self.save(detoxify_checkpoint(model, "roberta-base", "RobertaForSequenceClassification",
                                             "RobertaTokenizer", UNBIASED_LABELS[:7]))
        self.agree(model, self.convert_ok(ckpt, ROBERTA_TOKENIZER), ROBERTA_TOKENIZER, 1, UNBIASED_LABELS)

    def test_identity_classes_listed_in_the_checkpoint_are_used(self):
        model = tiny_roberta(9, seed=3, layers=1, hidden=24, heads=12)
        ckpt = self.save(detoxify_checkpoint(model, "roberta-base", "RobertaForSequenceClassification",
                                             "RobertaTokenizer", ["toxicity", "insult"],
                                             identity_classes=[f"group_{i}" for i in range(7)]))
        out = self.convert_ok(ckpt, ROBERTA_TOKENIZER)
        self.agree(model, out, ROBERTA_TOKENIZER, 1, ["toxicity", "insult"] + [f"group_{i}" for i in range(7)])

    def test_unknown_heads_need_an_hf_config(self):
        model = tiny_bert(2, seed=4, hidden=32, heads=4)
        ckpt = self.save(detoxify_checkpoint(model, "bert-base-uncased", "BertForSequenceClassification",
                                             "BertTokenizer", ["toxic", "insult"]))
        err = self.convert_fails(ckpt, BERT_TOKENIZER)
        self.assertIn("not divisible by 12 attention heads", err)
        hf = os.path.join(self.dir, "hf_config.json")
        model.config.to_json_file(hf)
        out = self.convert_ok(ckpt, BERT_TOKENIZER, "--hf-config", hf)
        self.agree(model, out, BERT_TOKENIZER, 0, ["toxicity", "insult"])

    def test_weights_not_exact_in_fp16_stay_close_and_fp32_is_exact(self):
        model = tiny_bert(6, seed=5)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-4 * torch.randn_like(p))
        ckpt = self.save(detoxify_checkpoint(model, "bert-base-uncased", "BertForSequenceClassification",
                                             "BertTokenizer", DETOXIFY_ORIGINAL_COLUMNS))
        ids = tokenize(BERT_TOKENIZER, TEXTS)
        want = torch.sigmoid(oracle(model, ids, 0))
        for dtype, atol in (("fp16", 5e-3), ("fp32", 1e-6)):
            out = self.convert_ok(ckpt, BERT_TOKENIZER, "--dtype", dtype)
            again = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
            diff = (torch.sigmoid(oracle(again, ids, 0)) - want).abs().max().item()
            self.assertLessEqual(diff, atol, dtype)

    def test_bad_inputs_fail_with_a_clear_message(self):
        good = detoxify_checkpoint(tiny_bert(6, seed=6), "bert-base-uncased", "BertForSequenceClassification",
                                   "BertTokenizer", DETOXIFY_ORIGINAL_COLUMNS)
        self.assertIn("does not exist", self.convert_fails(os.path.join(self.dir, "none.ckpt"), BERT_TOKENIZER))

        text = os.path.join(self.dir, "notes.ckpt")
        with open(text, "w") as f:
            f.write("not a checkpoint")
        self.assertIn("not a readable torch checkpoint", self.convert_fails(text, BERT_TOKENIZER))

        # Lightning-era checkpoints pickle their hyper-parameters as an argparse.Namespace.
        unsafe = self.save({**good, "hparams": argparse.Namespace(lr=1e-5)}, "unsafe.ckpt")
        self.assertIn("argparse.Namespace", self.convert_fails(unsafe, BERT_TOKENIZER))
        self.assertIn("--trust-pickle", self.convert_fails(unsafe, BERT_TOKENIZER))
        self.convert_ok(unsafe, BERT_TOKENIZER, "--trust-pickle")

        self.assertIn('checkpoint["config"]["dataset"]',
                      self.convert_fails(self.save({**good, "config": {"arch": good["config"]["arch"]}}),
                                         BERT_TOKENIZER))
        self.assertIn("not a Detoxify", self.convert_fails(self.save([1, 2, 3]), BERT_TOKENIZER))

        def with_args(**kw):
            cfg = json.loads(json.dumps(good["config"]))
            cfg["arch"]["args"].update(kw)
            return self.save({**good, "config": cfg})

        self.assertIn("classifier.weight has 6 outputs but num_classes is 5",
                      self.convert_fails(with_args(num_classes=5), BERT_TOKENIZER))
        self.assertIn("XLMRobertaForSequenceClassification",
                      self.convert_fails(with_args(model_name="XLMRobertaForSequenceClassification"),
                                         BERT_TOKENIZER))
        self.assertIn("--hf-config", self.convert_fails(with_args(model_type="bert-large-cased"), BERT_TOKENIZER))

        sd = dict(good["state_dict"])
        del sd["bert.encoder.layer.0.intermediate.dense.weight"]
        self.assertIn("bert.encoder.layer.0.intermediate.dense.weight is missing",
                      self.convert_fails(self.save({**good, "state_dict": sd}), BERT_TOKENIZER))

        err = self.convert_fails(self.save(good), ROBERTA_TOKENIZER)
        self.assertIn("50265 tokens", err)
        self.assertIn("30522", err)


if __name__ == "__main__":
    unittest.main(verbosity=2)
