//! The CUDA backend on the emulated device (the `.cu` kernels built for the host, GEMMs with
//! cuBLAS's semantics), against the CPU backend: every kernel against its CPU twin on
//! random inputs, whole training steps (dropout, layers, gradient groups, shards), 50
//! steps of the `tiny` preset, loss tables, optimizer state, and the checks the emulator
//! adds (memory refusals, GEMM bounds, barrier deadlocks).
#![cfg(feature = "cuda")]

use lightrnn_kernels::cpu::simd;
use lightrnn_kernels::cuda::emulated::Emulated;
use lightrnn_kernels::cuda::layer::{Arg, Device, Gemm, Launch, Mem};
use lightrnn_kernels::cuda::{CudaBackend, Precision};
use lightrnn_kernels::optim::{self, Optimizer};
use lightrnn_kernels::rng::{Philox, Purpose};
use lightrnn_kernels::{
    Backend, Batch, CpuBackend, Error, LossTables, ModelConfig, ModelDims, Shard, Stream,
};

const GIB: usize = 1 << 30;

fn rand(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = Philox::new(seed, Purpose::Other).stream(0);
    (0..n)
        .map(|_| ((2.0 * s.next_f64() - 1.0) as f32) * scale)
        .collect()
}

fn rand_ids(seed: u64, n: usize, below: u32) -> Vec<u32> {
    let mut s = Philox::new(seed, Purpose::Other).stream(1);
    (0..n).map(|_| s.below(below as u64) as u32).collect()
}

/// max |a - b| / max |b|.
fn rel(a: &[f32], b: &[f32]) -> f64 {
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

struct Dev {
    d: Box<dyn Device>,
    keep: Vec<Mem>,
}

/// The devices every kernel test runs on: the emulated one, and GPU 0 where there is one.
/// `LIGHTRNN_TEST_DEVICES=gpu` runs the GPU alone (`scripts/gpu-check.sh`: no device time
/// spent on the emulator's cases) and requires it, as `LIGHTRNN_REQUIRE_GPU=1` does: a
/// run meant for the card fails where there is none instead of passing on the emulator
/// alone. `LIGHTRNN_TEST_DEVICES=emulated`: the emulator alone.
fn kinds() -> Vec<&'static str> {
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
    fn on(kind: &str) -> Self {
        let d: Box<dyn Device> = match kind {
            "gpu" => lightrnn_kernels::cuda::gpu_device(0, Precision::Fp32).unwrap(),
            _ => Box::new(Emulated::new(GIB)),
        };
        Self {
            d,
            keep: Vec::new(),
        }
    }
    fn put<T: Copy>(&mut self, host: &[T]) -> Arg {
        let bytes = std::mem::size_of_val(host);
        let m = self.d.alloc(bytes).unwrap();
        // SAFETY: plain data viewed as bytes.
        let b = unsafe { std::slice::from_raw_parts(host.as_ptr() as *const u8, bytes) };
        self.d.upload(m.addr(), b).unwrap();
        let a = Arg::Ptr(m.addr());
        self.keep.push(m);
        a
    }
    fn get<T: Copy + Default>(&self, a: Arg, n: usize) -> Vec<T> {
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
    fn run(
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

#[test]
fn dropout_masks_are_the_cpu_masks_bit_for_bit() {
    for kind in kinds() {
        let mut d = Dev::on(kind);
        let (rows, width, batch, offset, global, site, p) =
            (7usize, 13usize, 3usize, 2usize, 8usize, 77u64, 0.3);
        let x = rand(1, rows * width, 2.0);
        let rng = Philox::new(42, Purpose::Dropout);
        let [k0, k1] = rng.key();
        let (xa, out) = (d.put(&x), d.put(&vec![0f32; rows * width]));
        // The site's step part is read from device memory (site = *base + offset).
        let base = d.put(&[70u64]);
        let threshold = (p * 4_294_967_296.0) as u32;
        let keep = (1.0 / (1.0 - p)) as f32;
        let args = [
            out,
            xa,
            Arg::U32(rows as u32),
            Arg::U32(width as u32),
            Arg::U32(k0),
            Arg::U32(k1),
            base,
            Arg::U64(site - 70),
            Arg::U32(batch as u32),
            Arg::U32(offset as u32),
            Arg::U32(global as u32),
            Arg::U32(threshold),
            Arg::F32(keep),
        ];
        d.run("dropout_apply", [2, 1, 1], 32, &args).unwrap();
        let got: Vec<f32> = d.get(out, rows * width);
        for r in 0..rows {
            let g = (r / batch) * global + offset + r % batch;
            let mut mask = vec![0f32; width];
            simd::dropout_mask(&rng, site, (g * width) as u64, p, &mut mask);
            for j in 0..width {
                assert_eq!(
                    got[r * width + j],
                    x[r * width + j] * mask[j],
                    "row {r} col {j}"
                );
            }
        }
    }
}

#[test]
fn gather_and_scatter_rows_match_host_loops() {
    for kind in kinds() {
        let mut d = Dev::on(kind);
        let (table_rows, width, rows) = (11usize, 9usize, 30usize);
        let table = rand(2, table_rows * width, 1.0);
        let ids = rand_ids(3, rows, table_rows as u32);
        let (ta, ia, out) = (d.put(&table), d.put(&ids), d.put(&vec![0f32; rows * width]));
        d.run(
            "gather_rows",
            [3, 1, 1],
            64,
            &[out, ta, ia, Arg::U32(rows as u32), Arg::U32(width as u32)],
        )
        .unwrap();
        let got: Vec<f32> = d.get(out, rows * width);
        for r in 0..rows {
            assert_eq!(
                &got[r * width..(r + 1) * width],
                &table[ids[r] as usize * width..][..width]
            );
        }
        // Scatter: rows grouped by id, ascending.
        let grad = rand(4, rows * width, 1.0);
        let mut uniq: Vec<u32> = ids.clone();
        uniq.sort();
        uniq.dedup();
        let (mut starts, mut members) = (vec![], vec![]);
        for &u in &uniq {
            starts.push(members.len() as u32);
            members.extend((0..rows as u32).filter(|&r| ids[r as usize] == u));
        }
        starts.push(members.len() as u32);
        let tg = d.put(&vec![0f32; table_rows * width]);
        // The count of distinct ids comes from device memory; fewer blocks than ids
        // (grid-strided) and more give the same sums.
        let args = [
            tg,
            d.put(&grad),
            d.put(&uniq),
            d.put(&starts),
            d.put(&members),
            d.put(&[uniq.len() as u32]),
            Arg::U32(width as u32),
        ];
        d.run("scatter_rows", [3, 1, 1], 32, &args).unwrap();
        let strided: Vec<f32> = d.get(tg, table_rows * width);
        d.run("scatter_rows", [uniq.len() as u32 + 2, 1, 1], 32, &args)
            .unwrap();
        assert_eq!(d.get::<f32>(tg, table_rows * width), strided);
        let got: Vec<f32> = d.get(tg, table_rows * width);
        let mut want = vec![0f32; table_rows * width];
        for r in 0..rows {
            for j in 0..width {
                want[ids[r] as usize * width + j] += grad[r * width + j];
            }
        }
        assert!(rel(&got, &want) < 1e-6);
    }
}

#[test]
fn lstm_cell_kernels_match_the_cpu_cell() {
    for kind in kinds() {
        for hidden in [5usize, 8] {
            // hidden <= one CPU gate block: the CPU's internal gate order is PyTorch's.
            let mut d = Dev::on(kind);
            let batch = 6;
            let g0 = rand(5, batch * 4 * hidden, 2.0);
            let (bih, bhh) = (rand(6, 4 * hidden, 0.5), rand(7, 4 * hidden, 0.5));
            let cprev = rand(8, batch * hidden, 1.0);
            let n = batch * hidden;
            let (ga, ca, tca, ha) = (
                d.put(&g0),
                d.put(&vec![0f32; n]),
                d.put(&vec![0f32; n]),
                d.put(&vec![0f32; n]),
            );
            let cpa = d.put(&cprev);
            let args = [
                ga,
                d.put(&bih),
                d.put(&bhh),
                cpa,
                ca,
                tca,
                ha,
                Arg::U32(batch as u32),
                Arg::U32(hidden as u32),
            ];
            d.run("lstm_cell_forward", [1, 1, 1], 16, &args).unwrap();
            let bsum: Vec<f32> = bih.iter().zip(&bhh).map(|(a, b)| a + b).collect();
            let (mut g, mut c, mut tc, mut h) =
                (g0.clone(), vec![0f32; n], vec![0f32; n], vec![0f32; n]);
            for b in 0..batch {
                let r = b * hidden..(b + 1) * hidden;
                simd::cell_forward(
                    hidden,
                    0..hidden,
                    &mut g[b * 4 * hidden..(b + 1) * 4 * hidden],
                    &bsum,
                    &[],
                    &cprev[r.clone()],
                    &mut c[r.clone()],
                    &mut tc[r.clone()],
                    &mut h[r],
                );
            }
            let got_g: Vec<f32> = d.get(ga, g.len());
            for (name, a, want) in [
                ("g", got_g, &g),
                ("c", d.get(ca, n), &c),
                ("tc", d.get(tca, n), &tc),
                ("h", d.get(ha, n), &h),
            ] {
                assert!(
                    rel(&a, want) < 1e-5,
                    "hidden {hidden}: forward {name} {}",
                    rel(&a, want)
                );
            }
            // Backward from those activations.
            let (dh, rec, dc0) = (rand(9, n, 1.0), rand(10, n, 1.0), rand(11, n, 1.0));
            for has_rec in [0u32, 1] {
                let (ga2, dca) = (d.put(&g), d.put(&dc0));
                let args = [
                    ga2,
                    d.put(&dh),
                    d.put(&rec),
                    Arg::U32(has_rec),
                    cpa,
                    d.put(&tc),
                    dca,
                    Arg::U32(batch as u32),
                    Arg::U32(hidden as u32),
                ];
                d.run("lstm_cell_backward", [1, 1, 1], 32, &args).unwrap();
                let (mut a, mut dc) = (g.clone(), dc0.clone());
                for b in 0..batch {
                    let r = b * hidden..(b + 1) * hidden;
                    let rec_row: &[f32] = if has_rec == 1 { &rec[r.clone()] } else { &[] };
                    simd::cell_backward(
                        hidden,
                        0..hidden,
                        &mut a[b * 4 * hidden..(b + 1) * 4 * hidden],
                        &dh[r.clone()],
                        rec_row,
                        &cprev[r.clone()],
                        &tc[r.clone()],
                        &mut dc[r],
                    );
                }
                assert!(rel(&d.get(ga2, a.len()), &a) < 1e-5, "hidden {hidden}: dG");
                assert!(rel(&d.get(dca, n), &dc) < 1e-5, "hidden {hidden}: dc");
            }
        }
    }
}

#[test]
fn fused_softmax_matches_the_cpu_in_every_mode() {
    for kind in kinds() {
        for width in [45usize, 300, 1000] {
            let mut d = Dev::on(kind);
            let rows = 7;
            // Rows padded to a multiple of 4 as the backend lays them out: the padding
            // columns are neither read nor written.
            let ld = width.div_ceil(4) * 4 + 4;
            let z0 = rand(12, rows * width, 4.0);
            let pad = |z: &[f32]| -> Vec<f32> {
                let mut out = vec![f32::NAN; rows * ld];
                for r in 0..rows {
                    out[r * ld..r * ld + width].copy_from_slice(&z[r * width..(r + 1) * width]);
                }
                out
            };
            let bias = rand(13, width, 1.0);
            let tgt = rand_ids(14, rows, width as u32);
            for mode in 0..3u32 {
                let (za, la) = (d.put(&pad(&z0)), d.put(&vec![0f64; rows]));
                let args = [
                    za,
                    d.put(&bias),
                    d.put(&tgt),
                    la,
                    Arg::U32(width as u32),
                    Arg::U32(ld as u32),
                    d.put(&[0.25f32]),
                    Arg::U32(mode),
                ];
                d.run("softmax_nll", [rows as u32, 1, 1], 256, &args)
                    .unwrap();
                let mut z = z0.clone();
                let mut nll = vec![0f64; rows];
                match mode {
                    0 => {
                        simd::softmax_nll(&mut z, width, &bias, &tgt, None, &mut nll);
                    }
                    1 => {
                        simd::softmax_nll(&mut z, width, &bias, &tgt, Some(0.25), &mut nll);
                    }
                    _ => {
                        simd::neg_log_softmax(&mut z, width, &bias, &tgt);
                        for r in 0..rows {
                            nll[r] = z[r * width + tgt[r] as usize] as f64;
                        }
                    }
                }
                let got_z: Vec<f32> = d.get(za, rows * ld);
                let (mut cols, mut padding) = (Vec::new(), Vec::new());
                for r in 0..rows {
                    cols.extend_from_slice(&got_z[r * ld..r * ld + width]);
                    padding.extend_from_slice(&got_z[r * ld + width..(r + 1) * ld]);
                }
                assert!(rel(&cols, &z) < 1e-5, "width {width} mode {mode}: z");
                assert!(
                    padding.iter().all(|x| x.is_nan()),
                    "the padding is untouched"
                );
                let got: Vec<f64> = d.get(la, rows);
                for r in 0..rows {
                    assert!(
                        (got[r] - nll[r]).abs() <= 1e-5 * nll[r].abs().max(1.0),
                        "width {width} mode {mode} row {r}: {} vs {}",
                        got[r],
                        nll[r]
                    );
                }
            }
        }
    }
}

#[test]
fn reductions_match_host_sums() {
    for kind in kinds() {
        let mut d = Dev::on(kind);
        let (rows, cols) = (37usize, 300usize);
        let x = rand(15, rows * cols, 1.0);
        let xa = d.put(&x);
        let n = x.len();
        let blocks = 5;
        let (pa, sa) = (d.put(&vec![0f64; blocks]), d.put(&[0f64; 1]));
        d.run(
            "sum_sq_partial",
            [blocks as u32, 1, 1],
            256,
            &[pa, xa, Arg::U64(n as u64)],
        )
        .unwrap();
        d.run(
            "sum_f64",
            [1, 1, 1],
            256,
            &[sa, pa, Arg::U32(blocks as u32)],
        )
        .unwrap();
        let got: Vec<f64> = d.get(sa, 1);
        assert!((got[0] - simd::sum_sq(&x)).abs() < 1e-9 * got[0]);
        let y = rand(16, n, 1.0);
        let ya = d.put(&y);
        d.run("add_assign", [3, 1, 1], 256, &[xa, ya, Arg::U64(n as u64)])
            .unwrap();
        let want: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a + b).collect();
        assert_eq!(d.get::<f32>(xa, n), want);
    }
}

#[test]
fn optimizer_kernels_match_the_cpu_updates() {
    for kind in kinds() {
        let n = 1000;
        let (p0, g) = (rand(17, n, 1.0), rand(18, n, 0.1));
        let rules = [
            Optimizer::Sgd,
            Optimizer::Adam {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            Optimizer::Adagrad {
                eps: 1e-10,
                initial_accumulator: 0.1,
            },
        ];
        for rule in rules {
            let mut d = Dev::on(kind);
            let (lr, gs) = (0.05f64, 0.7f64);
            let init: Vec<Vec<f32>> = (0..rule.state_names().len())
                .map(|k| vec![rule.state_init(k) as f32; n])
                .collect();
            let (pa, ga) = (d.put(&p0), d.put(&g));
            let sa: Vec<Arg> = init.iter().map(|b| d.put(b)).collect();
            let (mut p, mut st) = (p0.clone(), init.clone());
            // What changes per step is read from device memory: the scale, -lr * scale,
            // Adam's corrected step sizes, the learning rate, and whether to update.
            let on = d.put(&[1u32]);
            let (gsa, lra) = (d.put(&[gs as f32]), d.put(&[lr]));
            let ka = d.put(&[(-lr * gs) as f32]);
            for t in 1..=3u64 {
                let f = |x: f64| Arg::F32(x as f32);
                let nn = Arg::U64(n as u64);
                let (kernel, args): (&'static str, Vec<Arg>) = match rule {
                    Optimizer::Sgd => ("sgd_step", vec![pa, ga, nn, ka, on]),
                    Optimizer::Adam { beta1, beta2, eps } => {
                        let (bc1, bc2) = (1.0 - beta1.powi(t as i32), 1.0 - beta2.powi(t as i32));
                        (
                            "adam_step",
                            vec![
                                pa,
                                ga,
                                sa[0],
                                sa[1],
                                nn,
                                gsa,
                                f(beta1),
                                f(beta2),
                                f(1.0 - beta1),
                                f(1.0 - beta2),
                                d.put(&[(lr / bc1) as f32]),
                                d.put(&[(1.0 / bc2.sqrt()) as f32]),
                                f(eps),
                                on,
                            ],
                        )
                    }
                    Optimizer::Adagrad { eps, .. } => (
                        "adagrad_step",
                        vec![pa, ga, sa[0], nn, gsa, lra, f(eps), on],
                    ),
                };
                d.run(kernel, [4, 1, 1], 256, &args).unwrap();
                let mut views: Vec<&mut [f32]> = st.iter_mut().map(|b| b.as_mut_slice()).collect();
                optim::update(&rule, lr, gs, t, &mut p, &g, &mut views).unwrap();
            }
            assert!(rel(&d.get(pa, n), &p) < 1e-6, "{rule:?}: parameters");
            for (a, b) in sa.iter().zip(&st) {
                assert!(rel(&d.get(*a, n), b) < 1e-6, "{rule:?}: state");
            }
            // A step whose norm was not finite updates nothing.
            let off = d.put(&[0u32]);
            let (before, states): (Vec<f32>, Vec<Vec<f32>>) =
                (d.get(pa, n), sa.iter().map(|a| d.get(*a, n)).collect());
            let nn = Arg::U64(n as u64);
            let (kernel, args) = match rule {
                Optimizer::Sgd => ("sgd_step", vec![pa, ga, nn, ka, off]),
                Optimizer::Adam { .. } => {
                    let x = Arg::F32(0.5);
                    let v = vec![pa, ga, sa[0], sa[1], nn, gsa, x, x, x, x, gsa, gsa, x, off];
                    ("adam_step", v)
                }
                Optimizer::Adagrad { .. } => {
                    let v = vec![pa, ga, sa[0], nn, gsa, lra, Arg::F32(1e-10), off];
                    ("adagrad_step", v)
                }
            };
            d.run(kernel, [4, 1, 1], 256, &args).unwrap();
            assert_eq!(d.get::<f32>(pa, n), before, "{rule:?}: no update");
            for (a, b) in sa.iter().zip(&states) {
                assert_eq!(&d.get::<f32>(*a, n), b, "{rule:?}: no state update");
            }
        }
    }
}

#[test]
fn loss_table_kernel_matches_host_sums() {
    for kind in kinds() {
        let mut d = Dev::on(kind);
        let (positions, width, vocab) = (20usize, 300usize, 6usize);
        let z = rand(19, positions * width, 3.0);
        let words = rand_ids(20, positions, vocab as u32);
        let mut order: Vec<u32> = (0..positions as u32).collect();
        order.sort_by_key(|&p| (words[p as usize], p));
        let (mut uw, mut starts) = (vec![], vec![]);
        for (i, &p) in order.iter().enumerate() {
            if uw.last() != Some(&words[p as usize]) {
                uw.push(words[p as usize]);
                starts.push(i as u32);
            }
        }
        starts.push(positions as u32);
        let t0 = rand(21, vocab * width, 1.0);
        let ta = d.put(&t0);
        let args = [
            ta,
            d.put(&z),
            d.put(&uw),
            d.put(&starts),
            d.put(&order),
            Arg::U32(width as u32),
            Arg::U32(width as u32),
        ];
        d.run("table_accumulate", [uw.len() as u32, 2, 1], 256, &args)
            .unwrap();
        let mut want: Vec<f64> = t0.iter().map(|&x| x as f64).collect();
        for p in 0..positions {
            for j in 0..width {
                want[words[p] as usize * width + j] += z[p * width + j] as f64;
            }
        }
        let want: Vec<f32> = want.into_iter().map(|x| x as f32).collect();
        assert!(rel(&d.get(ta, vocab * width), &want) < 1e-6);
    }
}

/// A [T + 1, B] token buffer from a skewed random corpus.
fn tokens(seed: u64, t: usize, b: usize, vocab: usize) -> Vec<u32> {
    let mut s = Philox::new(seed, Purpose::Corpus).stream(0);
    (0..(t + 1) * b)
        .map(|_| ((s.next_f64().powi(3)) * vocab as f64) as u32 % vocab as u32)
        .collect()
}

/// The CPU backend and a CUDA backend to hold against it, on the emulated device or on
/// GPU 0 (FP32 GEMMs there: TF32's 10-bit products are not a parity check).
fn pair(cfg: &ModelConfig, kind: &str) -> (CpuBackend, CudaBackend) {
    let cuda = match kind {
        "gpu" => CudaBackend::with_precision(cfg, 0, Precision::Fp32).unwrap(),
        _ => CudaBackend::emulated(cfg, GIB).unwrap(),
    };
    (CpuBackend::new(cfg, 2).unwrap(), cuda)
}

#[test]
fn a_whole_training_step_matches_the_cpu_backend() {
    let dims = ModelDims::square(300, 12, 20, 3).unwrap();
    let (t, b) = (5usize, 6usize);
    for (dropout, groups) in [(0.0, 1usize), (0.3, 1), (0.3, 3)] {
        let cfg = ModelConfig {
            dims,
            dropout,
            seed: 11,
        };
        for kind in kinds() {
            let (mut cpu, mut gpu) = pair(&cfg, kind);
            assert_eq!(
                cpu.params().unwrap(),
                gpu.params().unwrap(),
                "same initialisation"
            );
            assert_eq!(cpu.allocation().unwrap(), gpu.allocation().unwrap());
            let shard = Shard {
                offset: 6,
                global: 12,
                groups,
            };
            cpu.set_shard(shard).unwrap();
            gpu.set_shard(shard).unwrap();
            for step in 0..3u64 {
                let toks = tokens(step, t, b, 300);
                let batch = Batch {
                    inputs: &toks[..t * b],
                    targets: &toks[b..],
                    steps: t,
                    batch: b,
                    stream: Stream::Train(0),
                };
                cpu.train_step(&batch, step, 0.1).unwrap();
                gpu.train_step(&batch, step, 0.1).unwrap();
                let (lc, lg) = (cpu.step_loss().unwrap(), gpu.step_loss().unwrap());
                assert!(
                    (lc.total() - lg.total()).abs() < 1e-5 * lc.total(),
                    "{kind}: dropout {dropout} groups {groups} step {step}: loss {} vs {}",
                    lg.total(),
                    lc.total()
                );
                let (gc, gg) = (cpu.grads().unwrap(), gpu.grads().unwrap());
                for s in &cpu.layout().specs {
                    let e = rel(&gg[s.range()], &gc[s.range()]);
                    assert!(
                        e < 1e-4,
                        "{kind}: dropout {dropout} groups {groups} step {step}: {} relative error {e}",
                        s.name
                    );
                }
                let rule = Optimizer::Adam {
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                };
                let (fc, fg) = (
                    cpu.clip_and_step(&rule, 1e-3, 0.5).unwrap(),
                    gpu.clip_and_step(&rule, 1e-3, 0.5).unwrap(),
                );
                let (nc, ng) = (fc.norm, fg.norm);
                assert!((nc - ng).abs() < 1e-5 * nc, "norm {ng} vs {nc}");
                assert_eq!(fg.loss, lg, "the step's figures carry its losses");
                for k in 0..groups as u32 {
                    let (sc, sg) = (
                        cpu.state(Stream::Train(k)).unwrap().unwrap(),
                        gpu.state(Stream::Train(k)).unwrap().unwrap(),
                    );
                    assert!(
                        rel(&sg.h, &sc.h) < 1e-4 && rel(&sg.c, &sc.c) < 1e-4,
                        "carried state of group {k}"
                    );
                }
            }
            let (oc, og) = (
                cpu.optimizer_state().unwrap().unwrap(),
                gpu.optimizer_state().unwrap().unwrap(),
            );
            assert_eq!(oc.updates, og.updates);
            for ((nc, bc), (ng, bg)) in oc.buffers.iter().zip(&og.buffers) {
                assert_eq!(nc, ng);
                assert!(rel(bg, bc) < 1e-3, "optimizer buffer {nc}");
            }
        }
    }
}

/// 200 steps of the `tiny` preset (V = 2000, n = m = 32, B = 8, T = 12, SGD lr 10, clip
/// 0.25): the CUDA backend follows the CPU backend step for step. On the card the
/// products are fused multiply-adds; the emulator built with them (`LIGHTRNN_EMU_FMA=1`)
/// shows the tolerance holding for that arithmetic too.
#[test]
fn two_hundred_tiny_preset_steps_follow_the_cpu_backend() {
    let dims = ModelDims::square(2000, 32, 32, 1).unwrap();
    let cfg = ModelConfig {
        dims,
        dropout: 0.0,
        seed: 7,
    };
    for kind in kinds() {
        let (mut cpu, mut gpu) = pair(&cfg, kind);
        let (t, b) = (12usize, 8usize);
        let steps = 200;
        let mut worst = 0f64;
        for step in 0..steps {
            let toks = tokens(100 + step, t, b, 2000);
            let batch = Batch {
                inputs: &toks[..t * b],
                targets: &toks[b..],
                steps: t,
                batch: b,
                stream: Stream::Train(0),
            };
            let scale = 1.0 / (t * b) as f32;
            cpu.train_step(&batch, step, scale).unwrap();
            gpu.train_step(&batch, step, scale).unwrap();
            let (lc, lg) = (
                cpu.clip_and_step(&Optimizer::Sgd, 10.0, 0.25).unwrap().loss,
                gpu.clip_and_step(&Optimizer::Sgd, 10.0, 0.25).unwrap().loss,
            );
            let e = (lc.total() - lg.total()).abs() / lc.total();
            worst = worst.max(e);
            assert!(
                e < 1e-4,
                "{kind} step {step}: loss {} vs {} ({e:.2e})",
                lg.total(),
                lc.total()
            );
        }
        let e = rel(&gpu.params().unwrap(), &cpu.params().unwrap());
        let fma = if lightrnn_kernels::cuda::emulated::FUSED_MULTIPLY_ADD {
            " (fused multiply-adds)"
        } else {
            ""
        };
        println!("{kind}{fma}, {steps} steps: worst loss error {worst:.2e}, parameters {e:.2e}");
        assert!(
            e < 1e-4,
            "{kind}: parameters after {steps} steps: relative error {e}"
        );
    }
}

#[test]
fn loss_tables_and_evaluation_match_the_cpu_backend() {
    let dims = ModelDims::square(200, 10, 16, 2).unwrap();
    let cfg = ModelConfig {
        dims,
        dropout: 0.2,
        seed: 5,
    };
    for kind in kinds() {
        let (mut cpu, mut gpu) = pair(&cfg, kind);
        let (t, b) = (4usize, 5usize);
        for be in [&mut cpu as &mut dyn Backend, &mut gpu] {
            be.begin_loss_tables(0..200, 1 << 30).unwrap();
        }
        for k in 0..3 {
            let toks = tokens(50 + k, t, b, 200);
            let batch = Batch {
                inputs: &toks[..t * b],
                targets: &toks[b..],
                steps: t,
                batch: b,
                stream: Stream::Tables,
            };
            let (lc, lg) = (
                cpu.accumulate_loss_tables(&batch).unwrap(),
                gpu.accumulate_loss_tables(&batch).unwrap(),
            );
            assert!((lc.total() - lg.total()).abs() < 1e-5 * lc.total());
            let eb = Batch {
                stream: Stream::Eval,
                ..batch
            };
            let (ec, eg) = (cpu.eval_batch(&eb).unwrap(), gpu.eval_batch(&eb).unwrap());
            assert!((ec.total() - eg.total()).abs() < 1e-5 * ec.total());
        }
        let (tc, tg) = (
            cpu.take_loss_tables().unwrap(),
            gpu.take_loss_tables().unwrap(),
        );
        assert_eq!(tc.counts, tg.counts);
        assert!(rel(&tg.lr, &tc.lr) < 1e-5 && rel(&tg.lc, &tc.lc) < 1e-5);
        assert!(gpu.take_loss_tables().is_err(), "tables are taken once");
    }
}

#[test]
fn a_pass_over_a_range_of_words_holds_those_words_of_the_full_tables() {
    let dims = ModelDims::square(200, 10, 16, 2).unwrap();
    let cfg = ModelConfig {
        dims,
        dropout: 0.0,
        seed: 7,
    };
    let (t, b) = (4usize, 5usize);
    let batches: Vec<Vec<u32>> = (0..3).map(|k| tokens(60 + k, t, b, 200)).collect();
    let run = |be: &mut dyn Backend, words: std::ops::Range<usize>, max: u64| {
        be.begin_loss_tables(words, max)?;
        be.reset_state(Stream::Tables);
        for toks in &batches {
            be.accumulate_loss_tables(&Batch {
                inputs: &toks[..t * b],
                targets: &toks[b..],
                steps: t,
                batch: b,
                stream: Stream::Tables,
            })?;
        }
        be.take_loss_tables()
    };
    for kind in kinds() {
        let (mut cpu, mut gpu) = pair(&cfg, kind);
        let full = run(&mut cpu, 0..200, 1 << 30).unwrap();
        let range = 37..121;
        let per_word = LossTables::bytes_per_word(&dims);
        for be in [&mut cpu as &mut dyn Backend, &mut gpu] {
            let part = run(be, range.clone(), 84 * per_word).unwrap();
            assert_eq!(part.words, range);
            assert_eq!(part.counts, full.counts[range.clone()]);
            let (rr, cc) = (dims.rows, dims.cols);
            let want_r = &full.lr[range.start * rr..range.end * rr];
            let want_c = &full.lc[range.start * cc..range.end * cc];
            assert!(rel(&part.lr, want_r) < 1e-5 && rel(&part.lc, want_c) < 1e-5);
            assert!(
                part.counts.iter().sum::<u64>() > 0,
                "the range holds seen words"
            );
            // A range beyond the limit, empty, or past the vocabulary is refused.
            for (w, max) in [
                (range.clone(), 83 * per_word),
                (5..5, 1 << 30),
                (150..201, 1 << 30),
            ] {
                assert!(be.begin_loss_tables(w, max).is_err());
            }
        }
    }
}

#[test]
fn emulator_refuses_a_model_or_batch_too_large_for_the_device_with_the_figures() {
    let dims = ModelDims::square(10_000, 64, 64, 2).unwrap();
    let cfg = ModelConfig {
        dims,
        dropout: 0.0,
        seed: 1,
    };
    let err = CudaBackend::emulated(&cfg, 1 << 20)
        .err()
        .expect("1 MiB cannot hold the model");
    let msg = err.to_string();
    assert!(
        matches!(err, Error::OutOfMemory(_)) && msg.contains("the model") && msg.contains("MiB"),
        "{msg}"
    );
    // Room for the model, not for a batch of 512 streams x 35 steps.
    let room = lightrnn_kernels::cuda::model_bytes(lightrnn_kernels::ParamLayout::new(dims).total)
        as usize
        + (8 << 20);
    let mut be = CudaBackend::emulated(&cfg, room).unwrap();
    let toks = tokens(1, 35, 512, 10_000);
    let batch = Batch {
        inputs: &toks[..35 * 512],
        targets: &toks[512..],
        steps: 35,
        batch: 512,
        stream: Stream::Train(0),
    };
    let msg = be.train_step(&batch, 0, 1.0).unwrap_err().to_string();
    assert!(
        msg.contains("512 streams x 35 steps") && msg.contains("MiB free"),
        "{msg}"
    );
    // A small batch still trains.
    let toks = tokens(2, 3, 2, 10_000);
    let small = Batch {
        inputs: &toks[..6],
        targets: &toks[2..],
        steps: 3,
        batch: 2,
        stream: Stream::Train(0),
    };
    be.train_step(&small, 0, 1.0).unwrap();
    assert!(be.step_loss().unwrap().total() > 0.0);
}

#[test]
fn emulator_refuses_gemms_outside_their_buffers_and_reports_deadlocks() {
    // The emulator's own checks (a GPU would not say).
    {
        let mut d = Dev::on("emulated");
        let (a, b, c) = (d.put(&[1f32; 6]), d.put(&[1f32; 6]), d.put(&[0f32; 4]));
        let (Arg::Ptr(a), Arg::Ptr(b), Arg::Ptr(c)) = (a, b, c) else {
            unreachable!()
        };
        let g = Gemm {
            trans_a: false,
            trans_b: false,
            m: 2,
            n: 2,
            k: 3,
            alpha: 1.0,
            a,
            lda: 2,
            b,
            ldb: 3,
            beta: 0.0,
            c,
            ldc: 2,
        };
        d.d.gemm(&g).unwrap();
        let got: Vec<f32> = d.get(Arg::Ptr(c), 4);
        assert_eq!(got, vec![3.0; 4]);
        // One column too many for C (ldc 3): 3 + 2 elements past a 4-element buffer.
        let msg = d.d.gemm(&Gemm { ldc: 3, ..g }).unwrap_err().to_string();
        assert!(msg.contains("gemm C") && msg.contains("overrun"), "{msg}");
        let msg = d.d.gemm(&Gemm { lda: 1, ..g }).unwrap_err().to_string();
        assert!(msg.contains("lda"), "{msg}");
        // Half a block at a barrier, half gone: a deadlock error, not a hang.
        let out = d.put(&[0f32; 64]);
        let msg = d
            .run("planted_partial_barrier", [1, 1, 1], 64, &[out])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("deadlock") && msg.contains("planted_partial_barrier"),
            "{msg}"
        );
        // A launch with the wrong argument count is refused by the registry.
        let msg = d
            .run("planted_partial_barrier", [1, 1, 1], 64, &[out, out])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("takes 1 arguments"), "{msg}");
        // The emulator keeps working after an error.
        let (x, y) = (d.put(&[2f32; 256]), d.put(&[0f32; 256]));
        d.run("planted_with_sync", [1, 1, 1], 256, &[y, x]).unwrap();
        assert_eq!(d.get::<f32>(y, 256), vec![2.0; 256]);
    }
}

/// The pairwise sum of `pieces` on the host, through the gradient groups' own tree.
fn pairwise(pieces: &[Vec<f32>]) -> Vec<f32> {
    let mut sum = lightrnn_kernels::groups::PairwiseSum::default();
    let add = |a: &mut Vec<f32>, b: &Vec<f32>| {
        a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        Ok(())
    };
    for p in pieces {
        sum.push(p.clone(), add).unwrap();
    }
    sum.finish(add).unwrap()
}

/// A rank's collective on [`ThreadPeers`]: the fixed-order device all-reduce.
struct OnPeers(lightrnn_kernels::cuda::allreduce::ThreadPeers);

impl lightrnn_kernels::GradReduce for OnPeers {
    fn all_reduce_grads(&mut self, grads: lightrnn_kernels::GradsMut<'_>) -> Result<(), Error> {
        match grads {
            lightrnn_kernels::GradsMut::Device(d) => d.all_reduce(&mut self.0),
            lightrnn_kernels::GradsMut::Host(_) => panic!("a CUDA backend lent host memory"),
        }
    }
}

/// The fixed-order all-reduce gives every rank the pairwise sum of the ranks' buffers, bit
/// for bit, at sizes that do and do not divide by the world.
#[test]
fn emulator_ranks_device_all_reduce_is_the_pairwise_sum_on_every_rank() {
    use lightrnn_kernels::cuda::allreduce::ThreadPeers;
    let dims = ModelDims::square(60, 4, 6, 1).unwrap();
    let cfg = ModelConfig {
        dims,
        dropout: 0.0,
        seed: 3,
    };
    for world in [1usize, 2, 3, 5] {
        let peers = ThreadPeers::group(world, std::time::Duration::from_secs(30));
        let results: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
            let handles: Vec<_> = peers
                .into_iter()
                .enumerate()
                .map(|(r, p)| {
                    s.spawn(move || {
                        let mut be = CudaBackend::emulated(&cfg, GIB).unwrap();
                        // A different gradient on every rank.
                        let toks = tokens(r as u64, 3, 2, 60);
                        let batch = Batch {
                            inputs: &toks[..6],
                            targets: &toks[2..],
                            steps: 3,
                            batch: 2,
                            stream: Stream::Train(0),
                        };
                        be.train_step(&batch, 0, 1.0).unwrap();
                        let mine = be.grads().unwrap();
                        be.all_reduce_grads(&mut OnPeers(p)).unwrap();
                        (mine, be.grads().unwrap())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mine: Vec<Vec<f32>> = results.iter().map(|r| r.0.clone()).collect();
        let want = pairwise(&mine);
        for (r, (_, got)) in results.iter().enumerate() {
            assert_eq!(got, &want, "world {world}, rank {r}");
        }
    }
}

/// A loss-table pass ended on the device with a reduce-scatter gives each rank its run
/// of whole words of the ranks' pairwise-summed tables, bit for bit, the runs covering
/// the pass's words once; every rank keeps its own counts of all of them. Word counts
/// that do and do not divide by the world, and a world with more ranks than words.
#[test]
fn emulator_ranks_scattered_loss_table_pass_gives_each_rank_its_words_of_the_summed_tables() {
    use lightrnn_kernels::cuda::allreduce::ThreadPeers;
    let dims = ModelDims::square(150, 6, 8, 1).unwrap();
    let cfg = ModelConfig {
        dims,
        dropout: 0.0,
        seed: 11,
    };
    let (rr, cc) = (dims.rows, dims.cols);
    let (t, b) = (4usize, 3usize);
    for (world, words) in [(1usize, 0..150), (2, 20..120), (3, 20..120), (4, 0..3)] {
        let peers = ThreadPeers::group(world, std::time::Duration::from_secs(30));
        let got: Vec<(LossTables, lightrnn_kernels::ScatteredTables)> = std::thread::scope(|s| {
            let hs: Vec<_> = peers
                .into_iter()
                .enumerate()
                .map(|(r, mut p)| {
                    let words = words.clone();
                    s.spawn(move || {
                        let mut be = CudaBackend::emulated(&cfg, GIB).unwrap();
                        let toks = tokens(300 + r as u64, t, b, 150);
                        let pass = |be: &mut CudaBackend| {
                            be.begin_loss_tables(words.clone(), 1 << 30).unwrap();
                            be.reset_state(Stream::Tables);
                            be.accumulate_loss_tables(&Batch {
                                inputs: &toks[..t * b],
                                targets: &toks[b..],
                                steps: t,
                                batch: b,
                                stream: Stream::Tables,
                            })
                            .unwrap();
                        };
                        pass(&mut be);
                        let whole = be.take_loss_tables().unwrap();
                        pass(&mut be);
                        let scattered = be.take_loss_tables_scattered(&mut p).unwrap().unwrap();
                        assert!(be.take_loss_tables().is_err(), "the pass is ended");
                        (whole, scattered)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let n = words.len();
        let sum_r = pairwise(&got.iter().map(|g| g.0.lr.clone()).collect::<Vec<_>>());
        let sum_c = pairwise(&got.iter().map(|g| g.0.lc.clone()).collect::<Vec<_>>());
        let mut next = words.start;
        for (r, (whole, s)) in got.iter().enumerate() {
            let own = &s.own;
            let per = n.div_ceil(world);
            let start = (words.start + r * per).min(words.end);
            assert_eq!(own.words, start..(start + per).min(words.end), "rank {r}");
            assert_eq!(own.words.start, next, "rank {r}: the runs are consecutive");
            next = own.words.end;
            let (i, j) = (own.words.start - words.start, own.words.end - words.start);
            assert_eq!(
                own.lr,
                sum_r[i * rr..j * rr],
                "world {world}, rank {r}: rows"
            );
            assert_eq!(
                own.lc,
                sum_c[i * cc..j * cc],
                "world {world}, rank {r}: columns"
            );
            assert_eq!((own.vocab, own.rows, own.cols), (150, rr, cc));
            assert_eq!(s.counts, whole.counts);
            assert_eq!(own.counts, whole.counts[i..j]);
        }
        assert_eq!(next, words.end, "world {world}: the runs cover the pass");
        assert!(
            got.iter().any(|g| g.1.counts.iter().any(|&c| c > 0)),
            "the pass saw words"
        );
    }
    // The CPU backend's tables are in host memory: it declines and keeps the pass.
    let mut cpu = CpuBackend::new(&cfg, 1).unwrap();
    cpu.begin_loss_tables(0..150, 1 << 30).unwrap();
    let mut p = ThreadPeers::group(1, std::time::Duration::from_secs(5)).remove(0);
    assert!(cpu.take_loss_tables_scattered(&mut p).unwrap().is_none());
    assert_eq!(cpu.take_loss_tables().unwrap().words, 0..150);
}

/// With `grad_groups` fixed, W ranks holding G / W groups each end every step with the
/// parameters one rank holding all G groups computes, bit for bit (dropout keyed by
/// global stream, the groups' tree continued across the ranks by the fixed-order
/// all-reduce): the run does not depend on the GPU count.
#[test]
fn emulator_ranks_on_the_device_all_reduce_train_as_one_rank_with_all_the_groups() {
    use lightrnn_kernels::cuda::allreduce::ThreadPeers;
    let dims = ModelDims::square(120, 8, 10, 2).unwrap();
    let cfg = ModelConfig {
        dims,
        dropout: 0.2,
        seed: 5,
    };
    let (t, b, steps) = (4usize, 12usize, 3u64);
    let run = |world: usize, groups: usize| -> Vec<Vec<f32>> {
        let peers = ThreadPeers::group(world, std::time::Duration::from_secs(60));
        std::thread::scope(|s| {
            let handles: Vec<_> = peers
                .into_iter()
                .enumerate()
                .map(|(r, p)| {
                    s.spawn(move || {
                        let mut coll = OnPeers(p);
                        let mut be = CudaBackend::emulated(&cfg, GIB).unwrap();
                        let bl = b / world;
                        be.set_shard(Shard {
                            offset: r * bl,
                            global: b,
                            groups: groups / world,
                        })
                        .unwrap();
                        for step in 0..steps {
                            let all = tokens(200 + step, t, b, 120);
                            // This rank's streams: columns r * bl .. (r + 1) * bl.
                            let toks: Vec<u32> = all
                                .chunks(b)
                                .flat_map(|row| row[r * bl..(r + 1) * bl].iter().copied())
                                .collect();
                            let batch = Batch {
                                inputs: &toks[..t * bl],
                                targets: &toks[bl..],
                                steps: t,
                                batch: bl,
                                stream: Stream::Train(0),
                            };
                            be.train_step(&batch, step, 1.0 / (t * b) as f32).unwrap();
                            be.all_reduce_grads(&mut coll).unwrap();
                            be.clip_and_step(&Optimizer::Sgd, 1.0, 0.25).unwrap();
                        }
                        be.params().unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    };
    for (groups, worlds) in [(4usize, &[2usize, 4][..]), (6, &[3][..])] {
        let one = run(1, groups).remove(0);
        for &world in worlds {
            for (r, p) in run(world, groups).iter().enumerate() {
                assert!(
                    p == &one,
                    "{groups} groups on {world} ranks, rank {r}: parameters differ from one rank's"
                );
            }
        }
    }
}

/// Where `libnccl.so` loads (the GPU machines; `scripts/gpu-check.sh`), ids are created
/// without a GPU, each new; where it does not, the reason names the library.
#[test]
fn emulator_nccl_ids_are_created_without_a_gpu_or_the_library_is_named() {
    use lightrnn_kernels::cuda::{nccl, nccl_available, nccl_unique_id};
    if !nccl_available() {
        let e = nccl_unique_id().unwrap_err().to_string();
        assert!(e.contains("libnccl.so"), "{e}");
        println!("no libnccl.so here: {e}");
        return;
    }
    let (major, minor, patch) = nccl::version().unwrap();
    println!("NCCL {major}.{minor}.{patch}");
    assert!(major >= 2);
    let (a, b) = (nccl_unique_id().unwrap(), nccl_unique_id().unwrap());
    assert_eq!(a.len(), nccl::ID_BYTES);
    assert_ne!(a, b, "every id names a new group");
}

/// The clipping coefficient on the device is the host's `clip_coefficient` bit for bit
/// (in double, then to f32), and says not to update when the norm is not finite.
#[test]
fn clip_scale_is_the_host_coefficient() {
    for kind in kinds() {
        let mut d = Dev::on(kind);
        for (sum_sq, max_norm, lr) in [
            (4.0f64, 0.25f64, 20.0f64),
            (1e-14, 0.25, 20.0),
            (0.0, 5.0, 1.0),
            (123.456, 0.0, 0.5),
            (9.0, -1.0, 0.5),
            (f64::INFINITY, 0.25, 1.0),
            (f64::NAN, 0.25, 1.0),
        ] {
            let (sa, la, ma) = (d.put(&[sum_sq]), d.put(&[lr]), d.put(&[max_norm]));
            let (gs, k, apply) = (d.put(&[0f32]), d.put(&[0f32]), d.put(&[7u32]));
            d.run("clip_scale", [1, 1, 1], 1, &[sa, la, ma, gs, k, apply])
                .unwrap();
            let norm = sum_sq.sqrt();
            let c = optim::clip_coefficient(norm, max_norm);
            let what = format!("{kind}: sum of squares {sum_sq}, max norm {max_norm}");
            assert_eq!(
                d.get::<f32>(gs, 1)[0].to_bits(),
                (c as f32).to_bits(),
                "{what}"
            );
            assert_eq!(
                d.get::<f32>(k, 1)[0].to_bits(),
                ((-lr * c) as f32).to_bits(),
                "{what}"
            );
            assert_eq!(d.get::<u32>(apply, 1)[0], norm.is_finite() as u32, "{what}");
        }
    }
}

/// A backend for the step-shape tests: aligned sizes (n = m = 12, V = 300 gives R = C = 18,
/// padded on the device to 20), dropout, `groups` gradient groups.
fn shaped(kind: &str, groups: usize, graphs: bool) -> (CudaBackend, impl Fn(u64) -> Vec<u32>) {
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

fn batch_of(toks: &[u32], t: usize, b: usize) -> Batch<'_> {
    Batch {
        inputs: &toks[..t * b],
        targets: &toks[b..],
        steps: t,
        batch: b,
        stream: Stream::Train(0),
    }
}

/// A training step shaped for the card: after its shape's first step it waits for the
/// device once (the loss sums and the norm together), allocates and frees nothing, and
/// with CUDA graphs (plain launches the first time, captured the second) is one graph
/// launch and nothing else from the third on; every GEMM is aligned. The per-step
/// figures are printed (the launch count is what graphs save).
#[test]
fn a_training_step_waits_once_allocates_nothing_and_is_one_graph_launch() {
    for kind in kinds() {
        for groups in [1usize, 2] {
            for graphs in [false, true] {
                let (mut be, toks) = shaped(kind, groups, graphs);
                let rule = Optimizer::Adam {
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                };
                let mut per_step = Vec::new();
                for step in 0..5u64 {
                    let t = toks(step);
                    let before = be.counters();
                    be.train_step(&batch_of(&t, 5, 4), step, 0.05).unwrap();
                    let f = be.clip_and_step(&rule, 1e-3, 0.5).unwrap();
                    assert!(f.norm.is_finite() && f.loss.total() > 0.0);
                    per_step.push(be.counters().since(&before));
                }
                let what = format!("{kind}, {groups} groups, graphs {graphs}");
                for (k, c) in per_step.iter().enumerate().skip(1) {
                    assert_eq!(c.syncs, 1, "{what}: host waits per step: {c:?}");
                    if graphs && k == 1 {
                        assert_eq!(
                            (c.graphs_captured, c.graph_launches),
                            (1, 1),
                            "{what}: {c:?}"
                        );
                        continue;
                    }
                    assert_eq!(
                        (c.allocs, c.frees, c.host_allocs),
                        (0, 0, 0),
                        "{what}: {c:?}"
                    );
                    if graphs {
                        assert_eq!(c.graph_launches, 1, "{what}: {c:?}");
                        assert_eq!((c.launches, c.gemms, c.copies), (0, 0, 0), "{what}: {c:?}");
                    } else {
                        assert_eq!(c.graph_launches, 0, "{what}: {c:?}");
                        assert!(c.launches > 0 && c.gemms > 0, "{what}: {c:?}");
                    }
                }
                let all = be.counters();
                assert_eq!(
                    all.unaligned_gemms, 0,
                    "{what}: every GEMM aligned: {all:?}"
                );
                if graphs {
                    assert_eq!(all.graphs_captured, 1, "{what}: captured once: {all:?}");
                }
                println!("{what}: first step {:?}", per_step[0]);
                println!("{what}: each later step {:?}", per_step[4]);
            }
        }
    }
}

/// Sizes that are not multiples of 4 still train; their GEMMs are counted as unaligned
/// (what the backend warns about when it opens such a model).
#[test]
fn unaligned_sizes_train_and_are_counted() {
    let dims = ModelDims::square(300, 10, 14, 1).unwrap();
    let cfg = ModelConfig {
        dims,
        dropout: 0.0,
        seed: 9,
    };
    let mut be = CudaBackend::emulated(&cfg, GIB).unwrap();
    let t = tokens(1, 5, 3, 300);
    be.train_step(&batch_of(&t, 5, 3), 0, 0.1).unwrap();
    be.clip_and_step(&Optimizer::Sgd, 1.0, 0.25).unwrap();
    assert!(be.counters().unaligned_gemms > 0);
}

/// The whole step as graphs (each shape run plain once, then captured and replayed) gives
/// what plain launches compute, bit for bit, with everything that changes between steps
/// read from device memory: dropout masks of each step, a learning rate that changes
/// every step, Adam's bias corrections, two gradient groups, a stream reset (an epoch
/// boundary), an evaluation batch between steps (a new workspace: the graphs are captured
/// again), a shorter last batch, and a step whose norm is not finite (no update on either
/// path).
#[test]
fn graphs_replay_steps_as_plain_launches_bit_for_bit() {
    for kind in kinds() {
        let run = |graphs: bool| {
            let (mut be, toks) = shaped(kind, 2, graphs);
            let rule = Optimizer::Adam {
                beta1: 0.9,
                beta2: 0.99,
                eps: 1e-8,
            };
            let mut figures = Vec::new();
            for step in 0..16u64 {
                let t = toks(50 + step);
                let steps = if step == 15 { 3 } else { 5 };
                if step == 5 {
                    be.reset_state(Stream::Train(0));
                    be.reset_state(Stream::Train(1));
                }
                if step == 9 {
                    let e = tokens(99, 2, 3, 300);
                    be.reset_state(Stream::Eval);
                    let eval = Batch {
                        stream: Stream::Eval,
                        ..batch_of(&e, 2, 3)
                    };
                    figures.push((be.eval_batch(&eval).unwrap().total(), 0.0));
                }
                let mut b = batch_of(&t, steps, 4);
                b.targets = &t[4..(steps + 1) * 4];
                be.train_step(&b, step, 0.05).unwrap();
                let lr = 1e-3 * (1.0 + step as f64);
                let f = be.clip_and_step(&rule, lr, 0.5).unwrap();
                figures.push((f.loss.total(), f.norm));
            }
            // A step whose gradient is not finite applies no update.
            let mut p = be.params().unwrap();
            let before = p.clone();
            // Every logit of the row head reads its bias: the loss is not finite.
            let at = be.layout().specs[be.layout().heads()[1]].offset;
            p[at] = f32::NAN;
            be.set_params(&p).unwrap();
            let t = toks(77);
            be.train_step(&batch_of(&t, 5, 4), 10, 0.05).unwrap();
            let f = be.clip_and_step(&rule, 1e-3, 0.5).unwrap();
            let mut after = be.params().unwrap();
            assert!(!f.norm.is_finite() && after[at].is_nan(), "{kind}: {f:?}");
            after[at] = before[at];
            assert_eq!(after, before, "{kind}, graphs {graphs}: no update");
            let c = be.counters();
            (
                figures,
                be.params().unwrap(),
                be.optimizer_state().unwrap().unwrap(),
                c,
            )
        };
        let (fp, pp, op, cp) = run(false);
        let (fg, pg, og, cg) = run(true);
        assert_eq!(fp, fg, "{kind}: losses and norms");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&pp), bits(&pg), "{kind}: parameters");
        assert_eq!(op.updates, og.updates, "{kind}: updates counted alike");
        for ((_, a), (_, b)) in op.buffers.iter().zip(&og.buffers) {
            assert_eq!(bits(a), bits(b), "{kind}: optimizer state");
        }
        assert_eq!(cp.graph_launches, 0);
        assert!(
            cg.graph_launches >= 10 && cg.graphs_captured >= 2,
            "{kind}: {cg:?}"
        );
        println!("{kind}: plain {cp:?}\n{kind}: graphs {cg:?}");
    }
}

/// A loss-table batch allocates and frees nothing after the pass's first.
#[test]
fn a_loss_table_batch_allocates_nothing() {
    for kind in kinds() {
        let (mut be, toks) = shaped(kind, 1, true);
        be.begin_loss_tables(0..300, 1 << 30).unwrap();
        let mut per = Vec::new();
        for k in 0..3 {
            let t = toks(k);
            let before = be.counters();
            let b = Batch {
                stream: Stream::Tables,
                ..batch_of(&t, 5, 4)
            };
            be.accumulate_loss_tables(&b).unwrap();
            per.push(be.counters().since(&before));
        }
        for c in &per[1..] {
            assert_eq!((c.allocs, c.frees), (0, 0), "{kind}: {c:?}");
        }
        assert_eq!(
            be.take_loss_tables().unwrap().counts.iter().sum::<u64>(),
            60
        );
    }
}

/// The emulator runs queued work when the host waits, as a GPU's stream runs it while
/// the host goes on: a host that rewrites the page-locked source of an upload before
/// waiting uploads the new bytes, and a download read before the wait is not there yet.
#[test]
fn emulator_runs_queued_work_when_the_host_waits() {
    let d = Emulated::new(GIB);
    let mut host = d.alloc_host(16).unwrap();
    let dev = d.alloc(16).unwrap();
    host.slice_mut::<u32>(0, 4)
        .unwrap()
        .copy_from_slice(&[1, 2, 3, 4]);
    d.upload_async(dev.addr(), &host, 0, 16).unwrap();
    host.slice_mut::<u32>(0, 4).unwrap()[0] = 9; // too early: the copy has not run
    d.synchronize().unwrap();
    let mut back = [0u8; 16];
    d.download(dev.addr(), &mut back).unwrap();
    assert_eq!(&back[..4], &9u32.to_le_bytes());
    let out = d.alloc_host(16).unwrap();
    d.download_async(dev.addr(), &out, 0, 16).unwrap();
    assert_eq!(out.slice::<u32>(0, 4).unwrap(), &[0, 0, 0, 0], "not yet");
    d.synchronize().unwrap();
    assert_eq!(out.slice::<u32>(0, 4).unwrap(), &[9, 2, 3, 4]);
    let c = d.counters();
    assert_eq!((c.syncs, c.allocs, c.host_allocs), (3, 1, 2), "{c:?}");
}

/// Launches a GPU refuses, the emulator refuses: more than 1024 threads or 64 in z per
/// block, a grid beyond 65,535 in y, more threads than a kernel's `__launch_bounds__`,
/// more than 48 KB of static shared memory.
#[test]
fn emulator_refuses_launches_a_gpu_would_refuse() {
    let mut d = Dev::on("emulated");
    let out = d.put(&[0f32; 2048]);
    let launch = |grid: [u32; 3], block: [u32; 3], kernel: &'static str| {
        d.d.launch(&Launch {
            kernel,
            grid,
            block,
            args: &[out],
        })
        .and_then(|()| d.d.synchronize())
        .unwrap_err()
        .to_string()
    };
    for (grid, block, want) in [
        ([1, 1, 1], [1025, 1, 1], "1024 threads"),
        ([1, 1, 1], [1, 1, 65], "64 in z"),
        ([1, 65_536, 1], [32, 1, 1], "65,535"),
    ] {
        let msg = launch(grid, block, "planted_partial_barrier");
        assert!(msg.contains(want), "{msg}");
    }
    let msg = launch([1, 1, 1], [64, 1, 1], "planted_too_much_shared");
    assert!(
        msg.contains("static shared memory") && msg.contains("49156"),
        "{msg}"
    );
    // softmax_nll is built for 256 threads.
    let args = [
        out,
        out,
        out,
        out,
        Arg::U32(8),
        Arg::U32(8),
        out,
        Arg::U32(0),
    ];
    let msg = d
        .run("softmax_nll", [1, 1, 1], 512, &args)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("__launch_bounds__(256)"), "{msg}");
}

/// A capture refuses what stream capture refuses (an allocation, a wait, a synchronous
/// copy), a free inside it spoils it, and a graph replays its captured work each launch.
#[test]
fn emulator_capture_refuses_allocations_and_waits_and_replays() {
    let mut d = Dev::on("emulated");
    let (x, y) = (d.put(&[1f32; 8]), d.put(&[0f32; 8]));
    let spare = d.d.alloc(64).unwrap();
    d.d.begin_capture().unwrap();
    assert!(d.d.alloc(64).err().unwrap().to_string().contains("capture"));
    assert!(
        d.d.synchronize()
            .unwrap_err()
            .to_string()
            .contains("capture")
    );
    let mut host = [0u8; 4];
    assert!(d.d.download(spare.addr(), &mut host).is_err());
    d.d.launch(&Launch {
        kernel: "add_assign",
        grid: [1, 1, 1],
        block: [32, 1, 1],
        args: &[y, x, Arg::U64(8)],
    })
    .unwrap();
    let g = d.d.end_capture().unwrap();
    assert_eq!(g.nodes, 1);
    assert_eq!(
        d.get::<f32>(y, 8),
        vec![0.0; 8],
        "captured work does not run"
    );
    for k in 1..=3 {
        d.d.launch_graph(&g).unwrap();
        assert_eq!(d.get::<f32>(y, 8), vec![k as f32; 8]);
    }
    d.d.begin_capture().unwrap();
    drop(spare);
    let msg = d.d.end_capture().err().unwrap().to_string();
    assert!(msg.contains("a free"), "{msg}");
}

/// NCCL at world size 1 on GPU 0, in this process: a unique id, a communicator, the
/// fixed-order all-reduce of a training step's gradient (one rank's sum is its own
/// gradient, through the all-to-all, the pairwise adds and the all-gather on the device)
/// and the reduce-scatter of a loss-table pass, against the host's values. Needs a GPU and
/// `libnccl.so` (scripts/gpu-check.sh, tier 1); elsewhere it says why and passes, unless
/// `LIGHTRNN_REQUIRE_GPU=1`.
#[test]
fn nccl_at_world_size_one_sums_on_the_gpu() {
    use lightrnn_kernels::cuda::nccl::{self, Nccl};
    use lightrnn_kernels::cuda::{gpu_present, nccl_available, nccl_unique_id};
    if !kinds().contains(&"gpu") || !nccl_available() {
        let require = std::env::var("LIGHTRNN_REQUIRE_GPU").is_ok_and(|v| v == "1");
        assert!(
            !require || nccl_available(),
            "LIGHTRNN_REQUIRE_GPU=1 but no libnccl.so on the library path"
        );
        println!(
            "NCCL at world size 1: skipped (GPU {}, libnccl.so {})",
            gpu_present(),
            nccl_available()
        );
        return;
    }
    let (major, minor, patch) = nccl::version().unwrap();
    let t0 = std::time::Instant::now();
    let id = nccl_unique_id().unwrap();
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let comm = Nccl::join(&id, 0, 1, 0, std::time::Duration::from_secs(60), cancel).unwrap();
    println!(
        "NCCL {major}.{minor}.{patch}: communicator of 1 formed in {:?}",
        t0.elapsed()
    );
    struct Ring(Nccl);
    impl lightrnn_kernels::GradReduce for Ring {
        fn all_reduce_grads(&mut self, g: lightrnn_kernels::GradsMut<'_>) -> Result<(), Error> {
            match g {
                lightrnn_kernels::GradsMut::Device(d) => d.all_reduce(&mut self.0),
                lightrnn_kernels::GradsMut::Host(_) => panic!("host memory"),
            }
        }
    }
    let mut ring = Ring(comm);
    let dims = ModelDims::square(300, 12, 12, 2).unwrap();
    let cfg = ModelConfig {
        dims,
        dropout: 0.1,
        seed: 4,
    };
    let mut be = CudaBackend::with_precision(&cfg, 0, Precision::Fp32).unwrap();
    let t = tokens(5, 5, 4, 300);
    be.train_step(&batch_of(&t, 5, 4), 0, 0.05).unwrap();
    let mine = be.grads().unwrap();
    assert!(mine.iter().any(|&g| g != 0.0));
    be.all_reduce_grads(&mut ring).unwrap();
    assert_eq!(
        be.grads().unwrap(),
        mine,
        "a world of one sums to its own gradient"
    );
    let f = be.clip_and_step(&Optimizer::Sgd, 1.0, 0.25).unwrap();
    assert!(f.norm.is_finite());
    let pass = |be: &mut CudaBackend| {
        be.begin_loss_tables(0..300, 1 << 30).unwrap();
        be.reset_state(Stream::Tables);
        let b = Batch {
            stream: Stream::Tables,
            ..batch_of(&t, 5, 4)
        };
        be.accumulate_loss_tables(&b).unwrap();
    };
    pass(&mut be);
    let whole = be.take_loss_tables().unwrap();
    pass(&mut be);
    let s = be.take_loss_tables_scattered(&mut ring.0).unwrap().unwrap();
    assert_eq!(s.own.words, 0..300);
    assert_eq!(
        (s.own.lr, s.own.lc),
        (whole.lr, whole.lc),
        "the reduce-scatter of one rank"
    );
    println!(
        "NCCL at world size 1: all-reduce and reduce-scatter checked ({:?})",
        t0.elapsed()
    );
}
