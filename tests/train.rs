//! `detox train` end to end on the CPU with a tiny model and the toy reward: 50 steps raise the
//! reward with finite KL and losses; a resumed run matches an uninterrupted one bit for bit; Ctrl-C
//! checkpoints and exits; a blown-up loss stops with the last good checkpoint named.

mod common;

use common::shared;
use std::path::Path;
use std::process::{Command, Output};

fn detox(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_detox")).args(args).output().expect("detox runs")
}

fn init_tiny(dir: &Path) {
    let tok = shared("tokenizers/t5/tokenizer.json");
    let o = detox(&["init", "--size", "tiny", "--out", dir.to_str().unwrap(), "--tokenizer", tok.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A toy-reward run on the tiny model; `extra` is appended to the TOML.
fn config(dir: &Path, model: &Path, out: &Path, extra: &str) -> std::path::PathBuf {
    let p = dir.join(format!("{}.toml", out.file_name().unwrap().to_str().unwrap()));
    let data = shared("data/samsum/train.jsonl");
    let text = format!(
        "[model]\npath = {model:?}\n[lora]\nr = 8\nalpha = 16.0\n[data]\npath = {data:?}\nlimit = 64\nmax_source_len = 64\n\
         [generation]\nmax_new_tokens = 8\n[reward]\nkind = \"token_share\"\n\
         [ppo]\nbatch_size = 8\nmini_batch_size = 2\nppo_epochs = 4\nlearning_rate = 0.001\ninit_kl_coef = 0.02\n\
         [run]\nout = {out:?}\n{extra}"
    );
    std::fs::write(&p, text).unwrap();
    p
}

fn log(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("log.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn run_ok(cfg: &Path, extra: &[&str]) {
    let mut args = vec!["train", "--config", cfg.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = detox(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn fifty_steps_raise_the_toy_reward_with_finite_kl_and_losses() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("tiny");
    init_tiny(&model);
    let out = d.path().join("run");
    run_ok(&config(d.path(), &model, &out, "steps = 50\ncheckpoint_every = 25\n"), &[]);
    let rows = log(&out);
    assert_eq!(rows.len(), 50);
    for r in &rows {
        for key in ["kl", "policy_loss", "value_loss", "reward_mean", "approxkl"] {
            assert!(r[key].as_f64().unwrap().is_finite(), "step {}: {key} = {}", r["step"], r[key]);
        }
    }
    let mean =
        |rs: &[serde_json::Value]| rs.iter().map(|r| r["reward_mean"].as_f64().unwrap()).sum::<f64>() / rs.len() as f64;
    let (first, last) = (mean(&rows[..10]), mean(&rows[40..]));
    assert!(last > first + 0.03, "the toy reward should rise: first 10 steps {first:.3}, last 10 {last:.3}");
    assert!(out.join("checkpoint-00050/adapter_model.safetensors").is_file());
    assert!(out.join("checkpoint-00025/optimizer.safetensors").is_file());
}

/// Everything of a log line but the timings and the GPU's readings.
fn without_timings(mut v: serde_json::Value) -> serde_json::Value {
    let o = v.as_object_mut().unwrap();
    o.retain(|k, _| !k.starts_with("time_") && !k.starts_with("gpu_"));
    v
}

#[test]
fn a_resumed_run_matches_an_uninterrupted_one_bit_for_bit() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("tiny");
    init_tiny(&model);
    let straight = d.path().join("straight");
    run_ok(&config(d.path(), &model, &straight, "steps = 4\ncheckpoint_every = 2\n"), &[]);
    let split = d.path().join("split");
    run_ok(&config(d.path(), &model, &split, "steps = 2\ncheckpoint_every = 2\n"), &[]);
    let cfg = config(d.path(), &model, &split, "steps = 4\ncheckpoint_every = 2\n");
    run_ok(&cfg, &["--resume", split.to_str().unwrap()]);
    for f in ["adapter_model.safetensors", "value_head.safetensors", "optimizer.safetensors"] {
        let a = std::fs::read(straight.join("checkpoint-00004").join(f)).unwrap();
        let b = std::fs::read(split.join("checkpoint-00004").join(f)).unwrap();
        assert!(a == b, "{f} differs between the straight and the resumed run");
    }
    let (a, b) = (log(&straight), log(&split));
    assert_eq!(a.len(), 4);
    assert_eq!(b.len(), 4);
    for (x, y) in a.into_iter().zip(b) {
        assert_eq!(without_timings(x), without_timings(y));
    }
}

#[test]
fn ctrl_c_finishes_the_step_checkpoints_and_exits() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("tiny");
    init_tiny(&model);
    let out = d.path().join("interrupted");
    let cfg = config(d.path(), &model, &out, "steps = 100000\ncheckpoint_every = 100000\n");
    let mut child = Command::new(env!("CARGO_BIN_EXE_detox"))
        .args(["train", "--config", cfg.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let log_path = out.join("log.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !std::fs::read_to_string(&log_path).map(|s| !s.is_empty()).unwrap_or(false) {
        assert!(std::time::Instant::now() < deadline, "no step finished in time");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let kill = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    let latest = std::fs::read_to_string(out.join("latest")).unwrap();
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(latest.trim()).join("trainer_state.json")).unwrap())
            .unwrap();
    let step = state["step"].as_u64().unwrap();
    assert!((1..100000).contains(&step), "checkpoint at step {step}");
    assert_eq!(log(&out).len() as u64, step, "the checkpoint holds every logged step");
}

#[test]
fn a_blown_up_loss_stops_with_the_last_good_checkpoint_named() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("tiny");
    init_tiny(&model);
    let out = d.path().join("blown");
    run_ok(&config(d.path(), &model, &out, "steps = 2\ncheckpoint_every = 1\n"), &[]);
    // Resumed with an absurd learning rate, the first update sends the adapters to infinity.
    let cfg = config(d.path(), &model, &out, "steps = 20\ncheckpoint_every = 1\n");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("learning_rate = 0.001", "learning_rate = 1e30");
    std::fs::write(&cfg, text).unwrap();
    let o = detox(&["train", "--config", cfg.to_str().unwrap(), "--resume", out.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    assert!(e.contains("non-finite") || e.contains("became NaN") || e.contains("became inf"), "{e}");
    assert!(e.contains("last good checkpoint is") && e.contains("checkpoint-00002"), "{e}");
    assert_eq!(std::fs::read_to_string(out.join("latest")).unwrap(), "checkpoint-00002");
}
