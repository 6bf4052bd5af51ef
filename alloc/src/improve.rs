//! Local improvement of a complete allocation: every word, heaviest first, looks at its
//! cheapest cells (its best rows x its best columns) and takes one if that lowers the
//! total, the cell's occupant moving to the word's old cell (a swap) or to a free cell
//! (an ejection, the old cell becoming free). Sweeps repeat until one changes nothing or
//! the sweep budget is spent. Each sweep costs O(V * k^2 * (1 + free cells)) cost
//! evaluations, so it runs after any solver at any size.
//!
//! It is what repairs the last words of a congested table: words the assignment on
//! candidate cells could not place take whatever free cell is left, which for a heavy
//! word can be far from its good cells, while a light word sitting in one of them would
//! lose little by trading places.

use super::costs::Costs;
use super::sap::NONE;

/// Most free cells an ejection looks at.
const MAX_EJECT_SCAN: usize = 1024;

/// Moves made and cost removed.
pub struct Improved {
    pub moves: u64,
    pub gain: f64,
    pub sweeps: usize,
}

/// A move of word w into `cell`, and where that cell's occupant goes.
#[derive(Clone, Copy)]
enum Move {
    /// The cell is free; w's old cell becomes free.
    Free,
    /// The occupant takes w's old cell.
    Swap,
    /// The occupant takes free cell `free[f]`; w's old cell becomes free.
    Eject(usize),
    /// The occupant takes `cell2`, whose occupant (if any) takes w's old cell (or, if
    /// `cell2` was free, w's old cell becomes free).
    Chain(u32),
}

/// Every word's best cells, its `kr` best rows x `kc` best columns: [V, kr * kc].
fn best_cells<P: Costs>(p: &P, kr: usize, kc: usize) -> Vec<u32> {
    use rayon::prelude::*;
    let c = p.cols();
    (0..p.vocab())
        .into_par_iter()
        .map_init(Vec::new, |buf, w| {
            let (rows, cols) = p.best_sides(w, kr, kc, buf);
            rows.iter()
                .flat_map(|&i| cols.iter().map(move |&j| i * c as u32 + j))
                .collect::<Vec<u32>>()
        })
        .flatten_iter()
        .collect()
}

/// Improve `x` (word -> cell, complete) in place; `order` lists the words heaviest first.
/// Each word looks at its best `k` rows x best `k` columns, and the occupant of such a
/// cell at its own `k` x `k` best cells (chains of three words).
pub fn improve<P: Costs>(
    p: &P,
    x: &mut [u32],
    order: &[u32],
    k: usize,
    max_sweeps: usize,
) -> Improved {
    let (r, c) = (p.rows(), p.cols());
    let (kr, kc) = (k.min(r), k.min(c));
    let mut owner = vec![NONE; p.cells()];
    for (w, &cell) in x.iter().enumerate() {
        owner[cell as usize] = w as u32;
    }
    let mut free: Vec<u32> = (0..p.cells() as u32)
        .filter(|&cell| owner[cell as usize] == NONE)
        .collect();
    let tops = best_cells(p, kr, kc);
    let kk = kr * kc;
    let scale = order
        .first()
        .map_or(1.0, |&w| p.cost(w as usize, x[w as usize] as usize).abs())
        .max(1e-300);
    let tol = 1e-12 * scale;
    let mut out = Improved {
        moves: 0,
        gain: 0.0,
        sweeps: 0,
    };
    for _ in 0..max_sweeps {
        out.sweeps += 1;
        let mut moved = 0u64;
        for &w in order {
            let w = w as usize;
            let here = x[w] as usize;
            let cw = p.cost(w, here);
            let mut best = (-tol, NONE, Move::Free);
            for &cell in &tops[w * kk..(w + 1) * kk] {
                let cell_u = cell as usize;
                if cell_u == here {
                    continue;
                }
                let into = p.cost(w, cell_u) - cw;
                if into >= best.0 + 0.0 && owner[cell_u] == NONE {
                    continue;
                }
                let o = owner[cell_u];
                if o == NONE {
                    best = (into, cell, Move::Free);
                    continue;
                }
                let o = o as usize;
                let co = p.cost(o, cell_u);
                let base = into - co;
                let swap = base + p.cost(o, here);
                if swap < best.0 {
                    best = (swap, cell, Move::Swap);
                }
                if free.len() <= MAX_EJECT_SCAN {
                    for (f, &fc) in free.iter().enumerate() {
                        let eject = base + p.cost(o, fc as usize);
                        if eject < best.0 {
                            best = (eject, cell, Move::Eject(f));
                        }
                    }
                }
                // Chains only through cells w prefers to its own (the rest rarely pay and
                // cost k^2 evaluations each).
                if into >= 0.0 {
                    continue;
                }
                for &c2 in &tops[o * kk..(o + 1) * kk] {
                    let c2u = c2 as usize;
                    if c2u == cell_u || c2u == here {
                        continue;
                    }
                    let step = base + p.cost(o, c2u);
                    if step >= best.0 && owner[c2u] == NONE {
                        continue;
                    }
                    let o2 = owner[c2u];
                    let total = if o2 == NONE {
                        step
                    } else if o2 as usize == w {
                        continue;
                    } else {
                        let o2 = o2 as usize;
                        step + p.cost(o2, here) - p.cost(o2, c2u)
                    };
                    if total < best.0 {
                        best = (total, cell, Move::Chain(c2));
                    }
                }
            }
            let (delta, cell, mv) = best;
            if cell == NONE {
                continue;
            }
            let cell = cell as usize;
            let o = owner[cell];
            // Where w's old cell goes: to a word, or back to the free list.
            let vacate = |owner: &mut [u32], free: &mut Vec<u32>, taken: Option<usize>| {
                owner[here] = NONE;
                match taken {
                    Some(f) => free[f] = here as u32,
                    None => free.push(here as u32),
                }
            };
            match mv {
                Move::Free => {
                    let f = free.iter().position(|&fc| fc as usize == cell).unwrap();
                    vacate(&mut owner, &mut free, Some(f));
                }
                Move::Swap => {
                    x[o as usize] = here as u32;
                    owner[here] = o;
                }
                Move::Eject(f) => {
                    let fc = free[f];
                    x[o as usize] = fc;
                    owner[fc as usize] = o;
                    vacate(&mut owner, &mut free, Some(f));
                }
                Move::Chain(c2) => {
                    let c2 = c2 as usize;
                    let o2 = owner[c2];
                    x[o as usize] = c2 as u32;
                    owner[c2] = o;
                    if o2 == NONE {
                        let f = free.iter().position(|&fc| fc as usize == c2).unwrap();
                        vacate(&mut owner, &mut free, Some(f));
                    } else {
                        x[o2 as usize] = here as u32;
                        owner[here] = o2;
                    }
                }
            }
            x[w] = cell as u32;
            owner[cell] = w as u32;
            out.gain -= delta;
            moved += 1;
        }
        out.moves += moved;
        if moved == 0 {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Problem;

    #[test]
    fn improvement_never_raises_the_cost_and_keeps_a_permutation() {
        for (v, r, c, seed) in [
            (60usize, 8usize, 8usize, 3u64),
            (64, 8, 8, 4),
            (40, 7, 9, 5),
        ] {
            let (lr, lc) = crate::testutil::tables(v, r, c, seed);
            let p = Problem::new(v, r, c, &lr, &lc).unwrap();
            // A deliberately bad start: words in reverse cell order.
            let mut x: Vec<u32> = (0..v as u32).map(|w| (r * c) as u32 - 1 - w).collect();
            let before = p.total(&x);
            let order: Vec<u32> = (0..v as u32).collect();
            let out = improve(&p, &mut x, &order, 3, 50);
            p.check(&x).unwrap();
            let after = p.total(&x);
            assert!(out.moves > 0);
            assert!(
                (before - after - out.gain).abs() <= 1e-9 * before,
                "gain {} vs {}",
                out.gain,
                before - after
            );
            assert!(after <= crate::testutil::brute_force(&p) * 1.5);
        }
    }
}
