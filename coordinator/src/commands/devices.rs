//! `lightrnn devices`: the CUDA devices and libraries this build can use (JSON), or why
//! there are none.

use lightrnn_kernels::cuda::device::{cuda_devices, cuda_libraries};

use crate::Result;

pub fn run() -> Result<String> {
    let libs: serde_json::Map<String, serde_json::Value> = cuda_libraries()
        .into_iter()
        .map(|(n, ok)| (n.to_string(), ok.into()))
        .collect();
    let (devices, reason) = match cuda_devices() {
        Ok(d) => (serde_json::to_value(d)?, serde_json::Value::Null),
        Err(e) => (serde_json::json!([]), e.to_string().into()),
    };
    Ok(serde_json::json!({
        "cuda_build": cfg!(feature = "cuda"), "cuda_libraries": libs,
        "cuda_devices": devices, "reason": reason,
    })
    .to_string())
}
