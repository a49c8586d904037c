//! ROUGE-1, ROUGE-2 and ROUGE-L F-measures as Google's rouge_score computes them without stemming:
//! lowercased tokens of ASCII letters and digits, clipped n-gram overlap, and the longest common
//! subsequence.

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
}

pub fn tokenize(text: &str) -> Vec<String> {
    let lowered: String = text
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() { c } else { ' ' })
        .collect();
    lowered.split_whitespace().map(str::to_owned).collect()
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

fn lcs(a: &[String], b: &[String]) -> usize {
    let mut row = vec![0usize; b.len() + 1];
    for x in a {
        let mut prev = 0;
        for (j, y) in b.iter().enumerate() {
            let here = row[j + 1];
            row[j + 1] = if x == y { prev + 1 } else { row[j + 1].max(row[j]) };
            prev = here;
        }
    }
    row[b.len()]
}

/// ROUGE of a prediction against its reference.
pub fn rouge(prediction: &str, reference: &str) -> Rouge {
    let (p, r) = (tokenize(prediction), tokenize(reference));
    Rouge { rouge1: rouge_n(&p, &r, 1), rouge2: rouge_n(&p, &r, 2), rouge_l: score(lcs(&p, &r), p.len(), r.len()) }
}

/// The mean F-measures over pairs: (ROUGE-1, ROUGE-2, ROUGE-L).
pub fn mean_f(pairs: &[(String, String)]) -> (f64, f64, f64) {
    let n = pairs.len().max(1) as f64;
    let all: Vec<Rouge> = pairs.iter().map(|(p, r)| rouge(p, r)).collect();
    (
        all.iter().map(|x| x.rouge1.f).sum::<f64>() / n,
        all.iter().map(|x| x.rouge2.f).sum::<f64>() / n,
        all.iter().map(|x| x.rouge_l.f).sum::<f64>() / n,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_rouge_score() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rouge/expected.json");
        let rows: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert!(rows.len() >= 5);
        for row in rows {
            let got = rouge(row["prediction"].as_str().unwrap(), row["reference"].as_str().unwrap());
            for (key, s) in [("rouge1", got.rouge1), ("rouge2", got.rouge2), ("rougeL", got.rouge_l)] {
                for (field, v) in [("precision", s.precision), ("recall", s.recall), ("f", s.f)] {
                    let want = row[key][field].as_f64().unwrap();
                    assert!((v - want).abs() < 1e-12, "{key} {field} of {row}: {v} vs {want}");
                }
            }
        }
    }
}
