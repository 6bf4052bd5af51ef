//! The LSTM layer backward pass of the CPU engine: back through time for the own hidden
//! units (one barrier per step), then the weight and bias gradients of the own gate rows,
//! then the gradient of the layer's input (the layer below's output, or the input table
//! rows; for layer 0 without dropout through the per-distinct-row sums of dG).

use std::ops::Range;

use super::engine::{Engine, resize};
use super::gemm::{Dst, Mat, gemm};
use super::layout::{part_range, split_units};
use super::simd;
use super::team::{Barrier, Shared};
use crate::layout::row_of;
use crate::{Error, Real, Result};

impl<T: Real> Engine<T> {
    /// Backward pass of LSTM layer `l`: consumes d loss / d h of this layer, writes the
    /// gradients of its weights and d loss / d h of the layer below; layer 0 writes the
    /// gradient of the input tables [X_r; X_c].
    pub fn lstm_backward(&mut self, l: usize) -> Result<()> {
        self.layout.dims.check_layer(l)?;
        if !self.ws.have_head_grads {
            return Err(Error::Backend(
                "lstm_backward without a gradient from the heads".into(),
            ));
        }
        let d = self.layout.dims;
        let (tt, bb) = (self.ws.steps, self.ws.batch);
        let (m, m4, inp) = (d.hidden, 4 * d.hidden, d.layer_input(l));
        let sb = 2 * tt * bb;
        let lp = self.layout.layer(l);
        let specs = &self.layout.specs;
        let g_table = self.layout.input_table();
        let ws = &mut self.ws;
        let table_mode = l == 0 && !ws.dropout;
        let (below, above) = ws.layers.split_at_mut(l);
        let lw = &mut above[0];
        if l > 0 {
            resize(&mut below[l - 1].dh, sb * m);
        }
        let u_n = ws.uniq.len();
        if table_mode {
            resize(&mut ws.dsum, u_n * m4);
            resize(&mut ws.dxu, u_n * inp);
        }
        let gr = Shared::new(&mut self.grads);
        if l == 0 {
            // SAFETY: not yet shared with any thread.
            unsafe { gr.slice_mut(g_table.clone()) }.fill(T::ZERO);
        }
        let mut dh_rec_buf = vec![T::ZERO; bb * m];
        let nt = self.team.threads();
        let (lower_h, dh_lower): (&[T], Shared<T>) = match below.last_mut() {
            Some(lower) => (&lower.h, Shared::new(&mut lower.dh)),
            None => (&[], Shared::new(&mut [][..])),
        };
        let cx = Backward {
            l,
            tt,
            bb,
            m,
            inp,
            dropout: ws.dropout,
            table_mode,
            w_ih: &self.params[specs[lp.w_ih].range()],
            w_hh: &self.params[specs[lp.w_hh].range()],
            gw_ih: specs[lp.w_ih].range(),
            gw_hh: specs[lp.w_hh].range(),
            gb_ih: specs[lp.b_ih].range(),
            gb_hh: specs[lp.b_hh].range(),
            g_table,
            ids: &ws.ids,
            slot: &ws.slot,
            uniq: &ws.uniq,
            xu: &ws.xu,
            h0: &ws.h0[l * bb * m..(l + 1) * bb * m],
            c0: &ws.c0[l * bb * m..(l + 1) * bb * m],
            c: &lw.c,
            tc: &lw.tc,
            h: &lw.h,
            dh: &lw.dh,
            mask: &lw.mask,
            lower_h,
            g: Shared::new(&mut lw.g),
            xin: Shared::new(&mut lw.xin),
            dsum: Shared::new(&mut ws.dsum),
            dxu: Shared::new(&mut ws.dxu),
            gr,
            dh_lower,
            dh_rec: Shared::new(&mut dh_rec_buf),
            nt,
            units: split_units(m, nt),
        };
        self.team.run(|tid, bar| backward_thread(&cx, tid, bar));
        Ok(())
    }
}

/// Everything the threads of one layer's backward pass share.
struct Backward<'a, T> {
    /// Layer, steps T, streams B, hidden m, layer input width.
    l: usize,
    tt: usize,
    bb: usize,
    m: usize,
    inp: usize,
    dropout: bool,
    table_mode: bool,
    /// W_ih [4m, inp], W_hh [4m, m] (internal layout).
    w_ih: &'a [T],
    w_hh: &'a [T],
    /// Where this layer's weight and bias gradients and the input table's sit in `gr`.
    gw_ih: Range<usize>,
    gw_hh: Range<usize>,
    gb_ih: Range<usize>,
    gb_hh: Range<usize>,
    g_table: Range<usize>,
    /// Table row of every storage row; layer-0 table mode: the slot of every storage row,
    /// the distinct rows and their vectors [U, n].
    ids: &'a [u32],
    slot: &'a [u32],
    uniq: &'a [u32],
    xu: &'a [T],
    /// [B, m] start state; [2TB, m] the forward pass's c, tanh(c), h and d loss / d h.
    h0: &'a [T],
    c0: &'a [T],
    c: &'a [T],
    tc: &'a [T],
    h: &'a [T],
    dh: &'a [T],
    /// [2TB, inp] dropout multipliers of the input; the layer below's output.
    mask: &'a [T],
    lower_h: &'a [T],
    /// Gate activations -> dG [2TB, 4m]; the dropped input [2TB, inp] (reused for its
    /// gradient in dense layer 0); per-slot dG sums [U, 4m] and their input gradient
    /// [U, inp]; the gradient buffer; d loss / d h of the layer below [2TB, inp]; the
    /// recurrent gradient of the step [B, m].
    g: Shared<T>,
    xin: Shared<T>,
    dsum: Shared<T>,
    dxu: Shared<T>,
    gr: Shared<T>,
    dh_lower: Shared<T>,
    dh_rec: Shared<T>,
    nt: usize,
    units: Vec<Range<usize>>,
}

/// Thread `tid`'s part of a layer's backward pass.
fn backward_thread<T: Real>(cx: &Backward<'_, T>, tid: usize, bar: &Barrier) {
    let u = cx.units[tid].clone();
    through_time(cx, &u, bar);
    if !u.is_empty() {
        weight_grads(cx, &u);
    }
    bar.wait(); // every dG, dsum and weight-gradient product is done
    input_grads(cx, tid);
}

/// Step 1: backward through time for the units `u`, one barrier per step (dG of every
/// step).
fn through_time<T: Real>(cx: &Backward<'_, T>, u: &Range<usize>, bar: &Barrier) {
    let (tt, bb, m, m4) = (cx.tt, cx.bb, cx.m, 4 * cx.m);
    let s_n = 2 * tt;
    let rows = 4 * u.start..4 * u.end;
    let nu = u.len();
    let mut dc = vec![T::ZERO; bb * nu];
    for s in (0..s_n).rev() {
        let r0 = row_of(tt, bb, s, 0);
        if nu > 0 {
            for b in 0..bb {
                let r = r0 + b;
                let cprev: &[T] = if s == 0 {
                    &cx.c0[b * m + u.start..b * m + u.end]
                } else {
                    let rp = row_of(tt, bb, s - 1, b);
                    &cx.c[rp * m + u.start..rp * m + u.end]
                };
                // SAFETY: own gate rows of storage row r and own columns of dh_rec.
                unsafe {
                    let rec: &[T] = if s + 1 == s_n {
                        &[]
                    } else {
                        cx.dh_rec.slice(b * m + u.start..b * m + u.end)
                    };
                    simd::cell_backward(
                        simd::Units {
                            hidden: m,
                            range: u.clone(),
                        },
                        cx.g.slice_mut(r * m4 + rows.start..r * m4 + rows.end),
                        &cx.dh[r * m + u.start..r * m + u.end],
                        rec,
                        cprev,
                        &cx.tc[r * m + u.start..r * m + u.end],
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
                    Dst::rows(cx.dh_rec.ptr().add(u.start), m),
                    false,
                    Mat::rows_ptr(cx.g.ptr().add(r0 * m4), m4),
                    Mat::rows(cx.w_hh, m).at(0, u.start),
                );
            }
        }
    }
}

/// Step 2: the weight and bias gradients of the gate rows of units `u`.
fn weight_grads<T: Real>(cx: &Backward<'_, T>, u: &Range<usize>) {
    let (tt, bb, m, m4, inp) = (cx.tt, cx.bb, cx.m, 4 * cx.m, cx.inp);
    let sb = 2 * tt * bb;
    let rows = 4 * u.start..4 * u.end;
    let nr = rows.len();
    let (g, gr) = (cx.g, cx.gr);
    let dgt =
        |r: usize| Mat::rows_ptr(g.ptr().wrapping_add(r * m4 + rows.start) as *const T, m4).t(); // [nr, K]
    let gdst = |range: &Range<usize>, width: usize| {
        gr.ptr().wrapping_add(range.start + rows.start * width)
    };
    let h = cx.h;
    // SAFETY: own rows of the gradients; g, h, inputs read-only after the barrier.
    unsafe {
        // dW_hh = sum_s dG_s^T h_{s-1}: even steps t read h0 (t = 0) or the odd step
        // t - 1; odd steps t read the even step t.
        gemm(
            nr,
            m,
            bb,
            Dst::rows(gdst(&cx.gw_hh, m), m),
            false,
            dgt(row_of(tt, bb, 0, 0)),
            Mat::rows(cx.h0, m),
        );
        if tt > 1 {
            gemm(
                nr,
                m,
                (tt - 1) * bb,
                Dst::rows(gdst(&cx.gw_hh, m), m),
                true,
                dgt(row_of(tt, bb, 2, 0)),
                Mat::rows(&h[row_of(tt, bb, 1, 0) * m..], m),
            );
        }
        gemm(
            nr,
            m,
            tt * bb,
            Dst::rows(gdst(&cx.gw_hh, m), m),
            true,
            dgt(row_of(tt, bb, 1, 0)),
            Mat::rows(&h[row_of(tt, bb, 0, 0) * m..], m),
        );
        // Biases: both receive the column sums of dG.
        let (gb_ih, gb_hh) = (&cx.gb_ih, &cx.gb_hh);
        let db = gr.slice_mut(gb_ih.start + rows.start..gb_ih.start + rows.end);
        db.fill(T::ZERO);
        for r in 0..sb {
            simd::add_assign(db, g.slice(r * m4 + rows.start..r * m4 + rows.end));
        }
        let db: &[T] = db;
        gr.slice_mut(gb_hh.start + rows.start..gb_hh.start + rows.end)
            .copy_from_slice(db);
        if cx.table_mode {
            // dG summed per distinct input row, then dW_ih = dsum^T · xu.
            let (dsum, u_n) = (cx.dsum, cx.uniq.len());
            for k in 0..u_n {
                dsum.slice_mut(k * m4 + rows.start..k * m4 + rows.end)
                    .fill(T::ZERO);
            }
            for (r, &sl) in cx.slot[..sb].iter().enumerate() {
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
                Dst::rows(gdst(&cx.gw_ih, inp), inp),
                false,
                dst,
                Mat::rows(cx.xu, inp),
            );
        } else {
            let x: *const T = if cx.dropout {
                cx.xin.ptr()
            } else {
                cx.lower_h.as_ptr()
            };
            gemm(
                nr,
                inp,
                sb,
                Dst::rows(gdst(&cx.gw_ih, inp), inp),
                false,
                dgt(0),
                Mat::rows_ptr(x, inp),
            );
        }
    }
}

/// Step 3: thread `tid`'s part of the gradient of the layer input (d loss / d h of the layer
/// below, or the input table's gradient).
fn input_grads<T: Real>(cx: &Backward<'_, T>, tid: usize) {
    let (m4, inp, nt) = (4 * cx.m, cx.inp, cx.nt);
    let sb = 2 * cx.tt * cx.bb;
    let (g, gr, g_table) = (cx.g, cx.gr, &cx.g_table);
    if cx.l > 0 {
        let pr = part_range(sb, nt, tid);
        let dh_lower = cx.dh_lower;
        // SAFETY: own rows of dh_lower.
        unsafe {
            gemm(
                pr.len(),
                inp,
                m4,
                Dst::rows(dh_lower.ptr().add(pr.start * inp), inp),
                false,
                Mat::rows_ptr(g.ptr().add(pr.start * m4), m4),
                Mat::rows(cx.w_ih, inp),
            );
            if cx.dropout {
                simd::mul_assign(
                    dh_lower.slice_mut(pr.start * inp..pr.end * inp),
                    &cx.mask[pr.start * inp..pr.end * inp],
                );
            }
        }
    } else if cx.table_mode {
        let pu = part_range(cx.uniq.len(), nt, tid);
        let (dsum, dxu) = (cx.dsum, cx.dxu);
        // SAFETY: own rows of dxu; the ids in uniq are distinct, so the rows of the table
        // gradient this thread adds to are its own.
        unsafe {
            gemm(
                pu.len(),
                inp,
                m4,
                Dst::rows(dxu.ptr().add(pu.start * inp), inp),
                false,
                Mat::rows_ptr(dsum.ptr().add(pu.start * m4), m4),
                Mat::rows(cx.w_ih, inp),
            );
            for k in pu {
                let id = cx.uniq[k] as usize;
                let dst = gr.slice_mut(g_table.start + id * inp..g_table.start + (id + 1) * inp);
                simd::add_assign(dst, dxu.slice(k * inp..(k + 1) * inp));
            }
        }
    } else {
        // Dense layer 0 (input dropout): columns split, written over xin (no longer
        // needed), masked, then scattered into the table gradient by id.
        let pc = part_range(inp, nt, tid);
        if pc.is_empty() {
            return;
        }
        let xin = cx.xin;
        // SAFETY: own columns of xin and of the table gradient.
        unsafe {
            gemm(
                sb,
                pc.len(),
                m4,
                Dst::rows(xin.ptr().add(pc.start), inp),
                false,
                Mat::rows_ptr(g.ptr(), m4),
                Mat::rows(cx.w_ih, inp).at(0, pc.start),
            );
            for r in 0..sb {
                let xr = xin.slice_mut(r * inp + pc.start..r * inp + pc.end);
                simd::mul_assign(xr, &cx.mask[r * inp + pc.start..r * inp + pc.end]);
                let id = cx.ids[r] as usize;
                let dst = gr.slice_mut(
                    g_table.start + id * inp + pc.start..g_table.start + id * inp + pc.end,
                );
                simd::add_assign(dst, xr);
            }
        }
    }
}
