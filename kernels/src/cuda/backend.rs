//! [`CudaBackend`]: the LightRNN model on one CUDA device, behind the [`Backend`] boundary.
//! Parameters, gradients and optimizer buffers are device buffers in PyTorch's layout (no
//! internal permutation: checkpoints and the all-reduce see the same bytes as the CPU's),
//! the carried states and the loss tables live on the device; the host keeps the word ->
//! cell table (it maps each batch's words to table ids before the one upload).

use std::collections::BTreeMap;

use super::allreduce::{Lent, Scratch, reduce_scatter_units};
use super::buffers::{Buf, THREADS, add_assign, grid_for, u32_arg};
use super::layer::{Arg, Device};
use super::workspace::{HeadMode, Workspace, check_fits, model_bytes};
use crate::backend::{
    Backend, Batch, GradReduce, GradsMut, LossSums, ModelConfig, OptimizerState, Pass, Peers,
    ScatteredTables, Shard, State, Stream,
};
use crate::groups::{PairwiseSum, Plan};
use crate::layout::{ParamLayout, check_allocation, random_allocation};
use crate::optim::{Optimizer, clip_coefficient};
use crate::tables::LossTables;
use crate::{Error, Result};

/// A stream set's carried state on the device: h, c [layers, batch, hidden].
pub struct DevState {
    pub batch: usize,
    pub h: Buf<f32>,
    pub c: Buf<f32>,
}

/// Optimizer buffers on the device.
struct DevOpt {
    rule: Optimizer,
    bufs: Vec<Buf<f32>>,
    updates: u64,
}

/// Loss tables of a reallocation round on the device.
struct DevTables {
    /// The word ids the tables hold: entry `w - words.start` is word w.
    words: std::ops::Range<usize>,
    lr: Buf<f32>,
    lc: Buf<f32>,
    counts: Vec<u64>,
}

/// Host-side scratch of the batch preparation (kept between batches).
#[derive(Default)]
pub(super) struct HostScratch {
    pub ids: Vec<u32>,
    pub tgt_r: Vec<u32>,
    pub tgt_c: Vec<u32>,
    pub words: Vec<u32>,
    pub count: Vec<u32>,
    pub fill: Vec<u32>,
    pub members: Vec<u32>,
    pub uniq: Vec<u32>,
    pub starts: Vec<u32>,
}

/// The LightRNN model on one CUDA device (or on the emulated device, in tests).
pub struct CudaBackend {
    pub(super) dev: Box<dyn Device>,
    pub(super) layout: ParamLayout,
    pub(super) dropout: f64,
    pub(super) seed: u64,
    pub(super) params: Buf<f32>,
    pub(super) grads: Buf<f32>,
    opt: Option<DevOpt>,
    pub(super) cells: Vec<u32>,
    pub(super) states: BTreeMap<Stream, DevState>,
    shard: Shard,
    /// Dropout keying: this batch's streams are `offset..` of a `global`-stream batch.
    pub(super) keyed: Option<(usize, usize)>,
    pub(super) ws: Option<Workspace>,
    pub(super) host: HostScratch,
    pub(super) stream: Stream,
    pub(super) pass: Option<Pass>,
    pub(super) have_head_grads: bool,
    /// The gradient groups' pairwise sum (as the CPU backend's).
    sums: PairwiseSum<Buf<f32>>,
    tables: Option<DevTables>,
    /// [2] loss sums / [1] squared norm read back by the host; norm partial sums.
    pub(super) scalars: Buf<f64>,
    partials: Buf<f64>,
    /// The fixed-order device all-reduce's buffers.
    reduce: Scratch,
}

/// x += y over the first `n` elements (the gradient groups' pairwise sum).
fn add_device(dev: &dyn Device, n: usize, x: &mut Buf<f32>, y: &Buf<f32>) -> Result<()> {
    add_assign(dev, x.arg(0), y.arg(0), n)
}

/// Blocks of the gradient norm's first pass.
const NORM_BLOCKS: usize = 512;

impl CudaBackend {
    /// Open CUDA device `ordinal` for `cfg` with TF32 GEMMs (the GPU default), or say why
    /// that cannot be done (built without CUDA, no driver, no such device, no NVRTC).
    pub fn new(cfg: &ModelConfig, ordinal: usize) -> Result<Self> {
        Self::with_precision(cfg, ordinal, super::Precision::Tf32)
    }

    /// As [`Self::new`] with the GEMMs in `precision`.
    pub fn with_precision(
        cfg: &ModelConfig,
        ordinal: usize,
        precision: super::Precision,
    ) -> Result<Self> {
        #[cfg(feature = "cuda")]
        {
            if super::emulator_requested() {
                return Self::emulated(cfg, super::EMULATOR_BYTES);
            }
            Self::on(Box::new(super::gpu::Gpu::open(ordinal, precision)?), cfg)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (cfg, precision);
            Err(Self::unavailable(ordinal))
        }
    }

    /// The model on the emulated device (host memory, the `.cu` kernels built for the
    /// host): a test facility, to check the backend's orchestration and kernels on
    /// machines without a GPU. `capacity` bytes of emulated device memory.
    #[cfg(feature = "cuda")]
    pub fn emulated(cfg: &ModelConfig, capacity: usize) -> Result<Self> {
        Self::on(Box::new(super::emulated::Emulated::new(capacity)), cfg)
    }

    /// Why device `ordinal` cannot run a model here: built without CUDA, no driver, or no
    /// such device; `None` when it can be opened.
    pub fn check(ordinal: usize) -> Result<()> {
        if super::emulator_requested() {
            return Ok(());
        }
        let devices = super::device::cuda_devices()?;
        if devices.get(ordinal).is_none() {
            return Err(Error::Backend(format!(
                "no CUDA device {ordinal}: this machine has {} (lightrnn devices lists them)",
                devices.len()
            )));
        }
        #[cfg(feature = "cuda")]
        if !super::nvrtc::available() {
            return Err(Error::Backend(
                "CUDA device present, but no NVRTC library (libnvrtc.so, CUDA 13.0) on the library path".into(),
            ));
        }
        Ok(())
    }

    /// The reason [`Self::check`] gives, as an error (for callers that need one).
    pub fn unavailable(ordinal: usize) -> Error {
        match Self::check(ordinal) {
            Err(e) => e,
            Ok(()) => Error::Backend(format!("CUDA device {ordinal} could not be opened")),
        }
    }

    /// The model on `dev` (any [`Device`]: the GPU's, or the emulated one).
    ///
    /// The reference initialisation and random allocation of `cfg.seed`
    /// (the CPU backend's, so both start from the same bits).
    pub fn on(dev: Box<dyn Device>, cfg: &ModelConfig) -> Result<Self> {
        cfg.dims.validate()?;
        if !(0.0..1.0).contains(&cfg.dropout) {
            return Err(Error::Config(format!(
                "dropout {} is not in [0, 1)",
                cfg.dropout
            )));
        }
        let layout = ParamLayout::new(cfg.dims);
        check_fits(
            dev.as_ref(),
            model_bytes(layout.total),
            "the model (parameters, gradients, optimizer)",
        )?;
        let init =
            crate::cpu::Engine::<f32>::new(cfg.dims, cfg.dropout, cfg.seed, 1)?.params_torch();
        let params = Buf::from_host(dev.as_ref(), &init)?;
        let grads = Buf::zeros(dev.as_ref(), layout.total)?;
        let scalars = Buf::zeros(dev.as_ref(), 2)?;
        let partials = Buf::zeros(dev.as_ref(), NORM_BLOCKS)?;
        Ok(Self {
            dev,
            cells: random_allocation(&cfg.dims, cfg.seed),
            layout,
            dropout: cfg.dropout,
            seed: cfg.seed,
            params,
            grads,
            opt: None,
            states: BTreeMap::new(),
            shard: Shard::WHOLE,
            keyed: None,
            ws: None,
            host: HostScratch::default(),
            stream: Stream::default(),
            pass: None,
            have_head_grads: false,
            sums: PairwiseSum::default(),
            tables: None,
            scalars,
            partials,
            reduce: Scratch::default(),
        })
    }

    fn forward_backward(&mut self, batch: &Batch<'_>, step: u64, scale: f32) -> Result<LossSums> {
        self.forward(batch, Pass::Train { step })?;
        let loss = self.run_heads(HeadMode::Grad(scale))?;
        for l in (0..self.layout.dims.layers).rev() {
            self.layer_backward(l)?;
        }
        Ok(loss)
    }

    fn grouped_step(
        &mut self,
        batch: &Batch<'_>,
        plan: Plan,
        groups: usize,
        (step, scale): (u64, f32),
    ) -> Result<LossSums> {
        let mut total = LossSums::default();
        let mut tokens = Vec::new();
        let n = self.layout.total;
        for g in 0..groups {
            let (group, keyed) = plan.group(batch, g, &mut tokens);
            self.keyed = keyed;
            total.add(&self.forward_backward(&group, step, scale)?);
            // The gradient just computed goes into the pairwise sum.
            let mut buf = match self.sums.spare() {
                Some(b) => b,
                None => Buf::zeros(self.dev.as_ref(), n)?,
            };
            std::mem::swap(&mut self.grads, &mut buf);
            let dev = self.dev.as_ref();
            self.sums.push(buf, |a, b| add_device(dev, n, a, b))?;
        }
        let dev = self.dev.as_ref();
        let mut sum = self.sums.finish(|a, b| add_device(dev, n, a, b))?;
        std::mem::swap(&mut self.grads, &mut sum);
        self.sums.recycle(sum);
        Ok(total)
    }

    /// Sum of squares of the gradient buffer (two fixed-order passes, one read-back).
    fn grad_sum_sq(&self) -> Result<f64> {
        let n = self.layout.total;
        let blocks = n.div_ceil(THREADS as usize).clamp(1, NORM_BLOCKS);
        let launch = |kernel, grid: u32, args: &[Arg]| {
            self.dev.launch(&super::layer::Launch {
                kernel,
                grid: [grid, 1, 1],
                block: [THREADS, 1, 1],
                args,
            })
        };
        launch(
            "sum_sq_partial",
            blocks as u32,
            &[self.partials.arg(0), self.grads.arg(0), Arg::U64(n as u64)],
        )?;
        launch(
            "sum_f64",
            1,
            &[
                self.scalars.arg(0),
                self.partials.arg(0),
                u32_arg(blocks, "blocks")?,
            ],
        )?;
        Ok(self.scalars.download(self.dev.as_ref(), 0, 1)?[0])
    }

    fn optimizer_step(&mut self, rule: &Optimizer, lr: f64, gscale: f64) -> Result<()> {
        let total = self.layout.total;
        if self.opt.as_ref().is_none_or(|o| o.rule != *rule) {
            let bufs = (0..rule.state_names().len())
                .map(|k| Buf::from_host(self.dev.as_ref(), &vec![rule.state_init(k) as f32; total]))
                .collect::<Result<Vec<_>>>()?;
            self.opt = Some(DevOpt {
                rule: *rule,
                bufs,
                updates: 0,
            });
        }
        let Some(st) = self.opt.as_mut() else {
            return Err(Error::Backend("optimizer state".into()));
        };
        st.updates += 1;
        let t = st.updates;
        let (p, g, n) = (
            self.params.arg(0),
            self.grads.arg(0),
            Arg::U64(total as u64),
        );
        let (kernel, args): (&'static str, Vec<Arg>) = match *rule {
            Optimizer::Sgd => ("sgd_step", vec![p, g, n, Arg::F32((-lr * gscale) as f32)]),
            Optimizer::Adam { beta1, beta2, eps } => {
                let (bc1, bc2) = (1.0 - beta1.powi(t as i32), 1.0 - beta2.powi(t as i32));
                let f = |x: f64| Arg::F32(x as f32);
                (
                    "adam_step",
                    vec![
                        p,
                        g,
                        st.bufs[0].arg(0),
                        st.bufs[1].arg(0),
                        n,
                        f(gscale),
                        f(beta1),
                        f(beta2),
                        f(1.0 - beta1),
                        f(1.0 - beta2),
                        f(lr / bc1),
                        f(1.0 / bc2.sqrt()),
                        f(eps),
                    ],
                )
            }
            Optimizer::Adagrad { eps, .. } => (
                "adagrad_step",
                vec![
                    p,
                    g,
                    st.bufs[0].arg(0),
                    n,
                    Arg::F32(gscale as f32),
                    Arg::F32(lr as f32),
                    Arg::F32(eps as f32),
                ],
            ),
        };
        self.dev.launch(&super::layer::Launch {
            kernel,
            grid: grid_for(total),
            block: [THREADS, 1, 1],
            args: &args,
        })
    }

    /// The device memory the model and a batch of `batch` x `steps` will take (bytes).
    pub fn memory_needed(&self, steps: usize, batch: usize) -> u64 {
        model_bytes(self.layout.total) + super::activation_bytes(&self.layout.dims, steps, batch)
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> String {
        format!(
            "cuda: {} (model {:.1} MiB)",
            self.dev.name(),
            model_bytes(self.layout.total) as f64 / 1048576.0
        )
    }
    fn layout(&self) -> &ParamLayout {
        &self.layout
    }
    fn params(&self) -> Result<Vec<f32>> {
        self.params
            .download(self.dev.as_ref(), 0, self.layout.total)
    }
    fn set_params(&mut self, torch: &[f32]) -> Result<()> {
        if torch.len() != self.layout.total {
            return Err(Error::Shape(format!(
                "parameter buffer has {} values, the model {}",
                torch.len(),
                self.layout.total
            )));
        }
        self.params.upload(self.dev.as_ref(), 0, torch)
    }
    fn grads(&self) -> Result<Vec<f32>> {
        self.grads.download(self.dev.as_ref(), 0, self.layout.total)
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
        let Some(st) = self.states.get(&stream) else {
            return Ok(None);
        };
        let n = st.h.len();
        Ok(Some(State {
            batch: st.batch,
            h: st.h.download(self.dev.as_ref(), 0, n)?,
            c: st.c.download(self.dev.as_ref(), 0, n)?,
        }))
    }
    fn set_state(&mut self, stream: Stream, state: State<f32>) -> Result<()> {
        let d = &self.layout.dims;
        let n = d.layers * state.batch * d.hidden;
        if state.h.len() != n || state.c.len() != n {
            return Err(Error::Shape(format!(
                "state for {} streams needs {} values in h and c, got {} and {}",
                state.batch,
                n,
                state.h.len(),
                state.c.len()
            )));
        }
        let dev = self.dev.as_ref();
        let st = DevState {
            batch: state.batch,
            h: Buf::from_host(dev, &state.h)?,
            c: Buf::from_host(dev, &state.c)?,
        };
        self.states.insert(stream, st);
        Ok(())
    }
    fn reset_state(&mut self, stream: Stream) {
        self.states.remove(&stream);
    }
    fn set_shard(&mut self, shard: Shard) -> Result<()> {
        shard.check()?;
        self.shard = shard;
        Ok(())
    }
    fn input_forward(&mut self, batch: &Batch<'_>, pass: Pass) -> Result<()> {
        self.prepare(batch, pass)
    }
    fn lstm_forward(&mut self, layer: usize) -> Result<()> {
        self.layer_forward(layer)
    }
    fn heads(&mut self, grad_scale: Option<f32>) -> Result<LossSums> {
        self.run_heads(grad_scale.map_or(HeadMode::Loss, HeadMode::Grad))
    }
    fn lstm_backward(&mut self, layer: usize) -> Result<()> {
        self.layer_backward(layer)
    }

    fn train_step(&mut self, batch: &Batch<'_>, step: u64, scale: f32) -> Result<LossSums> {
        let plan = Plan::new(self.shard, batch)?;
        let groups = match plan {
            Plan::Whole { keyed } => {
                self.keyed = keyed;
                return self.forward_backward(batch, step, scale);
            }
            Plan::Groups { groups, .. } => groups,
        };
        // Partial sums left by a step that failed half-way are not this step's.
        self.sums.reset();
        self.grouped_step(batch, plan, groups, (step, scale))
    }

    fn all_reduce_grads(&mut self, coll: &mut dyn GradReduce) -> Result<()> {
        // Lent where it lies: NCCL sums it on the device, a host collective stages it.
        let n = self.layout.total;
        let mut lent = Lent {
            dev: self.dev.as_ref(),
            grads: &mut self.grads,
            n,
            scratch: &mut self.reduce,
        };
        coll.all_reduce_grads(GradsMut::Device(&mut lent))
    }

    fn clip_and_step(&mut self, rule: &Optimizer, lr: f64, max_norm: f64) -> Result<f64> {
        let norm = self.grad_sum_sq()?.sqrt();
        if norm.is_finite() {
            self.optimizer_step(rule, lr, clip_coefficient(norm, max_norm))?;
        }
        Ok(norm)
    }

    fn optimizer_state(&self) -> Result<Option<OptimizerState>> {
        let Some(o) = &self.opt else { return Ok(None) };
        let n = self.layout.total;
        let buffers = o
            .rule
            .state_names()
            .iter()
            .zip(&o.bufs)
            .map(|(name, b)| Ok((name.to_string(), b.download(self.dev.as_ref(), 0, n)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(OptimizerState {
            rule: o.rule,
            updates: o.updates,
            buffers,
        }))
    }
    fn set_optimizer_state(&mut self, state: OptimizerState) -> Result<()> {
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
            bufs.push(Buf::from_host(self.dev.as_ref(), &b.1)?);
        }
        self.opt = Some(DevOpt {
            rule: state.rule,
            bufs,
            updates: state.updates,
        });
        Ok(())
    }

    fn begin_loss_tables(&mut self, words: std::ops::Range<usize>, max_bytes: u64) -> Result<()> {
        let d = self.layout.dims;
        self.tables = None;
        // The host copy `take_loss_tables` returns has the same size: refuse as the CPU.
        let bytes = LossTables::check_range(&d, &words, max_bytes)?;
        let n = words.len();
        check_fits(self.dev.as_ref(), bytes, "the loss tables")?;
        self.tables = Some(DevTables {
            words,
            lr: Buf::zeros(self.dev.as_ref(), n * d.rows)?,
            lc: Buf::zeros(self.dev.as_ref(), n * d.cols)?,
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
        let loss = self.run_heads(HeadMode::Table)?;
        // The positions whose target is in the tables' range, grouped by target word
        // (ascending), uploaded as (table entry, start) lists.
        let words = &self.host.words;
        let range = self.tables.as_ref().map_or(0..0, |t| t.words.clone());
        let mut order: Vec<u32> = (0..words.len() as u32)
            .filter(|&p| range.contains(&(words[p as usize] as usize)))
            .collect();
        order.sort_unstable_by_key(|&p| (words[p as usize], p));
        let (mut uw, mut starts) = (Vec::new(), Vec::new());
        for (i, &p) in order.iter().enumerate() {
            let w = words[p as usize] - range.start as u32;
            if uw.last() != Some(&w) {
                uw.push(w);
                starts.push(i as u32);
            }
        }
        starts.push(order.len() as u32);
        if uw.is_empty() {
            return Ok(loss);
        }
        let dev = self.dev.as_ref();
        let (bw, bs, bp) = (
            Buf::from_host(dev, &uw)?,
            Buf::from_host(dev, &starts)?,
            Buf::from_host(dev, &order)?,
        );
        let (ws, tables) = match (&self.ws, &mut self.tables) {
            (Some(w), Some(t)) => (w, t),
            _ => return Err(Error::Backend("no batch or tables".into())),
        };
        let d = self.layout.dims;
        for (table, z, width) in [(&tables.lr, &ws.zr, d.rows), (&tables.lc, &ws.zc, d.cols)] {
            dev.launch(&super::layer::Launch {
                kernel: "table_accumulate",
                grid: [
                    u32_arg(uw.len(), "words")?.slot() as u32,
                    width.div_ceil(THREADS as usize) as u32,
                    1,
                ],
                block: [THREADS, 1, 1],
                args: &[
                    table.arg(0),
                    z.arg(0),
                    bw.arg(0),
                    bs.arg(0),
                    bp.arg(0),
                    u32_arg(width, "table side")?,
                ],
            })?;
        }
        for (k, &w) in uw.iter().enumerate() {
            tables.counts[w as usize] += (starts[k + 1] - starts[k]) as u64;
        }
        Ok(loss)
    }

    fn take_loss_tables_scattered(
        &mut self,
        peers: &mut dyn Peers,
    ) -> Result<Option<ScatteredTables>> {
        let DevTables {
            words,
            lr,
            lc,
            counts,
        } = self.tables.take().ok_or_else(|| {
            Error::Backend("take_loss_tables_scattered without a loss-table pass".into())
        })?;
        let d = self.layout.dims;
        let dev = self.dev.as_ref();
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
        let t = self
            .tables
            .take()
            .ok_or_else(|| Error::Backend("take_loss_tables without a loss-table pass".into()))?;
        let d = self.layout.dims;
        let dev = self.dev.as_ref();
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
}
