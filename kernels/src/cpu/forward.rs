//! The LSTM layer forward pass of the CPU engine. Thread k owns a contiguous range of
//! hidden units (whole gate blocks) and so a contiguous range of gate rows; it computes
//! them for all 2T steps and meets the other threads once per step at the barrier, when
//! h of the step is complete.

use std::ops::Range;

use super::engine::{Engine, Rows, fill_mask, resize};
use super::gemm::{Dst, Mat, gemm};
use super::layout::{part_range, split_units};
use super::simd;
use super::team::{Barrier, Shared};
use crate::backend::{Pass, State};
use crate::layout::row_of;
use crate::rng::{Philox, Purpose};
use crate::{Error, Real, Result};

/// Everything the threads of one layer's forward pass share.
struct Forward<'a, T> {
    /// Layer, steps T, streams B, hidden m, layer input width.
    l: usize,
    tt: usize,
    bb: usize,
    m: usize,
    inp: usize,
    /// Inputs are dropped out (dense input), and layer 0 reads the table in place.
    dropout: bool,
    table_mode: bool,
    /// Dropout masks: the generator, the mask site, probability and the stream shard.
    rng: Philox,
    site: u64,
    p_drop: f64,
    shard: Option<(usize, usize)>,
    /// W_ih^T [inp, 4m], W_hh^T [m, 4m] (row-major transposes).
    w_ih_t: &'a [T],
    w_hh_t: &'a [T],
    /// [4m] b_ih + b_hh.
    bsum: &'a [T],
    /// The joint input table [R + C, n], the table row of every storage row, and the
    /// layer below's output [2TB, m] (layers > 0).
    in_table: &'a [T],
    ids: &'a [u32],
    lower_h: &'a [T],
    /// Layer-0 table mode: distinct rows [U, n], the slot of each storage row.
    xu: &'a [T],
    uniq_n: usize,
    slot: &'a [u32],
    /// [B, m] start state of this layer.
    h0: &'a [T],
    c0: &'a [T],
    /// Outputs: gate activations [2TB, 4m], c, tanh(c), h [2TB, m], the dropped input and
    /// its masks [2TB, inp], the projections of the distinct rows [U, 4m].
    g: Shared<T>,
    c: Shared<T>,
    tc: Shared<T>,
    h: Shared<T>,
    xin: Shared<T>,
    mask: Shared<T>,
    pt: Shared<T>,
    nt: usize,
    units: Vec<Range<usize>>,
}

impl<T: Real> Engine<T> {
    /// Forward pass of LSTM layer `l` over the 2T steps; updates the carried state.
    pub fn lstm_forward(&mut self, l: usize) -> Result<()> {
        self.layout.dims.check_layer(l)?;
        if self.ws.pass.is_none() {
            return Err(Error::Backend("lstm_forward before input_forward".into()));
        }
        let d = self.layout.dims;
        let (tt, bb) = (self.ws.steps, self.ws.batch);
        let (m, m4) = (d.hidden, 4 * d.hidden);
        let lp = self.layout.layer(l);
        let specs = &self.layout.specs;
        let (b_ih, b_hh) = (
            &self.params[specs[lp.b_ih].range()],
            &self.params[specs[lp.b_hh].range()],
        );
        let ws = &mut self.ws;
        resize(&mut ws.bsum, m4);
        for i in 0..m4 {
            ws.bsum[i] = b_ih[i] + b_hh[i];
        }
        let step = match ws.pass {
            Some(Pass::Train { step }) => step,
            _ => 0,
        };
        let (below, above) = ws.layers.split_at_mut(l);
        let lw = &mut above[0];
        let nt = self.team.threads();
        let cx = Forward {
            l,
            tt,
            bb,
            m,
            inp: d.layer_input(l),
            dropout: ws.dropout,
            table_mode: l == 0 && !ws.dropout,
            rng: Philox::new(self.seed, Purpose::Dropout),
            site: step * 64 + l as u64,
            p_drop: self.dropout,
            shard: self.shard,
            w_ih_t: &self.shadow[lp.w_ih],
            w_hh_t: &self.shadow[lp.w_hh],
            bsum: &ws.bsum,
            in_table: &self.params[self.layout.input_table()],
            ids: &ws.ids,
            lower_h: if l > 0 { &below[l - 1].h } else { &[] },
            xu: &ws.xu,
            uniq_n: ws.uniq.len(),
            slot: &ws.slot,
            h0: &ws.h0[l * bb * m..(l + 1) * bb * m],
            c0: &ws.c0[l * bb * m..(l + 1) * bb * m],
            g: Shared::new(&mut lw.g),
            c: Shared::new(&mut lw.c),
            tc: Shared::new(&mut lw.tc),
            h: Shared::new(&mut lw.h),
            xin: Shared::new(&mut lw.xin),
            mask: Shared::new(&mut lw.mask),
            pt: Shared::new(&mut ws.pt),
            nt,
            units: split_units(m, nt),
        };
        self.team.run(|tid, bar| forward_thread(&cx, tid, bar));
        // Carry the final state to the next batch of this stream.
        let s_last = 2 * tt - 1;
        let st = self.states.entry(ws.stream).or_insert_with(|| State {
            batch: bb,
            h: vec![T::ZERO; d.layers * bb * m],
            c: vec![T::ZERO; d.layers * bb * m],
        });
        for b in 0..bb {
            let r = row_of(tt, bb, s_last, b);
            let dst = (l * bb + b) * m;
            st.h[dst..dst + m].copy_from_slice(&lw.h[r * m..(r + 1) * m]);
            st.c[dst..dst + m].copy_from_slice(&lw.c[r * m..(r + 1) * m]);
        }
        Ok(())
    }
}

/// Thread `tid`'s part of a layer's forward pass.
fn forward_thread<T: Real>(cx: &Forward<'_, T>, tid: usize, bar: &Barrier) {
    let (inp, m4) = (cx.inp, 4 * cx.m);
    let u = cx.units[tid].clone();
    let rows = 4 * u.start..4 * u.end;
    let nr = rows.len();
    let sb = 2 * cx.tt * cx.bb;
    // 1. The dropped-out dense input (rows split across threads).
    if cx.dropout {
        let pr = part_range(sb, cx.nt, tid);
        // SAFETY: thread-private row range of xin / mask.
        let (xs, ms) = unsafe {
            (
                cx.xin.slice_mut(pr.start * inp..pr.end * inp),
                cx.mask.slice_mut(pr.start * inp..pr.end * inp),
            )
        };
        fill_mask(
            &cx.rng,
            cx.site,
            Rows {
                range: pr.clone(),
                width: inp,
                batch: cx.bb,
            },
            cx.shard,
            cx.p_drop,
            ms,
        );
        for (k, r) in pr.clone().enumerate() {
            let src = if cx.l == 0 {
                let id = cx.ids[r] as usize;
                &cx.in_table[id * inp..(id + 1) * inp]
            } else {
                &cx.lower_h[r * inp..(r + 1) * inp]
            };
            xs[k * inp..(k + 1) * inp].copy_from_slice(src);
        }
        simd::mul_assign(xs, ms);
        bar.wait();
    }
    // 2. Input projection of the own gate rows.
    if nr > 0 {
        let w_rows_t = Mat::rows(cx.w_ih_t, m4).at(0, rows.start); // W_ih^T[:, rows]: [inp, nr]
        if cx.table_mode {
            // SAFETY: own columns of pt; xu / w_ih are read-only here.
            unsafe {
                gemm(
                    cx.uniq_n,
                    nr,
                    inp,
                    Dst::rows(cx.pt.ptr().add(rows.start), m4),
                    false,
                    Mat::rows(cx.xu, inp),
                    w_rows_t,
                )
            };
        } else {
            let x: *const T = if cx.dropout {
                cx.xin.ptr()
            } else {
                cx.lower_h.as_ptr()
            };
            // SAFETY: own columns of g; x is complete (barrier above or read-only).
            unsafe {
                gemm(
                    sb,
                    nr,
                    inp,
                    Dst::rows(cx.g.ptr().add(rows.start), m4),
                    false,
                    Mat::rows_ptr(x, inp),
                    w_rows_t,
                )
            };
        }
    }
    // 3. The recurrence: one barrier per step.
    for s in 0..2 * cx.tt {
        if nr > 0 {
            recurrent_step(cx, s, &u);
        }
        bar.wait();
    }
}

/// Step `s` of the recurrence for the units `u`: the recurrent product into the gates,
/// then the cell of every stream.
fn recurrent_step<T: Real>(cx: &Forward<'_, T>, s: usize, u: &Range<usize>) {
    let (tt, bb, m, m4) = (cx.tt, cx.bb, cx.m, 4 * cx.m);
    let rows = 4 * u.start..4 * u.end;
    let nr = rows.len();
    let r0 = row_of(tt, bb, s, 0);
    let w_hh_t = Mat::rows(cx.w_hh_t, m4).at(0, rows.start); // W_hh^T[:, rows]: [m, nr]
    let hprev: *const T = if s == 0 {
        cx.h0.as_ptr()
    } else {
        cx.h.ptr().wrapping_add(row_of(tt, bb, s - 1, 0) * m)
    };
    // SAFETY: own columns of step s in g; h of step s-1 is complete (barrier).
    unsafe {
        gemm(
            bb,
            nr,
            m,
            Dst::rows(cx.g.ptr().add(r0 * m4 + rows.start), m4),
            !cx.table_mode,
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
        // SAFETY: the own units / gate rows of storage row r are this thread's; c of the
        // previous step is only read.
        unsafe {
            let cprev: &[T] = match cprev_row {
                None => &cx.c0[b * m + u.start..b * m + u.end],
                Some(rp) => cx.c.slice(rp * m + u.start..rp * m + u.end),
            };
            let g = cx.g.slice_mut(r * m4 + rows.start..r * m4 + rows.end);
            if cx.table_mode {
                // The input projection of the row's input, added before the biases.
                let k = cx.slot[r] as usize * m4;
                simd::add_assign(g, cx.pt.slice(k + rows.start..k + rows.end));
            }
            simd::cell_forward(
                simd::Units {
                    hidden: m,
                    range: u.clone(),
                },
                g,
                &cx.bsum[rows.clone()],
                cprev,
                cx.c.slice_mut(r * m + u.start..r * m + u.end),
                cx.tc.slice_mut(r * m + u.start..r * m + u.end),
                cx.h.slice_mut(r * m + u.start..r * m + u.end),
            );
        }
    }
}
