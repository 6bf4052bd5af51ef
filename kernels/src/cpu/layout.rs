//! The CPU backend's internal parameter layout and how it splits work between threads.
//!
//! The internal layout differs from PyTorch's only in the order of the LSTM gate rows:
//! units are grouped in blocks of [`GATE_BLOCK`] (one 256-bit vector of f32), and a
//! block's rows are its i, f, g, o rows in turn. A contiguous range of whole blocks then
//! owns a contiguous range of gate rows, so a thread computes the gates of its own hidden
//! units with one GEMM, and the cell's pointwise math reads the four gates of a unit block
//! as four contiguous vectors.

use crate::layout::{ParamLayout, RowOrder};

/// Hidden units per gate block of the internal layout (one 256-bit vector of f32).
pub const GATE_BLOCK: usize = 8;

/// Copy a flat buffer from PyTorch layout to internal layout (both `layout.total` long).
pub fn to_internal<T: Copy>(layout: &ParamLayout, torch: &[T], internal: &mut [T]) {
    permute(layout, torch, internal, true)
}

/// Copy a flat buffer from internal layout to PyTorch layout (both `layout.total` long).
pub fn to_torch<T: Copy>(layout: &ParamLayout, internal: &[T], torch: &mut [T]) {
    permute(layout, internal, torch, false)
}

fn permute<T: Copy>(layout: &ParamLayout, src: &[T], dst: &mut [T], to_internal: bool) {
    debug_assert_eq!(src.len(), layout.total);
    debug_assert_eq!(dst.len(), layout.total);
    for s in &layout.specs {
        let (a, b) = (&src[s.range()], &mut dst[s.range()]);
        match s.order {
            RowOrder::Plain => b.copy_from_slice(a),
            RowOrder::Gates { hidden } => {
                let width = s.len() / (4 * hidden);
                for gate in 0..4 {
                    for u in 0..hidden {
                        let t = (gate * hidden + u) * width;
                        let i = internal_gate_row(hidden, gate, u) * width;
                        let (from, to) = if to_internal { (t, i) } else { (i, t) };
                        b[to..to + width].copy_from_slice(&a[from..from + width]);
                    }
                }
            }
        }
    }
}

/// Internal row of (gate, unit) for a layer of `hidden` units: units are grouped in blocks
/// of [`GATE_BLOCK`] (the last block may be shorter); a block starting at unit u0 with
/// `bs` units owns rows 4*u0 .. 4*(u0+bs), gate g at 4*u0 + g*bs + (u - u0).
#[inline]
pub fn internal_gate_row(hidden: usize, gate: usize, unit: usize) -> usize {
    let u0 = unit / GATE_BLOCK * GATE_BLOCK;
    let bs = GATE_BLOCK.min(hidden - u0);
    4 * u0 + gate * bs + (unit - u0)
}

/// Split `hidden` units into `parts` contiguous ranges on gate-block boundaries, as evenly
/// as blocks allow. Some ranges are empty when there are more parts than blocks.
pub fn split_units(hidden: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let blocks = hidden.div_ceil(GATE_BLOCK);
    (0..parts)
        .map(|p| {
            let b0 = blocks * p / parts;
            let b1 = blocks * (p + 1) / parts;
            (b0 * GATE_BLOCK).min(hidden)..(b1 * GATE_BLOCK).min(hidden)
        })
        .collect()
}

/// The `p`-th of `parts` contiguous, nearly equal ranges of `0..n`.
pub fn part_range(n: usize, parts: usize, p: usize) -> std::ops::Range<usize> {
    (n * p / parts)..(n * (p + 1) / parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::ModelDims;

    #[test]
    fn gate_permutation_round_trips_and_is_bijective() {
        for hidden in [1usize, 5, 8, 13, 24] {
            let mut seen = vec![false; 4 * hidden];
            for g in 0..4 {
                for u in 0..hidden {
                    let r = internal_gate_row(hidden, g, u);
                    assert!(!seen[r]);
                    seen[r] = true;
                }
            }
            let dims = ModelDims::square(20, 3, hidden, 2).unwrap();
            let lay = ParamLayout::new(dims);
            let torch: Vec<u32> = (0..lay.total as u32).collect();
            let mut int = vec![0; lay.total];
            let mut back = vec![0; lay.total];
            to_internal(&lay, &torch, &mut int);
            to_torch(&lay, &int, &mut back);
            assert_eq!(torch, back);
        }
    }

    #[test]
    fn unit_split_is_on_block_boundaries() {
        let s = split_units(200, 2);
        assert_eq!(s, vec![0..96, 96..200]);
        let s = split_units(5, 3);
        assert_eq!(s.iter().map(|r| r.len()).sum::<usize>(), 5);
        for parts in 1..5 {
            let s = split_units(100, parts);
            assert_eq!(s[0].start, 0);
            assert_eq!(s[parts - 1].end, 100);
            for w in s.windows(2) {
                assert_eq!(w[0].end, w[1].start);
                assert_eq!(w[0].end % GATE_BLOCK, 0);
            }
        }
    }
}
