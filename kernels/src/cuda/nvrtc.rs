//! NVRTC: the CUDA sources compiled at run time for the device at hand (PTX for
//! `compute_XY`), or to an `sm_XY` CUBIN with ptxas's resource report (registers, spills,
//! shared memory per kernel) for the CI check of every kernel. NVRTC needs no GPU; its
//! library is looked for at run time (PyPI `nvidia-cuda-nvrtc`, CUDA 13.0 line).
//!
//! Kernels compiled ahead of time ([`write_ahead`], `lightrnn kernels --out DIR`): one
//! CUBIN per source and a `manifest.json` naming the architecture, the NVRTC version and
//! a hash of each source's text. A process on a GPU loads them ([`ahead_of_time`]) from
//! `LIGHTRNN_KERNEL_DIR`, or `kernels/` beside its binary, when the device's architecture
//! is the manifest's, the driver is at least the NVRTC's CUDA version and the source it
//! embeds is the one compiled; any other source is compiled by NVRTC as before.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::layer::{CudaSource, SOURCES};
use crate::{Error, Result};

/// What one kernel uses, from ptxas's verbose log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub kernel: String,
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub shared_bytes: u32,
    pub stack_bytes: u32,
}

/// A compiled source: the PTX text or CUBIN bytes, and the compiler's log.
pub struct Compiled {
    pub image: Vec<u8>,
    pub log: String,
}

/// Whether the NVRTC library can be loaded on this machine.
pub fn available() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// NVRTC's version, (major, minor).
pub fn version() -> Result<(i32, i32)> {
    if !available() {
        return Err(Error::Backend("no NVRTC library (libnvrtc.so)".into()));
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: out-parameters; the library is present.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| Error::Cuda(format!("NVRTC version: {e:?}")))?;
    Ok((major, minor))
}

/// A 64-bit FNV-1a hash of a source's text: which text a CUBIN was compiled from.
pub fn source_hash(text: &str) -> String {
    let h = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{h:016x}")
}

/// The manifest of a directory of kernels compiled ahead of time.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// e.g. `sm_90`.
    pub arch: String,
    /// The NVRTC that compiled them, (major, minor).
    pub nvrtc: (i32, i32),
    pub sources: Vec<AheadSource>,
}

/// One compiled source of a [`Manifest`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AheadSource {
    pub name: String,
    /// [`source_hash`] of the text compiled.
    pub hash: String,
    /// The CUBIN, relative to the manifest.
    pub file: String,
    /// What ptxas reported per kernel.
    pub registers: Vec<(String, u32)>,
}

/// Compile every source for `arch` (an `sm_XY`) into `dir`: the CUBINs and `manifest.json`.
pub fn write_ahead(dir: &Path, arch: &str) -> Result<Manifest> {
    if !arch.starts_with("sm_") {
        return Err(Error::Config(format!(
            "kernels are compiled ahead for a GPU architecture such as sm_90, not {arch:?}"
        )));
    }
    let io = |what: &str, e: std::io::Error| Error::Backend(format!("{what}: {e}"));
    std::fs::create_dir_all(dir).map_err(|e| io(&format!("creating {}", dir.display()), e))?;
    let mut sources = Vec::new();
    for (src, image, log) in images(arch, |_| None)? {
        let file = format!("{}.{arch}.cubin", src.name);
        std::fs::write(dir.join(&file), &image).map_err(|e| io(&format!("writing {file}"), e))?;
        sources.push(AheadSource {
            name: src.name.to_string(),
            hash: source_hash(src.text),
            file,
            registers: usage(&log.unwrap_or_default())
                .into_iter()
                .map(|u| (u.kernel, u.registers))
                .collect(),
        });
    }
    let manifest = Manifest {
        arch: arch.to_string(),
        nvrtc: version()?,
        sources,
    };
    let text = serde_json::to_string_pretty(&manifest)
        .map_err(|e| Error::Backend(format!("manifest: {e}")))?;
    std::fs::write(dir.join("manifest.json"), text).map_err(|e| io("writing manifest.json", e))?;
    Ok(manifest)
}

/// Every source's image for `arch` (an `sm_XY` CUBIN), the sources in parallel: what
/// `ready` has for it (compiled ahead of time: no log), else compiled by NVRTC now (with
/// ptxas's log).
#[allow(clippy::type_complexity)]
pub fn images(
    arch: &str,
    ready: impl Fn(&CudaSource) -> Option<Vec<u8>> + Sync,
) -> Result<Vec<(&'static CudaSource, Vec<u8>, Option<String>)>> {
    std::thread::scope(|s| {
        let ready = &ready;
        let jobs: Vec<_> = SOURCES
            .iter()
            .map(|src| {
                s.spawn(move || match ready(src) {
                    Some(image) => Ok((src, image, None)),
                    None => compile(src, arch).map(|c| (src, c.image, Some(c.log))),
                })
            })
            .collect();
        jobs.into_iter()
            .map(|j| {
                j.join()
                    .unwrap_or_else(|_| Err(Error::Cuda("NVRTC thread panicked".into())))
            })
            .collect()
    })
}

/// Where compiled kernels are looked for: `LIGHTRNN_KERNEL_DIR`, else `kernels/` beside
/// the running binary, when it holds a manifest.
pub fn kernel_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("LIGHTRNN_KERNEL_DIR") {
        Some(d) => PathBuf::from(d),
        None => std::env::current_exe().ok()?.parent()?.join("kernels"),
    };
    dir.join("manifest.json").is_file().then_some(dir)
}

/// Kernels compiled ahead of time that a device of `arch` under a driver of CUDA version
/// `driver` (e.g. 13000) can load.
pub struct Ahead {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Ahead {
    /// The CUBIN of `src`, when the manifest has it compiled from this very text.
    pub fn image(&self, src: &CudaSource) -> Option<Vec<u8>> {
        let entry = self
            .manifest
            .sources
            .iter()
            .find(|s| s.name == src.name && s.hash == source_hash(src.text))?;
        std::fs::read(self.dir.join(&entry.file)).ok()
    }
}

/// The compiled kernels of [`kernel_dir`] for `arch` and `driver`, or `None` (with the
/// reason logged) when there are none or they do not fit this device.
pub fn ahead_of_time(arch: &str, driver: i32) -> Option<Ahead> {
    ahead_of_time_in(kernel_dir()?, arch, driver)
}

/// [`ahead_of_time`] from the kernels in `dir`.
pub fn ahead_of_time_in(dir: PathBuf, arch: &str, driver: i32) -> Option<Ahead> {
    let manifest: Manifest = match std::fs::read(dir.join("manifest.json"))
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "compiled kernels unreadable: compiling with NVRTC");
            return None;
        }
    };
    let (major, minor) = manifest.nvrtc;
    let needs = major * 1000 + minor * 10;
    if manifest.arch != arch || driver < needs {
        tracing::info!(dir = %dir.display(), compiled_for = %manifest.arch, device = arch, nvrtc = needs, driver, "compiled kernels do not fit this device or driver: compiling with NVRTC");
        return None;
    }
    Some(Ahead { dir, manifest })
}

/// Compile `src` for `arch` (`compute_90`: PTX; `sm_90`: a CUBIN, with ptxas's report).
pub fn compile(src: &CudaSource, arch: &str) -> Result<Compiled> {
    use cudarc::nvrtc::{result, sys};
    if !available() {
        return Err(Error::Backend(
            "no NVRTC library (libnvrtc.so): install the CUDA 13.0 NVRTC (PyPI nvidia-cuda-nvrtc==13.0.88) and put its lib directory on LD_LIBRARY_PATH".into(),
        ));
    }
    let cuda_err = |what: &str, e: result::NvrtcError| {
        Error::Cuda(format!("NVRTC {what} of {}.cu: {e:?}", src.name))
    };
    let text = std::ffi::CString::new(src.text)
        .map_err(|_| Error::Cuda(format!("{}.cu holds a NUL byte", src.name)))?;
    let name = std::ffi::CString::new(format!("{}.cu", src.name))
        .map_err(|_| Error::Cuda("source name".into()))?;
    let prog = result::create_program(&text, Some(&name)).map_err(|e| cuda_err("creation", e))?;
    let cubin = arch.starts_with("sm_");
    let mut opts = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
    ];
    if cubin {
        opts.push("--ptxas-options=-v".into());
    }
    // SAFETY: `prog` is a live program; the options are valid C strings.
    let compiled = unsafe { result::compile_program(prog, &opts) };
    // SAFETY: as above.
    let log = unsafe { result::get_program_log(prog) }
        .map(|l| {
            let bytes: Vec<u8> = l
                .iter()
                .take_while(|&&c| c != 0)
                .map(|&c| c as u8)
                .collect();
            String::from_utf8_lossy(&bytes).into_owned()
        })
        .unwrap_or_default();
    let image = compiled
        .map_err(|e| cuda_err("compilation", e))
        .and_then(|()| {
            if cubin {
                let mut size = 0usize;
                // SAFETY: live program, valid out-pointer; the buffer has the size NVRTC gave.
                unsafe {
                    sys::nvrtcGetCUBINSize(prog, &mut size)
                        .result()
                        .map_err(|e| cuda_err("CUBIN size", e))?;
                    let mut buf = vec![0u8; size];
                    sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut std::ffi::c_char)
                        .result()
                        .map_err(|e| cuda_err("CUBIN", e))?;
                    Ok(buf)
                }
            } else {
                // SAFETY: live program.
                unsafe { result::get_ptx(prog) }
                    .map(|p| p.iter().map(|&c| c as u8).collect())
                    .map_err(|e| cuda_err("PTX", e))
            }
        });
    // SAFETY: the program is not used after this.
    let _ = unsafe { result::destroy_program(prog) };
    match image {
        Ok(image) => Ok(Compiled { image, log }),
        Err(Error::Cuda(m)) => Err(Error::Cuda(format!("{m}\n{log}"))),
        Err(e) => Err(e),
    }
}

/// Per-kernel resource usage from ptxas's `-v` log.
pub fn usage(log: &str) -> Vec<Usage> {
    let mut out: Vec<Usage> = Vec::new();
    let num_before = |line: &str, word: &str| -> Option<u32> {
        let i = line.find(word)?;
        line[..i].split_whitespace().last()?.parse().ok()
    };
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let kernel = rest.split('\'').next().unwrap_or("").to_string();
            out.push(Usage {
                kernel,
                ..Usage::default()
            });
            continue;
        }
        let Some(u) = out.last_mut() else { continue };
        if line.contains("Used") && line.contains("registers") {
            u.registers = num_before(line, "registers").unwrap_or(0);
            u.shared_bytes = num_before(line, "bytes smem").unwrap_or(0);
        }
        if line.contains("spill stores") {
            u.stack_bytes = num_before(line, "bytes stack frame").unwrap_or(0);
            u.spill_stores = num_before(line, "bytes spill stores").unwrap_or(0);
            u.spill_loads = num_before(line, "bytes spill loads").unwrap_or(0);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptxas_report_is_read_per_kernel() {
        let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'softmax_nll' for 'sm_90'\n\
ptxas info    : Function properties for softmax_nll\n\
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n\
ptxas info    : Used 26 registers, used 1 barriers, 32 bytes smem, 400 bytes cmem[0]\n\
ptxas info    : Compiling entry function 'col_sums' for 'sm_90'\n\
ptxas info    : Function properties for col_sums\n\
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 12 registers, used 0 barriers, 380 bytes cmem[0]\n";
        let u = usage(log);
        assert_eq!(u.len(), 2);
        assert_eq!(
            u[0],
            Usage {
                kernel: "softmax_nll".into(),
                registers: 26,
                spill_stores: 4,
                spill_loads: 4,
                shared_bytes: 32,
                stack_bytes: 8
            }
        );
        assert_eq!(
            (u[1].registers, u[1].spill_stores, u[1].shared_bytes),
            (12, 0, 0)
        );
    }
}
