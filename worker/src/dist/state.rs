//! The LSTM state of a checkpoint across ranks: each rank holds its streams' state, a
//! checkpoint holds the whole batch's, so a run resumes at any worker count; and the
//! parameter checksum by which the job's owner checks that all ranks hold one model.

use std::ops::Range;

use lightrnn_kernels::State;

use super::collective::Collective;
use lightrnn_core::util::share;
use lightrnn_core::{Error, Result};

/// SHA-256 (hex) of parameters in PyTorch layout: equal on all ranks of a healthy job.
pub fn params_checksum(params: &[f32]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for x in params {
        h.update(x.to_le_bytes());
    }
    lightrnn_core::data::vocab::hex(&h.finalize())
}

/// The whole batch's carried state [layers, B, hidden] from every rank's share of it
/// (each rank holds streams `share(B, world, rank)`); the same on all ranks.
pub fn gather_state(
    coll: &mut dyn Collective,
    local: Option<&State<f32>>,
    global_batch: usize,
    layers: usize,
    hidden: usize,
) -> Result<Option<State<f32>>> {
    let mine = share(global_batch, coll.world(), coll.rank());
    // Ranks without a state yet (before their first step) contribute zeros, the state a
    // fresh stream starts from.
    let mut flags = [f32::from(local.is_some())];
    coll.all_reduce_sum(&mut flags)?;
    if flags[0] == 0.0 {
        return Ok(None);
    }
    let n = layers * global_batch * hidden;
    let (mut h, mut c) = (vec![0f32; n], vec![0f32; n]);
    if let Some(st) = local {
        if st.batch != mine.len() || st.h.len() != layers * st.batch * hidden {
            return Err(Error::Data(format!(
                "rank {} holds a state of {} streams, its share is {}",
                coll.rank(),
                st.batch,
                mine.len()
            )));
        }
        for l in 0..layers {
            let dst = (l * global_batch + mine.start) * hidden;
            let src = l * st.batch * hidden;
            let len = st.batch * hidden;
            h[dst..dst + len].copy_from_slice(&st.h[src..src + len]);
            c[dst..dst + len].copy_from_slice(&st.c[src..src + len]);
        }
    }
    // Every element is non-zero on at most one rank: the sum is an exact gather.
    coll.all_reduce_sum(&mut h)?;
    coll.all_reduce_sum(&mut c)?;
    Ok(Some(State {
        batch: global_batch,
        h,
        c,
    }))
}

/// Consecutive groups of streams' states [layers, b_i, hidden] as one state of all their
/// streams, in order.
pub fn concat_states(parts: &[State<f32>], layers: usize, hidden: usize) -> State<f32> {
    let b: usize = parts.iter().map(|p| p.batch).sum();
    let (mut h, mut c) = (Vec::with_capacity(layers * b * hidden), Vec::new());
    c.reserve(layers * b * hidden);
    for l in 0..layers {
        for p in parts {
            let s = l * p.batch * hidden;
            h.extend_from_slice(&p.h[s..s + p.batch * hidden]);
            c.extend_from_slice(&p.c[s..s + p.batch * hidden]);
        }
    }
    State { batch: b, h, c }
}

/// Streams `range` of a whole batch's state [layers, B, hidden].
pub fn slice_state(
    st: &State<f32>,
    range: Range<usize>,
    layers: usize,
    hidden: usize,
) -> Result<State<f32>> {
    if range.end > st.batch || st.h.len() != layers * st.batch * hidden {
        return Err(Error::Data(format!(
            "a state of {} streams has no streams {range:?}",
            st.batch
        )));
    }
    let b = range.len();
    let (mut h, mut c) = (Vec::with_capacity(layers * b * hidden), Vec::new());
    c.reserve(layers * b * hidden);
    for l in 0..layers {
        let s = (l * st.batch + range.start) * hidden;
        h.extend_from_slice(&st.h[s..s + b * hidden]);
        c.extend_from_slice(&st.c[s..s + b * hidden]);
    }
    Ok(State { batch: b, h, c })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sliced_state_gathers_back_to_the_whole() {
        let (layers, b, hid) = (2, 5, 3);
        let whole = State {
            batch: b,
            h: (0..layers * b * hid).map(|x| x as f32).collect(),
            c: (0..layers * b * hid).map(|x| -(x as f32)).collect(),
        };
        let part = slice_state(&whole, 1..3, layers, hid).unwrap();
        assert_eq!(part.batch, 2);
        assert_eq!(part.h[..3], [3.0, 4.0, 5.0]);
        assert_eq!(part.h[6..9], [18.0, 19.0, 20.0]);
        let mut single = crate::dist::collective::Single;
        let back = gather_state(&mut single, Some(&whole), b, layers, hid)
            .unwrap()
            .unwrap();
        assert_eq!(back.h, whole.h);
        assert_eq!(back.c, whole.c);
        assert!(slice_state(&whole, 4..6, layers, hid).is_err());
        let parts: Vec<State<f32>> = [0..2, 2..3, 3..5]
            .into_iter()
            .map(|r| slice_state(&whole, r, layers, hid).unwrap())
            .collect();
        let joined = concat_states(&parts, layers, hid);
        assert_eq!(
            (joined.batch, &joined.h, &joined.c),
            (b, &whole.h, &whole.c)
        );
        assert!(
            gather_state(&mut single, None, b, layers, hid)
                .unwrap()
                .is_none()
        );
    }
}
