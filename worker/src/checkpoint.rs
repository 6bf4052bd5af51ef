//! Checkpoints: safetensors tensors + JSON metadata in object storage.
//!
//! A checkpoint is a directory (`RUN/checkpoints/step-000000001234/`) holding
//! - `model.safetensors`: every parameter under its PyTorch name and shape, and the
//!   allocation as the int64 tensors `row` and `col` [V] — the buffers of the reference
//!   `LightRNN` module, so `model.load_state_dict(safetensors.torch.load_file(...))` works;
//! - `optimizer.safetensors`: the optimizer's buffers (`exp_avg.<param>`, ...), if any;
//! - `state.safetensors`: the carried LSTM state of the training streams (`h`, `c`
//!   [layers, batch, hidden]);
//! - `vocab.txt`;
//! - `meta.json`, written last: effective config, step, epoch and data cursor, RNG seed,
//!   learning-rate state, vocabulary hash, and the size and SHA-256 of every other object.
//!
//! A directory without a `meta.json` whose objects verify is not a checkpoint; loading
//! walks back to the newest one that verifies.

use std::collections::HashMap;

use bytes::Bytes;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use lightrnn_kernels::backend::OptimizerState;
use lightrnn_kernels::{ModelDims, Optimizer, ParamLayout, State};

use crate::config::TrainConfig;
use crate::store::Location;
use crate::vocab::{Vocab, hex};
use crate::{Error, Result};

pub const FORMAT: &str = "lightrnn.checkpoint";
pub const META: &str = "meta.json";
pub const MODEL: &str = "model.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "state.safetensors";
const VOCAB: &str = "vocab.txt";
/// Bound on any object a checkpoint may contain (hostile-input guard).
const MAX_OBJECT_BYTES: u64 = 64 << 30;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

/// Validation result of one epoch (kept for the summary).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: u64,
    pub step: u64,
    pub lr: f64,
    pub train_loss: f64,
    pub valid_loss: f64,
    pub valid_ppl: f64,
    pub seconds: f64,
}

/// Everything besides tensors that a run needs to continue exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub format: String,
    pub version: u32,
    /// Updates applied so far.
    pub step: u64,
    /// Epoch in progress (0-based).
    pub epoch: u64,
    /// Position inside every training stream where the epoch continues.
    pub cursor: u64,
    pub config: TrainConfig,
    pub dims: ModelDims,
    pub vocab_size: usize,
    pub vocab_sha256: String,
    /// Dropout masks are Philox draws keyed by (seed, step, site): the seed and the
    /// step are the whole RNG state.
    pub rng_seed: u64,
    pub optimizer: Option<Optimizer>,
    pub optimizer_updates: u64,
    pub lr: f64,
    pub best_valid_loss: Option<f64>,
    /// Running training loss of the epoch in progress.
    pub epoch_loss_sum: f64,
    pub epoch_words: u64,
    /// Training seconds so far (all sessions).
    pub seconds: f64,
    pub history: Vec<EpochRecord>,
    /// Word reallocations so far.
    #[serde(default)]
    pub reallocations: u64,
    pub files: Vec<FileEntry>,
}

/// A loaded checkpoint.
pub struct Checkpoint {
    pub url: String,
    pub meta: Meta,
    pub vocab: Vocab,
    /// Parameters in PyTorch layout, [`ParamLayout`] order.
    pub params: Vec<f32>,
    /// word -> cell.
    pub cells: Vec<u32>,
    pub optimizer: Option<OptimizerState>,
    pub state: Option<State<f32>>,
}

/// What [`save`] writes.
pub struct SaveRequest<'a> {
    pub meta: Meta,
    pub vocab: &'a Vocab,
    pub layout: &'a ParamLayout,
    pub params: &'a [f32],
    pub cells: &'a [u32],
    pub optimizer: Option<&'a OptimizerState>,
    pub state: Option<&'a State<f32>>,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn i64_bytes(v: impl Iterator<Item = i64>) -> Vec<u8> {
    v.flat_map(|x| x.to_le_bytes()).collect()
}

fn st_err(url: &str, e: impl std::fmt::Display) -> Error {
    Error::Checkpoint {
        url: url.to_string(),
        msg: e.to_string(),
    }
}

/// Serialize named tensors: (name, dtype, shape, little-endian bytes).
fn serialize(
    tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)],
    info: HashMap<String, String>,
    url: &str,
) -> Result<Vec<u8>> {
    let views: Result<Vec<(String, TensorView<'_>)>> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            Ok((
                n.clone(),
                TensorView::new(*d, s.clone(), b).map_err(|e| st_err(url, e))?,
            ))
        })
        .collect();
    safetensors::serialize(views?, Some(info)).map_err(|e| st_err(url, e))
}

/// Write a checkpoint into `dir` (objects first, `meta.json` last, replacing any).
pub async fn save(dir: &Location, req: SaveRequest<'_>) -> Result<()> {
    let meta = write_objects(dir, req).await?;
    commit(dir, &meta, false).await
}

/// Write every object of a checkpoint but its manifest; returns the manifest listing them
/// (for [`commit`], here or by the coordinator).
pub async fn write_objects(dir: &Location, req: SaveRequest<'_>) -> Result<Meta> {
    let url = dir.url().to_string();
    let d = req.layout.dims;
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = req
        .layout
        .specs
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                Dtype::F32,
                s.shape.clone(),
                f32_bytes(&req.params[s.range()]),
            )
        })
        .collect();
    let cols = d.cols as u32;
    tensors.push((
        "row".into(),
        Dtype::I64,
        vec![d.vocab],
        i64_bytes(req.cells.iter().map(|&c| (c / cols) as i64)),
    ));
    tensors.push((
        "col".into(),
        Dtype::I64,
        vec![d.vocab],
        i64_bytes(req.cells.iter().map(|&c| (c % cols) as i64)),
    ));
    // One metadata entry: safetensors writes its metadata map in the map's (random)
    // iteration order, and a checkpoint's bytes must not depend on it (the same model
    // always has the same SHA-256, whoever writes it and how often).
    let info: HashMap<String, String> = [(
        "lightrnn".to_string(),
        serde_json::json!({
            "format": "lightrnn",
            "vocab_sha256": req.vocab.sha256(),
            "rows": d.rows,
            "cols": d.cols,
        })
        .to_string(),
    )]
    .into();
    let mut objects: Vec<(&str, Vec<u8>)> = vec![(MODEL, serialize(&tensors, info, &url)?)];
    if let Some(o) = req.optimizer {
        let mut t = Vec::new();
        for (buf, values) in &o.buffers {
            for s in &req.layout.specs {
                t.push((
                    format!("{buf}.{}", s.name),
                    Dtype::F32,
                    s.shape.clone(),
                    f32_bytes(&values[s.range()]),
                ));
            }
        }
        if !t.is_empty() {
            objects.push((OPTIMIZER, serialize(&t, HashMap::new(), &url)?));
        }
    }
    if let Some(st) = req.state {
        let shape = vec![d.layers, st.batch, d.hidden];
        let t = vec![
            ("h".to_string(), Dtype::F32, shape.clone(), f32_bytes(&st.h)),
            ("c".to_string(), Dtype::F32, shape, f32_bytes(&st.c)),
        ];
        objects.push((STATE, serialize(&t, HashMap::new(), &url)?));
    }
    objects.push((VOCAB, req.vocab.to_text().into_bytes()));
    let mut meta = req.meta;
    meta.files.clear();
    for (name, bytes) in objects {
        meta.files.push(FileEntry {
            name: name.into(),
            bytes: bytes.len() as u64,
            sha256: hex(&Sha256::digest(&bytes)),
        });
        dir.put(name, Bytes::from(bytes)).await?;
    }
    Ok(meta)
}

/// Make the checkpoint in `dir` exist: check that every object the manifest lists is
/// there with its size, then write `meta.json` — with `create_only`, by a conditional
/// put that never replaces another step's manifest. The same step's (a step replayed
/// after a restart, or the epoch-end work of a run stopped at its epoch's last batch)
/// is replaced: its objects have just been rewritten, so only the new manifest
/// describes them.
pub async fn commit(dir: &Location, meta: &Meta, create_only: bool) -> Result<()> {
    let url = dir.url().to_string();
    for f in &meta.files {
        match dir.head(&f.name).await? {
            Some(m) if m.size == f.bytes => {}
            Some(m) => {
                return Err(st_err(
                    &url,
                    format!(
                        "{} holds {} bytes, the manifest says {}",
                        f.name, m.size, f.bytes
                    ),
                ));
            }
            None => return Err(st_err(&url, format!("{} is missing", f.name))),
        }
    }
    let json = serde_json::to_vec_pretty(meta).map_err(|e| st_err(&url, e))?;
    if !create_only {
        return dir.put(META, Bytes::from(json)).await;
    }
    if dir.put_new(META, Bytes::from(json)).await? {
        return Ok(());
    }
    let existing: Option<Meta> = dir
        .get(META)
        .await
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    match existing {
        Some(e) if e.step == meta.step => {
            tracing::warn!(checkpoint = %url, step = meta.step, "replacing the manifest of a replayed step");
            let json = serde_json::to_vec_pretty(meta).map_err(|e| st_err(&url, e))?;
            dir.put(META, Bytes::from(json)).await
        }
        Some(e) => Err(st_err(
            &url,
            format!("a checkpoint of step {} is committed here already", e.step),
        )),
        None => Err(st_err(
            &url,
            "a manifest that does not parse is committed here already",
        )),
    }
}

/// Read and verify the checkpoint in `dir`.
pub async fn load(dir: &Location) -> Result<Checkpoint> {
    let url = dir.url().to_string();
    let bad = |m: String| Error::Checkpoint {
        url: url.clone(),
        msg: m,
    };
    let meta_bytes = dir.get(META).await?;
    if meta_bytes.len() > 64 << 20 {
        return Err(bad("meta.json is larger than 64 MiB".into()));
    }
    let meta: Meta =
        serde_json::from_slice(&meta_bytes).map_err(|e| bad(format!("meta.json: {e}")))?;
    if meta.format != FORMAT || meta.version != 1 {
        return Err(bad(format!(
            "format {:?} version {} is not {FORMAT} 1",
            meta.format, meta.version
        )));
    }
    meta.dims.validate()?;
    let mut objects: HashMap<String, Bytes> = HashMap::new();
    for f in &meta.files {
        if f.bytes > MAX_OBJECT_BYTES {
            return Err(bad(format!("{} lists {} bytes", f.name, f.bytes)));
        }
        let b = dir.get(&f.name).await?;
        if b.len() as u64 != f.bytes {
            return Err(bad(format!(
                "{} has {} bytes, meta.json lists {}",
                f.name,
                b.len(),
                f.bytes
            )));
        }
        if hex(&Sha256::digest(&b)) != f.sha256 {
            return Err(bad(format!("{} fails its SHA-256 check", f.name)));
        }
        objects.insert(f.name.clone(), b);
    }
    let get = |n: &str| {
        objects
            .get(n)
            .ok_or_else(|| bad(format!("meta.json does not list {n}")))
    };
    let vocab_text =
        std::str::from_utf8(get(VOCAB)?).map_err(|_| bad("vocab.txt is not UTF-8".into()))?;
    let vocab = Vocab::parse(vocab_text, &dir.url_of(VOCAB))?;
    if vocab.len() != meta.dims.vocab || vocab.sha256() != meta.vocab_sha256 {
        return Err(bad("vocab.txt does not match the model's vocabulary".into()));
    }
    let layout = ParamLayout::new(meta.dims);
    let model = SafeTensors::deserialize(get(MODEL)?).map_err(|e| bad(format!("{MODEL}: {e}")))?;
    let read_f32 =
        |st: &SafeTensors<'_>, name: &str, shape: &[usize], what: &str| -> Result<Vec<f32>> {
            let t = st
                .tensor(name)
                .map_err(|e| bad(format!("{what}: {name}: {e}")))?;
            if t.dtype() != Dtype::F32 || t.shape() != shape {
                return Err(bad(format!(
                    "{what}: {name} is {:?} {:?}, expected F32 {shape:?}",
                    t.dtype(),
                    t.shape()
                )));
            }
            Ok(t.data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        };
    let mut params = vec![0f32; layout.total];
    for s in &layout.specs {
        params[s.range()].copy_from_slice(&read_f32(&model, &s.name, &s.shape, MODEL)?);
    }
    if let Some(p) = params.iter().position(|x| !x.is_finite()) {
        return Err(bad(format!("{MODEL}: parameter {p} is not finite")));
    }
    let read_i64 = |name: &str| -> Result<Vec<i64>> {
        let t = model
            .tensor(name)
            .map_err(|e| bad(format!("{MODEL}: {name}: {e}")))?;
        if t.dtype() != Dtype::I64 || t.shape() != [meta.dims.vocab] {
            return Err(bad(format!(
                "{MODEL}: {name} must be I64 [{}]",
                meta.dims.vocab
            )));
        }
        Ok(t.data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect())
    };
    let (rows, cols) = (read_i64("row")?, read_i64("col")?);
    let mut cells = Vec::with_capacity(meta.dims.vocab);
    for (w, (&r, &c)) in rows.iter().zip(&cols).enumerate() {
        if r < 0 || c < 0 || r as usize >= meta.dims.rows || c as usize >= meta.dims.cols {
            return Err(bad(format!(
                "word {w} is allocated cell ({r}, {c}) outside the table"
            )));
        }
        cells.push((r as usize * meta.dims.cols + c as usize) as u32);
    }
    lightrnn_kernels::check_allocation(&meta.dims, &cells).map_err(|e| bad(e.to_string()))?;
    let optimizer = match (&meta.optimizer, objects.get(OPTIMIZER)) {
        (Some(rule), Some(bytes)) => {
            let st =
                SafeTensors::deserialize(bytes).map_err(|e| bad(format!("{OPTIMIZER}: {e}")))?;
            let mut buffers = Vec::new();
            for name in rule.state_names() {
                let mut v = vec![0f32; layout.total];
                for s in &layout.specs {
                    v[s.range()].copy_from_slice(&read_f32(
                        &st,
                        &format!("{name}.{}", s.name),
                        &s.shape,
                        OPTIMIZER,
                    )?);
                }
                buffers.push((name.to_string(), v));
            }
            Some(OptimizerState {
                rule: *rule,
                updates: meta.optimizer_updates,
                buffers,
            })
        }
        (Some(rule), None) if rule.state_names().is_empty() => Some(OptimizerState {
            rule: *rule,
            updates: meta.optimizer_updates,
            buffers: vec![],
        }),
        (Some(_), None) => return Err(bad("the optimizer's state is missing".into())),
        (None, _) => None,
    };
    let state = match objects.get(STATE) {
        Some(bytes) => {
            let st = SafeTensors::deserialize(bytes).map_err(|e| bad(format!("{STATE}: {e}")))?;
            let t = st
                .tensor("h")
                .map_err(|e| bad(format!("{STATE}: h: {e}")))?;
            let shape = t.shape().to_vec();
            if shape.len() != 3 || shape[0] != meta.dims.layers || shape[2] != meta.dims.hidden {
                return Err(bad(format!("{STATE}: h has shape {shape:?}")));
            }
            let h = read_f32(&st, "h", &shape, STATE)?;
            let c = read_f32(&st, "c", &shape, STATE)?;
            Some(State {
                batch: shape[1],
                h,
                c,
            })
        }
        None => None,
    };
    Ok(Checkpoint {
        url,
        meta,
        vocab,
        params,
        cells,
        optimizer,
        state,
    })
}

/// Name of the checkpoint directory of `step`.
pub fn dir_name(step: u64) -> String {
    format!("step-{step:012}")
}

/// Checkpoint directories of a run, newest first.
pub async fn list(run: &Location) -> Result<Vec<(u64, Location)>> {
    let base = run.join("checkpoints");
    let (_, dirs) = base.list().await?;
    let mut out: Vec<(u64, Location)> = dirs
        .iter()
        .filter_map(|d| {
            d.strip_prefix("step-")
                .and_then(|s| s.parse().ok())
                .map(|s: u64| (s, base.join(d)))
        })
        .collect();
    out.sort_by_key(|x| std::cmp::Reverse(x.0));
    Ok(out)
}

/// The newest checkpoint of a run that verifies; broken ones are skipped with a warning.
pub async fn newest(run: &Location) -> Result<Option<Checkpoint>> {
    for (_, dir) in list(run).await? {
        match load(&dir).await {
            Ok(c) => return Ok(Some(c)),
            Err(e) => {
                tracing::warn!(checkpoint = %dir, error = %e, "skipping a checkpoint that does not verify")
            }
        }
    }
    Ok(None)
}

/// `PATH` as a checkpoint directory, or a run directory's newest checkpoint.
pub async fn resolve(path: &Location) -> Result<Checkpoint> {
    if path.head(META).await?.is_some() {
        return load(path).await;
    }
    match newest(path).await? {
        Some(c) => Ok(c),
        None => Err(Error::Checkpoint {
            url: path.url().to_string(),
            msg: "neither a checkpoint (no meta.json) nor a run directory with a valid checkpoint"
                .into(),
        }),
    }
}

/// Delete all but the newest `keep` checkpoints, and those whose step is a multiple of
/// `keep_every` (0: none kept that way).
pub async fn prune(run: &Location, keep: usize, keep_every: u64) -> Result<()> {
    for (step, dir) in list(run).await?.into_iter().skip(keep) {
        if keep_every > 0 && step.is_multiple_of(keep_every) {
            continue;
        }
        // meta.json first: a half-deleted checkpoint must not look valid.
        dir.delete(META).await?;
        let parent = dir.parent();
        if let Some(p) = parent {
            p.delete_all(&dir.name()).await?;
        }
    }
    Ok(())
}
