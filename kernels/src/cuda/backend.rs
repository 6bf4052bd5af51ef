//! [`CudaBackend`]: the LightRNN model on one CUDA device, behind the [`crate::Backend`]
//! boundary: what it holds, opening it on a device, and the housekeeping of its buffers
//! (the workspace of a batch shape, the carried states, the gradient sum's buffers, the
//! optimizer's, the waits that free them). Parameters, gradients and optimizer buffers are
//! device buffers in PyTorch's tensors, each at a 16-byte boundary ([`DevLayout`]:
//! checkpoints and host copies see PyTorch's layout); the carried states and the loss
//! tables live on the device; the host keeps the word -> cell table (it maps each batch's
//! words to table ids, written to page-locked staging that one asynchronous copy per group
//! uploads: `host`).
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
//! Every other call issues pending work before its own, so each sees the step done
//! (`boundary`: the [`crate::Backend`] calls; `step`: the device work).

use std::cell::RefCell;
use std::collections::BTreeMap;

use super::buffers::Buf;
use super::comm::allreduce::Scratch;
use super::devlayout::DevLayout;
use super::graphs::Graphs;
use super::layer::{Arg, Counters, Device, Launch};
use super::work::{Cx, NORM_BLOCKS, TrainWork, Work};
use super::workspace::{Workspace, check_fits, knob, model_bytes};
use crate::backend::{ModelConfig, Shard, Stream};
use crate::layout::{ParamLayout, random_allocation};
use crate::optim::Optimizer;
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
    pub(super) rule: Optimizer,
    pub(super) bufs: Vec<Buf<f32>>,
    pub(super) updates: u64,
}

/// Loss tables of a reallocation round on the device.
pub(super) struct DevTables {
    /// The word ids the tables hold: entry `w - words.start` is word w.
    pub(super) words: std::ops::Range<usize>,
    pub(super) lr: Buf<f32>,
    pub(super) lc: Buf<f32>,
    pub(super) counts: Vec<u64>,
}

/// Host-side scratch of the batch preparation (kept between batches).
#[derive(Default)]
pub(super) struct HostScratch {
    pub(super) words: Vec<u32>,
    pub(super) count: Vec<u32>,
    pub(super) fill: Vec<u32>,
    pub(super) tokens: Vec<u32>,
    pub(super) order: Vec<u32>,
    pub(super) tab_words: Vec<u32>,
    pub(super) tab_starts: Vec<u32>,
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
    pub(super) cells: Vec<u32>,
    pub(super) states: BTreeMap<Stream, DevState>,
    pub(super) shard: Shard,
    pub(super) ws: Option<Workspace>,
    pub(super) host: HostScratch,
    /// The device scalars of a step ([`knob`]); the gradient norm's partial sums.
    pub(super) knobs: Buf<u64>,
    pub(super) partials: Buf<f64>,
    /// The fixed-order device all-reduce's buffers.
    pub(super) reduce: Scratch,
    pub(super) tables: Option<DevTables>,
    pub(super) graphs: Graphs,
    /// A training step's forward and backward, prepared and not issued yet.
    pub(super) pending: RefCell<Option<TrainWork>>,
    /// The groups of the last training step (whose loss sums the results hold).
    pub(super) last_groups: usize,
    /// The pass the per-layer calls are in (`input_forward` .. `lstm_backward`).
    pub(super) cur: Option<Cx>,
    pub(super) have_head_grads: bool,
    /// While it traces, the training work runs as plain launches between timing marks.
    pub(super) profiler: crate::Profiler,
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
    /// ([`ParamLayout::initial_params`], [`random_allocation`]: the CPU backend's bits).
    pub fn on(dev: Box<dyn Device>, cfg: &ModelConfig) -> Result<Self> {
        cfg.validate()?;
        let layout = ParamLayout::new(cfg.dims);
        let dl = DevLayout::new(&layout);
        check_fits(
            dev.as_ref(),
            model_bytes(dl.total),
            "the model (parameters, gradients, optimizer)",
        )?;
        let init = layout.initial_params::<f32>(cfg.seed);
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
            profiler: crate::Profiler::off(),
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
    pub(super) fn ensure_workspace(
        &mut self,
        steps: usize,
        batch: usize,
        groups: usize,
    ) -> Result<()> {
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
    pub(super) fn ensure_state(&mut self, stream: Stream, batch: usize) -> Result<()> {
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
    pub(super) fn release(&mut self) -> Result<()> {
        self.graphs.clear();
        self.wait()
    }

    /// The host may write the batch staging: no copy from it is in flight.
    pub(super) fn staging_free(&self) -> Result<()> {
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
    pub(super) fn wait(&self) -> Result<()> {
        self.dev.synchronize()?;
        if let Some(w) = &self.ws {
            w.staging.batch_busy.set(false);
            w.staging.update_busy.set(false);
        }
        Ok(())
    }

    /// The sum's buffers 1..=`deepest` exist (allocated on the first step that needs them).
    pub(super) fn ensure_group_grads(&mut self, deepest: usize) -> Result<()> {
        while self.group_grads.len() < deepest {
            // A buffer added moves none a graph holds: the graphs stay.
            let b = Buf::zeros(self.dev(), self.dl.total)?;
            self.group_grads.push(b);
        }
        Ok(())
    }

    /// The optimizer's buffers for `rule` exist (created, zeroed or at the rule's initial
    /// value, on its first update).
    pub(super) fn ensure_optimizer(&mut self, rule: &Optimizer) -> Result<()> {
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

    /// Issue the pending training work, if any.
    pub(super) fn flush(&self) -> Result<()> {
        let pending = self.pending.borrow_mut().take();
        match pending {
            Some(w) => self.run_work(&Work::Train(w)),
            None => Ok(()),
        }
    }
    pub(super) fn dev(&self) -> &dyn Device {
        self.dev.as_ref()
    }

    /// A timing mark: the phase `label` begins on the device (while the profiler traces).
    pub(super) fn mark(&self, label: impl FnOnce() -> String) -> Result<()> {
        if self.profiler.tracing() {
            self.dev.mark(label())?;
        }
        Ok(())
    }

    /// The device spans between the marks of the step just waited for, each phase from
    /// its mark to the next, on the host's clock: the last mark is placed at the wait's
    /// return (a few microseconds late at most).
    pub(super) fn device_spans(&self) -> Result<()> {
        if !self.profiler.tracing() {
            return Ok(());
        }
        let marks = self.dev.take_marks()?;
        let now = std::time::Instant::now();
        let Some(&(_, last)) = marks.last() else {
            return Ok(());
        };
        let at = |t: f64| {
            now.checked_sub(std::time::Duration::from_secs_f64((last - t).max(0.0)))
                .unwrap_or(now)
        };
        for w in marks.windows(2) {
            self.profiler.device_span(&w[0].0, at(w[0].1), at(w[1].1));
        }
        Ok(())
    }

    pub(super) fn ws(&self) -> Result<&Workspace> {
        self.ws
            .as_ref()
            .ok_or_else(|| Error::Backend("no batch".into()))
    }

    pub(super) fn launch(
        &self,
        kernel: &'static str,
        grid: [u32; 3],
        block: u32,
        args: &[Arg],
    ) -> Result<()> {
        self.dev.launch(&Launch {
            kernel,
            grid,
            block: [block, 1, 1],
            args,
        })
    }

    /// The gradient buffer `slot` (0: the backend's).
    pub(super) fn grad_buf(&self, slot: usize) -> Result<&Buf<f32>> {
        match slot {
            0 => Ok(&self.grads),
            k => self
                .group_grads
                .get(k - 1)
                .ok_or_else(|| Error::Backend(format!("no gradient buffer {k}"))),
        }
    }

    /// The device offset of parameter tensor `spec`.
    pub(super) fn off(&self, spec: usize) -> usize {
        self.dl.offsets[spec]
    }
}
