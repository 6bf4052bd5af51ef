//! The update's kernels against the host: the fixed-order reductions (`reduce.cu`), the
//! optimizers and the clipping coefficient (`optim.cu`).

use crate::common::{Dev, kinds, rand, rel};
use lightrnn_kernels::cpu::simd;
use lightrnn_kernels::cuda::layer::Arg;
use lightrnn_kernels::optim::{self, Optimizer};

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
