//! What a run remembers across coordinator restarts: `RUN/run.json` (the run's id, the
//! coordinator processes that have served it, the highest generation handed out) and
//! the job's counters in each committed checkpoint's manifest ([`JobRecord`]).
//!
//! A restarted coordinator (`--resume`) keeps the run id, numbers its generations on
//! from the highest one any earlier coordinator handed out (recorded before a
//! generation's workers learn its number, so a worker of an earlier coordinator always
//! holds an older generation and is refused as stale), and continues the counters from
//! the checkpoint it resumes from: the counters of the trajectory that survives.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use lightrnn_core::checkpoint::JobRecord;
use lightrnn_core::data::store::Location;
use lightrnn_core::{Error, Result};

use super::state::JobStats;

/// The object in the run directory.
pub const RUN_JSON: &str = "run.json";
const FORMAT: &str = "lightrnn.run";

/// `RUN/run.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub format: String,
    pub run_id: String,
    /// When the run started (seconds since the Unix epoch).
    pub started_unix: u64,
    /// Coordinator processes that have served the run, this one included.
    pub coordinator_starts: u64,
    /// The highest generation a coordinator of this run has handed out.
    pub generation: u64,
}

fn unix_now() -> std::time::Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

/// `n` random bytes from the system, in hex (run ids, a job's token).
pub fn random_hex(n: usize) -> Result<String> {
    Ok(random_bytes(n)?
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect())
}

/// `n` bytes from the system's random source (secrets: tokens, ring keys).
pub fn random_bytes(n: usize) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut b = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| Error::Io(format!("reading /dev/urandom: {e}")))?;
    Ok(b)
}

/// A fresh run id: the start time in milliseconds and 32 random bits, in hex (every log
/// line of a worker carries it: short).
fn new_run_id() -> Result<String> {
    Ok(format!("{:x}-{}", unix_now().as_millis(), random_hex(4)?))
}

impl RunRecord {
    /// The record of a run starting now.
    pub fn new_run() -> Result<Self> {
        Ok(Self {
            format: FORMAT.into(),
            run_id: new_run_id()?,
            started_unix: unix_now().as_secs(),
            coordinator_starts: 1,
            generation: 0,
        })
    }

    /// The run directory's record, if it has one.
    pub async fn read(out: &Location) -> Result<Option<Self>> {
        let b = match out.get(RUN_JSON).await {
            Ok(b) => b,
            Err(Error::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let r: Self = serde_json::from_slice(&b)
            .map_err(|e| Error::Data(format!("{}: not a run record: {e}", out.url_of(RUN_JSON))))?;
        if r.format != FORMAT {
            return Err(Error::Data(format!(
                "{}: format {:?}, expected {FORMAT:?}",
                out.url_of(RUN_JSON),
                r.format
            )));
        }
        Ok(Some(r))
    }

    pub async fn write(&self, out: &Location) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| Error::Data(e.to_string()))?;
        out.put(RUN_JSON, Bytes::from(json)).await
    }

    /// The record of this coordinator: a new run, or (resuming) the run in `out`
    /// continued by one more coordinator, its generations numbered on from the highest
    /// handed out. `checkpointed` is the job record of the checkpoint resumed from (it
    /// stands in for a lost `run.json`).
    pub async fn start(
        out: &Location,
        resume: bool,
        checkpointed: Option<&JobRecord>,
    ) -> Result<Self> {
        let prev = if resume { Self::read(out).await? } else { None };
        let ck_generation = checkpointed.map_or(0, |j| j.generation);
        let mut r = match (prev, checkpointed) {
            (Some(r), _) => r,
            (None, Some(j)) if resume => Self {
                run_id: j.run_id.clone(),
                coordinator_starts: j.coordinator_starts,
                ..Self::new_run()?
            },
            _ => Self {
                coordinator_starts: 0,
                ..Self::new_run()?
            },
        };
        r.coordinator_starts += 1;
        // The first generation of this coordinator, recorded before any worker joins.
        r.generation = r.generation.max(ck_generation) + 1;
        r.write(out).await?;
        Ok(r)
    }
}

impl JobStats {
    /// The counters a restarted coordinator continues from.
    pub fn restored(r: &JobRecord) -> Self {
        Self {
            epochs_accounted: r.epoch_tokens.len() as u64,
            tokens_accounted: r.epoch_tokens.values().sum(),
            epoch_tokens: r.epoch_tokens.clone(),
            checkpoints_committed: r.checkpoints_committed,
            restarts: r.restarts.clone(),
            reallocations: r.reallocations,
            grows: r.grows,
            realloc_bytes_in: r.realloc_bytes_in,
            worlds: r.worlds.clone(),
            ..Default::default()
        }
    }

    /// The record of a checkpoint committed now, by `generation` of run `run_id`.
    pub fn record(&self, run_id: &str, generation: u64, coordinator_starts: u64) -> JobRecord {
        JobRecord {
            run_id: run_id.to_string(),
            generation,
            coordinator_starts,
            epoch_tokens: self.epoch_tokens.clone(),
            // This checkpoint included.
            checkpoints_committed: self.checkpoints_committed + 1,
            restarts: self.restarts.clone(),
            reallocations: self.reallocations,
            grows: self.grows,
            realloc_bytes_in: self.realloc_bytes_in,
            worlds: self.worlds.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_resumed_run_keeps_its_id_and_numbers_its_generations_on() {
        let tmp = tempfile::tempdir().unwrap();
        let out = Location::parse(tmp.path().to_str().unwrap()).unwrap();
        let first = RunRecord::start(&out, false, None).await.unwrap();
        assert_eq!((first.coordinator_starts, first.generation), (1, 1));
        // The first coordinator went on to generation 4; its last checkpoint is of 3.
        let mut later = first.clone();
        later.generation = 4;
        later.write(&out).await.unwrap();
        let ck = |generation| JobRecord {
            run_id: first.run_id.clone(),
            generation,
            coordinator_starts: 1,
            ..Default::default()
        };
        let second = RunRecord::start(&out, true, Some(&ck(3))).await.unwrap();
        assert_eq!(second.run_id, first.run_id);
        assert_eq!((second.coordinator_starts, second.generation), (2, 5));
        assert_eq!(RunRecord::read(&out).await.unwrap(), Some(second.clone()));
        // A checkpoint of a later generation than the file says wins.
        let third = RunRecord::start(&out, true, Some(&ck(9))).await.unwrap();
        assert_eq!((third.coordinator_starts, third.generation), (3, 10));
        // Without run.json, the checkpoint's record carries the run on.
        std::fs::remove_file(tmp.path().join(RUN_JSON)).unwrap();
        let fourth = RunRecord::start(&out, true, Some(&ck(9))).await.unwrap();
        assert_eq!(fourth.run_id, first.run_id);
        assert_eq!((fourth.coordinator_starts, fourth.generation), (2, 10));
        // A new run over the directory gets a new id.
        let fresh = RunRecord::start(&out, false, None).await.unwrap();
        assert_ne!(fresh.run_id, first.run_id);
        assert_eq!((fresh.coordinator_starts, fresh.generation), (1, 1));
    }

    #[test]
    fn the_counters_survive_a_checkpoint_record() {
        let mut s = JobStats {
            checkpoints_committed: 6,
            reallocations: 2,
            ..Default::default()
        };
        s.epoch_tokens.insert(0, 1000);
        s.epoch_tokens.insert(1, 1200);
        s.restarts.insert("heartbeat".into(), 1);
        let r = s.record("run", 3, 2);
        assert_eq!(r.checkpoints_committed, 7);
        let back = JobStats::restored(&r);
        assert_eq!(back.tokens_accounted, 2200);
        assert_eq!(back.epochs_accounted, 2);
        assert_eq!(back.checkpoints_committed, 7);
        assert_eq!(back.restarts, s.restarts);
        assert_eq!(back.reallocations, 2);
    }
}
