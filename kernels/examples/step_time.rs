//! Quick timing of training steps on random tokens: step_time V n m L B T threads steps
use lightrnn_kernels::cpu::Batch;
use lightrnn_kernels::rng::{Philox, Purpose};
use lightrnn_kernels::{Backend, CpuBackend, ModelConfig, ModelDims, Optimizer};
fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().unwrap())
        .collect();
    let (v, n, m, l, b, t, th, steps) = (a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]);
    let dims = ModelDims::square(v, n, m, l).unwrap();
    let mut be = CpuBackend::new(&ModelConfig {
        dims,
        dropout: 0.0,
        seed: 1,
        threads: th,
    })
    .unwrap();
    let mut s = Philox::new(1, Purpose::Corpus).stream(0);
    let toks: Vec<u32> = (0..(t + 1) * b * (steps + 3))
        .map(|_| (s.next_f64().powi(4) * v as f64) as u32)
        .collect();
    let mut times = vec![];
    for k in 0..steps + 3 {
        let base = k * t * b;
        let batch = Batch {
            inputs: &toks[base..base + t * b],
            targets: &toks[base + b..base + b + t * b],
            steps: t,
            batch: b,
            stream: 0,
        };
        let t0 = std::time::Instant::now();
        be.input_forward(&batch, lightrnn_kernels::Pass::Train { step: k as u64 })
            .unwrap();
        let t1 = std::time::Instant::now();
        for layer in 0..l {
            be.lstm_forward(layer).unwrap();
        }
        let t2 = std::time::Instant::now();
        be.heads(Some(1.0 / (t * b) as f32)).unwrap();
        let t3 = std::time::Instant::now();
        for layer in (0..l).rev() {
            be.lstm_backward(layer).unwrap();
        }
        let t4 = std::time::Instant::now();
        let norm = be.grad_norm().unwrap();
        be.optimizer_step(
            &Optimizer::Sgd,
            1.0,
            lightrnn_kernels::optim::clip_coefficient(norm, 0.25),
        )
        .unwrap();
        let t5 = std::time::Instant::now();
        if k >= 3 {
            times.push(t0.elapsed().as_secs_f64());
            if k == 5 {
                eprintln!(
                    "input {:.4} fwd {:.4} heads {:.4} bwd {:.4} opt {:.4}",
                    (t1 - t0).as_secs_f64(),
                    (t2 - t1).as_secs_f64(),
                    (t3 - t2).as_secs_f64(),
                    (t4 - t3).as_secs_f64(),
                    (t5 - t4).as_secs_f64()
                );
            }
        }
    }
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    println!(
        "V={v} n={n} m={m} L={l} B={b} T={t} threads={th}: {:.4} s/step, {:.0} words/s",
        mean,
        (t * b) as f64 / mean
    );
}
