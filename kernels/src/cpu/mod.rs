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

pub use engine::{Engine, NamedBuffers};

use crate::backend::{
    Backend, Batch, GradReduce, GradsMut, LossSums, ModelConfig, OptimizerState, Pass, Shard,
    State, StepFigures, Stream,
};
use crate::groups::{PairwiseSum, Plan};
use crate::layout::ParamLayout;
use crate::optim::{Optimizer, clip_coefficient};
use crate::profile::{Phase, Profiler};
use crate::tables::LossTables;
use crate::{Error, Result};

/// The CPU backend: [`Engine<f32>`] plus the buffers of the grouped gradient sum and of
/// the loss tables.
pub struct CpuBackend {
    engine: Engine<f32>,
    shard: Shard,
    /// The tokens of one gradient group, [T + 1, B / groups] (reused every step).
    group_tokens: Vec<u32>,
    /// The pairwise sum of the groups' gradients.
    sums: PairwiseSum<Vec<f32>>,
    /// The loss tables of the reallocation round in progress.
    tables: Option<LossTables>,
    /// The summed losses of the last training step.
    last_loss: LossSums,
    profiler: Profiler,
}

impl CpuBackend {
    /// A model on `threads` CPU threads (0 = one per core).
    pub fn new(cfg: &ModelConfig, threads: usize) -> Result<Self> {
        Ok(Self {
            engine: Engine::new(cfg.dims, cfg.dropout, cfg.seed, threads)?,
            shard: Shard::WHOLE,
            group_tokens: Vec::new(),
            sums: PairwiseSum::default(),
            tables: None,
            last_loss: LossSums::default(),
            profiler: Profiler::off(),
        })
    }

    /// [`Backend::forward_backward`] with each layer, the heads and the input timed.
    fn timed_forward_backward(
        &mut self,
        batch: &Batch<'_>,
        step: u64,
        scale: f32,
    ) -> Result<LossSums> {
        let p = &self.profiler;
        {
            let _s = p.span(Phase::Input);
            self.engine.input_forward(batch, Pass::Train { step })?;
        }
        let layers = self.engine.dims().layers;
        for l in 0..layers {
            let _s = p.span(Phase::LayerForward(l));
            self.engine.lstm_forward(l)?;
        }
        let loss = {
            let _s = p.span(Phase::Heads);
            self.engine.heads(Some(scale))?
        };
        for l in (0..layers).rev() {
            let _s = p.span(Phase::LayerBackward(l));
            self.engine.lstm_backward(l)?;
        }
        Ok(loss)
    }

    pub fn engine(&self) -> &Engine<f32> {
        &self.engine
    }
}

/// a += b over a gradient buffer.
fn add_host(a: &mut [f32], b: &[f32]) -> Result<()> {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
    Ok(())
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
        shard.check()?;
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

    fn train_step(&mut self, batch: &Batch<'_>, step: u64, scale: f32) -> Result<()> {
        let plan = Plan::new(self.shard, batch)?;
        let grouped = plan.groups() > 1;
        if grouped {
            // Partial sums left by a step that failed half-way are not this step's.
            self.sums.reset();
        }
        let mut tokens = std::mem::take(&mut self.group_tokens);
        let mut total = LossSums::default();
        let r = plan.for_each_group(batch, &mut tokens, |_, group, keyed| {
            self.engine.set_shard(keyed)?;
            let loss = self.timed_forward_backward(group, step, scale)?;
            if !grouped {
                // The batch in one piece: its gradient stays in the engine's buffer.
                total = loss;
                return Ok(());
            }
            total.add(&loss);
            // The gradient just computed goes into the pairwise sum.
            let _s = self.profiler.span(Phase::GradSum);
            let mut buf = self
                .sums
                .spare()
                .unwrap_or_else(|| vec![0.0; self.engine.layout().total]);
            self.engine.swap_grads(&mut buf)?;
            self.sums.push(buf, |a, b| add_host(a, b))
        });
        self.group_tokens = tokens;
        r?;
        if grouped {
            // The groups' sum, left in the engine's gradient buffer.
            let _s = self.profiler.span(Phase::GradSum);
            let mut sum = self.sums.finish(|a, b| add_host(a, b))?;
            self.engine.swap_grads(&mut sum)?;
            self.sums.recycle(sum);
        }
        self.last_loss = total;
        Ok(())
    }

    fn step_loss(&mut self) -> Result<LossSums> {
        Ok(self.last_loss)
    }

    fn all_reduce_grads(&mut self, coll: &mut dyn GradReduce) -> Result<()> {
        coll.all_reduce_grads(GradsMut::Host(self.engine.grads_mut()))
    }

    fn clip_and_step(&mut self, rule: &Optimizer, lr: f64, max_norm: f64) -> Result<StepFigures> {
        let norm = {
            let _s = self.profiler.span(Phase::Clip);
            self.engine.grad_norm()
        };
        if norm.is_finite() {
            let _s = self.profiler.span(Phase::Optimizer);
            self.engine
                .optimizer_step(rule, lr, clip_coefficient(norm, max_norm))?;
        }
        Ok(StepFigures {
            loss: self.last_loss,
            norm,
        })
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

    fn begin_loss_tables(&mut self, words: std::ops::Range<usize>, max_bytes: u64) -> Result<()> {
        self.tables = None;
        self.tables = Some(LossTables::range(self.engine.dims(), words, max_bytes)?);
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
    fn set_profiler(&mut self, profiler: Profiler) {
        self.engine.set_profiler(profiler.clone());
        self.profiler = profiler;
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
                    gemm::Dst::rows(cs.ptr().add(cols.start), n),
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
