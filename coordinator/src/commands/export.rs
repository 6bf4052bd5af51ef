//! `lightrnn export`: a checkpoint as files other tools read.

use clap::Args;
use tokio::runtime::Handle;

use lightrnn_core::checkpoint::{self, Checkpoint};
use lightrnn_core::data::store::Location;

use crate::error::usage;
use crate::{Error, Result};

#[derive(Args, Debug, Clone)]
pub struct ExportArgs {
    /// A checkpoint, or a run directory (its newest checkpoint).
    #[arg(long)]
    pub checkpoint: String,
    /// Directory or object-store URL to write into.
    #[arg(long)]
    pub out: String,
    /// Also write vectors.txt: each word's row vector joined to its column vector, in
    /// the word2vec text format (gensim's KeyedVectors.load_word2vec_format reads it).
    #[arg(long)]
    pub word_vectors: bool,
    /// Replace files of an earlier export in `--out`.
    #[arg(long)]
    pub force: bool,
}

/// The files an export writes.
const FILES: [&str; 5] = [
    "model.safetensors",
    "vocab.txt",
    "config.toml",
    "model.json",
    "vectors.txt",
];

pub fn run(a: &ExportArgs, handle: &Handle) -> Result<String> {
    let out = Location::parse(&a.out)?;
    if !a.force {
        for name in FILES {
            if handle.block_on(out.head(name))?.is_some() {
                return usage(format!(
                    "{} already holds {name} (an earlier export?); pass --force to replace it",
                    a.out
                ));
            }
        }
    }
    let ck = handle.block_on(checkpoint::resolve(&Location::parse(&a.checkpoint)?))?;
    export(&ck, &out, a.word_vectors, handle)
}

/// `lightrnn export`: a checkpoint as files other tools read: `model.safetensors` (every
/// parameter under the PyTorch names of the reference model, and the allocation as the
/// int64 tensors `row` and `col`), `vocab.txt` (`word count` per line, id = line - 1),
/// `config.toml` (the effective training config), `model.json` (dimensions and token
/// conventions) and, with `word_vectors`, `vectors.txt`: each word's vector (its row
/// vector joined to its column vector, 2n values) in the word2vec text format.
pub fn export(
    ck: &Checkpoint,
    out: &Location,
    word_vectors: bool,
    handle: &tokio::runtime::Handle,
) -> Result<String> {
    let t0 = std::time::Instant::now();
    let d = ck.meta.dims;
    let src = Location::parse(&ck.url)?;
    let model = handle.block_on(src.get("model.safetensors"))?;
    let cfg = &ck.meta.config;
    let info = serde_json::json!({
        "format": "lightrnn.export",
        "version": 1,
        "vocab": d.vocab, "rows": d.rows, "cols": d.cols, "emb": d.emb, "hidden": d.hidden,
        "layers": d.layers,
        "cell_of_word": "row[w] * cols + col[w]",
        "eos": lightrnn_core::data::text::EOS, "unk": lightrnn_core::data::text::UNK,
        "lowercase": cfg.lowercase,
        "step": ck.meta.step, "reallocations": ck.meta.reallocations,
        "checkpoint": ck.url,
        "vocab_sha256": ck.meta.vocab_sha256,
    });
    let mut files = vec![
        (FILES[0], model),
        (FILES[1], bytes::Bytes::from(ck.vocab.to_text())),
        (FILES[2], bytes::Bytes::from(cfg.to_toml())),
        (
            FILES[3],
            bytes::Bytes::from(serde_json::to_string_pretty(&info)? + "\n"),
        ),
    ];
    if word_vectors {
        let layout = lightrnn_kernels::ParamLayout::new(d);
        let table = |name: &str| -> Result<&[f32]> {
            let s = layout
                .spec(name)
                .ok_or_else(|| Error::Usage(format!("the model has no {name}")))?;
            Ok(&ck.params[s.range()])
        };
        let (xr, xc) = (table("emb_r.weight")?, table("emb_c.weight")?);
        let n = d.emb;
        let mut text = String::with_capacity(d.vocab * n * 2 * 11);
        text.push_str(&format!("{} {}\n", d.vocab, 2 * n));
        for (w, &cell) in ck.cells.iter().enumerate() {
            let word = ck.vocab.word(w as u32);
            if word.chars().any(char::is_whitespace) {
                return usage(format!(
                    "word {w} ({word:?}) holds whitespace: the word2vec text format cannot carry it"
                ));
            }
            let (r, c) = (cell as usize / d.cols, cell as usize % d.cols);
            text.push_str(word);
            for x in xr[r * n..(r + 1) * n].iter().chain(&xc[c * n..(c + 1) * n]) {
                text.push(' ');
                text.push_str(&x.to_string());
            }
            text.push('\n');
        }
        files.push((FILES[4], bytes::Bytes::from(text)));
    }
    let mut written = Vec::new();
    let mut bytes = 0u64;
    for (name, data) in files {
        bytes += data.len() as u64;
        handle.block_on(out.put(name, data))?;
        written.push(name);
    }
    Ok(serde_json::to_string(&serde_json::json!({
        "out": out.url(), "files": written, "bytes": bytes, "vocab": d.vocab,
        "step": ck.meta.step, "seconds": t0.elapsed().as_secs_f64(),
    }))?)
}
