//! `detox sft` through the library on the CPU, with AdamW and with Adafactor: the saved Hugging Face
//! directory holds exactly the
//! model as trained (full-parameter: the f32 masters, split back into q/k/v and wi_0/wi_1), and a
//! LoRA run's merged save computes what the model with its adapters computes. A fresh model's first
//! loss under each `detox init --init` scheme.

mod common;

use common::{rel_max_err, shared};
use detox::backend::cpu::Cpu;
use detox::backend::prelude::*;
use detox::parallel::Solo;
use detox::sft::SftSettings;
use detox::sft::data::{Pair, SftBatch};
use detox::sft::settings::{Method, Optimizer};
use detox::sft::step::eval_loss;
use detox::sft::trainer::SftTrainer;
use detox::t5::{Fwd, T5};
use std::sync::atomic::AtomicBool;

/// `detox init --size tiny --init <init>` into `dir/<name>`, once.
fn init(dir: &std::path::Path, name: &str, scheme: &str) -> std::path::PathBuf {
    let model = dir.join(name);
    if !model.exists() {
        let tok = shared("tokenizers/t5/tokenizer.json");
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_detox"))
            .args(["init", "--size", "tiny", "--seed", "5", "--dtype", "f32", "--init", scheme, "--out"])
            .arg(&model)
            .arg("--tokenizer")
            .arg(&tok)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    model
}

fn settings(dir: &std::path::Path, method: Method) -> SftSettings {
    let model = init(dir, "tiny", "hf");
    let mut s = SftSettings::default();
    s.model.path = model;
    s.data.train = shared("data/samsum/train.jsonl");
    s.data.eval = shared("data/samsum/validation.jsonl");
    s.data.train_limit = 6;
    s.data.max_source_len = 32;
    s.data.max_target_len = 12;
    s.optim.method = method;
    s.optim.batch_size = 3;
    s.optim.warmup_steps = 0;
    s.optim.learning_rate = 1e-2;
    s.eval.limit = 2;
    s.eval.max_new_tokens = 3;
    s.run.device = "cpu".into();
    s.run.out = dir.join(format!("{method:?}"));
    s
}

/// Logits of a fixed batch.
fn logits(model: &T5<Cpu>, lora: bool) -> Vec<f32> {
    let ids = Cpu.upload_ids(&[37, 5, 99, 1, 8, 1, 0, 0], &[2, 4]).unwrap();
    let lengths = Cpu.upload_ids(&[4, 2], &[2]).unwrap();
    let dec = Cpu.upload_ids(&[0, 12, 7, 0, 3, 3], &[2, 3]).unwrap();
    Cpu.download(&model.forward(&Cpu, &ids, &lengths, &dec, Fwd::eval(lora)).unwrap().0).unwrap()
}

#[test]
fn the_saved_model_is_the_trained_model() {
    for optimizer in [Optimizer::Adamw, Optimizer::Adafactor] {
        saved_model_is_trained_model(optimizer);
    }
}

fn saved_model_is_trained_model(optimizer: Optimizer) {
    let d = tempfile::tempdir().unwrap();
    for method in [Method::Full, Method::Lora] {
        let mut s = settings(d.path(), method);
        s.optim.optimizer = optimizer;
        // T5's fine-tuning recipe: the configured rate. (Adafactor's relative step scaled by the
        // RMS of LoRA's zero-initialised B moves it by 1e-5 a step, as in transformers.)
        s.optim.relative_step = false;
        s.optim.scale_parameter = false;
        let mut t = SftTrainer::new(&Cpu, s, &Solo).unwrap();
        let before = logits(&t.model, method == Method::Lora);
        let (dir, eval) = t.run(&AtomicBool::new(false)).unwrap();
        assert_eq!(t.step, 2);
        assert!(eval.eval_loss.is_finite());
        let trained = logits(&t.model, method == Method::Lora);
        assert!(rel_max_err(&trained, &before) > 1e-3, "{optimizer:?} {method:?}: training changed nothing");
        let saved = logits(&T5::load(&Cpu, &dir).unwrap(), false);
        let err = rel_max_err(&saved, &trained);
        let tol = if method == Method::Full { 1e-6 } else { 1e-4 };
        assert!(err <= tol, "{method:?}: the saved model's logits differ by {err}");
        if method == Method::Lora {
            let mut base = T5::load(&Cpu, &settings(d.path(), method).model.path).unwrap();
            base.load_adapter(&Cpu, &dir.join("adapter")).unwrap();
            let err = rel_max_err(&logits(&base, true), &trained);
            assert!(err <= 1e-6, "the saved adapter's logits differ by {err}");
        }
    }
}

/// The plain cross-entropy of a fresh model on a fixed batch of 3 × 8 targets, and the variance of
/// its logits there.
fn first_loss(model: &T5<Cpu>) -> (f64, f64) {
    let pairs: Vec<Pair> = (0..3u32)
        .map(|r| Pair {
            source: (0..6).map(|i| 2 + (r * 977 + i * 131) % 30000).chain([1]).collect(),
            target: (0..7).map(|i| 2 + (r * 613 + i * 71) % 30000).chain([1]).collect(),
        })
        .collect();
    let batch = SftBatch::new(&pairs.iter().collect::<Vec<_>>(), 0, 0);
    let (_, ce, tokens) = eval_loss(&Cpu, model, &batch, 0.0).unwrap();
    let ids = Cpu.upload_ids(&batch.source.ids, &[3, batch.source.width]).unwrap();
    let lengths = Cpu.upload_ids(&batch.source.lengths, &[3]).unwrap();
    let dec = Cpu.upload_ids(&batch.decoder_input, &[3, batch.width]).unwrap();
    let logits = Cpu.download(&model.forward(&Cpu, &ids, &lengths, &dec, Fwd::eval(false)).unwrap().0).unwrap();
    let n = logits.len() as f64;
    let mean = logits.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = logits.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    (ce / tokens as f64, var)
}

/// With mesh-tensorflow's head the logits have variance near 1 and the first loss is what Gaussian
/// logits of that variance give over V words, ln V + σ²/2; transformers' head (std 1) makes
/// σ² = d_model and the loss tens of nats above ln V.
#[test]
fn mesh_tf_init_starts_near_ln_vocab_and_hf_far_above() {
    let d = tempfile::tempdir().unwrap();
    let hf = T5::load(&Cpu, &init(d.path(), "hf", "hf")).unwrap();
    let mesh = T5::load(&Cpu, &init(d.path(), "mesh", "mesh-tf")).unwrap();
    let ln_v = (hf.config.vocab_size as f64).ln();
    let (mesh_loss, mesh_var) = first_loss(&mesh);
    let expected = ln_v + mesh_var / 2.0;
    assert!((0.5..1.5).contains(&mesh_var), "mesh-tf logits' variance {mesh_var}");
    assert!((mesh_loss - expected).abs() < 0.5, "mesh-tf first loss {mesh_loss}, Gaussian logits give {expected}");
    let (hf_loss, hf_var) = first_loss(&hf);
    assert!(hf_var > hf.config.d_model as f64 / 2.0, "hf logits' variance {hf_var}");
    assert!(hf_loss > ln_v + 10.0, "hf first loss {hf_loss} vs ln V {ln_v}");
}
