//! The CUDA graphs a backend replays, by the [`Work`] they hold: each step's device work is
//! run once as plain launches, captured the second time, and replayed with one launch
//! from then on. Whatever holds a device address
//! a graph captured (the workspace, the optimizer's buffers, a carried state, the
//! gradient sum's buffers) clears the cache when it is allocated again.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};

use super::layer::{Device, Graph};
use super::work::Work;
use crate::Result;

/// Graphs by the work they hold, the work run once already (captured the next time), and
/// whether graphs are on.
pub(super) struct Graphs {
    off: Cell<bool>,
    cache: RefCell<HashMap<Work, Graph>>,
    seen: RefCell<HashSet<Work>>,
}

impl Default for Graphs {
    fn default() -> Self {
        Self {
            off: Cell::new(false),
            cache: RefCell::new(HashMap::new()),
            seen: RefCell::new(HashSet::new()),
        }
    }
}

/// Graphs kept at most (a run trains one or two shapes: the epoch's batches and its last,
/// shorter one); beyond that the cache starts again.
const MAX_GRAPHS: usize = 8;

impl Graphs {
    pub fn enabled(&self) -> bool {
        !self.off.get()
    }

    pub fn set_enabled(&self, on: bool) {
        self.off.set(!on);
        if !on {
            self.clear();
        }
    }

    /// Forget every graph (an address they hold is about to change).
    pub fn clear(&self) {
        self.cache.borrow_mut().clear();
        self.seen.borrow_mut().clear();
    }

    /// Whether `w` runs for the first time since the cache was cleared (it is noted).
    pub fn first_run(&self, w: &Work) -> bool {
        if self.cache.borrow().contains_key(w) {
            return false;
        }
        let mut seen = self.seen.borrow_mut();
        if seen.len() >= MAX_GRAPHS {
            seen.clear();
        }
        seen.insert(w.clone())
    }

    /// Launch `w`'s graph on `dev` where there is one.
    pub fn launch(&self, dev: &dyn Device, w: &Work) -> Option<Result<()>> {
        self.cache.borrow().get(w).map(|g| dev.launch_graph(g))
    }

    /// Keep `g` as `w`'s graph and launch it.
    pub fn insert_and_launch(&self, dev: &dyn Device, w: &Work, g: Graph) -> Result<()> {
        let mut cache = self.cache.borrow_mut();
        if cache.len() >= MAX_GRAPHS {
            cache.clear();
        }
        dev.launch_graph(cache.entry(w.clone()).or_insert(g))
    }
}
