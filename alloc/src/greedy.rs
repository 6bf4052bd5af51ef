//! The heuristic of the official LightRNN implementation, as the baseline: every word
//! sorts its rows by loss; a max-priority queue holds each word's next-best row keyed by
//! the mean loss of the rows it has not tried yet (the words with the most to lose pick
//! first); a word whose row is full moves on to its next row. Then, row by row, the same
//! procedure over columns places the row's words in distinct columns.
//! Memory: the sorted candidate lists of every word, V x (R + C) indices.

use std::collections::BinaryHeap;

use super::{Elem, Problem};

#[derive(PartialEq)]
struct Entry {
    key: f64,
    word: u32,
    /// Position in the word's sorted list.
    pos: u32,
}

impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.key
            .total_cmp(&o.key)
            .then_with(|| o.word.cmp(&self.word))
    }
}

/// Candidates of one word in ascending loss order, with suffix sums of their losses.
struct Sorted {
    order: Vec<u32>,
    /// suffix[k] = sum of the losses at positions k.. of `order`.
    suffix: Vec<f64>,
}

impl Sorted {
    fn new(losses: impl Iterator<Item = f64>) -> Self {
        let mut v: Vec<(f64, u32)> = losses.enumerate().map(|(i, x)| (x, i as u32)).collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let mut suffix = vec![0.0; v.len() + 1];
        for k in (0..v.len()).rev() {
            suffix[k] = suffix[k + 1] + v[k].0;
        }
        Self {
            order: v.into_iter().map(|x| x.1).collect(),
            suffix,
        }
    }

    /// Priority of trying position `pos`: the mean loss of the options after it.
    fn key(&self, pos: usize) -> f64 {
        let rest = self.order.len() - pos - 1;
        if rest == 0 {
            0.0
        } else {
            self.suffix[pos + 1] / rest as f64
        }
    }
}

pub fn solve<T: Elem>(p: &Problem<'_, T>) -> Vec<u32> {
    let (v, r, c) = (p.vocab, p.rows, p.cols);
    let rows: Vec<Sorted> = (0..v)
        .map(|w| Sorted::new((0..r).map(|i| p.lr(w, i))))
        .collect();
    let mut row_of = vec![u32::MAX; v];
    let mut load = vec![0usize; r];
    let mut heap: BinaryHeap<Entry> = (0..v)
        .map(|w| Entry {
            key: rows[w].key(0),
            word: w as u32,
            pos: 0,
        })
        .collect();
    while let Some(e) = heap.pop() {
        let w = e.word as usize;
        let i = rows[w].order[e.pos as usize] as usize;
        if load[i] < c {
            load[i] += 1;
            row_of[w] = i as u32;
        } else {
            // V <= R*C, so some row always has room before the list runs out.
            let pos = e.pos as usize + 1;
            heap.push(Entry {
                key: rows[w].key(pos),
                word: e.word,
                pos: pos as u32,
            });
        }
    }
    drop(rows);
    let mut members: Vec<Vec<u32>> = vec![Vec::new(); r];
    for (w, &i) in row_of.iter().enumerate() {
        members[i as usize].push(w as u32);
    }
    let mut cells = vec![0u32; v];
    for (i, ws) in members.iter().enumerate() {
        let cols: Vec<Sorted> = ws
            .iter()
            .map(|&w| Sorted::new((0..c).map(|j| p.lc(w as usize, j))))
            .collect();
        let mut taken = vec![false; c];
        let mut heap: BinaryHeap<Entry> = (0..ws.len())
            .map(|k| Entry {
                key: cols[k].key(0),
                word: k as u32,
                pos: 0,
            })
            .collect();
        while let Some(e) = heap.pop() {
            let k = e.word as usize;
            let j = cols[k].order[e.pos as usize] as usize;
            if !taken[j] {
                taken[j] = true;
                cells[ws[k] as usize] = (i * c + j) as u32;
            } else {
                let pos = e.pos as usize + 1;
                heap.push(Entry {
                    key: cols[k].key(pos),
                    word: e.word,
                    pos: pos as u32,
                });
            }
        }
    }
    cells
}
