//! Checkpointing a run: [`Checkpointing::checkpoint`] (the carried state gathered from
//! the ranks, rank 0 writing the objects, the job's owner committing the manifest, old
//! checkpoints pruned), and [`save_best`], the best model so far kept in `out/best`.

use std::time::Instant;

use lightrnn_kernels::{State, Stream};

use super::run::Run;
use crate::dist::state::{concat_states, gather_state, params_checksum};
use lightrnn_core::Result;
use lightrnn_core::checkpoint::{self, Meta, SaveRequest};
use lightrnn_core::config::CheckpointSettings;
use lightrnn_core::data::store::Location;

/// When a run checkpoints, and the last checkpoint known committed.
pub(super) struct Checkpointing {
    settings: CheckpointSettings,
    /// Step of the last checkpoint known committed (this session's, or the one resumed).
    committed: Option<u64>,
}

impl Checkpointing {
    pub(super) fn new(settings: CheckpointSettings, committed: Option<u64>) -> Self {
        Self {
            settings,
            committed,
        }
    }

    /// Whether a periodic checkpoint falls at step `step`.
    pub(super) fn due(&self, step: u64) -> bool {
        self.settings.due(step)
    }

    /// Whether the checkpoint of step `step` is committed already.
    pub(super) fn committed_at(&self, step: u64) -> bool {
        self.committed == Some(step)
    }

    /// A checkpoint at this step, every rank at the same step: the carried state is
    /// gathered from all ranks, rank 0 writes the objects, the job's owner commits the
    /// manifest once all ranks are there.
    pub(super) fn checkpoint(&mut self, run: &mut Run<'_>, cursor: u64) -> Result<()> {
        let prof = run.prof.clone();
        let _s = prof.span(lightrnn_kernels::Phase::Checkpoint);
        let t = Instant::now();
        let (d, leader) = (run.model.dims, run.dist.is_leader());
        let dir = run
            .opts
            .out
            .join("checkpoints")
            .join(&checkpoint::dir_name(run.st.step));
        let parts: Option<Vec<_>> = (0..run.model.gpr)
            .map(|g| run.model.backend.state(Stream::Train(g as u32)))
            .collect::<lightrnn_kernels::Result<Vec<_>>>()?
            .into_iter()
            .collect();
        let local = parts.map(|p| concat_states(&p, d.layers, d.hidden));
        let state = gather_state(
            &mut *run.dist.collective,
            local.as_ref(),
            run.cfg.batch,
            d.layers,
            d.hidden,
        )?;
        let meta = if leader {
            Some(save(run, cursor, &dir, state.as_ref(), true)?)
        } else {
            None
        };
        let sum = params_checksum(&run.model.backend.params()?);
        // Every line up to this step is written before the checkpoint exists: a run
        // resumed from it keeps them (and logs the later ones again).
        run.flush_metrics(true)?;
        run.dist
            .control
            .commit(run.st.step, &dir, meta.as_ref(), &sum)?;
        self.committed = Some(run.st.step);
        let r = &mut run.report;
        r.step = run.st.step;
        r.checkpoint_step = run.st.step;
        r.checkpoint_seconds = t.elapsed().as_secs_f64();
        r.checkpoint_bytes = meta
            .as_ref()
            .map_or(0, |m| m.files.iter().map(|f| f.bytes).sum());
        r.checkpoints += 1;
        run.publish();
        if leader {
            run.handle.block_on(checkpoint::prune(
                &run.opts.out,
                self.settings.keep,
                self.settings.keep_every,
            ))?;
            tracing::info!(step = run.st.step, dir = %dir, seconds = t.elapsed().as_secs_f64(), "checkpoint written");
        }
        Ok(())
    }
}

/// The model after this epoch is the best so far: keep it (and, on the leader, in
/// `out/best`, which the test score uses).
pub(super) fn save_best(run: &mut Run<'_>, valid_loss: f64) -> Result<()> {
    run.st.best_valid_loss = Some(valid_loss);
    run.st.best_params = Some(run.model.backend.params()?);
    run.st.best_cells = Some(run.model.backend.allocation()?);
    if run.dist.is_leader() {
        let dir = run.opts.out.join("best");
        let meta = save(run, 0, &dir, None, false)?;
        run.handle
            .block_on(checkpoint::commit(&dir, &meta, false))?;
    }
    Ok(())
}

/// Write a checkpoint's objects into `dir` and return its manifest (not committed).
fn save(
    run: &Run<'_>,
    cursor: u64,
    dir: &Location,
    state: Option<&State<f32>>,
    with_train_state: bool,
) -> Result<Meta> {
    let (cfg, st, vocab) = (run.cfg, &run.st, &run.ds.vocab);
    let backend = &run.model.backend;
    let meta = Meta {
        format: checkpoint::FORMAT.into(),
        version: 1,
        step: st.step,
        epoch: st.epoch,
        cursor,
        config: cfg.clone(),
        dims: run.model.dims,
        vocab_size: vocab.len(),
        vocab_sha256: vocab.sha256(),
        rng_seed: cfg.seed,
        optimizer: with_train_state.then_some(run.model.rule),
        optimizer_updates: if with_train_state { st.step } else { 0 },
        lr: st.lr,
        best_valid_loss: st.best_valid_loss,
        epoch_loss_sum: st.epoch_loss_sum,
        epoch_words: st.epoch_words,
        seconds: st.train_seconds,
        history: st.history.clone(),
        reallocations: st.reallocations,
        realloc_pending: with_train_state && st.realloc_pending,
        auto_realloc: st.auto.clone(),
        job: None,
        files: vec![],
    };
    let params = backend.params()?;
    let cells = backend.allocation()?;
    let opt = if with_train_state {
        backend.optimizer_state()?
    } else {
        None
    };
    let req = SaveRequest {
        meta,
        vocab,
        layout: backend.layout(),
        params: &params,
        cells: &cells,
        optimizer: opt.as_ref(),
        state,
    };
    run.handle.block_on(checkpoint::write_objects(dir, req))
}
