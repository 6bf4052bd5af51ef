//! The data of every epoch: each rank leases its share of the global batch's streams,
//! and the epoch barrier checks that together the ranks consumed exactly the epoch's
//! tokens (those before a resumed cursor are certified by the checkpoint it came from).

use lightrnn_core::protocol::{EpochDone, Lease, Leased};
use lightrnn_core::util::share;

use super::{Job, JobError, JobResult};

impl Job {
    /// Rank `r.rank`'s streams of the epoch; every rank must ask for the same geometry.
    pub fn lease(&self, r: Lease) -> JobResult<Leased> {
        self.count_rpc();
        let mut st = self.lock();
        self.check(&st, r.generation, r.rank)?;
        let w = st.world;
        let acc = st.epochs.entry(r.epoch).or_default();
        if acc.leased.is_empty() {
            acc.leased = vec![false; w];
            acc.done = vec![false; w];
        }
        let geometry = (r.streams, r.cursor);
        match acc.geometry {
            None => {
                let per_stream = self.train_tokens() / r.streams.max(1);
                acc.geometry = Some(geometry);
                acc.expected = per_stream
                    .saturating_sub(1)
                    .saturating_sub(r.cursor)
                    .saturating_mul(r.streams);
            }
            Some(g) if g != geometry => {
                let why = format!(
                    "epoch {}: rank {} asks for {} streams from position {}, another rank for {} from {}",
                    r.epoch, r.rank, r.streams, r.cursor, g.0, g.1
                );
                st.fail(why.clone());
                drop(st);
                self.bump();
                return Err(JobError::Ended(why));
            }
            Some(_) => {}
        }
        acc.leased[r.rank as usize] = true;
        let s = share(r.streams as usize, w, r.rank as usize);
        Ok(Leased {
            epoch: r.epoch,
            streams: s,
        })
    }

    /// Rank `r.rank` finished its lease of the epoch having consumed `r.tokens`; returns
    /// once every rank has, with the epoch's tokens. A total that is not the epoch's ends
    /// the job.
    pub async fn epoch_done(&self, r: EpochDone) -> JobResult<u64> {
        self.count_rpc();
        let mismatch = self.account(&r)?;
        self.bump();
        if let Some(why) = mismatch {
            return Err(JobError::Ended(why));
        }
        let epoch = r.epoch;
        self.wait_for(r.generation, |st| {
            let acc = st.epochs.get(&epoch)?;
            acc.done.iter().all(|&d| d).then_some(Ok(acc.tokens))
        })
        .await
    }

    /// Count a rank's tokens at the barrier; once all ranks are in, check the total
    /// (the mismatch, if any, has failed the job).
    fn account(&self, r: &EpochDone) -> JobResult<Option<String>> {
        let mut st = self.lock();
        self.check(&st, r.generation, r.rank)?;
        let Some(acc) = st.epochs.get_mut(&r.epoch) else {
            return Err(JobError::OutOfTurn(format!(
                "epoch {} was never leased",
                r.epoch
            )));
        };
        if !acc.leased[r.rank as usize] || acc.done[r.rank as usize] {
            return Err(JobError::OutOfTurn(format!(
                "rank {} has no open lease of epoch {}",
                r.rank, r.epoch
            )));
        }
        acc.done[r.rank as usize] = true;
        acc.tokens = acc.tokens.saturating_add(r.tokens);
        if !acc.done.iter().all(|&d| d) || acc.checked {
            return Ok(None);
        }
        acc.checked = true;
        if acc.tokens != acc.expected {
            let why = format!(
                "epoch {}: the ranks consumed {} tokens, the epoch's leases hold {}",
                r.epoch, acc.tokens, acc.expected
            );
            st.fail(why.clone());
            return Ok(Some(why));
        }
        // The tokens before the lease's cursor were consumed by an earlier generation or
        // session and are certified by the checkpoint the cursor comes from; those since
        // were counted here.
        let (streams, cursor) = acc.geometry.unwrap_or_default();
        let epoch_tokens = acc.tokens.saturating_add(cursor.saturating_mul(streams));
        tracing::info!(epoch = r.epoch, tokens = epoch_tokens, "epoch accounted");
        let mut x = self.stats_mut();
        // An epoch finished again after a rollback replaces its count: the model kept
        // only the second pass.
        x.epoch_tokens.insert(r.epoch, epoch_tokens);
        x.epochs_accounted = x.epoch_tokens.len() as u64;
        x.tokens_accounted = x.epoch_tokens.values().sum();
        Ok(None)
    }
}
