//! `lightrnn bench`: training throughput on a synthetic Zipf corpus (seeded), one JSON line.
//!
//! Tokens are drawn on the fly (no corpus in memory), so the peak RSS is the model, its
//! optimizer and its activations. The FLOP count is the standard dense one of the model
//! (LSTM forward 2*S*B*4m*(in+m) per layer, heads 2*T*B*m*(R+C), backward twice the
//! forward), comparable with what a framework executes; the CPU backend executes fewer
//! (layer 0 projects each distinct input row once), counted separately as
//! `executed_gflop_per_step`, and `share_of_gemm_peak` is the executed rate over the
//! GEMM peak measured in the same process. `phases_s_per_step` says where a step's time
//! goes, phase by phase, as the trainer's metrics `profile` lines do.

use serde::Serialize;

use lightrnn_kernels::rng::{Philox, Purpose};
use lightrnn_kernels::{
    BackendKind, BackendOptions, Batch, ModelConfig, ModelDims, Phase, Precision, Profiler, Stream,
    open_backend,
};

use lightrnn_core::Result;
use lightrnn_core::config::TrainConfig;
use lightrnn_core::data::zipf::Zipf;
use lightrnn_core::util::rss_mib;

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub vocab: usize,
    pub emb: usize,
    pub hidden: usize,
    pub layers: usize,
    pub batch: usize,
    pub bptt: usize,
    pub threads: usize,
    pub steps: usize,
    pub warmup: usize,
    pub seed: u64,
    pub dropout: f64,
    /// Zipf exponent of the synthetic corpus.
    pub zipf: f64,
    pub optimizer: String,
    pub lr: f64,
    pub clip: f64,
    /// Also measure the machine's GEMM peak in this process.
    pub gemm_peak: bool,
    pub backend: BackendKind,
    /// The CUDA backend's GEMM arithmetic.
    pub precision: Precision,
    /// The CUDA backend captures each step as a CUDA graph.
    pub cuda_graphs: bool,
    /// Time each phase of the steps (`phases_s_per_step`).
    pub profile: bool,
    /// Also keep every span of the timed steps, as `--profile-steps` does (what a trace
    /// costs).
    pub trace: bool,
}

/// What the device was asked to do per timed step (means over the timed steps): the
/// figures a step is shaped by.
#[derive(Clone, Debug, Serialize)]
pub struct DevicePerStep {
    pub launches: f64,
    pub gemms: f64,
    pub copies: f64,
    pub syncs: f64,
    pub allocs: f64,
    pub graph_launches: f64,
    pub unaligned_gemms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub vocab: usize,
    pub emb: usize,
    pub hidden: usize,
    pub layers: usize,
    pub batch: usize,
    pub bptt: usize,
    pub threads: usize,
    pub steps: usize,
    pub warmup: usize,
    pub params: usize,
    pub backend: String,
    pub words_per_sec: f64,
    pub s_per_step_mean: f64,
    pub s_per_step_median: f64,
    pub loss_first: f64,
    pub loss_last: f64,
    /// Dense-equivalent training FLOPs of the model per step (what a framework executes).
    pub model_gflop_per_step: f64,
    pub model_gflops: f64,
    /// GEMM FLOPs the CPU backend actually executed per step, and their rate.
    pub executed_gflop_per_step: f64,
    pub executed_gflops: f64,
    pub gemm_peak_gflops: Option<f64>,
    /// executed_gflops / gemm_peak_gflops: how busy the GEMM units were.
    pub share_of_gemm_peak: Option<f64>,
    pub rss_before_model_mib: Option<f64>,
    pub peak_rss_mib: Option<f64>,
    /// A device backend's work per timed step.
    pub device_per_step: Option<DevicePerStep>,
    /// Seconds per timed step of each phase (host time: a device backend's queued work
    /// shows where the host waits for it, in `update`'s read-back), nesting as
    /// `lightrnn_kernels::profile` says.
    pub phases_s_per_step: std::collections::BTreeMap<String, f64>,
    /// Spans kept with `trace`.
    pub trace_spans: Option<usize>,
}

/// Dense training FLOPs of one step (see the module docs).
pub fn model_flops(d: &ModelDims, b: usize, t: usize) -> f64 {
    let (s, m) = ((2 * t * b) as f64, d.hidden as f64);
    let lstm: f64 = (0..d.layers)
        .map(|l| 2.0 * s * 4.0 * m * (d.layer_input(l) as f64 + m))
        .sum();
    let heads = 2.0 * (t * b) as f64 * m * (d.rows + d.cols) as f64;
    3.0 * (lstm + heads)
}

pub fn bench(o: &BenchOptions) -> Result<BenchReport> {
    let (_, rss_before) = rss_mib();
    let dims = ModelDims::square(o.vocab, o.emb, o.hidden, o.layers)?;
    let mut be = open_backend(
        &BackendOptions::new(o.backend, o.threads)
            .with_precision(o.precision)
            .with_graphs(o.cuda_graphs),
        &ModelConfig {
            dims,
            dropout: o.dropout,
            seed: o.seed,
        },
    )?;
    let cfg = TrainConfig {
        optimizer: o.optimizer.clone(),
        ..TrainConfig::default()
    };
    let rule = cfg.optimizer_rule()?;
    let prof = if o.profile || o.trace {
        Profiler::on()
    } else {
        Profiler::off()
    };
    be.set_profiler(prof.clone());
    let zipf = Zipf::new(o.vocab as u64, o.zipf);
    let mut rng = Philox::new(o.seed, Purpose::Corpus).stream(0);
    let (b, t) = (o.batch, o.bptt);
    // B streams: keep each stream's last token as the next batch's first input.
    let mut buf: Vec<u32> = (0..(t + 1) * b).map(|_| zipf.sample(&mut rng)).collect();
    let mut times = Vec::with_capacity(o.steps);
    let mut flops0 = 0u64;
    let (mut first, mut last) = (f64::NAN, f64::NAN);
    let words = (t * b) as f64;
    let mut counters0 = None;
    for step in 0..o.warmup + o.steps {
        if step == o.warmup {
            flops0 = lightrnn_kernels::cpu::gemm::flops_executed();
            counters0 = be.device_counters();
            prof.take_window();
        }
        if o.trace && step >= o.warmup {
            prof.set_tracing(true, step as u64 + 1);
        }
        let t0 = std::time::Instant::now();
        let span = prof.span(Phase::Step);
        let batch = Batch {
            inputs: &buf[..t * b],
            targets: &buf[b..],
            steps: t,
            batch: b,
            stream: Stream::Train(0),
        };
        {
            let _s = prof.span(Phase::ForwardBackward);
            be.train_step(&batch, step as u64, 1.0 / words as f32)?;
        }
        let loss = {
            let _s = prof.span(Phase::Update);
            be.clip_and_step(&rule, o.lr, o.clip)?.loss.total() / words
        };
        drop(span);
        if step >= o.warmup {
            times.push(t0.elapsed().as_secs_f64());
            if first.is_nan() {
                first = loss;
            }
            last = loss;
        }
        // Next batch: the last row becomes the first, the rest is drawn.
        buf.copy_within(t * b..(t + 1) * b, 0);
        for x in &mut buf[b..] {
            *x = zipf.sample(&mut rng);
        }
    }
    let total: f64 = times.iter().sum();
    let mean = total / times.len().max(1) as f64;
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN);
    let executed =
        (lightrnn_kernels::cpu::gemm::flops_executed() - flops0) as f64 / times.len().max(1) as f64;
    let flops = model_flops(&dims, b, t);
    let achieved = flops / mean / 1e9;
    let (peak_rss, _) = rss_mib();
    let phases = prof.take_window().phases();
    let trace_spans = o.trace.then(|| prof.take_spans().0.len());
    let device_per_step = match (counters0, be.device_counters()) {
        (Some(a), Some(b)) => {
            let c = b.since(&a);
            let per = |x: u64| x as f64 / times.len().max(1) as f64;
            Some(DevicePerStep {
                launches: per(c.launches),
                gemms: per(c.gemms),
                copies: per(c.copies),
                syncs: per(c.syncs),
                allocs: per(c.allocs),
                graph_launches: per(c.graph_launches),
                unaligned_gemms: per(c.unaligned_gemms),
            })
        }
        _ => None,
    };
    let gemm_peak = if o.gemm_peak {
        Some(lightrnn_kernels::cpu::gemm_peak_gflops(o.threads, 2048, 5)?)
    } else {
        None
    };
    Ok(BenchReport {
        vocab: o.vocab,
        emb: o.emb,
        hidden: o.hidden,
        layers: o.layers,
        batch: b,
        bptt: t,
        threads: o.threads,
        steps: o.steps,
        warmup: o.warmup,
        params: be.layout().total,
        backend: be.name(),
        words_per_sec: words / mean,
        s_per_step_mean: mean,
        s_per_step_median: median,
        loss_first: first,
        loss_last: last,
        model_gflop_per_step: flops / 1e9,
        model_gflops: achieved,
        executed_gflop_per_step: executed / 1e9,
        executed_gflops: executed / mean / 1e9,
        gemm_peak_gflops: gemm_peak,
        share_of_gemm_peak: gemm_peak.map(|p| executed / mean / 1e9 / p),
        rss_before_model_mib: rss_before,
        peak_rss_mib: peak_rss,
        device_per_step,
        phases_s_per_step: phases
            .into_iter()
            .map(|(n, s)| (n, s / times.len().max(1) as f64))
            .collect(),
        trace_spans,
    })
}
