//! `lightrnn sample`: text generated from a checkpoint, row first, then the column given
//! the row.

use clap::Args;
use tokio::runtime::Handle;

use lightrnn_worker::checkpoint;
use lightrnn_worker::data::store::Location;
use lightrnn_worker::sample::{SampleOptions, sample};

use crate::Result;

#[derive(Args, Debug, Clone)]
pub struct SampleArgs {
    /// A checkpoint, or a run directory (its best model when it has one, else its newest
    /// checkpoint).
    #[arg(long)]
    pub checkpoint: String,
    /// Words to continue (words outside the vocabulary read as <unk>).
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// Words to generate (<eos> ends a line).
    #[arg(long, default_value_t = 50)]
    pub words: usize,
    /// Softmax temperature of both factors (below 1: safer, above 1: wilder).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Draw among the k most probable words only (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

pub fn run(a: &SampleArgs, handle: &Handle) -> Result<String> {
    let loc = Location::parse(&a.checkpoint)?;
    // A run directory: its best model (what its test perplexity measured).
    let best = loc.join("best");
    let from = if handle.block_on(best.head("meta.json"))?.is_some() {
        best
    } else {
        loc
    };
    let ck = handle.block_on(checkpoint::resolve(&from))?;
    let opts = SampleOptions {
        temperature: a.temperature,
        top_k: a.top_k,
        seed: a.seed,
    };
    let t0 = std::time::Instant::now();
    let text = sample(&ck, &a.prompt, a.words, opts)?;
    Ok(serde_json::to_string(&serde_json::json!({
        "prompt": a.prompt, "text": text, "words": a.words, "temperature": a.temperature,
        "top_k": a.top_k, "seed": a.seed, "checkpoint": ck.url,
        "seconds": t0.elapsed().as_secs_f64(),
    }))?)
}
