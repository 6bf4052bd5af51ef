//! Model shape and parameter layout.
//!
//! Parameters travel in PyTorch's layout (names and shapes of the reference `LightRNN`
//! module: `emb_r.weight`, `lstm.weight_ih_l0`, ..., gates i,f,g,o stacked along rows), so a
//! checkpoint's tensors load into `torch.nn.LSTM` one to one. Inside a backend they live in
//! one flat buffer (one all-reduce, one optimizer loop, one norm) in the *internal* layout,
//! which differs only in the order of the LSTM gate rows: units are grouped in blocks of
//! [`GATE_BLOCK`], and a block's rows are its i, f, g, o rows in turn. A contiguous range of
//! whole blocks then owns a contiguous range of gate rows, so a thread computes the gates
//! of its own hidden units with one GEMM, and the cell's pointwise math reads the four gates
//! of a unit block as four contiguous vectors.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Hidden units per gate block of the internal layout (one 256-bit vector of f32).
pub const GATE_BLOCK: usize = 8;

/// The sizes that fix a LightRNN model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelDims {
    /// Vocabulary size V.
    pub vocab: usize,
    /// Table rows R.
    pub rows: usize,
    /// Table columns C (R * C >= V).
    pub cols: usize,
    /// Input vector size n.
    pub emb: usize,
    /// LSTM hidden size m.
    pub hidden: usize,
    /// LSTM layers.
    pub layers: usize,
}

impl ModelDims {
    /// The square table of the paper: R = C = ceil(sqrt(V)).
    pub fn square(vocab: usize, emb: usize, hidden: usize, layers: usize) -> Result<Self> {
        let side = (vocab as f64).sqrt().ceil() as usize;
        // Guard the float rounding at perfect squares and beyond 2^52.
        let side = (side.saturating_sub(1)..=side + 1)
            .find(|s| s * s >= vocab)
            .unwrap_or(side);
        let d = Self {
            vocab,
            rows: side,
            cols: side,
            emb,
            hidden,
            layers,
        };
        d.validate()?;
        Ok(d)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.vocab < 2 {
            return bad(format!(
                "vocabulary of {} words: need at least 2",
                self.vocab
            ));
        }
        if self.rows * self.cols < self.vocab {
            return bad(format!(
                "table {}x{} has fewer cells than the {} words",
                self.rows, self.cols, self.vocab
            ));
        }
        if self.rows > u32::MAX as usize / 2 || self.cols > u32::MAX as usize / 2 {
            return bad("table side too large".into());
        }
        if self.emb == 0 || self.hidden == 0 || self.layers == 0 {
            return bad(format!(
                "emb={}, hidden={}, layers={}: all must be positive",
                self.emb, self.hidden, self.layers
            ));
        }
        Ok(())
    }

    /// Rows of the joint input table [X_r; X_c].
    pub fn input_rows(&self) -> usize {
        self.rows + self.cols
    }

    /// Input width of LSTM layer `l`.
    pub fn layer_input(&self, l: usize) -> usize {
        if l == 0 { self.emb } else { self.hidden }
    }
}

/// How a parameter's rows are stored inside a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowOrder {
    /// Same as PyTorch.
    Plain,
    /// LSTM gate rows [4m, width]: PyTorch's i,f,g,o blocks of m rows, stored block-interleaved.
    Gates { hidden: usize },
}

/// One named tensor inside the flat parameter buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    /// PyTorch name, e.g. `lstm.weight_hh_l1`.
    pub name: String,
    /// PyTorch shape.
    pub shape: Vec<usize>,
    /// Offset in the flat buffer (same in both layouts).
    pub offset: usize,
    pub order: RowOrder,
    /// How [`crate::cpu`] initialises it.
    pub init: Init,
}

impl ParamSpec {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// Initial distribution of a parameter (those of the reference model).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Uniform(f64),
    Zero,
}

/// Where every parameter sits in the flat buffer.
#[derive(Clone, Debug)]
pub struct ParamLayout {
    pub dims: ModelDims,
    pub specs: Vec<ParamSpec>,
    pub total: usize,
}

/// Indices into [`ParamLayout::specs`] of one LSTM layer's tensors.
#[derive(Clone, Copy, Debug)]
pub struct LayerParams {
    pub w_ih: usize,
    pub w_hh: usize,
    pub b_ih: usize,
    pub b_hh: usize,
}

impl ParamLayout {
    /// The layout: X_r and X_c adjacent (the joint input table), then each LSTM layer,
    /// then the row and column output layers.
    pub fn new(dims: ModelDims) -> Self {
        let ModelDims {
            rows,
            cols,
            emb,
            hidden,
            layers,
            ..
        } = dims;
        let mut specs = Vec::new();
        let mut offset = 0;
        let mut push = |name: String, shape: Vec<usize>, order, init| {
            let len: usize = shape.iter().product();
            specs.push(ParamSpec {
                name,
                shape,
                offset,
                order,
                init,
            });
            offset += len;
        };
        push(
            "emb_r.weight".into(),
            vec![rows, emb],
            RowOrder::Plain,
            Init::Uniform(0.1),
        );
        push(
            "emb_c.weight".into(),
            vec![cols, emb],
            RowOrder::Plain,
            Init::Uniform(0.1),
        );
        let k = 1.0 / (hidden as f64).sqrt();
        let gates = RowOrder::Gates { hidden };
        for l in 0..layers {
            let input = dims.layer_input(l);
            push(
                format!("lstm.weight_ih_l{l}"),
                vec![4 * hidden, input],
                gates,
                Init::Uniform(k),
            );
            push(
                format!("lstm.weight_hh_l{l}"),
                vec![4 * hidden, hidden],
                gates,
                Init::Uniform(k),
            );
            push(
                format!("lstm.bias_ih_l{l}"),
                vec![4 * hidden],
                gates,
                Init::Uniform(k),
            );
            push(
                format!("lstm.bias_hh_l{l}"),
                vec![4 * hidden],
                gates,
                Init::Uniform(k),
            );
        }
        push(
            "out_r.weight".into(),
            vec![rows, hidden],
            RowOrder::Plain,
            Init::Uniform(0.1),
        );
        push("out_r.bias".into(), vec![rows], RowOrder::Plain, Init::Zero);
        push(
            "out_c.weight".into(),
            vec![cols, hidden],
            RowOrder::Plain,
            Init::Uniform(0.1),
        );
        push("out_c.bias".into(), vec![cols], RowOrder::Plain, Init::Zero);
        Self {
            dims,
            specs,
            total: offset,
        }
    }

    pub fn index(&self, name: &str) -> Option<usize> {
        self.specs.iter().position(|s| s.name == name)
    }

    pub fn spec(&self, name: &str) -> Option<&ParamSpec> {
        self.specs.iter().find(|s| s.name == name)
    }

    /// The joint input table [X_r; X_c] as one range ([R + C, n]).
    pub fn input_table(&self) -> std::ops::Range<usize> {
        let r = &self.specs[0];
        r.offset..r.offset + self.dims.input_rows() * self.dims.emb
    }

    pub fn layer(&self, l: usize) -> LayerParams {
        let base = 2 + 4 * l;
        LayerParams {
            w_ih: base,
            w_hh: base + 1,
            b_ih: base + 2,
            b_hh: base + 3,
        }
    }

    /// Indices of (out_r.weight, out_r.bias, out_c.weight, out_c.bias).
    pub fn heads(&self) -> [usize; 4] {
        let b = 2 + 4 * self.dims.layers;
        [b, b + 1, b + 2, b + 3]
    }

    /// Copy a flat buffer from PyTorch layout to internal layout.
    pub fn to_internal<T: Copy>(&self, torch: &[T], internal: &mut [T]) {
        self.permute(torch, internal, true)
    }

    /// Copy a flat buffer from internal layout to PyTorch layout.
    pub fn to_torch<T: Copy>(&self, internal: &[T], torch: &mut [T]) {
        self.permute(internal, torch, false)
    }

    fn permute<T: Copy>(&self, src: &[T], dst: &mut [T], to_internal: bool) {
        assert_eq!(src.len(), self.total);
        assert_eq!(dst.len(), self.total);
        for s in &self.specs {
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

    #[test]
    fn square_table_covers_vocabulary() {
        for v in [
            2usize, 3, 4, 5, 9, 10, 50, 10_000, 10_001, 1_000_000, 793_471,
        ] {
            let d = ModelDims::square(v, 4, 4, 1).unwrap();
            assert!(d.rows * d.cols >= v);
            assert!(
                (d.rows - 1) * (d.cols - 1) < v,
                "V={v}: {}x{} is not minimal",
                d.rows,
                d.cols
            );
        }
        assert!(ModelDims::square(1, 4, 4, 1).is_err());
        assert!(ModelDims::square(10, 0, 4, 1).is_err());
    }

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
            lay.to_internal(&torch, &mut int);
            lay.to_torch(&int, &mut back);
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

    #[test]
    fn layout_matches_reference_parameter_count() {
        // ptb-small: V=10k, n=m=200, 2 layers -> 723,400 parameters (peers/RESULTS.md).
        let lay = ParamLayout::new(ModelDims::square(10_000, 200, 200, 2).unwrap());
        assert_eq!(lay.total, 723_400);
        // n=m=512, 1 layer, V=10k: 2.31 M.
        let lay = ParamLayout::new(ModelDims::square(10_000, 512, 512, 1).unwrap());
        assert_eq!(lay.total, 2_306_248);
    }
}
