//! Every way a checkpoint can be wrong gets an error that names the file or field, never a panic.

mod common;

use common::fixture;
use detox::backend::cpu::Cpu;
use detox::checkpoint::{Checkpoint, DType, OwnedTensor, write_safetensors};
use detox::t5::T5;
use std::collections::BTreeMap;
use std::path::Path;

fn copy_fixture(to: &Path) {
    let from = fixture("t5/flan_small");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

fn load_err(dir: &Path) -> String {
    match T5::load(&Cpu, dir) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

/// Rewrites model.safetensors through `edit`, which gets every tensor by name.
fn rewrite(dir: &Path, edit: impl FnOnce(&mut BTreeMap<String, OwnedTensor>)) {
    let path = dir.join("model.safetensors");
    let ckpt = Checkpoint::open_file(&path).unwrap();
    let mut tensors = BTreeMap::new();
    for name in ckpt.names() {
        let t = ckpt.get(name).unwrap();
        tensors
            .insert(name.to_string(), OwnedTensor { dtype: t.dtype, shape: t.shape.to_vec(), bytes: t.bytes.to_vec() });
    }
    drop(ckpt);
    edit(&mut tensors);
    write_safetensors(&path, &tensors, None).unwrap();
}

#[test]
fn missing_directory() {
    let e = load_err(Path::new("/nonexistent/model"));
    assert!(e.contains("/nonexistent/model") && e.contains("does not exist"), "{e}");
}

#[test]
fn missing_config() {
    let d = tempfile::tempdir().unwrap();
    let e = load_err(d.path());
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn missing_weights() {
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("t5/flan_small/config.json"), d.path().join("config.json")).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("no weights in") && e.contains("model.safetensors"), "{e}");
}

#[test]
fn truncated_safetensors() {
    let d = tempfile::tempdir().unwrap();
    copy_fixture(d.path());
    let p = d.path().join("model.safetensors");
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(len / 2).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model.safetensors") && e.contains("truncated or corrupt"), "{e}");
}

#[test]
fn corrupt_header() {
    let d = tempfile::tempdir().unwrap();
    copy_fixture(d.path());
    let p = d.path().join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[8..40].copy_from_slice(&[b'#'; 32]);
    std::fs::write(&p, bytes).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model.safetensors") && e.contains("truncated or corrupt"), "{e}");
}

#[test]
fn tiny_garbage_file() {
    let d = tempfile::tempdir().unwrap();
    copy_fixture(d.path());
    std::fs::write(d.path().join("model.safetensors"), b"abc").unwrap();
    let e = load_err(d.path());
    assert!(e.contains("truncated or corrupt"), "{e}");
}

#[test]
fn missing_tensor() {
    let d = tempfile::tempdir().unwrap();
    copy_fixture(d.path());
    rewrite(d.path(), |t| {
        t.remove("decoder.block.1.layer.1.EncDecAttention.v.weight");
    });
    let e = load_err(d.path());
    assert!(e.contains("decoder.block.1.layer.1.EncDecAttention.v.weight") && e.contains("missing"), "{e}");
}

#[test]
fn missing_untied_lm_head() {
    let d = tempfile::tempdir().unwrap();
    copy_fixture(d.path());
    rewrite(d.path(), |t| {
        t.remove("lm_head.weight");
    });
    let e = load_err(d.path());
    assert!(e.contains("lm_head.weight") && e.contains("tie_word_embeddings"), "{e}");
}

#[test]
fn misshaped_tensor_names_both_shapes() {
    let d = tempfile::tempdir().unwrap();
    copy_fixture(d.path());
    rewrite(d.path(), |t| {
        t.insert(
            "encoder.block.0.layer.1.DenseReluDense.wi_0.weight".into(),
            OwnedTensor::from_f32(&vec![0.5; 64 * 100], &[100, 64], DType::F32),
        );
    });
    let e = load_err(d.path());
    assert!(
        e.contains("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")
            && e.contains("[100, 64]")
            && e.contains("[128, 64]"),
        "{e}"
    );
}

#[test]
fn unsupported_dtype() {
    let d = tempfile::tempdir().unwrap();
    copy_fixture(d.path());
    let path = d.path().join("model.safetensors");
    // Re-write one tensor as I64 with the safetensors crate directly (OwnedTensor only makes floats).
    let ckpt = Checkpoint::open_file(&path).unwrap();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for name in ckpt.names() {
        let t = ckpt.get(name).unwrap();
        let (dtype, bytes) = if name == "shared.weight" {
            (safetensors::Dtype::I64, vec![0u8; t.numel() * 8])
        } else {
            (safetensors::Dtype::F32, t.bytes.to_vec())
        };
        owned.push((name.to_string(), dtype, t.shape.to_vec(), bytes));
    }
    drop(ckpt);
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("shared.weight") && e.contains("unsupported dtype I64"), "{e}");
}

fn with_config(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let d = tempfile::tempdir().unwrap();
    copy_fixture(d.path());
    let p = d.path().join("config.json");
    let mut j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut j);
    std::fs::write(&p, j.to_string()).unwrap();
    load_err(d.path())
}

#[test]
fn t5_v1_0_relu_config_is_refused() {
    let e = with_config(|j| j["feed_forward_proj"] = "relu".into());
    assert!(e.contains("config.json") && e.contains("feed_forward_proj") && e.contains("relu"), "{e}");
}

#[test]
fn non_t5_config_is_refused() {
    let e = with_config(|j| j["model_type"] = "bart".into());
    assert!(e.contains("config.json") && e.contains("model_type") && e.contains("bart"), "{e}");
}

#[test]
fn config_missing_a_size_is_refused() {
    let e = with_config(|j| {
        j.as_object_mut().unwrap().remove("d_model");
    });
    assert!(e.contains("config.json") && e.contains("d_model"), "{e}");
}

#[test]
fn config_with_bad_json() {
    let d = tempfile::tempdir().unwrap();
    copy_fixture(d.path());
    std::fs::write(d.path().join("config.json"), "{ not json").unwrap();
    let e = load_err(d.path());
    assert!(e.contains("config.json") && e.contains("not valid JSON"), "{e}");
}

#[test]
fn shard_index_naming_a_missing_file() {
    let d = tempfile::tempdir().unwrap();
    let from = fixture("t5/sharded_f16");
    for f in ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors"] {
        std::fs::copy(from.join(f), d.path().join(f)).unwrap();
    }
    let e = load_err(d.path());
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
}

#[test]
fn adapter_errors_name_the_file() {
    let mut model = T5::load(&Cpu, &fixture("t5/flan_small")).unwrap();
    let e = format!("{:#}", model.load_adapter(&Cpu, Path::new("/nonexistent/adapter")).unwrap_err());
    assert!(e.contains("/nonexistent/adapter"), "{e}");
    // An adapter made for another model: shapes disagree.
    let e = format!("{:#}", model.load_adapter(&Cpu, &fixture("t5/odd_bf16/adapter")).unwrap_err());
    assert!(e.contains("lora_A.weight") && e.contains("expected"), "{e}");
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("adapter_config.json"),
        r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q"],"use_dora":true}"#,
    )
    .unwrap();
    let e = format!("{:#}", model.load_adapter(&Cpu, d.path()).unwrap_err());
    assert!(e.contains("adapter_config.json") && e.contains("use_dora"), "{e}");
}

fn detox(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_detox")).args(args).output().expect("detox runs")
}

/// Issue 14.6: NaN weights are refused by summarize and info, naming the tensor, instead of
/// garbage with rc 0.
#[test]
fn nan_weights_are_refused_by_summarize_and_info() {
    let d = tempfile::tempdir().unwrap();
    copy_fixture(d.path());
    rewrite(d.path(), |t| {
        let w = t.get_mut("shared.weight").unwrap();
        let f = OwnedTensor::from_f32(&[f32::NAN], &[1], w.dtype);
        w.bytes[..f.bytes.len()].copy_from_slice(&f.bytes);
    });
    let input = d.path().join("in.jsonl");
    std::fs::write(&input, "{\"dialogue\":\"hi\"}\n").unwrap();
    let tok = common::shared("tokenizers/t5/tokenizer.json");
    let m = d.path().to_str().unwrap();
    let o =
        detox(&["summarize", "--model", m, "--tokenizer", tok.to_str().unwrap(), "--input", input.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("shared.weight") && e.contains("NaN or infinite"), "{e}");
    let o = detox(&["info", "--model", m]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("shared.weight") && e.contains("NaN or infinite"), "{e}");
}

/// Issue 14.6: detox info checks the config against the weights.
#[test]
fn info_checks_the_config_against_the_weights() {
    let d = tempfile::tempdir().unwrap();
    copy_fixture(d.path());
    let p = d.path().join("config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    c["d_ff"] = serde_json::json!(c["d_ff"].as_u64().unwrap() * 2);
    std::fs::write(&p, c.to_string()).unwrap();
    let o = detox(&["info", "--model", d.path().to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("does not match its config.json"), "{e}");
}
