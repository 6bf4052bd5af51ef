//! The CUDA backend's device work of a pass, written once over the [`Device`] layer and
//! issued without a host wait: [`DevPass`], one group's pass, whose methods are named after
//! the [`crate::Backend`] calls they serve (`input_forward`: a group's inputs uploaded from
//! page-locked staging in one copy, the layer-0 gather and the start state; `lstm_forward`:
//! per layer one input-projection GEMM over all 2T steps, per step one recurrent GEMM and
//! one fused cell kernel; `heads`: GEMMs over all positions with the fused log-softmax;
//! `lstm_backward`: the layers in reverse), a training step's groups with their pairwise
//! gradient sum, and running a step's [`Work`]. Everything that changes from step to step
//! is read from device memory (the `knob` slots, the inputs), never passed as a launch
//! argument, so the same work captured once as a CUDA graph replays every step
//! ([`CudaBackend::run_work`]: replayed, captured, or plain launches where a capture
//! fails). GEMMs are column-major (cuBLAS): a row-major [M, N] matrix is a column-major
//! N x M one with leading dimension N.
//!
//! [`Device`]: super::layer::Device

use super::CudaBackend;
use super::buffers::{THREADS, add_assign, grid_for, pad4, u32_arg};
use super::layer::{Arg, Gemm, Graph};
use super::work::{Cx, TrainWork, Work};
use super::workspace::{BATCH_HEAD, HeadMode, knob};
use crate::layout::row_of;
use crate::rng::{Philox, Purpose};
use crate::{Error, Result};

/// Row-major Y[rows, cols] (+)= X[rows, inner] W^T with W [cols, inner] row-major.
fn xwt(rows: usize, cols: usize, inner: usize, x: u64, w: u64, y: (u64, usize), beta: f32) -> Gemm {
    Gemm {
        trans_a: true,
        trans_b: false,
        m: cols,
        n: rows,
        k: inner,
        alpha: 1.0,
        a: w,
        lda: inner,
        b: x,
        ldb: inner,
        beta,
        c: y.0,
        ldc: y.1,
    }
}

/// Row-major Y[rows, cols] = D[rows, inner] W with W [inner, cols] row-major: D's rows
/// `ldd` apart, W's `ldw`.
fn dw(rows: usize, cols: usize, inner: usize, d: (u64, usize), w: (u64, usize), y: u64) -> Gemm {
    Gemm {
        trans_a: false,
        trans_b: false,
        m: cols,
        n: rows,
        k: inner,
        alpha: 1.0,
        a: w.0,
        lda: w.1,
        b: d.0,
        ldb: d.1,
        beta: 0.0,
        c: y,
        ldc: cols,
    }
}

/// A bias gradient: row-major G[1, cols] = ones[1, k] D[k, cols], D's rows `ldd` apart.
fn col_sums(cols: usize, k: usize, ones: u64, d: (u64, usize), g: u64) -> Gemm {
    Gemm {
        trans_a: false,
        trans_b: false,
        m: cols,
        n: 1,
        k,
        alpha: 1.0,
        a: d.0,
        lda: d.1,
        b: ones,
        ldb: pad4(k),
        beta: 0.0,
        c: g,
        ldc: pad4(cols),
    }
}

/// Row-major G[outs, ins] (+)= D^T X: D [k, outs] (rows `ldd` apart), X [k, ins]
/// row-major (weight gradients).
fn dtx(outs: usize, ins: usize, k: usize, d: (u64, usize), x: u64, g: u64, beta: f32) -> Gemm {
    Gemm {
        trans_a: false,
        trans_b: true,
        m: ins,
        n: outs,
        k,
        alpha: 1.0,
        a: x,
        lda: ins,
        b: d.0,
        ldb: d.1,
        beta,
        c: g,
        ldc: ins,
    }
}

/// One pass of the device work: the backend it runs on and the group it runs ([`Cx`]).
pub(super) struct DevPass<'a> {
    be: &'a CudaBackend,
    cx: Cx,
}

impl CudaBackend {
    /// The device work of pass `cx`.
    pub(super) fn pass(&self, cx: Cx) -> DevPass<'_> {
        DevPass { be: self, cx }
    }

    /// The batch's device scalars, from the staging to their slots.
    pub(super) fn upload_batch_knobs(&self) -> Result<()> {
        let ws = self.ws()?;
        let n = knob::BATCH.len();
        self.dev.upload_async(
            self.knobs.at(knob::BATCH.start),
            &ws.staging.batch,
            0,
            8 * n,
        )?;
        ws.staging.batch_busy.set(true);
        Ok(())
    }

    /// buffer a += buffer b over the device layout.
    fn add_grads(&self, (a, b): (usize, usize)) -> Result<()> {
        let (x, y) = (self.grad_buf(a)?, self.grad_buf(b)?);
        add_assign(self.dev(), x.arg(0), y.arg(0), self.dl.total)
    }

    /// A training step's forward and backward: every group's pass, the gradients summed
    /// pairwise into the backend's gradient buffer.
    pub(super) fn train_body(&self, w: &TrainWork) -> Result<()> {
        self.upload_batch_knobs()?;
        for (cx, adds) in &w.groups {
            self.pass(*cx).forward_backward()?;
            if !adds.is_empty() {
                self.mark(|| "grad_sum".into())?;
            }
            for &a in adds {
                self.add_grads(a)?;
            }
        }
        if !w.finish.is_empty() {
            self.mark(|| "grad_sum".into())?;
        }
        for &a in &w.finish {
            self.add_grads(a)?;
        }
        Ok(())
    }
}

impl DevPass<'_> {
    /// out = in * dropout mask over `rows` x `width` at site step * 64 + `site_off` (the
    /// step's part from the `SITE` slot; keyed as the CPU's).
    fn dropout(&self, out: u64, inp: u64, rows: usize, width: usize, site_off: u64) -> Result<()> {
        let be = self.be;
        let cx = &self.cx;
        let p = be.dropout;
        let rng = Philox::new(be.seed, Purpose::Dropout);
        let key = rng.key();
        let threshold = (p * 4_294_967_296.0).min(4_294_967_295.0) as u32;
        let keep = (1.0 / (1.0 - p)) as f32;
        let bb = be.ws()?.batch;
        let (offset, global) = cx.keyed.unwrap_or((0, bb));
        be.launch(
            "dropout_apply",
            grid_for(rows * width),
            THREADS,
            &[
                Arg::Ptr(out),
                Arg::Ptr(inp),
                u32_arg(rows, "rows")?,
                u32_arg(width, "width")?,
                Arg::U32(key[0]),
                Arg::U32(key[1]),
                be.knobs.arg(knob::SITE),
                Arg::U64(site_off),
                u32_arg(bb, "batch")?,
                u32_arg(offset, "stream offset")?,
                u32_arg(global, "global batch")?,
                Arg::U32(threshold),
                Arg::F32(keep),
            ],
        )
    }

    /// A group's start: its inputs uploaded, its start state, the layer-0 gather.
    pub(super) fn input_forward(&self) -> Result<()> {
        let be = self.be;
        let cx = &self.cx;
        let d = be.layout.dims;
        let ws = be.ws()?;
        let (tt, bb, io) = (ws.steps, ws.batch, ws.layout);
        let r = cx.region * io.region;
        be.dev.upload_async(
            ws.inputs.at(r),
            &ws.staging.batch,
            BATCH_HEAD + 4 * r,
            4 * io.region,
        )?;
        ws.staging.batch_busy.set(true);
        let st = be
            .states
            .get(&cx.stream)
            .ok_or_else(|| Error::Backend(format!("no state for {:?}", cx.stream)))?;
        let n_state = d.layers * bb * d.hidden;
        ws.h0.copy_from(be.dev(), 0, &st.h, 0, n_state)?;
        ws.c0.copy_from(be.dev(), 0, &st.c, 0, n_state)?;
        let sb = 2 * tt * bb;
        be.launch(
            "gather_rows",
            grid_for(sb * d.emb),
            THREADS,
            &[
                ws.layers[0].x.arg(0),
                be.params.arg(be.dl.input_table()),
                ws.inputs.arg(r + io.ids),
                u32_arg(sb, "rows")?,
                u32_arg(d.emb, "emb")?,
            ],
        )
    }

    /// The input of layer `l` as its GEMMs read it: [SB, in].
    fn layer_input(&self, l: usize) -> Result<u64> {
        let be = self.be;
        let cx = &self.cx;
        let ws = be.ws()?;
        Ok(if l == 0 || cx.train {
            ws.layers[l].x.at(0)
        } else {
            ws.layers[l - 1].h.at(0)
        })
    }

    /// Layer `l` forward over the 2T steps; carries the final state.
    pub(super) fn lstm_forward(&self, l: usize) -> Result<()> {
        let be = self.be;
        let cx = &self.cx;
        let d = be.layout.dims;
        let ws = be.ws()?;
        let (tt, bb, m, inp) = (ws.steps, ws.batch, d.hidden, d.layer_input(l));
        let sb = 2 * tt * bb;
        let lp = be.layout.layer(l);
        let spec = |i: usize| be.params.at(be.off(i));
        let lw = &ws.layers[l];
        if cx.train {
            let src = if l == 0 {
                lw.x.at(0)
            } else {
                ws.layers[l - 1].h.at(0)
            };
            self.dropout(lw.x.at(0), src, sb, inp, l as u64)?;
        }
        let x = self.layer_input(l)?;
        let dev = be.dev();
        // All 2T input projections in one GEMM: G = X W_ih^T.
        dev.gemm(&xwt(
            sb,
            4 * m,
            inp,
            x,
            spec(lp.w_ih),
            (lw.g.at(0), 4 * m),
            0.0,
        ))?;
        let state0 = l * bb * m;
        for s in 0..2 * tt {
            let r0 = row_of(tt, bb, s, 0);
            let (hprev, cprev) = if s == 0 {
                (ws.h0.at(state0), ws.c0.at(state0))
            } else {
                let rp = row_of(tt, bb, s - 1, 0);
                (lw.h.at(rp * m), lw.c.at(rp * m))
            };
            dev.gemm(&xwt(
                bb,
                4 * m,
                m,
                hprev,
                spec(lp.w_hh),
                (lw.g.at(r0 * 4 * m), 4 * m),
                1.0,
            ))?;
            be.launch(
                "lstm_cell_forward",
                grid_for(bb * m),
                THREADS,
                &[
                    lw.g.arg(r0 * 4 * m),
                    Arg::Ptr(spec(lp.b_ih)),
                    Arg::Ptr(spec(lp.b_hh)),
                    Arg::Ptr(cprev),
                    lw.c.arg(r0 * m),
                    lw.tc.arg(r0 * m),
                    lw.h.arg(r0 * m),
                    u32_arg(bb, "batch")?,
                    u32_arg(m, "hidden")?,
                ],
            )?;
        }
        // Carry the last step's h and c (B contiguous rows) to the stream's next batch.
        let last = row_of(tt, bb, 2 * tt - 1, 0) * m;
        let st = be
            .states
            .get(&cx.stream)
            .ok_or_else(|| Error::Backend(format!("no state for {:?}", cx.stream)))?;
        st.h.copy_from(dev, state0, &lw.h, last, bb * m)?;
        st.c.copy_from(dev, state0, &lw.c, last, bb * m)
    }

    /// Row and column heads: logits, fused log-softmax + NLL, the two loss sums into the
    /// results at `cx.loss_at` and, with gradients, the output layers' gradients and
    /// d loss / d top output.
    pub(super) fn heads(&self, mode: HeadMode) -> Result<()> {
        let be = self.be;
        let cx = &self.cx;
        let d = be.layout.dims;
        let ws = be.ws()?;
        let (tt, bb, m, rr, cc) = (ws.steps, ws.batch, d.hidden, d.rows, d.cols);
        let (sb, tb) = (2 * tt * bb, tt * bb);
        let [wr, br, wc, bc] = be.layout.heads().map(|i| be.off(i));
        let top = &ws.layers[d.layers - 1];
        let site = d.layers as u64;
        if cx.train {
            self.dropout(ws.hd.at(0), top.h.at(0), sb, m, site)?;
        }
        let ht = if cx.train { &ws.hd } else { &top.h };
        let dev = be.dev();
        let p = |i: usize| be.params.at(i);
        dev.gemm(&xwt(tb, rr, m, ht.at(0), p(wr), (ws.zr.at(0), ws.ldr), 0.0))?;
        dev.gemm(&xwt(
            tb,
            cc,
            m,
            ht.at(tb * m),
            p(wc),
            (ws.zc.at(0), ws.ldc),
            0.0,
        ))?;
        let code = match mode {
            HeadMode::Loss => 0,
            HeadMode::Grad => 1,
            HeadMode::Table => 2,
        };
        let r = cx.region * ws.layout.region;
        for (z, ld, bias, tgt, width, off) in [
            (&ws.zr, ws.ldr, br, ws.layout.tgt_r, rr, 0),
            (&ws.zc, ws.ldc, bc, ws.layout.tgt_c, cc, tb),
        ] {
            be.launch(
                "softmax_nll",
                [u32_arg(tb, "head rows")?.slot() as u32, 1, 1],
                256,
                &[
                    z.arg(0),
                    Arg::Ptr(p(bias)),
                    ws.inputs.arg(r + tgt),
                    ws.loss_rows.arg(off),
                    u32_arg(width, "table side")?,
                    u32_arg(ld, "logit row")?,
                    be.knobs.arg(knob::SCALE),
                    Arg::U32(code),
                ],
            )?;
        }
        be.launch(
            "sum_f64",
            [2, 1, 1],
            THREADS,
            &[
                ws.results.arg(cx.loss_at),
                ws.loss_rows.arg(0),
                u32_arg(tb, "head rows")?,
            ],
        )?;
        if mode != HeadMode::Grad {
            return Ok(());
        }
        let gb = be.grad_buf(cx.slot)?;
        for (z, ld, w, b, width, hoff) in [
            (&ws.zr, ws.ldr, wr, br, rr, 0),
            (&ws.zc, ws.ldc, wc, bc, cc, tb * m),
        ] {
            dev.gemm(&dtx(
                width,
                m,
                tb,
                (z.at(0), ld),
                ht.at(hoff),
                gb.at(w),
                0.0,
            ))?;
            dev.gemm(&col_sums(width, tb, ws.ones.at(0), (z.at(0), ld), gb.at(b)))?;
            dev.gemm(&dw(tb, m, width, (z.at(0), ld), (p(w), m), top.dh.at(hoff)))?;
        }
        if cx.train {
            self.dropout(top.dh.at(0), top.dh.at(0), sb, m, site)?;
        }
        Ok(())
    }

    /// Layer `l` backward: through time, then its weight and bias gradients, then the
    /// gradient of its input (the layer below's d loss / d h, or the input tables').
    pub(super) fn lstm_backward(&self, l: usize) -> Result<()> {
        let be = self.be;
        let cx = &self.cx;
        let d = be.layout.dims;
        let x = self.layer_input(l)?;
        let ws = be.ws()?;
        let (tt, bb, m, inp) = (ws.steps, ws.batch, d.hidden, d.layer_input(l));
        let (sb, tb, m4) = (2 * tt * bb, tt * bb, 4 * d.hidden);
        let lp = be.layout.layer(l);
        let gb = be.grad_buf(cx.slot)?;
        let (p, g) = (
            |i: usize| be.params.at(be.off(i)),
            |i: usize| gb.at(be.off(i)),
        );
        let lw = &ws.layers[l];
        let dev = be.dev();
        let state0 = l * bb * m;
        ws.dc.zero(dev, 0, bb * m)?;
        for s in (0..2 * tt).rev() {
            let r0 = row_of(tt, bb, s, 0);
            let cprev = if s == 0 {
                ws.c0.at(state0)
            } else {
                lw.c.at(row_of(tt, bb, s - 1, 0) * m)
            };
            be.launch(
                "lstm_cell_backward",
                grid_for(bb * m),
                THREADS,
                &[
                    lw.g.arg(r0 * m4),
                    lw.dh.arg(r0 * m),
                    ws.dh_rec.arg(0),
                    Arg::U32((s + 1 < 2 * tt) as u32),
                    Arg::Ptr(cprev),
                    lw.tc.arg(r0 * m),
                    ws.dc.arg(0),
                    u32_arg(bb, "batch")?,
                    u32_arg(m, "hidden")?,
                ],
            )?;
            if s > 0 {
                // dh_rec [B, m] = dG_s [B, 4m] W_hh [4m, m].
                dev.gemm(&dw(
                    bb,
                    m,
                    m4,
                    (lw.g.at(r0 * m4), m4),
                    (p(lp.w_hh), m),
                    ws.dh_rec.at(0),
                ))?;
            }
        }
        // dW_hh = sum_s dG_s^T h_{s-1}: even steps 2t read h0 (t = 0) or the odd step
        // 2t - 1 (rows TB + (t - 1) B), odd steps 2t + 1 read the even step 2t.
        dev.gemm(&dtx(
            m4,
            m,
            bb,
            (lw.g.at(0), m4),
            ws.h0.at(state0),
            g(lp.w_hh),
            0.0,
        ))?;
        if tt > 1 {
            dev.gemm(&dtx(
                m4,
                m,
                (tt - 1) * bb,
                (lw.g.at(bb * m4), m4),
                lw.h.at(tb * m),
                g(lp.w_hh),
                1.0,
            ))?;
        }
        dev.gemm(&dtx(
            m4,
            m,
            tb,
            (lw.g.at(tb * m4), m4),
            lw.h.at(0),
            g(lp.w_hh),
            1.0,
        ))?;
        dev.gemm(&dtx(m4, inp, sb, (lw.g.at(0), m4), x, g(lp.w_ih), 0.0))?;
        // Both biases receive the column sums of dG: ones[1, SB] dG (one GEMM).
        dev.gemm(&col_sums(
            m4,
            sb,
            ws.ones.at(0),
            (lw.g.at(0), m4),
            g(lp.b_ih),
        ))?;
        gb.copy_from(dev, be.off(lp.b_hh), gb, be.off(lp.b_ih), m4)?;
        // The gradient of the layer's input: the layer below's d loss / d h, or (layer 0)
        // the gathered rows' gradient, which the scatter below sums into the tables.
        let below = if l > 0 {
            ws.layers[l - 1].dh.at(0)
        } else {
            ws.dx.at(0)
        };
        dev.gemm(&dw(sb, inp, m4, (lw.g.at(0), m4), (p(lp.w_ih), inp), below))?;
        if cx.train {
            self.dropout(below, below, sb, inp, l as u64)?;
        }
        if l > 0 {
            return Ok(());
        }
        let table = be.dl.input_table();
        gb.zero(dev, table, d.input_rows() * d.emb)?;
        let io = ws.layout;
        let r = cx.region * io.region;
        be.launch(
            "scatter_rows",
            [
                u32_arg(io.uniq_cap.clamp(1, 4096), "distinct input rows")?.slot() as u32,
                1,
                1,
            ],
            128,
            &[
                gb.arg(table),
                ws.dx.arg(0),
                ws.inputs.arg(r + io.uniq),
                ws.inputs.arg(r + io.starts),
                ws.inputs.arg(r + io.members),
                ws.inputs.arg(r + io.n_uniq),
                u32_arg(inp, "emb")?,
            ],
        )
    }

    /// One group's forward and backward with gradients.
    pub(super) fn forward_backward(&self) -> Result<()> {
        let be = self.be;
        be.mark(|| "input".into())?;
        self.input_forward()?;
        for l in 0..be.layout.dims.layers {
            be.mark(|| format!("forward/layer{l}"))?;
            self.lstm_forward(l)?;
        }
        be.mark(|| "heads".into())?;
        self.heads(HeadMode::Grad)?;
        for l in (0..be.layout.dims.layers).rev() {
            be.mark(|| format!("backward/layer{l}"))?;
            self.lstm_backward(l)?;
        }
        Ok(())
    }
}

impl CudaBackend {
    /// Issue `w`'s device work as plain launches.
    fn issue(&self, w: &Work) -> Result<()> {
        match w {
            Work::Train(t) => self.train_body(t),
            Work::Update(u) => self.update_body(u),
            Work::Step(t, u) => {
                self.train_body(t)?;
                self.update_body(u)
            }
        }
    }

    /// Run `w`: its graph replayed; plain launches the first time (cuBLAS and the
    /// kernels do their first-use set-up outside any capture), captured the second; plain
    /// launches always where graphs are off, or after a capture that failed (graphs stay
    /// off for this backend, with a warning naming the reason).
    pub(super) fn run_work(&self, w: &Work) -> Result<()> {
        // A traced step: plain launches between its timing marks (a graph runs whole).
        if self.profiler.tracing() || !self.graphs.enabled() || self.graphs.first_run(w) {
            return self.issue(w);
        }
        let launched = match self.graphs.launch(self.dev(), w) {
            Some(launched) => launched,
            None => match self.capture(w) {
                Ok(g) => self.graphs.insert_and_launch(self.dev(), w, g),
                Err(e) => {
                    tracing::warn!(device = %self.dev.name(), error = %e, "capturing the training step as a CUDA graph failed: plain launches from now on");
                    self.graphs.set_enabled(false);
                    return self.issue(w);
                }
            },
        };
        // A replay copies from the staging as the plain launches would.
        let ws = self.ws()?;
        if matches!(w, Work::Train(_) | Work::Step(..)) {
            ws.staging.batch_busy.set(true);
        }
        if matches!(w, Work::Update(_) | Work::Step(..)) {
            ws.staging.update_busy.set(true);
        }
        launched
    }

    /// `w` captured into a graph (nothing runs); the capture is ended whatever happens.
    fn capture(&self, w: &Work) -> Result<Graph> {
        self.dev.begin_capture()?;
        let issued = self.issue(w);
        let graph = self.dev.end_capture();
        issued?;
        let g = graph?;
        tracing::debug!(nodes = g.nodes, "training step captured as a CUDA graph");
        Ok(g)
    }
}
