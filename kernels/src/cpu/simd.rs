//! The pointwise kernels of the CPU backend: LSTM cell forward/backward on a block of
//! units, fused log-softmax + NLL, dropout. Written once, generic over [`Real`]; each public
//! kernel is compiled three times (AVX-512, AVX2+FMA, baseline) and picks one at run time,
//! so one binary is fast on any x86-64 and correct everywhere.

use super::layout::GATE_BLOCK;
use crate::Real;
use crate::rng::Philox;

/// Defines `pub fn $name<T: Real>(args)` that runs `$body` compiled for the best
/// instruction set the CPU has.
macro_rules! multiversion {
    ($(#[$meta:meta])* pub fn $name:ident<$T:ident: Real>($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        pub fn $name<$T: Real>($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body<$T: Real>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn v4<$T: Real>($($arg: $ty),*) $(-> $ret)? { body::<$T>($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3<$T: Real>($($arg: $ty),*) $(-> $ret)? { body::<$T>($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F (checked at run time).
                    return unsafe { v4::<$T>($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
                    return unsafe { v3::<$T>($($arg),*) };
                }
            }
            body::<$T>($($arg),*)
        }
    };
}

/// The units `range` of a layer of `hidden` units that a cell kernel works on: gate
/// blocks of [`GATE_BLOCK`] units from `range.start`, the last one cut at `hidden`.
#[derive(Clone, Debug)]
pub struct Units {
    pub hidden: usize,
    pub range: std::ops::Range<usize>,
}

/// One gate block of a cell kernel: `len` units starting at unit `unit` of the segment,
/// whose gate rows start at row `4 * unit`.
#[derive(Clone, Copy, Debug)]
struct Block {
    len: usize,
    unit: usize,
}

/// One gate block of the cell forward ([`Block`]). Every operand is re-sliced to exactly
/// `bs` elements first, so the loop has no bounds checks and vectorises; inlined with a
/// constant `bs` for full blocks.
#[inline(always)]
fn cell_forward_block<T: Real>(
    blk: Block,
    g: &mut [T],
    bias: &[T],
    c_prev: &[T],
    c: &mut [T],
    tc: &mut [T],
    h: &mut [T],
) {
    let (bs, u) = (blk.len, blk.unit);
    let r = 4 * u;
    let g = &mut g[r..r + 4 * bs];
    let (gi, rest) = g.split_at_mut(bs);
    let (gf, rest) = rest.split_at_mut(bs);
    let (gg, go) = rest.split_at_mut(bs);
    let bias = &bias[r..r + 4 * bs];
    let (bi, bf, bg, bo) = (
        &bias[..bs],
        &bias[bs..2 * bs],
        &bias[2 * bs..3 * bs],
        &bias[3 * bs..4 * bs],
    );
    let (c_prev, c, tc, h) = (
        &c_prev[u..u + bs],
        &mut c[u..u + bs],
        &mut tc[u..u + bs],
        &mut h[u..u + bs],
    );
    let go = &mut go[..bs];
    for j in 0..bs {
        let ig = (gi[j] + bi[j]).sigmoid();
        let fg = (gf[j] + bf[j]).sigmoid();
        let gt = (gg[j] + bg[j]).tanh();
        let og = (go[j] + bo[j]).sigmoid();
        let cn = fg * c_prev[j] + ig * gt;
        let t = cn.tanh();
        gi[j] = ig;
        gf[j] = fg;
        gg[j] = gt;
        go[j] = og;
        c[j] = cn;
        tc[j] = t;
        h[j] = og * t;
    }
}

// The cell kernels take every slice as an argument of its own: each is then `noalias`
// in the multiversioned functions, which the vectoriser needs (input slices grouped in a
// struct, which is passed behind a pointer, left the forward loop scalar). That is why
// the layer-0 input projection is added by the callers, before the call.

multiversion! {
    /// LSTM cell forward for one batch row and the units `units`. `g` holds the
    /// pre-activations of those units' gate rows (internal layout, 4*|units|) without
    /// biases (with the layer-0 input projection already added: [`add_assign`]); `bias`
    /// the matching rows of b_ih + b_hh. On return `g` holds the activations (sigma(i),
    /// sigma(f), tanh(g), sigma(o)), and c = f*c_prev + i*g, tc = tanh(c), h = o*tc.
    pub fn cell_forward<T: Real>(
        units: Units,
        g: &mut [T],
        bias: &[T],
        c_prev: &[T],
        c: &mut [T],
        tc: &mut [T],
        h: &mut [T],
    ) {
        let mut unit = units.range.start;
        while unit < units.range.end {
            let bs = GATE_BLOCK.min(units.hidden - unit);
            let u = unit - units.range.start;
            if bs == GATE_BLOCK {
                let blk = Block { len: GATE_BLOCK, unit: u };
                cell_forward_block(blk, g, bias, c_prev, c, tc, h);
            } else {
                cell_forward_block(Block { len: bs, unit: u }, g, bias, c_prev, c, tc, h);
            }
            unit += bs;
        }
    }
}

/// One gate block of the cell backward (see [`cell_forward_block`]).
#[inline(always)]
fn cell_backward_block<T: Real>(
    blk: Block,
    a: &mut [T],
    dh_above: &[T],
    dh_rec: &[T],
    c_prev: &[T],
    tc: &[T],
    dc: &mut [T],
) {
    let (bs, u) = (blk.len, blk.unit);
    let r = 4 * u;
    let a = &mut a[r..r + 4 * bs];
    let (ai, rest) = a.split_at_mut(bs);
    let (af, rest) = rest.split_at_mut(bs);
    let (ag, ao) = rest.split_at_mut(bs);
    let ao = &mut ao[..bs];
    let (dh_above, c_prev, tc, dc) = (
        &dh_above[u..u + bs],
        &c_prev[u..u + bs],
        &tc[u..u + bs],
        &mut dc[u..u + bs],
    );
    let rec = if dh_rec.is_empty() {
        None
    } else {
        Some(&dh_rec[u..u + bs])
    };
    let one = T::ONE;
    for j in 0..bs {
        let (ig, fg, gg, og) = (ai[j], af[j], ag[j], ao[j]);
        let dh = dh_above[j] + rec.map_or(T::ZERO, |r| r[j]);
        let t = tc[j];
        let d_o = dh * t;
        let dcn = dc[j] + dh * og * (one - t * t);
        ai[j] = dcn * gg * ig * (one - ig);
        af[j] = dcn * c_prev[j] * fg * (one - fg);
        ag[j] = dcn * ig * (one - gg * gg);
        ao[j] = d_o * og * (one - og);
        dc[j] = dcn * fg;
    }
}

multiversion! {
    /// LSTM cell backward for one batch row and units `units`. `a` holds the activations
    /// written by [`cell_forward`]; on return it holds d loss / d pre-activation (dG).
    /// `dh` = gradient from above (+ recurrent, when `dh_rec` is non-empty); `dc` carries
    /// d loss / d c from the next step in and to the previous step out.
    pub fn cell_backward<T: Real>(
        units: Units,
        a: &mut [T],
        dh_above: &[T],
        dh_rec: &[T],
        c_prev: &[T],
        tc: &[T],
        dc: &mut [T],
    ) {
        let mut unit = units.range.start;
        while unit < units.range.end {
            let bs = GATE_BLOCK.min(units.hidden - unit);
            let u = unit - units.range.start;
            if bs == GATE_BLOCK {
                let blk = Block { len: GATE_BLOCK, unit: u };
                cell_backward_block(blk, a, dh_above, dh_rec, c_prev, tc, dc);
            } else {
                let blk = Block { len: bs, unit: u };
                cell_backward_block(blk, a, dh_above, dh_rec, c_prev, tc, dc);
            }
            unit += bs;
        }
    }
}

multiversion! {
    /// Fused log-softmax + NLL over `rows` rows of logits `z` [rows, width] (bias `b`
    /// added here). Returns the summed NLL of the targets. With `scale = Some(s)`, `z` is
    /// overwritten by d(s * NLL)/dz = s * (softmax(z) - onehot(target)); otherwise `z` is
    /// left holding z + b. `nll` (empty or [rows]) receives each row's NLL.
    pub fn softmax_nll<T: Real>(
        z: &mut [T],
        width: usize,
        b: &[T],
        targets: &[u32],
        scale: Option<T>,
        nll: &mut [f64],
    ) -> f64 {
        let mut total = 0.0f64;
        for (row, zr) in z.chunks_exact_mut(width).enumerate() {
            let mut mx = T::from_f64(f64::NEG_INFINITY);
            for (x, &bb) in zr.iter_mut().zip(b) {
                *x += bb;
                mx = mx.max(*x);
            }
            let t = targets[row] as usize;
            let zt = zr[t];
            let loss;
            match scale {
                Some(s) => {
                    let mut sum = T::ZERO;
                    for x in zr.iter_mut() {
                        *x = (*x - mx).exp();
                        sum += *x;
                    }
                    loss = (mx + sum.ln() - zt).to_f64();
                    let k = s / sum;
                    for x in zr.iter_mut() {
                        *x *= k;
                    }
                    zr[t] -= s;
                }
                None => {
                    let mut sum = T::ZERO;
                    for &x in zr.iter() {
                        sum += (x - mx).exp();
                    }
                    loss = (mx + sum.ln() - zt).to_f64();
                }
            }
            if !nll.is_empty() {
                nll[row] = loss;
            }
            total += loss;
        }
        total
    }
}

multiversion! {
    /// z[r, :] = -log softmax(z[r, :] + b) for every row (in place); returns the summed
    /// NLL of the targets.
    pub fn neg_log_softmax<T: Real>(z: &mut [T], width: usize, b: &[T], targets: &[u32]) -> f64 {
        let mut total = 0.0f64;
        for (row, zr) in z.chunks_exact_mut(width).enumerate() {
            let mut mx = T::from_f64(f64::NEG_INFINITY);
            for (x, &bb) in zr.iter_mut().zip(b) {
                *x += bb;
                mx = mx.max(*x);
            }
            let mut sum = T::ZERO;
            for &x in zr.iter() {
                sum += (x - mx).exp();
            }
            let lse = mx + sum.ln();
            for x in zr.iter_mut() {
                *x = lse - *x;
            }
            total += zr[targets[row] as usize].to_f64();
        }
        total
    }
}

/// Dropout mask for `len` elements starting at element `first` of (stream, site): each
/// value is 0 with probability p, else 1/(1-p) (inverted dropout).
pub fn dropout_mask<T: Real>(rng: &Philox, stream: u64, first: u64, p: f64, mask: &mut [T]) {
    // Keep iff the 32-bit draw is >= p * 2^32.
    let threshold = (p * 4_294_967_296.0).min(4_294_967_295.0) as u32;
    let keep = T::from_f64(1.0 / (1.0 - p));
    let mut blk = [0u32; 4];
    for (i, m) in mask.iter_mut().enumerate() {
        let idx = first + i as u64;
        if i == 0 || idx & 3 == 0 {
            blk = rng.block(stream, idx >> 2);
        }
        *m = if blk[(idx & 3) as usize] >= threshold {
            keep
        } else {
            T::ZERO
        };
    }
}

multiversion! {
    /// x *= m elementwise.
    pub fn mul_assign<T: Real>(x: &mut [T], m: &[T]) {
        for (a, &b) in x.iter_mut().zip(m) {
            *a *= b;
        }
    }
}

multiversion! {
    /// acc += x elementwise.
    pub fn add_assign<T: Real>(acc: &mut [T], x: &[T]) {
        for (a, &b) in acc.iter_mut().zip(x) {
            *a += b;
        }
    }
}

multiversion! {
    /// Sum of squares in f64 (for the global gradient norm).
    pub fn sum_sq<T: Real>(x: &[T]) -> f64 {
        // Eight f64 lanes: vectorises and keeps the rounding error of a long sum small.
        let mut acc = [0f64; 8];
        let mut chunks = x.chunks_exact(8);
        for c in &mut chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                let v = v.to_f64();
                *a += v * v;
            }
        }
        let mut s: f64 = acc.iter().sum();
        for &v in chunks.remainder() {
            s += v.to_f64() * v.to_f64();
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Purpose;

    #[test]
    fn softmax_nll_matches_direct_formula() {
        let z0: Vec<f64> = (0..12)
            .map(|i| ((i * 37 % 11) as f64) * 0.3 - 1.0)
            .collect();
        let b = vec![0.1, -0.2, 0.3, 0.0];
        let targets = [2u32, 0, 3];
        let mut z = z0.clone();
        let mut per = vec![0.0; 3];
        let total = softmax_nll(&mut z, 4, &b, &targets, Some(0.5), &mut per);
        let mut want_total = 0.0;
        for r in 0..3 {
            let row: Vec<f64> = (0..4).map(|j| z0[r * 4 + j] + b[j]).collect();
            let lse = row.iter().map(|x| x.exp()).sum::<f64>().ln();
            let nll = lse - row[targets[r] as usize];
            assert!((per[r] - nll).abs() < 1e-12);
            want_total += nll;
            for j in 0..4 {
                let p = (row[j] - lse).exp();
                let want = 0.5 * (p - if j == targets[r] as usize { 1.0 } else { 0.0 });
                assert!((z[r * 4 + j] - want).abs() < 1e-12);
            }
        }
        assert!((total - want_total).abs() < 1e-12);
    }

    #[test]
    fn dropout_mask_keeps_the_right_share_and_is_positional() {
        let rng = Philox::new(5, Purpose::Dropout);
        let mut m = vec![0f32; 10_000];
        dropout_mask(&rng, 7, 3, 0.25, &mut m);
        let kept = m.iter().filter(|&&x| x > 0.0).count();
        assert!((kept as f64 / 1e4 - 0.75).abs() < 0.02);
        assert!(m.iter().all(|&x| x == 0.0 || (x - 1.0 / 0.75).abs() < 1e-6));
        // The same elements drawn from another starting point agree.
        let mut tail = vec![0f32; 100];
        dropout_mask(&rng, 7, 503, 0.25, &mut tail);
        assert_eq!(&m[500..600], &tail[..]);
    }

    #[test]
    fn sum_sq_is_exact_enough() {
        let x: Vec<f32> = (0..1001).map(|i| (i as f32 * 0.37).sin()).collect();
        let want: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
        assert!((sum_sq(&x) - want).abs() < 1e-9);
    }
}
