//! Whole training steps against the CPU backend (dropout, layers, gradient groups,
//! shards), 200 steps of the `tiny` preset, and the step shaped for the card: its budget
//! of waits, allocations and launches, unaligned sizes, graphs against plain launches bit
//! for bit.

use crate::common::{GIB, batch_of, kinds, pair, rel, shaped, tokens};
use lightrnn_kernels::cuda::CudaBackend;
use lightrnn_kernels::optim::Optimizer;
use lightrnn_kernels::{Backend, Batch, ModelConfig, ModelDims, Shard, Stream};

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
