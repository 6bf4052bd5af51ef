//! The parameters' layout on the device: PyTorch's tensors in [`ParamLayout`] order, each
//! starting at a 16-byte boundary (the padding between them is zero and stays zero: no
//! kernel writes it, every optimizer leaves a zero parameter with a zero gradient at
//! zero), so every GEMM operand that is a parameter or its gradient is aligned as
//! cuBLAS's fast kernels need. The two input tables stay adjacent: a batch's ids index
//! them as one table. Everything the host sees (parameters, gradients, optimizer state,
//! checkpoints) is PyTorch's layout; only the device holds the padded one.

use super::buffers::pad4;
use crate::layout::ParamLayout;

/// Where each tensor of a [`ParamLayout`] lies in the device's buffers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevLayout {
    /// Device offset (in f32s) of each spec.
    pub offsets: Vec<usize>,
    /// Elements of a device buffer.
    pub total: usize,
}

impl DevLayout {
    pub fn new(l: &ParamLayout) -> Self {
        let mut offsets = Vec::with_capacity(l.specs.len());
        let mut at = 0;
        for (i, s) in l.specs.iter().enumerate() {
            // The column table follows the row table directly (one table for the gather).
            if i != 1 {
                at = pad4(at);
            }
            offsets.push(at);
            at += s.len();
        }
        Self {
            offsets,
            total: pad4(at),
        }
    }

    /// The device offset of element `i` of the input tables (rows, then columns).
    pub fn input_table(&self) -> usize {
        self.offsets[0]
    }

    /// `torch` (PyTorch's layout) as a device buffer's contents.
    pub fn expand(&self, l: &ParamLayout, torch: &[f32]) -> Vec<f32> {
        self.expand_fill(l, torch, 0.0)
    }

    /// As [`Self::expand`], the padding filled with `pad` (an optimizer's initial state).
    pub fn expand_fill(&self, l: &ParamLayout, torch: &[f32], pad: f32) -> Vec<f32> {
        let mut out = vec![pad; self.total];
        for (s, &at) in l.specs.iter().zip(&self.offsets) {
            out[at..at + s.len()].copy_from_slice(&torch[s.range()]);
        }
        out
    }

    /// A device buffer's contents in PyTorch's layout.
    pub fn compact(&self, l: &ParamLayout, dev: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0; l.total];
        for (s, &at) in l.specs.iter().zip(&self.offsets) {
            out[s.range()].copy_from_slice(&dev[at..at + s.len()]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::ModelDims;

    #[test]
    fn tensors_start_at_16_bytes_and_round_trip() {
        // V = 100k: R = C = 317, so the column head starts at 1 mod 4 in PyTorch's layout.
        let dims = ModelDims::square(100_000, 10, 12, 2).unwrap();
        let l = ParamLayout::new(dims);
        let d = DevLayout::new(&l);
        assert!(
            l.specs.iter().any(|s| s.offset % 4 != 0),
            "the case padding is for"
        );
        for (i, &at) in d.offsets.iter().enumerate() {
            if i != 1 {
                assert_eq!(at % 4, 0, "{}", l.specs[i].name);
            }
        }
        assert_eq!(
            d.offsets[1],
            d.offsets[0] + l.specs[0].len(),
            "adjacent tables"
        );
        let torch: Vec<f32> = (0..l.total).map(|i| i as f32).collect();
        let dev = d.expand(&l, &torch);
        assert_eq!(dev.len(), d.total);
        assert_eq!(d.compact(&l, &dev), torch);
        assert_eq!(
            dev.iter().filter(|&&x| x == 0.0).count(),
            d.total - l.total + 1,
            "padding is zero (and so is element 0)"
        );
    }
}
