//! `impl Backend for CudaBackend`: each call of the boundary on the device, calling the
//! host side (`host`) and the device work (`step`: [`super::step::DevPass`]'s methods bear
//! the calls' names) directly.

use super::CudaBackend;
use super::backend::{DevOpt, DevTables};
use super::buffers::Buf;
use super::comm::allreduce::{Lent, reduce_scatter_units};
use super::layer::Counters;
use super::work::{Cx, UpdateWork, Work};
use super::workspace::{HeadMode, Workspace, check_fits, model_bytes};
use crate::backend::{
    Backend, Batch, GradReduce, GradsMut, LossSums, OptimizerState, Pass, Peers, ScatteredTables,
    Shard, State, StepFigures, Stream,
};
use crate::layout::{ParamLayout, check_allocation};
use crate::optim::Optimizer;
use crate::tables::LossTables;
use crate::{Error, Result};

impl Backend for CudaBackend {
    fn name(&self) -> String {
        format!(
            "cuda: {} (model {:.1} MiB{})",
            self.dev.name(),
            model_bytes(self.dl.total) as f64 / 1048576.0,
            if self.graphs.enabled() {
                ", CUDA graphs"
            } else {
                ""
            }
        )
    }
    fn layout(&self) -> &ParamLayout {
        &self.layout
    }
    fn params(&self) -> Result<Vec<f32>> {
        self.flush()?;
        let dev = self.params.download(self.dev(), 0, self.dl.total)?;
        Ok(self.dl.compact(&self.layout, &dev))
    }
    fn set_params(&mut self, torch: &[f32]) -> Result<()> {
        self.flush()?;
        self.layout.check_len(torch.len())?;
        self.params
            .upload(self.dev(), 0, &self.dl.expand(&self.layout, torch))
    }
    fn grads(&self) -> Result<Vec<f32>> {
        self.flush()?;
        let dev = self.grads.download(self.dev(), 0, self.dl.total)?;
        Ok(self.dl.compact(&self.layout, &dev))
    }
    fn allocation(&self) -> Result<Vec<u32>> {
        Ok(self.cells.clone())
    }
    fn set_allocation(&mut self, cells: &[u32]) -> Result<()> {
        check_allocation(&self.layout.dims, cells)?;
        self.cells.clear();
        self.cells.extend_from_slice(cells);
        Ok(())
    }
    fn state(&self, stream: Stream) -> Result<Option<State<f32>>> {
        self.flush()?;
        let Some(st) = self.states.get(&stream).filter(|s| s.live) else {
            return Ok(None);
        };
        let n = st.h.len();
        Ok(Some(State {
            batch: st.batch,
            h: st.h.download(self.dev(), 0, n)?,
            c: st.c.download(self.dev(), 0, n)?,
        }))
    }
    fn set_state(&mut self, stream: Stream, state: State<f32>) -> Result<()> {
        self.flush()?;
        state.check(&self.layout.dims)?;
        if let Some(st) = self.states.get_mut(&stream) {
            st.live = false;
        }
        self.ensure_state(stream, state.batch)?;
        let dev = self.dev.as_ref();
        let st = self
            .states
            .get_mut(&stream)
            .ok_or_else(|| Error::Backend("state".into()))?;
        st.h.upload(dev, 0, &state.h)?;
        st.c.upload(dev, 0, &state.c)?;
        st.live = true;
        Ok(())
    }
    fn reset_state(&mut self, stream: Stream) {
        // Kept for the next batch of the stream (a graph holds its address), zeroed before
        // that batch reads it.
        if let Some(st) = self.states.get_mut(&stream) {
            st.live = false;
            st.dirty = true;
        }
    }
    fn set_shard(&mut self, shard: Shard) -> Result<()> {
        shard.check()?;
        self.shard = shard;
        Ok(())
    }
    /// A pass of the per-layer interface (or an evaluation): prepared on the host, its
    /// inputs uploaded, its state loaded, the layer-0 rows gathered.
    fn input_forward(&mut self, batch: &Batch<'_>, pass: Pass) -> Result<()> {
        self.flush()?;
        self.staging_free()?;
        self.prepare_host(batch, 0, 1)?;
        let (train, step) = match pass {
            Pass::Train { step } => (self.dropout > 0.0, step),
            Pass::Eval => (false, 0),
        };
        self.stage_batch_knobs(step, 0.0)?;
        let ws = self.ws()?;
        let cx = Cx {
            region: 0,
            stream: batch.stream,
            keyed: self.shard.whole_key(batch.batch),
            slot: 0,
            loss_at: ws.eval_loss_at(),
            train,
        };
        if let Some(st) = self.states.get_mut(&batch.stream) {
            st.live = true;
        }
        self.upload_batch_knobs()?;
        self.pass(cx).input_forward()?;
        self.cur = Some(cx);
        self.have_head_grads = false;
        Ok(())
    }
    fn lstm_forward(&mut self, layer: usize) -> Result<()> {
        let cx = self.current("lstm_forward")?;
        self.layout.dims.check_layer(layer)?;
        self.pass(cx).lstm_forward(layer)
    }
    fn heads(&mut self, grad_scale: Option<f32>) -> Result<LossSums> {
        let cx = self.current("heads")?;
        let mode = match grad_scale {
            Some(s) => {
                // The scale goes up with the batch's scalars (the staging is free: the
                // pass waited for nothing since, and issued no copy from it).
                self.wait()?;
                let ws = self
                    .ws
                    .as_mut()
                    .ok_or_else(|| Error::Backend("no batch".into()))?;
                ws.staging.batch.slice_mut::<f32>(8, 1)?[0] = s;
                self.upload_batch_knobs()?;
                HeadMode::Grad
            }
            None => HeadMode::Loss,
        };
        self.pass(cx).heads(mode)?;
        self.have_head_grads = mode == HeadMode::Grad;
        self.pass_loss(&cx)
    }
    fn lstm_backward(&mut self, layer: usize) -> Result<()> {
        let cx = self.current("lstm_backward")?;
        self.layout.dims.check_layer(layer)?;
        if !self.have_head_grads {
            return Err(Error::Backend(
                "lstm_backward without a gradient from the heads".into(),
            ));
        }
        self.pass(cx).lstm_backward(layer)
    }

    fn train_step(&mut self, batch: &Batch<'_>, step: u64, scale: f32) -> Result<()> {
        self.flush()?;
        self.staging_free()?;
        self.cur = None;
        let work = self.prepare_step(batch, step, scale)?;
        *self.pending.borrow_mut() = Some(work);
        Ok(())
    }

    fn step_loss(&mut self) -> Result<LossSums> {
        self.flush()?;
        let n = 2 * self.last_groups;
        self.read_results(Workspace::loss_at(0), n)?;
        self.step_losses_staged()
    }

    fn all_reduce_grads(&mut self, coll: &mut dyn GradReduce) -> Result<()> {
        self.flush()?;
        self.mark(|| "all_reduce".into())?;
        // Lent where it lies: NCCL sums it on the device, a host collective stages it.
        let n = self.dl.total;
        let mut lent = Lent {
            dev: self.dev.as_ref(),
            grads: &mut self.grads,
            n,
            scratch: &mut self.reduce,
        };
        coll.all_reduce_grads(GradsMut::Device(&mut lent))
    }

    fn set_profiler(&mut self, profiler: crate::Profiler) {
        self.profiler = profiler;
    }

    fn clip_and_step(&mut self, rule: &Optimizer, lr: f64, max_norm: f64) -> Result<StepFigures> {
        if self.ws.is_none() {
            return Err(Error::Backend(
                "clip_and_step before a training step".into(),
            ));
        }
        self.ensure_optimizer(rule)?;
        let t = self.opt.as_ref().map_or(0, |o| o.updates) + 1;
        if self
            .ws
            .as_ref()
            .is_some_and(|w| w.staging.update_busy.get())
        {
            self.wait()?;
        }
        self.stage_update_knobs(rule, lr, max_norm, t)?;
        let update = UpdateWork::new(rule);
        let work = match self.pending.borrow_mut().take() {
            Some(train) => Work::Step(train, update),
            None => Work::Update(update),
        };
        self.run_work(&work)?;
        self.wait()?;
        self.device_spans()?;
        let sum_sq = self.ws()?.staging.results.slice::<f64>(0, 1)?[0];
        let loss = self.step_losses_staged()?;
        let norm = sum_sq.sqrt();
        if norm.is_finite()
            && let Some(o) = self.opt.as_mut()
        {
            o.updates = t;
        }
        Ok(StepFigures { loss, norm })
    }

    fn optimizer_state(&self) -> Result<Option<OptimizerState>> {
        self.flush()?;
        let Some(o) = &self.opt else { return Ok(None) };
        let buffers = o
            .rule
            .state_names()
            .iter()
            .zip(&o.bufs)
            .map(|(name, b)| {
                let dev = b.download(self.dev(), 0, self.dl.total)?;
                Ok((name.to_string(), self.dl.compact(&self.layout, &dev)))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(OptimizerState {
            rule: o.rule,
            updates: o.updates,
            buffers,
        }))
    }
    fn set_optimizer_state(&mut self, state: OptimizerState) -> Result<()> {
        self.flush()?;
        let n = self.layout.total;
        let mut bufs = Vec::new();
        for name in state.rule.state_names() {
            let b = state
                .buffers
                .iter()
                .find(|(k, _)| k == name)
                .ok_or_else(|| Error::Shape(format!("optimizer state lacks buffer {name:?}")))?;
            if b.1.len() != n {
                return Err(Error::Shape(format!(
                    "{:?} state needs buffers of {n} values",
                    state.rule
                )));
            }
            bufs.push(Buf::from_host(
                self.dev(),
                &self.dl.expand(&self.layout, &b.1),
            )?);
        }
        self.release()?;
        self.opt = Some(DevOpt {
            rule: state.rule,
            bufs,
            updates: state.updates,
        });
        Ok(())
    }

    fn begin_loss_tables(&mut self, words: std::ops::Range<usize>, max_bytes: u64) -> Result<()> {
        self.flush()?;
        let d = self.layout.dims;
        self.tables = None;
        // The host copy `take_loss_tables` returns has the same size: refuse as the CPU.
        let bytes = LossTables::check_range(&d, &words, max_bytes)?;
        let n = words.len();
        check_fits(self.dev(), bytes, "the loss tables")?;
        self.tables = Some(DevTables {
            words,
            lr: Buf::zeros(self.dev(), n * d.rows)?,
            lc: Buf::zeros(self.dev(), n * d.cols)?,
            counts: vec![0; n],
        });
        Ok(())
    }

    fn accumulate_loss_tables(&mut self, batch: &Batch<'_>) -> Result<LossSums> {
        if self.tables.is_none() {
            return Err(Error::Backend(
                "accumulate_loss_tables before begin_loss_tables".into(),
            ));
        }
        self.forward(batch, Pass::Eval)?;
        let cx = self.current("accumulate_loss_tables")?;
        self.pass(cx).heads(HeadMode::Table)?;
        let loss = self.pass_loss(&cx)?;
        self.accumulate_tables()?;
        Ok(loss)
    }

    fn take_loss_tables_scattered(
        &mut self,
        peers: &mut dyn Peers,
    ) -> Result<Option<ScatteredTables>> {
        self.flush()?;
        let DevTables {
            words,
            lr,
            lc,
            counts,
        } = self.tables.take().ok_or_else(|| {
            Error::Backend("take_loss_tables_scattered without a loss-table pass".into())
        })?;
        let d = self.layout.dims;
        let dev = self.dev();
        let n = words.len();
        // One table at a time, each freed once its share is on the host: the device holds
        // the tables and one receive buffer of the larger at most.
        let (own, lr_own) = reduce_scatter_units(dev, peers, &lr, n, d.rows)?;
        drop(lr);
        let (own_c, lc_own) = reduce_scatter_units(dev, peers, &lc, n, d.cols)?;
        drop(lc);
        debug_assert_eq!(own, own_c);
        let a = words.start;
        Ok(Some(ScatteredTables {
            own: LossTables {
                vocab: d.vocab,
                rows: d.rows,
                cols: d.cols,
                words: a + own.start..a + own.end,
                lr: lr_own,
                lc: lc_own,
                counts: counts[own.clone()].to_vec(),
            },
            counts,
        }))
    }

    fn take_loss_tables(&mut self) -> Result<LossTables> {
        self.flush()?;
        let t = self
            .tables
            .take()
            .ok_or_else(|| Error::Backend("take_loss_tables without a loss-table pass".into()))?;
        let d = self.layout.dims;
        let dev = self.dev();
        let n = t.words.len();
        Ok(LossTables {
            vocab: d.vocab,
            rows: d.rows,
            cols: d.cols,
            words: t.words,
            lr: t.lr.download(dev, 0, n * d.rows)?,
            lc: t.lc.download(dev, 0, n * d.cols)?,
            counts: t.counts,
        })
    }

    fn device_counters(&self) -> Option<Counters> {
        Some(self.counters())
    }
}

impl CudaBackend {
    /// The pass the per-layer calls are in (`what` is the call that needs one).
    fn current(&self, what: &str) -> Result<Cx> {
        self.cur
            .ok_or_else(|| Error::Backend(format!("{what} before input_forward")))
    }
}
