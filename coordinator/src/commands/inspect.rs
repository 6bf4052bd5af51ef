//! `lightrnn inspect`: which words share the rows of a checkpoint's table.

use clap::Args;
use tokio::runtime::Handle;

use lightrnn_core::checkpoint::{self, Checkpoint};
use lightrnn_core::data::store::Location;

use crate::Result;

#[derive(Args, Debug, Clone)]
pub struct InspectArgs {
    /// A checkpoint, or a run directory (its newest checkpoint).
    #[arg(long)]
    pub checkpoint: String,
    /// Rows to show.
    #[arg(long, default_value_t = 20)]
    pub rows: usize,
    /// Words per row.
    #[arg(long, default_value_t = 12)]
    pub words: usize,
}

pub fn run(a: &InspectArgs, handle: &Handle) -> Result<String> {
    let ck = handle.block_on(checkpoint::resolve(&Location::parse(&a.checkpoint)?))?;
    inspect(&ck, a.rows, a.words)
}

/// `lightrnn inspect`: the rows of the table with their words, most frequent first; rows
/// ordered by the count of their most frequent word.
pub fn inspect(ck: &Checkpoint, rows: usize, words: usize) -> Result<String> {
    let d = ck.meta.dims;
    let mut members: Vec<Vec<u32>> = vec![Vec::new(); d.rows];
    for (w, &cell) in ck.cells.iter().enumerate() {
        members[cell as usize / d.cols].push(w as u32);
    }
    for m in &mut members {
        m.sort_by_key(|&w| (std::cmp::Reverse(ck.vocab.count(w)), w));
    }
    let mut order: Vec<usize> = (0..d.rows).filter(|&i| !members[i].is_empty()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(ck.vocab.count(members[i][0])));
    let mut out = format!(
        "{} words in a {} x {} table; step {}, {} reallocation(s); rows by their most frequent word:\n",
        d.vocab, d.rows, d.cols, ck.meta.step, ck.meta.reallocations
    );
    for &i in order.iter().take(rows) {
        let ws: Vec<&str> = members[i]
            .iter()
            .take(words)
            .map(|&w| ck.vocab.word(w))
            .collect();
        out.push_str(&format!(
            "row {i:>5} ({:>4} words): {}\n",
            members[i].len(),
            ws.join(" ")
        ));
    }
    Ok(out.trim_end().to_string())
}
