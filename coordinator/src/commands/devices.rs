//! `lightrnn devices`: the CUDA devices and libraries this build can use, with their
//! versions and the kernels compiled ahead of time it would load (JSON), or why there
//! are none.

use lightrnn_kernels::cuda::device::{cuda_devices, cuda_libraries, library_versions};

use crate::Result;

pub fn run() -> Result<String> {
    let libs: serde_json::Map<String, serde_json::Value> = cuda_libraries()
        .into_iter()
        .map(|(n, ok)| (n.to_string(), ok.into()))
        .collect();
    let versions: serde_json::Map<String, serde_json::Value> = library_versions()
        .into_iter()
        .map(|(n, v)| (n.to_string(), v.into()))
        .collect();
    let (devices, reason) = match cuda_devices() {
        Ok(d) => (serde_json::to_value(d)?, serde_json::Value::Null),
        Err(e) => (serde_json::json!([]), e.to_string().into()),
    };
    Ok(serde_json::json!({
        "cuda_build": cfg!(feature = "cuda"), "cuda_libraries": libs,
        "library_versions": versions, "compiled_kernels": compiled_kernels(),
        "emulator": lightrnn_kernels::cuda::emulator_requested(),
        "cuda_devices": devices, "reason": reason,
    })
    .to_string())
}

/// The kernels compiled ahead of time this binary would find (directory, architecture,
/// NVRTC version), or null.
fn compiled_kernels() -> serde_json::Value {
    #[cfg(feature = "cuda")]
    {
        use lightrnn_kernels::cuda::nvrtc;
        let Some(dir) = nvrtc::kernel_dir() else {
            return serde_json::Value::Null;
        };
        let manifest = std::fs::read(dir.join("manifest.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<nvrtc::Manifest>(&b).ok());
        match manifest {
            Some(m) => serde_json::json!({
                "dir": dir.display().to_string(), "arch": m.arch,
                "nvrtc": format!("{}.{}", m.nvrtc.0, m.nvrtc.1), "sources": m.sources.len(),
            }),
            None => {
                serde_json::json!({"dir": dir.display().to_string(), "error": "unreadable manifest"})
            }
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        serde_json::Value::Null
    }
}
