//! `lightrnn bench`: training throughput on a seeded synthetic Zipf corpus (one JSON
//! line).

use clap::Args;

use lightrnn_worker::train::bench::{BenchOptions, bench};

use super::backend_kind;
use crate::Result;
use crate::error::usage;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    #[arg(long)]
    pub vocab: usize,
    #[arg(long)]
    pub emb: usize,
    #[arg(long)]
    pub hidden: usize,
    #[arg(long, default_value_t = 1)]
    pub layers: usize,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
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
}

pub fn run(a: &BenchArgs) -> Result<String> {
    let o = BenchOptions {
        vocab: a.vocab,
        emb: a.emb,
        hidden: a.hidden,
        layers: a.layers,
        batch: a.batch,
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
    };
    if o.zipf.is_nan() || o.zipf <= 0.0 {
        return usage("--zipf must be positive");
    }
    Ok(serde_json::to_string(&bench(&o)?)?)
}
