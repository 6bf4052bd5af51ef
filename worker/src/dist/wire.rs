//! The one place where the messages of the wire (`lightrnn_proto::v1`) convert to and
//! from this crate's domain types; the worker's control channel and the coordinator's
//! service both go through it.

use lightrnn_proto::v1;

use crate::report::RankReport;

impl From<&RankReport> for v1::Report {
    fn from(r: &RankReport) -> Self {
        Self {
            step: r.step,
            epoch: r.epoch,
            loss: r.loss,
            words_per_sec: r.words_per_sec,
            global_words_per_sec: r.global_words_per_sec,
            valid_ppl: r.valid_ppl,
            lr: r.lr,
            checkpoint_step: r.checkpoint_step,
            checkpoint_seconds: r.checkpoint_seconds,
            checkpoint_bytes: r.checkpoint_bytes,
            checkpoints: r.checkpoints,
        }
    }
}

impl From<v1::Report> for RankReport {
    fn from(p: v1::Report) -> Self {
        Self {
            step: p.step,
            epoch: p.epoch,
            loss: p.loss,
            words_per_sec: p.words_per_sec,
            global_words_per_sec: p.global_words_per_sec,
            valid_ppl: p.valid_ppl,
            lr: p.lr,
            checkpoint_step: p.checkpoint_step,
            checkpoint_seconds: p.checkpoint_seconds,
            checkpoint_bytes: p.checkpoint_bytes,
            checkpoints: p.checkpoints,
        }
    }
}
