//! Loss-table accumulation: every row of a word seen once is a log-distribution, the
//! entries at the word's own cell add up to the batch loss, and f32/f64 and thread counts
//! agree.

use lightrnn_kernels::cpu::Engine;
use lightrnn_kernels::{Batch, Pass, Stream};
use lightrnn_kernels::{LossTables, ModelDims};

fn tables_for(
    threads: usize,
    inputs: &[u32],
    targets: &[u32],
    t: usize,
    b: usize,
) -> (LossTables, f64) {
    let dims = ModelDims::square(40, 6, 10, 2).unwrap();
    let mut e = Engine::<f64>::new(dims, 0.3, 5, threads).unwrap();
    let mut tables = LossTables::new(&dims, 1 << 30).unwrap();
    let batch = Batch {
        inputs,
        targets,
        steps: t,
        batch: b,
        stream: Stream::Train(0),
    };
    e.input_forward(&batch, Pass::Eval).unwrap();
    for l in 0..2 {
        e.lstm_forward(l).unwrap();
    }
    let loss = e.accumulate_loss_tables(&mut tables).unwrap();
    // The allocation the tables were measured under.
    let cells = e.allocation().to_vec();
    let own: f64 = targets
        .iter()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .map(|&w| {
            let (i, j) = (
                cells[w as usize] as usize / dims.cols,
                cells[w as usize] as usize % dims.cols,
            );
            tables.lr[w as usize * dims.rows + i] as f64
                + tables.lc[w as usize * dims.cols + j] as f64
        })
        .sum();
    assert!(
        (own - loss.total()).abs() < 1e-4 * loss.total(),
        "{own} vs {}",
        loss.total()
    );
    (tables, loss.total())
}

#[test]
fn rows_are_log_distributions_and_own_cells_give_the_loss() {
    let (t, b) = (4, 5);
    let inputs: Vec<u32> = (0..(t * b) as u32).map(|i| (i * 7) % 40).collect();
    // Twenty distinct targets: each word's rows come from one position.
    let targets: Vec<u32> = (0..(t * b) as u32).map(|i| (i * 3 + 1) % 40).collect();
    let (tab, _) = tables_for(1, &inputs, &targets, t, b);
    for &w in &targets {
        let w = w as usize;
        let sr: f64 = tab.lr[w * tab.rows..(w + 1) * tab.rows]
            .iter()
            .map(|&x| (-(x as f64)).exp())
            .sum();
        let sc: f64 = tab.lc[w * tab.cols..(w + 1) * tab.cols]
            .iter()
            .map(|&x| (-(x as f64)).exp())
            .sum();
        assert!(
            (sr - 1.0).abs() < 1e-6 && (sc - 1.0).abs() < 1e-6,
            "word {w}: {sr} {sc}"
        );
        assert_eq!(tab.counts[w], 1);
    }
    // Words never seen as targets have empty rows.
    let unseen = (0..40u32).find(|w| !targets.contains(w)).unwrap() as usize;
    assert!(
        tab.lr[unseen * tab.rows..(unseen + 1) * tab.rows]
            .iter()
            .all(|&x| x == 0.0)
    );
}

#[test]
fn repeated_words_sum_and_threads_agree() {
    let (t, b) = (6, 4);
    let inputs: Vec<u32> = (0..(t * b) as u32).map(|i| (i * 11) % 40).collect();
    let targets: Vec<u32> = (0..(t * b) as u32).map(|i| i % 5).collect(); // 5 words, ~5 times each
    let (a, la) = tables_for(1, &inputs, &targets, t, b);
    let (c, lc) = tables_for(3, &inputs, &targets, t, b);
    assert_eq!(la, lc);
    assert_eq!(a, c);
    assert_eq!(a.counts[..5].iter().sum::<u64>(), (t * b) as u64);
}
