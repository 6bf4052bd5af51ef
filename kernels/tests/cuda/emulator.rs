//! The checks the emulated device adds and the GPU's behaviour it models: memory
//! refusals with the figures, GEMM bounds and barrier deadlocks, queued work run when the
//! host waits, launch limits, and stream capture's refusals and replays.

use crate::common::{Dev, GIB, tokens};
use lightrnn_kernels::cuda::CudaBackend;
use lightrnn_kernels::cuda::emulated::Emulated;
use lightrnn_kernels::cuda::layer::{Arg, Device, Gemm, Launch};
use lightrnn_kernels::{Backend, Batch, Error, ModelConfig, ModelDims, Stream};

#[test]
fn emulator_refuses_a_model_or_batch_too_large_for_the_device_with_the_figures() {
    let dims = ModelDims::square(10_000, 64, 64, 2).unwrap();
    let cfg = ModelConfig {
        dims,
        dropout: 0.0,
        seed: 1,
    };
    let err = CudaBackend::emulated(&cfg, 1 << 20)
        .err()
        .expect("1 MiB cannot hold the model");
    let msg = err.to_string();
    assert!(
        matches!(err, Error::OutOfMemory(_)) && msg.contains("the model") && msg.contains("MiB"),
        "{msg}"
    );
    // Room for the model, not for a batch of 512 streams x 35 steps.
    let room = lightrnn_kernels::cuda::model_bytes(lightrnn_kernels::ParamLayout::new(dims).total)
        as usize
        + (8 << 20);
    let mut be = CudaBackend::emulated(&cfg, room).unwrap();
    let toks = tokens(1, 35, 512, 10_000);
    let batch = Batch {
        inputs: &toks[..35 * 512],
        targets: &toks[512..],
        steps: 35,
        batch: 512,
        stream: Stream::Train(0),
    };
    let msg = be.train_step(&batch, 0, 1.0).unwrap_err().to_string();
    assert!(
        msg.contains("512 streams x 35 steps") && msg.contains("MiB free"),
        "{msg}"
    );
    // A small batch still trains.
    let toks = tokens(2, 3, 2, 10_000);
    let small = Batch {
        inputs: &toks[..6],
        targets: &toks[2..],
        steps: 3,
        batch: 2,
        stream: Stream::Train(0),
    };
    be.train_step(&small, 0, 1.0).unwrap();
    assert!(be.step_loss().unwrap().total() > 0.0);
}

#[test]
fn emulator_refuses_gemms_outside_their_buffers_and_reports_deadlocks() {
    // The emulator's own checks (a GPU would not say).
    {
        let mut d = Dev::on("emulated");
        let (a, b, c) = (d.put(&[1f32; 6]), d.put(&[1f32; 6]), d.put(&[0f32; 4]));
        let (Arg::Ptr(a), Arg::Ptr(b), Arg::Ptr(c)) = (a, b, c) else {
            unreachable!()
        };
        let g = Gemm {
            trans_a: false,
            trans_b: false,
            m: 2,
            n: 2,
            k: 3,
            alpha: 1.0,
            a,
            lda: 2,
            b,
            ldb: 3,
            beta: 0.0,
            c,
            ldc: 2,
        };
        d.d.gemm(&g).unwrap();
        let got: Vec<f32> = d.get(Arg::Ptr(c), 4);
        assert_eq!(got, vec![3.0; 4]);
        // One column too many for C (ldc 3): 3 + 2 elements past a 4-element buffer.
        let msg = d.d.gemm(&Gemm { ldc: 3, ..g }).unwrap_err().to_string();
        assert!(msg.contains("gemm C") && msg.contains("overrun"), "{msg}");
        let msg = d.d.gemm(&Gemm { lda: 1, ..g }).unwrap_err().to_string();
        assert!(msg.contains("lda"), "{msg}");
        // Half a block at a barrier, half gone: a deadlock error, not a hang.
        let out = d.put(&[0f32; 64]);
        let msg = d
            .run("planted_partial_barrier", [1, 1, 1], 64, &[out])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("deadlock") && msg.contains("planted_partial_barrier"),
            "{msg}"
        );
        // A launch with the wrong argument count is refused by the registry.
        let msg = d
            .run("planted_partial_barrier", [1, 1, 1], 64, &[out, out])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("takes 1 arguments"), "{msg}");
        // The emulator keeps working after an error.
        let (x, y) = (d.put(&[2f32; 256]), d.put(&[0f32; 256]));
        d.run("planted_with_sync", [1, 1, 1], 256, &[y, x]).unwrap();
        assert_eq!(d.get::<f32>(y, 256), vec![2.0; 256]);
    }
}

/// The emulator runs queued work when the host waits, as a GPU's stream runs it while
/// the host goes on: a host that rewrites the page-locked source of an upload before
/// waiting uploads the new bytes, and a download read before the wait is not there yet.
#[test]
fn emulator_runs_queued_work_when_the_host_waits() {
    let d = Emulated::new(GIB);
    let mut host = d.alloc_host(16).unwrap();
    let dev = d.alloc(16).unwrap();
    host.slice_mut::<u32>(0, 4)
        .unwrap()
        .copy_from_slice(&[1, 2, 3, 4]);
    d.upload_async(dev.addr(), &host, 0, 16).unwrap();
    host.slice_mut::<u32>(0, 4).unwrap()[0] = 9; // too early: the copy has not run
    d.synchronize().unwrap();
    let mut back = [0u8; 16];
    d.download(dev.addr(), &mut back).unwrap();
    assert_eq!(&back[..4], &9u32.to_le_bytes());
    let out = d.alloc_host(16).unwrap();
    d.download_async(dev.addr(), &out, 0, 16).unwrap();
    assert_eq!(out.slice::<u32>(0, 4).unwrap(), &[0, 0, 0, 0], "not yet");
    d.synchronize().unwrap();
    assert_eq!(out.slice::<u32>(0, 4).unwrap(), &[9, 2, 3, 4]);
    let c = d.counters();
    assert_eq!((c.syncs, c.allocs, c.host_allocs), (3, 1, 2), "{c:?}");
}

/// Launches a GPU refuses, the emulator refuses: more than 1024 threads or 64 in z per
/// block, a grid beyond 65,535 in y, more threads than a kernel's `__launch_bounds__`,
/// more than 48 KB of static shared memory.
#[test]
fn emulator_refuses_launches_a_gpu_would_refuse() {
    let mut d = Dev::on("emulated");
    let out = d.put(&[0f32; 2048]);
    let launch = |grid: [u32; 3], block: [u32; 3], kernel: &'static str| {
        d.d.launch(&Launch {
            kernel,
            grid,
            block,
            args: &[out],
        })
        .and_then(|()| d.d.synchronize())
        .unwrap_err()
        .to_string()
    };
    for (grid, block, want) in [
        ([1, 1, 1], [1025, 1, 1], "1024 threads"),
        ([1, 1, 1], [1, 1, 65], "64 in z"),
        ([1, 65_536, 1], [32, 1, 1], "65,535"),
    ] {
        let msg = launch(grid, block, "planted_partial_barrier");
        assert!(msg.contains(want), "{msg}");
    }
    let msg = launch([1, 1, 1], [64, 1, 1], "planted_too_much_shared");
    assert!(
        msg.contains("static shared memory") && msg.contains("49156"),
        "{msg}"
    );
    // softmax_nll is built for 256 threads.
    let args = [
        out,
        out,
        out,
        out,
        Arg::U32(8),
        Arg::U32(8),
        out,
        Arg::U32(0),
    ];
    let msg = d
        .run("softmax_nll", [1, 1, 1], 512, &args)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("__launch_bounds__(256)"), "{msg}");
}

/// A capture refuses what stream capture refuses (an allocation, a wait, a synchronous
/// copy), a free inside it spoils it, and a graph replays its captured work each launch.
#[test]
fn emulator_capture_refuses_allocations_and_waits_and_replays() {
    let mut d = Dev::on("emulated");
    let (x, y) = (d.put(&[1f32; 8]), d.put(&[0f32; 8]));
    let spare = d.d.alloc(64).unwrap();
    d.d.begin_capture().unwrap();
    assert!(d.d.alloc(64).err().unwrap().to_string().contains("capture"));
    assert!(
        d.d.synchronize()
            .unwrap_err()
            .to_string()
            .contains("capture")
    );
    let mut host = [0u8; 4];
    assert!(d.d.download(spare.addr(), &mut host).is_err());
    d.d.launch(&Launch {
        kernel: "add_assign",
        grid: [1, 1, 1],
        block: [32, 1, 1],
        args: &[y, x, Arg::U64(8)],
    })
    .unwrap();
    let g = d.d.end_capture().unwrap();
    assert_eq!(g.nodes, 1);
    assert_eq!(
        d.get::<f32>(y, 8),
        vec![0.0; 8],
        "captured work does not run"
    );
    for k in 1..=3 {
        d.d.launch_graph(&g).unwrap();
        assert_eq!(d.get::<f32>(y, 8), vec![k as f32; 8]);
    }
    d.d.begin_capture().unwrap();
    drop(spare);
    let msg = d.d.end_capture().err().unwrap().to_string();
    assert!(msg.contains("a free"), "{msg}");
}
