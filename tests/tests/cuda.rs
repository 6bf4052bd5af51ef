//! Whole training runs of the CUDA backend on the emulated device (the `.cu` kernels built
//! for the host), against the CPU backend: the same run gives the same figures, a
//! reallocation round included, and a checkpoint written by the CUDA backend resumes on
//! the CPU backend (one checkpoint format for every device).
#![cfg(feature = "cuda")]

use lightrnn_kernels::cuda::CudaBackend;
use lightrnn_kernels::{Backend, BackendKind, ModelConfig};
use lightrnn_worker::checkpoint;
use lightrnn_worker::config::TrainConfig;
use lightrnn_worker::data::store::Location;
use lightrnn_worker::report::Summary;
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
    let text = lines.join("\n") + "\n";
    rt.block_on(async {
        for name in ["a.train.txt", "a.valid.txt", "a.test.txt"] {
            data.put(name, bytes::Bytes::from(text.clone()))
                .await
                .unwrap();
        }
    });
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
