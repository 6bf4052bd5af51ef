//! What moves with a word when it changes cells.
//!
//! The allocation objective is the training loss with the hidden states held fixed, i.e.
//! it places every word in the cell whose *output* row and column vectors already predict
//! it best; so the output layers (W_r, b_r, W_c, b_c) stay with their cells. The *input*
//! vectors of a cell were trained for its old words: with [`Carry::Inputs`] each row's
//! (column's) new input vector is the frequency-weighted mean of the old input vectors of
//! the words that now occupy it, so every word keeps (an average of) the input it had.
//! [`Carry::None`] keeps every vector with its cell (the paper's and the PyTorch
//! reference's procedure); [`Carry::All`] also carries the output vectors with the words.

use serde::{Deserialize, Serialize};

use lightrnn_kernels::ParamLayout;

use crate::{AllocError, Result};

/// Which vectors follow the words (`realloc_carry`: "none", "inputs" or "all").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Carry {
    None,
    Inputs,
    All,
}

impl std::str::FromStr for Carry {
    type Err = AllocError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Self::None),
            "inputs" => Ok(Self::Inputs),
            "all" => Ok(Self::All),
            o => Err(AllocError::Input(format!(
                "realloc_carry {o:?}: expected none, inputs or all"
            ))),
        }
    }
}

/// Move vectors of `params` (PyTorch layout) from the old to the new allocation: for each
/// row (column), the frequency-weighted mean of the old vectors of its new words.
/// Rows and columns left without words keep their vectors.
pub fn carry_vectors(
    layout: &ParamLayout,
    params: &mut [f32],
    old: &[u32],
    new: &[u32],
    counts: &[u64],
    carry: Carry,
) -> Result<()> {
    if carry == Carry::None {
        return Ok(());
    }
    let d = layout.dims;
    let cols = d.cols as u32;
    let mut names = vec![("emb_r.weight", true), ("emb_c.weight", false)];
    if carry == Carry::All {
        names.extend([
            ("out_r.weight", true),
            ("out_r.bias", true),
            ("out_c.weight", false),
            ("out_c.bias", false),
        ]);
    }
    for (name, by_row) in names {
        let spec = layout
            .spec(name)
            .ok_or_else(|| AllocError::Input(format!("the model has no {name}")))?;
        let n = spec.shape[0];
        let width = spec.len() / n;
        let src = params[spec.range()].to_vec();
        let mut acc = vec![0f64; n * width];
        let mut weight = vec![0f64; n];
        for w in 0..d.vocab {
            let pick = |c: u32| {
                if by_row {
                    (c / cols) as usize
                } else {
                    (c % cols) as usize
                }
            };
            let (from, to) = (pick(old[w]), pick(new[w]));
            // +1: words unseen in training still pull their old vector a little.
            let f = counts[w] as f64 + 1.0;
            weight[to] += f;
            for k in 0..width {
                acc[to * width + k] += f * src[from * width + k] as f64;
            }
        }
        let dst = &mut params[spec.range()];
        for r in 0..n {
            if weight[r] > 0.0 {
                for k in 0..width {
                    dst[r * width + k] = (acc[r * width + k] / weight[r]) as f32;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lightrnn_kernels::ModelDims;

    #[test]
    fn input_vectors_follow_their_words_as_weighted_means() {
        // 4 words in a 2 x 2 table, emb 1: row vectors [10, 20], column vectors [1, 2].
        let dims = ModelDims {
            vocab: 4,
            rows: 2,
            cols: 2,
            emb: 1,
            hidden: 1,
            layers: 1,
        };
        let layout = ParamLayout::new(dims);
        let mut p = vec![0f32; layout.total];
        p[layout.spec("emb_r.weight").unwrap().range()].copy_from_slice(&[10.0, 20.0]);
        p[layout.spec("emb_c.weight").unwrap().range()].copy_from_slice(&[1.0, 2.0]);
        let out_before = p[layout.spec("out_r.weight").unwrap().range()].to_vec();
        let old = [0u32, 1, 2, 3]; // w0 (0,0) w1 (0,1) w2 (1,0) w3 (1,1)
        let new = [3u32, 0, 1, 2]; // w0 -> (1,1), w1 -> (0,0), w2 -> (0,1), w3 -> (1,0)
        let counts = [3u64, 1, 0, 7];
        carry_vectors(&layout, &mut p, &old, &new, &counts, Carry::Inputs).unwrap();
        let er = &p[layout.spec("emb_r.weight").unwrap().range()];
        // Row 0 now holds w1 (old row 0, weight 2) and w2 (old row 1, weight 1).
        assert!((er[0] - (2.0 * 10.0 + 1.0 * 20.0) / 3.0).abs() < 1e-5);
        // Row 1 holds w0 (old row 0, weight 4) and w3 (old row 1, weight 8).
        assert!((er[1] - (4.0 * 10.0 + 8.0 * 20.0) / 12.0).abs() < 1e-5);
        let ec = &p[layout.spec("emb_c.weight").unwrap().range()];
        // Column 0: w1 (old col 1, 2) and w3 (old col 1, 8); column 1: w0 (old 0, 4), w2 (old 0, 1).
        assert!((ec[0] - 2.0).abs() < 1e-6 && (ec[1] - 1.0).abs() < 1e-6);
        assert_eq!(
            p[layout.spec("out_r.weight").unwrap().range()],
            out_before[..],
            "outputs stay with cells"
        );
        assert!("some".parse::<Carry>().is_err());
    }
}
