//! ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum F-measures as Google's rouge_score computes them:
//! lowercased tokens of ASCII letters and digits (Porter-stemmed when longer than three letters, if
//! asked), clipped n-gram overlap, the longest common subsequence, and for ROUGE-Lsum the
//! summary-level LCS over newline-separated sentences (the union LCS of each reference sentence
//! against every predicted one, each token counted at most as often as both texts hold it).

mod porter;

use std::collections::HashMap;

/// Precision, recall and F-measure of one metric on one pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Score {
    pub precision: f64,
    pub recall: f64,
    pub f: f64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Rouge {
    pub rouge1: Score,
    pub rouge2: Score,
    #[serde(rename = "rougeL")]
    pub rouge_l: Score,
    #[serde(rename = "rougeLsum")]
    pub rouge_lsum: Score,
}

/// Mean F-measures over pairs.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct MeanF {
    pub rouge1: f64,
    pub rouge2: f64,
    #[serde(rename = "rougeL")]
    pub rouge_l: f64,
    #[serde(rename = "rougeLsum")]
    pub rouge_lsum: f64,
}

/// rouge_score's tokens: non-alphanumerics become spaces after lowercasing; with `use_stemmer`,
/// tokens of more than three letters are Porter-stemmed.
pub fn tokenize(text: &str, use_stemmer: bool) -> Vec<String> {
    let lowered: String = text
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() { c } else { ' ' })
        .collect();
    lowered
        .split_whitespace()
        .map(|t| if use_stemmer && t.len() > 3 { porter::stem(t) } else { t.to_owned() })
        .collect()
}

fn score(overlap: usize, pred: usize, reference: usize) -> Score {
    let precision = if pred == 0 { 0.0 } else { overlap as f64 / pred as f64 };
    let recall = if reference == 0 { 0.0 } else { overlap as f64 / reference as f64 };
    let f = if precision + recall == 0.0 { 0.0 } else { 2.0 * precision * recall / (precision + recall) };
    Score { precision, recall, f }
}

fn ngrams(tokens: &[String], n: usize) -> HashMap<&[String], usize> {
    let mut m = HashMap::new();
    for w in tokens.windows(n) {
        *m.entry(w).or_insert(0) += 1;
    }
    m
}

fn rouge_n(pred: &[String], reference: &[String], n: usize) -> Score {
    let (p, r) = (ngrams(pred, n), ngrams(reference, n));
    let overlap: usize = p.iter().map(|(g, c)| (*c).min(*r.get(g).unwrap_or(&0))).sum();
    score(overlap, p.values().sum(), r.values().sum())
}

/// The LCS lengths of every prefix pair, row-major with `b.len() + 1` columns.
fn lcs_table(a: &[String], b: &[String]) -> Vec<usize> {
    let w = b.len() + 1;
    let mut t = vec![0usize; (a.len() + 1) * w];
    for (i, x) in a.iter().enumerate() {
        for (j, y) in b.iter().enumerate() {
            t[(i + 1) * w + j + 1] = if x == y { t[i * w + j] + 1 } else { t[i * w + j + 1].max(t[(i + 1) * w + j]) };
        }
    }
    t
}

fn lcs(a: &[String], b: &[String]) -> usize {
    lcs_table(a, b)[(a.len() + 1) * (b.len() + 1) - 1]
}

/// The positions in `r` of one LCS of `r` and `c`: the one rouge_score's backtrack reads out
/// (from the end; on a tie it steps back in `r`), which decides the union below.
fn lcs_positions(r: &[String], c: &[String]) -> Vec<usize> {
    let t = lcs_table(r, c);
    let w = c.len() + 1;
    let (mut i, mut j, mut out) = (r.len(), c.len(), Vec::new());
    while i > 0 && j > 0 {
        if r[i - 1] == c[j - 1] {
            out.push(i - 1);
            i -= 1;
            j -= 1;
        } else if t[i * w + j - 1] > t[(i - 1) * w + j] {
            j -= 1;
        } else {
            i -= 1;
        }
    }
    out
}

/// Summary-level LCS (the ROUGE paper's section 3.2, as ROUGE 1.5.5 and rouge_score count hits).
fn summary_lcs(reference: &[Vec<String>], prediction: &[Vec<String>]) -> Score {
    let (m, n): (usize, usize) = (reference.iter().map(Vec::len).sum(), prediction.iter().map(Vec::len).sum());
    if m == 0 || n == 0 {
        return Score::default();
    }
    let counts = |sents: &[Vec<String>]| {
        let mut c: HashMap<String, usize> = HashMap::new();
        for t in sents.iter().flatten() {
            *c.entry(t.clone()).or_insert(0) += 1;
        }
        c
    };
    let (mut left_r, mut left_p) = (counts(reference), counts(prediction));
    let mut hits = 0;
    for r in reference {
        let mut union: Vec<usize> = prediction.iter().flat_map(|c| lcs_positions(r, c)).collect();
        union.sort_unstable();
        union.dedup();
        for t in union.iter().map(|&i| &r[i]) {
            if let (Some(cr), Some(cp)) = (left_r.get_mut(t), left_p.get_mut(t))
                && *cr > 0
                && *cp > 0
            {
                hits += 1;
                *cr -= 1;
                *cp -= 1;
            }
        }
    }
    score(hits, n, m)
}

/// rouge_score's sentences for ROUGE-Lsum: the text split at newlines, empty lines dropped.
fn sentences(text: &str, use_stemmer: bool) -> Vec<Vec<String>> {
    text.split('\n').filter(|s| !s.is_empty()).map(|s| tokenize(s, use_stemmer)).collect()
}

/// ROUGE of a prediction against its reference (rouge_score's `RougeScorer.score(reference, prediction)`).
pub fn rouge(prediction: &str, reference: &str, use_stemmer: bool) -> Rouge {
    let (p, r) = (tokenize(prediction, use_stemmer), tokenize(reference, use_stemmer));
    Rouge {
        rouge1: rouge_n(&p, &r, 1),
        rouge2: rouge_n(&p, &r, 2),
        rouge_l: score(lcs(&p, &r), p.len(), r.len()),
        rouge_lsum: summary_lcs(&sentences(reference, use_stemmer), &sentences(prediction, use_stemmer)),
    }
}

/// The mean F-measures over (prediction, reference) pairs.
pub fn means(pairs: &[(String, String)], use_stemmer: bool) -> MeanF {
    let n = pairs.len().max(1) as f64;
    let all: Vec<Rouge> = pairs.iter().map(|(p, r)| rouge(p, r, use_stemmer)).collect();
    let mean = |f: fn(&Rouge) -> f64| all.iter().map(f).sum::<f64>() / n;
    MeanF {
        rouge1: mean(|x| x.rouge1.f),
        rouge2: mean(|x| x.rouge2.f),
        rouge_l: mean(|x| x.rouge_l.f),
        rouge_lsum: mean(|x| x.rouge_lsum.f),
    }
}

/// SFT's held-out ROUGE, unstemmed: (ROUGE-1, ROUGE-2, ROUGE-L).
pub fn mean_f(pairs: &[(String, String)]) -> (f64, f64, f64) {
    let m = means(pairs, false);
    (m.rouge1, m.rouge2, m.rouge_l)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> serde_json::Value {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rouge/expected.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    /// Every pair of tools/make_rouge_fixture.py, every metric, with and without stemming.
    #[test]
    fn matches_rouge_score() {
        let fx = fixture();
        let pairs = fx["pairs"].as_array().unwrap();
        assert!(pairs.len() >= 200);
        let mut lsum_differs = 0;
        for row in pairs {
            let (pred, reference) = (row["prediction"].as_str().unwrap(), row["reference"].as_str().unwrap());
            for (key, use_stemmer) in [("plain", false), ("stemmed", true)] {
                let got = rouge(pred, reference, use_stemmer);
                lsum_differs += usize::from(got.rouge_l != got.rouge_lsum);
                for (name, s) in [
                    ("rouge1", got.rouge1),
                    ("rouge2", got.rouge2),
                    ("rougeL", got.rouge_l),
                    ("rougeLsum", got.rouge_lsum),
                ] {
                    let want = row[key][name].as_array().unwrap();
                    for (field, (v, w)) in
                        ["precision", "recall", "f"].iter().zip([s.precision, s.recall, s.f].iter().zip(want))
                    {
                        let w = w.as_f64().unwrap();
                        assert!((v - w).abs() < 1e-6, "{key} {name} {field} of {pred:?} vs {reference:?}: {v} vs {w}");
                    }
                }
            }
        }
        // The fixture exercises the summary-level LCS, not only single sentences.
        assert!(lsum_differs >= 50, "{lsum_differs}");
    }

    #[test]
    fn stems_match_nltk() {
        let fx = fixture();
        let stems = fx["stems"].as_array().unwrap();
        assert!(stems.len() >= 1000);
        let wrong: Vec<String> = stems
            .iter()
            .filter_map(|p| {
                let (w, s) = (p[0].as_str().unwrap(), p[1].as_str().unwrap());
                let got = porter::stem(w);
                (got != s).then(|| format!("{w}: {got} (NLTK {s})"))
            })
            .collect();
        assert!(wrong.is_empty(), "{} of {} words: {:?}", wrong.len(), stems.len(), wrong);
    }

    #[test]
    fn means_average_each_pair() {
        let pairs = vec![("the cat sat".to_string(), "the cat sat".to_string()), (String::new(), "a dog".to_string())];
        let m = means(&pairs, false);
        let one = rouge("the cat sat", "the cat sat", false);
        assert_eq!(m.rouge1, one.rouge1.f / 2.0);
        assert_eq!(m.rouge_lsum, one.rouge_lsum.f / 2.0);
        assert_eq!(mean_f(&pairs), (m.rouge1, m.rouge2, m.rouge_l));
    }
}
