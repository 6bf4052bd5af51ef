//! Whole training runs of the CUDA backend on the emulated device (the `.cu` kernels built
//! for the host), against the CPU backend: the same run gives the same figures, a
//! reallocation round included, and a checkpoint written by the CUDA backend resumes on
//! the CPU backend (one checkpoint format for every device).
#![cfg(feature = "cuda")]

use lightrnn_core::checkpoint;
use lightrnn_core::config::TrainConfig;
use lightrnn_core::data::store::Location;
use lightrnn_core::report::Summary;
use lightrnn_kernels::cuda::CudaBackend;
use lightrnn_kernels::{Backend, BackendKind, ModelConfig};
use lightrnn_worker::train::{BackendFactory, RunOptions, train};

fn emulated(cfg: &ModelConfig) -> lightrnn_kernels::Result<Box<dyn Backend>> {
    Ok(Box::new(CudaBackend::emulated(cfg, 1 << 30)?))
}

fn run(
    rt: &tokio::runtime::Runtime,
    cfg: &TrainConfig,
    data: &Location,
    out: &str,
    open: Option<BackendFactory>,
    resume: bool,
) -> Summary {
    let opts = RunOptions {
        data: data.clone(),
        out: Location::parse(out).unwrap(),
        resume,
        checkpoint: None,
        backend: BackendKind::Cpu,
        progress: false,
        stop: None,
        report: None,
        open,
    };
    let (cfg, handle) = (cfg.clone(), rt.handle().clone());
    std::thread::spawn(move || train(&cfg, &opts, &handle))
        .join()
        .unwrap()
        .unwrap()
}

fn close(a: f64, b: f64, what: &str) {
    assert!(
        (a - b).abs() <= 1e-4 * b.abs(),
        "{what}: cuda {a} vs cpu {b}"
    );
}

#[test]
fn a_tiny_run_on_the_emulated_cuda_backend_matches_the_cpu_and_its_checkpoint_resumes_on_the_cpu() {
    let rt = lightrnn_tests::runtime();
    let data = Location::parse("memory://cuda-tests/data").unwrap();
    let lines = lightrnn_tests::corpus_lines(5, 900, 8, 12);
    lightrnn_tests::put_corpus(&rt, &data, "a", &lines);
    // Two epochs with an exact reallocation between them, dropout on.
    let cfg = TrainConfig::preset("tiny")
        .unwrap()
        .with_overrides(&[
            "epochs=2".into(),
            "realloc_every=1".into(),
            "dropout=0.2".into(),
        ])
        .unwrap();
    let cpu = run(&rt, &cfg, &data, "memory://cuda-tests/cpu", None, false);
    let gpu = run(
        &rt,
        &cfg,
        &data,
        "memory://cuda-tests/gpu",
        Some(emulated),
        false,
    );
    assert!(gpu.backend.starts_with("cuda: emulated"), "{}", gpu.backend);
    assert_eq!(
        (gpu.steps, gpu.epochs_completed),
        (cpu.steps, cpu.epochs_completed)
    );
    close(gpu.train_loss, cpu.train_loss, "train loss");
    close(gpu.valid_ppl, cpu.valid_ppl, "valid ppl");
    close(gpu.test_ppl, cpu.test_ppl, "test ppl");
    let (a, b) = rt.block_on(async {
        (
            checkpoint::resolve(&Location::parse("memory://cuda-tests/gpu").unwrap())
                .await
                .unwrap(),
            checkpoint::resolve(&Location::parse("memory://cuda-tests/cpu").unwrap())
                .await
                .unwrap(),
        )
    });
    assert_eq!(
        a.cells, b.cells,
        "the same allocation after the reallocation round"
    );
    // Stop the CUDA run half-way, finish it on the CPU: the CPU run's figures.
    let half = cfg
        .with_overrides(&[format!("max_steps={}", cpu.steps / 2)])
        .unwrap();
    run(
        &rt,
        &half,
        &data,
        "memory://cuda-tests/mixed",
        Some(emulated),
        false,
    );
    let mixed = run(&rt, &cfg, &data, "memory://cuda-tests/mixed", None, true);
    assert_eq!(mixed.steps, cpu.steps);
    close(
        mixed.test_ppl,
        cpu.test_ppl,
        "test ppl after resuming on the cpu",
    );
}

/// A distributed job through the coordinator (gRPC) and the TCP ring, in this process:
/// `workers` ranks, each opening its model with `open` (the CPU backend when `None`).
fn job(
    rt: &tokio::runtime::Runtime,
    cfg: &TrainConfig,
    data: &str,
    out: &str,
    workers: usize,
    open: Option<BackendFactory>,
) -> Summary {
    use lightrnn_coordinator::launch::{RunSpec, job_spec};
    use lightrnn_coordinator::serve::{bind, run_job};
    use lightrnn_worker::rank::{WorkerOptions, run_worker};
    let run = RunSpec {
        cfg: cfg.clone(),
        data,
        out,
        resume: false,
        backend: "cpu",
        prepare_by: lightrnn_coordinator::job::spec::PrepareBy::Workers,
    };
    let spec = job_spec(run, (workers, workers), rt.handle()).unwrap();
    let incoming = rt
        .block_on(async { bind("127.0.0.1:0".parse().unwrap()) })
        .unwrap();
    let url = format!("http://{}", incoming.local_addr().unwrap());
    let served = rt.spawn(run_job(spec, incoming, Box::new(|_| Box::pin(async {}))));
    let ranks: Vec<_> = (0..workers)
        .map(|rank| {
            let opts = WorkerOptions {
                coordinator: url.clone(),
                rank: Some(rank),
                advertise: None,
                ring_port: 0,
                threads: Some(1),
                connect_timeout: std::time::Duration::from_secs(60),
                stop: Default::default(),
                token: None,
                tls: None,
                device: None,
                open,
            };
            let handle = rt.handle().clone();
            std::thread::spawn(move || run_worker(&opts, &handle))
        })
        .collect();
    for r in ranks {
        r.join().unwrap().unwrap();
    }
    rt.block_on(served).unwrap().unwrap().summary
}

/// Data parallelism with the CUDA backend (gradients staged through host memory for the
/// ring): 2 and 3 emulated-CUDA workers give the 2-CPU-worker job's figures, a
/// reallocation round included (6 gradient groups fix the summation order at any count).
#[test]
fn emulated_cuda_workers_at_two_and_three_ranks_match_the_cpu_workers() {
    let rt = lightrnn_tests::runtime();
    let data = "memory://cuda-jobs/data";
    let loc = Location::parse(data).unwrap();
    let lines = lightrnn_tests::corpus_lines(9, 700, 8, 12);
    lightrnn_tests::put_corpus(&rt, &loc, "a", &lines);
    let cfg = TrainConfig::preset("tiny")
        .unwrap()
        .with_overrides(&[
            "batch=12".into(),
            "grad_groups=6".into(),
            "epochs=2".into(),
            "realloc_every=1".into(),
            "dropout=0.2".into(),
        ])
        .unwrap();
    let cpu = job(&rt, &cfg, data, "memory://cuda-jobs/cpu2", 2, None);
    assert_eq!(cpu.world_size, 2);
    for workers in [2, 3] {
        let out = format!("memory://cuda-jobs/cuda{workers}");
        let gpu = job(&rt, &cfg, data, &out, workers, Some(emulated));
        assert_eq!((gpu.world_size, gpu.steps), (workers, cpu.steps));
        assert!(gpu.backend.starts_with("cuda: emulated"), "{}", gpu.backend);
        close(
            gpu.train_loss,
            cpu.train_loss,
            &format!("{workers} workers: train loss"),
        );
        close(
            gpu.valid_ppl,
            cpu.valid_ppl,
            &format!("{workers} workers: valid ppl"),
        );
        close(
            gpu.test_ppl,
            cpu.test_ppl,
            &format!("{workers} workers: test ppl"),
        );
    }
}

/// The global step at which [`Flaky`] fails once, and whether it has.
static FAULT_AT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(u64::MAX);
static FAULTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The emulated CUDA backend with one device fault: the first training step at
/// [`FAULT_AT`] in the process fails as a CUDA call would (a retryable error).
struct Flaky(CudaBackend);

fn flaky(cfg: &ModelConfig) -> lightrnn_kernels::Result<Box<dyn Backend>> {
    Ok(Box::new(Flaky(CudaBackend::emulated(cfg, 1 << 30)?)))
}

use lightrnn_kernels::{
    Batch, GradReduce, LossSums, OptimizerState, ParamLayout, Pass, Shard, State, Stream,
};

impl Backend for Flaky {
    fn name(&self) -> String {
        self.0.name()
    }
    fn layout(&self) -> &ParamLayout {
        self.0.layout()
    }
    fn params(&self) -> lightrnn_kernels::Result<Vec<f32>> {
        self.0.params()
    }
    fn set_params(&mut self, p: &[f32]) -> lightrnn_kernels::Result<()> {
        self.0.set_params(p)
    }
    fn grads(&self) -> lightrnn_kernels::Result<Vec<f32>> {
        self.0.grads()
    }
    fn allocation(&self) -> lightrnn_kernels::Result<Vec<u32>> {
        self.0.allocation()
    }
    fn set_allocation(&mut self, c: &[u32]) -> lightrnn_kernels::Result<()> {
        self.0.set_allocation(c)
    }
    fn state(&self, s: Stream) -> lightrnn_kernels::Result<Option<State<f32>>> {
        self.0.state(s)
    }
    fn set_state(&mut self, s: Stream, st: State<f32>) -> lightrnn_kernels::Result<()> {
        self.0.set_state(s, st)
    }
    fn reset_state(&mut self, s: Stream) {
        self.0.reset_state(s)
    }
    fn set_shard(&mut self, s: Shard) -> lightrnn_kernels::Result<()> {
        self.0.set_shard(s)
    }
    fn input_forward(&mut self, b: &Batch<'_>, p: Pass) -> lightrnn_kernels::Result<()> {
        self.0.input_forward(b, p)
    }
    fn lstm_forward(&mut self, l: usize) -> lightrnn_kernels::Result<()> {
        self.0.lstm_forward(l)
    }
    fn heads(&mut self, g: Option<f32>) -> lightrnn_kernels::Result<LossSums> {
        self.0.heads(g)
    }
    fn lstm_backward(&mut self, l: usize) -> lightrnn_kernels::Result<()> {
        self.0.lstm_backward(l)
    }
    fn train_step(&mut self, b: &Batch<'_>, step: u64, s: f32) -> lightrnn_kernels::Result<()> {
        use std::sync::atomic::Ordering;
        if step == FAULT_AT.load(Ordering::SeqCst) && !FAULTED.swap(true, Ordering::SeqCst) {
            return Err(lightrnn_kernels::Error::Cuda(format!(
                "injected device fault at step {step}"
            )));
        }
        self.0.train_step(b, step, s)
    }
    fn step_loss(&mut self) -> lightrnn_kernels::Result<LossSums> {
        self.0.step_loss()
    }
    fn all_reduce_grads(&mut self, c: &mut dyn GradReduce) -> lightrnn_kernels::Result<()> {
        self.0.all_reduce_grads(c)
    }
    fn clip_and_step(
        &mut self,
        r: &lightrnn_kernels::Optimizer,
        lr: f64,
        m: f64,
    ) -> lightrnn_kernels::Result<lightrnn_kernels::StepFigures> {
        self.0.clip_and_step(r, lr, m)
    }
    fn optimizer_state(&self) -> lightrnn_kernels::Result<Option<OptimizerState>> {
        self.0.optimizer_state()
    }
    fn set_optimizer_state(&mut self, s: OptimizerState) -> lightrnn_kernels::Result<()> {
        self.0.set_optimizer_state(s)
    }
    fn begin_loss_tables(
        &mut self,
        w: std::ops::Range<usize>,
        m: u64,
    ) -> lightrnn_kernels::Result<()> {
        self.0.begin_loss_tables(w, m)
    }
    fn accumulate_loss_tables(&mut self, b: &Batch<'_>) -> lightrnn_kernels::Result<LossSums> {
        self.0.accumulate_loss_tables(b)
    }
    fn take_loss_tables(&mut self) -> lightrnn_kernels::Result<lightrnn_kernels::LossTables> {
        self.0.take_loss_tables()
    }
    fn take_loss_tables_scattered(
        &mut self,
        peers: &mut dyn lightrnn_kernels::Peers,
    ) -> lightrnn_kernels::Result<Option<lightrnn_kernels::ScatteredTables>> {
        self.0.take_loss_tables_scattered(peers)
    }
    fn eval_batch(&mut self, b: &Batch<'_>) -> lightrnn_kernels::Result<LossSums> {
        self.0.eval_batch(b)
    }
}

/// A device fault on one CUDA worker goes through the one fault path: the generation
/// ends, the group re-forms from the last committed checkpoint, and the run ends exactly
/// as the run without the fault (the emulated device is deterministic).
#[test]
fn a_device_fault_re_forms_the_group_and_the_run_ends_as_without_it() {
    let rt = lightrnn_tests::runtime();
    let data = "memory://cuda-fault/data";
    let loc = Location::parse(data).unwrap();
    lightrnn_tests::put_corpus(&rt, &loc, "a", &lightrnn_tests::corpus_lines(4, 500, 8, 12));
    let cfg = TrainConfig::preset("tiny")
        .unwrap()
        .with_overrides(&["dropout=0.2".into(), "checkpoint_every=8".into()])
        .unwrap();
    let clean = job(
        &rt,
        &cfg,
        data,
        "memory://cuda-fault/clean",
        2,
        Some(emulated),
    );
    assert!(clean.steps > 20, "{} steps", clean.steps);
    FAULT_AT.store(19, std::sync::atomic::Ordering::SeqCst);
    let faulted = job(
        &rt,
        &cfg,
        data,
        "memory://cuda-fault/faulted",
        2,
        Some(flaky),
    );
    assert!(
        FAULTED.load(std::sync::atomic::Ordering::SeqCst),
        "the fault was injected"
    );
    assert_eq!(faulted.steps, clean.steps);
    assert_eq!(faulted.train_loss.to_bits(), clean.train_loss.to_bits());
    assert_eq!(faulted.test_ppl.to_bits(), clean.test_ppl.to_bits());
}
