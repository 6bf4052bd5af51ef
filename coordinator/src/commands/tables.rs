//! `lightrnn tables`: the loss tables of a checkpoint over its training split, as .npy
//! files (what `lightrnn allocate` reads).

use bytes::Bytes;
use clap::Args;
use tokio::runtime::Handle;

use lightrnn_alloc::Problem;
use lightrnn_kernels::{BackendKind, BackendOptions, ModelConfig, open_backend};
use lightrnn_worker::checkpoint::{self, Checkpoint};
use lightrnn_worker::data::dataset::{Dataset, PrepareOptions};
use lightrnn_worker::data::npy;
use lightrnn_worker::data::store::Location;

use crate::Result;
use crate::error::usage;

#[derive(Args, Debug, Clone)]
pub struct TablesArgs {
    /// A checkpoint, or a run directory (its newest checkpoint).
    #[arg(long)]
    pub checkpoint: String,
    /// The training data of the run (text directory or prepared dataset).
    #[arg(long)]
    pub data: String,
    /// Output directory: L_r.npy, L_c.npy, counts.npy, alloc.npy.
    #[arg(long)]
    pub out: String,
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

pub fn run(a: &TablesArgs, handle: &Handle) -> Result<String> {
    let ck = handle.block_on(checkpoint::resolve(&Location::parse(&a.checkpoint)?))?;
    Ok(tables_of(&ck, &a.data, &a.out, a.threads, handle)?.to_string())
}

/// The dataset a checkpoint was trained on, opened from `data` (prepared, or text to
/// tokenise into `cache`), checked against the checkpoint's vocabulary.
pub fn dataset_for(
    ck: &Checkpoint,
    data: &str,
    cache: &Location,
    handle: &Handle,
) -> Result<Dataset> {
    let cfg = &ck.meta.config;
    let prep = PrepareOptions {
        text: cfg.text_options(),
        vocab_size: cfg.vocab_size,
        shard_tokens: cfg.shard_tokens,
    };
    let ds = handle.block_on(Dataset::open_or_prepare(
        &Location::parse(data)?,
        cache,
        &prep,
    ))?;
    if ds.vocab.sha256() != ck.meta.vocab_sha256 {
        return usage(format!(
            "{data}: its vocabulary differs from the checkpoint's; pass the data the model was trained on"
        ));
    }
    Ok(ds)
}

/// `lightrnn tables`: loss tables of a checkpoint over its training split, as .npy files.
pub fn tables_of(
    ck: &Checkpoint,
    data: &str,
    out: &str,
    threads: usize,
    handle: &Handle,
) -> Result<serde_json::Value> {
    let t0 = std::time::Instant::now();
    let out = Location::parse(out)?;
    let ds = dataset_for(ck, data, &out.join("data"), handle)?;
    let cfg = &ck.meta.config;
    let mcfg = ModelConfig {
        dims: ck.meta.dims,
        dropout: 0.0,
        seed: ck.meta.rng_seed,
    };
    let mut be = open_backend(&BackendOptions::new(BackendKind::Auto, threads), &mcfg)?;
    be.set_params(&ck.params)?;
    be.set_allocation(&ck.cells)?;
    let max = (cfg.realloc_max_table_gib * (1u64 << 30) as f64) as u64;
    let (t, total, words) = lightrnn_worker::train::realloc::loss_tables(
        &mut *be,
        &ds.train,
        cfg.batch,
        0..cfg.batch,
        cfg.bptt,
        max,
        handle,
    )?;
    let loss = total / words.max(1) as f64;
    let d = ck.meta.dims;
    let counts: Vec<i64> = t.counts.iter().map(|&c| c as i64).collect();
    let cells: Vec<i64> = ck.cells.iter().map(|&c| c as i64).collect();
    let objective = Problem::new(d.vocab, d.rows, d.cols, &t.lr, &t.lc)?.total(&ck.cells);
    handle.block_on(async {
        out.put(
            "L_r.npy",
            Bytes::from(npy::encode_f32(&[d.vocab, d.rows], &t.lr)),
        )
        .await?;
        out.put(
            "L_c.npy",
            Bytes::from(npy::encode_f32(&[d.vocab, d.cols], &t.lc)),
        )
        .await?;
        out.put("counts.npy", Bytes::from(npy::encode_i64(&counts)))
            .await?;
        out.put("alloc.npy", Bytes::from(npy::encode_i64(&cells)))
            .await
    })?;
    let words: u64 = t.counts.iter().sum();
    Ok(serde_json::json!({
        "vocab": d.vocab, "rows": d.rows, "cols": d.cols, "words": words, "loss": loss,
        "objective_current": objective, "seconds": t0.elapsed().as_secs_f64(), "out": out.url(),
    }))
}
