//! Step-by-step inference of one stream (generation, scoring), with the kernels the CPU
//! backend trains and evaluates with: the same internal layout, GEMMs and LSTM cell, and
//! layer 0's input projection added to the recurrent product in the same order as the
//! evaluation pass, so a word's probabilities here are those `eval` measures.

use super::gemm::{Dst, Mat, gemm};
use super::layout::to_internal;
use super::simd;
use crate::layout::{ModelDims, ParamLayout};
use crate::{Error, Result};

/// Which input table a step reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    /// Row vector r of X_r (the first step of a word).
    Row(usize),
    /// Column vector c of X_c (the second step of a word).
    Col(usize),
}

/// Which output head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Head {
    /// P_r: the next word's row.
    Rows,
    /// P_c: its column, after its row has been read.
    Cols,
}

/// The LSTM state of one stream: h, c [layers, hidden].
#[derive(Clone, Debug, PartialEq)]
pub struct StepState {
    pub h: Vec<f32>,
    pub c: Vec<f32>,
}

/// A model ready for single-stream steps.
pub struct Stepper {
    layout: ParamLayout,
    /// Parameters in the internal layout.
    params: Vec<f32>,
    /// Row-major transposes of the weights products multiply from the right, by spec
    /// index (W_ih^T [in, 4m], W_hh^T [m, 4m], W_r^T [m, R], W_c^T [m, C]).
    shadow: Vec<Vec<f32>>,
    /// b_ih + b_hh of each layer [4m], internal layout.
    bias: Vec<Vec<f32>>,
}

fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = src[r * cols + c];
        }
    }
    t
}

impl Stepper {
    /// From parameters in PyTorch layout.
    pub fn new(dims: ModelDims, torch: &[f32]) -> Result<Self> {
        dims.validate()?;
        let layout = ParamLayout::new(dims);
        if torch.len() != layout.total {
            return Err(Error::Shape(format!(
                "parameter buffer has {} values, the model {}",
                torch.len(),
                layout.total
            )));
        }
        let mut params = vec![0f32; layout.total];
        to_internal(&layout, torch, &mut params);
        let mut shadow = vec![Vec::new(); layout.specs.len()];
        let mut transposed: Vec<usize> = (0..dims.layers)
            .flat_map(|l| {
                let lp = layout.layer(l);
                [lp.w_ih, lp.w_hh]
            })
            .collect();
        let [wr, _, wc, _] = layout.heads();
        transposed.extend([wr, wc]);
        for i in transposed {
            let s = &layout.specs[i];
            shadow[i] = transpose(&params[s.range()], s.shape[0], s.shape[1]);
        }
        let bias = (0..dims.layers)
            .map(|l| {
                let lp = layout.layer(l);
                let (bi, bh) = (&layout.specs[lp.b_ih], &layout.specs[lp.b_hh]);
                params[bi.range()]
                    .iter()
                    .zip(&params[bh.range()])
                    .map(|(a, b)| a + b)
                    .collect()
            })
            .collect();
        Ok(Self {
            layout,
            params,
            shadow,
            bias,
        })
    }

    pub fn dims(&self) -> ModelDims {
        self.layout.dims
    }

    /// The state a stream starts from (zeros).
    pub fn zero_state(&self) -> StepState {
        let d = self.layout.dims;
        StepState {
            h: vec![0.0; d.layers * d.hidden],
            c: vec![0.0; d.layers * d.hidden],
        }
    }

    /// One LSTM step (every layer) from `from` on `input`. Panics on an index outside its
    /// table; callers take indices from the model's allocation.
    pub fn step(&self, from: &StepState, input: Input) -> StepState {
        let d = self.layout.dims;
        let (m, m4, n) = (d.hidden, 4 * d.hidden, d.emb);
        let table = &self.params[self.layout.input_table()];
        let id = match input {
            Input::Row(r) => r,
            Input::Col(c) => d.rows + c,
        };
        let mut out = from.clone();
        let mut g = vec![0f32; m4];
        let mut proj = vec![0f32; m4];
        let mut tc = vec![0f32; m];
        for l in 0..d.layers {
            let lp = self.layout.layer(l);
            let inp = d.layer_input(l);
            let hprev = &from.h[l * m..(l + 1) * m];
            let (w_ih_t, w_hh_t) = (&self.shadow[lp.w_ih], &self.shadow[lp.w_hh]);
            // SAFETY: every view is a live buffer of the sizes given; dst does not overlap.
            unsafe {
                if l == 0 {
                    // As the evaluation pass: the input projection on its own, added before the cell.
                    let x = &table[id * n..(id + 1) * n];
                    gemm(
                        1,
                        m4,
                        n,
                        Dst::rows(proj.as_mut_ptr(), m4),
                        false,
                        Mat::rows(x, n),
                        Mat::rows(w_ih_t, m4),
                    );
                    gemm(
                        1,
                        m4,
                        m,
                        Dst::rows(g.as_mut_ptr(), m4),
                        false,
                        Mat::rows(hprev, m),
                        Mat::rows(w_hh_t, m4),
                    );
                } else {
                    let x = &out.h[(l - 1) * m..l * m];
                    gemm(
                        1,
                        m4,
                        inp,
                        Dst::rows(g.as_mut_ptr(), m4),
                        false,
                        Mat::rows(x, inp),
                        Mat::rows(w_ih_t, m4),
                    );
                    gemm(
                        1,
                        m4,
                        m,
                        Dst::rows(g.as_mut_ptr(), m4),
                        true,
                        Mat::rows(hprev, m),
                        Mat::rows(w_hh_t, m4),
                    );
                }
            }
            let (h_l, c_l) = (l * m..(l + 1) * m, l * m..(l + 1) * m);
            let mut h = vec![0f32; m];
            if l == 0 {
                simd::add_assign(&mut g, &proj);
            }
            simd::cell_forward(
                simd::Units {
                    hidden: m,
                    range: 0..m,
                },
                &mut g,
                &self.bias[l],
                &from.c[c_l.clone()],
                &mut out.c[c_l],
                &mut tc,
                &mut h,
            );
            out.h[h_l].copy_from_slice(&h);
        }
        out
    }

    /// Logits (bias included) of `head` at state `st` (its top layer's output).
    pub fn logits(&self, st: &StepState, head: Head) -> Vec<f32> {
        let d = self.layout.dims;
        let m = d.hidden;
        let [wr, br, wc, bc] = self.layout.heads();
        let (w, b, k) = match head {
            Head::Rows => (wr, br, d.rows),
            Head::Cols => (wc, bc, d.cols),
        };
        let top = &st.h[(d.layers - 1) * m..d.layers * m];
        let mut z = vec![0f32; k];
        // SAFETY: live buffers of the sizes given; z does not overlap the inputs.
        unsafe {
            gemm(
                1,
                k,
                m,
                Dst::rows(z.as_mut_ptr(), k),
                false,
                Mat::rows(top, m),
                Mat::rows(&self.shadow[w], k),
            );
        }
        for (x, &bias) in z.iter_mut().zip(&self.params[self.layout.specs[b].range()]) {
            *x += bias;
        }
        z
    }
}
