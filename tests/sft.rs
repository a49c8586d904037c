//! `detox sft` through the library on the CPU: the saved Hugging Face directory holds exactly the
//! model as trained (full-parameter: the f32 masters, split back into q/k/v and wi_0/wi_1), and a
//! LoRA run's merged save computes what the model with its adapters computes.

mod common;

use common::{rel_max_err, shared};
use detox::backend::cpu::Cpu;
use detox::backend::prelude::*;
use detox::parallel::Solo;
use detox::sft::SftSettings;
use detox::sft::settings::Method;
use detox::sft::trainer::SftTrainer;
use detox::t5::{Fwd, T5};
use std::sync::atomic::AtomicBool;

fn settings(dir: &std::path::Path, method: Method) -> SftSettings {
    let model = dir.join("tiny");
    if !model.exists() {
        let tok = shared("tokenizers/t5/tokenizer.json");
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_detox"))
            .args(["init", "--size", "tiny", "--seed", "5", "--dtype", "f32", "--out"])
            .arg(&model)
            .arg("--tokenizer")
            .arg(&tok)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
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
    let d = tempfile::tempdir().unwrap();
    for method in [Method::Full, Method::Lora] {
        let mut t = SftTrainer::new(&Cpu, settings(d.path(), method), &Solo).unwrap();
        let before = logits(&t.model, method == Method::Lora);
        let (dir, eval) = t.run(&AtomicBool::new(false)).unwrap();
        assert_eq!(t.step, 2);
        assert!(eval.eval_loss.is_finite());
        let trained = logits(&t.model, method == Method::Lora);
        assert!(rel_max_err(&trained, &before) > 1e-3, "{method:?}: training changed nothing");
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
