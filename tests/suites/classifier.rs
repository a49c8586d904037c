//! Test bodies for the reward model against transformers (fixtures from
//! tools/make_classifier_fixtures.py): the real minilm-toxicity classifier, a random RoBERTa with
//! Detoxify `unbiased`'s labels, a converted Detoxify checkpoint, and loader errors. Generic over the
//! backend: tests/classifier.rs runs them on the CPU, tests/gpu.rs on CUDA.

use crate::common::{fixture, rel_l2_err, rel_max_err, shared};
use detox::backend::Backend;
use detox::checkpoint::{Checkpoint, OwnedTensor, write_safetensors};
use detox::classifier::{Classifier, sigmoid};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// DESIGN.md's parity targets: the f32 CPU path within max |Δ| ≤ 1e-3 of the reference's scale;
/// the CUDA path (fp16 weights and matrix inputs) within relative L2 error 1e-2.
fn check<B: Backend>(be: &B, got: &[f32], want: &[f32], what: &str) {
    if be.ordinal().is_none() {
        let err = rel_max_err(got, want);
        assert!(err <= 1e-3, "{what}: max error {err} (relative to the reference's scale)");
    } else {
        let err = rel_l2_err(got, want);
        assert!(err <= 1e-2, "{what}: relative L2 error {err}");
    }
}
pub const MINILM: &str = "models/minilm-toxicity";

/// One text of an expected.json and what transformers made of it.
pub struct Row {
    pub text: String,
    pub ids: Vec<u32>,
    pub logits: Vec<f32>,
    pub probs: Vec<f32>,
}

pub struct Fixture {
    pub labels: Vec<String>,
    pub rows: Vec<Row>,
}

fn numbers<T>(v: &Value, f: impl Fn(&Value) -> Option<T>) -> Vec<T> {
    v.as_array().expect("an array").iter().map(|x| f(x).expect("a number")).collect()
}

/// SAMSum test summaries by id: the fixtures name SAMSum rows rather than copy them.
fn samsum_summaries() -> HashMap<String, String> {
    let text = std::fs::read_to_string(shared("data/samsum/test.jsonl")).expect("SAMSum test split");
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|r| (r["id"].as_str().unwrap().to_string(), r["summary"].as_str().unwrap().to_string()))
        .collect()
}

pub fn load_fixture(name: &str) -> Fixture {
    let path = fixture(&format!("classifier/{name}/expected.json"));
    let j: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let samsum = if j["rows"].as_array().unwrap().iter().any(|r| r.get("samsum_test_id").is_some()) {
        samsum_summaries()
    } else {
        HashMap::new()
    };
    let rows = j["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| Row {
            text: match r.get("samsum_test_id") {
                Some(id) => samsum[id.as_str().unwrap()].clone(),
                None => r["text"].as_str().unwrap().to_string(),
            },
            ids: numbers(&r["input_ids"], |x| x.as_u64().map(|v| v as u32)),
            logits: numbers(&r["logits"], |x| x.as_f64().map(|v| v as f32)),
            probs: numbers(&r["probs"], |x| x.as_f64().map(|v| v as f32)),
        })
        .collect();
    Fixture { labels: numbers(&j["labels"], |x| x.as_str().map(str::to_owned)), rows }
}

/// Token ids, logits and probabilities of every fixture text against transformers, scored in
/// length-sorted batches of `batch` (so padding is exercised) and returned in input order.
fn check_against_transformers<B: Backend>(be: &B, clf: &Classifier<B>, fx: &Fixture, name: &str, batch: usize) {
    assert_eq!(clf.config().labels, fx.labels, "{name}: labels");
    for (i, r) in fx.rows.iter().enumerate() {
        assert_eq!(clf.encode(&r.text).unwrap(), r.ids, "{name} row {i}: token ids of {:?}", r.text);
    }
    let texts: Vec<&str> = fx.rows.iter().map(|r| r.text.as_str()).collect();
    let mut seen = 0;
    let logits = clf.logits(be, &texts, batch, |n| seen += n).unwrap();
    assert_eq!(seen, texts.len(), "{name}: progress counts every text");
    let got: Vec<f32> = logits.concat();
    let want: Vec<f32> = fx.rows.iter().flat_map(|r| r.logits.clone()).collect();
    check(be, &got, &want, &format!("{name}: logits"));
    let probs: Vec<f32> = got.iter().map(|&x| sigmoid(x)).collect();
    let want_p: Vec<f32> = fx.rows.iter().flat_map(|r| r.probs.clone()).collect();
    check(be, &probs, &want_p, &format!("{name}: probabilities"));
}

pub fn minilm_matches_transformers<B: Backend>(be: &B) {
    let clf = Classifier::load(be, &shared(MINILM), None).unwrap();
    let fx = load_fixture("minilm");
    assert!(fx.rows.len() >= 50);
    let longest = fx.rows.iter().map(|r| r.ids.len()).max().unwrap();
    assert_eq!(longest, 512, "a text is truncated at 512 tokens");
    assert!(fx.rows.iter().any(|r| r.text.is_empty()));
    check_against_transformers(be, &clf, &fx, "minilm", 16);
    // Real outputs, not a constant: the toxic sentences score high, the SAMSum summaries low.
    let toxic = fx.rows.iter().filter(|r| r.probs[0] > 0.9).count();
    assert!(toxic >= 8, "only {toxic} texts above 0.9");
}

/// The long texts put an insult past token 512 (cut off) or at the start (kept).
pub fn truncation_keeps_the_closing_token<B: Backend>(be: &B) {
    let clf = Classifier::load(be, &shared(MINILM), None).unwrap();
    let fx = load_fixture("minilm");
    let long: Vec<&Row> = fx.rows.iter().filter(|r| r.ids.len() == 512).collect();
    assert_eq!(long.len(), 2);
    for r in long {
        let ids = clf.encode(&r.text).unwrap();
        assert_eq!((ids.len(), ids[0], ids[511]), (512, 101, 102), "[CLS] … [SEP] within 512 tokens");
    }
    let p = clf.score(be, &[fx.rows[fx.rows.len() - 2].text.as_str(), &fx.rows[fx.rows.len() - 1].text], 2, |_| {});
    let p = p.unwrap();
    assert!(p[0][0] < 0.1 && p[1][0] > 0.9, "insult cut off / kept: {p:?}");
}

/// MODEL_CARD.md's sanity values (0.0028 and 0.9984) are what the model gives when each sentence is
/// padded to 128 tokens and the padding is attended to; masked as Detoxify runs it, transformers
/// gives 0.0018 and 0.9987 (tools/make_classifier_fixtures.py prints both sides). The engine must
/// give the masked values through its API and reproduces the card's numbers when run the card's way.
pub fn model_card_sanity_values<B: Backend>(be: &B) {
    let clf = Classifier::load(be, &shared(MINILM), None).unwrap();
    let texts = ["Amanda will bring Jerry some cookies tomorrow.", "You are a stupid idiot and I hate you."];
    let masked = clf.score(be, &texts, 2, |_| {}).unwrap();
    let fx = load_fixture("minilm");
    for (t, p) in texts.iter().zip(&masked) {
        let want = fx.rows.iter().find(|r| r.text == *t).unwrap().probs[0];
        assert!((p[0] - want).abs() < 2e-5, "{t}: {} vs transformers {want}", p[0]);
    }
    let width = 128;
    let mut ids = Vec::new();
    for t in texts {
        let mut row = clf.encode(t).unwrap();
        row.resize(width, clf.config().pad_token_id);
        ids.extend(row);
    }
    let m = &clf.model;
    let shape = [texts.len(), width];
    let logits = m
        .logits(
            be,
            &be.upload_ids(&ids, &shape).unwrap(),
            &be.upload_ids(&m.position_ids(&ids, width), &shape).unwrap(),
            &be.upload_ids(&[width as u32; 2], &[2]).unwrap(),
        )
        .unwrap();
    let card: Vec<f32> = be.download(&logits).unwrap().into_iter().map(sigmoid).collect();
    assert_eq!(format!("{:.4} {:.4}", card[0], card[1]), "0.0028 0.9984", "unmasked, padded to 128: {card:?}");
}

pub fn roberta_matches_transformers<B: Backend>(be: &B) {
    let tok = shared("tokenizers/roberta-base/tokenizer.json");
    let clf = Classifier::load(be, &fixture("classifier/roberta_tiny"), Some(&tok)).unwrap();
    let fx = load_fixture("roberta_tiny");
    assert_eq!(clf.encode("Hello world").unwrap(), [0, 31414, 232, 2]);
    assert!(fx.rows.iter().any(|r| r.ids[1..r.ids.len() - 1].contains(&1)), "a literal <pad> mid-text");
    assert_eq!(clf.reported_labels(), &fx.labels[..7], "Detoxify unbiased reports its first 7 labels");
    assert_eq!(clf.label_index("toxicity").unwrap(), 0);
    check_against_transformers(be, &clf, &fx, "roberta_tiny", 5);
    // Batching changes nothing but speed.
    let texts: Vec<&str> = fx.rows.iter().map(|r| r.text.as_str()).collect();
    let one = clf.logits(be, &texts, 1, |_| {}).unwrap().concat();
    let all = clf.logits(be, &texts, texts.len(), |_| {}).unwrap().concat();
    assert!(rel_max_err(&one, &all) < 1e-5, "batch of 1 vs batch of {}", texts.len());
}

pub fn converted_detoxify_matches_transformers<B: Backend>(be: &B) {
    let tok = shared("tokenizers/bert-base-uncased/tokenizer.json");
    let clf = Classifier::load(be, &fixture("classifier/detoxify_original_tiny"), Some(&tok)).unwrap();
    let fx = load_fixture("detoxify_original_tiny");
    let original = ["toxicity", "severe_toxicity", "obscene", "threat", "insult", "identity_attack"];
    assert_eq!(clf.reported_labels(), original, "Detoxify original's labels, renamed as Detoxify does");
    check_against_transformers(be, &clf, &fx, "detoxify_original_tiny", 4);
}

/// A copy of the converted Detoxify fixture with its weights edited by `edit`.
pub fn edited_copy(edit: impl FnOnce(&mut BTreeMap<String, OwnedTensor>)) -> tempfile::TempDir {
    let src = fixture("classifier/detoxify_original_tiny");
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), d.path().join("config.json")).unwrap();
    let ckpt = Checkpoint::open_dir(&src).unwrap();
    let mut tensors: BTreeMap<String, OwnedTensor> = ckpt
        .names()
        .into_iter()
        .map(|n| {
            let t = ckpt.get(n).unwrap();
            (n.to_string(), OwnedTensor { dtype: t.dtype, shape: t.shape.to_vec(), bytes: t.bytes.to_vec() })
        })
        .collect();
    edit(&mut tensors);
    write_safetensors(&d.path().join("model.safetensors"), &tensors, None).unwrap();
    d
}

fn load_err<B: Backend>(be: &B, dir: &Path, tok: Option<&Path>) -> String {
    match Classifier::load(be, dir, tok) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

pub fn loader_errors_name_the_problem<B: Backend>(be: &B) {
    let bert_tok = shared("tokenizers/bert-base-uncased/tokenizer.json");
    let tok = Some(bert_tok.as_path());
    let e = load_err(be, Path::new("/nonexistent/classifier"), tok);
    assert!(e.contains("/nonexistent/classifier") && e.contains("does not exist"), "{e}");

    let missing = "bert.encoder.layer.1.output.dense.bias";
    let d = edited_copy(|t| {
        t.remove(missing);
    });
    let e = load_err(be, d.path(), tok);
    assert!(e.contains(missing) && e.contains("missing") && e.contains("model.safetensors"), "{e}");

    let d = edited_copy(|t| {
        let w = t.get_mut("classifier.weight").unwrap();
        w.shape = vec![3, 48];
    });
    let e = load_err(be, d.path(), tok);
    assert!(e.contains("classifier.weight") && e.contains("[3, 48]") && e.contains("[6, 24]"), "{e}");

    let d = edited_copy(|_| {});
    let cfg = d.path().join("config.json");
    let mut j: Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    j["model_type"] = Value::from("t5");
    std::fs::write(&cfg, j.to_string()).unwrap();
    let e = load_err(be, d.path(), tok);
    assert!(e.contains("config.json") && e.contains("model_type is \"t5\""), "{e}");

    let roberta_tok = shared("tokenizers/roberta-base/tokenizer.json");
    let e = load_err(be, &fixture("classifier/detoxify_original_tiny"), Some(&roberta_tok));
    assert!(e.contains("50265 tokens") && e.contains("30522 rows"), "{e}");
    let e = load_err(be, &fixture("classifier/detoxify_original_tiny"), None);
    assert!(e.contains("tokenizer.json") && e.contains("does not exist"), "{e}");
}

crate::common::suite!("classifier":
    each minilm_matches_transformers,
    each truncation_keeps_the_closing_token,
    // The model card's four-decimal values are checked on the CPU only.
    cpu model_card_sanity_values,
    each roberta_matches_transformers,
    each converted_detoxify_matches_transformers,
    each loader_errors_name_the_problem,
);
