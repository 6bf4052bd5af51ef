//! The CUDA backend's step, written once over the [`Device`] layer: batch preparation on the
//! host (word ids -> table ids, targets, the table gradient's scatter lists: one upload),
//! then per layer one input-projection GEMM over all 2T steps, per step one recurrent GEMM
//! and one fused cell kernel, the heads as GEMMs over all positions with the fused
//! log-softmax, and the backward pass in reverse; everything stays on the device between
//! steps. GEMMs are column-major (cuBLAS): a row-major [M, N] matrix is a column-major
//! N x M one with leading dimension N.

use super::CudaBackend;
use super::buffers::{Buf, THREADS, grid_for, u32_arg};
use super::layer::{Arg, Device, Gemm, Launch};
use super::workspace::HeadMode;
use crate::backend::{Batch, LossSums, Pass};
use crate::cpu::row_of;
use crate::rng::{Philox, Purpose};
use crate::{Error, Result};

/// Row-major Y[rows, cols] (+)= X[rows, inner] W^T with W [cols, inner] row-major.
#[allow(clippy::too_many_arguments)]
fn xwt(rows: usize, cols: usize, inner: usize, x: u64, w: u64, y: u64, beta: f32) -> Gemm {
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
        c: y,
        ldc: cols,
    }
}

/// Row-major Y[rows, cols] = D[rows, inner] W with W [inner, cols] row-major.
fn dw(rows: usize, cols: usize, inner: usize, d: u64, w: u64, y: u64) -> Gemm {
    Gemm {
        trans_a: false,
        trans_b: false,
        m: cols,
        n: rows,
        k: inner,
        alpha: 1.0,
        a: w,
        lda: cols,
        b: d,
        ldb: inner,
        beta: 0.0,
        c: y,
        ldc: cols,
    }
}

/// Row-major G[outs, ins] (+)= D^T X: D [k, outs], X [k, ins] row-major (weight gradients).
fn dtx(outs: usize, ins: usize, k: usize, d: u64, x: u64, g: u64, beta: f32) -> Gemm {
    Gemm {
        trans_a: false,
        trans_b: true,
        m: ins,
        n: outs,
        k,
        alpha: 1.0,
        a: x,
        lda: ins,
        b: d,
        ldb: outs,
        beta,
        c: g,
        ldc: ins,
    }
}

impl CudaBackend {
    fn dev(&self) -> &dyn Device {
        self.dev.as_ref()
    }

    fn launch(&self, kernel: &'static str, grid: [u32; 3], block: u32, args: &[Arg]) -> Result<()> {
        self.dev.launch(&Launch {
            kernel,
            grid,
            block: [block, 1, 1],
            args,
        })
    }

    /// out = in * dropout mask over `rows` x `width` (site keyed as the CPU's).
    pub(super) fn dropout(
        &self,
        out: u64,
        inp: u64,
        rows: usize,
        width: usize,
        site: u64,
    ) -> Result<()> {
        let p = self.dropout;
        let rng = Philox::new(self.seed, Purpose::Dropout);
        let key = rng.key();
        let threshold = (p * 4_294_967_296.0).min(4_294_967_295.0) as u32;
        let keep = (1.0 / (1.0 - p)) as f32;
        let bb = self.ws.as_ref().map_or(1, |w| w.batch);
        let (offset, global) = self.keyed.unwrap_or((0, bb));
        self.launch(
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
                Arg::U64(site),
                u32_arg(bb, "batch")?,
                u32_arg(offset, "stream offset")?,
                u32_arg(global, "global batch")?,
                Arg::U32(threshold),
                Arg::F32(keep),
            ],
        )
    }

    fn step_of(&self) -> u64 {
        match self.pass {
            Some(Pass::Train { step }) => step,
            _ => 0,
        }
    }

    fn training_dropout(&self) -> bool {
        matches!(self.pass, Some(Pass::Train { .. })) && self.dropout > 0.0
    }

    /// Map the batch to table ids and targets on the host, upload them once, gather the
    /// layer-0 input and load the start state.
    pub(super) fn prepare(&mut self, batch: &Batch<'_>, pass: Pass) -> Result<()> {
        let d = self.layout.dims;
        let (tt, bb) = (batch.steps, batch.batch);
        batch.check(d.vocab)?;
        if self
            .ws
            .as_ref()
            .is_none_or(|w| (w.steps, w.batch) != (tt, bb))
        {
            self.ws = None; // free the old shape's buffers before asking for the new ones
            self.ws = Some(super::workspace::Workspace::new(self.dev(), &d, tt, bb)?);
        }
        let (sb, tb, m, cols) = (2 * tt * bb, tt * bb, d.hidden, d.cols as u32);
        let h = &mut self.host;
        h.ids.resize(sb, 0);
        h.tgt_r.resize(tb, 0);
        h.tgt_c.resize(tb, 0);
        h.words.clear();
        h.words.extend_from_slice(batch.targets);
        for t in 0..tt {
            for b in 0..bb {
                let (cx, cy) = (
                    self.cells[batch.inputs[t * bb + b] as usize],
                    self.cells[batch.targets[t * bb + b] as usize],
                );
                h.ids[row_of(tt, bb, 2 * t, b)] = d.rows as u32 + cx % cols;
                h.ids[row_of(tt, bb, 2 * t + 1, b)] = cy / cols;
                h.tgt_r[t * bb + b] = cy / cols;
                h.tgt_c[t * bb + b] = cy % cols;
            }
        }
        // The table gradient's scatter lists: storage rows grouped by id (counting sort).
        let rows_n = d.input_rows();
        h.count.clear();
        h.count.resize(rows_n + 1, 0);
        for &id in &h.ids {
            h.count[id as usize + 1] += 1;
        }
        for i in 0..rows_n {
            h.count[i + 1] += h.count[i];
        }
        h.members.resize(sb, 0);
        h.fill.clear();
        h.fill.extend_from_slice(&h.count[..rows_n]);
        for (r, &id) in h.ids.iter().enumerate() {
            let slot = &mut h.fill[id as usize];
            h.members[*slot as usize] = r as u32;
            *slot += 1;
        }
        h.uniq.clear();
        h.starts.clear();
        for id in 0..rows_n {
            if h.count[id + 1] > h.count[id] {
                h.uniq.push(id as u32);
                h.starts.push(h.count[id]);
            }
        }
        h.starts.push(sb as u32);
        let ws = self
            .ws
            .as_ref()
            .ok_or_else(|| Error::Backend("no workspace".into()))?;
        let dev = self.dev.as_ref();
        ws.ids.upload(dev, 0, &h.ids)?;
        ws.tgt_r.upload(dev, 0, &h.tgt_r)?;
        ws.tgt_c.upload(dev, 0, &h.tgt_c)?;
        ws.uniq.upload(dev, 0, &h.uniq)?;
        ws.starts.upload(dev, 0, &h.starts)?;
        ws.members.upload(dev, 0, &h.members)?;
        // Start state.
        let n_state = d.layers * bb * m;
        match self.states.get(&batch.stream) {
            Some(st) if st.batch == bb => {
                ws.h0.copy_from(dev, 0, &st.h, 0, n_state)?;
                ws.c0.copy_from(dev, 0, &st.c, 0, n_state)?;
            }
            Some(st) => {
                return Err(Error::Shape(format!(
                    "stream {:?} carries state for {} streams, the batch has {bb} (reset it first)",
                    batch.stream, st.batch
                )));
            }
            None => {
                ws.h0.zero(dev, 0, n_state)?;
                ws.c0.zero(dev, 0, n_state)?;
            }
        }
        let table = self.params.at(self.layout.input_table().start);
        self.launch(
            "gather_rows",
            grid_for(sb * d.emb),
            THREADS,
            &[
                ws.layers[0].x.arg(0),
                Arg::Ptr(table),
                ws.ids.arg(0),
                u32_arg(sb, "rows")?,
                u32_arg(d.emb, "emb")?,
            ],
        )?;
        self.stream = batch.stream;
        self.pass = Some(pass);
        self.have_head_grads = false;
        Ok(())
    }

    /// The input of layer `l` as its GEMMs read it: [SB, in].
    fn layer_input(&self, l: usize) -> Result<u64> {
        let ws = self
            .ws
            .as_ref()
            .ok_or_else(|| Error::Backend("no batch".into()))?;
        Ok(if l == 0 || self.training_dropout() {
            ws.layers[l].x.at(0)
        } else {
            ws.layers[l - 1].h.at(0)
        })
    }

    /// Layer `l` forward over the 2T steps; carries the final state.
    pub(super) fn layer_forward(&mut self, l: usize) -> Result<()> {
        let d = self.layout.dims;
        if l >= d.layers {
            return Err(Error::Shape(format!(
                "layer {l} of a {}-layer model",
                d.layers
            )));
        }
        if self.pass.is_none() {
            return Err(Error::Backend("lstm_forward before input_forward".into()));
        }
        let ws = self
            .ws
            .as_ref()
            .ok_or_else(|| Error::Backend("no batch".into()))?;
        let (tt, bb, m, inp) = (ws.steps, ws.batch, d.hidden, d.layer_input(l));
        let sb = 2 * tt * bb;
        let lp = self.layout.layer(l);
        let spec = |i: usize| self.params.at(self.layout.specs[i].offset);
        let lw = &ws.layers[l];
        if self.training_dropout() {
            let src = if l == 0 {
                lw.x.at(0)
            } else {
                ws.layers[l - 1].h.at(0)
            };
            self.dropout(lw.x.at(0), src, sb, inp, self.step_of() * 64 + l as u64)?;
        }
        let x = self.layer_input(l)?;
        let ws = self
            .ws
            .as_ref()
            .ok_or_else(|| Error::Backend("no batch".into()))?;
        let lw = &ws.layers[l];
        let dev = self.dev.as_ref();
        // All 2T input projections in one GEMM: G = X W_ih^T.
        dev.gemm(&xwt(sb, 4 * m, inp, x, spec(lp.w_ih), lw.g.at(0), 0.0))?;
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
                lw.g.at(r0 * 4 * m),
                1.0,
            ))?;
            self.launch(
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
        if !self.states.contains_key(&self.stream) {
            let st = super::DevState {
                batch: bb,
                h: Buf::zeros(dev, d.layers * bb * m)?,
                c: Buf::zeros(dev, d.layers * bb * m)?,
            };
            self.states.insert(self.stream, st);
        }
        let st = &self.states[&self.stream];
        st.h.copy_from(dev, state0, &lw.h, last, bb * m)?;
        st.c.copy_from(dev, state0, &lw.c, last, bb * m)?;
        Ok(())
    }

    /// Row and column heads: logits, fused log-softmax + NLL and, with gradients, the
    /// output layers' gradients and d loss / d top output.
    pub(super) fn run_heads(&mut self, mode: HeadMode) -> Result<LossSums> {
        if self.pass.is_none() {
            return Err(Error::Backend("heads before input_forward".into()));
        }
        let d = self.layout.dims;
        let ws = self
            .ws
            .as_ref()
            .ok_or_else(|| Error::Backend("no batch".into()))?;
        let (tt, bb, m, rr, cc) = (ws.steps, ws.batch, d.hidden, d.rows, d.cols);
        let (sb, tb) = (2 * tt * bb, tt * bb);
        let [wr, br, wc, bc] = self.layout.heads().map(|i| self.layout.specs[i].offset);
        let top = &ws.layers[d.layers - 1];
        let dropout = self.training_dropout();
        let site = self.step_of() * 64 + d.layers as u64;
        if dropout {
            self.dropout(ws.hd.at(0), top.h.at(0), sb, m, site)?;
        }
        let ht = if dropout { &ws.hd } else { &top.h };
        let dev = self.dev.as_ref();
        let p = |i: usize| self.params.at(i);
        dev.gemm(&xwt(tb, rr, m, ht.at(0), p(wr), ws.zr.at(0), 0.0))?;
        dev.gemm(&xwt(tb, cc, m, ht.at(tb * m), p(wc), ws.zc.at(0), 0.0))?;
        let (code, scale) = match mode {
            HeadMode::Loss => (0, 0.0),
            HeadMode::Grad(s) => (1, s),
            HeadMode::Table => (2, 0.0),
        };
        for (z, bias, tgt, width, off) in [
            (&ws.zr, br, &ws.tgt_r, rr, 0),
            (&ws.zc, bc, &ws.tgt_c, cc, tb),
        ] {
            self.launch(
                "softmax_nll",
                [tb as u32, 1, 1],
                256,
                &[
                    z.arg(0),
                    Arg::Ptr(p(bias)),
                    tgt.arg(0),
                    ws.loss_rows.arg(off),
                    u32_arg(width, "table side")?,
                    Arg::F32(scale),
                    Arg::U32(code),
                ],
            )?;
        }
        self.launch(
            "sum_f64",
            [2, 1, 1],
            THREADS,
            &[
                self.scalars.arg(0),
                ws.loss_rows.arg(0),
                u32_arg(tb, "head rows")?,
            ],
        )?;
        let sums = self.scalars.download(dev, 0, 2)?;
        let loss = LossSums {
            row: sums[0],
            col: sums[1],
            words: tb as u64,
        };
        if let HeadMode::Grad(_) = mode {
            let g = |i: usize| self.grads.at(i);
            for (z, w, b, width, hoff, dhoff) in [
                (&ws.zr, wr, br, rr, 0, 0),
                (&ws.zc, wc, bc, cc, tb * m, tb * m),
            ] {
                dev.gemm(&dtx(width, m, tb, z.at(0), ht.at(hoff), g(w), 0.0))?;
                // The bias gradient: the column sums of dZ, as ones[1, TB] dZ.
                dev.gemm(&dw(1, width, tb, ws.ones.at(0), z.at(0), g(b)))?;
                dev.gemm(&dw(tb, m, width, z.at(0), p(w), top.dh.at(dhoff)))?;
            }
            if dropout {
                self.dropout(top.dh.at(0), top.dh.at(0), sb, m, site)?;
            }
            self.have_head_grads = true;
        }
        Ok(loss)
    }

    /// Layer `l` backward: through time, then its weight and bias gradients, then the
    /// gradient of its input (the layer below's d loss / d h, or the input tables').
    pub(super) fn layer_backward(&mut self, l: usize) -> Result<()> {
        let d = self.layout.dims;
        if l >= d.layers {
            return Err(Error::Shape(format!(
                "layer {l} of a {}-layer model",
                d.layers
            )));
        }
        if !self.have_head_grads {
            return Err(Error::Backend(
                "lstm_backward without a gradient from the heads".into(),
            ));
        }
        let x = self.layer_input(l)?;
        let ws = self
            .ws
            .as_ref()
            .ok_or_else(|| Error::Backend("no batch".into()))?;
        let (tt, bb, m, inp) = (ws.steps, ws.batch, d.hidden, d.layer_input(l));
        let (sb, tb, m4) = (2 * tt * bb, tt * bb, 4 * d.hidden);
        let lp = self.layout.layer(l);
        let off = |i: usize| self.layout.specs[i].offset;
        let (p, g) = (
            |i: usize| self.params.at(off(i)),
            |i: usize| self.grads.at(off(i)),
        );
        let lw = &ws.layers[l];
        let dev = self.dev.as_ref();
        let state0 = l * bb * m;
        ws.dc.zero(dev, 0, bb * m)?;
        for s in (0..2 * tt).rev() {
            let r0 = row_of(tt, bb, s, 0);
            let cprev = if s == 0 {
                ws.c0.at(state0)
            } else {
                lw.c.at(row_of(tt, bb, s - 1, 0) * m)
            };
            self.launch(
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
                    lw.g.at(r0 * m4),
                    p(lp.w_hh),
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
            lw.g.at(0),
            ws.h0.at(state0),
            g(lp.w_hh),
            0.0,
        ))?;
        if tt > 1 {
            dev.gemm(&dtx(
                m4,
                m,
                (tt - 1) * bb,
                lw.g.at(bb * m4),
                lw.h.at(tb * m),
                g(lp.w_hh),
                1.0,
            ))?;
        }
        dev.gemm(&dtx(
            m4,
            m,
            tb,
            lw.g.at(tb * m4),
            lw.h.at(0),
            g(lp.w_hh),
            1.0,
        ))?;
        dev.gemm(&dtx(m4, inp, sb, lw.g.at(0), x, g(lp.w_ih), 0.0))?;
        // Both biases receive the column sums of dG: ones[1, SB] dG (one GEMM).
        dev.gemm(&dw(1, m4, sb, ws.ones.at(0), lw.g.at(0), g(lp.b_ih)))?;
        self.grads
            .copy_from(dev, off(lp.b_hh), &self.grads, off(lp.b_ih), m4)?;
        let site = self.step_of() * 64 + l as u64;
        if l > 0 {
            let below = &ws.layers[l - 1].dh;
            dev.gemm(&dw(sb, inp, m4, lw.g.at(0), p(lp.w_ih), below.at(0)))?;
            if self.training_dropout() {
                self.dropout(below.at(0), below.at(0), sb, inp, site)?;
            }
            return Ok(());
        }
        dev.gemm(&dw(sb, inp, m4, lw.g.at(0), p(lp.w_ih), ws.dx.at(0)))?;
        if self.training_dropout() {
            self.dropout(ws.dx.at(0), ws.dx.at(0), sb, inp, site)?;
        }
        let table = self.layout.input_table();
        self.grads.zero(dev, table.start, table.len())?;
        let n_uniq = self.host.uniq.len();
        self.launch(
            "scatter_rows",
            [
                u32::try_from(n_uniq)
                    .map_err(|_| Error::Config("too many distinct input rows".into()))?,
                1,
                1,
            ],
            128,
            &[
                self.grads.arg(table.start),
                ws.dx.arg(0),
                ws.uniq.arg(0),
                ws.starts.arg(0),
                ws.members.arg(0),
                u32_arg(inp, "emb")?,
            ],
        )
    }
}
