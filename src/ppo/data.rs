//! The dialogues a run trains on, and which of them each PPO step takes: passes over the data in a
//! fresh seeded order each time, so that step s's batch depends only on (seed, s) and a resumed run
//! sees exactly the batches the uninterrupted one would have.

use super::settings::DataSettings;
use anyhow::{Result, ensure};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

pub struct Dialogues {
    pub texts: Vec<String>,
}

impl Dialogues {
    /// The first `limit` rows with a non-empty `field` (SAMSum's train split has one empty dialogue).
    pub fn load(s: &DataSettings) -> Result<Self> {
        let path = s.path.to_string_lossy();
        let rows = crate::text::read_jsonl(&path)?;
        let mut texts = Vec::new();
        for (i, r) in rows.iter().enumerate() {
            let t = crate::text::string_field(r, &s.field, i, &path)?;
            if !t.trim().is_empty() {
                texts.push(t.to_string());
            }
            if texts.len() == s.limit {
                break;
            }
        }
        ensure!(!texts.is_empty(), "{path} holds no non-empty \"{}\"", s.field);
        Ok(Self { texts })
    }

    /// Indices of step `step`'s `batch` dialogues.
    pub fn batch(&self, step: usize, batch: usize, seed: u64) -> Vec<usize> {
        let n = self.texts.len();
        (step * batch..(step + 1) * batch)
            .map(|p| {
                let mut order: Vec<usize> = (0..n).collect();
                order.shuffle(&mut ChaCha8Rng::seed_from_u64(crate::seeds::ppo_data_pass(seed, p / n)));
                order[p % n]
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_each_pass_once_and_depend_only_on_seed_and_step() {
        let d = Dialogues { texts: (0..10).map(|i| i.to_string()).collect() };
        let mut seen: Vec<usize> = (0..5).flat_map(|s| d.batch(s, 2, 7)).collect();
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>(), "one pass visits every dialogue once");
        assert_eq!(d.batch(3, 4, 7), d.batch(3, 4, 7));
        assert_ne!(d.batch(0, 10, 7), d.batch(1, 10, 7), "each pass has its own order");
    }
}
