//! Data parallelism on the CPU. The step-level bodies (tests/suites/data_parallel.rs; tests/gpu.rs
//! runs them with a CUDA backend per worker) compare one worker against groups of workers. Here,
//! also whole runs: `detox train` and `detox sft` through their trainers, one worker against two,
//! with dropout off (each worker draws its own masks; for SFT T5's own too, through the model's
//! `dropout_rate`): the same log and the same files written, by worker 0 alone.

mod common;
#[path = "suites/data_parallel.rs"]
mod data_parallel;

use common::{rel_max_err, shared};
use detox::backend::cpu::Cpu;
use detox::checkpoint::Checkpoint;
use detox::parallel::{Collective, Solo, Threads};
use detox::ppo::settings::TrainSettings;
use detox::ppo::trainer::Trainer;
use detox::sft::SftSettings;
use detox::sft::trainer::SftTrainer;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

#[test]
fn a_ppo_step_is_the_same_on_one_worker_and_on_two() {
    data_parallel::a_ppo_step_is_the_same_on_one_worker_and_on_two(|| Cpu);
}

#[test]
fn an_sft_step_is_the_same_on_one_worker_and_on_two_or_three() {
    data_parallel::an_sft_step_is_the_same_on_one_worker_and_on_two_or_three(|| Cpu);
}

fn init_tiny(dir: &Path) -> PathBuf {
    let model = dir.join("tiny");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_detox"))
        .args(["init", "--size", "tiny", "--seed", "3", "--dtype", "f32", "--out"])
        .arg(&model)
        .arg("--tokenizer")
        .arg(shared("tokenizers/t5/tokenizer.json"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    model
}

/// Sets `dropout_rate` 0 in the model's config.json: SFT's training passes apply T5's own dropout.
fn without_model_dropout(model: &Path) {
    let path = model.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["dropout_rate"] = serde_json::json!(0.0);
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
}

/// Runs `work` on one worker, then on a group of two (threads), each returning what it wrote.
fn one_and_two<T: Send>(work: impl Fn(&dyn Collective<Cpu>, &str) -> T + Sync) -> (T, Vec<T>) {
    let one = work(&Solo, "one");
    let group = Threads::group(2);
    let two = std::thread::scope(|s| {
        let work = &work;
        let handles: Vec<_> = group.iter().map(|g| s.spawn(move || work(g, "two"))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    (one, two)
}

fn log(out: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Every number of two log lines, timings, rates and GPU readings aside, agrees within `tol`,
/// relative to its size or to 0.01, whichever is larger: per-token KL terms are differences of
/// log-probabilities about 1e4 times their size, so their f32 rounding shows at that scale.
fn same_numbers(a: &serde_json::Value, b: &serde_json::Value, tol: f64, path: &str) {
    match (a, b) {
        (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
            let keys = |o: &serde_json::Map<String, serde_json::Value>| {
                o.keys()
                    .filter(|k| !k.starts_with("time") && !k.starts_with("gpu_") && !k.ends_with("per_s"))
                    .cloned()
                    .collect::<Vec<_>>()
            };
            assert_eq!(keys(x), keys(y), "{path}: different fields");
            for k in keys(x) {
                same_numbers(&x[&k], &y[&k], tol, &format!("{path}.{k}"));
            }
        }
        (serde_json::Value::Array(x), serde_json::Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{path}");
            x.iter().zip(y).enumerate().for_each(|(i, (p, q))| same_numbers(p, q, tol, &format!("{path}[{i}]")));
        }
        (serde_json::Value::Number(x), serde_json::Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!((x - y).abs() <= tol * x.abs().max(1e-2), "{path}: {x} on one worker, {y} on two");
        }
        _ => assert_eq!(a, b, "{path}"),
    }
}

/// Every tensor of two safetensors files agrees within `tol` (relative to its scale).
fn same_tensors(a: &Path, b: &Path, tol: f32) {
    let (x, y) = (Checkpoint::open_file(a).unwrap(), Checkpoint::open_file(b).unwrap());
    let names = x.names();
    assert_eq!(names, y.names(), "{}", a.display());
    for n in names {
        let err = rel_max_err(&y.get(n).unwrap().to_f32(), &x.get(n).unwrap().to_f32());
        assert!(err <= tol, "{n} in {}: differs by {err}", a.display());
    }
}

#[test]
fn a_ppo_run_is_the_same_on_one_worker_and_on_two() {
    let d = tempfile::tempdir().unwrap();
    let model = init_tiny(d.path());
    let run = |group: &dyn Collective<Cpu>, name: &str| -> PathBuf {
        let out = d.path().join(name);
        let toml = format!(
            "[model]\npath = {model:?}\n[lora]\nr = 8\nalpha = 16.0\ndropout = 0.0\nvalue_dropout = 0.0\n\
             [data]\npath = {:?}\nlimit = 32\nmax_source_len = 48\n[generation]\nmax_new_tokens = 6\n\
             [reward]\nkind = \"token_share\"\n[ppo]\nbatch_size = 6\nmini_batch_size = 3\nppo_epochs = 2\n\
             learning_rate = 0.001\n[run]\ndevice = \"cpu\"\nsteps = 3\ncheckpoint_every = 3\nout = {out:?}\n",
            shared("data/samsum/train.jsonl")
        );
        let cfg = d.path().join(format!("{name}-{}.toml", group.rank()));
        std::fs::write(&cfg, toml).unwrap();
        let mut t = Trainer::new(&Cpu, TrainSettings::load(&cfg).unwrap(), None, group).unwrap();
        t.run(&AtomicBool::new(false)).unwrap()
    };
    let (one, two) = one_and_two(run);
    assert_eq!(two[0], one.parent().unwrap().parent().unwrap().join("two").join(one.file_name().unwrap()));
    let (a, b) = (log(one.parent().unwrap()), log(two[0].parent().unwrap()));
    assert_eq!((a.len(), b.len()), (3, 3), "one line a step, written once");
    for (x, y) in a.iter().zip(&b) {
        same_numbers(x, y, 1e-3, "log");
    }
    for f in ["adapter_model.safetensors", "value_head.safetensors", "optimizer.safetensors"] {
        same_tensors(&one.join(f), &two[0].join(f), 1e-4);
    }
}

#[test]
fn an_sft_run_is_the_same_on_one_worker_and_on_two() {
    let d = tempfile::tempdir().unwrap();
    let model = init_tiny(d.path());
    without_model_dropout(&model);
    let run = |group: &dyn Collective<Cpu>, name: &str| -> PathBuf {
        let mut s = SftSettings::default();
        s.model.path = model.clone();
        s.data.train = shared("data/samsum/train.jsonl");
        s.data.eval = shared("data/samsum/validation.jsonl");
        s.data.train_limit = 10;
        s.data.max_source_len = 32;
        s.data.max_target_len = 12;
        s.optim.batch_size = 5;
        s.optim.warmup_steps = 0;
        s.optim.learning_rate = 1e-2;
        s.eval.limit = 3;
        s.eval.max_new_tokens = 4;
        s.run.device = "cpu".into();
        s.run.epochs = 1;
        s.run.out = d.path().join(name);
        let mut t = SftTrainer::new(&Cpu, s, group).unwrap();
        t.run(&AtomicBool::new(false)).unwrap().0
    };
    let (one, two) = one_and_two(run);
    let (a, b) = (log(one.parent().unwrap()), log(two[0].parent().unwrap()));
    assert_eq!(a.len(), 3, "two steps and one evaluation");
    assert_eq!(a.len(), b.len(), "one line a step, written once");
    for (x, y) in a.iter().zip(&b) {
        same_numbers(x, y, 1e-3, "log");
    }
    same_tensors(&one.join("model.safetensors"), &two[0].join("model.safetensors"), 1e-4);
}
