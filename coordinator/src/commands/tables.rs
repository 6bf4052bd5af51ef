//! `lightrnn tables`: the loss tables of a checkpoint over its training split, as .npy
//! files (what `lightrnn allocate` reads): dense, or sparse (`--sparse K`: each word's K
//! cheapest rows and columns and its exact sums, built one range of words at a time).

use bytes::Bytes;
use clap::Args;
use tokio::runtime::Handle;

use lightrnn_alloc::{Problem, SparseProblem, SparseTables};
use lightrnn_core::checkpoint::{self, Checkpoint};
use lightrnn_core::data::dataset::{Dataset, PrepareOptions};
use lightrnn_core::data::npy;
use lightrnn_core::data::store::Location;
use lightrnn_kernels::{BackendKind, BackendOptions, ModelConfig, open_backend};
use lightrnn_worker::train::Sweep;
use lightrnn_worker::train::realloc::{loss_tables, sparse_loss_tables};

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
    /// Output directory: L_r.npy, L_c.npy (or the sparse tables' files), counts.npy,
    /// alloc.npy.
    #[arg(long)]
    pub out: String,
    /// Write sparse tables of this many candidate rows and columns per word (tables.json,
    /// rows.npy, row_loss.npy, cols.npy, col_loss.npy, row_sum.npy, col_sum.npy),
    /// built in passes over ranges of words whose dense tables fit --max-table-gib.
    #[arg(long, value_name = "K")]
    pub sparse: Option<usize>,
    /// Memory for the dense tables of one pass, GiB (default: the checkpoint's
    /// realloc_max_table_gib). Dense tables beyond it are refused; sparse ones take
    /// more passes.
    #[arg(long)]
    pub max_table_gib: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

pub fn run(a: &TablesArgs, handle: &Handle) -> Result<String> {
    let ck = handle.block_on(checkpoint::resolve(&Location::parse(&a.checkpoint)?))?;
    let max_gib = a
        .max_table_gib
        .unwrap_or(ck.meta.config.realloc_max_table_gib);
    if !(max_gib > 0.0 && max_gib.is_finite()) {
        return usage(format!("--max-table-gib {max_gib}: a positive size in GiB"));
    }
    let opts = TablesOptions {
        threads: a.threads,
        max_bytes: (max_gib * (1u64 << 30) as f64) as u64,
        sparse: a.sparse,
    };
    if a.sparse == Some(0) {
        return usage("--sparse 0: at least one candidate row and column per word");
    }
    Ok(tables_of(&ck, &a.data, &a.out, &opts, handle)?.to_string())
}

/// How [`tables_of`] builds the tables.
pub struct TablesOptions {
    pub threads: usize,
    /// Bytes of dense tables one pass may hold.
    pub max_bytes: u64,
    /// Sparse tables of this many candidates per side, instead of dense ones.
    pub sparse: Option<usize>,
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
    o: &TablesOptions,
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
    let mut be = open_backend(&BackendOptions::new(BackendKind::Auto, o.threads), &mcfg)?;
    be.set_params(&ck.params)?;
    be.set_allocation(&ck.cells)?;
    let d = ck.meta.dims;
    let sweep = Sweep::new(&ds.train, cfg.batch, cfg.bptt, handle);
    let put = |name: &str, bytes: Vec<u8>| handle.block_on(out.put(name, Bytes::from(bytes)));
    let (counts, total, words, extra) = if let Some(k) = o.sparse {
        let b = sparse_loss_tables(&mut *be, &sweep, k, o.max_bytes)?;
        let t = &b.tables;
        let (est, lo, hi) = SparseProblem::new(t)?.total(&ck.cells);
        write_sparse(t, &put)?;
        let extra = serde_json::json!({
            "sparse_k": t.k_rows, "passes": b.passes, "objective_current": est,
            "objective_current_interval": [lo, hi],
        });
        (b.counts, b.loss, b.words, extra)
    } else {
        let (t, total, words) = loss_tables(&mut *be, &sweep, o.max_bytes)?;
        let objective = Problem::new(d.vocab, d.rows, d.cols, &t.lr, &t.lc)?.total(&ck.cells);
        put("L_r.npy", npy::encode_f32(&[d.vocab, d.rows], &t.lr))?;
        put("L_c.npy", npy::encode_f32(&[d.vocab, d.cols], &t.lc))?;
        (
            t.counts,
            total,
            words,
            serde_json::json!({ "objective_current": objective }),
        )
    };
    let loss = total / words.max(1) as f64;
    let cells: Vec<i64> = ck.cells.iter().map(|&c| c as i64).collect();
    let counts_i: Vec<i64> = counts.iter().map(|&c| c as i64).collect();
    put("counts.npy", npy::encode_i64(&counts_i))?;
    put("alloc.npy", npy::encode_i64(&cells))?;
    let mut line = serde_json::json!({
        "vocab": d.vocab, "rows": d.rows, "cols": d.cols, "words": counts.iter().sum::<u64>(),
        "loss": loss, "seconds": t0.elapsed().as_secs_f64(), "out": out.url(),
    });
    if let (Some(l), serde_json::Value::Object(e)) = (line.as_object_mut(), extra) {
        l.extend(e);
    }
    Ok(line)
}

/// Write sparse tables in the format `lightrnn allocate --tables` reads
/// (docs/allocation.md, "Sparse tables"); tables.json last, so a directory with it is whole.
pub fn write_sparse(
    t: &SparseTables,
    put: &dyn Fn(&str, Vec<u8>) -> lightrnn_core::Result<()>,
) -> Result<()> {
    let idx = |v: &[u32]| -> Result<Vec<i32>> {
        v.iter()
            .map(|&x| {
                i32::try_from(x)
                    .map_err(|_| crate::Error::Job(format!("table index {x} beyond int32")))
            })
            .collect()
    };
    let (v, kr, kc) = (t.vocab, t.k_rows, t.k_cols);
    put("rows.npy", npy::encode_i32(&[v, kr], &idx(&t.row_idx)?))?;
    put("row_loss.npy", npy::encode_f32(&[v, kr], &t.row_loss))?;
    put("cols.npy", npy::encode_i32(&[v, kc], &idx(&t.col_idx)?))?;
    put("col_loss.npy", npy::encode_f32(&[v, kc], &t.col_loss))?;
    put("row_sum.npy", npy::encode_f64(&t.row_sum))?;
    put("col_sum.npy", npy::encode_f64(&t.col_sum))?;
    let meta = serde_json::json!({
        "format": super::allocate::SPARSE_FORMAT, "version": 1,
        "vocab": v, "rows": t.rows, "cols": t.cols, "k": kr.max(kc),
    });
    put("tables.json", meta.to_string().into_bytes())?;
    Ok(())
}
