//! `lightrnn eval`: the perplexity of a checkpoint on a text file.

use clap::Args;
use tokio::runtime::Handle;

use lightrnn_core::checkpoint;
use lightrnn_core::data::store::Location;
use lightrnn_worker::train::eval_file;

use super::backend_kind;
use crate::Result;
use crate::error::usage;

#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// A checkpoint directory, or a run directory (its newest checkpoint).
    #[arg(long)]
    pub checkpoint: String,
    /// Text file to score.
    #[arg(long)]
    pub data: String,
    /// Streams (default: the checkpoint's eval_batch).
    #[arg(long)]
    pub batch: Option<usize>,
    /// CPU threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[arg(long, default_value = "auto")]
    pub backend: String,
}

pub fn run(a: &EvalArgs, handle: &Handle) -> Result<String> {
    let backend = backend_kind(&a.backend)?;
    if a.batch == Some(0) {
        return usage("--batch must be positive");
    }
    let ck = handle.block_on(checkpoint::resolve(&Location::parse(&a.checkpoint)?))?;
    let r = eval_file(&ck, &a.data, a.batch, a.threads, backend, handle)?;
    Ok(serde_json::to_string(&r)?)
}
