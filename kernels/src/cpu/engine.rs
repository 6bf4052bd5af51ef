//! The CPU LightRNN engine, generic over the element type: `Engine<f32>` is the CPU
//! backend, `Engine<f64>` the reference the gradient checks and parity tests run in.
//!
//! One batch is inputs x and targets y, [T, B] word ids each (time-major). Stream b reads
//! 2T LSTM steps c(x_0), r(y_0), c(x_1), r(y_1), ...; the output after c(x_t) predicts
//! r(y_t) (row head), the output after r(y_t) predicts c(y_t) (column head), exactly as
//! the PyTorch reference (`peers/lightrnn.py`).
//!
//! Activations are stored *parity-major* ([`row_of`]): step s = 2t + p of stream b is
//! storage row `((p * T) + t) * B + b`, so the T*B rows the row head reads (p = 0) are one contiguous
//! [T*B, m] matrix and those of the column head (p = 1) the next one: no gather, and each
//! step's B rows are contiguous for the recurrent GEMM.
//!
//! Work split: every parallel region runs on all threads of the [`Team`]; in the LSTM
//! regions thread k owns a contiguous range of hidden units (whole gate blocks, see
//! [`super::layout`]) and thus a contiguous range of gate rows, computes them for all 2T
//! steps, and meets the other threads once per step at the barrier (h_s or dG_s complete).
//!
//! Layer 0 without input dropout never materialises its input: its input projection is
//! `[X_r; X_c][id] · W_ih^T`, so it is computed once per *distinct* input row of the batch
//! (U <= min(R + C, 2TB) rows instead of 2TB) and gathered; in the backward pass dG is
//! summed per distinct row first, and W_ih's and the input tables' gradients come from
//! those U sums (two small GEMMs instead of two 2TB-row ones).

use std::collections::BTreeMap;

use super::layout::{part_range, to_internal, to_torch};
use super::simd;
use super::team::{Shared, Team};
use crate::backend::{Batch, ModelConfig, Pass, State, Stream};
use crate::layout::{ModelDims, ParamLayout, check_allocation, random_allocation, row_of};
use crate::optim::{self, Optimizer};
use crate::rng::Philox;
use crate::{Error, Real, Result};

/// What the heads compute besides the loss.
#[derive(Clone, Copy, Debug)]
pub(super) enum HeadMode<T> {
    /// Gradients of scale * summed NLL.
    Grad(T),
    /// The loss only.
    Loss,
    /// The full -log-softmax rows, left in the logit buffers for the loss tables.
    Table,
}

#[derive(Default)]
pub(super) struct LayerWs<T> {
    /// [SB, 4m]: gate pre-activations -> activations (forward) -> dG (backward).
    pub(super) g: Vec<T>,
    /// [SB, m] cell state, tanh(cell state), output.
    pub(super) c: Vec<T>,
    pub(super) tc: Vec<T>,
    pub(super) h: Vec<T>,
    /// [SB, in]: the dense input after dropout (unused when the input is read in place).
    pub(super) xin: Vec<T>,
    /// [SB, in]: its dropout multipliers.
    pub(super) mask: Vec<T>,
    /// [SB, m]: d loss / d h (from the heads or from the layer above).
    pub(super) dh: Vec<T>,
}

#[derive(Default)]
pub(super) struct Workspace<T> {
    pub(super) steps: usize,
    pub(super) batch: usize,
    pub(super) stream: Stream,
    pub(super) pass: Option<Pass>,
    /// Inputs are dropped out (training with dropout > 0).
    pub(super) dropout: bool,
    /// [SB] joint-input-table row read at each storage row (R + col for columns).
    pub(super) ids: Vec<u32>,
    /// [TB] row / column targets and the target words, in head-row order t*B + b.
    pub(super) tgt_r: Vec<u32>,
    pub(super) tgt_c: Vec<u32>,
    pub(super) words: Vec<u32>,
    /// Layer-0 table mode: distinct ids, the slot of each storage row, the slot of each id.
    pub(super) uniq: Vec<u32>,
    pub(super) slot: Vec<u32>,
    pub(super) slot_of: Vec<u32>,
    /// [U, n] gathered inputs, [U, 4m] their projections / per-slot dG sums.
    pub(super) xu: Vec<T>,
    pub(super) pt: Vec<T>,
    pub(super) dsum: Vec<T>,
    pub(super) dxu: Vec<T>,
    pub(super) layers: Vec<LayerWs<T>>,
    /// [L, B, m] the start state of this batch.
    pub(super) h0: Vec<T>,
    pub(super) c0: Vec<T>,
    /// [SB, m] top output after dropout and its multipliers.
    pub(super) hd: Vec<T>,
    pub(super) mask_top: Vec<T>,
    /// [TB, R], [TB, C] logits -> d loss / d logits.
    pub(super) zr: Vec<T>,
    pub(super) zc: Vec<T>,
    /// [4m] b_ih + b_hh of the layer being run.
    pub(super) bsum: Vec<T>,
    /// The last `heads` call left gradients in zr/zc.
    pub(super) have_head_grads: bool,
}

pub(super) fn resize<T: Real>(v: &mut Vec<T>, n: usize) {
    v.clear();
    v.resize(n, T::ZERO);
}

/// Optimizer buffers kept beside the parameters (internal layout).
pub(super) struct OptState<T> {
    rule: Optimizer,
    bufs: Vec<Vec<T>>,
    /// Updates applied so far (Adam's bias correction).
    updates: u64,
}

/// The CPU LightRNN model: parameters, gradients, optimizer state, carried states and the
/// activations of the batch in flight.
pub struct Engine<T: Real> {
    pub(super) layout: ParamLayout,
    pub(super) dropout: f64,
    pub(super) seed: u64,
    pub(super) team: Team,
    /// Flat parameters and gradients, internal layout.
    pub(super) params: Vec<T>,
    pub(super) grads: Vec<T>,
    pub(super) opt: Option<OptState<T>>,
    /// Row-major transposes of the weights that forward products multiply from the right
    /// (W_ih^T [in, 4m], W_hh^T [m, 4m], W_r^T [m, R], W_c^T [m, C]), by spec index: the
    /// GEMM reads a row-major right operand ~4x faster than a transposed view (it repacks
    /// a strided operand on every call). Rebuilt lazily after every parameter change.
    pub(super) shadow: Vec<Vec<T>>,
    pub(super) shadow_ok: bool,
    /// word -> cell (row * C + col).
    pub(super) cells: Vec<u32>,
    pub(super) states: BTreeMap<Stream, State<T>>,
    pub(super) ws: Workspace<T>,
    /// This rank's streams are columns `offset..offset + B` of a `global`-stream batch
    /// (data parallelism); dropout masks are keyed by the global position, so ranks draw
    /// exactly the masks one process with the whole batch would.
    pub(super) shard: Option<(usize, usize)>,
}

/// Rows `range` of a time-major [S, B] block of rows `width` wide, `batch` = B: row r is
/// step r / B, stream r % B.
#[derive(Clone, Debug)]
pub(super) struct Rows {
    pub range: std::ops::Range<usize>,
    pub width: usize,
    pub batch: usize,
}

/// Dropout multipliers for the rows `rows` of a time-major block ([`Rows`]), keyed by each
/// row's index in the global batch.
pub(super) fn fill_mask<T: Real>(
    rng: &Philox,
    site: u64,
    rows: Rows,
    shard: Option<(usize, usize)>,
    p: f64,
    ms: &mut [T],
) {
    let Rows {
        range: rows,
        width: w,
        batch: b,
    } = rows;
    match shard {
        None => simd::dropout_mask(rng, site, (rows.start * w) as u64, p, ms),
        Some((off, global)) => {
            for (k, r) in rows.enumerate() {
                let g = (r / b) * global + off + r % b;
                simd::dropout_mask(rng, site, (g * w) as u64, p, &mut ms[k * w..(k + 1) * w]);
            }
        }
    }
}

impl<T: Real> Engine<T> {
    /// A model with the reference initialisation (U(-0.1, 0.1) tables and output weights,
    /// zero output biases, U(-1/sqrt(m), 1/sqrt(m)) LSTM, as torch) and a random allocation,
    /// all drawn from `seed`.
    pub fn new(dims: ModelDims, dropout: f64, seed: u64, threads: usize) -> Result<Self> {
        ModelConfig {
            dims,
            dropout,
            seed,
        }
        .validate()?;
        let layout = ParamLayout::new(dims);
        let total = layout.total;
        let mut e = Self {
            layout,
            dropout,
            seed,
            team: Team::new(threads)?,
            params: vec![T::ZERO; total],
            grads: vec![T::ZERO; total],
            opt: None,
            shadow: Vec::new(),
            shadow_ok: false,
            cells: Vec::new(),
            states: BTreeMap::new(),
            ws: Workspace::default(),
            shard: None,
        };
        e.init_params(seed);
        e.cells = random_allocation(&dims, seed);
        Ok(e)
    }

    pub fn dims(&self) -> &ModelDims {
        &self.layout.dims
    }

    /// Declare this engine's batches to be streams `offset..offset + batch` of a
    /// `global`-stream batch (one rank of a data-parallel job); `None` (the default) for
    /// a whole batch.
    pub fn set_shard(&mut self, shard: Option<(usize, usize)>) -> Result<()> {
        if let Some((off, global)) = shard
            && off >= global
        {
            return Err(Error::Config(format!(
                "stream offset {off} outside a batch of {global}"
            )));
        }
        self.shard = shard.filter(|&(off, global)| !(off == 0 && global == 0));
        Ok(())
    }
    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }
    /// Time the threads' parts of each region with `profiler` while it traces.
    pub fn set_profiler(&mut self, profiler: crate::Profiler) {
        self.team.set_profiler(profiler);
    }

    pub fn threads(&self) -> usize {
        self.team.threads()
    }
    pub fn dropout(&self) -> f64 {
        self.dropout
    }

    /// Re-draw every parameter from `seed` ([`ParamLayout::initial_params`]).
    pub fn init_params(&mut self, seed: u64) {
        let torch = self.layout.initial_params::<T>(seed);
        to_internal(&self.layout, &torch, &mut self.params);
        self.shadow_ok = false;
    }

    /// Parameters in PyTorch layout.
    pub fn params_torch(&self) -> Vec<T> {
        let mut t = vec![T::ZERO; self.layout.total];
        to_torch(&self.layout, &self.params, &mut t);
        t
    }

    /// Replace the parameters (PyTorch layout).
    pub fn set_params_torch(&mut self, torch: &[T]) -> Result<()> {
        self.layout.check_len(torch.len())?;
        to_internal(&self.layout, torch, &mut self.params);
        self.shadow_ok = false;
        Ok(())
    }

    /// Specs whose transposes the forward pass reads.
    fn shadowed(&self) -> Vec<usize> {
        let mut v = Vec::new();
        for l in 0..self.layout.dims.layers {
            let lp = self.layout.layer(l);
            v.extend([lp.w_ih, lp.w_hh]);
        }
        let [wr, _, wc, _] = self.layout.heads();
        v.extend([wr, wc]);
        v
    }

    /// Rebuild the transposed weights (threads split the source rows).
    pub(super) fn refresh_shadow(&mut self) {
        if self.shadow_ok {
            return;
        }
        self.shadow.resize_with(self.layout.specs.len(), Vec::new);
        for i in self.shadowed() {
            let spec = &self.layout.specs[i];
            let (rows, cols) = (spec.shape[0], spec.shape[1]);
            let src = &self.params[spec.range()];
            let dst = &mut self.shadow[i];
            resize(dst, rows * cols);
            let d = Shared::new(dst);
            let nt = self.team.threads();
            self.team.run(|tid, _| {
                let pr = part_range(rows, nt, tid);
                // Blocks of 16 x 16 keep both sides in cache lines.
                for r0 in pr.clone().step_by(16) {
                    let r1 = (r0 + 16).min(pr.end);
                    for c0 in (0..cols).step_by(16) {
                        let c1 = (c0 + 16).min(cols);
                        for c in c0..c1 {
                            // SAFETY: elements (c, r) for r in this thread's rows are its own.
                            let out = unsafe { d.slice_mut(c * rows + r0..c * rows + r1) };
                            for (o, r) in out.iter_mut().zip(r0..r1) {
                                *o = src[r * cols + c];
                            }
                        }
                    }
                }
            });
        }
        self.shadow_ok = true;
    }

    /// Gradients of the last backward pass, PyTorch layout.
    pub fn grads_torch(&self) -> Vec<T> {
        let mut t = vec![T::ZERO; self.layout.total];
        to_torch(&self.layout, &self.grads, &mut t);
        t
    }

    /// The flat gradient buffer (internal layout), lent to the collective.
    pub(crate) fn grads_mut(&mut self) -> &mut [T] {
        &mut self.grads
    }

    /// Exchange the gradient buffer with `other` (same length): how the gradient groups'
    /// partial sums are kept without copying. Every backward pass overwrites the whole
    /// buffer, so what `other` held before does not matter.
    pub(crate) fn swap_grads(&mut self, other: &mut Vec<T>) -> Result<()> {
        if other.len() != self.grads.len() {
            return Err(Error::Shape(format!(
                "gradient buffer of {} values for a model of {}",
                other.len(),
                self.grads.len()
            )));
        }
        std::mem::swap(&mut self.grads, other);
        Ok(())
    }

    /// word -> cell (row * C + col).
    pub fn allocation(&self) -> &[u32] {
        &self.cells
    }

    /// Install a word -> cell table: V distinct cells below R * C.
    pub fn set_allocation(&mut self, cells: &[u32]) -> Result<()> {
        check_allocation(&self.layout.dims, cells)?;
        self.cells.clear();
        self.cells.extend_from_slice(cells);
        Ok(())
    }

    pub fn state(&self, stream: Stream) -> Option<&State<T>> {
        self.states.get(&stream)
    }

    pub fn set_state(&mut self, stream: Stream, state: State<T>) -> Result<()> {
        state.check(&self.layout.dims)?;
        self.states.insert(stream, state);
        Ok(())
    }

    /// Forget the carried state (the next batch starts from zeros).
    pub fn reset_state(&mut self, stream: Stream) {
        self.states.remove(&stream);
    }

    /// Prepare a batch: map words to table ids and targets, load the start state, and
    /// (layer-0 table mode) gather the distinct input rows.
    pub fn input_forward(&mut self, batch: &Batch<'_>, pass: Pass) -> Result<()> {
        let d = self.layout.dims;
        let (tt, bb) = (batch.steps, batch.batch);
        batch.check(d.vocab)?;
        self.refresh_shadow();
        let (m, l_n) = (d.hidden, d.layers);
        let (sb, tb) = (2 * tt * bb, tt * bb);
        let ws = &mut self.ws;
        ws.steps = tt;
        ws.batch = bb;
        ws.stream = batch.stream;
        ws.pass = Some(pass);
        ws.dropout = matches!(pass, Pass::Train { .. }) && self.dropout > 0.0;
        ws.have_head_grads = false;
        // Start state.
        let n_state = l_n * bb * m;
        match self.states.get(&batch.stream) {
            Some(st) if st.batch == bb => {
                ws.h0.clear();
                ws.h0.extend_from_slice(&st.h);
                ws.c0.clear();
                ws.c0.extend_from_slice(&st.c);
            }
            Some(st) => {
                return Err(Error::Shape(format!(
                    "stream {:?} carries state for {} streams, the batch has {bb} (reset it first)",
                    batch.stream, st.batch
                )));
            }
            None => {
                resize(&mut ws.h0, n_state);
                resize(&mut ws.c0, n_state);
            }
        }
        // Ids and targets.
        ws.ids.resize(sb, 0);
        ws.tgt_r.resize(tb, 0);
        ws.tgt_c.resize(tb, 0);
        ws.words.resize(tb, 0);
        let cols = d.cols as u32;
        for t in 0..tt {
            for b in 0..bb {
                let x = batch.inputs[t * bb + b] as usize;
                let y = batch.targets[t * bb + b] as usize;
                let (cx, cy) = (self.cells[x], self.cells[y]);
                let (ry, col_y) = (cy / cols, cy % cols);
                ws.ids[row_of(tt, bb, 2 * t, b)] = d.rows as u32 + cx % cols;
                ws.ids[row_of(tt, bb, 2 * t + 1, b)] = ry;
                ws.tgt_r[t * bb + b] = ry;
                ws.tgt_c[t * bb + b] = col_y;
                ws.words[t * bb + b] = y as u32;
            }
        }
        // Per-layer buffers.
        ws.layers.resize_with(l_n, LayerWs::default);
        for (l, lw) in ws.layers.iter_mut().enumerate() {
            lw.g.resize(sb * 4 * m, T::ZERO);
            lw.c.resize(sb * m, T::ZERO);
            lw.tc.resize(sb * m, T::ZERO);
            lw.h.resize(sb * m, T::ZERO);
            let dense = ws.dropout;
            let inp = d.layer_input(l);
            if dense {
                lw.xin.resize(sb * inp, T::ZERO);
                lw.mask.resize(sb * inp, T::ZERO);
            }
        }
        if ws.dropout {
            ws.hd.resize(sb * m, T::ZERO);
            ws.mask_top.resize(sb * m, T::ZERO);
        } else {
            // Layer-0 table mode: distinct ids in order of first use.
            ws.slot_of.clear();
            ws.slot_of.resize(d.input_rows(), u32::MAX);
            ws.uniq.clear();
            ws.slot.resize(sb, 0);
            for r in 0..sb {
                let id = ws.ids[r] as usize;
                if ws.slot_of[id] == u32::MAX {
                    ws.slot_of[id] = ws.uniq.len() as u32;
                    ws.uniq.push(id as u32);
                }
                ws.slot[r] = ws.slot_of[id];
            }
            let (u_n, n) = (ws.uniq.len(), d.emb);
            ws.xu.resize(u_n * n, T::ZERO);
            ws.pt.resize(u_n * 4 * m, T::ZERO);
            let table = &self.params[self.layout.input_table()];
            for (k, &id) in ws.uniq.iter().enumerate() {
                let id = id as usize;
                ws.xu[k * n..(k + 1) * n].copy_from_slice(&table[id * n..(id + 1) * n]);
            }
        }
        Ok(())
    }

    /// Global L2 norm of the gradients.
    pub fn grad_norm(&self) -> f64 {
        simd::sum_sq(&self.grads).sqrt()
    }

    /// Apply one update with gradient `grads * gscale` (gscale carries the clipping).
    pub fn optimizer_step(&mut self, rule: &Optimizer, lr: f64, gscale: f64) -> Result<()> {
        let total = self.layout.total;
        let st = match &mut self.opt {
            Some(o) if o.rule == *rule => o,
            _ => {
                let bufs = (0..rule.state_names().len())
                    .map(|k| vec![T::from_f64(rule.state_init(k)); total])
                    .collect();
                self.opt.insert(OptState {
                    rule: *rule,
                    bufs,
                    updates: 0,
                })
            }
        };
        st.updates += 1;
        let t = st.updates;
        self.shadow_ok = false;
        let nt = self.team.threads();
        let p = Shared::new(&mut self.params);
        let g = &self.grads;
        let bufs: Vec<Shared<T>> = st.bufs.iter_mut().map(|b| Shared::new(b)).collect();
        let errors = std::sync::Mutex::new(None);
        self.team.run(|tid, _| {
            let r = part_range(total, nt, tid);
            // SAFETY: every thread updates its own range of the parameters and state.
            let res = unsafe {
                let mut views: Vec<&mut [T]> =
                    bufs.iter().map(|b| b.slice_mut(r.clone())).collect();
                optim::update(
                    rule,
                    lr,
                    gscale,
                    t,
                    p.slice_mut(r.clone()),
                    &g[r.clone()],
                    &mut views,
                )
            };
            if let Err(e) = res
                && let Ok(mut slot) = errors.lock()
            {
                *slot = Some(e);
            }
        });
        match errors.into_inner() {
            Ok(Some(e)) => Err(e),
            _ => Ok(()),
        }
    }

    /// Optimizer state buffers by name, PyTorch layout, and the update count.
    pub fn optimizer_state(&self) -> Option<(Optimizer, u64, NamedBuffers<T>)> {
        let o = self.opt.as_ref()?;
        let bufs = o
            .rule
            .state_names()
            .iter()
            .zip(&o.bufs)
            .map(|(name, b)| {
                let mut t = vec![T::ZERO; self.layout.total];
                to_torch(&self.layout, b, &mut t);
                (*name, t)
            })
            .collect();
        Some((o.rule, o.updates, bufs))
    }

    /// Restore optimizer state saved by [`Self::optimizer_state`].
    pub fn set_optimizer_state(
        &mut self,
        rule: Optimizer,
        updates: u64,
        bufs: Vec<Vec<T>>,
    ) -> Result<()> {
        if bufs.len() != rule.state_names().len()
            || bufs.iter().any(|b| b.len() != self.layout.total)
        {
            return Err(Error::Shape(format!(
                "{rule:?} state needs {} buffers of {} values",
                rule.state_names().len(),
                self.layout.total
            )));
        }
        let bufs = bufs
            .into_iter()
            .map(|t| {
                let mut i = vec![T::ZERO; self.layout.total];
                to_internal(&self.layout, &t, &mut i);
                i
            })
            .collect();
        self.opt = Some(OptState {
            rule,
            bufs,
            updates,
        });
        Ok(())
    }
}

/// Named optimizer buffers (PyTorch layout).
pub type NamedBuffers<T> = Vec<(&'static str, Vec<T>)>;
