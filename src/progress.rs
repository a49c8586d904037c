//! Progress of long work on stderr: an indicatif bar on a terminal that ticks within a step (the
//! phase, and its tokens or minibatches done) with an ETA from the steps this process finished;
//! one plain line per step when stderr is not a terminal (nohup, `| tee`, CI). The trainers call
//! `phase` inside a step and `step` after it; both are no-ops for a hidden progress.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

enum Sink {
    Hidden,
    Bar(ProgressBar),
    Plain,
}

pub struct Progress {
    sink: Sink,
    what: String,
    total: usize,
    pos: usize,
    /// Where this process started counting, and when: the ETA uses only steps done here.
    first: usize,
    started: Instant,
    /// The last step's summary, shown beside the phase.
    last: String,
}

/// A duration as `1h02m`, `4m05s` or `12s`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

impl Progress {
    /// Progress of `total` steps of `what` on stderr: a bar on a terminal, plain lines otherwise.
    pub fn stderr(total: usize, what: &str) -> Self {
        let sink = if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total as u64);
            bar.set_style(
                ProgressStyle::with_template("{prefix} [{elapsed_precise}] {bar:30} {pos}/{len} {wide_msg}")
                    .expect("valid template"),
            );
            bar.set_prefix(what.to_string());
            bar.enable_steady_tick(Duration::from_secs(1));
            Sink::Bar(bar)
        } else {
            Sink::Plain
        };
        Self::with(sink, total, what)
    }

    /// Progress that shows nothing (data-parallel workers other than 0, library callers).
    pub fn hidden() -> Self {
        Self::with(Sink::Hidden, 0, "")
    }

    fn with(sink: Sink, total: usize, what: &str) -> Self {
        Self { sink, what: what.to_string(), total, pos: 0, first: 0, started: Instant::now(), last: String::new() }
    }

    /// Starts counting at `pos` steps already done (a resumed run).
    pub fn set_position(&mut self, pos: usize) {
        self.pos = pos;
        self.first = pos;
        self.started = Instant::now();
        if let Sink::Bar(b) = &self.sink {
            b.set_position(pos as u64);
        }
    }

    /// The time left, from the mean time of the steps this process finished; None before the first.
    pub fn eta(&self) -> Option<Duration> {
        let done = self.pos.checked_sub(self.first).filter(|&d| d > 0)?;
        let per = self.started.elapsed().as_secs_f64() / done as f64;
        Some(Duration::from_secs_f64(per * self.total.saturating_sub(self.pos) as f64))
    }

    fn eta_text(&self) -> String {
        match self.eta() {
            Some(d) => format!("ETA {}", human(d)),
            None => "ETA after the first step".into(),
        }
    }

    /// Within step `pos + 1`: `name` (rollout, reward, optimise…) has done `done` of `total` `unit`.
    pub fn phase(&self, name: &str, done: usize, total: usize, unit: &str) {
        if let Sink::Bar(b) = &self.sink {
            let last = if self.last.is_empty() { String::new() } else { format!(" | {}", self.last) };
            b.set_message(format!("step {}: {name} {done}/{total} {unit} | {}{last}", self.pos + 1, self.eta_text()));
        }
    }

    /// A step finished; `summary` is its metrics in a few words.
    pub fn step(&mut self, summary: String, secs: f64) {
        self.pos += 1;
        self.last = summary;
        match &self.sink {
            Sink::Hidden => {}
            Sink::Bar(b) => {
                b.set_position(self.pos as u64);
                b.set_message(format!("{} | {}", self.last, self.eta_text()));
            }
            Sink::Plain => eprintln!(
                "{} step {}/{}: {} ({secs:.1} s, {})",
                self.what,
                self.pos,
                self.total,
                self.last,
                self.eta_text()
            ),
        }
    }

    /// A line above the bar (or a plain line).
    pub fn println(&self, line: String) {
        match &self.sink {
            Sink::Hidden => {}
            Sink::Bar(b) => b.println(line),
            Sink::Plain => eprintln!("{line}"),
        }
    }

    /// Leaves the bar where it stands (a finished or interrupted run, or an error), on its own line.
    pub fn stop(&self) {
        if let Sink::Bar(b) = &self.sink {
            b.abandon();
        }
    }
}

/// A bar of `len` items on stderr for the batch commands (summarize, score, eval); hidden when
/// stderr is not a terminal.
pub fn bar(len: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{elapsed_precise}] {wide_bar} {pos}/{len} ({eta} left)")
            .expect("valid template"),
    );
    pb.set_message(what.to_string());
    pb
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_eta_waits_for_a_step_then_counts_only_this_process_steps() {
        let mut p = Progress::with(Sink::Hidden, 50, "training");
        p.set_position(10);
        assert_eq!(p.eta(), None, "no ETA before a step of this process finishes");
        p.started = Instant::now() - Duration::from_secs(20);
        p.step("x".into(), 10.0);
        p.step("x".into(), 10.0);
        let eta = p.eta().unwrap().as_secs_f64();
        assert!((eta - 380.0).abs() < 1.0, "38 steps left at 10 s each, got {eta}");
        assert_eq!(human(Duration::from_secs(4815)), "1h20m");
        assert_eq!(human(Duration::from_secs(245)), "4m05s");
    }

    #[test]
    fn the_bar_names_the_phase_within_a_step_and_stays_where_an_interrupted_run_stopped() {
        let bar = ProgressBar::with_draw_target(Some(50), indicatif::ProgressDrawTarget::hidden());
        let mut p = Progress::with(Sink::Bar(bar.clone()), 50, "training");
        p.phase("rollout", 3, 16, "tokens");
        assert_eq!(bar.message(), "step 1: rollout 3/16 tokens | ETA after the first step");
        p.step("reward 0.5".into(), 1.0);
        p.phase("optimise", 2, 16, "minibatches");
        let m = bar.message();
        assert!(m.starts_with("step 2: optimise 2/16 minibatches | ETA ") && m.ends_with(" | reward 0.5"), "{m}");
        p.stop();
        assert_eq!(bar.position(), 1, "an interrupted run's bar is not drawn as finished");
    }
}
