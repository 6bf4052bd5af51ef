//! Prices for the row/column relaxation: each word must go to one of `bins` bins (rows,
//! or columns) of capacity `cap`, at cost cost(w, b). An auction over the bins' slots
//! (all slots of a bin cost the same, so a bin is a min-heap of its slot prices) gives
//! prices p_b such that every word's bin is within `eps` of its cheapest priced bin and
//! every bin with a free slot has price 0: the duals of this transportation problem.
//! With the row prices and the column prices, a word's best rows and columns under
//! prices avoid the rows and columns every word wants, so a few of them per word hold a
//! near-optimal allocation of the full problem.
//!
//! Bids are cheap: prices only rise, so a word keeps its `CACHE` best bins under the
//! prices of its last full scan together with the value of the last of them; as long as
//! its two best cached bins still cost no more than that value, no other bin can beat
//! them and the bid needs no scan of all bins.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Bins each word keeps from its last full scan.
const CACHE: usize = 12;

/// Bin prices (>= 0) and the bids spent. `cost(w, b)` is the word's cost of bin b.
pub fn bin_prices<F>(words: usize, bins: usize, cap: usize, eps: f64, cost: &F) -> (Vec<f64>, u64)
where
    F: Fn(usize, usize) -> f64 + Sync,
{
    let out = bin_auction(words, &vec![cap; bins], eps, cost);
    (out.price, out.bids)
}

/// What [`bin_auction`] found.
pub struct BinAuction {
    pub price: Vec<f64>,
    /// word -> bin.
    pub bin_of: Vec<u32>,
    pub bids: u64,
    /// Bids that needed a scan of all bins.
    pub scans: u64,
}

/// The transportation auction: prices and every word's bin; bin b holds `caps[b]` words.
pub fn bin_auction<F>(words: usize, caps: &[usize], eps: f64, cost: &F) -> BinAuction
where
    F: Fn(usize, usize) -> f64 + Sync,
{
    let bins = caps.len();
    let mut m = Market::new(words, caps);
    let kc = CACHE.min(bins);
    let mut cache = vec![0u32; words * kc];
    // The priced value of a word's last cached bin at its last scan (NaN: never scanned);
    // with kc == bins every bin is cached and the bound is infinite.
    let mut bound = vec![f64::NAN; words];
    let mut scratch: Vec<(f64, u32)> = Vec::with_capacity(bins);
    let mut scans = 0u64;
    while let Some(w) = m.queue.pop() {
        let w = w as usize;
        let cw = &mut cache[w * kc..(w + 1) * kc];
        let mut best = Best::new(0);
        if !bound[w].is_nan() {
            for &b in cw.iter() {
                best.offer(b as usize, cost(w, b as usize) + m.price[b as usize]);
            }
        }
        if bound[w].is_nan() || best.v2 > bound[w] {
            scans += 1;
            scratch.clear();
            scratch.extend((0..bins).map(|b| (cost(w, b) + m.price[b], b as u32)));
            let by = |a: &(f64, u32), b: &(f64, u32)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
            if kc < bins {
                scratch.select_nth_unstable_by(kc - 1, by);
            }
            let top = &mut scratch[..kc];
            top.sort_unstable_by(by);
            for (c, &(_, b)) in cw.iter_mut().zip(top.iter()) {
                *c = b;
            }
            bound[w] = if kc < bins {
                top[kc - 1].0
            } else {
                f64::INFINITY
            };
            best = Best {
                bin: top[0].1 as usize,
                v1: top[0].0,
                v2: if kc > 1 { top[1].0 } else { f64::INFINITY },
            };
        }
        m.price[best.bin] = m.bid(w as u32, &best, eps);
    }
    m.finish(words, scans)
}

/// Costs given sparsely, for [`sparse_bin_auction`]: item t is word `words[t]`, whose
/// cost of bin `idx[w*k + s]` is `loss[w*k + s]` (its k candidate bins) and `tail[w]` for
/// every other bin.
pub struct SparseCosts<'a> {
    pub words: &'a [u32],
    pub k: usize,
    pub idx: &'a [u32],
    pub loss: &'a [f32],
    pub tail: &'a [f64],
}

/// [`bin_auction`] on sparse costs, with bids that cost O(k log bins) whatever the number
/// of bins: a word's best bins are among its candidates and the cheapest-priced bins
/// that are not (all at its tail cost), found in a set of the bins ordered by price.
pub fn sparse_bin_auction(caps: &[usize], eps: f64, c: &SparseCosts<'_>) -> BinAuction {
    use std::collections::BTreeSet;
    let (words, bins, k) = (c.words.len(), caps.len(), c.k);
    let mut m = Market::new(words, caps);
    // Bins that can still be chosen, cheapest first.
    let mut open: BTreeSet<(Price, u32)> = (0..bins as u32)
        .filter(|&b| caps[b as usize] > 0)
        .map(|b| (Price(0.0), b))
        .collect();
    while let Some(t) = m.queue.pop() {
        let w = c.words[t as usize] as usize;
        let (ids, ls) = (&c.idx[w * k..(w + 1) * k], &c.loss[w * k..(w + 1) * k]);
        let mut best = Best::new(usize::MAX);
        for (&b, &l) in ids.iter().zip(ls) {
            best.offer(b as usize, f64::from(l) + m.price[b as usize]);
        }
        if c.tail[w].is_finite() {
            let mut others = 0;
            for &(Price(pb), b) in open.iter() {
                if ids.contains(&b) {
                    continue;
                }
                best.offer(b as usize, c.tail[w] + pb);
                others += 1;
                if others == 2 {
                    break;
                }
            }
        }
        let b1 = best.bin;
        let new = m.bid(t, &best, eps);
        if new != m.price[b1] {
            open.remove(&(Price(m.price[b1]), b1 as u32));
            open.insert((Price(new), b1 as u32));
            m.price[b1] = new;
        }
    }
    m.finish(words, 0)
}

/// What both auctions keep: every bin's slots, the bin prices, the items waiting to bid
/// and the bids made.
struct Market<'a> {
    /// Slots per bin.
    caps: &'a [usize],
    /// Slot prices with their occupants, per bin; a bin's price is its cheapest slot
    /// once all its slots are taken, 0 before.
    slots: Vec<BinaryHeap<Reverse<(Price, u32)>>>,
    price: Vec<f64>,
    /// Items without a bin, the next to bid last.
    queue: Vec<u32>,
    bids: u64,
}

impl<'a> Market<'a> {
    /// No item placed yet, all waiting (item 0 bids first).
    fn new(items: usize, caps: &'a [usize]) -> Self {
        assert!(
            caps.iter().sum::<usize>() >= items,
            "bins hold fewer slots than words"
        );
        Self {
            caps,
            slots: vec![BinaryHeap::new(); caps.len()],
            // A bin without slots is never chosen.
            price: caps
                .iter()
                .map(|&c| if c == 0 { f64::INFINITY } else { 0.0 })
                .collect(),
            queue: (0..items as u32).rev().collect(),
            bids: 0,
        }
    }

    /// Item `t` bids for its best bin: the bin's price raised by the gap to the item's
    /// second best plus `eps`. The bin's cheapest slot's occupant, if the bin was full,
    /// goes back to the queue. Returns the bin's new price, which the caller stores.
    fn bid(&mut self, t: u32, best: &Best, eps: f64) -> f64 {
        let b1 = best.bin;
        let gap = if best.v2.is_finite() {
            best.v2 - best.v1
        } else {
            0.0
        };
        let bid = self.price[b1] + gap + eps;
        let heap = &mut self.slots[b1];
        let cap = self.caps[b1];
        if heap.len() == cap
            && let Some(Reverse((_, out))) = heap.pop()
        {
            self.queue.push(out);
        }
        heap.push(Reverse((Price(bid), t)));
        self.bids += 1;
        if heap.len() < cap {
            0.0
        } else {
            heap.peek().map_or(0.0, |r| r.0.0.0)
        }
    }

    /// Every item's bin, with the prices and the bids; `scans` as counted by the caller.
    fn finish(self, items: usize, scans: u64) -> BinAuction {
        let mut bin_of = vec![u32::MAX; items];
        for (b, heap) in self.slots.iter().enumerate() {
            for Reverse((_, t)) in heap.iter() {
                bin_of[*t as usize] = b as u32;
            }
        }
        BinAuction {
            price: self.price,
            bin_of,
            bids: self.bids,
            scans,
        }
    }
}

/// An item's best bin so far with its priced value `v1`, and the second best value `v2`.
struct Best {
    bin: usize,
    v1: f64,
    v2: f64,
}

impl Best {
    /// None seen yet (`bin` until one is).
    fn new(bin: usize) -> Self {
        Self {
            bin,
            v1: f64::INFINITY,
            v2: f64::INFINITY,
        }
    }

    /// Bin `b` at priced value `val`.
    fn offer(&mut self, b: usize, val: f64) {
        if val < self.v1 {
            self.v2 = self.v1;
            self.v1 = val;
            self.bin = b;
        } else if val < self.v2 {
            self.v2 = val;
        }
    }
}

/// The Lagrangian bound of the transportation problem under bin prices `price` (>= 0):
/// sum over words of min_b (cost(w, b) + price_b) - cap * sum_b price_b. Every feasible
/// assignment of the words to bins of capacity `cap` costs at least this much, whatever
/// the prices (weak duality); at the auction's prices it is within words * eps of the
/// transportation optimum.
pub fn bin_dual_bound<F>(words: usize, bins: usize, cap: usize, price: &[f64], cost: &F) -> f64
where
    F: Fn(usize, usize) -> f64 + Sync,
{
    use rayon::prelude::*;
    let sum: f64 = (0..words)
        .into_par_iter()
        .map(|w| {
            (0..bins)
                .map(|b| cost(w, b) + price[b])
                .fold(f64::INFINITY, f64::min)
        })
        .sum();
    sum - cap as f64 * price.iter().sum::<f64>()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Brute force over all assignments of `words` words to bins of capacities `caps`.
    fn brute(words: usize, caps: &[usize], c: &[f64]) -> f64 {
        fn go(w: usize, words: usize, caps: &mut [usize], c: &[f64]) -> f64 {
            if w == words {
                return 0.0;
            }
            let bins = caps.len();
            let mut best = f64::INFINITY;
            for b in 0..bins {
                if caps[b] > 0 {
                    caps[b] -= 1;
                    best = best.min(c[w * bins + b] + go(w + 1, words, caps, c));
                    caps[b] += 1;
                }
            }
            best
        }
        go(0, words, &mut caps.to_vec(), c)
    }

    /// The sparse auction is eps-optimal for the costs it represents (candidates, a tail
    /// value elsewhere).
    #[test]
    fn sparse_auction_is_eps_optimal() {
        let mut s = 777u64;
        let mut rnd = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as f64 / (1u64 << 31) as f64
        };
        for (words, caps, k) in [
            (7usize, vec![3usize, 3, 3], 2usize),
            (9, vec![2; 5], 2),
            (6, vec![1, 2, 0, 3, 1], 3),
        ] {
            let bins = caps.len();
            for _ in 0..5 {
                let mut idx = Vec::new();
                let mut loss = Vec::new();
                let mut tail = Vec::new();
                let mut dense = vec![0.0; words * bins];
                for w in 0..words {
                    let mut ls: Vec<f32> = (0..k).map(|_| (5.0 * rnd()) as f32).collect();
                    ls.sort_by(f32::total_cmp);
                    let first = (w * 3) % bins;
                    let t = ls[k - 1] as f64 + 3.0 * rnd();
                    for b in 0..bins {
                        dense[w * bins + b] = t;
                    }
                    for (s, l) in ls.iter().enumerate() {
                        let b = (first + s) % bins;
                        idx.push(b as u32);
                        loss.push(*l);
                        dense[w * bins + b] = *l as f64;
                    }
                    tail.push(t);
                }
                let ws: Vec<u32> = (0..words as u32).collect();
                let eps = 1e-7;
                let out = sparse_bin_auction(
                    &caps,
                    eps,
                    &SparseCosts {
                        words: &ws,
                        k,
                        idx: &idx,
                        loss: &loss,
                        tail: &tail,
                    },
                );
                let mut load = vec![0; bins];
                let mut total = 0.0;
                for (w, &b) in out.bin_of.iter().enumerate() {
                    load[b as usize] += 1;
                    total += dense[w * bins + b as usize];
                }
                assert!(load.iter().zip(&caps).all(|(l, c)| l <= c));
                let opt = brute(words, &caps, &dense);
                assert!(total <= opt + words as f64 * eps + 1e-9, "{total} vs {opt}");
            }
        }
    }

    #[test]
    fn auction_is_eps_optimal_and_the_bound_holds() {
        let mut s = 12345u64;
        let mut rnd = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as f64 / (1u64 << 31) as f64
        };
        let cases: [(usize, Vec<usize>); 5] = [
            (7, vec![3, 3, 3]),
            (8, vec![2; 4]),
            (9, vec![2; 5]),
            (6, vec![1; 14]),
            (7, vec![0, 3, 1, 0, 2, 4]),
        ];
        for (words, caps) in cases {
            let bins = caps.len();
            for _ in 0..5 {
                let c: Vec<f64> = (0..words * bins).map(|_| 10.0 * rnd()).collect();
                let f = |w: usize, b: usize| c[w * bins + b];
                let eps = 1e-7;
                let out = bin_auction(words, &caps, eps, &f);
                let mut load = vec![0; bins];
                let mut total = 0.0;
                for (w, &b) in out.bin_of.iter().enumerate() {
                    load[b as usize] += 1;
                    total += f(w, b as usize);
                }
                assert!(load.iter().zip(&caps).all(|(l, c)| l <= c));
                let opt = brute(words, &caps, &c);
                assert!(total <= opt + words as f64 * eps + 1e-9, "{total} vs {opt}");
                if caps.iter().all(|&k| k == caps[0]) {
                    let lb = bin_dual_bound(words, bins, caps[0], &out.price, &f);
                    assert!(
                        lb <= opt + 1e-9 && lb >= opt - words as f64 * eps - 1e-9,
                        "{lb} vs {opt}"
                    );
                }
            }
        }
    }
}
