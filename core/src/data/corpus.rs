//! Corpora at scale: many text files or objects read in parallel into a vocabulary
//! (`lightrnn vocab`) and into verified u32 shards (`lightrnn shard`), written to any
//! object-store location.
//!
//! Inputs are object URLs or prefixes (every object below a prefix, in name order;
//! manifests, dot-files and `_`-files skipped), in any format [`super::formats`] reads. Counting runs one task per input, `parallel` at a
//! time, each with its own table, merged at the end. Sharding tokenises `parallel` inputs
//! ahead and writes their ids in input order, so the shards hold the inputs
//! concatenated in the order given, whatever the task timing.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;

use super::shards::{Manifest, ShardWriter, Source};
use super::store::Location;
use super::text::{EOS, LineReader, Skipped, TextOptions};
use super::vocab::VOCAB_FILE;
use super::vocab::{TypeTokenCurve, Vocab, type_token_curve};
use crate::{Error, Result};

/// One text object to read.
#[derive(Clone, Debug)]
pub struct Input {
    pub loc: Location,
    pub name: String,
    pub size: u64,
    pub e_tag: Option<String>,
}

impl Input {
    pub fn url(&self) -> String {
        self.loc.url_of(&self.name)
    }

    /// Read the object as text, at the version listed (a changed object is refused).
    pub async fn open(&self, opts: &TextOptions) -> Result<LineReader> {
        LineReader::open_version(
            &self.loc,
            &self.name,
            opts,
            Some((self.size, self.e_tag.as_deref())),
        )
        .await
    }
}

/// The objects behind `urls`: an URL naming an object is that object; otherwise it is a
/// prefix and stands for every object below it.
pub async fn expand_inputs(urls: &[String]) -> Result<Vec<Input>> {
    let mut out = Vec::new();
    for url in urls {
        let loc = Location::parse(url)?;
        // An object: its parent location holds it under its last path segment.
        if let Some(parent) = loc.parent() {
            let name = loc.name();
            if !name.is_empty()
                && let Some(m) = parent.head(&name).await?
            {
                out.push(Input {
                    loc: parent,
                    name,
                    size: m.size,
                    e_tag: m.e_tag,
                });
                continue;
            }
        }
        let objects = loc.list_recursive().await?;
        let before = out.len();
        for (name, m) in objects {
            let base = name.rsplit('/').next().unwrap_or(&name);
            // Manifests, and hidden files: dot-files and the `_SUCCESS`-style markers of
            // Hadoop and Spark outputs.
            if base.starts_with(['.', '_']) || base.ends_with(".manifest.json") {
                continue;
            }
            out.push(Input {
                loc: loc.clone(),
                name,
                size: m.size,
                e_tag: m.e_tag,
            });
        }
        if out.len() == before {
            return Err(Error::NotFound(format!(
                "{url}: no such object, and no objects below it"
            )));
        }
    }
    Ok(out)
}

/// Bytes done out of a total, shown as a bar on a terminal and as log lines otherwise.
pub struct Meter {
    what: &'static str,
    total: u64,
    done: AtomicU64,
    started: Instant,
    last_log: std::sync::Mutex<Instant>,
    bar: Option<indicatif::ProgressBar>,
}

impl Meter {
    pub fn new(what: &'static str, total: u64, bar: bool) -> Self {
        let bar = bar.then(|| {
            let b = indicatif::ProgressBar::new(total);
            let style = indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ({elapsed} < {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> ");
            b.set_style(style);
            b.set_prefix(what);
            b
        });
        Self {
            what,
            total,
            done: AtomicU64::new(0),
            started: Instant::now(),
            last_log: std::sync::Mutex::new(Instant::now()),
            bar,
        }
    }

    pub fn add(&self, bytes: u64) {
        let done = self.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if let Some(b) = &self.bar {
            b.set_position(done);
            return;
        }
        let mut last = self.last_log.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed().as_secs_f64() >= 10.0 {
            *last = Instant::now();
            tracing::info!(
                what = self.what,
                done_mb = done as f64 / 1e6,
                total_mb = self.total as f64 / 1e6,
                mb_per_sec = self.mb_per_sec(),
                "progress"
            );
        }
    }

    pub fn mb_per_sec(&self) -> f64 {
        self.done.load(Ordering::Relaxed) as f64 / 1e6 / self.seconds().max(1e-9)
    }

    pub fn seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// Progress is reported every this many bytes of a task.
const REPORT_BYTES: u64 = 4 << 20;

/// What `count_words` read.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Counted {
    pub inputs: usize,
    pub bytes: u64,
    pub lines: u64,
    /// Words including one `<eos>` per line.
    pub tokens: u64,
    /// Lines left out (`bad_lines = "skip"`), by reason.
    pub skipped: Skipped,
    pub types: usize,
    pub seconds: f64,
    pub mb_per_sec: f64,
    /// The corpus's type/token curve (from `build_vocab` and merges).
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub curve: Option<TypeTokenCurve>,
}

async fn count_one(
    input: Input,
    opts: TextOptions,
    meter: Arc<Meter>,
) -> Result<(HashMap<String, u64>, u64, u64, Skipped)> {
    let mut r = input.open(&opts).await?;
    let mut counts: HashMap<String, u64> = HashMap::new();
    let mut line = String::new();
    let (mut tokens, mut reported, mut lines) = (0u64, 0u64, 0u64);
    let mut skipped = Skipped::default();
    while r.next_source().await? {
        while r.next_line(&mut line).await? {
            for w in line.split_whitespace() {
                match counts.get_mut(w) {
                    Some(c) => *c += 1,
                    None => {
                        counts.insert(w.to_string(), 1);
                    }
                }
                tokens += 1;
            }
            if r.progress() - reported >= REPORT_BYTES {
                meter.add(r.progress() - reported);
                reported = r.progress();
            }
        }
        lines += r.lines();
        warn_skipped(&r);
        skipped.add(&r.skipped());
    }
    meter.add(r.progress() - reported);
    if lines > 0 {
        *counts.entry(EOS.to_string()).or_insert(0) += lines;
    }
    Ok((counts, tokens + lines, lines, skipped))
}

/// Say what a source's reading left out.
fn warn_skipped(r: &LineReader) {
    let s = r.skipped();
    if s.lines() > 0 {
        tracing::warn!(
            input = %r.url(),
            member = r.member().unwrap_or(""),
            lines = s.lines(),
            invalid_utf8 = s.invalid_utf8,
            control_bytes = s.control_bytes,
            too_long = s.too_long,
            no_text = s.no_text,
            bytes = s.bytes,
            "bad lines skipped"
        );
    }
}

/// Word counts over all inputs (one `<eos>` per line), `parallel` inputs at a time.
pub async fn count_words(
    inputs: &[Input],
    opts: &TextOptions,
    parallel: usize,
    bar: bool,
) -> Result<(HashMap<String, u64>, Counted)> {
    let total: u64 = inputs.iter().map(|i| i.size).sum();
    let meter = Arc::new(Meter::new("counting", total, bar));
    let mut tasks = futures::stream::iter(inputs.iter().cloned().map(|input| {
        let (opts, meter) = (opts.clone(), meter.clone());
        tokio::spawn(count_one(input, opts, meter))
    }))
    .buffer_unordered(parallel.max(1));
    let mut counts: HashMap<String, u64> = HashMap::new();
    let (mut tokens, mut lines, mut skipped) = (0u64, 0u64, Skipped::default());
    while let Some(joined) = tasks.next().await {
        let (c, t, l, s) =
            joined.map_err(|e| Error::Data(format!("counting task failed: {e}")))??;
        tokens += t;
        lines += l;
        skipped.add(&s);
        if counts.is_empty() {
            counts = c;
            continue;
        }
        for (w, n) in c {
            *counts.entry(w).or_insert(0) += n;
        }
    }
    meter.finish();
    let stats = Counted {
        inputs: inputs.len(),
        bytes: total,
        lines,
        tokens,
        skipped,
        types: counts.len(),
        seconds: meter.seconds(),
        mb_per_sec: total as f64 / 1e6 / meter.seconds().max(1e-9),
        curve: None,
    };
    Ok((counts, stats))
}

/// Count the inputs and write the vocabulary (`vocab.txt`, `size` most frequent words
/// plus `<unk>`; 0 = all) to `out`; the counts' type/token curve goes in the figures.
pub async fn build_vocab(
    inputs: &[Input],
    out: &Location,
    opts: &TextOptions,
    size: usize,
    parallel: usize,
    bar: bool,
) -> Result<(Vocab, Counted)> {
    let (counts, mut stats) = count_words(inputs, opts, parallel, bar).await?;
    stats.curve = Some(type_token_curve(&counts));
    let vocab = Vocab::build(counts, size)?;
    out.put(VOCAB_FILE, Bytes::from(vocab.to_text())).await?;
    Ok((vocab, stats))
}

/// What a tokenising task hands the shard writer: ids in batches, then its sources.
enum Tokenised {
    Ids(Vec<u32>),
    Done(Vec<Source>),
}

/// Ids per batch a tokenising task sends.
const BATCH_IDS: usize = 1 << 20;
/// Ids all tokenising tasks may hold ahead of the writer (256 MiB): a compressed input
/// holds no more of the writer's memory than a plain one.
const IDS_AHEAD: usize = 64 << 20;

/// Tokenise one input into `tx`, batch by batch; an error is sent as the last message.
async fn ids_of(
    input: Input,
    opts: TextOptions,
    vocab: Arc<Vocab>,
    meter: Arc<Meter>,
    tx: tokio::sync::mpsc::Sender<Result<Tokenised>>,
) {
    let run = async {
        let mut r = input.open(&opts).await?;
        let mut ids = Vec::with_capacity(BATCH_IDS + (1 << 16));
        let mut line = String::new();
        let mut reported = 0u64;
        let mut sources = Vec::new();
        while r.next_source().await? {
            while r.next_line(&mut line).await? {
                ids.extend(line.split_whitespace().map(|w| vocab.id(w)));
                ids.push(vocab.eos());
                if ids.len() >= BATCH_IDS {
                    let full =
                        std::mem::replace(&mut ids, Vec::with_capacity(BATCH_IDS + (1 << 16)));
                    if tx.send(Ok(Tokenised::Ids(full))).await.is_err() {
                        return Ok(None); // the writer stopped
                    }
                }
                if r.progress() - reported >= REPORT_BYTES {
                    meter.add(r.progress() - reported);
                    reported = r.progress();
                }
            }
            sources.push(Source {
                url: input.url(),
                member: r.member().map(str::to_string),
                format: r.format_name(),
                bytes: input.size,
                e_tag: input.e_tag.clone(),
                lines: r.lines(),
                skipped: r.skipped(),
            });
        }
        meter.add(r.progress() - reported);
        if !ids.is_empty() && tx.send(Ok(Tokenised::Ids(ids))).await.is_err() {
            return Ok(None);
        }
        Ok(Some(sources))
    };
    let last = match run.await {
        Ok(None) => return,
        Ok(Some(sources)) => Ok(Tokenised::Done(sources)),
        Err(e) => Err(e),
    };
    let _ = tx.send(last).await;
}

/// What `write_shards` wrote.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Sharded {
    pub split: String,
    pub inputs: usize,
    pub bytes: u64,
    pub tokens: u64,
    pub shards: usize,
    pub unk_tokens: u64,
    /// Lines left out (`bad_lines = "skip"`), by reason.
    pub skipped: Skipped,
    pub seconds: f64,
    pub mb_per_sec: f64,
}

/// Where a split's shards go and how they are cut: split `split` of `out`, shards of
/// `shard_tokens` ids.
#[derive(Clone, Copy)]
pub struct SplitOut<'a> {
    pub out: &'a Location,
    pub split: &'a str,
    pub shard_tokens: u64,
}

/// Tokenise the inputs with `vocab` into the split `to` names (`parallel` inputs at
/// once, at most 64M ids held ahead of the writer): its shards, then the manifest
/// (written last, so a half-written split never looks complete; it records
/// `text_options`, how the text was read), and `vocab.txt` beside them so the split's
/// location opens as a dataset.
pub async fn write_shards(
    inputs: &[Input],
    vocab: Arc<Vocab>,
    to: SplitOut<'_>,
    opts: &TextOptions,
    text_options: serde_json::Value,
    parallel: usize,
    bar: bool,
) -> Result<(Manifest, Sharded)> {
    let SplitOut {
        out,
        split,
        shard_tokens,
    } = to;
    if split.is_empty() || split.contains(['/', '\\']) {
        return Err(Error::Config(format!(
            "split name {split:?}: use a plain name such as train, valid or test"
        )));
    }
    let total: u64 = inputs.iter().map(|i| i.size).sum();
    let meter = Arc::new(Meter::new("sharding", total, bar));
    out.delete(&Manifest::object_name(split)).await?;
    out.put(VOCAB_FILE, Bytes::from(vocab.to_text())).await?;
    let mut writer = ShardWriter::new(out, split, &vocab, shard_tokens);
    let (sources, unk_tokens, skipped) =
        tokenise_into(inputs, &vocab, opts, parallel, &meter, &mut writer).await?;
    let m = writer.finish(sources, text_options).await?;
    meter.finish();
    let stats = Sharded {
        split: split.to_string(),
        inputs: inputs.len(),
        bytes: total,
        tokens: m.tokens,
        shards: m.shards.len(),
        unk_tokens,
        skipped,
        seconds: meter.seconds(),
        mb_per_sec: total as f64 / 1e6 / meter.seconds().max(1e-9),
    };
    Ok((m, stats))
}

/// Where tokenised ids go, in input order: a split's shards, or a part's place in them.
pub(super) trait Ids {
    async fn extend(&mut self, ids: &[u32]) -> Result<()>;
}

impl Ids for ShardWriter {
    async fn extend(&mut self, ids: &[u32]) -> Result<()> {
        ShardWriter::extend(self, ids).await
    }
}

/// Tokenise `inputs` into `sink` in input order, `parallel` inputs at a time each ahead of
/// the sink by a bounded number of batches: their sources, `<unk>` tokens and lines
/// skipped.
pub(super) async fn tokenise_into<S: Ids>(
    inputs: &[Input],
    vocab: &Arc<Vocab>,
    opts: &TextOptions,
    parallel: usize,
    meter: &Arc<Meter>,
    sink: &mut S,
) -> Result<(Vec<Source>, u64, Skipped)> {
    let parallel = parallel.max(1);
    let ahead = (IDS_AHEAD / BATCH_IDS / parallel).max(2);
    let spawn = |input: &Input| {
        let (tx, rx) = tokio::sync::mpsc::channel(ahead);
        let (opts, vocab, meter) = (opts.clone(), vocab.clone(), meter.clone());
        tokio::spawn(ids_of(input.clone(), opts, vocab, meter, tx));
        rx
    };
    let mut pending: std::collections::VecDeque<_> =
        inputs.iter().take(parallel).map(spawn).collect();
    let mut next = pending.len();
    let mut sources = Vec::new();
    let unk = vocab.unk();
    let mut unk_tokens = 0u64;
    let mut skipped = Skipped::default();
    while let Some(mut rx) = pending.pop_front() {
        loop {
            match rx.recv().await {
                Some(Ok(Tokenised::Ids(ids))) => {
                    unk_tokens += ids.iter().filter(|&&i| i == unk).count() as u64;
                    sink.extend(&ids).await?;
                }
                Some(Ok(Tokenised::Done(from))) => {
                    for source in from {
                        skipped.add(&source.skipped);
                        sources.push(source);
                    }
                    break;
                }
                Some(Err(e)) => return Err(e),
                None => {
                    return Err(Error::Data(
                        "a tokenising task failed before its end".into(),
                    ));
                }
            }
        }
        if let Some(input) = inputs.get(next) {
            pending.push_back(spawn(input));
            next += 1;
        }
    }
    Ok((sources, unk_tokens, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::shards::SplitReader;

    /// Split "train" of `out`, one token per shard.
    fn train_split(out: &Location) -> SplitOut<'_> {
        SplitOut {
            out,
            split: "train",
            shard_tokens: 1,
        }
    }

    async fn put(loc: &Location, name: &str, text: &str) {
        loc.put(name, Bytes::from(text.to_string())).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn vocab_and_shards_from_many_inputs_in_order() {
        let src = Location::parse("memory://corpus-tests/src").unwrap();
        // Enough inputs that tasks finish out of order.
        let mut expect: Vec<String> = Vec::new();
        for k in 0..12 {
            let mut text = String::new();
            for l in 0..(50 + 37 * (k % 5)) {
                let line = format!("w{} w{} common", k, l % 7);
                expect.extend(line.split(' ').map(String::from));
                expect.push(EOS.into());
                text.push_str(&line);
                text.push('\n');
            }
            put(&src, &format!("part-{k:02}.txt"), &text).await;
        }
        put(&src, "part.manifest.json", "{}").await;
        let inputs = expand_inputs(&["memory://corpus-tests/src".to_string()])
            .await
            .unwrap();
        assert_eq!(inputs.len(), 12);
        let out = Location::parse("memory://corpus-tests/out").unwrap();
        let opts = TextOptions::default();
        let (vocab, counted) = build_vocab(&inputs, &out, &opts, 0, 4, false)
            .await
            .unwrap();
        assert_eq!(counted.tokens as usize, expect.len());
        assert_eq!(vocab.count(vocab.id("common")), (expect.len() / 4) as u64);
        let vocab = Arc::new(vocab);
        let (m, st) = write_shards(
            &inputs,
            vocab.clone(),
            train_split(&out),
            &opts,
            serde_json::Value::Null,
            4,
            false,
        )
        .await
        .unwrap();
        assert_eq!(st.tokens as usize, expect.len());
        assert_eq!(st.unk_tokens, 0);
        assert_eq!(m.sources.len(), 12);
        assert!(m.sources[0].url.ends_with("part-00.txt"));
        let r = SplitReader::open(&out, "train", &vocab).await.unwrap();
        let ids = r.read(0, r.tokens()).await.unwrap();
        let words: Vec<&str> = ids.iter().map(|&i| vocab.word(i)).collect();
        assert_eq!(words, expect);
        // A single object URL is that object alone.
        let one = expand_inputs(&["memory://corpus-tests/src/part-03.txt".to_string()])
            .await
            .unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].name, "part-03.txt");
    }

    #[tokio::test]
    async fn bad_inputs_name_the_object() {
        let e = expand_inputs(&["memory://corpus-tests/nothing-here".to_string()])
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("nothing-here"), "{e}");
        let src = Location::parse("memory://corpus-tests/bad").unwrap();
        src.put("a.txt", Bytes::from_static(b"ok line\n\xff\xfe bad\n"))
            .await
            .unwrap();
        let inputs = expand_inputs(&["memory://corpus-tests/bad".to_string()])
            .await
            .unwrap();
        let e = count_words(&inputs, &TextOptions::default(), 2, false)
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("a.txt") && e.contains("line 2"), "{e}");
    }

    #[tokio::test]
    async fn skipped_lines_are_counted_the_same_in_both_passes() {
        let src = Location::parse("memory://corpus-tests/skip").unwrap();
        put(&src, "a.txt", "a b\nnul \u{0} here\nb c\n").await;
        src.put("b.txt", Bytes::from_static(b"\xff\nc\n"))
            .await
            .unwrap();
        let inputs = expand_inputs(&["memory://corpus-tests/skip".to_string()])
            .await
            .unwrap();
        let opts = TextOptions {
            bad_lines: crate::data::text::BadLines::Skip,
            ..Default::default()
        };
        let out = Location::parse("memory://corpus-tests/skip-out").unwrap();
        let (vocab, counted) = build_vocab(&inputs, &out, &opts, 0, 2, false)
            .await
            .unwrap();
        // a b <eos> b c <eos> c <eos>
        assert_eq!((counted.tokens, counted.lines), (8, 3));
        assert_eq!(vocab.count(vocab.eos()), 3);
        assert_eq!(
            (counted.skipped.control_bytes, counted.skipped.invalid_utf8),
            (1, 1)
        );
        let vocab = Arc::new(vocab);
        let (m, st) = write_shards(
            &inputs,
            vocab.clone(),
            train_split(&out),
            &opts,
            serde_json::Value::Null,
            2,
            false,
        )
        .await
        .unwrap();
        assert_eq!(m.tokens, 8);
        assert_eq!(st.skipped, counted.skipped);
        assert_eq!(m.sources[0].skipped.control_bytes, 1);
        assert_eq!(m.sources[1].skipped.invalid_utf8, 1);
        // A corpus replaced between the passes is refused, not tokenised half new.
        put(&src, "a.txt", "a b\nb c c\n").await;
        let e = write_shards(
            &inputs,
            vocab,
            train_split(&out),
            &opts,
            serde_json::Value::Null,
            2,
            false,
        )
        .await
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("a.txt changed"), "{e}");
    }
}
