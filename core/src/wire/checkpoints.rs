//! Checkpoints on the wire: a rank's commit with rank 0's manifest (its files, the model's
//! shape, the optimizer).

use lightrnn_kernels::{ModelDims, Optimizer};
use lightrnn_proto::v1;

use super::{auto_from_wire, auto_to_wire, bad, config, size};
use crate::checkpoint::{FileEntry, Meta};
use crate::protocol::Commit;
use crate::{Error, Result};

impl From<v1::CommitRequest> for Commit {
    /// Rank 0's manifest is converted (a manifest that does not convert is kept as the
    /// error); the others' are not read.
    fn from(r: v1::CommitRequest) -> Self {
        Self {
            generation: r.generation,
            rank: r.rank,
            step: r.step,
            dir: r.dir,
            manifest: r.manifest.filter(|_| r.rank == 0).map(Meta::try_from),
            params_sha256: r.params_sha256,
        }
    }
}

/// A model's sizes as the wire carries them.
pub fn dims_to_wire(d: &ModelDims) -> v1::ModelDims {
    {
        v1::ModelDims {
            vocab: d.vocab as u64,
            rows: d.rows as u64,
            cols: d.cols as u64,
            emb: d.emb as u64,
            hidden: d.hidden as u64,
            layers: d.layers as u64,
        }
    }
}

/// A model's sizes from the wire (checked).
pub fn dims_from_wire(d: v1::ModelDims) -> Result<ModelDims> {
    {
        let dims = ModelDims {
            vocab: size("model shape", d.vocab)?,
            rows: size("model shape", d.rows)?,
            cols: size("model shape", d.cols)?,
            emb: size("model shape", d.emb)?,
            hidden: size("model shape", d.hidden)?,
            layers: size("model shape", d.layers)?,
        };
        dims.validate().map_err(|e| bad("model shape", e))?;
        Ok(dims)
    }
}

/// An update rule as the wire carries it.
pub fn optimizer_to_wire(o: &Optimizer) -> v1::Optimizer {
    {
        use v1::optimizer::Rule;
        let rule = match *o {
            Optimizer::Sgd => Rule::Sgd(v1::Sgd {}),
            Optimizer::Adam { beta1, beta2, eps } => Rule::Adam(v1::Adam { beta1, beta2, eps }),
            Optimizer::Adagrad {
                eps,
                initial_accumulator,
            } => Rule::Adagrad(v1::Adagrad {
                eps,
                initial_accumulator,
            }),
        };
        v1::Optimizer { rule: Some(rule) }
    }
}

/// An update rule from the wire.
pub fn optimizer_from_wire(o: v1::Optimizer) -> Result<Optimizer> {
    {
        use v1::optimizer::Rule;
        match o.rule {
            Some(Rule::Sgd(_)) => Ok(Optimizer::Sgd),
            Some(Rule::Adam(a)) => Ok(Optimizer::Adam {
                beta1: a.beta1,
                beta2: a.beta2,
                eps: a.eps,
            }),
            Some(Rule::Adagrad(a)) => Ok(Optimizer::Adagrad {
                eps: a.eps,
                initial_accumulator: a.initial_accumulator,
            }),
            None => Err(bad("optimizer", "no rule")),
        }
    }
}

impl From<&Meta> for v1::Manifest {
    fn from(m: &Meta) -> Self {
        Self {
            format: m.format.clone(),
            version: m.version,
            step: m.step,
            epoch: m.epoch,
            cursor: m.cursor,
            config_toml: m.config.to_toml(),
            dims: Some(dims_to_wire(&m.dims)),
            vocab_size: m.vocab_size as u64,
            vocab_sha256: m.vocab_sha256.clone(),
            rng_seed: m.rng_seed,
            optimizer: m.optimizer.as_ref().map(optimizer_to_wire),
            optimizer_updates: m.optimizer_updates,
            lr: m.lr,
            best_valid_loss: m.best_valid_loss,
            epoch_loss_sum: m.epoch_loss_sum,
            epoch_words: m.epoch_words,
            seconds: m.seconds,
            history: m.history.iter().map(Into::into).collect(),
            reallocations: m.reallocations,
            realloc_pending: m.realloc_pending,
            auto_realloc_json: auto_to_wire(&m.auto_realloc),
            files: m
                .files
                .iter()
                .map(|f| v1::FileEntry {
                    name: f.name.clone(),
                    bytes: f.bytes,
                    sha256: f.sha256.clone(),
                })
                .collect(),
        }
    }
}

impl TryFrom<v1::Manifest> for Meta {
    type Error = Error;
    fn try_from(m: v1::Manifest) -> Result<Self> {
        Ok(Self {
            format: m.format,
            version: m.version,
            step: m.step,
            epoch: m.epoch,
            cursor: m.cursor,
            config: config("manifest's config", &m.config_toml)?,
            dims: dims_from_wire(m.dims.ok_or_else(|| bad("manifest", "no model shape"))?)?,
            vocab_size: size("manifest", m.vocab_size)?,
            vocab_sha256: m.vocab_sha256,
            rng_seed: m.rng_seed,
            optimizer: m.optimizer.map(optimizer_from_wire).transpose()?,
            optimizer_updates: m.optimizer_updates,
            lr: m.lr,
            best_valid_loss: m.best_valid_loss,
            epoch_loss_sum: m.epoch_loss_sum,
            epoch_words: m.epoch_words,
            seconds: m.seconds,
            history: m.history.into_iter().map(Into::into).collect(),
            reallocations: m.reallocations,
            realloc_pending: m.realloc_pending,
            auto_realloc: auto_from_wire("manifest", &m.auto_realloc_json)?,
            // The coordinator adds its record when it commits.
            job: None,
            files: m
                .files
                .into_iter()
                .map(|f| FileEntry {
                    name: f.name,
                    bytes: f.bytes,
                    sha256: f.sha256,
                })
                .collect(),
        })
    }
}
