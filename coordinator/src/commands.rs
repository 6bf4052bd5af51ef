//! The allocation-related commands: `allocate`, `tables`, `inspect`.

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use tokio::runtime::Handle;

use lightrnn_kernels::{BackendKind, BackendOptions, ModelConfig, open_backend};
use lightrnn_worker::checkpoint::Checkpoint;
use lightrnn_worker::data::dataset::{Dataset, PrepareOptions};
use lightrnn_worker::data::npy;
use lightrnn_worker::data::store::Location;
use lightrnn_worker::data::store::split_object;

use lightrnn_alloc::{Problem, SolveOptions, Solver, solve};

/// Peak resident set size of this process in MiB (Linux).
pub fn peak_rss_mib() -> Option<f64> {
    lightrnn_worker::train::bench::rss_mib().0
}

fn read_npy(path: &str, handle: &Handle) -> Result<npy::Array> {
    let (loc, name) = split_object(path)?;
    let bytes = handle.block_on(loc.get(&name))?;
    Ok(npy::decode(bytes, path)?)
}

/// `lightrnn allocate`: tables in, allocation out, one JSON line.
pub fn allocate(
    row_loss: &str,
    col_loss: &str,
    solver: Solver,
    out: &str,
    opts: &SolveOptions,
    handle: &Handle,
) -> Result<serde_json::Value> {
    let t0 = std::time::Instant::now();
    let (a, b) = (read_npy(row_loss, handle)?, read_npy(col_loss, handle)?);
    let (v, r, c) = match (&a.shape[..], &b.shape[..]) {
        ([v, r], [v2, c]) if v == v2 => (*v, *r, *c),
        _ => bail!(
            "tables must be [V, R] and [V, C] with the same V; got {:?} and {:?}",
            a.shape,
            b.shape
        ),
    };
    let t_read = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let sol = match (a.as_f32(), b.as_f32(), a.as_f64(), b.as_f64()) {
        (Some(lr), Some(lc), _, _) => solve(&Problem::new(v, r, c, lr, lc)?, solver, opts)?,
        (_, _, Some(lr), Some(lc)) => solve(&Problem::new(v, r, c, lr, lc)?, solver, opts)?,
        _ => {
            let (lr, lc) = (a.to_f64(), b.to_f64());
            solve(&Problem::new(v, r, c, &lr, &lc)?, solver, opts)?
        }
    };
    let seconds = t1.elapsed().as_secs_f64();
    drop((a, b));
    let cells: Vec<i64> = sol.cells.iter().map(|&x| x as i64).collect();
    let (loc, name) = split_object(out)?;
    handle.block_on(loc.put(&name, Bytes::from(npy::encode_i64(&cells))))?;
    Ok(serde_json::json!({
        "solver": solver.name(),
        "cost": sol.cost,
        "lower_bound": sol.lower_bound,
        "relaxation_bound": sol.relaxation_bound,
        "gap_to_relaxation_bound": (sol.cost - sol.relaxation_bound) / sol.relaxation_bound.abs().max(1e-300),
        "dual_bound": sol.dual_bound,
        "gap_to_lower_bound": (sol.cost - sol.lower_bound) / sol.lower_bound.abs().max(1e-300),
        "seconds": seconds,
        "seconds_reading": t_read,
        "peak_rss_mib": peak_rss_mib(),
        "vocab": v, "rows": r, "cols": c,
        "stats": sol.stats,
    }))
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
        bail!(
            "{data}: its vocabulary differs from the checkpoint's; pass the data the model was trained on"
        );
    }
    Ok(ds)
}

/// `lightrnn tables`: loss tables of a checkpoint over its training split, as .npy files.
pub fn tables(
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

/// `lightrnn inspect`: the rows of the table with their words, most frequent first; rows
/// ordered by the count of their most frequent word.
pub fn inspect(ck: &Checkpoint, rows: usize, words: usize) -> Result<String> {
    let d = ck.meta.dims;
    let mut members: Vec<Vec<u32>> = vec![Vec::new(); d.rows];
    for (w, &cell) in ck.cells.iter().enumerate() {
        members[cell as usize / d.cols].push(w as u32);
    }
    for m in &mut members {
        m.sort_by_key(|&w| (std::cmp::Reverse(ck.vocab.count(w)), w));
    }
    let mut order: Vec<usize> = (0..d.rows).filter(|&i| !members[i].is_empty()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(ck.vocab.count(members[i][0])));
    let mut out = format!(
        "{} words in a {} x {} table; step {}, {} reallocation(s); rows by their most frequent word:\n",
        d.vocab, d.rows, d.cols, ck.meta.step, ck.meta.reallocations
    );
    for &i in order.iter().take(rows) {
        let ws: Vec<&str> = members[i]
            .iter()
            .take(words)
            .map(|&w| ck.vocab.word(w))
            .collect();
        out.push_str(&format!(
            "row {i:>5} ({:>4} words): {}\n",
            members[i].len(),
            ws.join(" ")
        ));
    }
    Ok(out.trim_end().to_string())
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
        "eos": lightrnn_worker::data::text::EOS, "unk": lightrnn_worker::data::text::UNK,
        "lowercase": cfg.lowercase,
        "step": ck.meta.step, "reallocations": ck.meta.reallocations,
        "checkpoint": ck.url,
        "vocab_sha256": ck.meta.vocab_sha256,
    });
    let mut files = vec![
        ("model.safetensors", model),
        ("vocab.txt", bytes::Bytes::from(ck.vocab.to_text())),
        ("config.toml", bytes::Bytes::from(cfg.to_toml())),
        (
            "model.json",
            bytes::Bytes::from(serde_json::to_string_pretty(&info)? + "\n"),
        ),
    ];
    if word_vectors {
        let layout = lightrnn_kernels::ParamLayout::new(d);
        let table = |name: &str| -> Result<&[f32]> {
            let s = layout
                .spec(name)
                .with_context(|| format!("the model has no {name}"))?;
            Ok(&ck.params[s.range()])
        };
        let (xr, xc) = (table("emb_r.weight")?, table("emb_c.weight")?);
        let n = d.emb;
        let mut text = String::with_capacity(d.vocab * n * 2 * 11);
        text.push_str(&format!("{} {}\n", d.vocab, 2 * n));
        for (w, &cell) in ck.cells.iter().enumerate() {
            let word = ck.vocab.word(w as u32);
            if word.chars().any(char::is_whitespace) {
                bail!(
                    "word {w} ({word:?}) holds whitespace: the word2vec text format cannot carry it"
                );
            }
            let (r, c) = (cell as usize / d.cols, cell as usize % d.cols);
            text.push_str(word);
            for x in xr[r * n..(r + 1) * n].iter().chain(&xc[c * n..(c + 1) * n]) {
                text.push(' ');
                text.push_str(&x.to_string());
            }
            text.push('\n');
        }
        files.push(("vectors.txt", bytes::Bytes::from(text)));
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
