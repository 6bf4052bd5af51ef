//! Generation draws words from the factored distribution P_r(r) P_c(c | r) over the
//! occupied cells of the table: empirical frequencies match the probabilities, top-k
//! keeps exactly the k most probable words, and a seed fixes the text.

use lightrnn_core::checkpoint;
use lightrnn_core::config::TrainConfig;
use lightrnn_core::data::store::Location;
use lightrnn_tests::runtime;
use lightrnn_worker::sample::{SampleOptions, Sampler, sample};
use lightrnn_worker::train::{RunOptions, train};

fn trained() -> checkpoint::Checkpoint {
    let rt = runtime();
    let data = Location::parse("memory://sample-tests/data").unwrap();
    // 8 classes x 4 words + <eos> + <unk> = 34 words: a 6 x 6 table with 2 empty cells.
    let lines = lightrnn_tests::corpus_lines(5, 800, 8, 4);
    lightrnn_tests::put_corpus(&rt, &data, "s", &lines);
    let cfg = TrainConfig::preset("tiny")
        .unwrap()
        .with_overrides(&["epochs=3".into()])
        .unwrap();
    let out = Location::parse("memory://sample-tests/run").unwrap();
    let opts = RunOptions {
        data,
        out: out.clone(),
        resume: false,
        checkpoint: None,
        backend: lightrnn_kernels::BackendKind::Cpu,
        progress: false,
        stop: None,
        report: None,
        open: None,
    };
    let handle = rt.handle().clone();
    std::thread::spawn(move || train(&cfg, &opts, &handle))
        .join()
        .unwrap()
        .unwrap();
    rt.block_on(checkpoint::resolve(&out)).unwrap()
}

#[test]
fn draws_follow_the_factored_distribution_and_top_k_keeps_the_best() {
    let ck = trained();
    let d = ck.meta.dims;
    assert!(d.rows * d.cols > d.vocab, "the test wants empty cells");
    for temperature in [1.0, 0.7] {
        let opts = SampleOptions {
            temperature,
            top_k: 0,
            seed: 3,
        };
        let mut s = Sampler::new(&ck, opts.clone()).unwrap();
        for w in ["c0w0", "c1w0"] {
            s.feed(ck.vocab.id(w));
        }
        let lp = s.word_log_probs();
        let total: f64 = lp.iter().map(|x| x.exp()).sum();
        assert!((total - 1.0).abs() < 1e-9, "{total}");
        let n = 40_000;
        let mut counts = vec![0usize; d.vocab];
        for _ in 0..n {
            counts[s.draw_word() as usize] += 1;
        }
        let mut tv = 0.0;
        for (w, &k) in counts.iter().enumerate() {
            let p = lp[w].exp();
            let f = k as f64 / n as f64;
            tv += (p - f).abs() / 2.0;
            let sd = (p * (1.0 - p) / n as f64).sqrt();
            assert!(
                (f - p).abs() <= 5.0 * sd + 1e-4,
                "T {temperature}: word {w}: drawn {f}, probability {p}"
            );
        }
        assert!(tv < 0.02, "T {temperature}: total variation {tv}");

        // Top-k: only the k most probable words, in proportion among themselves.
        let mut order: Vec<usize> = (0..d.vocab).collect();
        order.sort_by(|&a, &b| lp[b].total_cmp(&lp[a]));
        for k in [1, 3] {
            let mut s = Sampler::new(
                &ck,
                SampleOptions {
                    top_k: k,
                    ..opts.clone()
                },
            )
            .unwrap();
            for w in ["c0w0", "c1w0"] {
                s.feed(ck.vocab.id(w));
            }
            let allowed = &order[..k];
            let mut seen = vec![0usize; d.vocab];
            for _ in 0..2000 {
                let w = s.draw_word() as usize;
                assert!(
                    allowed.contains(&w),
                    "top-{k} drew word {w}, not in {allowed:?}"
                );
                seen[w] += 1;
            }
            if k == 3 {
                let z: f64 = allowed.iter().map(|&w| lp[w].exp()).sum();
                for &w in allowed {
                    let p = lp[w].exp() / z;
                    let f = seen[w] as f64 / 2000.0;
                    let sd = (p * (1.0 - p) / 2000.0).sqrt();
                    assert!(
                        (f - p).abs() <= 5.0 * sd + 1e-3,
                        "top-3 word {w}: {f} vs {p}"
                    );
                }
            }
        }
    }
    // A seed fixes the text; another seed changes it.
    let opts = |seed| SampleOptions {
        temperature: 1.0,
        top_k: 0,
        seed,
    };
    let a = sample(&ck, "c0w0 c1w0", 60, opts(1)).unwrap();
    assert_eq!(a, sample(&ck, "c0w0 c1w0", 60, opts(1)).unwrap());
    assert_ne!(a, sample(&ck, "c0w0 c1w0", 60, opts(2)).unwrap());
    assert!(a.split_whitespace().count() >= 30, "{a:?}");
    assert!(
        Sampler::new(
            &ck,
            SampleOptions {
                temperature: 0.0,
                ..opts(1)
            }
        )
        .is_err()
    );
}
