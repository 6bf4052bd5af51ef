//! Parity with the PyTorch reference: `tests/data/lightrnn_tiny.json` was produced by
//! `peers/make_fixture.py` (float64): parameters, allocation, initial state, one batch, and
//! the expected loss, gradients and final state. The f64 engine must agree to rounding;
//! the f32 CPU backend to 1e-5 (loss) and 1e-4 (gradients), relative.

use lightrnn_kernels::cpu::Engine;
use lightrnn_kernels::{Backend, CpuBackend, ModelConfig, ModelDims, Real};
use lightrnn_kernels::{Batch, Pass, State, Stream};
use serde_json::Value;

struct Fixture {
    v: Value,
    dims: ModelDims,
    t: usize,
    b: usize,
}

fn flat(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(a) => a.iter().flat_map(flat).collect(),
        Value::Number(n) => vec![n.as_f64().unwrap()],
        other => panic!("not a number: {other}"),
    }
}

fn load() -> Fixture {
    // Where it was built, or (a test executable carried to a GPU machine, run from the
    // kernels directory of a copy of the tree) relative to the working directory.
    let built = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/lightrnn_tiny.json");
    let path = if std::path::Path::new(built).exists() {
        built
    } else {
        "tests/data/lightrnn_tiny.json"
    };
    let text = std::fs::read_to_string(path).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let u = |k: &str| v[k].as_u64().unwrap() as usize;
    let dims = ModelDims {
        vocab: u("V"),
        rows: u("R"),
        cols: u("C"),
        emb: u("emb"),
        hidden: u("hidden"),
        layers: u("layers"),
    };
    let (t, b) = (u("bptt"), u("batch"));
    Fixture { v, dims, t, b }
}

impl Fixture {
    fn params(&self, layout: &lightrnn_kernels::ParamLayout) -> Vec<f64> {
        let mut out = vec![0.0; layout.total];
        for s in &layout.specs {
            let vals = flat(&self.v["params"][&s.name]);
            assert_eq!(vals.len(), s.len(), "{}", s.name);
            out[s.range()].copy_from_slice(&vals);
        }
        out
    }
    fn cells(&self) -> Vec<u32> {
        let (r, c) = (flat(&self.v["row"]), flat(&self.v["col"]));
        r.iter()
            .zip(&c)
            .map(|(&r, &c)| (r as usize * self.dims.cols + c as usize) as u32)
            .collect()
    }
    fn ids(&self, k: &str) -> Vec<u32> {
        flat(&self.v[k]).into_iter().map(|x| x as u32).collect()
    }
    fn grads(&self, layout: &lightrnn_kernels::ParamLayout) -> Vec<(String, Vec<f64>)> {
        layout
            .specs
            .iter()
            .map(|s| (s.name.clone(), flat(&self.v["grads"][&s.name])))
            .collect()
    }
}

/// max |a - b| / max |b| over a tensor (elements near zero do not dominate).
fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn run_engine<T: Real>(f: &Fixture, threads: usize) -> (f64, Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut e = Engine::<T>::new(f.dims, 0.0, 1, threads).unwrap();
    let p: Vec<T> = f.params(e.layout()).into_iter().map(T::from_f64).collect();
    e.set_params_torch(&p).unwrap();
    e.set_allocation(&f.cells()).unwrap();
    let conv = |k: &str| {
        flat(&f.v[k])
            .into_iter()
            .map(T::from_f64)
            .collect::<Vec<T>>()
    };
    e.set_state(
        Stream::Train(0),
        State {
            batch: f.b,
            h: conv("h0"),
            c: conv("c0"),
        },
    )
    .unwrap();
    let (x, y) = (f.ids("x"), f.ids("y"));
    let batch = Batch {
        inputs: &x,
        targets: &y,
        steps: f.t,
        batch: f.b,
        stream: Stream::Train(0),
    };
    e.input_forward(&batch, Pass::Train { step: 0 }).unwrap();
    for l in 0..f.dims.layers {
        e.lstm_forward(l).unwrap();
    }
    let words = (f.t * f.b) as f64;
    let loss = e.heads(Some(T::from_f64(1.0 / words))).unwrap();
    for l in (0..f.dims.layers).rev() {
        e.lstm_backward(l).unwrap();
    }
    let st = e.state(Stream::Train(0)).unwrap();
    let to64 = |v: &[T]| v.iter().map(|x| x.to_f64()).collect::<Vec<_>>();
    (
        loss.total() / words,
        to64(&e.grads_torch()),
        to64(&st.h),
        to64(&st.c),
    )
}

#[test]
fn f64_engine_matches_pytorch_reference() {
    let f = load();
    let want_loss = f.v["loss"].as_f64().unwrap();
    for threads in [1, 2, 3] {
        let (loss, grads, h1, c1) = run_engine::<f64>(&f, threads);
        assert!(
            (loss - want_loss).abs() / want_loss < 1e-12,
            "threads {threads}: loss {loss} vs {want_loss}"
        );
        let layout = lightrnn_kernels::ParamLayout::new(f.dims);
        for (s, (name, want)) in layout.specs.iter().zip(f.grads(&layout)) {
            let e = rel_err(&grads[s.range()], &want);
            assert!(
                e < 1e-10,
                "threads {threads}: grad {name} relative error {e}"
            );
        }
        assert!(rel_err(&h1, &flat(&f.v["h1"])) < 1e-12);
        assert!(rel_err(&c1, &flat(&f.v["c1"])) < 1e-12);
    }
}

/// One f32 backend on the fixture: a training step's loss and gradients, then an
/// evaluation of the same batch from the same state.
fn check_f32_backend(f: &Fixture, be: &mut dyn Backend, what: &str) {
    let want_loss = f.v["loss"].as_f64().unwrap();
    let p: Vec<f32> = f
        .params(be.layout())
        .into_iter()
        .map(|x| x as f32)
        .collect();
    be.set_params(&p).unwrap();
    be.set_allocation(&f.cells()).unwrap();
    let conv = |k: &str| {
        flat(&f.v[k])
            .into_iter()
            .map(|x| x as f32)
            .collect::<Vec<f32>>()
    };
    be.set_state(
        Stream::Train(0),
        State {
            batch: f.b,
            h: conv("h0"),
            c: conv("c0"),
        },
    )
    .unwrap();
    let (x, y) = (f.ids("x"), f.ids("y"));
    let batch = Batch {
        inputs: &x,
        targets: &y,
        steps: f.t,
        batch: f.b,
        stream: Stream::Train(0),
    };
    let words = (f.t * f.b) as f32;
    be.train_step(&batch, 0, 1.0 / words).unwrap();
    let loss = be.step_loss().unwrap().total() / words as f64;
    assert!(
        (loss - want_loss).abs() / want_loss < 1e-5,
        "{what}: loss {loss} vs {want_loss}"
    );
    let grads: Vec<f64> = be.grads().unwrap().into_iter().map(|x| x as f64).collect();
    let layout = be.layout().clone();
    for (s, (name, want)) in layout.specs.iter().zip(f.grads(&layout)) {
        let e = rel_err(&grads[s.range()], &want);
        assert!(e < 1e-4, "{what}: grad {name} relative error {e}");
    }
    // Evaluation of the same batch from the same state gives the same loss.
    be.set_state(
        Stream::Train(0),
        State {
            batch: f.b,
            h: conv("h0"),
            c: conv("c0"),
        },
    )
    .unwrap();
    let ev = be.eval_batch(&batch).unwrap();
    assert!((ev.total() / words as f64 - want_loss).abs() / want_loss < 1e-5);
}

fn fixture_config(f: &Fixture) -> ModelConfig {
    ModelConfig {
        dims: f.dims,
        dropout: 0.0,
        seed: 1,
    }
}

#[test]
fn f32_cpu_backend_matches_pytorch_reference() {
    let f = load();
    for threads in [1, 2] {
        let mut be = CpuBackend::new(&fixture_config(&f), threads).unwrap();
        check_f32_backend(&f, &mut be, &format!("cpu, {threads} threads"));
    }
}

/// The CUDA backend, on the emulated device, against the same reference.
#[cfg(feature = "cuda")]
#[test]
fn emulated_cuda_backend_matches_pytorch_reference() {
    let f = load();
    let mut be =
        lightrnn_kernels::cuda::CudaBackend::emulated(&fixture_config(&f), 1 << 30).unwrap();
    check_f32_backend(&f, &mut be, "emulated cuda");
}
