//! The run's profile: the phases' seconds of each logging window (the metrics `profile`
//! line, the rank's report for Prometheus) and the trace of `profile_steps = "A:B"`
//! (`--profile-steps A:B`): every span of steps A to B, with the work that follows B
//! until the next step (checkpoints, evaluation, a reallocation round's passes), in the
//! Chrome trace-event format, one file per rank and session:
//! `profile/trace.steps{F}-{L}.rank{R}.json` (F..L: the steps it holds; a session
//! resumed inside A:B writes its own). A trace that cannot be written is a warning: the
//! run goes on.

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::runtime::Handle;

use lightrnn_core::Result;
use lightrnn_core::config::TrainConfig;
use lightrnn_core::data::store::Location;
use lightrnn_core::report::ProfileLine;
use lightrnn_kernels::profile::{DEVICE_TID, TraceSpan};
use lightrnn_kernels::{Phase, Profiler};

pub(super) struct Profiling {
    pub(super) prof: Profiler,
    range: Option<(u64, u64)>,
    rank: usize,
    /// The trace of this session was written.
    written: bool,
    /// The first and last step traced in this session.
    steps: Option<(u64, u64)>,
}

impl Profiling {
    pub(super) fn new(cfg: &TrainConfig, rank: usize) -> Result<Self> {
        let range = cfg.profile_range()?;
        let prof = if cfg.profile || range.is_some() {
            Profiler::on()
        } else {
            Profiler::off()
        };
        Ok(Self {
            prof,
            range,
            rank,
            written: false,
            steps: None,
        })
    }

    /// Step `step` (1-based) is about to run: the trace starts at A (or at the first step
    /// of a session resumed inside A:B) and is written before B + 1.
    pub(super) fn before_step(&mut self, step: u64, out: &Location, handle: &Handle) {
        let Some((a, b)) = self.range else {
            return;
        };
        if self.prof.tracing() && step > b {
            return self.write(out, handle);
        }
        if (a..=b).contains(&step) && !self.written {
            self.prof.set_tracing(true, step);
            let first = self.steps.map_or(step, |s| s.0);
            self.steps = Some((first, step));
        }
    }

    /// The run ends: a trace in progress is written.
    pub(super) fn finish(&mut self, out: &Location, handle: &Handle) {
        if self.prof.tracing() {
            self.write(out, handle);
        } else if let Some((a, b)) = self.range
            && !self.written
        {
            tracing::warn!("no step of --profile-steps {a}:{b} ran in this session: no trace");
        }
    }

    fn write(&mut self, out: &Location, handle: &Handle) {
        self.prof.set_tracing(false, 0);
        self.written = true;
        let (a, b) = self.steps.unwrap_or_default();
        let (spans, dropped) = self.prof.take_spans();
        let doc = trace_json(&spans, self.rank, &format!("{a}:{b}"));
        let name = format!("profile/trace.steps{a}-{b}.rank{}.json", self.rank);
        if dropped > 0 {
            tracing::warn!(
                kept = spans.len(),
                dropped,
                "the trace kept its first spans only: profile fewer steps"
            );
        }
        tracing::info!(
            spans = spans.len(),
            file = %out.join(&name),
            "profile of steps {a} to {b} written (open it in Perfetto or chrome://tracing)"
        );
        if let Err(e) = handle.block_on(out.put(&name, Bytes::from(doc.to_string()))) {
            tracing::warn!(error = %e, "the trace could not be written: training goes on");
        }
    }

    /// The window's phases as a metrics line (None when nothing was timed).
    pub(super) fn window_line(&self, step: u64, epoch: u64) -> Option<ProfileLine> {
        let w = self.prof.take_window();
        let steps = w.count[Phase::Step.slot()];
        if !self.prof.is_on() || steps == 0 {
            return None;
        }
        Some(ProfileLine {
            step,
            epoch,
            steps,
            seconds_per_step: w
                .phases()
                .into_iter()
                .map(|(n, s)| (n, s / steps as f64))
                .collect(),
        })
    }
}

/// The trace-event document of `spans`: complete events (`ph: "X"`) with the step in
/// their args, the process named after the rank, its threads after their roles.
fn trace_json(spans: &[TraceSpan], rank: usize, steps: &str) -> Value {
    let pid = rank;
    let mut tids: Vec<u32> = spans.iter().map(|s| s.tid).collect();
    tids.sort_unstable();
    tids.dedup();
    let mut events = vec![json!({
        "name": "process_name", "ph": "M", "pid": pid, "tid": 0,
        "args": {"name": format!("rank {rank}")}
    })];
    for t in tids {
        let name = match t {
            0 => "training".to_string(),
            DEVICE_TID => "device".to_string(),
            t => format!("cpu thread {}", t - 1),
        };
        events.push(json!({
            "name": "thread_name", "ph": "M", "pid": pid, "tid": t, "args": {"name": name}
        }));
    }
    for s in spans {
        events.push(json!({
            "name": s.name,
            "cat": if s.tid == DEVICE_TID { "device" } else { "host" },
            "ph": "X",
            "ts": s.start_us,
            "dur": s.dur_us,
            "pid": pid,
            "tid": s.tid,
            "args": {"step": s.step},
        }));
    }
    json!({
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {"steps": steps, "rank": rank},
    })
}

#[cfg(test)]
mod tests {
    use lightrnn_core::config::profile_steps;

    #[test]
    fn steps_are_parsed_and_refused_clearly() {
        assert_eq!(profile_steps("").unwrap(), None);
        assert_eq!(profile_steps("3:5").unwrap(), Some((3, 5)));
        assert_eq!(profile_steps("7:7").unwrap(), Some((7, 7)));
        for bad in ["5:3", "0:2", "3", "a:b", "3:"] {
            let e = profile_steps(bad).unwrap_err().to_string();
            assert!(
                e.contains("profile_steps") && e.contains("A:B"),
                "{bad}: {e}"
            );
        }
    }
}
