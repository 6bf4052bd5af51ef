//! A training step's device work as data: each group's pass ([`Cx`]), the forward and
//! backward of a step ([`TrainWork`]), the update ([`UpdateWork`]), and the [`Work`] a
//! CUDA graph is captured for and keyed by: the same work is the same graph.

use crate::backend::Stream;
use crate::optim::Optimizer;

/// One forward (and backward) pass over one group of streams: where its inputs lie,
/// whose carried state it continues, how its dropout is keyed, which buffer its
/// gradient goes to and where its loss sums go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct Cx {
    /// Its region of the workspace's inputs (and of the staging).
    pub region: usize,
    pub stream: Stream,
    /// Dropout keyed as streams `offset..` of a `global`-stream batch.
    pub keyed: Option<(usize, usize)>,
    /// The gradient buffer it writes (0: the backend's gradient; k: the pairwise sum's
    /// buffer k).
    pub slot: usize,
    /// Index of its two loss sums in the workspace's results.
    pub loss_at: usize,
    /// Dropout on (a training pass of a model with dropout).
    pub train: bool,
}

/// Additions of gradient buffers, in order: `(a, b)` is buffer a += buffer b.
pub(super) type Adds = Vec<(usize, usize)>;

/// The device work of a training step's forward and backward, as a graph is keyed: the
/// batch shape, each group's pass and the pairwise sum's additions after it
/// (`(a, b)`: buffer a += buffer b), and the additions that finish the sum.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct TrainWork {
    pub steps: usize,
    pub batch: usize,
    pub groups: Vec<(Cx, Adds)>,
    pub finish: Adds,
}

/// The device work of an update: the rule, as bits (a graph is keyed by it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct UpdateWork {
    pub rule: (u8, [u64; 3]),
}

impl UpdateWork {
    pub fn new(rule: &Optimizer) -> Self {
        let b = |x: f64| x.to_bits();
        Self {
            rule: match *rule {
                Optimizer::Sgd => (0, [0; 3]),
                Optimizer::Adam { beta1, beta2, eps } => (1, [b(beta1), b(beta2), b(eps)]),
                Optimizer::Adagrad {
                    eps,
                    initial_accumulator,
                } => (2, [b(eps), b(initial_accumulator), 0]),
            },
        }
    }
}

/// Blocks of the gradient norm's first pass.
pub(super) const NORM_BLOCKS: usize = 512;

/// A step's device work, as graphs are keyed.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) enum Work {
    /// Forward and backward of every group, the groups' gradients summed.
    Train(TrainWork),
    /// Norm, clipping coefficient, optimizer, results to the host.
    Update(UpdateWork),
    /// Both: a step with no collective between them (one graph launch).
    Step(TrainWork, UpdateWork),
}
