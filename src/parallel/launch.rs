//! Starting the workers of a data-parallel run: one thread per local GPU, each with its own CUDA
//! backend and its place in the NCCL group, on one machine or several. One worker alone runs on
//! the chosen device without NCCL.

use super::nccl::{Nccl, fetch_id, new_id, serve_id};
use super::{Collective, Solo};
use crate::backend::Backend;
use crate::backend::cuda::Cuda;
use crate::device::{Device, Job, run_on};
use anyhow::{Result, bail, ensure};
use std::time::Duration;

/// Where the workers are: `gpus` per machine on `nodes` machines; this process is machine
/// `node_rank`. Several machines meet at `rendezvous` (host:port of machine 0).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    pub gpus: usize,
    pub nodes: usize,
    pub node_rank: usize,
    pub rendezvous: Option<String>,
    /// Form an NCCL group even for one worker (to check a machine's NCCL on one GPU).
    pub nccl: bool,
}

impl Default for Topology {
    fn default() -> Self {
        Self { gpus: 1, nodes: 1, node_rank: 0, rendezvous: None, nccl: false }
    }
}

impl Topology {
    pub fn world(&self) -> usize {
        self.gpus * self.nodes
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(self.gpus >= 1 && self.nodes >= 1, "--gpus and --nodes must be at least 1");
        ensure!(self.node_rank < self.nodes, "--node-rank {} is not below --nodes {}", self.node_rank, self.nodes);
        if self.nodes > 1 && self.rendezvous.is_none() {
            bail!("several machines need --rendezvous HOST:PORT (machine 0's address, reachable from the others)");
        }
        Ok(())
    }
}

/// The work of every worker, given its backend and its group.
pub trait ParallelJob: Sync {
    type Output: Send;
    fn run<B: Backend>(&self, be: &B, group: &dyn Collective<B>) -> Result<Self::Output>;
}

struct Alone<'a, J>(&'a J);

impl<J: ParallelJob> Job for Alone<'_, J> {
    type Output = J::Output;

    fn run<B: Backend>(self, be: &B) -> Result<J::Output> {
        self.0.run(be, &Solo)
    }
}

/// Runs `job` on every local worker; returns worker 0's output on machine 0, None elsewhere. A
/// worker that fails ends the process (with its error), since the others would wait for it in
/// their next collective forever; checkpoints are written whole, so none is left half-done.
pub fn launch<J: ParallelJob>(device: Device, topo: &Topology, job: &J) -> Result<Option<J::Output>> {
    topo.validate()?;
    if topo.world() == 1 && !topo.nccl {
        return run_on(device, Alone(job)).map(Some);
    }
    match device {
        Device::Cpu => bail!("data-parallel training needs GPUs (--gpus {}); the CPU runs one worker", topo.gpus),
        Device::Cuda(k) if k > 0 => bail!(
            "--gpus uses GPUs 0 to {} of those visible; choose which with CUDA_VISIBLE_DEVICES, not --device cuda:{k}",
            topo.gpus - 1
        ),
        _ => {}
    }
    // Checked before any worker joins the group, which would otherwise wait in NCCL's setup for a
    // worker whose GPU does not exist.
    let visible = crate::backend::cuda::visible_gpus()?;
    ensure!(visible >= topo.gpus, "--gpus {} but this machine has {visible} visible GPU(s)", topo.gpus);
    let id = if topo.node_rank == 0 {
        let id = new_id()?;
        if let Some(addr) = topo.rendezvous.clone().filter(|_| topo.nodes > 1) {
            let others = topo.nodes - 1;
            std::thread::spawn(move || {
                if let Err(e) = serve_id(&addr, &id, others) {
                    eprintln!("error: {e:#}");
                    std::process::exit(1);
                }
            });
        }
        id
    } else {
        let addr = topo.rendezvous.as_deref().expect("validated");
        fetch_id(addr, Duration::from_secs(300))?
    };
    let world = topo.world();
    let outputs = std::thread::scope(|s| {
        let workers: Vec<_> = (0..topo.gpus)
            .map(|local| {
                let rank = topo.node_rank * topo.gpus + local;
                s.spawn(move || {
                    let result = Cuda::new(local)
                        .and_then(|be| Ok((Nccl::join(&be, rank, world, id)?, be)))
                        .and_then(|(group, be)| job.run(&be, &group));
                    match result {
                        Ok(out) => out,
                        Err(e) => {
                            eprintln!("error: worker {rank} (cuda:{local}): {e:#}");
                            std::process::exit(1);
                        }
                    }
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("a worker thread panicked")).collect::<Vec<_>>()
    });
    Ok(if topo.node_rank == 0 { outputs.into_iter().next() } else { None })
}
