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
    let child = Command::new(env!("CARGO_BIN_EXE_detox"))
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
    let o = child.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "an interrupted run has its own exit status: {e}");
    let last = e.lines().last().unwrap();
    assert!(last.starts_with("interrupted after step ") && last.contains("--resume"), "{e}");
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

fn steps_logged(out: &Path) -> Vec<u64> {
    log(out).iter().map(|r| r["step"].as_u64().unwrap()).collect()
}

/// Issue 14.1: a fresh run into a directory that holds a run is refused, saying how to resume or
/// overwrite; --overwrite-output-dir starts over with nothing of the old run left.
#[test]
fn a_fresh_run_into_a_used_run_directory_is_refused_until_overwrite() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("tiny");
    init_tiny(&model);
    let out = d.path().join("used");
    run_ok(&config(d.path(), &model, &out, "steps = 4\ncheckpoint_every = 2\n"), &[]);
    let cfg = config(d.path(), &model, &out, "steps = 2\ncheckpoint_every = 2\nseed = 7\n");
    let o = detox(&["train", "--config", cfg.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("already holds a run") && e.contains("checkpoint-00004"), "{e}");
    assert!(e.contains(&format!("--resume {}", out.display())) && e.contains("--overwrite-output-dir"), "{e}");
    assert_eq!(steps_logged(&out), [1, 2, 3, 4], "the refused run wrote nothing");
    run_ok(&cfg, &["--overwrite-output-dir"]);
    assert_eq!(steps_logged(&out), [1, 2]);
    assert!(!out.join("checkpoint-00004").exists(), "the old run's checkpoint stayed");
    assert_eq!(std::fs::read_to_string(out.join("latest")).unwrap(), "checkpoint-00002");
}

/// Issue 14.3: resuming from an older checkpoint cuts the log back to its step and removes what
/// interrupted writers left.
#[test]
fn resume_cuts_the_log_back_to_the_checkpoint_and_removes_debris() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("tiny");
    init_tiny(&model);
    let out = d.path().join("resumed");
    let cfg = config(d.path(), &model, &out, "steps = 4\ncheckpoint_every = 2\n");
    run_ok(&cfg, &[]);
    std::fs::write(out.join(".tmpAbC123"), "torn").unwrap();
    std::fs::create_dir(out.join(".checkpoint-00003.partial")).unwrap();
    let three = config(d.path(), &model, &out, "steps = 3\ncheckpoint_every = 2\n");
    run_ok(&three, &["--resume", out.join("checkpoint-00002").to_str().unwrap()]);
    assert_eq!(steps_logged(&out), [1, 2, 3]);
    assert!(!out.join("checkpoint-00004").exists(), "the abandoned later checkpoint stayed");
    assert_eq!(std::fs::read_to_string(out.join("latest")).unwrap(), "checkpoint-00003");
    assert!(!out.join(".tmpAbC123").exists() && !out.join(".checkpoint-00003.partial").exists());
}

/// Issue 14.2: a kill between moving the old checkpoint-N aside and naming the new one leaves a
/// run that `--resume RUN_DIR` continues. Resuming a finished run re-saves its last checkpoint
/// under the same number, which is the replacement the kill interrupts.
#[test]
fn a_kill_while_replacing_a_checkpoint_leaves_a_resumable_run() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("tiny");
    init_tiny(&model);
    let out = d.path().join("killed");
    let cfg = config(d.path(), &model, &out, "steps = 2\ncheckpoint_every = 1\n");
    run_ok(&cfg, &[]);
    let o = Command::new(env!("CARGO_BIN_EXE_detox"))
        .args(["train", "--config", cfg.to_str().unwrap(), "--resume"])
        .arg(&out)
        .env("DETOX_TEST_KILL_AT", "checkpoint-swap")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("DETOX_TEST_KILL_AT=checkpoint-swap"), "{e}");
    assert!(!out.join("checkpoint-00002").exists(), "the kill point is mid-replacement");
    let cfg = config(d.path(), &model, &out, "steps = 3\ncheckpoint_every = 1\n");
    let o = detox(&["train", "--config", cfg.to_str().unwrap(), "--resume", out.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("recovered") && e.contains("resuming from") && e.contains("(step 2)"), "{e}");
    assert_eq!(steps_logged(&out), [1, 2, 3]);
    assert_eq!(std::fs::read_to_string(out.join("latest")).unwrap(), "checkpoint-00003");
    let names: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "debris left: {names:?}");
}

/// Issue 14.4: with stderr not a terminal, one plain line per step with an ETA; the last line
/// says the run finished.
#[test]
fn progress_is_one_plain_line_per_step_when_stderr_is_not_a_terminal() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("tiny");
    init_tiny(&model);
    let out = d.path().join("plain");
    let cfg = config(d.path(), &model, &out, "steps = 3\ncheckpoint_every = 3\n");
    let o = detox(&["train", "--config", cfg.to_str().unwrap(), "--device", "cpu"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{e}");
    for n in 1..=3 {
        let line = e
            .lines()
            .find(|l| l.starts_with(&format!("training step {n}/3: reward ")))
            .unwrap_or_else(|| panic!("{e}"));
        assert!(line.contains(" s, ETA "), "{line}");
    }
    assert!(e.lines().last().unwrap().starts_with("finished 3 steps; checkpoint: "), "{e}");
}

/// Issue 14.6: invalid [generation] values fail before any work, leaving no log.
#[test]
fn invalid_generation_settings_fail_before_the_run_starts() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("tiny");
    init_tiny(&model);
    let out = d.path().join("badgen");
    let cfg = config(d.path(), &model, &out, "steps = 2\n");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("max_new_tokens = 8", "max_new_tokens = 8\ntop_p = 0.0");
    std::fs::write(&cfg, text).unwrap();
    let o = detox(&["train", "--config", cfg.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("[generation]") && e.contains("top_p"), "{e}");
    assert!(!out.exists(), "nothing was written");
}
