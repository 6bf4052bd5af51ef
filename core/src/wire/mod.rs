//! The one place where the messages of the wire (`lightrnn_proto::v1`) convert to and
//! from this crate's domain types ([`crate::protocol`], the reports, the checkpoint
//! manifest, the run's config), and the one codec of the arrays that travel in chunks
//! (loss tables, allocations). The worker's control channel and the coordinator's service
//! both go through it; a message that does not convert is refused with what is wrong.
//!
//! By concern: [`control`] (join, heartbeats, leases and the epoch barrier, finish and
//! fail, a rank's figures, the run's summary and config), [`tables`] (loss tables dense
//! and sparse, allocations, the chunk codec), [`checkpoints`] (commits, the manifest, its
//! files, model shapes and optimizers). This module holds what they share.

mod checkpoints;
mod control;
mod tables;

pub use checkpoints::{dims_from_wire, dims_to_wire, optimizer_from_wire, optimizer_to_wire};
pub use control::join_config;
pub use tables::{
    AllocationAssembly, Elem, add_into, allocation_chunks, decode_into, encode, pieces,
    report_from_wire, report_to_wire, sparse_chunks, table_chunks,
};

use lightrnn_proto::v1;

use crate::auto::AutoState;
use crate::config::TrainConfig;
use crate::report::EpochRecord;
use crate::{Error, Result};

fn bad(what: &str, why: impl std::fmt::Display) -> Error {
    Error::Control(format!("a {what} that does not convert: {why}"))
}

fn size(what: &str, v: u64) -> Result<usize> {
    usize::try_from(v).map_err(|_| bad(what, format!("{v} does not fit this machine")))
}

impl From<&EpochRecord> for v1::EpochRecord {
    fn from(r: &EpochRecord) -> Self {
        Self {
            epoch: r.epoch,
            step: r.step,
            lr: r.lr,
            train_loss: r.train_loss,
            valid_loss: r.valid_loss,
            valid_ppl: r.valid_ppl,
            seconds: r.seconds,
        }
    }
}

impl From<v1::EpochRecord> for EpochRecord {
    fn from(r: v1::EpochRecord) -> Self {
        Self {
            epoch: r.epoch,
            step: r.step,
            lr: r.lr,
            train_loss: r.train_loss,
            valid_loss: r.valid_loss,
            valid_ppl: r.valid_ppl,
            seconds: r.seconds,
        }
    }
}

fn config(what: &str, toml: &str) -> Result<TrainConfig> {
    TrainConfig::from_toml(toml, what).map_err(|e| bad(what, e))
}

/// The automatic reallocation's state as the wire carries it: JSON, empty for none.
fn auto_to_wire(a: &Option<AutoState>) -> String {
    a.as_ref()
        .map(|a| serde_json::to_string(a).unwrap_or_default())
        .unwrap_or_default()
}

fn auto_from_wire(what: &str, json: &str) -> Result<Option<AutoState>> {
    if json.is_empty() {
        return Ok(None);
    }
    serde_json::from_str(json)
        .map(Some)
        .map_err(|e| bad(what, format!("its automatic reallocation state: {e}")))
}

#[cfg(test)]
mod tests {
    use lightrnn_alloc::Report;
    use lightrnn_kernels::{LossTables, ModelDims, Optimizer};
    use lightrnn_proto::CHUNK_BYTES;
    use lightrnn_proto::v1::TableKind;

    use super::*;
    use crate::checkpoint::{FileEntry, Meta};
    use crate::report::{StoppedBy, Summary};

    #[test]
    fn domain_types_round_trip_through_the_wire() {
        let cfg = TrainConfig::preset("ptb-small").unwrap();
        let rec = EpochRecord {
            epoch: 1,
            step: 10,
            lr: 20.0,
            train_loss: 5.5,
            valid_loss: 5.25,
            valid_ppl: 5.25f64.exp(),
            seconds: 1.5,
        };
        let meta = Meta {
            format: crate::checkpoint::FORMAT.into(),
            version: 1,
            step: 10,
            epoch: 1,
            cursor: 35,
            config: cfg.clone(),
            dims: ModelDims::square(10_000, 200, 200, 2).unwrap(),
            vocab_size: 10_000,
            vocab_sha256: "ab".repeat(32),
            rng_seed: 1111,
            optimizer: Some(Optimizer::Adam {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            }),
            optimizer_updates: 10,
            lr: 20.0,
            best_valid_loss: Some(5.25),
            epoch_loss_sum: 1234.5,
            epoch_words: 7000,
            seconds: 3.25,
            history: vec![rec.clone()],
            reallocations: 1,
            realloc_pending: true,
            auto_realloc: Some(crate::auto::AutoState {
                disruption: Some(3.4),
                recovery: None,
                realized: Some(0.01),
                watch: Some(crate::auto::Watch {
                    epoch: 1,
                    valid_loss: 5.25,
                    lr: 20.0,
                    gain: 1.68,
                    expected_recovery: Some(1.0),
                }),
                decisions: vec![crate::auto::Decision {
                    epoch: 1,
                    decision: crate::auto::Verdict::Move,
                    why: "gain".into(),
                    epochs_left: 5.0,
                    recovery_epochs: 1.0,
                    payoff_epochs: 3.0,
                    move_cost: 0.0,
                    realized: 1.0,
                    predicted_gain: 1.68,
                    disruption: 3.35,
                    moved_share: 0.99,
                    words_moved: 9961,
                }],
            }),
            job: None,
            files: vec![FileEntry {
                name: "model.safetensors".into(),
                bytes: 42,
                sha256: "cd".repeat(32),
            }],
        };
        let back: Meta = v1::Manifest::from(&meta).try_into().unwrap();
        assert_eq!(back, meta);
        let model_only = Meta {
            optimizer: None,
            best_valid_loss: None,
            ..meta
        };
        let back: Meta = v1::Manifest::from(&model_only).try_into().unwrap();
        assert_eq!(back, model_only);
        let s = Summary {
            train_loss: 5.0,
            train_ppl: 5f64.exp(),
            valid_loss: 5.1,
            valid_ppl: 5.1f64.exp(),
            test_loss: f64::NAN,
            test_ppl: f64::NAN,
            words_per_sec: 1e4,
            params: 723_400,
            seconds: 9.5,
            train_seconds: 8.5,
            steps: 10,
            epochs_completed: 1,
            stopped_by: StoppedBy::Signal,
            vocab_size: 10_000,
            backend: "cpu".into(),
            world_size: 2,
            control_seconds: 0.5,
            config: cfg,
            history: vec![rec],
            auto_realloc: None,
            params_sha256: String::new(),
        };
        let back: Summary = v1::Summary::from(&s).try_into().unwrap();
        assert!(back.test_loss.is_nan() && back.test_ppl.is_nan());
        assert_eq!(
            serde_json::to_string(&back).unwrap(),
            serde_json::to_string(&s).unwrap()
        );
        let unsaid = v1::Summary {
            stopped_by: 0,
            ..v1::Summary::from(&s)
        };
        assert!(Summary::try_from(unsaid).is_err());
        let bad_config = v1::Manifest {
            config_toml: "hidden = 0".into(),
            ..v1::Manifest::from(&model_only)
        };
        assert!(
            Meta::try_from(bad_config)
                .unwrap_err()
                .to_string()
                .contains("hidden")
        );
    }

    #[test]
    fn chunks_carry_every_element_once_and_refuse_what_does_not_fit() {
        let v = 5;
        let tables = LossTables {
            vocab: v,
            rows: 3,
            cols: 2,
            words: 0..v,
            lr: (0..15).map(|x| x as f32 * 0.5).collect(),
            lc: (0..10).map(|x| -(x as f32)).collect(),
            counts: (0..5).map(|x| x * 1_000_000_007).collect(),
        };
        let head = v1::TableChunk {
            round: 2,
            ..Default::default()
        };
        let chunks: Vec<_> = table_chunks(tables.clone(), vec![4, 3, 2, 1, 0], head).collect();
        assert!(chunks.iter().all(|c| c.round == 2));
        let mut lr = vec![0f32; 15];
        let mut counts = vec![0u64; 5];
        for c in &chunks {
            match TableKind::try_from(c.kind).unwrap() {
                TableKind::Rows => assert_eq!(decode_into(&mut lr, c.offset, &c.data).unwrap(), 15),
                TableKind::Counts => {
                    decode_into(&mut counts, c.offset, &c.data).unwrap();
                }
                _ => {}
            }
        }
        assert_eq!((lr, counts), (tables.lr, tables.counts));
        let mut small = vec![0u32; 2];
        assert!(decode_into(&mut small, 1, &[0u8; 8]).is_err());
        assert!(decode_into(&mut small, 0, &[0u8; 5]).is_err());
        assert!(decode_into(&mut small, u64::MAX, &[0u8; 4]).is_err());
        // A big array is cut at CHUNK_BYTES.
        let n = CHUNK_BYTES / 4 * 2 + 3;
        let ranges: Vec<_> = pieces::<f32>(n).collect();
        assert_eq!(ranges.len(), 3);
        assert_eq!(ranges.last().unwrap().end, n);
        let report = Report {
            solver: "greedy".into(),
            train_loss_before: 5.0,
            objective_before: 5.0,
            objective_after: 4.5,
            lower_bound: 4.0,
            words_moved: 3,
            train_loss_after: None,
            seconds_tables: 0.0,
            seconds_solve: 0.1,
            kept_current: false,
            stats: serde_json::json!({"cost": 4.5}),
        };
        let mut a = AllocationAssembly::new(v);
        for ch in allocation_chunks(&[1, 0, 2, 4, 3], &[7; 5], &report) {
            a.add(ch).unwrap();
        }
        let (cells, counts, back) = a.finish().unwrap();
        assert_eq!(
            (cells, counts, back),
            (vec![1, 0, 2, 4, 3], vec![7; 5], report.clone())
        );
        let mut partial = AllocationAssembly::new(v);
        partial
            .add(allocation_chunks(&[1, 0, 2, 4, 3], &[7; 5], &report).remove(0))
            .unwrap();
        assert!(partial.finish().is_err());
    }
}
