//! Single-stream inference (generation, scoring) is the evaluation pass, step by step:
//! the row and column losses of a word sequence agree with the backend's evaluation of the
//! same sequence as one batch of one stream.

use lightrnn_kernels::cpu::infer::{Head, Input, Stepper};
use lightrnn_kernels::rng::{Philox, Purpose};
use lightrnn_kernels::{Backend, Batch, CpuBackend, ModelConfig, ModelDims, Stream};

fn nll(logits: &[f32], target: usize) -> f64 {
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let z: f64 = logits.iter().map(|&x| (x as f64 - m).exp()).sum();
    m + z.ln() - logits[target] as f64
}

#[test]
fn stepwise_losses_equal_the_evaluation_pass() {
    // m = 13: a partial gate block; two layers; a table with empty cells.
    let dims = ModelDims::square(47, 6, 13, 2).unwrap();
    for threads in [1, 2] {
        let be = &mut CpuBackend::new(
            &ModelConfig {
                dims,
                dropout: 0.3,
                seed: 11,
            },
            threads,
        )
        .unwrap();
        let t = 9;
        let mut s = Philox::new(4, Purpose::Other).stream(0);
        let words: Vec<u32> = (0..=t).map(|_| s.below(47) as u32).collect();
        let batch = Batch {
            inputs: &words[..t],
            targets: &words[1..],
            steps: t,
            batch: 1,
            stream: Stream::Eval,
        };
        let want = be.eval_batch(&batch).unwrap();

        let st = Stepper::new(dims, &be.params().unwrap()).unwrap();
        let cells = be.allocation().unwrap();
        let (rr, cc) = (
            |w: u32| cells[w as usize] as usize / dims.cols,
            |w: u32| cells[w as usize] as usize % dims.cols,
        );
        let (mut row, mut col) = (0.0, 0.0);
        let mut state = st.zero_state();
        for k in 0..t {
            let (x, y) = (words[k], words[k + 1]);
            state = st.step(&state, Input::Col(cc(x)));
            row += nll(&st.logits(&state, Head::Rows), rr(y));
            state = st.step(&state, Input::Row(rr(y)));
            col += nll(&st.logits(&state, Head::Cols), cc(y));
        }
        assert!(
            (row - want.row).abs() <= 1e-5 * want.row,
            "threads {threads}: rows {row} vs {}",
            want.row
        );
        assert!(
            (col - want.col).abs() <= 1e-5 * want.col,
            "threads {threads}: columns {col} vs {}",
            want.col
        );
        assert_eq!(want.words, t as u64);
    }
    assert!(Stepper::new(dims, &[0.0; 3]).is_err());
}
