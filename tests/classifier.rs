//! The reward model on the CPU (the `#[test]` twins `common::suite!` makes of the bodies in
//! tests/suites/classifier.rs, which tests/gpu.rs also runs on CUDA), and `detox score` end to
//! end on SAMSum with clear errors for bad inputs.

#[path = "suites/classifier.rs"]
mod classifier;
mod common;

use common::{fixture, shared};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

fn detox(args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_detox"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("detox runs");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The binary failed cleanly (exit 1, an `error:` line, no panic); returns its message.
fn fails(o: &Output) -> String {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(1), "expected exit code 1: {e}");
    assert!(e.starts_with("error: ") && !e.contains("panicked"), "{e}");
    e
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// MODEL_CARD.md: mean toxicity of the 819 SAMSum test reference summaries is 0.027
/// (metrics.json: 0.026978…), here through `detox score` end to end.
#[test]
fn samsum_mean_toxicity_matches_the_model_card() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("scores.jsonl");
    let input = shared("data/samsum/test.jsonl");
    let o = detox(
        &["score", "--classifier", path(&shared(classifier::MINILM)), "--input", path(&input), "--output", path(&out)],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let src: Vec<Value> =
        std::fs::read_to_string(&input).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let got: Vec<Value> =
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(got.len(), 819);
    for (g, s) in got.iter().zip(&src) {
        assert_eq!(g["id"], s["id"]);
        assert_eq!(g.as_object().unwrap().len(), 2, "id and toxicity: {g}");
    }
    let mean = got.iter().map(|g| g["toxicity"].as_f64().unwrap()).sum::<f64>() / got.len() as f64;
    assert!((mean - 0.026978).abs() < 5e-4, "mean toxicity {mean}");
    let e = stderr(&o);
    assert!(e.contains("819 rows") && e.contains(&format!("toxicity  {mean:>8.6}")), "{e}");
}

#[test]
fn score_reads_stdin_keeps_order_and_reports_every_label() {
    let tok = shared("tokenizers/roberta-base/tokenizer.json");
    let clf = fixture("classifier/roberta_tiny");
    let input = "{\"id\":\"a\",\"text\":\"You are a stupid idiot and I hate you.\"}\n\n\
                 {\"text\":\"\"}\n{\"id\":3,\"text\":\"Amanda will bring Jerry some cookies tomorrow.\"}\n";
    let args = ["score", "--classifier", path(&clf), "--tokenizer", path(&tok), "--input", "-", "--field", "text"];
    let o = detox(&[&args[..], &["--batch-size", "2"]].concat(), Some(input));
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    let rows: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let ids: Vec<Value> = rows.iter().map(|r| r["id"].clone()).collect();
    assert_eq!(ids, [Value::from("a"), Value::from(1), Value::from(3)]);
    let fx = classifier::load_fixture("roberta_tiny");
    let first = stdout.lines().next().unwrap();
    let keys: Vec<String> = fx.labels[..7].iter().map(|l| format!("\"{l}\":")).collect();
    let at: Vec<usize> = keys.iter().map(|k| first.find(k.as_str()).expect(k)).collect();
    assert!(first.starts_with("{\"id\":\"a\",") && at.windows(2).all(|w| w[0] < w[1]), "id, then labels in order");
    assert!(!first.contains("\"male\""), "identity outputs are not reported: {first}");
    let want = fx.rows.iter().find(|r| r.text == "You are a stupid idiot and I hate you.").unwrap();
    for (j, label) in fx.labels[..7].iter().enumerate() {
        let p = rows[0][label].as_f64().unwrap() as f32;
        assert!((p - want.probs[j]).abs() < 1e-4, "{label}: {p} vs {}", want.probs[j]);
    }
    let e = stderr(&o);
    assert!(e.contains("3 rows") && e.contains("sexual_explicit") && e.contains("of 3)"), "{e}");
}

#[test]
fn score_errors_are_clear() {
    let input = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(input.path(), "{\"id\":1,\"summary\":\"fine\"}\n{\"id\":2,\"text\":\"no summary\"}\n").unwrap();
    let minilm = shared(classifier::MINILM);
    let good = Some("{\"summary\":\"fine\"}\n");
    let e = fails(&detox(&["score", "--classifier", "/nonexistent/dir", "--input", "-"], good));
    assert!(e.contains("/nonexistent/dir") && e.contains("does not exist"), "{e}");
    let e = fails(&detox(&["score", "--classifier", path(&minilm), "--input", path(input.path())], None));
    assert!(e.contains("row 2") && e.contains("missing field \"summary\""), "{e}");
    let args = ["score", "--classifier", path(&minilm), "--input", path(input.path()), "--field", "title"];
    let e = fails(&detox(&args, None));
    assert!(e.contains("row 1") && e.contains("missing field \"title\""), "{e}");
    let e = fails(&detox(&["score", "--classifier", path(&minilm), "--input", "/nonexistent/in.jsonl"], None));
    assert!(e.contains("/nonexistent/in.jsonl"), "{e}");
    let e = fails(&detox(&["score", "--classifier", path(&minilm), "--input", "-", "--batch-size", "0"], None));
    assert!(e.contains("--batch-size"), "{e}");
    let d = classifier::edited_copy(|t| {
        t.remove("bert.pooler.dense.weight");
    });
    let tok = shared("tokenizers/bert-base-uncased/tokenizer.json");
    let args = ["score", "--classifier", path(d.path()), "--tokenizer", path(&tok), "--input", "-"];
    let e = fails(&detox(&args, good));
    assert!(e.contains("bert.pooler.dense.weight is missing"), "{e}");
}

#[test]
fn score_with_no_rows_writes_nothing() {
    let o = detox(&["score", "--classifier", path(&shared(classifier::MINILM)), "--input", "-"], Some("\n"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(o.stdout.is_empty());
    assert!(stderr(&o).contains("no rows"));
}
