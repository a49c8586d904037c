#!/usr/bin/env python3
"""Writes tests/fixtures/rouge/expected.json, the oracle for detox's ROUGE (src/rouge.rs): Google's
rouge_score (rouge1, rouge2, rougeL, rougeLsum; without and with use_stemmer) on a few hundred
SAMSum-like (prediction, reference) pairs, and NLTK's PorterStemmer (the stemmer rouge_score uses)
on a few thousand English words from T5's vocabulary.

The pairs are generated here from templates, not taken from SAMSum: names, inflected verbs and plural
nouns (where stemming changes the score), summaries of one to four sentences joined by newlines or
spaces (where ROUGE-Lsum differs from ROUGE-L), blank lines, CRLF, punctuation, digits, accents and
emoji, repetition loops like an undertrained summarizer's, and empty texts.
    /work/oracle-venv/bin/python tools/make_rouge_fixture.py
"""
import json
import os
import random

from nltk.stem import porter
from rouge_score import rouge_scorer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]

HAND = [
    ("The cat sat on the mat.", "the cat was on the mat"),
    ("Amanda baked cookies and will bring Jerry some tomorrow.", "Amanda will bring Jerry cookies tomorrow."),
    ("", "Nothing to see here."),
    ("Hannah needs Betty's number but Amanda doesn't have it.", "Hannah needs Betty's number but Amanda doesn't have it."),
    ("a b c d e f", "f e d c b a"),
    ("Tom and Ann will meet at 5 pm at the station, 2 trains later.", "Ann & Tom meet at the station at 5pm!"),
    ("It's raining. Bring an umbrella; it's cold too.", "Bring an umbrella: it is raining and it's cold"),
    ("a b\nc a\nb", "a b c\nb a\n\nc"),
    ("\n\n", "x y"),
    ("Running runners ran; they're running happily.\r\nThe relational generalization failed.",
     "The runner runs happily.\nGeneralizations relate."),
]

NAMES = ["Amanda", "Jerry", "Hannah", "Larry", "Betty", "Tom", "Ann", "Kate", "Mike", "Olivia", "Noah", "Zoë",
         "José", "Chloé"]
# (base, third person, past, gerund): forms a stemmer conflates, or fails to.
VERBS = [("meet", "meets", "met", "meeting"), ("call", "calls", "called", "calling"),
         ("bring", "brings", "brought", "bringing"), ("organize", "organizes", "organized", "organizing"),
         ("try", "tries", "tried", "trying"), ("apply", "applies", "applied", "applying"),
         ("cancel", "cancels", "cancelled", "cancelling"), ("hope", "hopes", "hoped", "hoping"),
         ("plan", "plans", "planned", "planning"), ("agree", "agrees", "agreed", "agreeing"),
         ("relate", "relates", "related", "relating"), ("die", "dies", "died", "dying"),
         ("buy", "buys", "bought", "buying"), ("happen", "happens", "happened", "happening"),
         ("generalize", "generalizes", "generalized", "generalizing"), ("control", "controls", "controlled",
                                                                         "controlling")]
NOUNS = [("party", "parties"), ("flight", "flights"), ("present", "presents"), ("ticket", "tickets"),
         ("dinner", "dinners"), ("agreement", "agreements"), ("activity", "activities"), ("sky", "skies"),
         ("news", "news"), ("inning", "innings"), ("relationship", "relationships"), ("conditional", "conditionals"),
         ("happiness", "happiness"), ("operator", "operators"), ("cookie", "cookies"), ("university", "universities")]
TIMES = ["tomorrow", "on Friday", "at 5 pm", "next week", "tonight", "at 7:30", "in 2 hours", "on the 3rd of May"]
ADVERBS = ["happily", "probably", "definitely", "finally", "generously", "hopefully", "electrically"]
NOISE = ["!", "?", "...", " :)", " 🙂", " (again)", ",", ";", " - ", " & ", "'s"]


def sentence(rng):
    a, b = rng.sample(NAMES, 2)
    verb, noun = rng.choice(VERBS), rng.choice(NOUNS)
    form = rng.choice(verb)
    thing = rng.choice(noun)
    parts = [a, rng.choice(["and " + b, "will", "", "says " + b + " should", "doesn't want to"]), form,
             rng.choice(["the", "a", "their", "two", ""]), thing, rng.choice(TIMES)]
    if rng.random() < 0.4:
        parts.insert(3, rng.choice(ADVERBS))
    s = " ".join(p for p in parts if p)
    return s + rng.choice([".", ".", "!", "", "?"])


def inflect(word, rng):
    """Another form of a verb or noun of the tables, else the word."""
    for forms in VERBS + NOUNS:
        if word.lower() in forms:
            return rng.choice(forms)
    return word


def perturb(text, rng):
    """A prediction made from a reference: inflections changed, words dropped, added or repeated,
    sentences reordered or rejoined, noise added."""
    sents = [s for s in text.split("\n") if s]
    out = []
    for s in sents:
        words = s.split(" ")
        words = [inflect(w, rng) if rng.random() < 0.5 else w for w in words]
        if len(words) > 2 and rng.random() < 0.4:
            del words[rng.randrange(len(words))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words) + 1), rng.choice(NAMES + ADVERBS + ["the", "a"]))
        if rng.random() < 0.15:
            w = rng.choice(words)
            words += [w] * rng.randint(3, 12)
        s = " ".join(words)
        if rng.random() < 0.3:
            s += rng.choice(NOISE)
        out.append(s)
    if len(out) > 1 and rng.random() < 0.6:
        rng.shuffle(out)
    if rng.random() < 0.2:
        out.append(sentence(rng))
    sep = rng.choice(["\n", "\n", " ", "\n\n", "\r\n"])
    return sep.join(out)


def generated_pairs(n, seed=0):
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        k = rng.choice([1, 2, 2, 3, 3, 4])
        sep = rng.choice(["\n", "\n", "\n", " "])
        reference = sep.join(sentence(rng) for _ in range(k))
        r = rng.random()
        if r < 0.03:
            prediction = ""
        elif r < 0.08:
            prediction = " ".join([rng.choice(NAMES)] + ["a"] * rng.randint(5, 30))
        elif r < 0.12:
            prediction = sentence(rng)
        else:
            prediction = perturb(reference, rng)
        pairs.append((prediction, reference))
    return pairs


def vocabulary_words(n, seed=0):
    """Lowercase ASCII words of more than three letters from T5's SentencePiece vocabulary: the
    words whose stems rouge_score takes."""
    tok = json.load(open(os.path.join(ROOT, "..", "shared", "tokenizers", "t5", "tokenizer.json")))
    words = sorted({p[1:] for p, _ in tok["model"]["vocab"]
                    if p.startswith("\u2581") and p[1:].isascii() and p[1:].isalpha() and p[1:].islower()
                    and len(p) > 4})
    rng = random.Random(seed)
    return sorted(rng.sample(words, n))


def rounded(x):
    # 12 significant digits keep the fixture small; the test's tolerance is 1e-6.
    return float(f"{x:.12g}")


def main():
    scorers = {stem: rouge_scorer.RougeScorer(TYPES, use_stemmer=stem) for stem in (False, True)}
    rows = []
    for pred, ref in HAND + generated_pairs(250):
        row = {"prediction": pred, "reference": ref}
        for stem, scorer in scorers.items():
            s = scorer.score(ref, pred)
            row["stemmed" if stem else "plain"] = {
                k: [rounded(v.precision), rounded(v.recall), rounded(v.fmeasure)] for k, v in s.items()}
        rows.append(row)
    stemmer = porter.PorterStemmer()
    extra = ["caresses", "ponies", "ties", "feed", "agreed", "plastered", "motoring", "hopping", "falling", "filing",
             "happy", "enjoy", "relational", "generalization", "controlling", "skies", "dying", "archaeology",
             "flies", "dies", "spied", "died", "fully", "hopefully", "triplicate", "electriciti", "yyyy", "syzygy",
             "innings", "proceed", "succeeded", "analogousli", "formaliti", "sensibiliti", "conformabli"]
    words = sorted(set(vocabulary_words(1500) + extra))
    stems = [[w, stemmer.stem(w)] for w in words]
    out = os.path.join(ROOT, "tests", "fixtures", "rouge", "expected.json")
    with open(out, "w") as f:
        f.write('{"types": ' + json.dumps(TYPES) + ',\n"fields": ["precision", "recall", "f"],\n"pairs": [\n')
        f.write(",\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
        f.write('],\n"stems": ' + json.dumps(stems) + "}\n")
    print(f"wrote {out}: {len(rows)} pairs, {len(stems)} stems")


if __name__ == "__main__":
    main()
