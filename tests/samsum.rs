//! Real SAMSum prompts through random FLAN-T5-shaped models on the CPU: a `small` model on 16 test
//! dialogues and a `tiny` one on the whole test split, every row answered.

mod common;

use common::shared;
use std::process::Command;

fn detox(args: &[&str]) {
    let o = Command::new(env!("CARGO_BIN_EXE_detox")).args(args).output().expect("detox runs");
    assert!(o.status.success(), "detox {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

fn summarize(size: &str, rows: usize, max_new: &str) {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join(size);
    let tok = shared("tokenizers/t5/tokenizer.json");
    detox(&["init", "--size", size, "--out", m.to_str().unwrap(), "--tokenizer", tok.to_str().unwrap()]);
    let test = std::fs::read_to_string(shared("data/samsum/test.jsonl")).unwrap();
    let input = d.path().join("in.jsonl");
    let lines: Vec<&str> = test.lines().take(rows).collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let out = d.path().join("out.jsonl");
    detox(&[
        "summarize",
        "--model",
        m.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--max-new-tokens",
        max_new,
        "--batch-size",
        "32",
    ]);
    let got: Vec<serde_json::Value> =
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(got.len(), rows);
    for (row, line) in got.iter().zip(&lines) {
        let src: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(row["id"], src["id"]);
        assert!(!row["tokens"].as_array().unwrap().is_empty());
    }
    let distinct: std::collections::HashSet<String> = got.iter().map(|r| r["tokens"].to_string()).collect();
    assert!(distinct.len() > rows / 2, "outputs should depend on the dialogue: {} distinct of {rows}", distinct.len());
}

#[test]
fn small_model_summarizes_16_test_dialogues() {
    summarize("small", 16, "64");
}

#[test]
fn tiny_model_summarizes_the_whole_test_split() {
    summarize("tiny", 819, "64");
}
