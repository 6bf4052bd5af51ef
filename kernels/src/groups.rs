//! Gradient groups, shared by every backend: how a rank's training batch is cut into its
//! [`Shard::groups`] (which streams, which dropout keys, whose carried state) and the
//! pairwise sum of the groups' gradients in a fixed order ((g0 + g1) + (g2 + g3) ...), so
//! a rank holding two groups computes exactly what two ranks holding one each get from
//! the all-reduce. The buffers are the backend's (host vectors, device buffers).

use crate::backend::{Batch, Shard, Stream};
use crate::{Error, Result};

impl Shard {
    /// A shard a backend can train: at least one group, an offset inside the batch.
    pub fn check(&self) -> Result<()> {
        if self.groups == 0 {
            return Err(Error::Config(
                "a rank needs at least one gradient group".into(),
            ));
        }
        if self.global > 0 && self.offset >= self.global {
            return Err(Error::Config(format!(
                "stream offset {} outside a batch of {}",
                self.offset, self.global
            )));
        }
        Ok(())
    }

    /// Dropout keying of a batch of `streams` trained in one piece: by its streams' place
    /// in the job's batch where they are not all of it.
    pub fn whole_key(&self, streams: usize) -> Option<(usize, usize)> {
        let global = if self.global == 0 {
            streams
        } else {
            self.global
        };
        (streams != global).then_some((self.offset, global))
    }
}

impl Batch<'_> {
    /// A batch a model of `vocab` words can read: non-empty, [T, B] inputs and targets,
    /// every word id inside the vocabulary.
    pub fn check(&self, vocab: usize) -> Result<()> {
        let (tt, bb) = (self.steps, self.batch);
        if tt == 0 || bb == 0 {
            return Err(Error::Shape(format!(
                "empty batch: {tt} steps x {bb} streams"
            )));
        }
        if self.inputs.len() != tt * bb || self.targets.len() != tt * bb {
            return Err(Error::Shape(format!(
                "batch of {tt} steps x {bb} streams needs {} inputs and targets, got {} and {}",
                tt * bb,
                self.inputs.len(),
                self.targets.len()
            )));
        }
        if let Some(&w) = self
            .inputs
            .iter()
            .chain(self.targets)
            .find(|&&w| w as usize >= vocab)
        {
            return Err(Error::Shape(format!(
                "word id {w} is outside the vocabulary of {vocab}"
            )));
        }
        Ok(())
    }
}

/// How a training step runs a batch under a shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// The batch in one piece; dropout keyed at (offset, global) where the streams are
    /// not the whole batch.
    Whole { keyed: Option<(usize, usize)> },
    /// `groups` groups of the batch's streams; group g keyed at offset + g * B / groups of
    /// `global`, carrying its state in `Train(first + g)`.
    Groups {
        groups: usize,
        first: u32,
        offset: usize,
        global: usize,
    },
}

impl Plan {
    /// The plan for `batch` under `shard` (a batch that does not split is refused).
    pub fn new(shard: Shard, batch: &Batch<'_>) -> Result<Self> {
        let Shard {
            offset,
            global,
            groups,
        } = shard;
        let bl = batch.batch;
        if groups == 1 {
            // Dropout keyed by the global stream index wherever the streams are not the
            // whole batch in one piece.
            return Ok(Plan::Whole {
                keyed: shard.whole_key(bl),
            });
        }
        let global = if global == 0 { bl } else { global };
        if !bl.is_multiple_of(groups) {
            return Err(Error::Config(format!(
                "{bl} streams do not split into {groups} gradient groups"
            )));
        }
        let Stream::Train(first) = batch.stream else {
            return Err(Error::Config(format!(
                "gradient groups train Train streams, not {:?}",
                batch.stream
            )));
        };
        let t = batch.steps;
        // The batch's [T + 1, B] buffer: inputs are its first T rows, targets its last T.
        if batch.inputs.len() != t * bl || batch.targets.len() != t * bl {
            return Err(Error::Shape(format!(
                "batch of {t} steps x {bl} streams needs {} inputs and targets",
                t * bl
            )));
        }
        Ok(Plan::Groups {
            groups,
            first,
            offset,
            global,
        })
    }

    /// The gradient groups the plan runs (one for a batch in one piece).
    pub fn groups(&self) -> usize {
        match *self {
            Plan::Whole { .. } => 1,
            Plan::Groups { groups, .. } => groups,
        }
    }

    /// A training step's groups in order, as every backend runs them: `f(g, group, its
    /// dropout key)` for each, the batch itself for a `Whole` plan ([`Self::group`]'s
    /// tokens, written to `tokens`, otherwise). Stops at the first error.
    pub fn for_each_group(
        &self,
        batch: &Batch<'_>,
        tokens: &mut Vec<u32>,
        mut f: impl FnMut(usize, &Batch<'_>, Option<(usize, usize)>) -> Result<()>,
    ) -> Result<()> {
        for g in 0..self.groups() {
            let (group, keyed) = match *self {
                Plan::Whole { keyed } => (*batch, keyed),
                Plan::Groups { .. } => self.group(batch, g, tokens),
            };
            f(g, &group, keyed)?;
        }
        Ok(())
    }

    /// Group `g` of `batch` (a `Groups` plan): its [T + 1, B / groups] tokens written to
    /// `tokens`, the batch over them, and its dropout key.
    pub fn group<'t>(
        &self,
        batch: &Batch<'_>,
        g: usize,
        tokens: &'t mut Vec<u32>,
    ) -> (Batch<'t>, Option<(usize, usize)>) {
        let (groups, first, offset, global) = match *self {
            Plan::Groups {
                groups,
                first,
                offset,
                global,
            } => (groups, first, offset, global),
            Plan::Whole { .. } => (1, 0, 0, batch.batch),
        };
        let (bl, t) = (batch.batch, batch.steps);
        let gs = bl / groups;
        tokens.clear();
        for k in 0..=t {
            let row: &[u32] = if k < t {
                &batch.inputs[k * bl..(k + 1) * bl]
            } else {
                &batch.targets[(t - 1) * bl..t * bl]
            };
            tokens.extend_from_slice(&row[g * gs..(g + 1) * gs]);
        }
        let group = Batch {
            inputs: &tokens[..t * gs],
            targets: &tokens[gs..],
            steps: t,
            batch: gs,
            stream: Stream::Train(first + g as u32),
        };
        (group, Some((offset + g * gs, global)))
    }
}

/// The pairwise sum of the groups' gradient buffers `B`: partial sums with their tree
/// level, and free buffers for the next group (kept between steps: no allocation per
/// step). `add(a, b)` is a += b.
pub struct PairwiseSum<B> {
    partial: Vec<(u32, B)>,
    spare: Vec<B>,
}

impl<B> Default for PairwiseSum<B> {
    fn default() -> Self {
        Self {
            partial: Vec::new(),
            spare: Vec::new(),
        }
    }
}

impl<B> PairwiseSum<B> {
    /// Forget partial sums left by a step that failed half-way (their buffers are kept).
    pub fn reset(&mut self) {
        while let Some((_, b)) = self.partial.pop() {
            self.spare.push(b);
        }
    }

    /// Partial sums waiting for their partner: where the next buffer pushed sits in the
    /// stack before it is combined.
    pub fn depth(&self) -> usize {
        self.partial.len()
    }

    /// A free buffer, if one is kept.
    pub fn spare(&mut self) -> Option<B> {
        self.spare.pop()
    }

    /// Keep `b` for a later group.
    pub fn recycle(&mut self, b: B) {
        self.spare.push(b);
    }

    /// Fold the gradient `buf` of the next group in: equal tree levels are combined as
    /// soon as both exist ((a + b) + (c + d) ...).
    pub fn push(
        &mut self,
        mut buf: B,
        mut add: impl FnMut(&mut B, &B) -> Result<()>,
    ) -> Result<()> {
        let mut level = 0u32;
        while let Some(top) = self.partial.last()
            && top.0 == level
        {
            let Some((_, mut a)) = self.partial.pop() else {
                break;
            };
            add(&mut a, &buf)?;
            self.spare.push(std::mem::replace(&mut buf, a));
            level += 1;
        }
        self.partial.push((level, buf));
        Ok(())
    }

    /// The sum of the remaining partial sums (newest first into the older ones).
    pub fn finish(&mut self, mut add: impl FnMut(&mut B, &B) -> Result<()>) -> Result<B> {
        let Some((_, mut sum)) = self.partial.pop() else {
            return Err(Error::Backend("a grouped step without groups".into()));
        };
        while let Some((_, mut a)) = self.partial.pop() {
            add(&mut a, &sum)?;
            self.spare.push(std::mem::replace(&mut sum, a));
        }
        Ok(sum)
    }
}
