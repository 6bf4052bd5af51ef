//! Truncated-BPTT batches streamed from a split (word_language_model batching): the
//! split's N tokens are cut into B contiguous streams of n = N / B tokens (the last N mod B
//! are dropped); step i yields inputs stream[i..i+t] and targets stream[i+1..i+t+1] of
//! every stream, t = min(T, n - 1 - i), as one [t + 1, B] buffer. Each stream is read
//! forward from object storage in verified chunks; the next chunks of all streams are
//! fetched in the background while the current ones are used.

use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use super::shards::SplitReader;
use crate::{Error, Result};

/// Concurrent range reads per fetch.
const READ_CONCURRENCY: usize = 16;

struct StreamBuf {
    /// Global token index of data[0].
    start: u64,
    data: Vec<u32>,
    /// End of this stream's region (exclusive).
    end: u64,
}

impl StreamBuf {
    fn fetched_to(&self) -> u64 {
        self.start + self.data.len() as u64
    }
}

type Fetch = JoinHandle<Result<Vec<Vec<u32>>>>;

pub struct Batches {
    reader: Arc<SplitReader>,
    handle: Handle,
    b: usize,
    t: usize,
    /// Tokens per stream.
    n: u64,
    /// Position of the next input inside every stream.
    pos: u64,
    streams: Vec<StreamBuf>,
    fetch_tokens: u64,
    pending: Option<Fetch>,
}

impl Batches {
    /// Batches of `t` steps over `b` streams, starting at position `pos` of each stream
    /// (0 for a new epoch; a checkpoint's cursor on resume).
    pub fn new(
        reader: Arc<SplitReader>,
        handle: Handle,
        b: usize,
        t: usize,
        pos: u64,
    ) -> Result<Self> {
        Self::streams(reader, handle, b, 0..b, t, pos)
    }

    /// Streams `range` of the `b` streams the split is cut into (one rank's share of a
    /// data-parallel batch): the same tokens, in the same order, that those columns of
    /// [`Batches::new`]'s batches hold; batches are [t + 1, range.len()].
    pub fn streams(
        reader: Arc<SplitReader>,
        handle: Handle,
        b: usize,
        range: std::ops::Range<usize>,
        t: usize,
        pos: u64,
    ) -> Result<Self> {
        if range.is_empty() || range.end > b {
            return Err(Error::Config(format!(
                "streams {range:?} of a batch of {b}"
            )));
        }
        if b == 0 || t == 0 {
            return Err(Error::Config(format!(
                "batch {b} and bptt {t} must be positive"
            )));
        }
        let n = reader.tokens() / b as u64;
        if n < 2 {
            return Err(Error::Data(format!(
                "split {} has {} tokens: too few for {b} streams of at least 2",
                reader.manifest().split,
                reader.tokens()
            )));
        }
        if pos > n - 1 {
            return Err(Error::Data(format!(
                "stream position {pos} is beyond the {n} tokens per stream"
            )));
        }
        // ~16 MiB of ids per fetch across all streams, whole blocks, at least one batch.
        let bt = reader.manifest().block_tokens;
        let fetch_tokens = ((4u64 << 20) / range.len() as u64)
            .clamp(bt, 64 * bt)
            .max(t as u64 + 1);
        let local = range.len();
        let streams = (range.start as u64..range.end as u64)
            .map(|k| StreamBuf {
                start: k * n + pos,
                data: Vec::new(),
                end: (k + 1) * n,
            })
            .collect();
        Ok(Self {
            reader,
            handle,
            b: local,
            t,
            n,
            pos,
            streams,
            fetch_tokens,
            pending: None,
        })
    }

    /// Tokens per stream.
    pub fn per_stream(&self) -> u64 {
        self.n
    }

    /// Batches in a whole pass.
    pub fn steps_per_pass(&self) -> u64 {
        (self.n - 1).div_ceil(self.t as u64)
    }

    /// Whether the pass is over (no batch left).
    pub fn exhausted(&self) -> bool {
        self.pos >= self.n - 1
    }

    /// Position of the next input inside each stream (the resume cursor).
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Words predicted in a whole pass ((n - 1) * B).
    pub fn words_per_pass(&self) -> u64 {
        (self.n - 1) * self.b as u64
    }

    fn spawn_fetch(&mut self) {
        let ranges: Vec<(u64, u64)> = self
            .streams
            .iter()
            .map(|s| {
                (
                    s.fetched_to(),
                    (s.fetched_to() + self.fetch_tokens).min(s.end),
                )
            })
            .collect();
        let reader = self.reader.clone();
        self.pending = Some(self.handle.spawn(async move {
            futures::stream::iter(ranges)
                .map(|(a, b)| {
                    let r = reader.clone();
                    async move { r.read(a, b).await }
                })
                .buffered(READ_CONCURRENCY)
                .try_collect()
                .await
        }));
    }

    fn take_pending(&mut self) -> Result<()> {
        if let Some(p) = self.pending.take() {
            let chunks = self
                .handle
                .block_on(p)
                .map_err(|e| Error::Task(format!("prefetch: {e}")))??;
            for (s, c) in self.streams.iter_mut().zip(chunks) {
                s.data.extend_from_slice(&c);
            }
        }
        Ok(())
    }

    /// Fill `out` with the next [t + 1, B] tokens; returns t, or None at the end of the pass.
    pub fn next_batch(&mut self, out: &mut Vec<u32>) -> Result<Option<usize>> {
        if self.pos >= self.n - 1 {
            return Ok(None);
        }
        let t = (self.t as u64).min(self.n - 1 - self.pos) as usize;
        let need = |s: &StreamBuf, pos: u64, n: u64| (s.end - n) + pos + t as u64 + 1;
        while self
            .streams
            .iter()
            .any(|s| s.fetched_to() < need(s, self.pos, self.n))
        {
            if self.pending.is_none() {
                self.spawn_fetch();
            }
            self.take_pending()?;
        }
        out.clear();
        out.resize((t + 1) * self.b, 0);
        for (b, s) in self.streams.iter().enumerate() {
            let first = (s.end - self.n + self.pos - s.start) as usize;
            for k in 0..=t {
                out[k * self.b + b] = s.data[first + k];
            }
        }
        self.pos += t as u64;
        // Drop what no later batch reads (the last target is the next first input).
        for s in &mut self.streams {
            let keep_from = s.end - self.n + self.pos;
            let drop = (keep_from - s.start) as usize;
            s.data.drain(..drop);
            s.start = keep_from;
        }
        let low = self
            .streams
            .iter()
            .any(|s| s.fetched_to() < s.end && s.fetched_to() - s.start < self.fetch_tokens / 2);
        if self.pending.is_none() && low {
            self.spawn_fetch();
        }
        Ok(Some(t))
    }
}

impl Drop for Batches {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            p.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::shards::ShardWriter;
    use crate::data::store::Location;
    use crate::data::vocab::Vocab;
    use std::collections::HashMap;

    fn setup(total: u32) -> (Arc<SplitReader>, Vec<u32>, tokio::runtime::Runtime) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut c: HashMap<String, u64> = (0..98)
            .map(|i| (format!("w{i}"), 1000 - i as u64))
            .collect();
        c.insert("<eos>".into(), 1);
        let v = Vocab::build(c, 0).unwrap();
        let ids: Vec<u32> = (0..total).map(|i| (i * 31 + i / 7) % 100).collect();
        let loc = Location::parse(&format!("memory://batch-tests/{total}")).unwrap();
        let r = rt.block_on(async {
            let mut w = ShardWriter::new(&loc, "train", &v, 20_000);
            w.extend(&ids).await.unwrap();
            w.finish(vec![], serde_json::json!({})).await.unwrap();
            SplitReader::open(&loc, "train", &v).await.unwrap()
        });
        (r, ids, rt)
    }

    #[test]
    fn matches_word_language_model_batchify() {
        let (r, ids, rt) = setup(100_003);
        let (b, t) = (7usize, 35usize);
        let n = ids.len() / b;
        let mut batches = Batches::new(r, rt.handle().clone(), b, t, 0).unwrap();
        let mut out = Vec::new();
        let mut i = 0usize;
        let mut count = 0;
        while let Some(tt) = batches.next_batch(&mut out).unwrap() {
            assert_eq!(tt, t.min(n - 1 - i));
            for k in 0..=tt {
                for s in 0..b {
                    assert_eq!(out[k * b + s], ids[s * n + i + k]);
                }
            }
            i += tt;
            count += 1;
        }
        assert_eq!(i, n - 1);
        assert_eq!(count as u64, batches.steps_per_pass());
    }

    #[test]
    fn resumes_at_a_cursor() {
        let (r, _, rt) = setup(50_000);
        let mut a = Batches::new(r.clone(), rt.handle().clone(), 4, 10, 0).unwrap();
        let mut out = Vec::new();
        for _ in 0..37 {
            a.next_batch(&mut out).unwrap();
        }
        let cursor = a.position();
        let mut b = Batches::new(r, rt.handle().clone(), 4, 10, cursor).unwrap();
        let (mut x, mut y) = (Vec::new(), Vec::new());
        loop {
            let (p, q) = (a.next_batch(&mut x).unwrap(), b.next_batch(&mut y).unwrap());
            assert_eq!(p, q);
            assert_eq!(x, y);
            if p.is_none() {
                break;
            }
        }
    }

    #[test]
    fn stream_ranges_are_the_columns_of_the_whole_batch() {
        let (r, _, rt) = setup(30_011);
        let (b, t) = (6usize, 9usize);
        let mut whole = Batches::new(r.clone(), rt.handle().clone(), b, t, 0).unwrap();
        let mut parts: Vec<Batches> = [0..2, 2..5, 5..6]
            .into_iter()
            .map(|g| Batches::streams(r.clone(), rt.handle().clone(), b, g, t, 0).unwrap())
            .collect();
        let (mut x, mut y) = (Vec::new(), Vec::new());
        while let Some(tt) = whole.next_batch(&mut x).unwrap() {
            let mut col = 0;
            for p in &mut parts {
                assert_eq!(p.next_batch(&mut y).unwrap(), Some(tt));
                let w = y.len() / (tt + 1);
                for k in 0..=tt {
                    assert_eq!(y[k * w..(k + 1) * w], x[k * b + col..k * b + col + w]);
                }
                col += w;
            }
        }
        assert!(
            parts
                .iter_mut()
                .all(|p| p.next_batch(&mut y).unwrap().is_none())
        );
        assert!(Batches::streams(r, rt.handle().clone(), b, 4..7, t, 0).is_err());
    }

    #[test]
    fn too_small_splits_are_refused() {
        let (r, _, rt) = setup(10);
        assert!(Batches::new(r, rt.handle().clone(), 8, 5, 0).is_err());
    }
}
