//! A [`Sweep`]: what a pass over a split needs (the split's reader, how it is cut into
//! streams and which of them this process reads, the runtime that reads it), built once
//! and handed by reference to every pass: evaluation, the loss-table passes of a
//! reallocation round and of `lightrnn tables`.

use std::ops::Range;
use std::sync::Arc;

use tokio::runtime::Handle;

use lightrnn_kernels::{Backend, Batch, LossSums, Stream};

use lightrnn_core::Result;
use lightrnn_core::data::batches::Batches;
use lightrnn_core::data::shards::SplitReader;
use lightrnn_core::util::share;

/// Streams `streams` of `split` cut into `batch` streams of `bptt` steps (all of them, or
/// one rank's share), read on the runtime behind `handle`.
pub struct Sweep<'a> {
    pub split: &'a Arc<SplitReader>,
    /// Streams the split is cut into (over all ranks).
    pub batch: usize,
    /// The streams this process reads.
    pub streams: Range<usize>,
    pub bptt: usize,
    pub handle: &'a Handle,
}

impl<'a> Sweep<'a> {
    /// All `batch` streams of `split`.
    pub fn new(split: &'a Arc<SplitReader>, batch: usize, bptt: usize, handle: &'a Handle) -> Self {
        Self {
            split,
            batch,
            streams: 0..batch,
            bptt,
            handle,
        }
    }

    /// Rank `rank`'s share of the streams, of `world` ranks.
    pub fn share(self, world: usize, rank: usize) -> Self {
        Self {
            streams: share(self.batch, world, rank),
            ..self
        }
    }

    /// One forward pass (no dropout) over the sweep's streams, from fresh state in
    /// `stream` (reset again after it): `each` runs every batch. Returns the summed loss
    /// and the words predicted.
    pub fn pass(
        &self,
        backend: &mut dyn Backend,
        stream: Stream,
        mut each: impl FnMut(&mut dyn Backend, &Batch<'_>) -> lightrnn_kernels::Result<LossSums>,
    ) -> Result<(f64, u64)> {
        backend.reset_state(stream);
        let b = self.streams.len();
        let mut batches = Batches::streams(
            self.split.clone(),
            self.handle.clone(),
            self.batch,
            self.streams.clone(),
            self.bptt,
            0,
        )?;
        let mut buf = Vec::new();
        let (mut total, mut words) = (0.0, 0u64);
        while let Some(t) = batches.next_batch(&mut buf)? {
            let bt = Batch {
                inputs: &buf[..t * b],
                targets: &buf[b..],
                steps: t,
                batch: b,
                stream,
            };
            let l = each(&mut *backend, &bt)?;
            total += l.total();
            words += l.words;
        }
        backend.reset_state(stream);
        Ok((total, words))
    }
}
