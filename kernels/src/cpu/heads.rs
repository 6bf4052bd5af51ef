//! The output heads of the CPU engine: row and column logits, the fused log-softmax +
//! NLL (and its gradient down to the top LSTM output), and the loss-table accumulation of
//! a reallocation round. Threads split the head rows, then the output rows for the
//! output layers' gradients.

use std::ops::Range;

use super::engine::{Engine, HeadMode, Rows, fill_mask, resize};
use super::gemm::{Dst, Mat, gemm};
use super::layout::part_range;
use super::simd;
use super::team::{Barrier, Shared};
use crate::backend::{LossSums, Pass};
use crate::rng::{Philox, Purpose};
use crate::tables::LossTables;
use crate::{Error, Real, Result};

impl<T: Real> Engine<T> {
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
    /// for every target word w in the tables' range, the full row distribution's
    /// -log P_r[i] is added to `tables.lr[w, i]` and the column one's -log P_c[j] to
    /// `tables.lc[w, j]` (the row distribution is the one after the previous word's column
    /// input, the column distribution the one after w's row input). Each batch's
    /// contributions are summed per word in f64 before one f32 addition per table entry,
    /// so frequent words do not drift over a long pass. Returns the losses of all the
    /// batch's words, in the range or not.
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
        // The positions whose target is in the tables' range, grouped by target word.
        let words = &self.ws.words;
        let range = tables.words.clone();
        let mut order: Vec<u32> = (0..words.len() as u32)
            .filter(|&p| range.contains(&(words[p as usize] as usize)))
            .collect();
        let tb = order.len();
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
                let w = w as usize - range.start;
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
            tables.counts[w as usize - range.start] += (e - s) as u64;
        }
        Ok(loss)
    }

    fn heads_impl(&mut self, mode: HeadMode<T>) -> Result<LossSums> {
        if self.ws.pass.is_none() {
            return Err(Error::Backend("heads before input_forward".into()));
        }
        let d = self.layout.dims;
        let (tt, bb) = (self.ws.steps, self.ws.batch);
        let (m, rr, cc) = (d.hidden, d.rows, d.cols);
        let (sb, tb) = (2 * tt * bb, tt * bb);
        let [wr_i, br_i, wc_i, bc_i] = self.layout.heads();
        let specs = &self.layout.specs;
        let ws = &mut self.ws;
        let step = match ws.pass {
            Some(Pass::Train { step }) => step,
            _ => 0,
        };
        resize(&mut ws.zr, tb * rr);
        resize(&mut ws.zc, tb * cc);
        let grad_scale = match mode {
            HeadMode::Grad(s) => Some(s),
            _ => None,
        };
        let lt = &mut ws.layers[d.layers - 1];
        if grad_scale.is_some() {
            resize(&mut lt.dh, sb * m);
        }
        let nt = self.team.threads();
        let mut losses = vec![0f64; 2 * nt];
        let cx = Heads {
            tb,
            bb,
            m,
            rr,
            cc,
            dropout: ws.dropout,
            table_mode: matches!(mode, HeadMode::Table),
            grad_scale,
            rng: Philox::new(self.seed, Purpose::Dropout),
            site: step * 64 + d.layers as u64,
            p_drop: self.dropout,
            shard: self.shard,
            wr: &self.params[specs[wr_i].range()],
            br: &self.params[specs[br_i].range()],
            wc: &self.params[specs[wc_i].range()],
            bc: &self.params[specs[bc_i].range()],
            wr_t: &self.shadow[wr_i],
            wc_t: &self.shadow[wc_i],
            top_h: &lt.h,
            tgt_r: &ws.tgt_r,
            tgt_c: &ws.tgt_c,
            dh: Shared::new(&mut lt.dh),
            hd: Shared::new(&mut ws.hd),
            mask: Shared::new(&mut ws.mask_top),
            zr: Shared::new(&mut ws.zr),
            zc: Shared::new(&mut ws.zc),
            gr: Shared::new(&mut self.grads),
            gwr: specs[wr_i].range(),
            gbr: specs[br_i].range(),
            gwc: specs[wc_i].range(),
            gbc: specs[bc_i].range(),
            losses: Shared::new(&mut losses),
            nt,
        };
        self.team.run(|tid, bar| heads_thread(&cx, tid, bar));
        ws.have_head_grads = grad_scale.is_some();
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
}

/// Everything the threads of the heads share.
struct Heads<'a, T> {
    /// Head rows T*B, streams B, hidden m, rows R and columns C of the table.
    tb: usize,
    bb: usize,
    m: usize,
    rr: usize,
    cc: usize,
    /// The top output is dropped out; the loss-table mode (full -log-softmax rows kept).
    dropout: bool,
    table_mode: bool,
    /// Gradients of scale * summed NLL, when wanted.
    grad_scale: Option<T>,
    rng: Philox,
    site: u64,
    p_drop: f64,
    shard: Option<(usize, usize)>,
    /// W_r [R, m], b_r, W_c [C, m], b_c and the transposes W_r^T [m, R], W_c^T [m, C].
    wr: &'a [T],
    br: &'a [T],
    wc: &'a [T],
    bc: &'a [T],
    wr_t: &'a [T],
    wc_t: &'a [T],
    /// [2TB, m] the top layer's output; [TB] row and column targets.
    top_h: &'a [T],
    tgt_r: &'a [u32],
    tgt_c: &'a [u32],
    /// d loss / d top output [2TB, m]; the dropped top output and its masks [2TB, m];
    /// logits -> d loss / d logits [TB, R], [TB, C]; the gradient buffer.
    dh: Shared<T>,
    hd: Shared<T>,
    mask: Shared<T>,
    zr: Shared<T>,
    zc: Shared<T>,
    gr: Shared<T>,
    gwr: Range<usize>,
    gbr: Range<usize>,
    gwc: Range<usize>,
    gbc: Range<usize>,
    /// [2 * threads] each thread's (row, column) loss sums.
    losses: Shared<f64>,
    nt: usize,
}

/// Thread `tid`'s part of the heads: its head rows' logits and losses, then (with
/// gradients) its rows of the output layers' gradients and its rows of d loss / d h.
fn heads_thread<T: Real>(cx: &Heads<'_, T>, tid: usize, bar: &Barrier) {
    let (tb, m, rr, cc) = (cx.tb, cx.m, cx.rr, cx.cc);
    let pr = part_range(tb, cx.nt, tid);
    // Top output after dropout (both parities of the own head rows).
    let top: *const T = if cx.dropout {
        for par in 0..2 {
            let r = par * tb + pr.start..par * tb + pr.end;
            // SAFETY: own rows of hd / mask.
            let (hs, ms) = unsafe {
                (
                    cx.hd.slice_mut(r.start * m..r.end * m),
                    cx.mask.slice_mut(r.start * m..r.end * m),
                )
            };
            fill_mask(
                &cx.rng,
                cx.site,
                Rows {
                    range: r.clone(),
                    width: m,
                    batch: cx.bb,
                },
                cx.shard,
                cx.p_drop,
                ms,
            );
            hs.copy_from_slice(&cx.top_h[r.start * m..r.end * m]);
            simd::mul_assign(hs, ms);
        }
        cx.hd.ptr()
    } else {
        cx.top_h.as_ptr()
    };
    let he = top; // [TB, m] even steps
    let ho = top.wrapping_add(tb * m); // [TB, m] odd steps
    // Logits and the fused softmax for the own head rows.
    let n_r = pr.len();
    // SAFETY: own rows of zr / zc; he / ho rows of this thread are complete (written above
    // by this thread).
    unsafe {
        gemm(
            n_r,
            rr,
            m,
            Dst::rows(cx.zr.ptr().add(pr.start * rr), rr),
            false,
            Mat::rows_ptr(he.add(pr.start * m), m),
            Mat::rows(cx.wr_t, rr),
        );
        gemm(
            n_r,
            cc,
            m,
            Dst::rows(cx.zc.ptr().add(pr.start * cc), cc),
            false,
            Mat::rows_ptr(ho.add(pr.start * m), m),
            Mat::rows(cx.wc_t, cc),
        );
        let zr_rows = cx.zr.slice_mut(pr.start * rr..pr.end * rr);
        let zc_rows = cx.zc.slice_mut(pr.start * cc..pr.end * cc);
        let (tr, tc) = (&cx.tgt_r[pr.clone()], &cx.tgt_c[pr.clone()]);
        let (lr, lc) = if cx.table_mode {
            (
                simd::neg_log_softmax(zr_rows, rr, cx.br, tr),
                simd::neg_log_softmax(zc_rows, cc, cx.bc, tc),
            )
        } else {
            (
                simd::softmax_nll(zr_rows, rr, cx.br, tr, cx.grad_scale, &mut []),
                simd::softmax_nll(zc_rows, cc, cx.bc, tc, cx.grad_scale, &mut []),
            )
        };
        cx.losses
            .slice_mut(2 * tid..2 * tid + 2)
            .copy_from_slice(&[lr, lc]);
    }
    if cx.grad_scale.is_none() {
        return;
    }
    bar.wait(); // all of dZ is written; hd complete
    head_grads(cx, tid, he, ho, &pr);
}

/// With all of dZ written: the thread's rows of the output layers' gradients (split over
/// the output rows) and its head rows of d loss / d top output.
fn head_grads<T: Real>(
    cx: &Heads<'_, T>,
    tid: usize,
    he: *const T,
    ho: *const T,
    pr: &Range<usize>,
) {
    let (tb, m, rr, cc) = (cx.tb, cx.m, cx.rr, cx.cc);
    let outputs = [
        (cx.zr, rr, &cx.gwr, &cx.gbr, he),
        (cx.zc, cc, &cx.gwc, &cx.gbc, ho),
    ];
    for (z, width, gw, gb, inp) in outputs {
        let or = part_range(width, cx.nt, tid);
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
                Dst::rows(cx.gr.ptr().add(gw.start + or.start * m), m),
                false,
                zt,
                Mat::rows_ptr(inp, m),
            );
            let gbias = cx.gr.slice_mut(gb.start + or.start..gb.start + or.end);
            gbias.fill(T::ZERO);
            for t in 0..tb {
                simd::add_assign(gbias, z.slice(t * width + or.start..t * width + or.end));
            }
        }
    }
    let n_r = pr.len();
    // d loss / d top output for the own head rows.
    // SAFETY: own rows of dh (both parities); dZ complete after the barrier.
    unsafe {
        gemm(
            n_r,
            m,
            rr,
            Dst::rows(cx.dh.ptr().add(pr.start * m), m),
            false,
            Mat::rows_ptr(cx.zr.ptr().add(pr.start * rr), rr),
            Mat::rows(cx.wr, m),
        );
        gemm(
            n_r,
            m,
            cc,
            Dst::rows(cx.dh.ptr().add((tb + pr.start) * m), m),
            false,
            Mat::rows_ptr(cx.zc.ptr().add(pr.start * cc), cc),
            Mat::rows(cx.wc, m),
        );
        if cx.dropout {
            for par in 0..2 {
                let r = par * tb + pr.start..par * tb + pr.end;
                simd::mul_assign(
                    cx.dh.slice_mut(r.start * m..r.end * m),
                    cx.mask.slice(r.start * m..r.end * m),
                );
            }
        }
    }
}
