//! Which CUDA devices and libraries this machine has, as this build can see them. With the `cuda`
//! feature the CUDA driver library is looked for at run time (never linked), so the
//! same binary runs, and says why, on machines without a GPU or driver; every check
//! happens before any driver call (cudarc's own calls panic when the library is absent).

use serde::Serialize;

use crate::{Error, Result};

/// One CUDA device.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CudaDevice {
    pub ordinal: usize,
    pub name: String,
    /// (major, minor).
    pub compute_capability: (i32, i32),
    pub total_memory_bytes: usize,
    pub free_memory_bytes: usize,
    /// The driver's CUDA version, e.g. 13000 for 13.0.
    pub driver_version: i32,
}

/// The CUDA devices, or why there are none to use (built without CUDA, no driver
/// library, no device).
pub fn cuda_devices() -> Result<Vec<CudaDevice>> {
    imp::cuda_devices()
}

/// How many CUDA devices there are and the driver's CUDA version (e.g. 13000), without
/// creating any device's context (what opening one device needs to know).
pub fn count_and_driver() -> Result<(usize, i32)> {
    imp::count_and_driver()
}

/// The CUDA libraries this build loads and whether each is present (name, found).
pub fn cuda_libraries() -> Vec<(&'static str, bool)> {
    imp::libraries()
}

/// The version of each CUDA library found, as "major.minor[.patch]" (name, version).
pub fn library_versions() -> Vec<(&'static str, String)> {
    imp::versions()
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::*;

    pub fn cuda_devices() -> Result<Vec<CudaDevice>> {
        Err(Error::Backend(
            "this lightrnn was built without CUDA (build with `--features cuda`)".into(),
        ))
    }

    pub fn libraries() -> Vec<(&'static str, bool)> {
        Vec::new()
    }

    pub fn versions() -> Vec<(&'static str, String)> {
        Vec::new()
    }

    pub fn count_and_driver() -> Result<(usize, i32)> {
        cuda_devices().map(|_| (0, 0))
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use super::*;
    use cudarc::driver::CudaContext;

    fn driver_err(what: &str, e: cudarc::driver::DriverError) -> Error {
        Error::Backend(format!("CUDA driver: {what}: {e}"))
    }

    pub fn libraries() -> Vec<(&'static str, bool)> {
        // SAFETY: each only tries to dlopen the library by its usual names.
        unsafe {
            vec![
                ("libcuda", cudarc::driver::sys::is_culib_present()),
                ("libnvrtc", cudarc::nvrtc::sys::is_culib_present()),
                ("libcublas", cudarc::cublas::sys::is_culib_present()),
                ("libnccl", cudarc::nccl::sys::is_culib_present()),
            ]
        }
    }

    pub fn versions() -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Ok((major, minor)) = crate::cuda::nvrtc::version() {
            out.push(("libnvrtc", format!("{major}.{minor}")));
        }
        // SAFETY: dlopen probe, then out-parameters of a library that is present.
        if unsafe { cudarc::cublas::sys::is_culib_present() } {
            use cudarc::cublas::sys::{cublasGetProperty, libraryPropertyType};
            let mut v = [0i32; 3];
            let props = [
                libraryPropertyType::MAJOR_VERSION,
                libraryPropertyType::MINOR_VERSION,
                libraryPropertyType::PATCH_LEVEL,
            ];
            let ok = props
                .into_iter()
                .zip(v.iter_mut())
                // SAFETY: as above.
                .all(|(p, x)| unsafe { cublasGetProperty(p, x) }.result().is_ok());
            if ok {
                out.push(("libcublas", format!("{}.{}.{}", v[0], v[1], v[2])));
            }
        }
        if let Ok((major, minor, patch)) = crate::cuda::comm::nccl::version() {
            out.push(("libnccl", format!("{major}.{minor}.{patch}")));
        }
        out
    }

    pub fn count_and_driver() -> Result<(usize, i32)> {
        // SAFETY: dlopen probe only; no driver function is called when it fails.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::Backend(
                "no CUDA driver library (libcuda.so) on this machine: no NVIDIA driver, or it is not on the library path".into(),
            ));
        }
        let n = CudaContext::device_count().map_err(|e| driver_err("counting devices", e))?;
        let mut version = 0i32;
        // SAFETY: the library is present (checked above); the out-pointer is valid.
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) }
            .result()
            .map_err(|e| driver_err("driver version", e))?;
        Ok((n.max(0) as usize, version))
    }

    pub fn cuda_devices() -> Result<Vec<CudaDevice>> {
        let (n, version) = count_and_driver()?;
        (0..n)
            .map(|i| {
                let ctx = CudaContext::new(i).map_err(|e| driver_err("opening a device", e))?;
                let (free, total) = ctx
                    .mem_get_info()
                    .map_err(|e| driver_err("memory information", e))?;
                Ok(CudaDevice {
                    ordinal: i,
                    name: ctx.name().map_err(|e| driver_err("device name", e))?,
                    compute_capability: ctx
                        .compute_capability()
                        .map_err(|e| driver_err("compute capability", e))?,
                    total_memory_bytes: total,
                    free_memory_bytes: free,
                    driver_version: version,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs everywhere: a machine without CUDA gets an error that says why, never a panic.
    #[test]
    fn devices_or_a_reason() {
        match cuda_devices() {
            Ok(devs) => {
                for d in &devs {
                    assert!(!d.name.is_empty() && d.total_memory_bytes > 0);
                }
                println!("CUDA devices: {devs:?}");
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains("CUDA"), "{msg}");
                println!("no CUDA: {msg}");
            }
        }
    }
}
