//! The GPU device: cudarc's driver API on one explicit non-blocking stream (every kernel,
//! copy and cuBLAS call of the backend is issued to it, so CUDA graphs can capture it),
//! page-locked host memory for the asynchronous copies, stream capture into CUDA graphs,
//! the kernels of `src/cuda/*.cu` as `sm_XY` CUBINs (compiled ahead of time and loaded
//! from a kernel directory when they match the device and the embedded sources, else
//! compiled by NVRTC once per device and process), and a cuBLAS handle on the stream with
//! its own workspace (no allocation inside a capture). Libraries are loaded at run time,
//! so this builds without a CUDA toolkit.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::sys as blas_sys;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, result, sys};

use super::layer::{Counters, Device, Gemm, Graph, HostMem, Launch, Mem, Tally};
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

/// Per-device module cache: each device's kernels are loaded once per process, from the
/// ahead-of-time CUBINs where they match, else compiled by NVRTC (sources in parallel).
fn kernels(ctx: &Arc<CudaContext>, ordinal: usize, driver: i32) -> Result<Arc<Kernels>> {
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
    let t0 = std::time::Instant::now();
    let ahead = nvrtc::ahead_of_time(&arch, driver);
    let images = nvrtc::images(&arch, |src| ahead.as_ref().and_then(|a| a.image(src)))?;
    let mut modules = Vec::new();
    let mut functions = HashMap::new();
    for (src, image, _) in &images {
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(image.clone()))
            .map_err(|e| drv(&format!("loading {}.cu", src.name), e))?;
        for &k in src.kernels {
            let f = module
                .load_function(k)
                .map_err(|e| drv(&format!("kernel {k}"), e))?;
            functions.insert(k, f);
        }
        modules.push(module);
    }
    let loaded = images.iter().filter(|i| i.2.is_none()).count();
    tracing::info!(
        gpu = ordinal,
        arch = %arch,
        ahead_of_time = loaded,
        compiled = images.len() - loaded,
        from = ahead.as_ref().map(|a| a.dir.display().to_string()).unwrap_or_default(),
        seconds = t0.elapsed().as_secs_f64(),
        "CUDA kernels loaded"
    );
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
    tally: Arc<Tally>,
}

impl Drop for GpuAlloc {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated by `alloc` in this context and freed once (cuMemFree waits
            // for the work that may still use it).
            let _ = unsafe { result::free_sync(self.ptr) };
            Tally::add(&self.tally.frees);
        }
    }
}

/// Page-locked host memory, freed on drop.
struct PinnedAlloc {
    ptr: *mut c_void,
    ctx: Arc<CudaContext>,
}

// SAFETY: plain memory owned by this value.
unsafe impl Send for PinnedAlloc {}

impl Drop for PinnedAlloc {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated by `alloc_host` and freed once.
            let _ = unsafe { result::free_host(self.ptr) };
        }
    }
}

/// A cuBLAS handle, destroyed with its context bound.
struct Blas {
    handle: blas_sys::cublasHandle_t,
    ctx: Arc<CudaContext>,
}

// SAFETY: the handle is used by one backend at a time (the backend is `Send`, not shared),
// always with the context bound.
unsafe impl Send for Blas {}

impl Drop for Blas {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: created in `Gpu::open`, destroyed once, its context current.
            let _ = unsafe { cudarc::cublas::result::destroy_handle(self.handle) };
        }
    }
}

/// An instantiated CUDA graph and the graph it came from.
struct GpuGraph {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
    ctx: Arc<CudaContext>,
}

// SAFETY: graph handles are context-wide; every use binds the context.
unsafe impl Send for GpuGraph {}

impl Drop for GpuGraph {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: created by `end_capture`, destroyed once.
            unsafe {
                let _ = result::graph::exec_destroy(self.exec);
                let _ = result::graph::destroy(self.graph);
            }
        }
    }
}

/// cuBLAS's workspace on Hopper (NVIDIA's recommendation for sm_90: 32 MiB), given to the
/// handle so that no GEMM allocates, which a capture would refuse.
const BLAS_WORKSPACE: usize = 32 << 20;

/// One GPU, driven on one non-blocking stream.
pub struct Gpu {
    /// Fields drop in order: pending timing events, the handle and its workspace before
    /// the stream and context.
    marks: std::sync::Mutex<Vec<(String, Event)>>,
    blas: Blas,
    _workspace: Mem,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    kernels: Arc<Kernels>,
    label: String,
    ordinal: usize,
    tally: Arc<Tally>,
}

/// A timing event of a device's context, destroyed with its context current.
struct Event {
    event: sys::CUevent,
    ctx: Arc<CudaContext>,
}

// SAFETY: a driver handle, used under the Gpu's lock with its context bound.
unsafe impl Send for Event {}

impl Drop for Event {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: created by `mark` in this context, destroyed once (released at its
            // completion if still pending).
            let _ = unsafe { result::event::destroy(self.event) };
        }
    }
}

impl Gpu {
    /// Open device `ordinal`: context, stream, kernels (cached), cuBLAS with `precision`.
    /// Only this device's context is created.
    pub fn open(ordinal: usize, precision: Precision) -> Result<Self> {
        let (count, driver) = super::device::count_and_driver()?;
        if ordinal >= count {
            return Err(Error::Backend(format!(
                "no CUDA device {ordinal}: this machine has {count} (lightrnn devices lists them)"
            )));
        }
        // SAFETY: dlopen probe only.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::Backend(
                "no cuBLAS library (libcublas.so) on the library path".into(),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| drv("opening the device", e))?;
        // This device orders its own work (one stream, explicit waits); cudarc's event
        // tracking would make the first stream synchronise the whole context, which is
        // invalid while another backend of the process captures a graph on it.
        // SAFETY: no cudarc-managed buffer of this context relies on events.
        unsafe { ctx.disable_event_tracking() };
        let kernels = kernels(&ctx, ordinal, driver)?;
        let stream = ctx.new_stream().map_err(|e| drv("creating a stream", e))?;
        ctx.bind_to_thread()
            .map_err(|e| drv("binding the context", e))?;
        let tally = Arc::new(Tally::default());
        let handle = cudarc::cublas::result::create_handle()
            .map_err(|e| Error::Cuda(format!("cuBLAS handle: {e:?}")))?;
        let blas = Blas {
            handle,
            ctx: ctx.clone(),
        };
        let name = ctx.name().map_err(|e| drv("device name", e))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| drv("compute capability", e))?;
        let mut gpu = Self {
            _workspace: Mem {
                addr: 0,
                bytes: 0,
                _owner: Box::new(()),
            },
            blas,
            stream,
            ctx,
            kernels,
            label: format!("{name} (sm_{major}{minor}, {precision})"),
            ordinal,
            tally,
            marks: std::sync::Mutex::new(Vec::new()),
        };
        gpu._workspace = gpu.alloc(BLAS_WORKSPACE)?;
        let mode = match precision {
            Precision::Fp32 => blas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH,
            Precision::Tf32 => blas_sys::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH,
        };
        let h = gpu.blas.handle;
        // SAFETY: a live handle; the stream and the workspace outlive it (field order).
        unsafe {
            blas_sys::cublasSetMathMode(h, mode)
                .result()
                .map_err(|e| Error::Cuda(format!("cuBLAS math mode: {e:?}")))?;
            blas_sys::cublasSetStream_v2(h, gpu.stream.cu_stream() as blas_sys::cudaStream_t)
                .result()
                .map_err(|e| Error::Cuda(format!("cuBLAS stream: {e:?}")))?;
            blas_sys::cublasSetWorkspace_v2(h, gpu._workspace.addr as *mut c_void, BLAS_WORKSPACE)
                .result()
                .map_err(|e| Error::Cuda(format!("cuBLAS workspace: {e:?}")))?;
        }
        Ok(gpu)
    }

    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| drv("binding the context", e))
    }

    fn cu(&self) -> sys::CUstream {
        self.stream.cu_stream()
    }

    fn wait(&self) -> Result<()> {
        Tally::add(&self.tally.syncs);
        // SAFETY: our live stream.
        unsafe { result::stream::synchronize(self.cu()) }.map_err(|e| drv("synchronising", e))
    }
}

impl Device for Gpu {
    fn name(&self) -> String {
        self.label.clone()
    }

    fn ordinal(&self) -> Option<usize> {
        Some(self.ordinal)
    }

    fn stream(&self) -> u64 {
        self.cu() as u64
    }

    fn memory(&self) -> Result<(usize, usize)> {
        self.ctx
            .mem_get_info()
            .map_err(|e| drv("memory information", e))
    }

    fn alloc(&self, bytes: usize) -> Result<Mem> {
        self.bind()?;
        // SAFETY: the context is bound; the memory is zeroed on the stream before use.
        let ptr = unsafe { result::malloc_sync(bytes.max(1)) }.map_err(|e| {
            if e.0 == sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY {
                Error::OutOfMemory(format!("{bytes} bytes of device memory"))
            } else {
                drv("allocating", e)
            }
        })?;
        Tally::add(&self.tally.allocs);
        let owner = GpuAlloc {
            ptr,
            ctx: self.ctx.clone(),
            tally: self.tally.clone(),
        };
        // SAFETY: `ptr` holds `bytes` bytes; ordered before any later use on the stream.
        unsafe { sys::cuMemsetD8Async(ptr, 0, bytes, self.cu()) }
            .result()
            .map_err(|e| drv("zeroing", e))?;
        Ok(Mem {
            addr: ptr,
            bytes,
            _owner: Box::new(owner),
        })
    }

    fn alloc_host(&self, bytes: usize) -> Result<HostMem> {
        self.bind()?;
        // SAFETY: the context is bound; zeroed below before any use.
        let ptr = unsafe { result::malloc_host(bytes.max(1), 0) }
            .map_err(|e| drv("allocating page-locked memory", e))?;
        // SAFETY: `bytes` writable bytes just allocated.
        unsafe { std::ptr::write_bytes(ptr as *mut u8, 0, bytes) };
        Tally::add(&self.tally.host_allocs);
        Ok(HostMem {
            ptr: ptr as *mut u8,
            bytes,
            _owner: Box::new(PinnedAlloc {
                ptr,
                ctx: self.ctx.clone(),
            }),
        })
    }

    fn upload(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.bind()?;
        Tally::add(&self.tally.copies);
        // SAFETY: the backend addresses `src.len()` bytes inside one of its allocations;
        // from pageable memory the copy has read `src` when it returns, and the wait
        // below orders it for the callers that read back what they wrote.
        unsafe {
            sys::cuMemcpyHtoDAsync_v2(dst, src.as_ptr() as *const c_void, src.len(), self.cu())
        }
        .result()
        .map_err(|e| drv("upload", e))?;
        self.wait()
    }

    fn download(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        self.bind()?;
        Tally::add(&self.tally.copies);
        // SAFETY: as `upload`; `dst` is written once the wait returns.
        unsafe {
            sys::cuMemcpyDtoHAsync_v2(dst.as_mut_ptr() as *mut c_void, src, dst.len(), self.cu())
        }
        .result()
        .map_err(|e| drv("download", e))?;
        self.wait()
    }

    fn upload_async(&self, dst: u64, host: &HostMem, offset: usize, bytes: usize) -> Result<()> {
        self.bind()?;
        host.slice::<u8>(offset, bytes)?;
        Tally::add(&self.tally.copies);
        // SAFETY: page-locked source inside `host` (checked), destination inside one of
        // the backend's allocations; the host leaves the source alone until the stream
        // has passed the copy (the backend writes its staging only after a wait).
        unsafe {
            sys::cuMemcpyHtoDAsync_v2(dst, host.ptr.add(offset) as *const c_void, bytes, self.cu())
        }
        .result()
        .map_err(|e| drv("asynchronous upload", e))
    }

    fn download_async(&self, src: u64, host: &HostMem, offset: usize, bytes: usize) -> Result<()> {
        self.bind()?;
        host.slice::<u8>(offset, bytes)?;
        Tally::add(&self.tally.copies);
        // SAFETY: as `upload_async`; the host reads the destination after a wait.
        unsafe {
            sys::cuMemcpyDtoHAsync_v2(host.ptr.add(offset) as *mut c_void, src, bytes, self.cu())
        }
        .result()
        .map_err(|e| drv("asynchronous download", e))
    }

    fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.bind()?;
        Tally::add(&self.tally.copies);
        // SAFETY: both ranges lie in the backend's allocations.
        unsafe { sys::cuMemcpyDtoDAsync_v2(dst, src, bytes, self.cu()) }
            .result()
            .map_err(|e| drv("copy", e))
    }

    fn zero(&self, dst: u64, bytes: usize) -> Result<()> {
        self.bind()?;
        Tally::add(&self.tally.copies);
        // SAFETY: the range lies in one of the backend's allocations.
        unsafe { sys::cuMemsetD8Async(dst, 0, bytes, self.cu()) }
            .result()
            .map_err(|e| drv("memset", e))
    }

    fn launch(&self, l: &Launch<'_>) -> Result<()> {
        l.check().map_err(Error::Cuda)?;
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
        Tally::add(&self.tally.launches);
        // SAFETY: one 8-byte slot per kernel parameter, alive for the call (the driver
        // copies the values at launch, and a capture keeps them in the graph); the
        // emulator checks the same argument lists against each kernel's signature in CI.
        unsafe {
            result::launch_kernel(
                f.cu_function(),
                (l.grid[0], l.grid[1], l.grid[2]),
                (l.block[0], l.block[1], l.block[2]),
                0,
                self.cu(),
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
        self.tally.gemm(g);
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
                self.blas.handle,
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

    fn mark(&self, label: String) -> Result<()> {
        self.bind()?;
        let e = result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
            .map_err(|e| drv("creating an event", e))?;
        let e = Event {
            event: e,
            ctx: self.ctx.clone(),
        };
        // SAFETY: a live event and our live stream, the context bound.
        unsafe { result::event::record(e.event, self.cu()) }
            .map_err(|e| drv("recording an event", e))?;
        self.marks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((label, e));
        Ok(())
    }

    fn take_marks(&self) -> Result<Vec<(String, f64)>> {
        self.bind()?;
        let marks = std::mem::take(&mut *self.marks.lock().unwrap_or_else(|p| p.into_inner()));
        let Some(first) = marks.first().map(|m| m.1.event) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(marks.len());
        for (label, e) in &marks {
            // SAFETY: both events recorded on our stream, which has passed them.
            let ms = unsafe { result::event::elapsed(first, e.event) }
                .map_err(|e| drv("reading an event's time", e))?;
            out.push((label.clone(), f64::from(ms) / 1e3));
        }
        Ok(out)
    }

    fn synchronize(&self) -> Result<()> {
        self.bind()?;
        self.wait()
    }

    fn begin_capture(&self) -> Result<()> {
        self.bind()?;
        // Thread-local mode: a call of this thread that a capture may not contain (an
        // allocation, a synchronous copy) fails instead of breaking the capture silently.
        // SAFETY: our live stream.
        unsafe {
            result::stream::begin_capture(
                self.cu(),
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
        }
        .map_err(|e| drv("beginning a stream capture", e))
    }

    fn end_capture(&self) -> Result<Graph> {
        self.bind()?;
        // SAFETY: our stream, capturing (an invalidated capture ends with an error here).
        let graph = unsafe { result::stream::end_capture(self.cu()) }
            .map_err(|e| drv("ending a stream capture", e))?;
        let mut nodes = 0usize;
        // SAFETY: a graph just captured; a null node array asks for the count.
        unsafe { sys::cuGraphGetNodes(graph, std::ptr::null_mut(), &mut nodes) }
            .result()
            .map_err(|e| drv("counting graph nodes", e))?;
        // SAFETY: as above.
        let exec = unsafe { result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) };
        let exec = match exec {
            Ok(x) => x,
            Err(e) => {
                // SAFETY: the graph is ours and not instantiated.
                let _ = unsafe { result::graph::destroy(graph) };
                return Err(drv("instantiating a graph", e));
            }
        };
        Tally::add(&self.tally.graphs_captured);
        Ok(Graph {
            nodes,
            exec: Box::new(GpuGraph {
                graph,
                exec,
                ctx: self.ctx.clone(),
            }),
        })
    }

    fn launch_graph(&self, g: &Graph) -> Result<()> {
        self.bind()?;
        let x = g
            .exec
            .downcast_ref::<GpuGraph>()
            .ok_or_else(|| Error::Cuda("a graph of another device".into()))?;
        Tally::add(&self.tally.graph_launches);
        // SAFETY: an instantiated graph of this context, launched on our stream.
        unsafe { result::graph::launch(x.exec, self.cu()) }.map_err(|e| drv("launching a graph", e))
    }

    fn counters(&self) -> Counters {
        self.tally.snapshot()
    }
}
