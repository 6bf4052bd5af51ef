//! `lightrnn kernels --arch sm_90 --out DIR`: compile every CUDA kernel ahead of time with
//! NVRTC (no GPU needed) into DIR, one CUBIN per source and a manifest. A process on a GPU
//! of that architecture loads them from `LIGHTRNN_KERNEL_DIR` (or `kernels/` beside its
//! binary) instead of compiling at start-up; `scripts/build-gpu-bundle.sh` ships them.

use clap::Args;

use crate::Result;

#[derive(Args, Debug, Clone)]
pub struct KernelsArgs {
    /// The GPU architecture, e.g. sm_90 (H100, H200).
    #[arg(long, default_value = "sm_90")]
    pub arch: String,
    /// The directory to write (created if missing).
    #[arg(long)]
    pub out: std::path::PathBuf,
}

pub fn run(a: &KernelsArgs) -> Result<String> {
    #[cfg(feature = "cuda")]
    {
        let m = lightrnn_kernels::cuda::nvrtc::write_ahead(&a.out, &a.arch)?;
        Ok(serde_json::json!({
            "dir": a.out.display().to_string(), "arch": m.arch,
            "nvrtc": format!("{}.{}", m.nvrtc.0, m.nvrtc.1),
            "sources": m.sources.iter().map(|s| serde_json::json!({
                "name": s.name, "file": s.file, "hash": s.hash,
                "registers": s.registers.iter().map(|(k, r)| serde_json::json!([k, r])).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
        .to_string())
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = a;
        Err(lightrnn_kernels::Error::Backend(
            "this lightrnn was built without CUDA (build with `--features cuda`)".into(),
        )
        .into())
    }
}
