//! Loss tables: the accumulation kernel (`tables.cu`) against host sums, the table pass
//! and evaluation against the CPU backend, a pass over a range of words, and a table
//! batch's allocations.

use crate::common::{Dev, batch_of, kinds, pair, rand, rand_ids, rel, shaped, tokens};
use lightrnn_kernels::cuda::layer::Arg;
use lightrnn_kernels::{Backend, Batch, LossTables, ModelConfig, ModelDims, Stream};

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
