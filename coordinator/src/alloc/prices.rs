//! Prices for the row/column relaxation: each word must go to one of `bins` bins (rows,
//! or columns) of capacity `cap`, at cost cost(w, b). An auction over the bins' slots
//! (all slots of a bin cost the same, so a bin is a min-heap of its slot prices) gives
//! prices p_b such that every word's bin is within `eps` of its cheapest priced bin and
//! every bin with a free slot has price 0: the duals of this transportation problem.
//! With the row prices and the column prices, a word's best rows and columns under
//! prices avoid the rows and columns every word wants, so a few of them per word hold a
//! near-optimal allocation of the full problem.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Bin prices (>= 0). `cost(w, out)` fills `out[b]` with the word's cost of every bin.
pub fn bin_prices(
    words: usize,
    bins: usize,
    cap: usize,
    eps: f64,
    cost: &(dyn Fn(usize, &mut [f64]) + Sync),
) -> (Vec<f64>, u64) {
    let (price, _, bids) = bin_auction(words, bins, cap, eps, cost);
    (price, bids)
}

/// [`bin_prices`] that also returns each word's bin, optionally starting from prices
/// `warm` (every slot starts unoccupied at its bin's warm price).
pub fn bin_auction(
    words: usize,
    bins: usize,
    cap: usize,
    eps: f64,
    cost: &(dyn Fn(usize, &mut [f64]) + Sync),
) -> (Vec<f64>, Vec<u32>, u64) {
    bin_auction_warm(words, bins, cap, eps, cost, None)
}

pub fn bin_auction_warm(
    words: usize,
    bins: usize,
    cap: usize,
    eps: f64,
    cost: &(dyn Fn(usize, &mut [f64]) + Sync),
    warm: Option<&[f64]>,
) -> (Vec<f64>, Vec<u32>, u64) {
    // Slot prices with their occupants (u32::MAX = none), per bin; a bin's price is its
    // cheapest slot.
    let mut slots: Vec<BinaryHeap<Reverse<(Price, u32)>>> = (0..bins)
        .map(|b| match warm {
            Some(p) => (0..cap).map(|_| Reverse((Price(p[b]), u32::MAX))).collect(),
            None => BinaryHeap::new(),
        })
        .collect();
    let mut price: Vec<f64> = match warm {
        Some(p) => p.to_vec(),
        None => vec![0.0f64; bins],
    };
    let mut queue: Vec<u32> = (0..words as u32).rev().collect();
    let mut row = vec![0.0f64; bins];
    let mut bids = 0u64;
    while let Some(w) = queue.pop() {
        cost(w as usize, &mut row);
        let (mut b1, mut v1, mut v2) = (0usize, f64::INFINITY, f64::INFINITY);
        for (b, (&c, &p)) in row.iter().zip(&price).enumerate() {
            let val = c + p;
            if val < v1 {
                v2 = v1;
                v1 = val;
                b1 = b;
            } else if val < v2 {
                v2 = val;
            }
        }
        let gap = if v2.is_finite() { v2 - v1 } else { 0.0 };
        let bid = price[b1] + gap + eps;
        let heap = &mut slots[b1];
        if heap.len() == cap
            && let Some(Reverse((_, out))) = heap.pop()
            && out != u32::MAX
        {
            queue.push(out);
        }
        heap.push(Reverse((Price(bid), w)));
        price[b1] = if heap.len() < cap {
            0.0
        } else {
            heap.peek().map_or(0.0, |r| r.0.0.0)
        };
        bids += 1;
    }
    let mut bin_of = vec![u32::MAX; words];
    for (b, heap) in slots.iter().enumerate() {
        for Reverse((_, w)) in heap.iter() {
            if *w != u32::MAX {
                bin_of[*w as usize] = b as u32;
            }
        }
    }
    (price, bin_of, bids)
}

#[derive(Clone, Copy, PartialEq)]
struct Price(f64);
impl Eq for Price {}
impl PartialOrd for Price {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Price {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&o.0)
    }
}
