#!/usr/bin/env python3
"""Writes tests/fixtures/rouge/expected.json: Google's rouge_score (no stemming) on pairs of texts,
the oracle for detox's ROUGE-1/2/L. Run with the oracle venv after `pip install rouge_score`:
    /opt/oracle/bin/python tools/make_rouge_fixture.py
"""
import json
import os

from rouge_score import rouge_scorer

PAIRS = [
    ("The cat sat on the mat.", "the cat was on the mat"),
    ("Amanda baked cookies and will bring Jerry some tomorrow.", "Amanda will bring Jerry cookies tomorrow."),
    ("", "Nothing to see here."),
    ("Hannah needs Betty's number but Amanda doesn't have it.", "Hannah needs Betty's number but Amanda doesn't have it."),
    ("a b c d e f", "f e d c b a"),
    ("Tom and Ann will meet at 5 pm at the station, 2 trains later.", "Ann & Tom meet at the station at 5pm!"),
    ("It's raining. Bring an umbrella; it's cold too.", "Bring an umbrella: it is raining and it's cold"),
]


def main():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    rows = []
    for pred, ref in PAIRS:
        s = scorer.score(ref, pred)
        rows.append({"prediction": pred, "reference": ref,
                     **{k: {"precision": v.precision, "recall": v.recall, "f": v.fmeasure} for k, v in s.items()}})
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "rouge", "expected.json")
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
