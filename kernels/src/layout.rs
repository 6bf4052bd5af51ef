//! Model shape, parameter layout and word allocations, shared by every backend.
//!
//! Parameters travel in PyTorch's layout (names and shapes of the reference `LightRNN`
//! module: `emb_r.weight`, `lstm.weight_ih_l0`, ..., gates i,f,g,o stacked along rows), so a
//! checkpoint's tensors load into `torch.nn.LSTM` one to one. [`ParamLayout`] says where
//! each tensor sits in one flat buffer (one all-reduce, one optimizer loop, one norm); a
//! backend may store the rows of an LSTM gate tensor ([`RowOrder::Gates`]) in its own
//! order (the CPU's is in [`crate::cpu::layout`]) and converts at the boundary.
//!
//! An allocation is the word -> cell table (cell = row * C + col): V distinct cells of the
//! R x C table ([`check_allocation`]); training starts from [`random_allocation`] and the
//! parameters from [`ParamLayout::initial_params`], the same bits in every backend.
//!
//! Activations of a batch are stored parity-major by every backend ([`row_of`]).

use serde::{Deserialize, Serialize};

use crate::rng::{Philox, Purpose};
use crate::{Error, Real, Result};

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

    /// `l` names a layer of the model.
    pub fn check_layer(&self, l: usize) -> Result<()> {
        if l >= self.layers {
            return Err(Error::Shape(format!(
                "layer {l} of a {}-layer model",
                self.layers
            )));
        }
        Ok(())
    }

    /// Input width of LSTM layer `l`.
    pub fn layer_input(&self, l: usize) -> usize {
        if l == 0 { self.emb } else { self.hidden }
    }
}

/// What a parameter's rows are, for backends that store them in an order of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowOrder {
    /// Rows stored as PyTorch stores them by every backend.
    Plain,
    /// LSTM gate rows [4m, width]: PyTorch's i, f, g, o blocks of m rows.
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
    /// How the backends initialise it.
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

    /// The reference initialisation drawn from `seed`, in PyTorch layout (U(-0.1, 0.1)
    /// tables and output weights, zero output biases, U(-1/sqrt(m), 1/sqrt(m)) LSTM, as
    /// torch): tensor i from Philox stream i of [`Purpose::Init`], element by element, so
    /// every backend starts from the same bits.
    pub fn initial_params<T: Real>(&self, seed: u64) -> Vec<T> {
        let rng = Philox::new(seed, Purpose::Init);
        let mut torch = vec![T::ZERO; self.total];
        for (i, s) in self.specs.iter().enumerate() {
            let mut st = rng.stream(i as u64);
            for x in &mut torch[s.range()] {
                *x = match s.init {
                    Init::Zero => T::ZERO,
                    Init::Uniform(a) => T::from_f64((2.0 * st.next_f64() - 1.0) * a),
                };
            }
        }
        torch
    }

    /// A flat parameter buffer of `len` values fits this layout.
    pub fn check_len(&self, len: usize) -> Result<()> {
        if len != self.total {
            return Err(Error::Shape(format!(
                "parameter buffer has {len} values, the model {}",
                self.total
            )));
        }
        Ok(())
    }
}

/// Storage row of step `s` of stream `b` in a batch of `tt` words x `bb` streams: rows are
/// parity-major (step s = 2t + p is row ((p * T) + t) * B + b), so the T*B rows each head
/// reads are one contiguous matrix and each step's B rows are contiguous.
#[inline(always)]
pub fn row_of(tt: usize, bb: usize, s: usize, b: usize) -> usize {
    (((s & 1) * tt) + (s >> 1)) * bb + b
}

/// A uniformly random word -> cell table drawn from `seed` (the paper's initial allocation).
pub fn random_allocation(dims: &ModelDims, seed: u64) -> Vec<u32> {
    let mut cells: Vec<u32> = (0..(dims.rows * dims.cols) as u32).collect();
    Philox::new(seed, Purpose::Allocation)
        .stream(0)
        .shuffle(&mut cells);
    cells.truncate(dims.vocab);
    cells
}

/// Check that `cells` assigns the V words distinct cells of the R x C table.
pub fn check_allocation(dims: &ModelDims, cells: &[u32]) -> Result<()> {
    check_cells(dims.vocab, dims.rows * dims.cols, cells)
}

/// Check that `cells` gives each of `vocab` words its own cell below `table_cells`.
pub fn check_cells(vocab: usize, table_cells: usize, cells: &[u32]) -> Result<()> {
    if cells.len() != vocab {
        return Err(Error::Shape(format!(
            "allocation has {} words, the model {vocab}",
            cells.len(),
        )));
    }
    let mut seen = vec![false; table_cells];
    for (w, &c) in cells.iter().enumerate() {
        let c = c as usize;
        if c >= table_cells {
            return Err(Error::Shape(format!(
                "word {w} is allocated cell {c}, outside the {table_cells}-cell table"
            )));
        }
        if std::mem::replace(&mut seen[c], true) {
            return Err(Error::Shape(format!(
                "cell {c} is allocated to two words (one is {w})"
            )));
        }
    }
    Ok(())
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
    fn random_allocations_are_valid_and_bad_ones_refused() {
        let d = ModelDims::square(10, 4, 4, 1).unwrap();
        let a = random_allocation(&d, 3);
        check_allocation(&d, &a).unwrap();
        assert_ne!(a, random_allocation(&d, 4));
        let msg = |cells: &[u32]| check_allocation(&d, cells).unwrap_err().to_string();
        assert!(msg(&a[..9]).contains("9 words"));
        let mut twice = a.clone();
        twice[1] = twice[0];
        assert!(msg(&twice).contains("two words"));
        let mut outside = a;
        outside[2] = 16;
        assert!(msg(&outside).contains("outside the 16-cell table"));
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
