//! A dataset prepared by a distributed job's workers: the coordinator lists the text and
//! splits each split's inputs into parts ([`Part`], contiguous and balanced by bytes), and
//! hands out [`Task`]s in three phases; it reads no input bytes itself.
//!
//! 1. **Count.** Each part's tokens are counted, and the training split's words written
//!    as a counts part (`parts/vocab.part-I-of-N.tsv`, as `lightrnn vocab --part`
//!    writes). The coordinator sums them into `vocab.txt`.
//! 2. **Shard.** Each part's place in its split is known from the counts: tokens
//!    `start..start + tokens` of `total`. A part writes every shard that lies wholly in its
//!    place under the shard's final name, and the ends of shards it shares with its
//!    neighbours as pieces below `parts/`.
//! 3. **Stitch.** Each shard shared by several parts is joined from its pieces.
//!
//! The coordinator then writes each split's manifest from the tasks' results (the
//! training split's last) and deletes `parts/`. The bytes are those one process writes
//! from the same inputs in the same order ([`super::dataset`]). Every task writes only
//! objects named by what it covers, the same bytes each time, so a task run again (its
//! worker lost) or twice at once replaces its objects and nothing is counted twice; a
//! part whose tokens differ from its count is an error, never a shifted split.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::corpus::{Counted, Ids, Input, Meter, count_words, tokenise_into};
use super::dataset::{PrepareOptions, SPLITS};
use super::parts::{
    PARTS_DIR, Part, add_counted, inputs_sha256, read_counts, vocab_of, write_counts,
};
use super::shards::{
    BLOCK_TOKENS, MANIFEST_FORMAT, Manifest, ShardInfo, Source, shard_name, shard_object,
    shard_size,
};
use super::store::Location;
use super::text::{Skipped, TextOptions};
use super::vocab::{VOCAB_FILE, Vocab};
use crate::{Error, Result};

/// An input as a task names it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InputRef {
    /// The location holding it.
    pub loc: String,
    pub name: String,
    pub size: u64,
    pub e_tag: Option<String>,
}

impl From<&Input> for InputRef {
    fn from(i: &Input) -> Self {
        Self {
            loc: i.loc.url().to_string(),
            name: i.name.clone(),
            size: i.size,
            e_tag: i.e_tag.clone(),
        }
    }
}

impl InputRef {
    fn input(&self) -> Result<Input> {
        Ok(Input {
            loc: Location::parse(&self.loc)?,
            name: self.name.clone(),
            size: self.size,
            e_tag: self.e_tag.clone(),
        })
    }
}

/// The end of a shard shared by two or more parts, written by one of them below
/// `parts/`: tokens `at..at + tokens` of shard `shard`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Piece {
    pub shard: u64,
    pub at: u64,
    pub tokens: u64,
    pub name: String,
    pub crc32c: u32,
}

/// What a worker is asked to do.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Task {
    /// Count part `part` of a split's inputs: its tokens, and where `words`, its words
    /// into the counts part below `dataset`'s `parts/`.
    Count {
        split: String,
        part: Part,
        inputs: Vec<InputRef>,
        /// The digest of all the split's inputs (the counts part's header).
        inputs_sha256: String,
        text: TextOptions,
        dataset: String,
        words: bool,
    },
    /// Tokenise part `part` into its place: tokens `start..start + tokens` of the split's
    /// `total`, in shards of `shard_tokens`.
    Shard {
        split: String,
        part: Part,
        inputs: Vec<InputRef>,
        text: TextOptions,
        dataset: String,
        start: u64,
        tokens: u64,
        total: u64,
        shard_tokens: u64,
    },
    /// Join shard `shard` (of `tokens` tokens) from its pieces.
    Stitch {
        split: String,
        dataset: String,
        shard: u64,
        tokens: u64,
        pieces: Vec<Piece>,
    },
    /// A task too large for a control message, as an object ([`INLINE_BYTES`]).
    Stored { url: String },
}

/// Tasks and results larger than this travel as objects below `parts/`, named in the
/// control message (a part of 100k inputs, or of thousands of shards, stays far below
/// the messages' limit).
pub const INLINE_BYTES: usize = 1 << 20;

/// `value` as it travels: itself, or where it is too large, the object holding it
/// (`parts/NAME` of `dataset`), through `stored`.
pub async fn inline_or_stored<T: Serialize>(
    value: T,
    dataset: &Location,
    name: &str,
    stored: impl FnOnce(String) -> T,
) -> Result<T> {
    let json = serde_json::to_vec(&value).map_err(|e| Error::Data(e.to_string()))?;
    if json.len() <= INLINE_BYTES {
        return Ok(value);
    }
    let parts = dataset.join(PARTS_DIR);
    parts.put(name, json.into()).await?;
    Ok(stored(parts.url_of(name)))
}

/// The value stored at `url`, which must lie below `dataset`'s `parts/`.
async fn load_stored<T: serde::de::DeserializeOwned>(url: &str, dataset: &Location) -> Result<T> {
    let parts = dataset.join(PARTS_DIR);
    let name = url
        .strip_prefix(parts.url())
        .map(|n| n.trim_start_matches('/'))
        .filter(|n| !n.is_empty() && !n.contains(".."))
        .ok_or_else(|| Error::Data(format!("{url}: not an object below {parts}")))?;
    let body = parts.get(name).await?;
    serde_json::from_slice(&body).map_err(|e| Error::Data(format!("{url}: {e}")))
}

/// What a task did.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Done {
    Counted {
        counted: Counted,
    },
    Sharded {
        /// Whole shards written, by index.
        shards: Vec<(u64, ShardInfo)>,
        pieces: Vec<Piece>,
        sources: Vec<Source>,
        unk_tokens: u64,
        skipped: Skipped,
    },
    Stitched {
        shard: u64,
        info: ShardInfo,
    },
    /// A result too large for a control message, as an object ([`INLINE_BYTES`]).
    Stored {
        url: String,
    },
}

impl Done {
    /// The result itself, read from its object where it was stored (below `dataset`'s
    /// `parts/`).
    pub async fn load(self, dataset: &Location) -> Result<Done> {
        match self {
            Done::Stored { url } => load_stored(&url, dataset).await,
            d => Ok(d),
        }
    }
}

impl Task {
    /// Input bytes the task reads (0 for a stitch).
    pub fn bytes(&self) -> u64 {
        match self {
            Task::Count { inputs, .. } | Task::Shard { inputs, .. } => {
                inputs.iter().map(|i| i.size).sum()
            }
            Task::Stitch { .. } | Task::Stored { .. } => 0,
        }
    }

    /// The dataset it writes to (none for a stored task, until loaded).
    pub fn dataset(&self) -> Option<&str> {
        match self {
            Task::Count { dataset, .. }
            | Task::Shard { dataset, .. }
            | Task::Stitch { dataset, .. } => Some(dataset),
            Task::Stored { .. } => None,
        }
    }

    /// The task itself, read from its object where it was stored.
    pub async fn load(self) -> Result<Task> {
        let Task::Stored { url } = self else {
            return Ok(self);
        };
        let loc = Location::parse(&url)?;
        let (parent, name) = (
            loc.parent()
                .ok_or_else(|| Error::Data(format!("{url}: not an object")))?,
            loc.name(),
        );
        let body = parent.get(&name).await?;
        let task: Task =
            serde_json::from_slice(&body).map_err(|e| Error::Data(format!("{url}: {e}")))?;
        match task {
            Task::Stored { .. } => Err(Error::Data(format!("{url}: a stored task names another"))),
            t => Ok(t),
        }
    }

    /// One line for logs: `count train part 1/4 (3 inputs, 12.0 MB)`.
    pub fn describe(&self) -> String {
        let mb = self.bytes() as f64 / 1e6;
        match self {
            Task::Count {
                split,
                part,
                inputs,
                ..
            } => format!(
                "count {split} part {}/{} ({} inputs, {mb:.1} MB)",
                part.index,
                part.of,
                inputs.len()
            ),
            Task::Shard {
                split,
                part,
                inputs,
                ..
            } => format!(
                "shard {split} part {}/{} ({} inputs, {mb:.1} MB)",
                part.index,
                part.of,
                inputs.len()
            ),
            Task::Stitch {
                split,
                shard,
                pieces,
                ..
            } => format!(
                "stitch shard {} from {} pieces",
                shard_name(split, *shard),
                pieces.len()
            ),
            Task::Stored { url } => format!("the task stored at {url}"),
        }
    }

    /// Run the task, `parallel` inputs at a time; `bar`: a progress bar, else progress
    /// lines.
    pub async fn run(&self, parallel: usize, bar: bool) -> Result<Done> {
        match self {
            Task::Count {
                part,
                inputs,
                inputs_sha256,
                text,
                dataset,
                words,
                ..
            } => {
                let inputs = inputs
                    .iter()
                    .map(InputRef::input)
                    .collect::<Result<Vec<_>>>()?;
                let (counts, counted) = count_words(&inputs, text, parallel, bar).await?;
                if *words {
                    let parts = Location::parse(dataset)?.join(PARTS_DIR);
                    write_counts(&parts, *part, inputs_sha256, text, &counted, &counts).await?;
                }
                Ok(Done::Counted { counted })
            }
            Task::Shard { .. } => self.shard(parallel, bar).await,
            Task::Stitch {
                split,
                dataset,
                shard,
                tokens,
                pieces,
            } => stitch(split, &Location::parse(dataset)?, *shard, *tokens, pieces).await,
            Task::Stored { url } => Err(Error::Data(format!("{url}: run before it was loaded"))),
        }
    }

    async fn shard(&self, parallel: usize, bar: bool) -> Result<Done> {
        let Task::Shard {
            split,
            part,
            inputs,
            text,
            dataset,
            start,
            tokens,
            total,
            shard_tokens,
        } = self
        else {
            unreachable!("called on a shard task")
        };
        let dataset = Location::parse(dataset)?;
        let body = dataset.get(VOCAB_FILE).await?;
        let url = dataset.url_of(VOCAB_FILE);
        let vocab = Arc::new(Vocab::parse(
            std::str::from_utf8(&body).map_err(|_| Error::Data(format!("{url}: not UTF-8")))?,
            &url,
        )?);
        let inputs = inputs
            .iter()
            .map(InputRef::input)
            .collect::<Result<Vec<_>>>()?;
        let meter = Arc::new(Meter::new("sharding", self.bytes(), bar));
        let mut place = Place {
            dataset: &dataset,
            parts: dataset.join(PARTS_DIR),
            split,
            part: *part,
            start: *start,
            size: shard_size(*shard_tokens),
            pos: *start,
            end: start + tokens,
            total: *total,
            buf: Vec::new(),
            shards: Vec::new(),
            pieces: Vec::new(),
        };
        let (sources, unk_tokens, skipped) =
            tokenise_into(&inputs, &vocab, text, parallel, &meter, &mut place).await?;
        meter.finish();
        if place.pos != place.end || !place.buf.is_empty() {
            return Err(Error::Data(format!(
                "{split} part {}/{}: {} tokens where its count found {tokens} (did an input change?)",
                part.index,
                part.of,
                place.pos - start + place.buf.len() as u64
            )));
        }
        Ok(Done::Sharded {
            shards: place.shards,
            pieces: place.pieces,
            sources,
            unk_tokens,
            skipped,
        })
    }
}

/// A part's place in its split: it writes the shards that lie wholly in it, and pieces
/// of those it shares.
struct Place<'a> {
    dataset: &'a Location,
    parts: Location,
    split: &'a str,
    part: Part,
    /// Where the part's tokens start in the split.
    start: u64,
    /// Tokens per shard.
    size: u64,
    /// The split position of `buf`'s first id.
    pos: u64,
    end: u64,
    total: u64,
    buf: Vec<u32>,
    shards: Vec<(u64, ShardInfo)>,
    pieces: Vec<Piece>,
}

impl Ids for Place<'_> {
    async fn extend(&mut self, ids: &[u32]) -> Result<()> {
        if self.pos + (self.buf.len() + ids.len()) as u64 > self.end {
            return Err(Error::Data(format!(
                "{} part {}/{}: more tokens than the {} its count found (did an input change?)",
                self.split,
                self.part.index,
                self.part.of,
                self.end - self.start
            )));
        }
        self.buf.extend_from_slice(ids);
        loop {
            let shard = self.pos / self.size;
            let shard_start = shard * self.size;
            let shard_end = (shard_start + self.size).min(self.total);
            let upto = shard_end.min(self.end);
            let n = upto - self.pos;
            if n == 0 || (self.buf.len() as u64) < n {
                return Ok(());
            }
            let rest = self.buf.split_off(n as usize);
            let ids = std::mem::replace(&mut self.buf, rest);
            if self.pos == shard_start && upto == shard_end {
                let name = shard_name(self.split, shard);
                let (bytes, info) = shard_object(name.clone(), &ids, BLOCK_TOKENS);
                self.dataset.put(&name, bytes).await?;
                self.shards.push((shard, info));
            } else {
                let at = self.pos - shard_start;
                let name = format!("{}.at-{at:010}", shard_name(self.split, shard));
                let (bytes, info) = shard_object(name.clone(), &ids, BLOCK_TOKENS);
                self.parts.put(&name, bytes.clone()).await?;
                self.pieces.push(Piece {
                    shard,
                    at,
                    tokens: info.tokens,
                    name,
                    crc32c: crc32c::crc32c(&bytes),
                });
            }
            self.pos = upto;
        }
    }
}

/// Join shard `shard` of `split` from its pieces, checked against their records.
async fn stitch(
    split: &str,
    dataset: &Location,
    shard: u64,
    tokens: u64,
    pieces: &[Piece],
) -> Result<Done> {
    let parts = dataset.join(PARTS_DIR);
    let mut bytes = Vec::with_capacity(tokens as usize * 4);
    for p in pieces {
        let url = parts.url_of(&p.name);
        if p.at != bytes.len() as u64 / 4 {
            return Err(Error::Data(format!(
                "{url}: a piece at token {} of shard {shard}, where {} were joined",
                p.at,
                bytes.len() / 4
            )));
        }
        let body = parts.get(&p.name).await?;
        if body.len() as u64 != p.tokens * 4 || crc32c::crc32c(&body) != p.crc32c {
            return Err(Error::Data(format!(
                "{url}: {} bytes that do not match the {} tokens (CRC-32C {:08x}) its part wrote",
                body.len(),
                p.tokens,
                p.crc32c
            )));
        }
        bytes.extend_from_slice(&body);
    }
    let name = shard_name(split, shard);
    if bytes.len() as u64 != tokens * 4 {
        return Err(Error::Data(format!(
            "{}: pieces of {} tokens for a shard of {tokens}",
            dataset.url_of(&name),
            bytes.len() / 4
        )));
    }
    let ids: Vec<u32> = bytes
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let (body, info) = shard_object(name.clone(), &ids, BLOCK_TOKENS);
    dataset.put(&name, body).await?;
    Ok(Done::Stitched { shard, info })
}

/// The coordinator's side: the splits' inputs, cut into parts, turned into each phase's
/// tasks; the results turned into the vocabulary and the manifests.
pub struct Plan {
    pub dataset: Location,
    pub opts: PrepareOptions,
    /// Each split's inputs, in order.
    pub splits: Vec<(String, Vec<Input>)>,
    /// Parts per split (at least; see [`PART_INPUTS`]).
    pub parts: usize,
}

/// The most inputs a part is given (a task then names at most this many).
pub const PART_INPUTS: usize = 10_000;

/// The figures of a preparation, for its log line and the job's summary.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Prepared {
    pub bytes: u64,
    pub tokens: u64,
    pub vocab_size: usize,
    pub types: usize,
    pub train_tokens: u64,
}

impl Plan {
    /// Each split's parts with their shares (empty shares have no task): `parts`, or
    /// more where a split has over [`PART_INPUTS`] inputs a part.
    fn shares(&self) -> Vec<(&str, Part, &[Input])> {
        let mut out = Vec::new();
        for (split, inputs) in &self.splits {
            let of = self.parts.max(inputs.len().div_ceil(PART_INPUTS)).max(1);
            for index in 0..of {
                let part = Part { index, of };
                let share = &inputs[part.share(inputs)];
                if !share.is_empty() {
                    out.push((split.as_str(), part, share));
                }
            }
        }
        out
    }

    /// Start over: no split's manifest (a half-written dataset must not look whole), no
    /// parts of an earlier attempt.
    pub async fn clear(&self) -> Result<()> {
        for split in SPLITS {
            self.dataset.delete(&Manifest::object_name(split)).await?;
        }
        self.dataset.delete_all(PARTS_DIR).await
    }

    /// Phase 1: a count task per part.
    pub fn count_tasks(&self) -> Vec<Task> {
        let digests: HashMap<&str, String> = self
            .splits
            .iter()
            .map(|(s, i)| (s.as_str(), inputs_sha256(i)))
            .collect();
        self.shares()
            .into_iter()
            .map(|(split, part, share)| Task::Count {
                split: split.to_string(),
                part,
                inputs: share.iter().map(InputRef::from).collect(),
                inputs_sha256: digests[split].clone(),
                text: self.opts.text.clone(),
                dataset: self.dataset.url().to_string(),
                words: split == SPLITS[0],
            })
            .collect()
    }

    /// The training split's counts summed into `vocab.txt`: the vocabulary and the
    /// figures of every split's count.
    pub async fn vocab(&self, counted: &[(Task, Done)]) -> Result<(Arc<Vocab>, Prepared)> {
        let train = &self.splits[0].1;
        let want = inputs_sha256(train);
        let parts = self.dataset.join(PARTS_DIR);
        let mut counts = HashMap::new();
        let mut total: Option<Counted> = None;
        let mut figures = Prepared::default();
        for (task, done) in counted {
            let (Task::Count { split, part, .. }, Done::Counted { counted: c }) = (task, done)
            else {
                return Err(Error::Data(format!("{}: not a count", task.describe())));
            };
            figures.bytes += c.bytes;
            figures.tokens += c.tokens;
            if split != SPLITS[0] {
                continue;
            }
            let read = read_counts(&parts, *part, &want, &self.opts.text, &mut counts).await?;
            match &mut total {
                None => total = Some(read),
                Some(t) => add_counted(t, &read),
            }
        }
        let total = total.ok_or_else(|| {
            Error::Data(format!("{}: the training split has no text", self.dataset))
        })?;
        figures.train_tokens = total.tokens;
        let (vocab, c) = vocab_of(counts, total, &self.dataset, self.opts.vocab_size).await?;
        figures.types = c.types;
        figures.vocab_size = vocab.len();
        Ok((Arc::new(vocab), figures))
    }

    /// Phase 2: a shard task per part, placed by the counts.
    pub fn shard_tasks(&self, counted: &[(Task, Done)]) -> Vec<Task> {
        let mut tokens: BTreeMap<(&str, usize), u64> = BTreeMap::new();
        for (task, done) in counted {
            if let (Task::Count { split, part, .. }, Done::Counted { counted }) = (task, done) {
                tokens.insert((split.as_str(), part.index), counted.tokens);
            }
        }
        let totals: HashMap<&str, u64> = self
            .splits
            .iter()
            .map(|(s, _)| {
                let t = tokens.iter().filter(|((x, _), _)| x == s).map(|(_, t)| t);
                (s.as_str(), t.sum())
            })
            .collect();
        let mut start: HashMap<&str, u64> = HashMap::new();
        self.shares()
            .into_iter()
            .map(|(split, part, share)| {
                let n = tokens.get(&(split, part.index)).copied().unwrap_or(0);
                let at = start.entry(split).or_insert(0);
                let task = Task::Shard {
                    split: split.to_string(),
                    part,
                    inputs: share.iter().map(InputRef::from).collect(),
                    text: self.opts.text.clone(),
                    dataset: self.dataset.url().to_string(),
                    start: *at,
                    tokens: n,
                    total: totals[split],
                    shard_tokens: self.opts.shard_tokens,
                };
                *at += n;
                task
            })
            .collect()
    }

    /// Phase 3: a stitch task per shard that parts share.
    pub fn stitch_tasks(&self, sharded: &[(Task, Done)]) -> Vec<Task> {
        let mut shared: BTreeMap<(usize, u64), (String, u64, Vec<Piece>)> = BTreeMap::new();
        let order = |s: &str| self.splits.iter().position(|(x, _)| x == s).unwrap_or(0);
        for (task, done) in sharded {
            let (
                Task::Shard {
                    split,
                    total,
                    shard_tokens,
                    ..
                },
                Done::Sharded { pieces, .. },
            ) = (task, done)
            else {
                continue;
            };
            let size = shard_size(*shard_tokens);
            for p in pieces {
                let e = shared.entry((order(split), p.shard)).or_insert_with(|| {
                    let len = (total - p.shard * size).min(size);
                    (split.clone(), len, Vec::new())
                });
                e.2.push(p.clone());
            }
        }
        shared
            .into_iter()
            .map(|((_, shard), (split, tokens, mut pieces))| {
                pieces.sort_by_key(|p| p.at);
                Task::Stitch {
                    split,
                    dataset: self.dataset.url().to_string(),
                    shard,
                    tokens,
                    pieces,
                }
            })
            .collect()
    }

    /// Write every split's manifest from the shard and stitch results (the training
    /// split's last: it marks the dataset prepared), then delete `parts/`.
    pub async fn commit(
        &self,
        vocab: &Vocab,
        sharded: &[(Task, Done)],
        stitched: &[(Task, Done)],
    ) -> Result<()> {
        let text_options =
            serde_json::to_value(&self.opts).map_err(|e| Error::Data(e.to_string()))?;
        let size = shard_size(self.opts.shard_tokens);
        for (split, _) in self.splits.iter().rev() {
            let mut shards: BTreeMap<u64, ShardInfo> = BTreeMap::new();
            let mut sources = Vec::new();
            let mut total = 0;
            for (task, done) in sharded.iter().chain(stitched) {
                match (task, done) {
                    (
                        Task::Shard {
                            split: s, total: t, ..
                        },
                        Done::Sharded {
                            shards: whole,
                            sources: from,
                            ..
                        },
                    ) if s == split => {
                        total = *t;
                        shards.extend(whole.iter().cloned());
                        sources.extend(from.iter().cloned());
                    }
                    (Task::Stitch { split: s, .. }, Done::Stitched { shard, info })
                        if s == split =>
                    {
                        shards.insert(*shard, info.clone());
                    }
                    _ => {}
                }
            }
            let want = total.div_ceil(size);
            if shards.len() as u64 != want
                || shards.keys().next_back().is_some_and(|&k| k + 1 != want)
            {
                return Err(Error::Data(format!(
                    "{}: {} of the split {split}'s {want} shards were written",
                    self.dataset,
                    shards.len()
                )));
            }
            let m = Manifest {
                format: MANIFEST_FORMAT.into(),
                version: 1,
                split: split.clone(),
                dtype: "uint32-le".into(),
                vocab_size: vocab.len(),
                vocab_sha256: vocab.sha256(),
                tokens: total,
                block_tokens: BLOCK_TOKENS,
                shards: shards.into_values().collect(),
                sources,
                text_options: text_options.clone(),
            };
            m.validate(&self.dataset.url_of(&Manifest::object_name(split)))?;
            m.save(&self.dataset).await?;
            tracing::info!(split = %split, tokens = m.tokens, shards = m.shards.len(), "tokenised by the workers");
        }
        self.dataset.delete_all(PARTS_DIR).await
    }
}

#[cfg(test)]
mod tests;
