//! Data parallelism at the kernel level: two engines that each hold half of the streams
//! (declared with `set_shard`) draw the dropout masks of the whole batch, so their losses
//! add up to the whole-batch engine's and their gradients sum to its gradient.

use lightrnn_kernels::ModelDims;
use lightrnn_kernels::cpu::Engine;
use lightrnn_kernels::rng::{Philox, Purpose};
use lightrnn_kernels::{Batch, Pass, Stream};

#[test]
fn two_half_batches_with_shards_equal_the_whole_batch_under_dropout() {
    let dims = ModelDims::square(50, 6, 7, 2).unwrap();
    let (t, b) = (5usize, 4usize);
    let mut s = Philox::new(9, Purpose::Other).stream(0);
    // [t + 1, b] time-major word ids.
    let ids: Vec<u32> = (0..(t + 1) * b)
        .map(|_| (s.next_f64() * 50.0) as u32 % 50)
        .collect();
    let column = |lo: usize, hi: usize| -> Vec<u32> {
        (0..=t)
            .flat_map(|k| ids[k * b + lo..k * b + hi].to_vec())
            .collect()
    };
    let run = |e: &mut Engine<f64>, buf: &[u32], bb: usize, scale: f64| -> (f64, Vec<f64>) {
        let batch = Batch {
            inputs: &buf[..t * bb],
            targets: &buf[bb..],
            steps: t,
            batch: bb,
            stream: Stream::Train(0),
        };
        e.input_forward(&batch, Pass::Train { step: 3 }).unwrap();
        for l in 0..2 {
            e.lstm_forward(l).unwrap();
        }
        let loss = e.heads(Some(scale)).unwrap();
        for l in (0..2).rev() {
            e.lstm_backward(l).unwrap();
        }
        (loss.total(), e.grads_torch())
    };
    let scale = 1.0 / (t * b) as f64;
    let mut whole = Engine::<f64>::new(dims, 0.4, 5, 1).unwrap();
    let (lw, gw) = run(&mut whole, &ids, b, scale);
    let mut sum_l = 0.0;
    let mut sum_g = vec![0.0; gw.len()];
    for (lo, hi) in [(0, 2), (2, 4)] {
        let mut e = Engine::<f64>::new(dims, 0.4, 5, 2).unwrap();
        e.set_shard(Some((lo, b))).unwrap();
        let (l, g) = run(&mut e, &column(lo, hi), hi - lo, scale);
        sum_l += l;
        for (a, x) in sum_g.iter_mut().zip(g) {
            *a += x;
        }
    }
    assert!((sum_l - lw).abs() <= 1e-10 * lw.abs(), "{sum_l} vs {lw}");
    let worst = gw
        .iter()
        .zip(&sum_g)
        .map(|(a, b)| (a - b).abs() / (1e-8 + a.abs()))
        .fold(0.0, f64::max);
    assert!(worst < 1e-8, "gradients differ by {worst:e} relative");
    // Without the shard declaration the half batches would draw other masks.
    let mut e = Engine::<f64>::new(dims, 0.4, 5, 1).unwrap();
    let (l1, _) = run(&mut e, &column(2, 4), 2, scale);
    let mut e = Engine::<f64>::new(dims, 0.4, 5, 1).unwrap();
    e.set_shard(Some((2, b))).unwrap();
    let (l2, _) = run(&mut e, &column(2, 4), 2, scale);
    assert_ne!(l1, l2);
}
