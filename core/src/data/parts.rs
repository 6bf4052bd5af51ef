//! Preparation in parts, for array jobs with no coordinator (a SLURM array, a Kubernetes
//! Indexed Job): `lightrnn vocab --part I/N` counts its share of the inputs and
//! `vocab --merge` sums the parts into the vocabulary; `lightrnn shard --part I/N`
//! tokenises its share into a part split and `shard --merge` writes the split. The
//! result is byte for byte what `vocab` and `shard` write in one process from the same
//! inputs in the same order.
//!
//! A part's share is a contiguous run of the inputs, balanced by bytes, so the parts
//! concatenated are the inputs in order. Parts go below `parts/` of the output; each is
//! committed by its last object (the counts file, the part split's manifest), so a part
//! run again (a lost array task, retried) replaces its result and nothing is counted
//! twice. A merge checks that every part is there and was made from the same inputs,
//! at the same versions, with the same text options; a merged split's parts are deleted
//! once its manifest is written.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::corpus::{Counted, Input, Meter, Sharded, SplitOut, count_words, write_shards};
use super::shards::{Manifest, ShardWriter, SplitReader};
use super::store::Location;
use super::text::{Skipped, TextOptions};
use super::vocab::{VOCAB_FILE, Vocab, hex, type_token_curve};
use crate::{Error, Result};

/// Where parts are written, below the output location.
pub const PARTS_DIR: &str = "parts";
const COUNTS_FORMAT: &str = "lightrnn.counts";
/// Tokens moved at a time by a merge.
const MERGE_TOKENS: u64 = 4 << 20;

/// Part `index` (0-based) of `of`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub index: usize,
    pub of: usize,
}

impl std::str::FromStr for Part {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::Config(format!(
                "part {s:?}: expected I/N with 0 <= I < N (SLURM: $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)"
            ))
        };
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, of) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if of == 0 || index >= of {
            return Err(bad());
        }
        Ok(Part { index, of })
    }
}

impl Part {
    /// This part's inputs: those whose middle byte falls in its 1/N of all the bytes.
    pub fn share(&self, inputs: &[Input]) -> std::ops::Range<usize> {
        let total: u128 = inputs.iter().map(|i| u128::from(i.size)).sum();
        let owner = |at: u128| (at * self.of as u128).checked_div(total).unwrap_or(0) as usize;
        let (mut start, mut end, mut before) = (inputs.len(), inputs.len(), 0u128);
        for (k, input) in inputs.iter().enumerate() {
            let mid = before + u128::from(input.size) / 2;
            before += u128::from(input.size);
            let o = owner(mid).min(self.of - 1);
            if o >= self.index && start == inputs.len() {
                start = k;
            }
            if o > self.index {
                end = k;
                break;
            }
        }
        start.min(end)..end
    }

    fn tag(&self) -> String {
        format!("part-{:05}-of-{:05}", self.index, self.of)
    }
}

/// The inputs, their versions and order, as one digest: parts agree on what they split.
pub fn inputs_sha256(inputs: &[Input]) -> String {
    let mut h = Sha256::new();
    for i in inputs {
        h.update(format!(
            "{}\t{}\t{}\n",
            i.url(),
            i.size,
            i.e_tag.as_deref().unwrap_or("")
        ));
    }
    hex(&h.finalize())
}

/// The first line of a counts part.
#[derive(Debug, Serialize, Deserialize)]
struct CountsHeader {
    format: String,
    part: Part,
    inputs_sha256: String,
    text_options: TextOptions,
    counted: Counted,
}

fn counts_name(part: Part) -> String {
    format!("vocab.{}.tsv", part.tag())
}

/// Count part `part` of the inputs into `parts/vocab.part-I-of-N.tsv` of `out`: a JSON
/// header line, then `word<TAB>count` lines in byte order.
pub async fn count_part(
    inputs: &[Input],
    part: Part,
    out: &Location,
    opts: &TextOptions,
    parallel: usize,
    bar: bool,
) -> Result<(Counted, String)> {
    let share = &inputs[part.share(inputs)];
    let (counts, counted) = count_words(share, opts, parallel, bar).await?;
    let url = write_counts(
        &out.join(PARTS_DIR),
        part,
        &inputs_sha256(inputs),
        opts,
        &counted,
        &counts,
    )
    .await?;
    Ok((counted, url))
}

/// Write part `part`'s word counts below `parts`: a JSON header line, then
/// `word<TAB>count` lines in byte order. Its URL.
pub(super) async fn write_counts(
    parts: &Location,
    part: Part,
    inputs_sha256: &str,
    opts: &TextOptions,
    counted: &Counted,
    counts: &HashMap<String, u64>,
) -> Result<String> {
    let header = CountsHeader {
        format: COUNTS_FORMAT.into(),
        part,
        inputs_sha256: inputs_sha256.to_string(),
        text_options: opts.clone(),
        counted: counted.clone(),
    };
    let mut words: Vec<(&String, &u64)> = counts.iter().collect();
    words.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut text = serde_json::to_string(&header).map_err(|e| Error::Data(e.to_string()))?;
    text.push('\n');
    for (w, c) in words {
        text.push_str(w);
        text.push('\t');
        text.push_str(&c.to_string());
        text.push('\n');
    }
    let name = counts_name(part);
    parts.put(&name, Bytes::from(text)).await?;
    Ok(parts.url_of(&name))
}

/// Which of parts 0..n are missing, as a message, given the indices found.
fn check_complete(found: &[usize], of: usize, what: &str) -> Result<()> {
    let missing: Vec<String> = (0..of)
        .filter(|i| !found.contains(i))
        .map(|i| i.to_string())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::Data(format!(
        "{what}: parts {} of {of} are missing (run them, then merge again)",
        missing.join(", ")
    )))
}

/// The number of parts the names below `parts` say there are, with `prefix` and `suffix`
/// around `part-I-of-N`, and the parts found.
async fn parts_found(parts: &Location, prefix: &str, suffix: &str) -> Result<(usize, Vec<usize>)> {
    let (objects, _) = parts.list().await?;
    let mut of = None;
    let mut found = Vec::new();
    for (name, _) in objects {
        let Some(tag) = name
            .strip_prefix(prefix)
            .and_then(|n| n.strip_suffix(suffix))
        else {
            continue;
        };
        let Some((i, n)) = tag
            .strip_prefix("part-")
            .and_then(|t| t.split_once("-of-"))
            .and_then(|(i, n)| Some((i.parse::<usize>().ok()?, n.parse::<usize>().ok()?)))
        else {
            continue;
        };
        if of.is_some_and(|o| o != n) {
            return Err(Error::Data(format!(
                "{parts}: parts of {} and of {n} runs are both there; delete the stale ones",
                of.unwrap_or(0)
            )));
        }
        of = Some(n);
        found.push(i);
    }
    let of = of.ok_or_else(|| {
        Error::NotFound(format!("{parts}: no {prefix}part-I-of-N{suffix} objects"))
    })?;
    check_complete(&found, of, &parts.to_string())?;
    Ok((of, found))
}

/// Sum the counts parts of `out` into the vocabulary (`size` words; 0 = all) and write
/// `vocab.txt`, as [`super::corpus::build_vocab`] does in one process.
pub async fn merge_counts(
    inputs: &[Input],
    out: &Location,
    opts: &TextOptions,
    size: usize,
) -> Result<(Vocab, Counted)> {
    let started = std::time::Instant::now();
    let parts = out.join(PARTS_DIR);
    let (of, _) = parts_found(&parts, "vocab.", ".tsv").await?;
    let want = inputs_sha256(inputs);
    let mut counts: HashMap<String, u64> = HashMap::new();
    let mut total: Option<Counted> = None;
    for index in 0..of {
        let c = read_counts(&parts, Part { index, of }, &want, opts, &mut counts).await?;
        total = Some(match total {
            None => c,
            Some(mut t) => {
                add_counted(&mut t, &c);
                t
            }
        });
    }
    let counted = total.ok_or_else(|| Error::Data(format!("{parts}: no parts")))?;
    let (vocab, counted) = vocab_of(counts, counted, out, size).await?;
    tracing::info!(
        parts = of,
        seconds = started.elapsed().as_secs_f64(),
        "counts merged"
    );
    Ok((vocab, counted))
}

/// Add part `url`'s counts (part `part`, made from the inputs of digest `want` with
/// `opts`) to `counts`; its header's figures.
pub(super) async fn read_counts(
    parts: &Location,
    part: Part,
    want: &str,
    opts: &TextOptions,
    counts: &mut HashMap<String, u64>,
) -> Result<Counted> {
    let name = counts_name(part);
    let url = parts.url_of(&name);
    let body = parts.get(&name).await?;
    let text = std::str::from_utf8(&body).map_err(|_| Error::Data(format!("{url}: not UTF-8")))?;
    let (head, rest) = text.split_once('\n').unwrap_or((text, ""));
    let h: CountsHeader = serde_json::from_str(head)
        .map_err(|e| Error::Data(format!("{url}: not a counts part: {e}")))?;
    let Part { index, of } = part;
    if h.format != COUNTS_FORMAT || h.part != part {
        return Err(Error::Data(format!("{url}: not part {index} of {of}")));
    }
    if h.inputs_sha256 != want || h.text_options != *opts {
        return Err(Error::Data(format!(
            "{url} was counted from other inputs or text options than these (inputs sha256 {} here, {} there); count the parts again",
            &want[..want.len().min(12)],
            &h.inputs_sha256[..h.inputs_sha256.len().min(12)]
        )));
    }
    for line in rest.lines() {
        let (w, c) = line
            .split_once('\t')
            .and_then(|(w, c)| Some((w, c.parse::<u64>().ok()?)))
            .ok_or_else(|| Error::Data(format!("{url}: bad line {line:?}")))?;
        match counts.get_mut(w) {
            Some(n) => *n += c,
            None => {
                counts.insert(w.to_string(), c);
            }
        }
    }
    Ok(h.counted)
}

/// Part figures summed (the time: the slowest part's).
pub(super) fn add_counted(t: &mut Counted, c: &Counted) {
    t.inputs += c.inputs;
    t.bytes += c.bytes;
    t.lines += c.lines;
    t.tokens += c.tokens;
    t.skipped.add(&c.skipped);
    t.seconds = t.seconds.max(c.seconds);
}

/// The vocabulary of the summed `counts` (`size` words; 0 = all), written as `vocab.txt`
/// of `out`, and the figures of all parts (`counted`) completed with the types, the
/// type/token curve and the job's rate.
pub(super) async fn vocab_of(
    counts: HashMap<String, u64>,
    mut counted: Counted,
    out: &Location,
    size: usize,
) -> Result<(Vocab, Counted)> {
    counted.types = counts.len();
    counted.curve = Some(type_token_curve(&counts));
    counted.mb_per_sec = counted.bytes as f64 / 1e6 / counted.seconds.max(1e-9);
    let vocab = Vocab::build(counts, size)?;
    out.put(VOCAB_FILE, Bytes::from(vocab.to_text())).await?;
    Ok((vocab, counted))
}

fn part_split(split: &str, part: Part) -> String {
    format!("{split}.{}", part.tag())
}

/// Tokenise part `part` of the inputs into the part split `SPLIT.part-I-of-N` below
/// `parts/` of the output (a split of its own: shards, manifest last).
#[allow(clippy::too_many_arguments)]
pub async fn shard_part(
    inputs: &[Input],
    part: Part,
    vocab: Arc<Vocab>,
    to: SplitOut<'_>,
    opts: &TextOptions,
    text_options: serde_json::Value,
    parallel: usize,
    bar: bool,
) -> Result<(Manifest, Sharded)> {
    let parts = to.out.join(PARTS_DIR);
    let share = &inputs[part.share(inputs)];
    let tagged = serde_json::json!({
        "split": text_options,
        "part": part,
        "inputs_sha256": inputs_sha256(inputs),
    });
    let split = part_split(to.split, part);
    write_shards(
        share,
        vocab,
        SplitOut {
            out: &parts,
            split: &split,
            shard_tokens: to.shard_tokens,
        },
        opts,
        tagged,
        parallel,
        bar,
    )
    .await
}

/// Write split `to.split` from its parts, as [`write_shards`] writes it in one process
/// (same shards, same manifest), then delete the parts.
pub async fn merge_shards(
    inputs: &[Input],
    vocab: Arc<Vocab>,
    to: SplitOut<'_>,
    text_options: serde_json::Value,
    bar: bool,
) -> Result<(Manifest, Sharded)> {
    let SplitOut {
        out,
        split,
        shard_tokens,
    } = to;
    let parts = out.join(PARTS_DIR);
    let (of, _) = parts_found(&parts, &format!("{split}."), ".manifest.json").await?;
    let want = inputs_sha256(inputs);
    let mut manifests = Vec::new();
    for index in 0..of {
        let name = part_split(split, Part { index, of });
        let m = Manifest::load(&parts, &name).await?;
        let url = parts.url_of(&Manifest::object_name(&name));
        let t = &m.text_options;
        if t["inputs_sha256"] != want.as_str() || t["split"] != text_options {
            return Err(Error::Data(format!(
                "{url} was written from other inputs or options than these; shard the parts again"
            )));
        }
        manifests.push((name, m));
    }
    let total: u64 = manifests.iter().map(|(_, m)| m.tokens).sum();
    let meter = Meter::new("merging", total * 4, bar);
    out.delete(&Manifest::object_name(split)).await?;
    out.put(VOCAB_FILE, Bytes::from(vocab.to_text())).await?;
    let mut writer = ShardWriter::new(out, split, &vocab, shard_tokens);
    let (mut sources, mut skipped, mut unk_tokens) = (Vec::new(), Skipped::default(), 0u64);
    for (name, m) in &manifests {
        let r = SplitReader::open(&parts, name, &vocab).await?;
        let mut at = 0;
        while at < r.tokens() {
            let to = (at + MERGE_TOKENS).min(r.tokens());
            let ids = r.read(at, to).await?;
            unk_tokens += ids.iter().filter(|&&i| i == vocab.unk()).count() as u64;
            writer.extend(&ids).await?;
            meter.add((to - at) * 4);
            at = to;
        }
        for s in &m.sources {
            skipped.add(&s.skipped);
            sources.push(s.clone());
        }
    }
    let m = writer.finish(sources, text_options).await?;
    meter.finish();
    for (name, pm) in &manifests {
        parts.delete(&Manifest::object_name(name)).await?;
        for s in &pm.shards {
            parts.delete(&s.name).await?;
        }
    }
    // The copy of the vocabulary each part wrote beside its shards (no reader needs it).
    parts.delete(VOCAB_FILE).await?;
    let stats = Sharded {
        split: split.to_string(),
        inputs: inputs.len(),
        bytes: inputs.iter().map(|i| i.size).sum(),
        tokens: m.tokens,
        shards: m.shards.len(),
        unk_tokens,
        skipped,
        seconds: meter.seconds(),
        mb_per_sec: meter.mb_per_sec(),
    };
    Ok((m, stats))
}

#[cfg(test)]
mod tests;
