//! `--device cpu|cuda[:N]`, running a generic job on the backend it names, and the GPU's memory and
//! utilisation for training logs.

use anyhow::{Result, bail};
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
    /// The first GPU when one is usable, otherwise the CPU.
    Auto,
}

impl FromStr for Device {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "auto" => Ok(Device::Auto),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => match n.parse() {
                    Ok(i) => Ok(Device::Cuda(i)),
                    Err(_) => bail!("device '{s}': expected cuda:N with N a GPU index"),
                },
                None => bail!("unknown device '{s}' (expected auto, cpu, cuda or cuda:N)"),
            },
        }
    }
}

/// A job generic over the backend, run on whichever one a `Device` names.
pub trait Job {
    type Output;
    fn run<B: crate::backend::Backend>(self, be: &B) -> Result<Self::Output>;
}

pub fn run_on<J: Job>(device: Device, job: J) -> Result<J::Output> {
    match device {
        Device::Cpu => job.run(&crate::backend::cpu::Cpu),
        Device::Cuda(n) => job.run(&crate::backend::cuda::Cuda::new(n)?),
        Device::Auto => match crate::backend::cuda::Cuda::new(0) {
            Ok(gpu) => job.run(&gpu),
            Err(e) => {
                eprintln!("device auto: running on the CPU ({e:#})");
                job.run(&crate::backend::cpu::Cpu)
            }
        },
    }
}

/// GPU memory and utilisation through NVML, when the driver offers it.
pub struct GpuStats {
    nvml: nvml_wrapper::Nvml,
    index: u32,
}

impl GpuStats {
    /// For the GPU of CUDA ordinal `ordinal`, where NVML is there.
    pub fn open(ordinal: usize) -> Option<Self> {
        let index = u32::try_from(ordinal).ok()?;
        nvml_wrapper::Nvml::init().ok().map(|nvml| Self { nvml, index })
    }

    pub fn read(&self) -> (Option<u64>, Option<u32>) {
        let Ok(d) = self.nvml.device_by_index(self.index) else { return (None, None) };
        (d.memory_info().ok().map(|m| m.used), d.utilization_rates().ok().map(|u| u.gpu))
    }
}
