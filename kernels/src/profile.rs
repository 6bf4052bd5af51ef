//! Where a step's time goes: a [`Profiler`] times named [`Phase`]s as spans, sums each
//! phase's seconds for the logging window, and, for the steps asked for
//! (`--profile-steps A:B`), keeps every span, of the calling thread and of the CPU
//! backend's threads, for a trace in the Chrome trace-event format (Perfetto and
//! `chrome://tracing` open it).
//!
//! The phases of a training step nest as
//! `step > {data, forward_backward > {input, forward/layerL, heads, backward/layerL,
//! grad_sum}, all_reduce > {all_reduce/wait, all_reduce/transfer}, update > {clip,
//! optimizer}, control, log, checkpoint}`; between steps come `eval`, `checkpoint` and
//! `loss_tables` (the reallocation round's passes) with `realloc` around the round.
//!
//! A span costs two clock reads and one uncontended lock; a profiler that is off (the
//! default) costs one branch per span.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Layers with a slot of their own (a model has at most 32); deeper ones would share the
/// last.
const LAYER_SLOTS: usize = 32;
/// Slots of the phases that are not a layer's.
const FIXED: usize = 18;
/// Slots in all: the fixed phases, then forward and backward of each layer.
pub const SLOTS: usize = FIXED + 2 * LAYER_SLOTS;

/// A phase of training.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Step,
    Data,
    ForwardBackward,
    Input,
    Heads,
    GradSum,
    AllReduce,
    AllReduceWait,
    AllReduceTransfer,
    Update,
    Clip,
    Optimizer,
    Control,
    Log,
    Checkpoint,
    Eval,
    LossTables,
    Realloc,
    LayerForward(usize),
    LayerBackward(usize),
}

/// The phases that are not a layer's, in slot order, with their names.
const FIXED_PHASES: [(Phase, &str); FIXED] = [
    (Phase::Step, "step"),
    (Phase::Data, "data"),
    (Phase::ForwardBackward, "forward_backward"),
    (Phase::Input, "input"),
    (Phase::Heads, "heads"),
    (Phase::GradSum, "grad_sum"),
    (Phase::AllReduce, "all_reduce"),
    (Phase::AllReduceWait, "all_reduce/wait"),
    (Phase::AllReduceTransfer, "all_reduce/transfer"),
    (Phase::Update, "update"),
    (Phase::Clip, "clip"),
    (Phase::Optimizer, "optimizer"),
    (Phase::Control, "control"),
    (Phase::Log, "log"),
    (Phase::Checkpoint, "checkpoint"),
    (Phase::Eval, "eval"),
    (Phase::LossTables, "loss_tables"),
    (Phase::Realloc, "realloc"),
];

impl Phase {
    /// Its slot in a [`Window`]'s sums.
    pub fn slot(self) -> usize {
        match self {
            Self::LayerForward(l) => FIXED + 2 * l.min(LAYER_SLOTS - 1),
            Self::LayerBackward(l) => FIXED + 2 * l.min(LAYER_SLOTS - 1) + 1,
            p => FIXED_PHASES.iter().position(|&(f, _)| f == p).unwrap(),
        }
    }

    /// The phase's name in traces and metrics.
    pub fn name(self) -> String {
        match self {
            Self::LayerForward(l) => format!("forward/layer{l}"),
            Self::LayerBackward(l) => format!("backward/layer{l}"),
            p => FIXED_PHASES[p.slot()].1.into(),
        }
    }

    /// The phase of a slot.
    fn of_slot(slot: usize) -> Self {
        match slot {
            s if s < FIXED => FIXED_PHASES[s].0,
            s if (s - FIXED).is_multiple_of(2) => Self::LayerForward((s - FIXED) / 2),
            s => Self::LayerBackward((s - FIXED) / 2),
        }
    }
}

/// The seconds and counts of each phase since the window began.
#[derive(Clone, Debug)]
pub struct Window {
    pub seconds: [f64; SLOTS],
    pub count: [u64; SLOTS],
}

impl Default for Window {
    fn default() -> Self {
        Self {
            seconds: [0.0; SLOTS],
            count: [0; SLOTS],
        }
    }
}

impl Window {
    /// (name, seconds) of every phase that ran in the window.
    pub fn phases(&self) -> Vec<(String, f64)> {
        (0..SLOTS)
            .filter(|&s| self.count[s] > 0)
            .map(|s| (Phase::of_slot(s).name(), self.seconds[s]))
            .collect()
    }

    /// Seconds of `phase` in the window.
    pub fn get(&self, phase: Phase) -> f64 {
        self.seconds[phase.slot()]
    }
}

/// One span of a trace.
#[derive(Clone, Debug)]
pub struct TraceSpan {
    pub name: String,
    /// 0: the training thread; 1 + i: the CPU backend's thread i; [`DEVICE_TID`]: the
    /// device's own time.
    pub tid: u32,
    /// Microseconds since the profiler began.
    pub start_us: f64,
    pub dur_us: f64,
    /// The training step it belongs to (the step being run, 1-based).
    pub step: u64,
}

/// The track of device time in a trace.
pub const DEVICE_TID: u32 = 1000;

/// The most spans a trace keeps (about 100 MB); later ones are counted, not kept.
pub const MAX_SPANS: usize = 1 << 20;

#[derive(Default)]
struct State {
    window: Window,
    spans: Vec<TraceSpan>,
    /// Spans past [`MAX_SPANS`], not kept.
    dropped: u64,
    /// Open spans of the training thread (their slots), innermost last.
    open: Vec<usize>,
    step: u64,
}

impl State {
    fn keep(&mut self, span: TraceSpan) {
        if self.spans.len() < MAX_SPANS {
            self.spans.push(span);
        } else {
            self.dropped += 1;
        }
    }
}

struct Inner {
    origin: Instant,
    /// Keep spans for the trace now.
    tracing: AtomicBool,
    /// The innermost open phase of the training thread (for the backend's threads).
    current: AtomicUsize,
    state: Mutex<State>,
}

/// The run's profiler: cheap to clone (one shared state); `Profiler::off()` records
/// nothing.
#[derive(Clone, Default)]
pub struct Profiler(Option<Arc<Inner>>);

/// An open span: closed (timed) when dropped.
#[must_use]
pub struct Span<'a> {
    prof: &'a Profiler,
    slot: usize,
    start: Instant,
    /// Closed without being recorded.
    cancelled: bool,
}

impl Span<'_> {
    /// Close the span without recording it (what it timed turned out not to be one).
    pub fn cancel(mut self) {
        self.cancelled = true;
    }
}

impl std::fmt::Debug for Profiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Profiler({})", if self.is_on() { "on" } else { "off" })
    }
}

impl Profiler {
    /// A profiler that times nothing.
    pub fn off() -> Self {
        Self(None)
    }

    /// A profiler that sums the phases' seconds (and keeps spans while tracing).
    pub fn on() -> Self {
        Self(Some(Arc::new(Inner {
            origin: Instant::now(),
            tracing: AtomicBool::new(false),
            current: AtomicUsize::new(Phase::Step.slot()),
            state: Mutex::new(State::default()),
        })))
    }

    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// Whether spans are kept for a trace now.
    pub fn tracing(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|i| i.tracing.load(Ordering::Relaxed))
    }

    /// Keep spans from now on (`on`), or stop keeping them; `step` is the step about to
    /// run.
    pub fn set_tracing(&self, on: bool, step: u64) {
        if let Some(i) = &self.0 {
            i.tracing.store(on, Ordering::Relaxed);
            i.state.lock().unwrap().step = step;
        }
    }

    /// Open a span of `phase` on the training thread.
    pub fn span(&self, phase: Phase) -> Span<'_> {
        let slot = phase.slot();
        if let Some(i) = &self.0 {
            let mut st = i.state.lock().unwrap();
            st.open.push(slot);
            i.current.store(slot, Ordering::Relaxed);
        }
        Span {
            prof: self,
            slot,
            start: Instant::now(),
            cancelled: false,
        }
    }

    /// Record a span of `phase` that was timed elsewhere (e.g. the all-reduce's wait,
    /// known once it ended).
    pub fn record(&self, phase: Phase, start: Instant, end: Instant) {
        if let Some(i) = &self.0 {
            let mut st = i.state.lock().unwrap();
            Self::add(i, &mut st, phase.slot(), 0, start, end);
        }
    }

    fn add(i: &Inner, st: &mut State, slot: usize, tid: u32, start: Instant, end: Instant) {
        let secs = end.saturating_duration_since(start).as_secs_f64();
        if tid == 0 {
            st.window.seconds[slot] += secs;
            st.window.count[slot] += 1;
        }
        if i.tracing.load(Ordering::Relaxed) {
            let span = TraceSpan {
                name: Phase::of_slot(slot).name(),
                tid,
                start_us: us(start.saturating_duration_since(i.origin)),
                dur_us: secs * 1e6,
                step: st.step,
            };
            st.keep(span);
        }
    }

    /// The CPU backend's thread `thread` worked from `start` to now inside the training
    /// thread's innermost open phase (kept while tracing only).
    pub fn thread_span(&self, thread: usize, start: Instant) {
        if let Some(i) = &self.0
            && i.tracing.load(Ordering::Relaxed)
        {
            let slot = i.current.load(Ordering::Relaxed);
            let end = Instant::now();
            let mut st = i.state.lock().unwrap();
            Self::add(i, &mut st, slot, 1 + thread as u32, start, end);
        }
    }

    /// A device span of `phase`, `start` to `end` on the host's clock (kept while
    /// tracing only).
    pub fn device_span(&self, name: &str, start: Instant, end: Instant) {
        if let Some(i) = &self.0
            && i.tracing.load(Ordering::Relaxed)
        {
            let mut st = i.state.lock().unwrap();
            let span = TraceSpan {
                name: name.into(),
                tid: DEVICE_TID,
                start_us: us(start.saturating_duration_since(i.origin)),
                dur_us: us(end.saturating_duration_since(start)),
                step: st.step,
            };
            st.keep(span);
        }
    }

    /// The window's sums, and a new window.
    pub fn take_window(&self) -> Window {
        match &self.0 {
            Some(i) => std::mem::take(&mut i.state.lock().unwrap().window),
            None => Window::default(),
        }
    }

    /// The spans kept so far and the count of those past [`MAX_SPANS`]; none kept after.
    pub fn take_spans(&self) -> (Vec<TraceSpan>, u64) {
        match &self.0 {
            Some(i) => {
                let mut st = i.state.lock().unwrap();
                (
                    std::mem::take(&mut st.spans),
                    std::mem::take(&mut st.dropped),
                )
            }
            None => (Vec::new(), 0),
        }
    }

    fn close(&self, slot: usize, start: Instant, record: bool) {
        if let Some(i) = &self.0 {
            let end = Instant::now();
            let mut st = i.state.lock().unwrap();
            if let Some(at) = st.open.iter().rposition(|&s| s == slot) {
                st.open.truncate(at);
            }
            let outer = st.open.last().copied().unwrap_or(Phase::Step.slot());
            i.current.store(outer, Ordering::Relaxed);
            if record {
                Self::add(i, &mut st, slot, 0, start, end);
            }
        }
    }
}

impl Drop for Span<'_> {
    fn drop(&mut self) {
        self.prof.close(self.slot, self.start, !self.cancelled);
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_and_names_are_one_to_one() {
        let mut seen = std::collections::HashSet::new();
        for s in 0..SLOTS {
            let p = Phase::of_slot(s);
            assert_eq!(p.slot(), s, "{p:?}");
            assert!(seen.insert(p.name()), "{}", p.name());
        }
        assert_eq!(
            Phase::LayerForward(40).slot(),
            Phase::LayerForward(31).slot()
        );
        assert_eq!(Phase::Realloc.name(), "realloc");
        assert_eq!(Phase::LayerBackward(1).name(), "backward/layer1");
    }

    #[test]
    fn spans_nest_sum_and_are_kept_while_tracing() {
        let p = Profiler::on();
        {
            let _s = p.span(Phase::Step);
            let _d = p.span(Phase::Data);
        }
        assert!(p.take_spans().0.is_empty());
        p.set_tracing(true, 2);
        {
            let _s = p.span(Phase::Step);
            {
                let _f = p.span(Phase::ForwardBackward);
                p.thread_span(0, Instant::now());
            }
            let t = Instant::now();
            p.record(Phase::AllReduceWait, t, t + Duration::from_millis(1));
        }
        let w = p.take_window();
        assert_eq!(w.count[Phase::Step.slot()], 2);
        assert!(w.get(Phase::AllReduceWait) >= 1e-3);
        let (spans, dropped) = p.take_spans();
        assert_eq!(dropped, 0);
        let names: Vec<_> = spans.iter().map(|s| (s.name.as_str(), s.tid)).collect();
        assert_eq!(
            names,
            [
                ("forward_backward", 1),
                ("forward_backward", 0),
                ("all_reduce/wait", 0),
                ("step", 0)
            ]
        );
        assert!(spans.iter().all(|s| s.step == 2));
        let off = Profiler::off();
        drop(off.span(Phase::Step));
        assert!(off.take_window().phases().is_empty());
    }
}
