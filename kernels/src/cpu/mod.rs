//! The CPU backend: [`Engine`] (the math, generic over f32/f64; AVX-512/AVX2 chosen at run
//! time; GEMMs through the `gemm` crate) and [`CpuBackend`], its `f32` instance behind the
//! [`crate::Backend`] boundary, which also keeps the gradient groups' partial sums and the
//! loss tables of a reallocation round.

mod backward;
mod engine;
mod forward;
pub mod gemm;
mod heads;
pub mod infer;
pub mod layout;
pub mod simd;
pub mod team;

pub use engine::{Engine, NamedBuffers, row_of};

use crate::backend::{
    Backend, Batch, GradReduce, GradsMut, LossSums, ModelConfig, OptimizerState, Pass, Shard,
    State, Stream,
};
use crate::layout::ParamLayout;
use crate::optim::{Optimizer, clip_coefficient};
use crate::tables::LossTables;
use crate::{Error, Result};

/// The CPU backend: [`Engine<f32>`] plus the buffers of the grouped gradient sum and of
/// the loss tables.
pub struct CpuBackend {
    engine: Engine<f32>,
    shard: Shard,
    /// The tokens of one gradient group, [T + 1, B / groups] (reused every step).
    group_tokens: Vec<u32>,
    /// The pairwise sum of the groups' gradients: partial sums with their tree level, and
    /// buffers free for the next group (kept between steps: no allocation per step).
    partial: Vec<(u32, Vec<f32>)>,
    spare: Vec<Vec<f32>>,
    /// The loss tables of the reallocation round in progress.
    tables: Option<LossTables>,
}

impl CpuBackend {
    /// A model on `threads` CPU threads (0 = one per core).
    pub fn new(cfg: &ModelConfig, threads: usize) -> Result<Self> {
        Ok(Self {
            engine: Engine::new(cfg.dims, cfg.dropout, cfg.seed, threads)?,
            shard: Shard::WHOLE,
            group_tokens: Vec::new(),
            partial: Vec::new(),
            spare: Vec::new(),
            tables: None,
        })
    }

    pub fn engine(&self) -> &Engine<f32> {
        &self.engine
    }

    /// Forward and backward of one batch; the gradient is left in the engine's buffer.
    fn forward_backward(&mut self, batch: &Batch<'_>, step: u64, scale: f32) -> Result<LossSums> {
        self.forward(batch, Pass::Train { step })?;
        let loss = self.engine.heads(Some(scale))?;
        for l in (0..self.engine.dims().layers).rev() {
            self.engine.lstm_backward(l)?;
        }
        Ok(loss)
    }

    /// The groups of a training batch in turn (group g: streams g * B/G.. of the batch,
    /// dropout keyed at `offset` + g * B/G of `global`, state in `Train(first + g)`), their
    /// gradients folded into the pairwise sum, left in the engine's gradient buffer.
    fn grouped_step(
        &mut self,
        batch: &Batch<'_>,
        tokens: &mut Vec<u32>,
        first: u32,
        (offset, global): (usize, usize),
        step: u64,
        scale: f32,
    ) -> Result<LossSums> {
        let (bl, t, groups) = (batch.batch, batch.steps, self.shard.groups);
        let gs = bl / groups;
        let mut total = LossSums::default();
        for g in 0..groups {
            tokens.clear();
            for k in 0..=t {
                let row: &[u32] = if k < t {
                    &batch.inputs[k * bl..(k + 1) * bl]
                } else {
                    &batch.targets[(t - 1) * bl..t * bl]
                };
                tokens.extend_from_slice(&row[g * gs..(g + 1) * gs]);
            }
            // Several groups: every group's dropout is keyed by its global position.
            self.engine.set_shard(Some((offset + g * gs, global)))?;
            let group = Batch {
                inputs: &tokens[..t * gs],
                targets: &tokens[gs..],
                steps: t,
                batch: gs,
                stream: Stream::Train(first + g as u32),
            };
            total.add(&self.forward_backward(&group, step, scale)?);
            self.push_partial()?;
        }
        self.finish_partials()?;
        Ok(total)
    }

    /// Fold the gradient just computed into the pairwise sum: equal tree levels are
    /// combined as soon as both exist ((a + b) + (c + d) ...).
    fn push_partial(&mut self) -> Result<()> {
        let total = self.engine.layout().total;
        let mut buf = self.spare.pop().unwrap_or_else(|| vec![0.0; total]);
        self.engine.swap_grads(&mut buf)?;
        let mut level = 0u32;
        while let Some(top) = self.partial.last()
            && top.0 == level
        {
            let Some((_, mut a)) = self.partial.pop() else {
                break;
            };
            for (x, y) in a.iter_mut().zip(&buf) {
                *x += y;
            }
            self.spare.push(std::mem::replace(&mut buf, a));
            level += 1;
        }
        self.partial.push((level, buf));
        Ok(())
    }

    /// Sum the remaining partial sums (newest first) into the engine's gradient buffer.
    fn finish_partials(&mut self) -> Result<()> {
        let Some((_, mut sum)) = self.partial.pop() else {
            return Err(Error::Backend("a grouped step without groups".into()));
        };
        while let Some((_, mut a)) = self.partial.pop() {
            for (x, y) in a.iter_mut().zip(&sum) {
                *x += y;
            }
            self.spare.push(std::mem::replace(&mut sum, a));
        }
        self.engine.swap_grads(&mut sum)?;
        self.spare.push(sum);
        Ok(())
    }
}

/// The instruction set the CPU kernels run with on this machine.
fn isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "avx512";
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return "avx2";
        }
    }
    "baseline"
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        format!("cpu ({} threads, {}, f32)", self.engine.threads(), isa())
    }
    fn layout(&self) -> &ParamLayout {
        self.engine.layout()
    }
    fn params(&self) -> Result<Vec<f32>> {
        Ok(self.engine.params_torch())
    }
    fn set_params(&mut self, torch: &[f32]) -> Result<()> {
        self.engine.set_params_torch(torch)
    }
    fn grads(&self) -> Result<Vec<f32>> {
        Ok(self.engine.grads_torch())
    }
    fn allocation(&self) -> Result<Vec<u32>> {
        Ok(self.engine.allocation().to_vec())
    }
    fn set_allocation(&mut self, cells: &[u32]) -> Result<()> {
        self.engine.set_allocation(cells)
    }
    fn state(&self, stream: Stream) -> Result<Option<State<f32>>> {
        Ok(self.engine.state(stream).cloned())
    }
    fn set_state(&mut self, stream: Stream, state: State<f32>) -> Result<()> {
        self.engine.set_state(stream, state)
    }
    fn reset_state(&mut self, stream: Stream) {
        self.engine.reset_state(stream)
    }
    fn set_shard(&mut self, shard: Shard) -> Result<()> {
        if shard.groups == 0 {
            return Err(Error::Config(
                "a rank needs at least one gradient group".into(),
            ));
        }
        if shard.global > 0 && shard.offset >= shard.global {
            return Err(Error::Config(format!(
                "stream offset {} outside a batch of {}",
                shard.offset, shard.global
            )));
        }
        self.shard = shard;
        Ok(())
    }
    fn input_forward(&mut self, batch: &Batch<'_>, pass: Pass) -> Result<()> {
        self.engine.input_forward(batch, pass)
    }
    fn lstm_forward(&mut self, layer: usize) -> Result<()> {
        self.engine.lstm_forward(layer)
    }
    fn heads(&mut self, grad_scale: Option<f32>) -> Result<LossSums> {
        self.engine.heads(grad_scale)
    }
    fn lstm_backward(&mut self, layer: usize) -> Result<()> {
        self.engine.lstm_backward(layer)
    }

    fn train_step(&mut self, batch: &Batch<'_>, step: u64, scale: f32) -> Result<LossSums> {
        let Shard {
            offset,
            global,
            groups,
        } = self.shard;
        let bl = batch.batch;
        let global = if global == 0 { bl } else { global };
        // Dropout keyed by the global stream index wherever the streams are not the
        // whole batch in one piece.
        let keyed = |off: usize| (bl != global || groups > 1).then_some((off, global));
        if groups == 1 {
            self.engine.set_shard(keyed(offset))?;
            return self.forward_backward(batch, step, scale);
        }
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
        // Partial sums left by a step that failed half-way are not this step's.
        while let Some((_, b)) = self.partial.pop() {
            self.spare.push(b);
        }
        let mut tokens = std::mem::take(&mut self.group_tokens);
        let r = self.grouped_step(batch, &mut tokens, first, (offset, global), step, scale);
        self.group_tokens = tokens;
        r
    }

    fn all_reduce_grads(&mut self, coll: &mut dyn GradReduce) -> Result<()> {
        coll.all_reduce_grads(GradsMut::Host(self.engine.grads_mut()))
    }

    fn clip_and_step(&mut self, rule: &Optimizer, lr: f64, max_norm: f64) -> Result<f64> {
        let norm = self.engine.grad_norm();
        if norm.is_finite() {
            self.engine
                .optimizer_step(rule, lr, clip_coefficient(norm, max_norm))?;
        }
        Ok(norm)
    }

    fn optimizer_state(&self) -> Result<Option<OptimizerState>> {
        Ok(self
            .engine
            .optimizer_state()
            .map(|(rule, updates, bufs)| OptimizerState {
                rule,
                updates,
                buffers: bufs.into_iter().map(|(n, v)| (n.to_string(), v)).collect(),
            }))
    }
    fn set_optimizer_state(&mut self, state: OptimizerState) -> Result<()> {
        let names = state.rule.state_names();
        let mut bufs = Vec::with_capacity(names.len());
        for name in names {
            let b = state
                .buffers
                .iter()
                .find(|(n, _)| n == name)
                .ok_or_else(|| Error::Shape(format!("optimizer state lacks buffer {name:?}")))?;
            bufs.push(b.1.clone());
        }
        self.engine
            .set_optimizer_state(state.rule, state.updates, bufs)
    }

    fn begin_loss_tables(&mut self, max_bytes: u64) -> Result<()> {
        self.tables = Some(LossTables::new(self.engine.dims(), max_bytes)?);
        Ok(())
    }
    fn accumulate_loss_tables(&mut self, batch: &Batch<'_>) -> Result<LossSums> {
        let mut tables = self.tables.take().ok_or_else(|| {
            Error::Backend("accumulate_loss_tables before begin_loss_tables".into())
        })?;
        let r = self
            .forward(batch, Pass::Eval)
            .and_then(|()| self.engine.accumulate_loss_tables(&mut tables));
        self.tables = Some(tables);
        r
    }
    fn take_loss_tables(&mut self) -> Result<LossTables> {
        self.tables
            .take()
            .ok_or_else(|| Error::Backend("take_loss_tables without a loss-table pass".into()))
    }
}

/// Best f32 GEMM rate (GFLOP/s) of this machine on `threads` threads: square products of
/// side `n`, each thread computing its own column block, as the backend splits its work.
pub fn gemm_peak_gflops(threads: usize, n: usize, reps: usize) -> crate::Result<f64> {
    let team = team::Team::new(threads)?;
    let a: Vec<f32> = (0..n * n)
        .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
        .collect();
    let b = a.clone();
    let mut c = vec![0f32; n * n];
    let nt = team.threads();
    let cs = team::Shared::new(&mut c);
    let mut best = 0f64;
    for rep in 0..reps + 1 {
        let t0 = std::time::Instant::now();
        team.run(|tid, _| {
            let cols = layout::part_range(n, nt, tid);
            // SAFETY: each thread writes its own column block of c.
            unsafe {
                gemm::gemm(
                    n,
                    cols.len(),
                    n,
                    cs.ptr().add(cols.start),
                    n,
                    false,
                    gemm::Mat::rows(&a, n),
                    gemm::Mat::rows(&b, n).at(0, cols.start),
                )
            };
        });
        let s = t0.elapsed().as_secs_f64();
        if rep > 0 {
            best = best.max(2.0 * (n * n * n) as f64 / s / 1e9);
        }
    }
    Ok(best)
}
