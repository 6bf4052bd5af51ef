//! The objects of a checkpoint: parameters and allocation (`model.safetensors`), the
//! optimizer's buffers, the carried state, the vocabulary, written as safetensors and
//! read back verified against the manifest (sizes, SHA-256, shapes, finite values, a
//! valid allocation).

use std::collections::HashMap;

use bytes::Bytes;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use sha2::{Digest, Sha256};

use lightrnn_kernels::{OptimizerState, ParamLayout, State};

use super::manifest::{FORMAT, FileEntry, META, Meta};
use super::{Checkpoint, MODEL, OPTIMIZER, STATE, VOCAB};
use crate::data::store::Location;
use crate::data::vocab::{Vocab, hex};
use crate::{Error, Result};

/// Bound on any object a checkpoint may contain (hostile-input guard).
const MAX_OBJECT_BYTES: u64 = 64 << 30;

/// What [`write_objects`] writes.
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

pub(super) fn st_err(url: &str, e: impl std::fmt::Display) -> Error {
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

/// Read and verify the checkpoint in `dir`.
pub async fn load(dir: &Location) -> Result<Checkpoint> {
    let url = dir.url().to_string();
    let bad = |m: String| st_err(&url, m);
    let meta = read_meta(dir, &url).await?;
    let objects = read_objects(dir, &url, &meta).await?;
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
    let params = read_params(&model, &layout, &url)?;
    let cells = read_allocation(&model, &meta, &url)?;
    let optimizer = read_optimizer(&meta, objects.get(OPTIMIZER), &layout, &url)?;
    let state = match objects.get(STATE) {
        Some(bytes) => Some(read_state(bytes, &meta, &url)?),
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

/// The manifest, parsed and checked for its format and the model's dimensions.
async fn read_meta(dir: &Location, url: &str) -> Result<Meta> {
    let bad = |m: String| st_err(url, m);
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
    Ok(meta)
}

/// Every object the manifest lists, each checked against its size and SHA-256.
async fn read_objects(dir: &Location, url: &str, meta: &Meta) -> Result<HashMap<String, Bytes>> {
    let bad = |m: String| st_err(url, m);
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
    Ok(objects)
}

/// Tensor `name` of `st` (object `what`): F32 of exactly `shape`.
fn read_f32(
    st: &SafeTensors<'_>,
    name: &str,
    shape: &[usize],
    what: &str,
    url: &str,
) -> Result<Vec<f32>> {
    let t = st
        .tensor(name)
        .map_err(|e| st_err(url, format!("{what}: {name}: {e}")))?;
    if t.dtype() != Dtype::F32 || t.shape() != shape {
        return Err(st_err(
            url,
            format!(
                "{what}: {name} is {:?} {:?}, expected F32 {shape:?}",
                t.dtype(),
                t.shape()
            ),
        ));
    }
    Ok(t.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Every parameter of the layout, finite.
fn read_params(model: &SafeTensors<'_>, layout: &ParamLayout, url: &str) -> Result<Vec<f32>> {
    let mut params = vec![0f32; layout.total];
    for s in &layout.specs {
        params[s.range()].copy_from_slice(&read_f32(model, &s.name, &s.shape, MODEL, url)?);
    }
    if let Some(p) = params.iter().position(|x| !x.is_finite()) {
        return Err(st_err(url, format!("{MODEL}: parameter {p} is not finite")));
    }
    Ok(params)
}

/// The word -> cell table from the `row` and `col` tensors, a valid allocation.
fn read_allocation(model: &SafeTensors<'_>, meta: &Meta, url: &str) -> Result<Vec<u32>> {
    let d = meta.dims;
    let read_i64 = |name: &str| -> Result<Vec<i64>> {
        let t = model
            .tensor(name)
            .map_err(|e| st_err(url, format!("{MODEL}: {name}: {e}")))?;
        if t.dtype() != Dtype::I64 || t.shape() != [d.vocab] {
            return Err(st_err(
                url,
                format!("{MODEL}: {name} must be I64 [{}]", d.vocab),
            ));
        }
        Ok(t.data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect())
    };
    let (rows, cols) = (read_i64("row")?, read_i64("col")?);
    let mut cells = Vec::with_capacity(d.vocab);
    for (w, (&r, &c)) in rows.iter().zip(&cols).enumerate() {
        if r < 0 || c < 0 || r as usize >= d.rows || c as usize >= d.cols {
            return Err(st_err(
                url,
                format!("word {w} is allocated cell ({r}, {c}) outside the table"),
            ));
        }
        cells.push((r as usize * d.cols + c as usize) as u32);
    }
    lightrnn_kernels::check_allocation(&d, &cells).map_err(|e| st_err(url, e))?;
    Ok(cells)
}

/// The optimizer's buffers the manifest's rule keeps (none for SGD).
fn read_optimizer(
    meta: &Meta,
    bytes: Option<&Bytes>,
    layout: &ParamLayout,
    url: &str,
) -> Result<Option<OptimizerState>> {
    let Some(rule) = &meta.optimizer else {
        return Ok(None);
    };
    let Some(bytes) = bytes else {
        if rule.state_names().is_empty() {
            return Ok(Some(OptimizerState {
                rule: *rule,
                updates: meta.optimizer_updates,
                buffers: vec![],
            }));
        }
        return Err(st_err(url, "the optimizer's state is missing"));
    };
    let st =
        SafeTensors::deserialize(bytes).map_err(|e| st_err(url, format!("{OPTIMIZER}: {e}")))?;
    let mut buffers = Vec::new();
    for name in rule.state_names() {
        let mut v = vec![0f32; layout.total];
        for s in &layout.specs {
            let t = read_f32(&st, &format!("{name}.{}", s.name), &s.shape, OPTIMIZER, url)?;
            v[s.range()].copy_from_slice(&t);
        }
        buffers.push((name.to_string(), v));
    }
    Ok(Some(OptimizerState {
        rule: *rule,
        updates: meta.optimizer_updates,
        buffers,
    }))
}

/// The carried state h, c [layers, batch, hidden].
fn read_state(bytes: &Bytes, meta: &Meta, url: &str) -> Result<State<f32>> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| st_err(url, format!("{STATE}: {e}")))?;
    let t = st
        .tensor("h")
        .map_err(|e| st_err(url, format!("{STATE}: h: {e}")))?;
    let shape = t.shape().to_vec();
    if shape.len() != 3 || shape[0] != meta.dims.layers || shape[2] != meta.dims.hidden {
        return Err(st_err(url, format!("{STATE}: h has shape {shape:?}")));
    }
    Ok(State {
        batch: shape[1],
        h: read_f32(&st, "h", &shape, STATE, url)?,
        c: read_f32(&st, "c", &shape, STATE, url)?,
    })
}
