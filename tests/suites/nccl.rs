//! The NCCL group on the GPUs of this machine (one is enough): sums and gathers against the values
//! the workers put in.

use detox::backend::cuda::Cuda;
use detox::backend::prelude::*;
use detox::parallel::nccl::{Nccl, new_id};
use detox::parallel::{Collective, gather_tokens, sum_host};

pub fn nccl_group_sums_and_gathers(be: &Cuda) {
    let group = Nccl::join(be, 0, 1, new_id().unwrap()).unwrap();
    let c: &dyn Collective<Cuda> = &group;
    assert_eq!((c.rank(), c.world()), (0, 1));
    let values: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
    let mut t = be.upload(&values, &[10, 100]).unwrap();
    let mut u = be.upload(&[3.0], &[1]).unwrap();
    c.all_reduce_sum(be, &mut [&mut t, &mut u]).unwrap();
    assert_eq!(be.download(&t).unwrap(), values, "a group of one sums to its own values");
    assert_eq!(be.download(&u).unwrap(), vec![3.0]);
    assert_eq!(sum_host(c, be, &[1.5, -2.0]).unwrap(), vec![1.5, -2.0]);
    let seqs = vec![vec![5, 6, 7], vec![], vec![32_000]];
    assert_eq!(gather_tokens(c, be, &seqs).unwrap(), seqs);
    assert_eq!(c.all_gather(be, &[]).unwrap(), vec![Vec::<f32>::new()]);
}

/// Why the NCCL group cannot be made here.
fn nccl_missing() -> Option<String> {
    detox::parallel::nccl::available().err().map(|e| format!("NCCL: {e:#}"))
}

crate::common::suite!("nccl": cuda nccl_group_sums_and_gathers skip nccl_missing);
