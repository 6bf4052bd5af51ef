//! The GPU device: cudarc's driver API (context, the legacy default stream, device memory,
//! kernel launches), the kernels of `src/cuda/*.cu` compiled by NVRTC to an `sm_XY` CUBIN
//! once per device and process (the module cache), and a cuBLAS handle for the GEMMs.
//! Libraries are loaded at run time, so this builds without a CUDA toolkit.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::sys as blas_sys;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, result, sys};

use super::layer::{Device, Gemm, Launch, Mem, SOURCES};
use super::{Precision, nvrtc};
use crate::{Error, Result};

fn drv(what: &str, e: result::DriverError) -> Error {
    Error::Cuda(format!("{what}: {e}"))
}

/// The kernels of every source, loaded into one device's context.
struct Kernels {
    _modules: Vec<Arc<CudaModule>>,
    functions: HashMap<&'static str, CudaFunction>,
}

// SAFETY: CUDA functions and modules are context-wide handles, usable from any thread that
// binds the context (every call here does).
unsafe impl Send for Kernels {}
// SAFETY: as above; the handles are never mutated after loading.
unsafe impl Sync for Kernels {}

/// Per-device module cache: NVRTC compiles the sources once per device and process.
fn kernels(ctx: &Arc<CudaContext>, ordinal: usize) -> Result<Arc<Kernels>> {
    static CACHE: OnceLock<Mutex<HashMap<usize, Arc<Kernels>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut cache = cache
        .lock()
        .map_err(|_| Error::Cuda("kernel cache poisoned".into()))?;
    if let Some(k) = cache.get(&ordinal) {
        return Ok(k.clone());
    }
    let (major, minor) = ctx
        .compute_capability()
        .map_err(|e| drv("compute capability", e))?;
    // A CUBIN for the device's own architecture, not PTX: the driver JIT-compiles only the
    // PTX ISA of its own CUDA version or older (a 13.0 driver refuses 13.2's PTX 9.2),
    // while a CUBIN from any NVRTC of the same major version loads (minor-version
    // compatibility).
    let arch = format!("sm_{major}{minor}");
    let mut modules = Vec::new();
    let mut functions = HashMap::new();
    for src in SOURCES {
        let cubin = nvrtc::compile(src, &arch)?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(cubin.image))
            .map_err(|e| drv(&format!("loading {}.cu", src.name), e))?;
        for &k in src.kernels {
            let f = module
                .load_function(k)
                .map_err(|e| drv(&format!("kernel {k}"), e))?;
            functions.insert(k, f);
        }
        modules.push(module);
    }
    let k = Arc::new(Kernels {
        _modules: modules,
        functions,
    });
    cache.insert(ordinal, k.clone());
    Ok(k)
}

/// Device memory, freed on drop.
struct GpuAlloc {
    ptr: sys::CUdeviceptr,
    ctx: Arc<CudaContext>,
}

impl Drop for GpuAlloc {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated by `alloc` in this context and freed once.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

/// A cuBLAS handle.
struct Blas(blas_sys::cublasHandle_t);

// SAFETY: the handle is used by one backend at a time (the backend is `Send`, not shared),
// always with the context bound.
unsafe impl Send for Blas {}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: created in `Gpu::open`, destroyed once.
        let _ = unsafe { cudarc::cublas::result::destroy_handle(self.0) };
    }
}

/// One GPU, driven on its legacy default stream (every call ordered after the previous).
pub struct Gpu {
    ctx: Arc<CudaContext>,
    kernels: Arc<Kernels>,
    blas: Blas,
    label: String,
    ordinal: usize,
}

impl Gpu {
    /// Open device `ordinal`: context, kernels (NVRTC, cached), cuBLAS with `precision`.
    pub fn open(ordinal: usize, precision: Precision) -> Result<Self> {
        let devices = super::device::cuda_devices()?;
        let Some(info) = devices.get(ordinal) else {
            return Err(Error::Backend(format!(
                "no CUDA device {ordinal}: this machine has {} (lightrnn devices lists them)",
                devices.len()
            )));
        };
        // SAFETY: dlopen probe only.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::Backend(
                "no cuBLAS library (libcublas.so) on the library path".into(),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| drv("opening the device", e))?;
        let kernels = kernels(&ctx, ordinal)?;
        ctx.bind_to_thread()
            .map_err(|e| drv("binding the context", e))?;
        let handle = cudarc::cublas::result::create_handle()
            .map_err(|e| Error::Cuda(format!("cuBLAS handle: {e:?}")))?;
        let blas = Blas(handle);
        let mode = match precision {
            Precision::Fp32 => blas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH,
            Precision::Tf32 => blas_sys::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH,
        };
        // SAFETY: a live handle.
        unsafe { blas_sys::cublasSetMathMode(blas.0, mode) }
            .result()
            .map_err(|e| Error::Cuda(format!("cuBLAS math mode: {e:?}")))?;
        let (major, minor) = info.compute_capability;
        Ok(Self {
            ctx,
            kernels,
            blas,
            label: format!("{} (sm_{major}{minor}, {precision})", info.name),
            ordinal,
        })
    }

    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| drv("binding the context", e))
    }
}

impl Device for Gpu {
    fn name(&self) -> String {
        self.label.clone()
    }

    fn ordinal(&self) -> Option<usize> {
        Some(self.ordinal)
    }

    fn memory(&self) -> Result<(usize, usize)> {
        self.ctx
            .mem_get_info()
            .map_err(|e| drv("memory information", e))
    }

    fn alloc(&self, bytes: usize) -> Result<Mem> {
        self.bind()?;
        // SAFETY: the context is bound; the memory is zeroed before use.
        let ptr = unsafe { result::malloc_sync(bytes.max(1)) }.map_err(|e| {
            if e.0 == sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY {
                Error::OutOfMemory(format!("{bytes} bytes of device memory"))
            } else {
                drv("allocating", e)
            }
        })?;
        let owner = GpuAlloc {
            ptr,
            ctx: self.ctx.clone(),
        };
        // SAFETY: `ptr` holds `bytes` bytes.
        unsafe { result::memset_d8_sync(ptr, 0, bytes) }.map_err(|e| drv("zeroing", e))?;
        Ok(Mem {
            addr: ptr,
            bytes,
            _owner: Box::new(owner),
        })
    }

    fn upload(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.bind()?;
        // SAFETY: the backend addresses `src.len()` bytes inside one of its allocations.
        unsafe { result::memcpy_htod_sync(dst, src) }.map_err(|e| drv("upload", e))
    }

    fn download(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        self.bind()?;
        // SAFETY: as `upload`; synchronous, so the earlier work is done.
        unsafe { result::memcpy_dtoh_sync(dst, src) }.map_err(|e| drv("download", e))
    }

    fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: both ranges lie in the backend's allocations.
        unsafe { result::memcpy_dtod_sync(dst, src, bytes) }.map_err(|e| drv("copy", e))
    }

    fn zero(&self, dst: u64, bytes: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: the range lies in one of the backend's allocations.
        unsafe { result::memset_d8_sync(dst, 0, bytes) }.map_err(|e| drv("memset", e))
    }

    fn launch(&self, l: &Launch<'_>) -> Result<()> {
        self.bind()?;
        let f = self
            .kernels
            .functions
            .get(l.kernel)
            .ok_or_else(|| Error::Cuda(format!("no kernel named {}", l.kernel)))?;
        let mut slots: Vec<u64> = l.args.iter().map(|a| a.slot()).collect();
        let mut params: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect();
        // SAFETY: one 8-byte slot per kernel parameter, alive for the call (the driver
        // copies the values at launch); the emulator checks the same argument lists
        // against each kernel's signature in CI.
        unsafe {
            result::launch_kernel(
                f.cu_function(),
                (l.grid[0], l.grid[1], l.grid[2]),
                (l.block[0], l.block[1], l.block[2]),
                0,
                std::ptr::null_mut(),
                &mut params,
            )
        }
        .map_err(|e| drv(&format!("launching {}", l.kernel), e))
    }

    fn gemm(&self, g: &Gemm) -> Result<()> {
        g.check().map_err(Error::Cuda)?;
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        self.bind()?;
        let op = |t: bool| {
            if t {
                blas_sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas_sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let int = |x: usize| {
            i32::try_from(x).map_err(|_| Error::Cuda(format!("GEMM size {x} exceeds cuBLAS's int")))
        };
        // SAFETY: operands lie in the backend's allocations with the extents `Gemm`
        // describes (checked against live allocations by the emulated device in CI).
        unsafe {
            cudarc::cublas::result::sgemm(
                self.blas.0,
                op(g.trans_a),
                op(g.trans_b),
                int(g.m)?,
                int(g.n)?,
                int(g.k)?,
                &g.alpha,
                g.a as *const f32,
                int(g.lda)?,
                g.b as *const f32,
                int(g.ldb)?,
                &g.beta,
                g.c as *mut f32,
                int(g.ldc)?,
            )
        }
        .map_err(|e| Error::Cuda(format!("cuBLAS sgemm: {e:?}")))
    }
}
