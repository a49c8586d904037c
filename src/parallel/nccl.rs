//! The NCCL group: one GPU per worker, collectives on the workers' CUDA streams. Workers find each
//! other through an NCCL unique id that rank 0 makes; on one machine it is shared in memory, across
//! machines it travels over TCP (`serve_id` on the first machine, `fetch_id` on the others).

use super::Collective;
use crate::backend::Shaped;
use crate::backend::cuda::{Buf, Cuda, CudaTensor};
use anyhow::{Context, Result, anyhow, bail, ensure};
use cudarc::nccl::{Comm, Id, ReduceOp, group_end, group_start};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Bytes of an NCCL unique id.
const ID_BYTES: usize = 128;

/// Whether libnccl can be loaded, with the reason when not.
pub fn available() -> Result<()> {
    // SAFETY: only probes whether the shared library can be loaded.
    if unsafe { cudarc::nccl::sys::is_culib_present() } {
        Ok(())
    } else {
        bail!(
            "libnccl could not be loaded: install NCCL 2.x (e.g. the nvidia-nccl-cu13 wheel) and add its lib/ \
             directory to LD_LIBRARY_PATH, or train on one GPU"
        )
    }
}

/// A fresh unique id, made by the group's rank 0.
pub fn new_id() -> Result<Id> {
    available()?;
    Id::new().map_err(|e| anyhow!("ncclGetUniqueId: {e:?}"))
}

fn id_bytes(id: &Id) -> Vec<u8> {
    id.internal().iter().map(|&c| c as u8).collect()
}

fn id_from(bytes: &[u8]) -> Id {
    let mut raw = [0 as std::ffi::c_char; ID_BYTES];
    for (r, b) in raw.iter_mut().zip(bytes) {
        *r = *b as std::ffi::c_char;
    }
    Id::uninit(raw)
}

/// On the first machine: answers `others` connections at `addr` (host:port) with the id.
pub fn serve_id(addr: &str, id: &Id, others: usize) -> Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("listening for the other machines on {addr}"))?;
    for _ in 0..others {
        let (mut s, peer) = listener.accept().with_context(|| format!("accepting a machine on {addr}"))?;
        s.write_all(&id_bytes(id)).with_context(|| format!("sending the NCCL id to {peer}"))?;
    }
    Ok(())
}

/// On the other machines: the id from the first machine at `addr`, retrying while it starts.
pub fn fetch_id(addr: &str, wait: Duration) -> Result<Id> {
    let started = Instant::now();
    loop {
        match TcpStream::connect(addr) {
            Ok(mut s) => {
                let mut buf = [0u8; ID_BYTES];
                s.read_exact(&mut buf).with_context(|| format!("reading the NCCL id from {addr}"))?;
                return Ok(id_from(&buf));
            }
            Err(_) if started.elapsed() < wait => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => bail!("no first machine answered at {addr} within {} s: {e}", wait.as_secs()),
        }
    }
}

pub struct Nccl {
    comm: Comm,
}

// SAFETY: a worker uses its communicator from its own thread only; the group is shared across
// threads solely as `&dyn Collective`, whose calls that thread makes.
unsafe impl Sync for Nccl {}
// SAFETY: as above; the communicator moves once, into its worker's thread.
unsafe impl Send for Nccl {}

impl Nccl {
    /// Joins the group as `rank` of `world` on `be`'s GPU and stream.
    pub fn join(be: &Cuda, rank: usize, world: usize, id: Id) -> Result<Self> {
        available()?;
        let comm = Comm::from_rank(be.gpu.stream.clone(), rank, world, id)
            .map_err(|e| anyhow!("joining the NCCL group as rank {rank} of {world}: {e:?}"))?;
        Ok(Self { comm })
    }
}

fn f32_slice<'a>(t: &'a mut CudaTensor, what: &str) -> Result<&'a mut cudarc::driver::CudaSlice<f32>> {
    match &mut t.buf {
        Buf::F32(s) => Ok(s),
        Buf::F16(_) => bail!("{what}: only f32 tensors are reduced"),
    }
}

impl Collective<Cuda> for Nccl {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world(&self) -> usize {
        self.comm.world_size()
    }

    /// One NCCL group of calls: NCCL launches them together rather than one kernel per tensor.
    fn all_reduce_sum(&self, _be: &Cuda, ts: &mut [&mut CudaTensor]) -> Result<()> {
        group_start().map_err(|e| anyhow!("ncclGroupStart: {e:?}"))?;
        let queued = ts.iter_mut().filter(|t| t.numel() > 0).try_for_each(|t| -> Result<()> {
            let s = f32_slice(t, "all_reduce_sum")?;
            self.comm.all_reduce_in_place(s, &ReduceOp::Sum).map_err(|e| anyhow!("ncclAllReduce: {e:?}"))?;
            Ok(())
        });
        // The group is closed even when queueing failed, or NCCL would hold every later call.
        let ended = group_end().map_err(|e| anyhow!("ncclGroupEnd: {e:?}"));
        queued.and(ended.map(drop))
    }

    /// Two rounds: every worker's length, then the values padded to the longest.
    fn all_gather(&self, be: &Cuda, local: &[f32]) -> Result<Vec<Vec<f32>>> {
        let world = self.world();
        let gather = |values: &[f32]| -> Result<Vec<f32>> {
            let send = be.gpu.upload(values)?;
            let mut recv = be.gpu.alloc_zeros::<f32>(values.len() * world)?;
            self.comm.all_gather(&send, &mut recv).map_err(|e| anyhow!("ncclAllGather: {e:?}"))?;
            be.gpu.download(&recv, values.len() * world)
        };
        let lengths = gather(&[local.len() as f32])?;
        let longest = lengths.iter().fold(0.0f32, |m, &l| m.max(l)) as usize;
        let mut padded = local.to_vec();
        padded.resize(longest.max(1), 0.0);
        let all = gather(&padded)?;
        let width = longest.max(1);
        ensure!(all.len() == width * world, "gathered {} values for {world} workers of {width}", all.len());
        Ok(all.chunks(width).zip(&lengths).map(|(c, &l)| c[..l as usize].to_vec()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An address where nothing listens (a port the system just handed out and took back).
    fn free_addr() -> String {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string()
    }

    /// The several-machine start, without GPUs: the first machine serves the id, and two others
    /// that ask before it listens still get every byte of it.
    #[test]
    fn the_id_reaches_every_other_machine() {
        let addr = free_addr();
        let bytes: Vec<u8> = (0..ID_BYTES).map(|i| (i * 37 % 251) as u8).collect();
        let id = id_from(&bytes);
        let fetchers: Vec<_> = (0..2)
            .map(|_| {
                let addr = addr.clone();
                std::thread::spawn(move || fetch_id(&addr, Duration::from_secs(20)))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        serve_id(&addr, &id, 2).unwrap();
        for f in fetchers {
            assert_eq!(id_bytes(&f.join().unwrap().unwrap()), bytes);
        }
    }

    #[test]
    fn a_first_machine_that_never_answers_is_named() {
        let addr = free_addr();
        let e = fetch_id(&addr, Duration::from_millis(400)).unwrap_err();
        assert!(format!("{e:#}").contains(&addr) && format!("{e:#}").contains("within"), "{e:#}");
    }
}
