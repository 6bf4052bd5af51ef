//! Shortest augmenting paths (Jonker-Volgenant style, Dijkstra on reduced costs) for a
//! sparse assignment of words to cells. Words are matched one at a time: a Dijkstra
//! search from the free word over alternating paths finds the cheapest free cell, cell
//! potentials v are updated so that every candidate edge keeps a non-negative reduced
//! cost c(w, k) - v[k] - u_w (u_w = c(w, x_w) - v[x_w] for a matched word), and the path
//! is flipped. Potentials may start from prices (a warm start); the search then mostly
//! ends at the first cell it pops.
//!
//! "Complete" words (dummies that pad a rectangular problem to a square one) have an
//! implicit zero-cost edge to every cell.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

pub const NONE: u32 = u32::MAX;

/// Candidate edges per word, compressed rows.
pub struct Graph {
    pub start: Vec<usize>,
    pub cell: Vec<u32>,
    pub cost: Vec<f64>,
    /// Words >= `real` are complete zero-cost words.
    pub real: usize,
    pub cells: usize,
}

impl Graph {
    /// From per-word lists; `dummies` complete words are appended.
    pub fn new(lists: Vec<Vec<(u32, f64)>>, dummies: usize, cells: usize) -> Self {
        let real = lists.len();
        let mut start = Vec::with_capacity(real + 1);
        let total: usize = lists.iter().map(|l| l.len()).sum();
        let (mut cell, mut cost) = (Vec::with_capacity(total), Vec::with_capacity(total));
        start.push(0);
        for l in lists {
            for (c, x) in l {
                cell.push(c);
                cost.push(x);
            }
            start.push(cell.len());
        }
        for _ in 0..dummies {
            start.push(cell.len());
        }
        Self {
            start,
            cell,
            cost,
            real,
            cells,
        }
    }

    pub fn words(&self) -> usize {
        self.start.len() - 1
    }

    pub fn edges(&self) -> usize {
        self.cell.len()
    }

    /// A new graph with extra edges (word, cell, cost) merged in (duplicates skipped).
    pub fn with_extra(&self, mut extra: Vec<(u32, u32, f64)>) -> Self {
        extra.sort_by_key(|e| (e.0, e.1));
        extra.dedup_by_key(|e| (e.0, e.1));
        let mut lists: Vec<Vec<(u32, f64)>> = (0..self.real)
            .map(|w| {
                let r = self.start[w]..self.start[w + 1];
                self.cell[r.clone()]
                    .iter()
                    .copied()
                    .zip(self.cost[r].iter().copied())
                    .collect()
            })
            .collect();
        for (w, c, x) in extra {
            let l = &mut lists[w as usize];
            if !l.iter().any(|e| e.0 == c) {
                l.push((c, x));
            }
        }
        Self::new(lists, self.words() - self.real, self.cells)
    }
}

#[derive(PartialEq)]
struct Item {
    d: f64,
    cell: u32,
}
impl Eq for Item {}
impl PartialOrd for Item {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Item {
    fn cmp(&self, o: &Self) -> Ordering {
        // Min-heap on d.
        o.d.total_cmp(&self.d).then_with(|| o.cell.cmp(&self.cell))
    }
}

/// The matching, the potentials and the search's scratch space.
pub struct Sap {
    pub v: Vec<f64>,
    /// word -> cell, and the cost of that edge.
    pub x: Vec<u32>,
    pub xc: Vec<f64>,
    /// cell -> word.
    pub y: Vec<u32>,
    d: Vec<f64>,
    dstamp: Vec<u32>,
    done: Vec<u32>,
    pred: Vec<u32>,
    stamp: u32,
    heap: BinaryHeap<Item>,
    scanned: Vec<u32>,
    /// Cells popped by all searches (work done).
    pub pops: u64,
}

impl Sap {
    pub fn new(words: usize, v0: Vec<f64>) -> Self {
        let n = v0.len();
        Self {
            v: v0,
            x: vec![NONE; words],
            xc: vec![0.0; words],
            y: vec![NONE; n],
            d: vec![0.0; n],
            dstamp: vec![0; n],
            done: vec![0; n],
            pred: vec![NONE; n],
            stamp: 0,
            heap: BinaryHeap::new(),
            scanned: Vec::new(),
            pops: 0,
        }
    }

    /// Take over the matched pairs of `x` (word -> cell or NONE) whose edge is the word's
    /// cheapest under the current potentials, so the invariants hold: matched edges tight,
    /// every other edge of a matched word non-negative. Returns the words left unmatched.
    pub fn adopt(&mut self, g: &Graph, x: &[u32]) -> Vec<u32> {
        let mut left = Vec::new();
        for (w, &cell) in x.iter().enumerate() {
            if cell == NONE || self.y[cell as usize] != NONE || w >= g.real {
                left.push(w as u32);
                continue;
            }
            let (s, e) = (g.start[w], g.start[w + 1]);
            let mut own = f64::INFINITY;
            let mut best = f64::INFINITY;
            for k in s..e {
                let red = g.cost[k] - self.v[g.cell[k] as usize];
                if g.cell[k] == cell {
                    own = own.min(red);
                }
                best = best.min(red);
            }
            if own.is_finite() && own <= best {
                self.x[w] = cell;
                self.xc[w] = own + self.v[cell as usize];
                self.y[cell as usize] = w as u32;
            } else {
                left.push(w as u32);
            }
        }
        left
    }

    /// u_w of a matched word (tight on its edge).
    pub fn u(&self, w: usize) -> f64 {
        self.xc[w] - self.v[self.x[w] as usize]
    }

    pub fn unmatch(&mut self, w: usize) {
        let c = self.x[w];
        if c != NONE {
            self.y[c as usize] = NONE;
            self.x[w] = NONE;
        }
    }

    #[inline]
    fn relax(&mut self, k: u32, nd: f64, from: u32) {
        let ku = k as usize;
        if self.done[ku] == self.stamp {
            return;
        }
        if self.dstamp[ku] != self.stamp || nd < self.d[ku] {
            self.dstamp[ku] = self.stamp;
            self.d[ku] = nd;
            self.pred[ku] = from;
            self.heap.push(Item { d: nd, cell: k });
        }
    }

    /// Relax the edges of word `i` reached at distance `base` (u = its dual).
    fn expand(&mut self, g: &Graph, i: usize, base: f64, u: f64) {
        if i >= g.real {
            for k in 0..g.cells as u32 {
                let nd = base + (-self.v[k as usize] - u).max(0.0);
                self.relax(k, nd, i as u32);
            }
        } else {
            for e in g.start[i]..g.start[i + 1] {
                let k = g.cell[e];
                let nd = base + (g.cost[e] - self.v[k as usize] - u).max(0.0);
                self.relax(k, nd, i as u32);
            }
        }
    }

    fn cost_of(g: &Graph, w: usize, cell: u32) -> f64 {
        if w >= g.real {
            return 0.0;
        }
        (g.start[w]..g.start[w + 1])
            .find(|&e| g.cell[e] == cell)
            .map_or(f64::INFINITY, |e| g.cost[e])
    }

    /// Match free word `f` through the cheapest augmenting path; false if none exists in
    /// the candidate graph (nothing changes then).
    pub fn augment(&mut self, g: &Graph, f: usize) -> bool {
        self.augment_capped(g, f, u64::MAX)
    }

    /// [`Self::augment`] that gives up (returns false, nothing changed) after popping
    /// `max_pops` cells: a word without a path would otherwise search its whole component.
    pub fn augment_capped(&mut self, g: &Graph, f: usize, max_pops: u64) -> bool {
        debug_assert_eq!(self.x[f], NONE);
        self.stamp = self.stamp.wrapping_add(1);
        if self.stamp == 0 {
            self.dstamp.fill(0);
            self.done.fill(0);
            self.stamp = 1;
        }
        self.heap.clear();
        self.scanned.clear();
        // The root's dual is its cheapest reduced cost (distances start at 0).
        let u0 = if f >= g.real {
            self.v.iter().map(|&v| -v).fold(f64::INFINITY, f64::min)
        } else {
            (g.start[f]..g.start[f + 1])
                .map(|e| g.cost[e] - self.v[g.cell[e] as usize])
                .fold(f64::INFINITY, f64::min)
        };
        if !u0.is_finite() {
            return false;
        }
        self.expand(g, f, 0.0, u0);
        let mut end = NONE;
        let mut dist = 0.0;
        let mut popped = 0u64;
        while let Some(Item { d, cell }) = self.heap.pop() {
            if popped >= max_pops {
                break;
            }
            popped += 1;
            let j = cell as usize;
            if self.done[j] == self.stamp || d > self.d[j] {
                continue;
            }
            self.done[j] = self.stamp;
            self.scanned.push(cell);
            self.pops += 1;
            let i = self.y[j];
            if i == NONE {
                end = cell;
                dist = d;
                break;
            }
            let i = i as usize;
            let ui = self.xc[i] - self.v[j];
            self.expand(g, i, d, ui);
        }
        if end == NONE {
            return false;
        }
        // Potentials: cells finalised before the end move by d - dist (<= 0).
        for &k in &self.scanned {
            let k = k as usize;
            self.v[k] += self.d[k] - dist;
        }
        // Flip the path.
        let mut j = end;
        loop {
            let i = self.pred[j as usize] as usize;
            let prev = self.x[i];
            self.x[i] = j;
            self.xc[i] = Self::cost_of(g, i, j);
            self.y[j as usize] = i as u32;
            if i == f {
                break;
            }
            j = prev;
        }
        true
    }
}
