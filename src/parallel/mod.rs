//! Data parallelism: a group of workers, one per device, each holding the whole model. Each worker
//! takes its share of a batch, and the group sums gradients and gathers small host-side results
//! (responses, scores, log-probabilities). Three groups implement it: `Solo` (one worker), `Threads`
//! (workers in one process, exchanging through host memory; the CPU tests' group, and a fallback),
//! and `nccl::Nccl` (one GPU per worker, NCCL collectives, one or many machines).

pub mod launch;
pub mod nccl;

use crate::backend::{Backend, Shaped};
use anyhow::{Result, anyhow, ensure};
use std::ops::Range;
use std::sync::{Arc, Barrier, Mutex};

pub trait Collective<B: Backend>: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Sums each of `ts` over the group, in place, every worker getting the sums. One call takes
    /// all of a step's gradients, so that a group can move them together.
    fn all_reduce_sum(&self, be: &B, ts: &mut [&mut B::Tensor]) -> Result<()>;
    /// Every worker's `local` values (of any length), in rank order, on every worker.
    fn all_gather(&self, be: &B, local: &[f32]) -> Result<Vec<Vec<f32>>>;
}

/// The rows of `0..n` worker `rank` of `world` takes: contiguous, sizes differing by at most one,
/// so that concatenating every worker's results in rank order restores the batch's order.
pub fn shard(n: usize, rank: usize, world: usize) -> Range<usize> {
    n * rank / world..n * (rank + 1) / world
}

/// The dropout seed of worker `rank`. Dropout masks follow a tensor's element positions, and
/// workers' shares start at position 0 alike, so one seed would repeat a mask on every worker.
/// Each draws its own instead, as DDP's ranks do, so runs with dropout agree with one worker in
/// distribution, not value by value. Rank 0 keeps the seed, so a single worker is unchanged.
pub fn worker_seed(seed: u64, rank: usize) -> u64 {
    crate::seeds::worker(seed, rank)
}

/// Gathers each worker's values and concatenates them in rank order.
pub fn gather_concat<B: Backend>(c: &dyn Collective<B>, be: &B, local: &[f32]) -> Result<Vec<f32>> {
    Ok(c.all_gather(be, local)?.concat())
}

/// Gathers variable-length token lists (ids below 2²⁴ travel exactly as f32), in rank order.
pub fn gather_tokens<B: Backend>(c: &dyn Collective<B>, be: &B, local: &[Vec<u32>]) -> Result<Vec<Vec<u32>>> {
    let mut flat = vec![local.len() as f32];
    for seq in local {
        ensure!(seq.iter().all(|&t| t < 1 << 24), "a token id of 2^24 or more cannot be gathered");
        flat.push(seq.len() as f32);
        flat.extend(seq.iter().map(|&t| t as f32));
    }
    let mut out = Vec::new();
    for part in c.all_gather(be, &flat)? {
        let mut it = part.into_iter();
        let n = it.next().ok_or_else(|| anyhow!("an empty gathered part"))? as usize;
        for _ in 0..n {
            let len = it.next().ok_or_else(|| anyhow!("a truncated gathered part"))? as usize;
            out.push(it.by_ref().take(len).map(|t| t as u32).collect());
        }
    }
    Ok(out)
}

/// Sums a few host values over the group.
pub fn sum_host<B: Backend>(c: &dyn Collective<B>, be: &B, local: &[f32]) -> Result<Vec<f32>> {
    let parts = c.all_gather(be, local)?;
    Ok((0..local.len()).map(|i| parts.iter().map(|p| p[i]).sum()).collect())
}

/// One worker alone: every collective is the identity.
pub struct Solo;

impl<B: Backend> Collective<B> for Solo {
    fn rank(&self) -> usize {
        0
    }

    fn world(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, _be: &B, _ts: &mut [&mut B::Tensor]) -> Result<()> {
        Ok(())
    }

    fn all_gather(&self, _be: &B, local: &[f32]) -> Result<Vec<Vec<f32>>> {
        Ok(vec![local.to_vec()])
    }
}

/// What the workers of one `Threads` group share.
struct Shared {
    slots: Mutex<Vec<Vec<f32>>>,
    barrier: Barrier,
}

/// Workers in one process, one thread each, exchanging through host memory. Sums run in rank
/// order, so every worker gets the same bits.
pub struct Threads {
    rank: usize,
    world: usize,
    shared: Arc<Shared>,
}

impl Threads {
    /// The `world` members of a new group, rank 0 first.
    pub fn group(world: usize) -> Vec<Threads> {
        let shared = Arc::new(Shared { slots: Mutex::new(vec![Vec::new(); world]), barrier: Barrier::new(world) });
        (0..world).map(|rank| Threads { rank, world, shared: shared.clone() }).collect()
    }

    fn exchange(&self, local: Vec<f32>) -> Vec<Vec<f32>> {
        self.shared.slots.lock().expect("group lock")[self.rank] = local;
        self.shared.barrier.wait();
        let all = self.shared.slots.lock().expect("group lock").clone();
        // Nobody may deposit the next exchange's values before everyone has read these.
        self.shared.barrier.wait();
        all
    }
}

impl<B: Backend> Collective<B> for Threads {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    /// One exchange of every tensor, end to end.
    fn all_reduce_sum(&self, be: &B, ts: &mut [&mut B::Tensor]) -> Result<()> {
        let mut flat = Vec::new();
        for t in ts.iter() {
            flat.extend(be.download(t)?);
        }
        let parts = self.exchange(flat);
        let mut sum = vec![0.0f32; parts[0].len()];
        for p in &parts {
            ensure!(p.len() == sum.len(), "workers reduce tensors of different sizes");
            sum.iter_mut().zip(p).for_each(|(s, v)| *s += v);
        }
        let mut rest = sum.as_slice();
        for t in ts.iter_mut() {
            let (mine, next) = rest.split_at(t.numel());
            let shape = t.shape().to_vec();
            **t = be.upload(mine, &shape)?;
            rest = next;
        }
        Ok(())
    }

    fn all_gather(&self, _be: &B, local: &[f32]) -> Result<Vec<Vec<f32>>> {
        Ok(self.exchange(local.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;
    use crate::backend::prelude::*;

    #[test]
    fn shards_cover_the_batch_in_order() {
        for (n, world) in [(16, 4), (10, 3), (3, 3), (7, 2)] {
            let rows: Vec<usize> = (0..world).flat_map(|r| shard(n, r, world)).collect();
            assert_eq!(rows, (0..n).collect::<Vec<_>>());
            let sizes: Vec<usize> = (0..world).map(|r| shard(n, r, world).len()).collect();
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1, "{sizes:?}");
        }
    }

    #[test]
    fn thread_groups_sum_and_gather_in_rank_order() {
        let group = Threads::group(3);
        let out: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = group
                .iter()
                .map(|g| {
                    s.spawn(move || {
                        let c: &dyn Collective<Cpu> = g;
                        let r = c.rank() as f32;
                        let mut t = Cpu.upload(&[r, 10.0 * r], &[2]).unwrap();
                        let mut u = Cpu.upload(&[-r], &[1]).unwrap();
                        c.all_reduce_sum(&Cpu, &mut [&mut t, &mut u]).unwrap();
                        assert_eq!(u.data, vec![-3.0]);
                        let seqs: Vec<Vec<u32>> = (0..c.rank()).map(|i| vec![i as u32; c.rank()]).collect();
                        (t.data, gather_tokens(c, &Cpu, &seqs).unwrap(), sum_host(c, &Cpu, &[1.0, r]).unwrap())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (sum, tokens, host) in &out {
            assert_eq!(sum, &vec![3.0, 30.0]);
            assert_eq!(tokens, &vec![vec![0], vec![0, 0], vec![1, 1]]);
            assert_eq!(host, &vec![3.0, 3.0]);
        }
    }
}
