//! `lightrnn bench`: training throughput on a seeded synthetic Zipf corpus (one JSON
//! line). `--vocab`, `--emb`, `--hidden` and `--batch` also take comma-separated lists:
//! every combination (the emb and hidden lists in pairs) is measured in this one process,
//! each as one JSON line on stdout as soon as it is done (a configuration that fails is a
//! line with its error, and the next one runs), then a summary line.

use std::io::Write;

use clap::Args;

use lightrnn_worker::train::bench::{BenchOptions, bench};

use super::backend_kind;
use crate::Result;
use crate::error::usage;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Vocabulary size, or a comma-separated list.
    #[arg(long, value_delimiter = ',', required = true)]
    pub vocab: Vec<usize>,
    /// Embedding size, or a list (paired with --hidden's).
    #[arg(long, value_delimiter = ',', required = true)]
    pub emb: Vec<usize>,
    /// Hidden size, or a list (one value serves every --emb).
    #[arg(long, value_delimiter = ',', required = true)]
    pub hidden: Vec<usize>,
    #[arg(long, default_value_t = 1)]
    pub layers: usize,
    /// Streams per batch, or a list.
    #[arg(long, value_delimiter = ',', default_value = "32")]
    pub batch: Vec<usize>,
    #[arg(long, default_value_t = 35)]
    pub bptt: usize,
    /// CPU threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 40)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f64,
    #[arg(long, default_value_t = 1111)]
    pub seed: u64,
    /// Zipf exponent of the synthetic corpus.
    #[arg(long, default_value_t = 1.0)]
    pub zipf: f64,
    #[arg(long, default_value = "sgd")]
    pub optimizer: String,
    /// Also measure this machine's f32 GEMM peak (adds ~1 s).
    #[arg(long)]
    pub gemm_peak: bool,
    #[arg(long, default_value = "auto")]
    pub backend: String,
    /// GEMM arithmetic of the CUDA backend: tf32 (tensor cores) or fp32.
    #[arg(long, default_value = "tf32")]
    pub precision: String,
    /// CUDA backend: capture each step as a CUDA graph (true) or plain launches (false).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub cuda_graphs: bool,
    /// Time each phase of the steps (`phases_s_per_step`); false: no clock is read.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub profile: bool,
    /// Keep every span of the timed steps as a trace does (`trace_spans`): its cost.
    #[arg(long)]
    pub trace: bool,
}

pub fn run(a: &BenchArgs) -> Result<String> {
    let base = BenchOptions {
        vocab: 0,
        emb: 0,
        hidden: 0,
        layers: a.layers,
        batch: 0,
        bptt: a.bptt,
        threads: a.threads,
        steps: a.steps.max(1),
        warmup: a.warmup,
        seed: a.seed,
        dropout: a.dropout,
        zipf: a.zipf,
        optimizer: a.optimizer.clone(),
        lr: 1.0,
        clip: 0.25,
        gemm_peak: a.gemm_peak,
        backend: backend_kind(&a.backend)?,
        precision: match a.precision.parse() {
            Ok(p) => p,
            Err(e) => return usage(e.to_string()),
        },
        cuda_graphs: a.cuda_graphs,
        profile: a.profile,
        trace: a.trace,
    };
    if base.zipf.is_nan() || base.zipf <= 0.0 {
        return usage("--zipf must be positive");
    }
    let sizes: Vec<(usize, usize)> = match (a.emb.len(), a.hidden.len()) {
        (_, 1) => a.emb.iter().map(|&e| (e, a.hidden[0])).collect(),
        (e, h) if e == h => a
            .emb
            .iter()
            .copied()
            .zip(a.hidden.iter().copied())
            .collect(),
        (e, h) => {
            return usage(format!(
                "--emb has {e} values and --hidden {h}: give as many, or one hidden size"
            ));
        }
    };
    let mut configs = Vec::new();
    for &vocab in &a.vocab {
        for &(emb, hidden) in &sizes {
            for &batch in &a.batch {
                configs.push(BenchOptions {
                    vocab,
                    emb,
                    hidden,
                    batch,
                    ..base.clone()
                });
            }
        }
    }
    if let [one] = &configs[..] {
        return Ok(serde_json::to_string(&bench(one)?)?);
    }
    let mut failed = 0;
    let t0 = std::time::Instant::now();
    for o in &configs {
        let line = match bench(o) {
            Ok(r) => serde_json::to_string(&r)?,
            Err(e) => {
                failed += 1;
                serde_json::json!({
                    "failed": {"vocab": o.vocab, "emb": o.emb, "hidden": o.hidden, "batch": o.batch},
                    "error": e.to_string(),
                })
                .to_string()
            }
        };
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}").and_then(|()| out.flush());
    }
    Ok(serde_json::json!({
        "configs": configs.len(), "failed": failed, "seconds": t0.elapsed().as_secs_f64(),
    })
    .to_string())
}
