//! Finite-difference gradient checks (float64): the LSTM cell and the fused softmax + NLL
//! kernels on their own, then every parameter tensor of whole models that exercise each
//! layer and code path (layer-0 table mode and dense mode with input dropout, dropout
//! between layers and on the top output, hidden sizes that are not a multiple of the gate
//! block, more threads than gate blocks, a non-zero carried state).

use lightrnn_kernels::cpu::{Engine, simd};
use lightrnn_kernels::rng::{Philox, Purpose};
use lightrnn_kernels::{Backend, CpuBackend, ModelConfig, ModelDims};
use lightrnn_kernels::{Batch, Pass, State, Stream};

fn randn(seed: u64, n: usize, scale: f64) -> Vec<f64> {
    let mut s = Philox::new(seed, Purpose::Other).stream(0);
    (0..n).map(|_| (2.0 * s.next_f64() - 1.0) * scale).collect()
}

fn close(fd: f64, an: f64, what: &str) {
    let tol = 1e-7 + 2e-6 * an.abs().max(fd.abs());
    assert!(
        (fd - an).abs() <= tol,
        "{what}: finite difference {fd:.10e} vs analytic {an:.10e}"
    );
}

#[test]
fn lstm_cell_kernel_gradients() {
    let hidden = 13; // a full gate block and a partial one
    for units in [0..13usize, 8..13] {
        let nu = units.len();
        let g0 = randn(1, 4 * nu, 2.0);
        let bias = randn(2, 4 * nu, 0.5);
        let table = randn(3, 4 * nu, 0.5);
        let c_prev0 = randn(4, nu, 1.0);
        let (wh, wc) = (randn(5, nu, 1.0), randn(6, nu, 1.0));
        // L = sum wh*h + wc*c
        let f = |g_in: &[f64], cp: &[f64]| {
            let mut g = g_in.to_vec();
            let (mut c, mut tc, mut h) = (vec![0.0; nu], vec![0.0; nu], vec![0.0; nu]);
            simd::add_assign(&mut g, &table);
            simd::cell_forward(
                simd::Units {
                    hidden,
                    range: units.clone(),
                },
                &mut g,
                &bias,
                cp,
                &mut c,
                &mut tc,
                &mut h,
            );
            (0..nu).map(|u| wh[u] * h[u] + wc[u] * c[u]).sum::<f64>()
        };
        let mut a = g0.clone();
        let (mut c, mut tc, mut h) = (vec![0.0; nu], vec![0.0; nu], vec![0.0; nu]);
        simd::add_assign(&mut a, &table);
        simd::cell_forward(
            simd::Units {
                hidden,
                range: units.clone(),
            },
            &mut a,
            &bias,
            &c_prev0,
            &mut c,
            &mut tc,
            &mut h,
        );
        let mut dc = wc.clone();
        simd::cell_backward(
            simd::Units {
                hidden,
                range: units.clone(),
            },
            &mut a,
            &wh,
            &[],
            &c_prev0,
            &tc,
            &mut dc,
        );
        let eps = 1e-6;
        for i in 0..4 * nu {
            let (mut p, mut m) = (g0.clone(), g0.clone());
            p[i] += eps;
            m[i] -= eps;
            close(
                (f(&p, &c_prev0) - f(&m, &c_prev0)) / (2.0 * eps),
                a[i],
                &format!("dG[{i}]"),
            );
        }
        for u in 0..nu {
            let (mut p, mut m) = (c_prev0.clone(), c_prev0.clone());
            p[u] += eps;
            m[u] -= eps;
            close(
                (f(&g0, &p) - f(&g0, &m)) / (2.0 * eps),
                dc[u],
                &format!("dc_prev[{u}]"),
            );
        }
    }
}

#[test]
fn softmax_nll_kernel_gradients() {
    let (rows, width) = (3, 7);
    let z0 = randn(7, rows * width, 3.0);
    let b0 = randn(8, width, 1.0);
    let targets = [6u32, 0, 3];
    let f = |z: &[f64], b: &[f64]| {
        simd::softmax_nll(&mut z.to_vec(), width, b, &targets, None, &mut [])
    };
    let mut dz = z0.clone();
    simd::softmax_nll(&mut dz, width, &b0, &targets, Some(1.0), &mut []);
    let eps = 1e-6;
    for i in 0..rows * width {
        let (mut p, mut m) = (z0.clone(), z0.clone());
        p[i] += eps;
        m[i] -= eps;
        close(
            (f(&p, &b0) - f(&m, &b0)) / (2.0 * eps),
            dz[i],
            &format!("dz[{i}]"),
        );
    }
    for j in 0..width {
        let (mut p, mut m) = (b0.clone(), b0.clone());
        p[j] += eps;
        m[j] -= eps;
        let db: f64 = (0..rows).map(|r| dz[r * width + j]).sum();
        close(
            (f(&z0, &p) - f(&z0, &m)) / (2.0 * eps),
            db,
            &format!("db[{j}]"),
        );
    }
}

struct Case {
    dims: ModelDims,
    dropout: f64,
    threads: usize,
    t: usize,
    b: usize,
}

/// Summed NLL of one training batch (fixed dropout masks: step 5), from a fixed state.
fn loss_and_grads(
    e: &mut Engine<f64>,
    case: &Case,
    x: &[u32],
    y: &[u32],
    state: &State<f64>,
    grads: bool,
) -> f64 {
    e.set_state(Stream::Train(0), state.clone()).unwrap();
    let batch = Batch {
        inputs: x,
        targets: y,
        steps: case.t,
        batch: case.b,
        stream: Stream::Train(0),
    };
    e.input_forward(&batch, Pass::Train { step: 5 }).unwrap();
    for l in 0..case.dims.layers {
        e.lstm_forward(l).unwrap();
    }
    let loss = e.heads(if grads { Some(1.0) } else { None }).unwrap();
    if grads {
        for l in (0..case.dims.layers).rev() {
            e.lstm_backward(l).unwrap();
        }
    }
    loss.total()
}

fn check_model(case: Case) {
    let d = case.dims;
    let mut e = Engine::<f64>::new(d, case.dropout, 11, case.threads).unwrap();
    // Larger weights than the default init, so every path carries signal.
    let p0 = randn(21, e.layout().total, 0.4);
    e.set_params_torch(&p0).unwrap();
    let n_state = d.layers * case.b * d.hidden;
    let state = State {
        batch: case.b,
        h: randn(22, n_state, 0.5),
        c: randn(23, n_state, 0.5),
    };
    let mut s = Philox::new(24, Purpose::Other).stream(0);
    let x: Vec<u32> = (0..case.t * case.b)
        .map(|_| s.below(d.vocab as u64) as u32)
        .collect();
    let y: Vec<u32> = (0..case.t * case.b)
        .map(|_| s.below(d.vocab as u64) as u32)
        .collect();
    loss_and_grads(&mut e, &case, &x, &y, &state, true);
    let grads = e.grads_torch();
    let layout = e.layout().clone();
    let eps = 1e-6;
    for spec in &layout.specs {
        // Up to 12 elements per tensor: the ends and a spread in between.
        let n = spec.len();
        let picks: Vec<usize> = (0..12.min(n))
            .map(|k| {
                if k == 0 {
                    0
                } else if k == 1 {
                    n - 1
                } else {
                    (k * 7919) % n
                }
            })
            .collect();
        for i in picks {
            let at = spec.offset + i;
            let mut p = p0.clone();
            p[at] += eps;
            e.set_params_torch(&p).unwrap();
            let up = loss_and_grads(&mut e, &case, &x, &y, &state, false);
            p[at] -= 2.0 * eps;
            e.set_params_torch(&p).unwrap();
            let down = loss_and_grads(&mut e, &case, &x, &y, &state, false);
            close(
                (up - down) / (2.0 * eps),
                grads[at],
                &format!("{}[{i}]", spec.name),
            );
        }
    }
}

#[test]
fn one_layer_table_mode() {
    let dims = ModelDims::square(30, 6, 8, 1).unwrap();
    check_model(Case {
        dims,
        dropout: 0.0,
        threads: 1,
        t: 4,
        b: 3,
    });
}

#[test]
fn three_layers_with_dropout_partial_blocks_two_threads() {
    let dims = ModelDims::square(40, 7, 13, 3).unwrap();
    check_model(Case {
        dims,
        dropout: 0.3,
        threads: 2,
        t: 3,
        b: 2,
    });
}

#[test]
fn two_layers_more_threads_than_gate_blocks() {
    let dims = ModelDims::square(20, 5, 13, 2).unwrap();
    check_model(Case {
        dims,
        dropout: 0.0,
        threads: 3,
        t: 2,
        b: 3,
    });
}

#[test]
fn rectangular_table_and_single_step() {
    let dims = ModelDims {
        vocab: 23,
        rows: 4,
        cols: 7,
        emb: 3,
        hidden: 9,
        layers: 2,
    };
    check_model(Case {
        dims,
        dropout: 0.1,
        threads: 2,
        t: 1,
        b: 1,
    });
}

/// An f32 backend against the f64 engine on a mid-sized model (dropout on and off).
fn track_f64_engine(open: impl Fn(&ModelConfig) -> Box<dyn Backend>) {
    let dims = ModelDims::square(1000, 32, 40, 2).unwrap();
    let (t, b) = (6, 5);
    for dropout in [0.0, 0.25] {
        let mut e = Engine::<f64>::new(dims, dropout, 3, 2).unwrap();
        let mut be = open(&ModelConfig {
            dims,
            dropout,
            seed: 3,
        });
        let p = e.params_torch();
        be.set_params(&p.iter().map(|&v| v as f32).collect::<Vec<_>>())
            .unwrap();
        let mut s = Philox::new(9, Purpose::Other).stream(0);
        let toks: Vec<u32> = (0..(t + 1) * b).map(|_| s.below(1000) as u32).collect();
        let (x, y) = (&toks[..t * b], &toks[b..]);
        let batch = Batch {
            inputs: x,
            targets: y,
            steps: t,
            batch: b,
            stream: Stream::Train(0),
        };
        let l64 = {
            e.input_forward(&batch, Pass::Train { step: 2 }).unwrap();
            for l in 0..2 {
                e.lstm_forward(l).unwrap();
            }
            let loss = e.heads(Some(1.0 / 30.0)).unwrap();
            for l in (0..2).rev() {
                e.lstm_backward(l).unwrap();
            }
            loss.total()
        };
        be.train_step(&batch, 2, 1.0 / 30.0).unwrap();
        let l32 = be.step_loss().unwrap().total();
        assert!(
            (l32 - l64).abs() / l64 < 1e-5,
            "dropout {dropout}: loss {l32} vs {l64}"
        );
        let (g64, g32) = (e.grads_torch(), be.grads().unwrap());
        for spec in &e.layout().specs {
            let r = spec.range();
            let scale = g64[r.clone()].iter().fold(0f64, |m, v| m.max(v.abs()));
            let err = g64[r.clone()]
                .iter()
                .zip(&g32[r])
                .fold(0f64, |m, (a, &b)| m.max((a - b as f64).abs()));
            assert!(
                err <= 1e-4 * scale,
                "dropout {dropout}: {} error {err} (scale {scale})",
                spec.name
            );
        }
    }
}

/// The CPU backend (SIMD exp, f32 GEMM).
#[test]
fn f32_backend_tracks_f64_engine() {
    track_f64_engine(|cfg| Box::new(CpuBackend::new(cfg, 2).unwrap()));
}

/// The CUDA backend on the emulated device (the .cu kernels, cuBLAS-semantics GEMMs).
#[cfg(feature = "cuda")]
#[test]
fn emulated_cuda_backend_tracks_f64_engine() {
    track_f64_engine(|cfg| {
        Box::new(lightrnn_kernels::cuda::CudaBackend::emulated(cfg, 1 << 30).unwrap())
    });
}
