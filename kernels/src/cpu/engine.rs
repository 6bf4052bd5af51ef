//! The CPU LightRNN engine, generic over the element type: `Engine<f32>` is the CPU
//! backend, `Engine<f64>` the reference the gradient checks and parity tests run in.
//!
//! One batch is inputs x and targets y, [T, B] word ids each (time-major). Stream b reads
//! 2T LSTM steps c(x_0), r(y_0), c(x_1), r(y_1), ...; the output after c(x_t) predicts
//! r(y_t) (row head), the output after r(y_t) predicts c(y_t) (column head), exactly as
//! the PyTorch reference (`peers/lightrnn.py`).
//!
//! Activations are stored *parity-major*: step s = 2t + p of stream b is storage row
//! `((p * T) + t) * B + b`, so the T*B rows the row head reads (p = 0) are one contiguous
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

use super::gemm::{Mat, gemm};
use super::layout::{part_range, split_units, to_internal, to_torch};
use super::simd;
use super::team::{Shared, Team};
use crate::backend::{Batch, LossSums, Pass, State, Stream};
use crate::layout::{ModelDims, ParamLayout, check_allocation, random_allocation};
use crate::optim::{self, Optimizer};
use crate::rng::{Philox, Purpose};
use crate::tables::LossTables;
use crate::{Error, Real, Result};

/// What the heads compute besides the loss.
#[derive(Clone, Copy, Debug)]
enum HeadMode<T> {
    /// Gradients of scale * summed NLL.
    Grad(T),
    /// The loss only.
    Loss,
    /// The full -log-softmax rows, left in the logit buffers for the loss tables.
    Table,
}

#[derive(Default)]
struct LayerWs<T> {
    /// [SB, 4m]: gate pre-activations -> activations (forward) -> dG (backward).
    g: Vec<T>,
    /// [SB, m] cell state, tanh(cell state), output.
    c: Vec<T>,
    tc: Vec<T>,
    h: Vec<T>,
    /// [SB, in]: the dense input after dropout (unused when the input is read in place).
    xin: Vec<T>,
    /// [SB, in]: its dropout multipliers.
    mask: Vec<T>,
    /// [SB, m]: d loss / d h (from the heads or from the layer above).
    dh: Vec<T>,
}

#[derive(Default)]
struct Workspace<T> {
    steps: usize,
    batch: usize,
    stream: Stream,
    pass: Option<Pass>,
    /// Inputs are dropped out (training with dropout > 0).
    dropout: bool,
    /// [SB] joint-input-table row read at each storage row (R + col for columns).
    ids: Vec<u32>,
    /// [TB] row / column targets and the target words, in head-row order t*B + b.
    tgt_r: Vec<u32>,
    tgt_c: Vec<u32>,
    words: Vec<u32>,
    /// Layer-0 table mode: distinct ids, the slot of each storage row, the slot of each id.
    uniq: Vec<u32>,
    slot: Vec<u32>,
    slot_of: Vec<u32>,
    /// [U, n] gathered inputs, [U, 4m] their projections / per-slot dG sums.
    xu: Vec<T>,
    pt: Vec<T>,
    dsum: Vec<T>,
    dxu: Vec<T>,
    layers: Vec<LayerWs<T>>,
    /// [L, B, m] the start state of this batch.
    h0: Vec<T>,
    c0: Vec<T>,
    /// [SB, m] top output after dropout and its multipliers.
    hd: Vec<T>,
    mask_top: Vec<T>,
    /// [TB, R], [TB, C] logits -> d loss / d logits.
    zr: Vec<T>,
    zc: Vec<T>,
    /// [4m] b_ih + b_hh of the layer being run.
    bsum: Vec<T>,
    /// The last `heads` call left gradients in zr/zc.
    have_head_grads: bool,
}

fn resize<T: Real>(v: &mut Vec<T>, n: usize) {
    v.clear();
    v.resize(n, T::ZERO);
}

/// Optimizer buffers kept beside the parameters (internal layout).
struct OptState<T> {
    rule: Optimizer,
    bufs: Vec<Vec<T>>,
    /// Updates applied so far (Adam's bias correction).
    updates: u64,
}

/// The CPU LightRNN model: parameters, gradients, optimizer state, carried states and the
/// activations of the batch in flight.
pub struct Engine<T: Real> {
    layout: ParamLayout,
    dropout: f64,
    seed: u64,
    team: Team,
    /// Flat parameters and gradients, internal layout.
    params: Vec<T>,
    grads: Vec<T>,
    opt: Option<OptState<T>>,
    /// Row-major transposes of the weights that forward products multiply from the right
    /// (W_ih^T [in, 4m], W_hh^T [m, 4m], W_r^T [m, R], W_c^T [m, C]), by spec index: the
    /// GEMM reads a row-major right operand ~4x faster than a transposed view (it repacks
    /// a strided operand on every call). Rebuilt lazily after every parameter change.
    shadow: Vec<Vec<T>>,
    shadow_ok: bool,
    /// word -> cell (row * C + col).
    cells: Vec<u32>,
    states: BTreeMap<Stream, State<T>>,
    ws: Workspace<T>,
    /// This rank's streams are columns `offset..offset + B` of a `global`-stream batch
    /// (data parallelism); dropout masks are keyed by the global position, so ranks draw
    /// exactly the masks one process with the whole batch would.
    shard: Option<(usize, usize)>,
}

/// Dropout multipliers for rows `rows` (each `w` wide) of a time-major [S, B] block whose
/// row r is step r / B, stream r % B; keyed by the row's index in the global batch.
#[allow(clippy::too_many_arguments)]
fn fill_mask<T: Real>(
    rng: &Philox,
    site: u64,
    rows: std::ops::Range<usize>,
    w: usize,
    b: usize,
    shard: Option<(usize, usize)>,
    p: f64,
    ms: &mut [T],
) {
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
        dims.validate()?;
        if !(0.0..1.0).contains(&dropout) {
            return Err(Error::Config(format!("dropout {dropout} is not in [0, 1)")));
        }
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
    pub fn threads(&self) -> usize {
        self.team.threads()
    }
    pub fn dropout(&self) -> f64 {
        self.dropout
    }

    /// Re-draw every parameter from `seed`.
    pub fn init_params(&mut self, seed: u64) {
        let rng = Philox::new(seed, Purpose::Init);
        let mut torch = vec![T::ZERO; self.layout.total];
        for (i, s) in self.layout.specs.iter().enumerate() {
            let mut st = rng.stream(i as u64);
            for x in &mut torch[s.range()] {
                *x = match s.init {
                    crate::layout::Init::Zero => T::ZERO,
                    crate::layout::Init::Uniform(a) => T::from_f64((2.0 * st.next_f64() - 1.0) * a),
                };
            }
        }
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
        if torch.len() != self.layout.total {
            return Err(Error::Shape(format!(
                "parameter buffer has {} values, the model {}",
                torch.len(),
                self.layout.total
            )));
        }
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
    fn refresh_shadow(&mut self) {
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
        if tt == 0 || bb == 0 {
            return Err(Error::Shape(format!(
                "empty batch: {tt} steps x {bb} streams"
            )));
        }
        if batch.inputs.len() != tt * bb || batch.targets.len() != tt * bb {
            return Err(Error::Shape(format!(
                "batch of {tt} steps x {bb} streams needs {} inputs and targets, got {} and {}",
                tt * bb,
                batch.inputs.len(),
                batch.targets.len()
            )));
        }
        if let Some(&w) = batch
            .inputs
            .iter()
            .chain(batch.targets)
            .find(|&&w| w as usize >= d.vocab)
        {
            return Err(Error::Shape(format!(
                "word id {w} is outside the vocabulary of {}",
                d.vocab
            )));
        }
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

    /// Forward pass of LSTM layer `l` over the 2T steps; updates the carried state.
    pub fn lstm_forward(&mut self, l: usize) -> Result<()> {
        let d = self.layout.dims;
        if l >= d.layers {
            return Err(Error::Shape(format!(
                "layer {l} of a {}-layer model",
                d.layers
            )));
        }
        if self.ws.pass.is_none() {
            return Err(Error::Backend("lstm_forward before input_forward".into()));
        }
        let (tt, bb) = (self.ws.steps, self.ws.batch);
        let (m, m4, inp) = (d.hidden, 4 * d.hidden, d.layer_input(l));
        let (s_n, sb) = (2 * tt, 2 * tt * bb);
        let lp = self.layout.layer(l);
        let specs = &self.layout.specs;
        let (w_ih_t, w_hh_t) = (&self.shadow[lp.w_ih], &self.shadow[lp.w_hh]);
        let (b_ih, b_hh) = (
            &self.params[specs[lp.b_ih].range()],
            &self.params[specs[lp.b_hh].range()],
        );
        let ws = &mut self.ws;
        resize(&mut ws.bsum, m4);
        for i in 0..m4 {
            ws.bsum[i] = b_ih[i] + b_hh[i];
        }
        let dropout = ws.dropout;
        let table_mode = l == 0 && !dropout;
        let step = match ws.pass {
            Some(Pass::Train { step }) => step,
            _ => 0,
        };
        let rng = Philox::new(self.seed, Purpose::Dropout);
        let p_drop = self.dropout;
        let shard = self.shard;
        let (below, above) = ws.layers.split_at_mut(l);
        let lw = &mut above[0];
        // Dense input source (read-only) and the buffers to fill with the dropped input.
        let lower_h: &[T] = if l > 0 { &below[l - 1].h } else { &[] };
        let in_table = &self.params[self.layout.input_table()];
        let ids = &ws.ids;
        let (uniq_n, slot) = (ws.uniq.len(), &ws.slot);
        let xu = &ws.xu;
        let bsum = &ws.bsum;
        let (h0, c0) = (
            &ws.h0[l * bb * m..(l + 1) * bb * m],
            &ws.c0[l * bb * m..(l + 1) * bb * m],
        );
        let g = Shared::new(&mut lw.g);
        let c = Shared::new(&mut lw.c);
        let tc = Shared::new(&mut lw.tc);
        let h = Shared::new(&mut lw.h);
        let xin = Shared::new(&mut lw.xin);
        let mask = Shared::new(&mut lw.mask);
        let pt = Shared::new(&mut ws.pt);
        let nt = self.team.threads();
        let units = split_units(m, nt);
        self.team.run(|tid, bar| {
            let u = units[tid].clone();
            let rows = 4 * u.start..4 * u.end;
            let nr = rows.len();
            // 1. The dropped-out dense input (rows split across threads).
            if dropout {
                let pr = part_range(sb, nt, tid);
                // SAFETY: thread-private row range of xin / mask.
                let (xs, ms) = unsafe {
                    (
                        xin.slice_mut(pr.start * inp..pr.end * inp),
                        mask.slice_mut(pr.start * inp..pr.end * inp),
                    )
                };
                fill_mask(
                    &rng,
                    step * 64 + l as u64,
                    pr.clone(),
                    inp,
                    bb,
                    shard,
                    p_drop,
                    ms,
                );
                for (k, r) in pr.clone().enumerate() {
                    let src = if l == 0 {
                        let id = ids[r] as usize;
                        &in_table[id * inp..(id + 1) * inp]
                    } else {
                        &lower_h[r * inp..(r + 1) * inp]
                    };
                    xs[k * inp..(k + 1) * inp].copy_from_slice(src);
                }
                simd::mul_assign(xs, ms);
                bar.wait();
            }
            // 2. Input projection of the own gate rows.
            if nr > 0 {
                let w_rows_t = Mat::rows(w_ih_t, m4).at(0, rows.start); // W_ih^T[:, rows]: [inp, nr]
                if table_mode {
                    // SAFETY: own columns of pt; xu / w_ih are read-only here.
                    unsafe {
                        gemm(
                            uniq_n,
                            nr,
                            inp,
                            pt.ptr().add(rows.start),
                            m4,
                            false,
                            Mat::rows(xu, inp),
                            w_rows_t,
                        )
                    };
                } else {
                    let x: *const T = if dropout { xin.ptr() } else { lower_h.as_ptr() };
                    // SAFETY: own columns of g; x is complete (barrier above or read-only).
                    unsafe {
                        gemm(
                            sb,
                            nr,
                            inp,
                            g.ptr().add(rows.start),
                            m4,
                            false,
                            Mat::rows_ptr(x, inp),
                            w_rows_t,
                        )
                    };
                }
            }
            // 3. The recurrence: one barrier per step.
            let w_hh_t = Mat::rows(w_hh_t, m4).at(0, rows.start); // W_hh^T[:, rows]: [m, nr]
            for s in 0..s_n {
                let r0 = row_of(tt, bb, s, 0);
                if nr > 0 {
                    let hprev: *const T = if s == 0 {
                        h0.as_ptr()
                    } else {
                        h.ptr().wrapping_add(row_of(tt, bb, s - 1, 0) * m)
                    };
                    // SAFETY: own columns of step s in g; h of step s-1 is complete (barrier).
                    unsafe {
                        gemm(
                            bb,
                            nr,
                            m,
                            g.ptr().add(r0 * m4 + rows.start),
                            m4,
                            !table_mode,
                            Mat::rows_ptr(hprev, m),
                            w_hh_t,
                        )
                    };
                    for b in 0..bb {
                        let r = r0 + b;
                        let cprev_row = if s == 0 {
                            None
                        } else {
                            Some(row_of(tt, bb, s - 1, b))
                        };
                        // SAFETY: the own units / gate rows of storage row r are this
                        // thread's; c of the previous step is only read.
                        unsafe {
                            let cprev: &[T] = match cprev_row {
                                None => &c0[b * m + u.start..b * m + u.end],
                                Some(rp) => c.slice(rp * m + u.start..rp * m + u.end),
                            };
                            let tab: &[T] = if table_mode {
                                let k = slot[r] as usize * m4;
                                pt.slice(k + rows.start..k + rows.end)
                            } else {
                                &[]
                            };
                            simd::cell_forward(
                                m,
                                u.clone(),
                                g.slice_mut(r * m4 + rows.start..r * m4 + rows.end),
                                &bsum[rows.clone()],
                                tab,
                                cprev,
                                c.slice_mut(r * m + u.start..r * m + u.end),
                                tc.slice_mut(r * m + u.start..r * m + u.end),
                                h.slice_mut(r * m + u.start..r * m + u.end),
                            );
                        }
                    }
                }
                bar.wait();
            }
        });
        // Carry the final state to the next batch of this stream.
        let last = |s: usize, b: usize| row_of(tt, bb, s, b);
        let st = self.states.entry(ws.stream).or_insert_with(|| State {
            batch: bb,
            h: vec![T::ZERO; d.layers * bb * m],
            c: vec![T::ZERO; d.layers * bb * m],
        });
        for b in 0..bb {
            let r = last(s_n - 1, b);
            let dst = (l * bb + b) * m;
            st.h[dst..dst + m].copy_from_slice(&lw.h[r * m..(r + 1) * m]);
            st.c[dst..dst + m].copy_from_slice(&lw.c[r * m..(r + 1) * m]);
        }
        Ok(())
    }

    /// Row and column heads: logits, fused log-softmax + NLL, and with `grad_scale =
    /// Some(s)` the gradients of s * (summed NLL) for the output layers and the top LSTM
    /// output. Returns the summed losses.
    pub fn heads(&mut self, grad_scale: Option<T>) -> Result<LossSums> {
        self.heads_impl(match grad_scale {
            Some(s) => HeadMode::Grad(s),
            None => HeadMode::Loss,
        })
    }

    /// Loss-table accumulation for the batch in flight (after an evaluation forward):
    /// for every target word w, the full row distribution's -log P_r[i] is added to
    /// `tables.lr[w, i]` and the column one's -log P_c[j] to `tables.lc[w, j]` (the row
    /// distribution is the one after the previous word's column input, the column
    /// distribution the one after w's row input). Each batch's contributions are summed
    /// per word in f64 before one f32 addition per table entry, so frequent words do not
    /// drift over a long pass.
    pub fn accumulate_loss_tables(&mut self, tables: &mut LossTables) -> Result<LossSums> {
        let d = self.layout.dims;
        if tables.vocab != d.vocab || tables.rows != d.rows || tables.cols != d.cols {
            return Err(Error::Shape(format!(
                "loss tables are {}x({}+{}), the model {}x({}+{})",
                tables.vocab, tables.rows, tables.cols, d.vocab, d.rows, d.cols
            )));
        }
        if self.ws.pass != Some(Pass::Eval) {
            return Err(Error::Backend(
                "loss tables need an evaluation forward pass (no dropout)".into(),
            ));
        }
        let loss = self.heads_impl(HeadMode::Table)?;
        // Positions grouped by target word.
        let tb = self.ws.steps * self.ws.batch;
        let mut order: Vec<u32> = (0..tb as u32).collect();
        let words = &self.ws.words;
        order.sort_unstable_by_key(|&p| (words[p as usize], p));
        let mut groups: Vec<(u32, usize, usize)> = Vec::new(); // (word, start, end) in order
        let mut s = 0;
        while s < tb {
            let w = words[order[s] as usize];
            let mut e = s + 1;
            while e < tb && words[order[e] as usize] == w {
                e += 1;
            }
            groups.push((w, s, e));
            s = e;
        }
        let (rr, cc) = (d.rows, d.cols);
        let (zr, zc) = (&self.ws.zr, &self.ws.zc);
        let lr = Shared::new(&mut tables.lr);
        let lc = Shared::new(&mut tables.lc);
        let nt = self.team.threads();
        let order = &order;
        let groups = &groups;
        self.team.run(|tid, _| {
            let mut acc_r = vec![0f64; rr];
            let mut acc_c = vec![0f64; cc];
            for &(w, s, e) in &groups[part_range(groups.len(), nt, tid)] {
                acc_r.fill(0.0);
                acc_c.fill(0.0);
                for &p in &order[s..e] {
                    let p = p as usize;
                    for (a, &x) in acc_r.iter_mut().zip(&zr[p * rr..(p + 1) * rr]) {
                        *a += x.to_f64();
                    }
                    for (a, &x) in acc_c.iter_mut().zip(&zc[p * cc..(p + 1) * cc]) {
                        *a += x.to_f64();
                    }
                }
                let w = w as usize;
                // SAFETY: every word is in exactly one group, and groups are split
                // between threads, so table rows are written by one thread each.
                let (tr, tc) = unsafe {
                    (
                        lr.slice_mut(w * rr..(w + 1) * rr),
                        lc.slice_mut(w * cc..(w + 1) * cc),
                    )
                };
                for (t, a) in tr.iter_mut().zip(&acc_r) {
                    *t = (*t as f64 + a) as f32;
                }
                for (t, a) in tc.iter_mut().zip(&acc_c) {
                    *t = (*t as f64 + a) as f32;
                }
            }
        });
        for &(w, s, e) in groups {
            tables.counts[w as usize] += (e - s) as u64;
        }
        Ok(loss)
    }

    fn heads_impl(&mut self, mode: HeadMode<T>) -> Result<LossSums> {
        let grad_scale = match mode {
            HeadMode::Grad(s) => Some(s),
            _ => None,
        };
        let table_mode = matches!(mode, HeadMode::Table);
        let d = self.layout.dims;
        let l_top = d.layers - 1;
        if self.ws.pass.is_none() {
            return Err(Error::Backend("heads before input_forward".into()));
        }
        let (tt, bb) = (self.ws.steps, self.ws.batch);
        let (m, rr, cc) = (d.hidden, d.rows, d.cols);
        let (sb, tb) = (2 * tt * bb, tt * bb);
        let [wr_i, br_i, wc_i, bc_i] = self.layout.heads();
        let specs = &self.layout.specs;
        let (wr, br) = (
            &self.params[specs[wr_i].range()],
            &self.params[specs[br_i].range()],
        );
        let (wc, bc) = (
            &self.params[specs[wc_i].range()],
            &self.params[specs[bc_i].range()],
        );
        let (wr_t, wc_t) = (&self.shadow[wr_i], &self.shadow[wc_i]);
        let ws = &mut self.ws;
        let dropout = ws.dropout;
        let step = match ws.pass {
            Some(Pass::Train { step }) => step,
            _ => 0,
        };
        resize(&mut ws.zr, tb * rr);
        resize(&mut ws.zc, tb * cc);
        let want_grad = grad_scale.is_some();
        let lt = &mut ws.layers[l_top];
        if want_grad {
            resize(&mut lt.dh, sb * m);
        }
        let top_h = &lt.h;
        let dh = Shared::new(&mut lt.dh);
        let hd = Shared::new(&mut ws.hd);
        let mask = Shared::new(&mut ws.mask_top);
        let zr = Shared::new(&mut ws.zr);
        let zc = Shared::new(&mut ws.zc);
        let (tgt_r, tgt_c) = (&ws.tgt_r, &ws.tgt_c);
        let gr = Shared::new(&mut self.grads);
        let (gwr, gbr) = (specs[wr_i].range(), specs[br_i].range());
        let (gwc, gbc) = (specs[wc_i].range(), specs[bc_i].range());
        let nt = self.team.threads();
        let mut losses = vec![0f64; 2 * nt];
        let losses_sh = Shared::new(&mut losses);
        let rng = Philox::new(self.seed, Purpose::Dropout);
        let p_drop = self.dropout;
        let shard = self.shard;
        self.team.run(|tid, bar| {
            let pr = part_range(tb, nt, tid);
            // Top output after dropout (both parities of the own head rows).
            let top: *const T = if dropout {
                for par in 0..2 {
                    let r = par * tb + pr.start..par * tb + pr.end;
                    // SAFETY: own rows of hd / mask.
                    let (hs, ms) = unsafe {
                        (
                            hd.slice_mut(r.start * m..r.end * m),
                            mask.slice_mut(r.start * m..r.end * m),
                        )
                    };
                    fill_mask(
                        &rng,
                        step * 64 + d.layers as u64,
                        r.clone(),
                        m,
                        bb,
                        shard,
                        p_drop,
                        ms,
                    );
                    hs.copy_from_slice(&top_h[r.start * m..r.end * m]);
                    simd::mul_assign(hs, ms);
                }
                hd.ptr()
            } else {
                top_h.as_ptr()
            };
            let he = top; // [TB, m] even steps
            let ho = top.wrapping_add(tb * m); // [TB, m] odd steps
            // Logits and the fused softmax for the own head rows.
            let n_r = pr.len();
            // SAFETY: own rows of zr / zc; he / ho rows of this thread are complete (written above by this thread).
            unsafe {
                gemm(
                    n_r,
                    rr,
                    m,
                    zr.ptr().add(pr.start * rr),
                    rr,
                    false,
                    Mat::rows_ptr(he.add(pr.start * m), m),
                    Mat::rows(wr_t, rr),
                );
                gemm(
                    n_r,
                    cc,
                    m,
                    zc.ptr().add(pr.start * cc),
                    cc,
                    false,
                    Mat::rows_ptr(ho.add(pr.start * m), m),
                    Mat::rows(wc_t, cc),
                );
                let zr_rows = zr.slice_mut(pr.start * rr..pr.end * rr);
                let zc_rows = zc.slice_mut(pr.start * cc..pr.end * cc);
                let (lr, lc) = if table_mode {
                    (
                        simd::neg_log_softmax(zr_rows, rr, br, &tgt_r[pr.clone()]),
                        simd::neg_log_softmax(zc_rows, cc, bc, &tgt_c[pr.clone()]),
                    )
                } else {
                    (
                        simd::softmax_nll(zr_rows, rr, br, &tgt_r[pr.clone()], grad_scale, &mut []),
                        simd::softmax_nll(zc_rows, cc, bc, &tgt_c[pr.clone()], grad_scale, &mut []),
                    )
                };
                losses_sh
                    .slice_mut(2 * tid..2 * tid + 2)
                    .copy_from_slice(&[lr, lc]);
            }
            if !want_grad {
                return;
            }
            bar.wait(); // all of dZ is written; hd complete
            // Output-layer gradients, split over the output rows.
            for (z, width, gw, gb, inp) in [(zr, rr, &gwr, &gbr, he), (zc, cc, &gwc, &gbc, ho)] {
                let or = part_range(width, nt, tid);
                if or.is_empty() {
                    continue;
                }
                // SAFETY: own rows of the weight gradient and own entries of the bias gradient.
                unsafe {
                    let zt = Mat::rows_ptr(z.ptr() as *const T, width)
                        .at(0, or.start)
                        .t(); // [|or|, TB]
                    gemm(
                        or.len(),
                        m,
                        tb,
                        gr.ptr().add(gw.start + or.start * m),
                        m,
                        false,
                        zt,
                        Mat::rows_ptr(inp, m),
                    );
                    let gbias = gr.slice_mut(gb.start + or.start..gb.start + or.end);
                    gbias.fill(T::ZERO);
                    for t in 0..tb {
                        simd::add_assign(gbias, z.slice(t * width + or.start..t * width + or.end));
                    }
                }
            }
            // d loss / d top output for the own head rows.
            // SAFETY: own rows of dh (both parities); dZ complete after the barrier.
            unsafe {
                gemm(
                    n_r,
                    m,
                    rr,
                    dh.ptr().add(pr.start * m),
                    m,
                    false,
                    Mat::rows_ptr(zr.ptr().add(pr.start * rr), rr),
                    Mat::rows(wr, m),
                );
                gemm(
                    n_r,
                    m,
                    cc,
                    dh.ptr().add((tb + pr.start) * m),
                    m,
                    false,
                    Mat::rows_ptr(zc.ptr().add(pr.start * cc), cc),
                    Mat::rows(wc, m),
                );
                if dropout {
                    for par in 0..2 {
                        let r = par * tb + pr.start..par * tb + pr.end;
                        simd::mul_assign(
                            dh.slice_mut(r.start * m..r.end * m),
                            mask.slice(r.start * m..r.end * m),
                        );
                    }
                }
            }
        });
        ws.have_head_grads = want_grad;
        let mut out = LossSums {
            row: 0.0,
            col: 0.0,
            words: tb as u64,
        };
        for k in 0..nt {
            out.row += losses[2 * k];
            out.col += losses[2 * k + 1];
        }
        Ok(out)
    }

    /// Backward pass of LSTM layer `l`: consumes d loss / d h of this layer, writes the
    /// gradients of its weights and d loss / d h of the layer below; layer 0 writes the
    /// gradient of the input tables [X_r; X_c].
    pub fn lstm_backward(&mut self, l: usize) -> Result<()> {
        let d = self.layout.dims;
        if l >= d.layers {
            return Err(Error::Shape(format!(
                "layer {l} of a {}-layer model",
                d.layers
            )));
        }
        if !self.ws.have_head_grads {
            return Err(Error::Backend(
                "lstm_backward without a gradient from the heads".into(),
            ));
        }
        let (tt, bb) = (self.ws.steps, self.ws.batch);
        let (m, m4, inp) = (d.hidden, 4 * d.hidden, d.layer_input(l));
        let (s_n, sb) = (2 * tt, 2 * tt * bb);
        let lp = self.layout.layer(l);
        let specs = &self.layout.specs;
        let w_ih = &self.params[specs[lp.w_ih].range()];
        let w_hh = &self.params[specs[lp.w_hh].range()];
        let (gw_ih, gw_hh) = (specs[lp.w_ih].range(), specs[lp.w_hh].range());
        let (gb_ih, gb_hh) = (specs[lp.b_ih].range(), specs[lp.b_hh].range());
        let g_table = self.layout.input_table();
        let ws = &mut self.ws;
        let dropout = ws.dropout;
        let table_mode = l == 0 && !dropout;
        let (below, above) = ws.layers.split_at_mut(l);
        let lw = &mut above[0];
        if l > 0 {
            resize(&mut below[l - 1].dh, sb * m);
        }
        let lower_h: &[T] = if l > 0 { &below[l - 1].h } else { &[] };
        let dh_lower = if l > 0 {
            Shared::new(&mut below[l - 1].dh)
        } else {
            Shared::new(&mut [][..])
        };
        let u_n = ws.uniq.len();
        if table_mode {
            resize(&mut ws.dsum, u_n * m4);
            resize(&mut ws.dxu, u_n * inp);
        }
        let (ids, slot, uniq, xu) = (&ws.ids, &ws.slot, &ws.uniq, &ws.xu);
        let (h0, c0) = (
            &ws.h0[l * bb * m..(l + 1) * bb * m],
            &ws.c0[l * bb * m..(l + 1) * bb * m],
        );
        let g = Shared::new(&mut lw.g);
        let (c, tc, h, dh) = (&lw.c, &lw.tc, &lw.h, &lw.dh);
        let xin = Shared::new(&mut lw.xin);
        let mask = &lw.mask;
        let dsum = Shared::new(&mut ws.dsum);
        let dxu = Shared::new(&mut ws.dxu);
        let gr = Shared::new(&mut self.grads);
        if l == 0 {
            // SAFETY: not yet shared with any thread.
            unsafe { gr.slice_mut(g_table.clone()) }.fill(T::ZERO);
        }
        let mut dh_rec_buf = vec![T::ZERO; bb * m];
        let dh_rec = Shared::new(&mut dh_rec_buf);
        let nt = self.team.threads();
        let units = split_units(m, nt);
        self.team.run(|tid, bar| {
            let u = units[tid].clone();
            let rows = 4 * u.start..4 * u.end;
            let (nu, nr) = (u.len(), rows.len());
            let mut dc = vec![T::ZERO; bb * nu];
            // 1. Backward through time, one barrier per step.
            for s in (0..s_n).rev() {
                let r0 = row_of(tt, bb, s, 0);
                if nu > 0 {
                    for b in 0..bb {
                        let r = r0 + b;
                        let cprev: &[T] = if s == 0 {
                            &c0[b * m + u.start..b * m + u.end]
                        } else {
                            let rp = row_of(tt, bb, s - 1, b);
                            &c[rp * m + u.start..rp * m + u.end]
                        };
                        // SAFETY: own gate rows of storage row r and own columns of dh_rec.
                        unsafe {
                            let rec: &[T] = if s + 1 == s_n {
                                &[]
                            } else {
                                dh_rec.slice(b * m + u.start..b * m + u.end)
                            };
                            simd::cell_backward(
                                m,
                                u.clone(),
                                g.slice_mut(r * m4 + rows.start..r * m4 + rows.end),
                                &dh[r * m + u.start..r * m + u.end],
                                rec,
                                cprev,
                                &tc[r * m + u.start..r * m + u.end],
                                &mut dc[b * nu..(b + 1) * nu],
                            );
                        }
                    }
                }
                bar.wait(); // dG of step s complete
                if s > 0 && nu > 0 {
                    // dh_rec[:, own] = dG_s [B, 4m] · W_hh[:, own]
                    // SAFETY: own columns of dh_rec; dG_s is complete and read-only now.
                    unsafe {
                        gemm(
                            bb,
                            nu,
                            m4,
                            dh_rec.ptr().add(u.start),
                            m,
                            false,
                            Mat::rows_ptr(g.ptr().add(r0 * m4), m4),
                            Mat::rows(w_hh, m).at(0, u.start),
                        );
                    }
                }
            }
            // 2. Weight and bias gradients of the own gate rows.
            if nr > 0 {
                let dgt = |r: usize| {
                    Mat::rows_ptr(g.ptr().wrapping_add(r * m4 + rows.start) as *const T, m4).t()
                }; // [nr, K]
                let gdst = |range: &std::ops::Range<usize>, width: usize| {
                    gr.ptr().wrapping_add(range.start + rows.start * width)
                };
                // SAFETY: own rows of the gradients; g, h, inputs read-only after the barrier.
                unsafe {
                    // dW_hh = sum_s dG_s^T h_{s-1}: even steps t read h0 (t = 0) or the odd step
                    // t - 1; odd steps t read the even step t.
                    gemm(
                        nr,
                        m,
                        bb,
                        gdst(&gw_hh, m),
                        m,
                        false,
                        dgt(row_of(tt, bb, 0, 0)),
                        Mat::rows(h0, m),
                    );
                    if tt > 1 {
                        gemm(
                            nr,
                            m,
                            (tt - 1) * bb,
                            gdst(&gw_hh, m),
                            m,
                            true,
                            dgt(row_of(tt, bb, 2, 0)),
                            Mat::rows(&h[row_of(tt, bb, 1, 0) * m..], m),
                        );
                    }
                    gemm(
                        nr,
                        m,
                        tt * bb,
                        gdst(&gw_hh, m),
                        m,
                        true,
                        dgt(row_of(tt, bb, 1, 0)),
                        Mat::rows(&h[row_of(tt, bb, 0, 0) * m..], m),
                    );
                    // Biases: both receive the column sums of dG.
                    let db = gr.slice_mut(gb_ih.start + rows.start..gb_ih.start + rows.end);
                    db.fill(T::ZERO);
                    for r in 0..sb {
                        simd::add_assign(db, g.slice(r * m4 + rows.start..r * m4 + rows.end));
                    }
                    let db: Vec<T> = db.to_vec();
                    gr.slice_mut(gb_hh.start + rows.start..gb_hh.start + rows.end)
                        .copy_from_slice(&db);
                    if table_mode {
                        // dG summed per distinct input row, then dW_ih = dsum^T · xu.
                        for k in 0..u_n {
                            dsum.slice_mut(k * m4 + rows.start..k * m4 + rows.end)
                                .fill(T::ZERO);
                        }
                        for (r, &sl) in slot[..sb].iter().enumerate() {
                            let k = sl as usize * m4;
                            simd::add_assign(
                                dsum.slice_mut(k + rows.start..k + rows.end),
                                g.slice(r * m4 + rows.start..r * m4 + rows.end),
                            );
                        }
                        let dst = Mat::rows_ptr(dsum.ptr().add(rows.start) as *const T, m4).t(); // [nr, U]
                        gemm(
                            nr,
                            inp,
                            u_n,
                            gdst(&gw_ih, inp),
                            inp,
                            false,
                            dst,
                            Mat::rows(xu, inp),
                        );
                    } else {
                        let x: *const T = if dropout { xin.ptr() } else { lower_h.as_ptr() };
                        gemm(
                            nr,
                            inp,
                            sb,
                            gdst(&gw_ih, inp),
                            inp,
                            false,
                            dgt(0),
                            Mat::rows_ptr(x, inp),
                        );
                    }
                }
            }
            bar.wait(); // every dG, dsum and weight-gradient product is done
            // 3. Gradient of the layer input.
            if l > 0 {
                let pr = part_range(sb, nt, tid);
                // SAFETY: own rows of dh_lower.
                unsafe {
                    gemm(
                        pr.len(),
                        inp,
                        m4,
                        dh_lower.ptr().add(pr.start * inp),
                        inp,
                        false,
                        Mat::rows_ptr(g.ptr().add(pr.start * m4), m4),
                        Mat::rows(w_ih, inp),
                    );
                    if dropout {
                        simd::mul_assign(
                            dh_lower.slice_mut(pr.start * inp..pr.end * inp),
                            &mask[pr.start * inp..pr.end * inp],
                        );
                    }
                }
            } else if table_mode {
                let pu = part_range(u_n, nt, tid);
                // SAFETY: own rows of dxu; the ids in uniq are distinct, so the rows of the
                // table gradient this thread adds to are its own.
                unsafe {
                    gemm(
                        pu.len(),
                        inp,
                        m4,
                        dxu.ptr().add(pu.start * inp),
                        inp,
                        false,
                        Mat::rows_ptr(dsum.ptr().add(pu.start * m4), m4),
                        Mat::rows(w_ih, inp),
                    );
                    for k in pu {
                        let id = uniq[k] as usize;
                        let dst =
                            gr.slice_mut(g_table.start + id * inp..g_table.start + (id + 1) * inp);
                        simd::add_assign(dst, dxu.slice(k * inp..(k + 1) * inp));
                    }
                }
            } else {
                // Dense layer 0 (input dropout): columns split, written over xin (no longer
                // needed), masked, then scattered into the table gradient by id.
                let pc = part_range(inp, nt, tid);
                if !pc.is_empty() {
                    // SAFETY: own columns of xin and of the table gradient.
                    unsafe {
                        gemm(
                            sb,
                            pc.len(),
                            m4,
                            xin.ptr().add(pc.start),
                            inp,
                            false,
                            Mat::rows_ptr(g.ptr(), m4),
                            Mat::rows(w_ih, inp).at(0, pc.start),
                        );
                        for r in 0..sb {
                            let xr = xin.slice_mut(r * inp + pc.start..r * inp + pc.end);
                            simd::mul_assign(xr, &mask[r * inp + pc.start..r * inp + pc.end]);
                            let id = ids[r] as usize;
                            let dst = gr.slice_mut(
                                g_table.start + id * inp + pc.start
                                    ..g_table.start + id * inp + pc.end,
                            );
                            simd::add_assign(dst, xr);
                        }
                    }
                }
            }
        });
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

/// Storage row of step `s` of stream `b` in a batch of `tt` words x `bb` streams.
#[inline(always)]
pub fn row_of(tt: usize, bb: usize, s: usize, b: usize) -> usize {
    (((s & 1) * tt) + (s >> 1)) * bb + b
}
