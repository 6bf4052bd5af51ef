//! `lightrnn sample`: text generated from a checkpoint, row first, then the column given
//! the row.

use std::io::Write;

use clap::Args;
use tokio::runtime::Handle;

use lightrnn_core::checkpoint;
use lightrnn_core::data::store::Location;
use lightrnn_worker::sample::{SampleOptions, sample, sample_into};

use crate::Result;
use crate::error::usage;

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
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub temperature: f64,
    /// Draw among the k most probable words only (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print one JSON line (the text with the settings and timings) at the end instead
    /// of streaming the text as it is drawn; at most JSON_MAX_WORDS words.
    #[arg(long)]
    pub json: bool,
}

/// The most words `--json` holds in memory before printing.
pub const JSON_MAX_WORDS: usize = 1_000_000;

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
    if !a.json {
        // The text goes out as it is drawn (constant memory; a signal or a reader
        // that goes away, as under `| head`, ends it); the closing line break is the
        // one that ends every command's output.
        let mut out = std::io::stdout().lock();
        let drawn = sample_into(&ck, &a.prompt, a.words, opts, &mut |piece| {
            out.write_all(piece.as_bytes())
                .and_then(|()| out.flush())
                .is_ok()
        })?;
        tracing::info!(words = drawn, seconds = t0.elapsed().as_secs_f64(), checkpoint = %ck.url, "sampled");
        return Ok(String::new());
    }
    if a.words > JSON_MAX_WORDS {
        return usage(format!(
            "--json holds the text in memory: at most {JSON_MAX_WORDS} words, not {}; \
             without --json the text streams in constant memory",
            a.words
        ));
    }
    let text = sample(&ck, &a.prompt, a.words, opts)?;
    Ok(serde_json::to_string(&serde_json::json!({
        "prompt": a.prompt, "text": text, "words": a.words, "temperature": a.temperature,
        "top_k": a.top_k, "seed": a.seed, "checkpoint": ck.url,
        "seconds": t0.elapsed().as_secs_f64(),
    }))?)
}
