//! `lightrnn eval`: perplexity of a checkpoint on a text file.

use serde::Serialize;
use tokio::runtime::Handle;

use lightrnn_kernels::{BackendKind, BackendOptions, ModelConfig, open_backend};

use crate::checkpoint::Checkpoint;
use crate::shards::SplitReader;
use crate::store::Location;
use crate::text::LineReader;
use crate::train::evaluate;
use crate::{Error, Result};

#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub ppl: f64,
    pub loss: f64,
    pub words: u64,
}

/// Split "dir/name" (a path or URL) into its location and object name.
pub fn split_object(s: &str) -> Result<(Location, String)> {
    let (dir, name) = s.rsplit_once('/').unwrap_or((".", s));
    if name.is_empty() {
        return Err(Error::Config(format!("{s}: names a directory, not a file")));
    }
    let dir = if dir.is_empty() { "/" } else { dir };
    Ok((Location::parse(dir)?, name.to_string()))
}

/// Tokenise `file` with the checkpoint's vocabulary and evaluate it with `batch` streams.
pub fn eval_file(
    ck: &Checkpoint,
    file: &str,
    batch: Option<usize>,
    threads: usize,
    backend: BackendKind,
    handle: &Handle,
) -> Result<EvalReport> {
    let cfg = &ck.meta.config;
    let (loc, name) = split_object(file)?;
    let ids = handle.block_on(async {
        let mut r = LineReader::open(&loc, &name, &cfg.text_options()).await?;
        let mut ids = Vec::new();
        let mut line = String::new();
        while r.next_line(&mut line).await? {
            ids.extend(line.split_whitespace().map(|w| ck.vocab.id(w)));
            ids.push(ck.vocab.eos());
        }
        Ok::<_, Error>(ids)
    })?;
    let split = SplitReader::in_memory(&name, ids, &ck.vocab)?;
    let mcfg = ModelConfig {
        dims: ck.meta.dims,
        dropout: 0.0,
        seed: ck.meta.rng_seed,
    };
    let mut be = open_backend(&BackendOptions::new(backend, threads), &mcfg)?;
    be.set_params(&ck.params)?;
    be.set_allocation(&ck.cells)?;
    let b = batch.unwrap_or(cfg.eval_batch);
    let (loss, words) = evaluate(
        &mut *be,
        &split,
        b,
        cfg.bptt,
        handle,
        &mut crate::collective::Single,
    )?;
    Ok(EvalReport {
        ppl: loss.exp(),
        loss,
        words,
    })
}
