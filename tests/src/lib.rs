//! Helpers of the integration tests: small structured corpora and a runtime.

use std::path::Path;

use lightrnn_kernels::rng::{Philox, Purpose};

/// A corpus with learnable structure: words belong to classes, a sentence follows a fixed
/// class pattern, words are drawn within a class with skewed frequencies. A model that
/// learns beats the unigram perplexity by a wide margin.
pub fn corpus_lines(seed: u64, lines: usize, classes: usize, per_class: usize) -> Vec<String> {
    let mut rng = Philox::new(seed, Purpose::Corpus).stream(0);
    let patterns: Vec<Vec<usize>> = (0..6)
        .map(|_| {
            (0..3 + rng.below(8) as usize)
                .map(|_| rng.below(classes as u64) as usize)
                .collect()
        })
        .collect();
    (0..lines)
        .map(|_| {
            let p = &patterns[rng.below(patterns.len() as u64) as usize];
            p.iter()
                .map(|&c| {
                    // Skewed choice inside the class: index = floor(k * u^2).
                    let u = rng.next_f64();
                    let i = ((per_class as f64) * u * u) as usize;
                    format!("c{c}w{i}")
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// Write `x.train.txt`, `x.valid.txt`, `x.test.txt` into `dir`.
pub fn write_corpus(dir: &Path, seed: u64, train_lines: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let all = corpus_lines(seed, train_lines + train_lines / 5, 12, 30);
    let (train, rest) = all.split_at(train_lines);
    let (valid, test) = rest.split_at(rest.len() / 2);
    for (name, lines) in [
        ("x.train.txt", train),
        ("x.valid.txt", valid),
        ("x.test.txt", test),
    ] {
        std::fs::write(dir.join(name), lines.join("\n") + "\n").unwrap();
    }
}

/// A multi-thread runtime for I/O, as the binary uses.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Put `lines` (one text for all three splits) as `PREFIX.train.txt`, `PREFIX.valid.txt`
/// and `PREFIX.test.txt` under `data` (an object-store location, e.g. `memory://`).
pub fn put_corpus(
    rt: &tokio::runtime::Runtime,
    data: &lightrnn_core::data::store::Location,
    prefix: &str,
    lines: &[String],
) {
    let text = bytes::Bytes::from(lines.join("\n") + "\n");
    rt.block_on(async {
        for split in ["train", "valid", "test"] {
            data.put(&format!("{prefix}.{split}.txt"), text.clone())
                .await
                .unwrap();
        }
    });
}
