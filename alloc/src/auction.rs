//! Forward auction (Bertsekas) with epsilon-scaling on the candidate graph: every
//! unassigned word bids for its cheapest cell under prices (cost + price), raising that
//! cell's price by the gap to its second choice plus eps and displacing the cell's
//! owner. Each phase ends eps-optimal; eps shrinks geometrically between phases, prices
//! carry over. Unlike augmenting paths, whose searches grow long when few cells are left,
//! every bid costs one pass over one word's candidates, so the work stays near-linear.
//!
//! A word leaves the auction ("stuck", for the repair pass) when its best priced
//! candidate costs more than `give_up[w]`, or after `MAX_BIDS` bids in one phase: a
//! cluster of words with fewer distinct candidate cells than words would otherwise bid
//! forever.

use super::sap::{Graph, NONE};

/// Bids one word may place in one phase.
const MAX_BIDS: u32 = 64;

pub struct Outcome {
    /// word -> cell or NONE (stuck).
    pub x: Vec<u32>,
    pub bids: u64,
    pub phases: u32,
}

/// `price` is the warm start and is updated; `give_up[w]` is the priced value above which
/// word w leaves for the repair pass.
pub fn run(
    g: &Graph,
    price: &mut [f64],
    give_up: &[f64],
    eps_final: f64,
    eps_start: f64,
) -> Outcome {
    let words = g.words();
    let mut owner = vec![NONE; g.cells];
    let mut x = vec![NONE; words];
    let mut bids = 0u64;
    let mut phases = 0;
    let mut eps = eps_start.max(eps_final);
    loop {
        phases += 1;
        owner.fill(NONE);
        x.fill(NONE);
        let mut count = vec![0u32; words];
        let mut queue: Vec<u32> = (0..words as u32).rev().collect();
        while let Some(w) = queue.pop() {
            let w = w as usize;
            let (s, e) = (g.start[w], g.start[w + 1]);
            let (mut b1, mut v1, mut v2) = (NONE, f64::INFINITY, f64::INFINITY);
            for k in s..e {
                let c = g.cell[k];
                let val = g.cost[k] + price[c as usize];
                if val < v1 {
                    v2 = v1;
                    v1 = val;
                    b1 = c;
                } else if val < v2 {
                    v2 = val;
                }
            }
            count[w] += 1;
            if b1 == NONE || v1 > give_up[w] || count[w] > MAX_BIDS {
                continue;
            }
            let gap = if v2.is_finite() {
                (v2 - v1).min(give_up[w] - v1)
            } else {
                give_up[w] - v1
            };
            price[b1 as usize] += gap.max(0.0) + eps;
            bids += 1;
            let prev = owner[b1 as usize];
            if prev != NONE {
                x[prev as usize] = NONE;
                queue.push(prev);
            }
            owner[b1 as usize] = w as u32;
            x[w] = b1;
        }
        if eps <= eps_final {
            break;
        }
        eps = (eps / 6.0).max(eps_final);
    }
    Outcome { x, bids, phases }
}
