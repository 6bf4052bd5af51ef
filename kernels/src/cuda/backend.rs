//! [`CudaBackend`]: the LightRNN model on one CUDA device, behind the [`Backend`] boundary.
//! Parameters, gradients and optimizer buffers are device buffers in PyTorch's tensors,
//! each at a 16-byte boundary ([`DevLayout`]: checkpoints and host copies see PyTorch's
//! layout); the carried states and the loss tables live on the device; the host keeps
//! the word -> cell table (it maps each batch's words to table ids, written to
//! page-locked staging that one asynchronous copy per group uploads).
//!
//! # A training step on the device
//!
//! `train_step` prepares the batch on the host and leaves its device work pending;
//! `clip_and_step` issues it with the update (norm, clipping, optimizer) and waits once,
//! for the loss sums and the norm together: one host synchronisation per step, no device
//! allocation after a shape's first step. With graphs on (the default; `cuda_graphs =
//! false` turns them off), that work is captured once per shape as a CUDA graph and each
//! later step is one graph launch; a capture that fails falls back to plain launches.
//! Between the two, `all_reduce_grads` issues the pending forward and backward first (a
//! graph of its own), so a job of several ranks runs two graphs around its collective.
//! Every other call issues pending work before its own, so each sees the step done.

use std::cell::RefCell;
use std::collections::BTreeMap;

use super::allreduce::{Lent, Scratch, reduce_scatter_units};
use super::buffers::{Buf, THREADS, u32_arg};
use super::devlayout::DevLayout;
use super::graphs::Graphs;
use super::layer::{Counters, Device};
use super::work::{Adds, Cx, NORM_BLOCKS, TrainWork, UpdateWork, Work};
use super::workspace::{BATCH_HEAD, HeadMode, Workspace, check_fits, knob, model_bytes};
use crate::backend::{
    Backend, Batch, GradReduce, GradsMut, LossSums, ModelConfig, OptimizerState, Pass, Peers,
    ScatteredTables, Shard, State, StepFigures, Stream,
};
use crate::cpu::row_of;
use crate::groups::{PairwiseSum, Plan};
use crate::layout::{ParamLayout, check_allocation, random_allocation};
use crate::optim::Optimizer;
use crate::tables::LossTables;
use crate::{Error, Result};

/// A stream set's carried state on the device: h, c [layers, batch, hidden]. Kept when
/// the stream is reset (a graph holds its address): `live` says whether it carries a
/// state, `dirty` that its buffers still need zeroing before the next batch reads them.
pub struct DevState {
    pub batch: usize,
    pub h: Buf<f32>,
    pub c: Buf<f32>,
    pub live: bool,
    pub dirty: bool,
}

/// Optimizer buffers on the device (device layout); `updates` counts applied updates.
pub(super) struct DevOpt {
    rule: Optimizer,
    pub(super) bufs: Vec<Buf<f32>>,
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

/// The pairwise sum of a step's group gradients over the sum's buffers: the buffer group
/// k writes (the depth of the sum's stack when it arrives: buffer 0 is the backend's
/// gradient, where the sum ends), the additions after each group, those that finish it.
struct SumPlan {
    slots: Vec<usize>,
    after: Vec<Adds>,
    finish: Adds,
}

/// Host-side scratch of the batch preparation (kept between batches).
#[derive(Default)]
struct HostScratch {
    words: Vec<u32>,
    count: Vec<u32>,
    fill: Vec<u32>,
    tokens: Vec<u32>,
    order: Vec<u32>,
    tab_words: Vec<u32>,
    tab_starts: Vec<u32>,
}

/// The LightRNN model on one CUDA device (or on the emulated device, in tests).
pub struct CudaBackend {
    pub(super) dev: Box<dyn Device>,
    pub(super) layout: ParamLayout,
    pub(super) dl: DevLayout,
    pub(super) dropout: f64,
    pub(super) seed: u64,
    pub(super) params: Buf<f32>,
    /// The gradient (the pairwise sum's buffer 0), and the sum's other buffers.
    pub(super) grads: Buf<f32>,
    pub(super) group_grads: Vec<Buf<f32>>,
    pub(super) opt: Option<DevOpt>,
    cells: Vec<u32>,
    pub(super) states: BTreeMap<Stream, DevState>,
    shard: Shard,
    pub(super) ws: Option<Workspace>,
    host: HostScratch,
    /// The device scalars of a step ([`knob`]); the gradient norm's partial sums.
    pub(super) knobs: Buf<u64>,
    pub(super) partials: Buf<f64>,
    /// The fixed-order device all-reduce's buffers.
    reduce: Scratch,
    tables: Option<DevTables>,
    pub(super) graphs: Graphs,
    /// A training step's forward and backward, prepared and not issued yet.
    pub(super) pending: RefCell<Option<TrainWork>>,
    /// The groups of the last training step (whose loss sums the results hold).
    last_groups: usize,
    /// The pass the per-layer calls are in (`input_forward` .. `lstm_backward`).
    cur: Option<Cx>,
    have_head_grads: bool,
}

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
        let (count, _) = super::device::count_and_driver()?;
        if ordinal >= count {
            return Err(Error::Backend(format!(
                "no CUDA device {ordinal}: this machine has {count} (lightrnn devices lists them)"
            )));
        }
        #[cfg(feature = "cuda")]
        if !super::nvrtc::available() && super::nvrtc::kernel_dir().is_none() {
            return Err(Error::Backend(
                "CUDA device present, but neither the NVRTC library (libnvrtc.so, CUDA 13.0) on the library path nor compiled kernels (LIGHTRNN_KERNEL_DIR, or kernels/ beside the binary: lightrnn kernels --out DIR)".into(),
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
        let dl = DevLayout::new(&layout);
        check_fits(
            dev.as_ref(),
            model_bytes(dl.total),
            "the model (parameters, gradients, optimizer)",
        )?;
        let init =
            crate::cpu::Engine::<f32>::new(cfg.dims, cfg.dropout, cfg.seed, 1)?.params_torch();
        let params = Buf::from_host(dev.as_ref(), &dl.expand(&layout, &init))?;
        let grads = Buf::zeros(dev.as_ref(), dl.total)?;
        let knobs = Buf::zeros(dev.as_ref(), knob::SLOTS)?;
        let partials = Buf::zeros(dev.as_ref(), NORM_BLOCKS)?;
        let (m, n) = (cfg.dims.hidden, cfg.dims.emb);
        if !m.is_multiple_of(4) || !n.is_multiple_of(4) {
            tracing::warn!(
                emb = n,
                hidden = m,
                "emb or hidden is not a multiple of 4: the activations' GEMM operands are not 16-byte aligned, so cuBLAS uses slower kernels (prefer multiples of 8)"
            );
        }
        Ok(Self {
            dev,
            cells: random_allocation(&cfg.dims, cfg.seed),
            layout,
            dl,
            dropout: cfg.dropout,
            seed: cfg.seed,
            params,
            grads,
            group_grads: Vec::new(),
            opt: None,
            states: BTreeMap::new(),
            shard: Shard::WHOLE,
            ws: None,
            host: HostScratch::default(),
            knobs,
            partials,
            reduce: Scratch::default(),
            tables: None,
            graphs: Graphs::default(),
            pending: RefCell::new(None),
            last_groups: 1,
            cur: None,
            have_head_grads: false,
        })
    }

    /// Capture training steps as CUDA graphs (the default) or issue plain launches.
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs.set_enabled(on);
    }

    /// What the device has been asked to do so far (launches, copies, host waits,
    /// allocations, graphs): a step's budget is the difference across it.
    pub fn counters(&self) -> Counters {
        self.dev.counters()
    }

    /// The device memory the model and a batch of `batch` x `steps` will take (bytes).
    pub fn memory_needed(&self, steps: usize, batch: usize) -> u64 {
        model_bytes(self.dl.total) + super::activation_bytes(&self.layout.dims, steps, batch)
    }

    /// The workspace for `groups` groups of `batch` streams x `steps`, allocated when the
    /// shape changes (the old one freed first; every graph, which holds its addresses,
    /// is dropped).
    fn ensure_workspace(&mut self, steps: usize, batch: usize, groups: usize) -> Result<()> {
        if self
            .ws
            .as_ref()
            .is_some_and(|w| (w.steps, w.batch) == (steps, batch) && w.groups >= groups)
        {
            return Ok(());
        }
        self.release()?;
        self.ws = None;
        let d = self.layout.dims;
        self.ws = Some(Workspace::new(self.dev(), &d, steps, batch, groups)?);
        Ok(())
    }

    /// The carried state of `stream` for `batch` streams exists, zeroed where it was reset.
    fn ensure_state(&mut self, stream: Stream, batch: usize) -> Result<()> {
        let d = self.layout.dims;
        match self.states.get_mut(&stream) {
            Some(st) if st.batch == batch => {
                if st.dirty {
                    st.h.zero(self.dev.as_ref(), 0, st.h.len())?;
                    st.c.zero(self.dev.as_ref(), 0, st.c.len())?;
                    st.dirty = false;
                }
                return Ok(());
            }
            Some(st) if st.live => {
                return Err(Error::Shape(format!(
                    "stream {stream:?} carries state for {} streams, the batch has {batch} (reset it first)",
                    st.batch
                )));
            }
            _ => {}
        }
        // A state replaced may be held by a graph; a new stream is in no graph yet.
        if self.states.contains_key(&stream) {
            self.release()?;
            self.states.remove(&stream);
        }
        let n = d.layers * batch * d.hidden;
        let st = DevState {
            batch,
            h: Buf::zeros(self.dev.as_ref(), n)?,
            c: Buf::zeros(self.dev.as_ref(), n)?,
            live: false,
            dirty: false,
        };
        self.states.insert(stream, st);
        Ok(())
    }

    /// Before a buffer a graph may hold is freed or replaced: the graphs are forgotten and
    /// the device's work is done (a graph still running may read it).
    fn release(&mut self) -> Result<()> {
        self.graphs.clear();
        self.wait()
    }

    /// The host may write the batch staging: no copy from it is in flight.
    fn staging_free(&self) -> Result<()> {
        let busy = self
            .ws
            .as_ref()
            .is_some_and(|w| w.staging.batch_busy.get() || w.staging.update_busy.get());
        if busy {
            self.wait()?;
        }
        Ok(())
    }

    /// Wait for the device; the staging is free afterwards.
    fn wait(&self) -> Result<()> {
        self.dev.synchronize()?;
        if let Some(w) = &self.ws {
            w.staging.batch_busy.set(false);
            w.staging.update_busy.set(false);
        }
        Ok(())
    }

    /// Write the batch's device scalars (dropout site base, gradient scale) to the staging.
    fn stage_batch_knobs(&mut self, step: u64, scale: f32) -> Result<()> {
        let ws = self
            .ws
            .as_mut()
            .ok_or_else(|| Error::Backend("no batch".into()))?;
        let b = &mut ws.staging.batch;
        b.slice_mut::<u64>(0, 1)?[0] = step.wrapping_mul(64);
        b.slice_mut::<f32>(8, 1)?[0] = scale;
        b.slice_mut::<u32>(12, 1)?[0] = 0;
        Ok(())
    }

    /// Map `batch` to table ids, targets and the table gradient's scatter lists in input
    /// region `region` of the staging (the batch's word ids are kept for a loss-table pass).
    fn stage_inputs(&mut self, batch: &Batch<'_>, region: usize) -> Result<()> {
        let d = self.layout.dims;
        let (tt, bb) = (batch.steps, batch.batch);
        let (sb, tb, cols) = (2 * tt * bb, tt * bb, d.cols as u32);
        let ws = self
            .ws
            .as_mut()
            .ok_or_else(|| Error::Backend("no batch".into()))?;
        let io = ws.layout;
        let base = BATCH_HEAD + 4 * region * io.region;
        let all = ws.staging.batch.slice_mut::<u32>(base, io.region)?;
        let h = &mut self.host;
        h.words.clear();
        h.words.extend_from_slice(batch.targets);
        {
            let (ids, rest) = all.split_at_mut(io.tgt_r);
            let (tgt_r, rest) = rest.split_at_mut(tb);
            let tgt_c = &mut rest[..tb];
            for t in 0..tt {
                for b in 0..bb {
                    let (cx, cy) = (
                        self.cells[batch.inputs[t * bb + b] as usize],
                        self.cells[batch.targets[t * bb + b] as usize],
                    );
                    ids[row_of(tt, bb, 2 * t, b)] = d.rows as u32 + cx % cols;
                    ids[row_of(tt, bb, 2 * t + 1, b)] = cy / cols;
                    tgt_r[t * bb + b] = cy / cols;
                    tgt_c[t * bb + b] = cy % cols;
                }
            }
        }
        // The table gradient's scatter lists: storage rows grouped by id (counting sort).
        let rows_n = d.input_rows();
        h.count.clear();
        h.count.resize(rows_n + 1, 0);
        for &id in &all[io.ids..io.ids + sb] {
            h.count[id as usize + 1] += 1;
        }
        for i in 0..rows_n {
            h.count[i + 1] += h.count[i];
        }
        h.fill.clear();
        h.fill.extend_from_slice(&h.count[..rows_n]);
        for r in 0..sb {
            let slot = &mut h.fill[all[io.ids + r] as usize];
            all[io.members + *slot as usize] = r as u32;
            *slot += 1;
        }
        let mut n_uniq = 0;
        for id in 0..rows_n {
            if h.count[id + 1] > h.count[id] {
                all[io.uniq + n_uniq] = id as u32;
                all[io.starts + n_uniq] = h.count[id];
                n_uniq += 1;
            }
        }
        all[io.starts + n_uniq] = sb as u32;
        all[io.n_uniq] = n_uniq as u32;
        Ok(())
    }

    /// Prepare one pass of `batch` (a group, an evaluation or a loss-table batch) in input
    /// region `region`: its workspace and state exist, its inputs are staged.
    fn prepare_host(&mut self, batch: &Batch<'_>, region: usize, groups: usize) -> Result<()> {
        batch.check(self.layout.dims.vocab)?;
        self.ensure_workspace(batch.steps, batch.batch, groups)?;
        self.ensure_state(batch.stream, batch.batch)?;
        self.stage_inputs(batch, region)
    }

    /// The pairwise sum of `groups` gradients as buffers and additions (see [`SumPlan`]).
    fn sum_plan(groups: usize) -> Result<SumPlan> {
        let mut tree = PairwiseSum::<usize>::default();
        let (mut slots, mut after) = (Vec::new(), Vec::new());
        for _ in 0..groups {
            let slot = tree.depth();
            let mut adds = Vec::new();
            tree.push(slot, |a, b| {
                adds.push((*a, *b));
                Ok(())
            })?;
            slots.push(slot);
            after.push(adds);
        }
        let mut finish = Vec::new();
        let last = tree.finish(|a, b| {
            finish.push((*a, *b));
            Ok(())
        })?;
        debug_assert_eq!(last, 0);
        Ok(SumPlan {
            slots,
            after,
            finish,
        })
    }

    /// The sum's buffers 1..=`deepest` exist (allocated on the first step that needs them).
    fn ensure_group_grads(&mut self, deepest: usize) -> Result<()> {
        while self.group_grads.len() < deepest {
            // A buffer added moves none a graph holds: the graphs stay.
            let b = Buf::zeros(self.dev(), self.dl.total)?;
            self.group_grads.push(b);
        }
        Ok(())
    }

    /// The optimizer's buffers for `rule` exist (created, zeroed or at the rule's initial
    /// value, on its first update).
    fn ensure_optimizer(&mut self, rule: &Optimizer) -> Result<()> {
        if self.opt.as_ref().is_some_and(|o| o.rule == *rule) {
            return Ok(());
        }
        self.release()?;
        self.opt = None;
        let bufs = (0..rule.state_names().len())
            .map(|k| {
                let init = vec![rule.state_init(k) as f32; self.layout.total];
                Buf::from_host(self.dev(), &self.dl.expand(&self.layout, &init))
            })
            .collect::<Result<Vec<_>>>()?;
        self.opt = Some(DevOpt {
            rule: *rule,
            bufs,
            updates: 0,
        });
        Ok(())
    }

    /// Write the update's device scalars for update number `t` to the staging.
    fn stage_update_knobs(
        &mut self,
        rule: &Optimizer,
        lr: f64,
        max_norm: f64,
        t: u64,
    ) -> Result<()> {
        let ws = self
            .ws
            .as_mut()
            .ok_or_else(|| Error::Backend("no batch".into()))?;
        let u = &mut ws.staging.update;
        u.slice_mut::<f64>(0, 2)?.copy_from_slice(&[lr, max_norm]);
        let (step, inv) = match *rule {
            Optimizer::Adam { beta1, beta2, .. } => {
                let (bc1, bc2) = (1.0 - beta1.powi(t as i32), 1.0 - beta2.powi(t as i32));
                ((lr / bc1) as f32, (1.0 / bc2.sqrt()) as f32)
            }
            _ => (0.0, 0.0),
        };
        u.slice_mut::<u64>(16, 2)?.copy_from_slice(&[0, 0]);
        u.slice_mut::<f32>(16, 1)?[0] = step;
        u.slice_mut::<f32>(24, 1)?[0] = inv;
        Ok(())
    }

    /// Issue the pending training work, if any.
    pub(super) fn flush(&self) -> Result<()> {
        let pending = self.pending.borrow_mut().take();
        match pending {
            Some(w) => self.run_work(&Work::Train(w)),
            None => Ok(()),
        }
    }

    /// The two loss sums at `at` of the results staging (after a wait).
    fn staged_loss(&self, at: usize) -> Result<(f64, f64)> {
        let r = self.ws()?.staging.results.slice::<f64>(8 * at, 2)?;
        Ok((r[0], r[1]))
    }

    /// The summed losses of the last training step from the results staging, group by
    /// group (after a wait that followed the download).
    fn step_losses_staged(&self) -> Result<LossSums> {
        let ws = self.ws()?;
        let mut total = LossSums::default();
        for g in 0..self.last_groups {
            let (row, col) = self.staged_loss(Workspace::loss_at(g))?;
            total.add(&LossSums {
                row,
                col,
                words: (ws.steps * ws.batch) as u64,
            });
        }
        Ok(total)
    }

    /// Download `n` results from `at` to the staging and wait for them.
    fn read_results(&self, at: usize, n: usize) -> Result<()> {
        let ws = self.ws()?;
        self.dev
            .download_async(ws.results.at(at), &ws.staging.results, 8 * at, 8 * n)?;
        self.wait()
    }

    /// An evaluation-mode pass (no dropout) of `batch` through every layer and the heads
    /// in `mode`; returns its loss sums (one host wait).
    fn eval_pass(&mut self, batch: &Batch<'_>, mode: HeadMode) -> Result<LossSums> {
        let cx = self.begin_pass(batch, Pass::Eval)?;
        for l in 0..self.layout.dims.layers {
            self.layer_forward(&cx, l)?;
        }
        self.run_heads(&cx, mode)?;
        self.pass_loss(&cx)
    }

    /// Start a pass of the per-layer interface (or an evaluation): prepared on the host,
    /// its inputs uploaded, its state loaded, the layer-0 rows gathered.
    fn begin_pass(&mut self, batch: &Batch<'_>, pass: Pass) -> Result<Cx> {
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
            keyed: self.keyed_whole(batch.batch),
            slot: 0,
            loss_at: ws.eval_loss_at(),
            train,
        };
        if let Some(st) = self.states.get_mut(&batch.stream) {
            st.live = true;
        }
        self.upload_batch_knobs()?;
        self.prepare_device(&cx)?;
        self.cur = Some(cx);
        self.have_head_grads = false;
        Ok(cx)
    }

    /// The loss sums of pass `cx` (one host wait).
    fn pass_loss(&self, cx: &Cx) -> Result<LossSums> {
        self.read_results(cx.loss_at, 2)?;
        let (row, col) = self.staged_loss(cx.loss_at)?;
        let ws = self.ws()?;
        Ok(LossSums {
            row,
            col,
            words: (ws.steps * ws.batch) as u64,
        })
    }

    /// Dropout keying of a batch trained in one piece: by its streams' place in the job's
    /// batch where they are not all of it.
    fn keyed_whole(&self, bl: usize) -> Option<(usize, usize)> {
        let global = if self.shard.global == 0 {
            bl
        } else {
            self.shard.global
        };
        (bl != global).then_some((self.shard.offset, global))
    }

    /// Prepare a training step on the host: every group's inputs staged, the work that
    /// runs it described (left pending).
    fn prepare_step(&mut self, batch: &Batch<'_>, step: u64, scale: f32) -> Result<TrainWork> {
        let plan = Plan::new(self.shard, batch)?;
        let groups = match plan {
            Plan::Whole { .. } => 1,
            Plan::Groups { groups, .. } => groups,
        };
        let SumPlan {
            slots,
            after,
            finish,
        } = Self::sum_plan(groups)?;
        self.ensure_group_grads(slots.iter().copied().max().unwrap_or(0))?;
        let mut tokens = std::mem::take(&mut self.host.tokens);
        let mut work = TrainWork {
            steps: batch.steps,
            batch: batch.batch / groups,
            groups: Vec::with_capacity(groups),
            finish,
        };
        for (g, adds) in after.into_iter().enumerate() {
            let (group, keyed) = match plan {
                Plan::Whole { keyed } => (*batch, keyed),
                Plan::Groups { .. } => plan.group(batch, g, &mut tokens),
            };
            let r = self.prepare_host(&group, g, groups);
            let cx = Cx {
                region: g,
                stream: group.stream,
                keyed,
                slot: slots[g],
                loss_at: Workspace::loss_at(g),
                train: self.dropout > 0.0,
            };
            if let Err(e) = r {
                self.host.tokens = tokens;
                return Err(e);
            }
            if let Some(st) = self.states.get_mut(&group.stream) {
                st.live = true;
            }
            work.groups.push((cx, adds));
        }
        self.host.tokens = tokens;
        self.stage_batch_knobs(step, scale)?;
        self.last_groups = groups;
        Ok(work)
    }
}

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
        if torch.len() != self.layout.total {
            return Err(Error::Shape(format!(
                "parameter buffer has {} values, the model {}",
                torch.len(),
                self.layout.total
            )));
        }
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
    fn input_forward(&mut self, batch: &Batch<'_>, pass: Pass) -> Result<()> {
        self.begin_pass(batch, pass).map(|_| ())
    }
    fn lstm_forward(&mut self, layer: usize) -> Result<()> {
        let cx = self
            .cur
            .ok_or_else(|| Error::Backend("lstm_forward before input_forward".into()))?;
        if layer >= self.layout.dims.layers {
            return Err(Error::Shape(format!(
                "layer {layer} of a {}-layer model",
                self.layout.dims.layers
            )));
        }
        self.layer_forward(&cx, layer)
    }
    fn heads(&mut self, grad_scale: Option<f32>) -> Result<LossSums> {
        let cx = self
            .cur
            .ok_or_else(|| Error::Backend("heads before input_forward".into()))?;
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
        self.run_heads(&cx, mode)?;
        self.have_head_grads = mode == HeadMode::Grad;
        self.pass_loss(&cx)
    }
    fn lstm_backward(&mut self, layer: usize) -> Result<()> {
        let cx = self
            .cur
            .ok_or_else(|| Error::Backend("lstm_backward before input_forward".into()))?;
        if layer >= self.layout.dims.layers {
            return Err(Error::Shape(format!(
                "layer {layer} of a {}-layer model",
                self.layout.dims.layers
            )));
        }
        if !self.have_head_grads {
            return Err(Error::Backend(
                "lstm_backward without a gradient from the heads".into(),
            ));
        }
        self.layer_backward(&cx, layer)
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
        let cx = self.begin_pass(batch, Pass::Eval)?;
        for l in 0..self.layout.dims.layers {
            self.layer_forward(&cx, l)?;
        }
        self.run_heads(&cx, HeadMode::Table)?;
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

    fn eval_batch(&mut self, batch: &Batch<'_>) -> Result<LossSums> {
        self.eval_pass(batch, HeadMode::Loss)
    }

    fn device_counters(&self) -> Option<Counters> {
        Some(self.counters())
    }
}

impl CudaBackend {
    /// The loss-table batch just run: the positions whose target is in the tables' range,
    /// grouped by target word (ascending), go up as (table entry, start) lists through
    /// the workspace's table buffers (no allocation), and each word's rows are added.
    fn accumulate_tables(&mut self) -> Result<()> {
        let range = self.tables.as_ref().map_or(0..0, |t| t.words.clone());
        let h = &mut self.host;
        let words = &h.words;
        h.order.clear();
        h.order.extend(
            (0..words.len() as u32).filter(|&p| range.contains(&(words[p as usize] as usize))),
        );
        h.order.sort_unstable_by_key(|&p| (words[p as usize], p));
        h.tab_words.clear();
        h.tab_starts.clear();
        for (i, &p) in h.order.iter().enumerate() {
            let w = words[p as usize] - range.start as u32;
            if h.tab_words.last() != Some(&w) {
                h.tab_words.push(w);
                h.tab_starts.push(i as u32);
            }
        }
        h.tab_starts.push(h.order.len() as u32);
        if h.tab_words.is_empty() {
            return Ok(());
        }
        let (ws, tables) = match (&self.ws, &mut self.tables) {
            (Some(w), Some(t)) => (w, t),
            _ => return Err(Error::Backend("no batch or tables".into())),
        };
        let dev = self.dev.as_ref();
        ws.tab_words.upload(dev, 0, &h.tab_words)?;
        ws.tab_starts.upload(dev, 0, &h.tab_starts)?;
        ws.tab_pos.upload(dev, 0, &h.order)?;
        let d = self.layout.dims;
        for (table, z, ld, width) in [
            (&tables.lr, &ws.zr, ws.ldr, d.rows),
            (&tables.lc, &ws.zc, ws.ldc, d.cols),
        ] {
            dev.launch(&super::layer::Launch {
                kernel: "table_accumulate",
                grid: [
                    u32_arg(h.tab_words.len(), "words")?.slot() as u32,
                    width.div_ceil(THREADS as usize) as u32,
                    1,
                ],
                block: [THREADS, 1, 1],
                args: &[
                    table.arg(0),
                    z.arg(0),
                    ws.tab_words.arg(0),
                    ws.tab_starts.arg(0),
                    ws.tab_pos.arg(0),
                    u32_arg(width, "table side")?,
                    u32_arg(ld, "logit row")?,
                ],
            })?;
        }
        for (k, &w) in h.tab_words.iter().enumerate() {
            tables.counts[w as usize] += (h.tab_starts[k + 1] - h.tab_starts[k]) as u64;
        }
        Ok(())
    }
}
