//! Device selection: which backend a [`BackendKind`] names, whether this build and
//! machine can run it, and opening it for a model.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, ModelConfig};
use crate::cuda::Precision;
use crate::{Error, Result};

/// Which device to run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The best available backend: CUDA device 0 where this build and machine can run it
    /// (a GPU, its driver and NVRTC), else the CPU.
    Auto,
    Cpu,
    /// CUDA device `ordinal` (`cuda` = `cuda:0`).
    Cuda {
        ordinal: usize,
    },
}

impl FromStr for BackendKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda { ordinal: 0 }),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(ordinal)) => Ok(Self::Cuda { ordinal }),
                _ => Err(Error::Config(format!(
                    "unknown backend {other:?} (expected auto, cpu, cuda or cuda:N)"
                ))),
            },
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda { ordinal } => write!(f, "cuda:{ordinal}"),
        }
    }
}

/// Where a model runs: the device and the host resources of the CPU backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendOptions {
    pub kind: BackendKind,
    /// CPU backend threads (0 = one per core).
    pub threads: usize,
    /// The CUDA backend's GEMM arithmetic (TF32 unless asked otherwise).
    pub precision: Precision,
    /// The CUDA backend captures training steps as CUDA graphs (unless turned off).
    pub cuda_graphs: bool,
}

impl BackendOptions {
    pub fn new(kind: BackendKind, threads: usize) -> Self {
        Self {
            kind,
            threads,
            precision: Precision::default(),
            cuda_graphs: true,
        }
    }

    pub fn with_precision(self, precision: Precision) -> Self {
        Self { precision, ..self }
    }

    pub fn with_graphs(self, cuda_graphs: bool) -> Self {
        Self {
            cuda_graphs,
            ..self
        }
    }
}

/// What `auto` resolves to on this machine.
pub fn resolve(kind: BackendKind) -> BackendKind {
    match kind {
        BackendKind::Auto if crate::cuda::gpu_present() => BackendKind::Cuda { ordinal: 0 },
        BackendKind::Auto => BackendKind::Cpu,
        other => other,
    }
}

/// Whether this build and machine can run `kind`, asked before any data is read: the
/// error says why not.
pub fn check_backend(kind: BackendKind) -> Result<()> {
    match resolve(kind) {
        BackendKind::Auto | BackendKind::Cpu => Ok(()),
        BackendKind::Cuda { ordinal } => crate::cuda::CudaBackend::check(ordinal),
    }
}

/// Build the backend `opts` names for `cfg`.
pub fn open_backend(opts: &BackendOptions, cfg: &ModelConfig) -> Result<Box<dyn Backend>> {
    match resolve(opts.kind) {
        BackendKind::Auto | BackendKind::Cpu => {
            Ok(Box::new(crate::cpu::CpuBackend::new(cfg, opts.threads)?))
        }
        BackendKind::Cuda { ordinal } => {
            let mut be = crate::cuda::CudaBackend::with_precision(cfg, ordinal, opts.precision)?;
            be.set_graphs(opts.cuda_graphs);
            Ok(Box::new(be))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_cuda_only_where_cuda_can_run() {
        let want = if crate::cuda::gpu_present() {
            BackendKind::Cuda { ordinal: 0 }
        } else {
            BackendKind::Cpu
        };
        assert_eq!(resolve(BackendKind::Auto), want);
        assert_eq!(resolve(BackendKind::Cpu), BackendKind::Cpu);
        assert!(check_backend(BackendKind::Auto).is_ok());
        if !crate::cuda::gpu_present() {
            let msg = check_backend(BackendKind::Cuda { ordinal: 0 })
                .unwrap_err()
                .to_string();
            assert!(msg.contains("CUDA"), "{msg}");
        }
        assert_eq!(
            "cuda:3".parse::<BackendKind>().unwrap(),
            BackendKind::Cuda { ordinal: 3 }
        );
        assert!(
            "bf16"
                .parse::<Precision>()
                .unwrap_err()
                .to_string()
                .contains("not supported")
        );
    }
}
