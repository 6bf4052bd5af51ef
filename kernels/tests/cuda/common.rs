//! What the CUDA kernel and backend tests share: random inputs, the relative error, the
//! devices a kernel test runs on ([`kinds`]: the emulated one, and GPU 0 where there is
//! one) and a kernel's buffers on them ([`Dev`]), token buffers, and backends to hold
//! against each other.

use lightrnn_kernels::cuda::emulated::Emulated;
use lightrnn_kernels::cuda::layer::{Arg, Device, Launch, Mem};
use lightrnn_kernels::cuda::{CudaBackend, Precision};
use lightrnn_kernels::rng::{Philox, Purpose};
use lightrnn_kernels::{Backend, Batch, CpuBackend, Error, ModelConfig, ModelDims, Shard, Stream};

pub const GIB: usize = 1 << 30;

pub fn rand(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = Philox::new(seed, Purpose::Other).stream(0);
    (0..n)
        .map(|_| ((2.0 * s.next_f64() - 1.0) as f32) * scale)
        .collect()
}

pub fn rand_ids(seed: u64, n: usize, below: u32) -> Vec<u32> {
    let mut s = Philox::new(seed, Purpose::Other).stream(1);
    (0..n).map(|_| s.below(below as u64) as u32).collect()
}

/// max |a - b| / max |b|.
pub fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b
        .iter()
        .fold(0f64, |m, &x| m.max(x.abs() as f64))
        .max(1e-30);
    a.iter()
        .zip(b)
        .fold(0f64, |m, (&x, &y)| m.max((x - y).abs() as f64))
        / scale
}

pub struct Dev {
    pub d: Box<dyn Device>,
    keep: Vec<Mem>,
}

/// The devices every kernel test runs on: the emulated one, and GPU 0 where there is one.
/// `LIGHTRNN_TEST_DEVICES=gpu` runs the GPU alone (`scripts/gpu-check.sh`: no device time
/// spent on the emulator's cases) and requires it, as `LIGHTRNN_REQUIRE_GPU=1` does: a
/// run meant for the card fails where there is none instead of passing on the emulator
/// alone. `LIGHTRNN_TEST_DEVICES=emulated`: the emulator alone.
pub fn kinds() -> Vec<&'static str> {
    let only = std::env::var("LIGHTRNN_TEST_DEVICES").unwrap_or_default();
    let require = only == "gpu" || std::env::var("LIGHTRNN_REQUIRE_GPU").is_ok_and(|v| v == "1");
    let gpu = lightrnn_kernels::cuda::gpu_present();
    if require && !gpu {
        let why = lightrnn_kernels::cuda::CudaBackend::check(0)
            .err()
            .map_or("the emulator is requested".into(), |e| e.to_string());
        panic!(
            "a GPU is required here (LIGHTRNN_REQUIRE_GPU or LIGHTRNN_TEST_DEVICES=gpu) and there is none: {why}"
        );
    }
    match only.as_str() {
        "gpu" => vec!["gpu"],
        "emulated" => vec!["emulated"],
        _ if gpu => vec!["emulated", "gpu"],
        _ => vec!["emulated"],
    }
}

impl Dev {
    pub fn on(kind: &str) -> Self {
        let d: Box<dyn Device> = match kind {
            "gpu" => lightrnn_kernels::cuda::gpu_device(0, Precision::Fp32).unwrap(),
            _ => Box::new(Emulated::new(GIB)),
        };
        Self {
            d,
            keep: Vec::new(),
        }
    }
    pub fn put<T: Copy>(&mut self, host: &[T]) -> Arg {
        let bytes = std::mem::size_of_val(host);
        let m = self.d.alloc(bytes).unwrap();
        // SAFETY: plain data viewed as bytes.
        let b = unsafe { std::slice::from_raw_parts(host.as_ptr() as *const u8, bytes) };
        self.d.upload(m.addr(), b).unwrap();
        let a = Arg::Ptr(m.addr());
        self.keep.push(m);
        a
    }
    pub fn get<T: Copy + Default>(&self, a: Arg, n: usize) -> Vec<T> {
        let Arg::Ptr(p) = a else {
            panic!("not a buffer")
        };
        let mut v = vec![T::default(); n];
        // SAFETY: plain data viewed as bytes.
        let b = unsafe {
            std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, n * size_of::<T>())
        };
        self.d.download(p, b).unwrap();
        v
    }
    pub fn run(
        &self,
        kernel: &'static str,
        grid: [u32; 3],
        block: u32,
        args: &[Arg],
    ) -> Result<(), Error> {
        self.d.launch(&Launch {
            kernel,
            grid,
            block: [block, 1, 1],
            args,
        })?;
        // A kernel's fault shows when the host waits for it (as on a GPU).
        self.d.synchronize()
    }
}

/// A [T + 1, B] token buffer from a skewed random corpus.
pub fn tokens(seed: u64, t: usize, b: usize, vocab: usize) -> Vec<u32> {
    let mut s = Philox::new(seed, Purpose::Corpus).stream(0);
    (0..(t + 1) * b)
        .map(|_| ((s.next_f64().powi(3)) * vocab as f64) as u32 % vocab as u32)
        .collect()
}

/// The CPU backend and a CUDA backend to hold against it, on the emulated device or on
/// GPU 0 (FP32 GEMMs there: TF32's 10-bit products are not a parity check).
pub fn pair(cfg: &ModelConfig, kind: &str) -> (CpuBackend, CudaBackend) {
    let cuda = match kind {
        "gpu" => CudaBackend::with_precision(cfg, 0, Precision::Fp32).unwrap(),
        _ => CudaBackend::emulated(cfg, GIB).unwrap(),
    };
    (CpuBackend::new(cfg, 2).unwrap(), cuda)
}

/// A backend for the step-shape tests: aligned sizes (n = m = 12, V = 300 gives R = C = 18,
/// padded on the device to 20), dropout, `groups` gradient groups.
pub fn shaped(kind: &str, groups: usize, graphs: bool) -> (CudaBackend, impl Fn(u64) -> Vec<u32>) {
    let dims = ModelDims::square(300, 12, 12, 2).unwrap();
    let cfg = ModelConfig {
        dims,
        dropout: 0.25,
        seed: 9,
    };
    let (_, mut be) = pair(&cfg, kind);
    be.set_graphs(graphs);
    be.set_shard(Shard {
        offset: 0,
        global: 0,
        groups,
    })
    .unwrap();
    (be, |seed| tokens(seed, 5, 4, 300))
}

pub fn batch_of(toks: &[u32], t: usize, b: usize) -> Batch<'_> {
    Batch {
        inputs: &toks[..t * b],
        targets: &toks[b..],
        steps: t,
        batch: b,
        stream: Stream::Train(0),
    }
}
