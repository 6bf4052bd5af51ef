//! The control calls' messages: joining (the run's config travels as TOML and is typed
//! on both sides here), heartbeats with a rank's figures, leases and the epoch barrier,
//! finishing with the run's summary, failing; the dataset's preparation by the workers
//! (its tasks and results travel as JSON).

use std::time::Duration;

use lightrnn_proto::v1;

use super::{auto_from_wire, auto_to_wire, bad, config, size};
use crate::config::TrainConfig;
use crate::protocol::{
    EpochDone, Fail, Finish, Heartbeat, HeartbeatAnswer, Join, Joined, Lease, Leased,
    PrepareAnswer, PrepareAsk, TaskReport,
};
use crate::report::{LinkDirection, LinkWaits, RankReport, StoppedBy, Summary};
use crate::{Error, Result};

impl From<v1::JoinRequest> for Join {
    fn from(r: v1::JoinRequest) -> Self {
        Self {
            rank: (r.rank >= 0).then_some(r.rank as usize),
            collective_addr: r.collective_addr,
            host: r.host,
            pid: r.pid,
            version: r.version,
        }
    }
}

impl From<Joined> for v1::JoinReply {
    fn from(j: Joined) -> Self {
        Self {
            generation: j.generation,
            rank: j.rank as u32,
            world_size: j.world_size as u32,
            peers: j.peers,
            config_toml: j.config.to_toml(),
            data: j.data,
            out: j.out,
            checkpoint: j.checkpoint.unwrap_or_default(),
            restart: j.restart,
            backend: j.backend,
            heartbeat_ms: j.heartbeat.as_millis() as u64,
            collective_timeout_ms: j.collective_timeout.as_millis() as u64,
            run_id: j.run_id,
            nccl_id: j.nccl_id,
            ring_key: j.ring_key,
        }
    }
}

/// The run's config a join reply carries.
pub fn join_config(r: &v1::JoinReply) -> Result<TrainConfig> {
    TrainConfig::from_toml(&r.config_toml, "the coordinator's config")
}

impl From<v1::HeartbeatRequest> for Heartbeat {
    fn from(r: v1::HeartbeatRequest) -> Self {
        Self {
            generation: r.generation,
            rank: r.rank,
            step: r.step,
            epoch: r.epoch,
            cursor: r.cursor,
            report: r.report.map(Into::into),
        }
    }
}

impl From<HeartbeatAnswer> for v1::HeartbeatReply {
    fn from(a: HeartbeatAnswer) -> Self {
        Self {
            abort: a.abort.unwrap_or_default(),
            stop: a.stop,
        }
    }
}

impl From<v1::LeaseRequest> for Lease {
    fn from(r: v1::LeaseRequest) -> Self {
        Self {
            generation: r.generation,
            rank: r.rank,
            epoch: r.epoch,
            streams: r.streams,
            cursor: r.cursor,
        }
    }
}

impl From<Leased> for v1::LeaseReply {
    fn from(l: Leased) -> Self {
        Self {
            epoch: l.epoch,
            stream_begin: l.streams.start as u64,
            stream_end: l.streams.end as u64,
        }
    }
}

impl From<v1::EpochDoneRequest> for EpochDone {
    fn from(r: v1::EpochDoneRequest) -> Self {
        Self {
            generation: r.generation,
            rank: r.rank,
            epoch: r.epoch,
            tokens: r.tokens,
        }
    }
}

impl From<v1::FinishRequest> for Finish {
    /// Rank 0's summary is converted (a summary that does not convert is kept as the
    /// error); the others' are not read.
    fn from(r: v1::FinishRequest) -> Self {
        Self {
            generation: r.generation,
            rank: r.rank,
            summary: r.summary.filter(|_| r.rank == 0).map(Summary::try_from),
            params_sha256: r.params_sha256,
        }
    }
}

impl From<v1::FailRequest> for Fail {
    fn from(r: v1::FailRequest) -> Self {
        Self {
            generation: r.generation,
            rank: r.rank,
            error: r.error,
            retryable: r.retryable,
        }
    }
}

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
            waits: r.waits.iter().map(Into::into).collect(),
            phase_seconds_per_step: r.phases.clone().into_iter().collect(),
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
            waits: p.waits.into_iter().map(Into::into).collect(),
            phases: p.phase_seconds_per_step.into_iter().collect(),
        }
    }
}

impl From<&LinkWaits> for v1::LinkWaits {
    fn from(w: &LinkWaits) -> Self {
        Self {
            peer: w.peer as u32,
            send: w.direction == LinkDirection::Send,
            seconds: w.seconds,
            count: w.count,
            stalls: w.stalls,
            buckets: w.buckets.to_vec(),
        }
    }
}

/// Buckets a sender of another version cut differently are kept as far as they agree;
/// the waits of the rest count in the last one (above every bound).
impl From<v1::LinkWaits> for LinkWaits {
    fn from(p: v1::LinkWaits) -> Self {
        let mut buckets = [0u64; crate::report::WAIT_BUCKETS.len() + 1];
        let last = buckets.len() - 1;
        for (i, n) in p.buckets.iter().enumerate() {
            buckets[i.min(last)] += n;
        }
        Self {
            peer: p.peer as usize,
            direction: if p.send {
                LinkDirection::Send
            } else {
                LinkDirection::Receive
            },
            seconds: p.seconds,
            count: p.count,
            stalls: p.stalls,
            buckets,
        }
    }
}

impl From<StoppedBy> for v1::StoppedBy {
    fn from(s: StoppedBy) -> Self {
        match s {
            StoppedBy::Epochs => Self::Epochs,
            StoppedBy::MaxSteps => Self::MaxSteps,
            StoppedBy::Signal => Self::Signal,
        }
    }
}

impl From<&Summary> for v1::Summary {
    fn from(s: &Summary) -> Self {
        Self {
            train_loss: s.train_loss,
            train_ppl: s.train_ppl,
            valid_loss: s.valid_loss,
            valid_ppl: s.valid_ppl,
            test_loss: s.test_loss,
            test_ppl: s.test_ppl,
            words_per_sec: s.words_per_sec,
            params: s.params as u64,
            seconds: s.seconds,
            train_seconds: s.train_seconds,
            steps: s.steps,
            epochs_completed: s.epochs_completed,
            stopped_by: v1::StoppedBy::from(s.stopped_by) as i32,
            vocab_size: s.vocab_size as u64,
            backend: s.backend.clone(),
            world_size: s.world_size as u64,
            control_seconds: s.control_seconds,
            config_toml: s.config.to_toml(),
            history: s.history.iter().map(Into::into).collect(),
            auto_realloc_json: auto_to_wire(&s.auto_realloc),
        }
    }
}

impl TryFrom<v1::Summary> for Summary {
    type Error = Error;
    fn try_from(s: v1::Summary) -> Result<Self> {
        let stopped_by = match v1::StoppedBy::try_from(s.stopped_by) {
            Ok(v1::StoppedBy::Epochs) => StoppedBy::Epochs,
            Ok(v1::StoppedBy::MaxSteps) => StoppedBy::MaxSteps,
            Ok(v1::StoppedBy::Signal) => StoppedBy::Signal,
            _ => {
                return Err(bad(
                    "summary",
                    "it says neither how nor why the run stopped",
                ));
            }
        };
        Ok(Self {
            train_loss: s.train_loss,
            train_ppl: s.train_ppl,
            valid_loss: s.valid_loss,
            valid_ppl: s.valid_ppl,
            test_loss: s.test_loss,
            test_ppl: s.test_ppl,
            words_per_sec: s.words_per_sec,
            params: size("summary", s.params)?,
            seconds: s.seconds,
            train_seconds: s.train_seconds,
            steps: s.steps,
            epochs_completed: s.epochs_completed,
            stopped_by,
            vocab_size: size("summary", s.vocab_size)?,
            backend: s.backend,
            world_size: size("summary", s.world_size)?,
            control_seconds: s.control_seconds,
            config: config("summary's config", &s.config_toml)?,
            history: s.history.into_iter().map(Into::into).collect(),
            auto_realloc: auto_from_wire("summary", &s.auto_realloc_json)?,
            // The coordinator has every rank's checksum (Finish) and adds it.
            params_sha256: String::new(),
        })
    }
}

impl TryFrom<v1::PrepareRequest> for PrepareAsk {
    type Error = Error;

    fn try_from(r: v1::PrepareRequest) -> Result<Self> {
        let report = match (r.task, r.working, r.error.is_empty()) {
            (0, _, _) => None,
            (task, true, _) => Some((task, TaskReport::Working)),
            (task, false, false) => Some((
                task,
                TaskReport::Failed {
                    error: r.error,
                    retryable: r.retryable,
                },
            )),
            (task, false, true) => Some((
                task,
                TaskReport::Done(serde_json::from_str(&r.done_json).map_err(|e| {
                    Error::Control(format!("task {task}: a result that does not parse: {e}"))
                })?),
            )),
        };
        Ok(Self {
            worker: r.worker,
            version: r.version,
            report,
        })
    }
}

impl From<&PrepareAsk> for v1::PrepareRequest {
    fn from(a: &PrepareAsk) -> Self {
        let mut r = Self {
            worker: a.worker.clone(),
            version: a.version.clone(),
            ..Default::default()
        };
        if let Some((task, report)) = &a.report {
            r.task = *task;
            match report {
                TaskReport::Working => r.working = true,
                TaskReport::Done(d) => {
                    r.done_json = serde_json::to_string(d).unwrap_or_default();
                }
                TaskReport::Failed { error, retryable } => {
                    r.error = error.clone();
                    r.retryable = *retryable;
                }
            }
        }
        r
    }
}

impl From<&PrepareAnswer> for v1::PrepareReply {
    fn from(a: &PrepareAnswer) -> Self {
        match a {
            PrepareAnswer::Task {
                id,
                task,
                heartbeat,
            } => Self {
                task: *id,
                task_json: serde_json::to_string(task).unwrap_or_default(),
                heartbeat_ms: heartbeat.as_millis() as u64,
                ..Default::default()
            },
            PrepareAnswer::Wait(d) => Self {
                wait_ms: d.as_millis() as u64,
                ..Default::default()
            },
            PrepareAnswer::Ready => Self {
                ready: true,
                ..Default::default()
            },
            PrepareAnswer::Abandon => Self {
                abandon: true,
                ..Default::default()
            },
        }
    }
}

impl TryFrom<v1::PrepareReply> for PrepareAnswer {
    type Error = Error;

    fn try_from(r: v1::PrepareReply) -> Result<Self> {
        if r.ready {
            return Ok(Self::Ready);
        }
        if r.abandon {
            return Ok(Self::Abandon);
        }
        if r.task == 0 {
            return Ok(Self::Wait(Duration::from_millis(
                r.wait_ms.clamp(10, 10_000),
            )));
        }
        let t = serde_json::from_str(&r.task_json).map_err(|e| {
            Error::Control(format!(
                "task {}: a task that does not parse (is the coordinator's version this worker's?): {e}",
                r.task
            ))
        })?;
        Ok(Self::Task {
            id: r.task,
            task: Box::new(t),
            heartbeat: Duration::from_millis(r.heartbeat_ms.clamp(10, 60_000)),
        })
    }
}
