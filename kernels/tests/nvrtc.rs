//! Every CUDA kernel compiled by NVRTC (the CUDA 13.0 line, as the GPU machines' driver)
//! to `compute_90` PTX and to an `sm_90` CUBIN, with ptxas's report checked: no spills, no
//! stack frame, registers within each kernel's budget (more registers mean fewer resident
//! warps: a budget that grows is a change to look at, not to wave through). Needs no GPU.
//! Without the NVRTC library the test says so and passes, unless
//! `LIGHTRNN_REQUIRE_NVRTC=1` (scripts/test.sh sets it, after installing the library).
#![cfg(feature = "cuda")]

use lightrnn_kernels::cuda::layer::SOURCES;
use lightrnn_kernels::cuda::nvrtc;

/// Registers per thread each kernel may use on sm_90: what NVRTC 13.0.88 gave when the
/// kernel was written, rounded up to the next multiple of 8.
const BUDGETS: &[(&str, u32)] = &[
    ("dropout_apply", 32),
    ("gather_rows", 24),
    ("scatter_rows", 40),
    ("lstm_cell_forward", 48),
    ("lstm_cell_backward", 40),
    ("softmax_nll", 32),
    ("sum_sq_partial", 24),
    ("sum_f64", 24),
    ("add_assign", 16),
    ("sgd_step", 16),
    ("clip_scale", 32),
    ("adam_step", 32),
    ("adagrad_step", 24),
    ("table_accumulate", 32),
];

fn nvrtc_or_skip() -> bool {
    if nvrtc::available() {
        return true;
    }
    let required = std::env::var("LIGHTRNN_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "LIGHTRNN_REQUIRE_NVRTC=1 but no libnvrtc on the library path"
    );
    eprintln!(
        "no NVRTC library: skipping (pip install nvidia-cuda-nvrtc==13.0.88, lib dir on LD_LIBRARY_PATH)"
    );
    false
}

#[test]
fn every_kernel_compiles_to_compute_90_ptx() {
    if !nvrtc_or_skip() {
        return;
    }
    for src in SOURCES {
        let ptx =
            nvrtc::compile(src, "compute_90").unwrap_or_else(|e| panic!("{}.cu: {e}", src.name));
        let text = String::from_utf8_lossy(&ptx.image);
        // CUDA 13.0's NVRTC writes PTX ISA 9.0, which the 13.0 driver loads (13.2's 9.2 it
        // would refuse).
        assert!(
            text.contains(".version 9.0"),
            "{}.cu: {}",
            src.name,
            text.lines()
                .find(|l| l.starts_with(".version"))
                .unwrap_or("no .version")
        );
        assert!(text.contains(".target sm_90"), "{}.cu", src.name);
        for k in src.kernels {
            assert!(
                text.contains(&format!(".entry {k}(")),
                "{}.cu: no entry {k}",
                src.name
            );
        }
    }
}

#[test]
fn every_kernel_fits_its_register_budget_with_no_spills() {
    if !nvrtc_or_skip() {
        return;
    }
    let mut seen = Vec::new();
    for src in SOURCES {
        let cubin = nvrtc::compile(src, "sm_90").unwrap_or_else(|e| panic!("{}.cu: {e}", src.name));
        assert!(
            cubin.image.starts_with(b"\x7fELF"),
            "{}.cu: not an ELF CUBIN",
            src.name
        );
        for u in nvrtc::usage(&cubin.log) {
            println!(
                "{:<20} {:>3} registers, {:>5} B shared, {} B stack, spills {}/{}",
                u.kernel, u.registers, u.shared_bytes, u.stack_bytes, u.spill_stores, u.spill_loads
            );
            let budget = BUDGETS
                .iter()
                .find(|(k, _)| *k == u.kernel)
                .map(|b| b.1)
                .unwrap_or_else(|| {
                    panic!(
                        "kernel {} has no register budget in tests/nvrtc.rs",
                        u.kernel
                    )
                });
            assert_eq!(
                (u.spill_stores, u.spill_loads, u.stack_bytes),
                (0, 0, 0),
                "{}: spills or a stack frame",
                u.kernel
            );
            assert!(
                u.registers <= budget,
                "{}: {} registers, budget {budget}",
                u.kernel,
                u.registers
            );
            // The static shared memory a block may have (the emulator refuses more too).
            assert!(
                u.shared_bytes <= 48 * 1024,
                "{}: {} bytes of static shared memory",
                u.kernel,
                u.shared_bytes
            );
            seen.push(u.kernel);
        }
    }
    for (k, _) in BUDGETS {
        assert!(seen.iter().any(|s| s == k), "no ptxas report for {k}");
    }
}

/// Kernels compiled ahead of time (`lightrnn kernels`): one CUBIN per source and a
/// manifest; they are offered to a device of the same architecture under a driver at
/// least as new as the NVRTC that compiled them, and only for the source text they were
/// compiled from.
#[test]
fn kernels_compiled_ahead_load_only_where_they_fit() {
    if !nvrtc_or_skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("lightrnn-ahead-{}", std::process::id()));
    let m = nvrtc::write_ahead(&dir, "sm_90").unwrap();
    assert_eq!(m.arch, "sm_90");
    assert_eq!(m.nvrtc.0, 13, "the CUDA 13 line");
    assert_eq!(m.sources.len(), SOURCES.len());
    let needs = m.nvrtc.0 * 1000 + m.nvrtc.1 * 10;
    let a = nvrtc::ahead_of_time_in(dir.clone(), "sm_90", needs).expect("fits");
    for src in SOURCES {
        let image = a.image(src).expect("compiled");
        assert!(image.starts_with(b"\x7fELF"), "{}: a CUBIN", src.name);
        let changed = lightrnn_kernels::cuda::layer::CudaSource {
            text: "extern \"C\" __global__ void other() {}",
            ..*src
        };
        assert!(a.image(&changed).is_none(), "{}: another text", src.name);
    }
    assert!(nvrtc::ahead_of_time_in(dir.clone(), "sm_100", needs).is_none());
    assert!(nvrtc::ahead_of_time_in(dir.clone(), "sm_90", needs - 10).is_none());
    std::fs::remove_dir_all(&dir).unwrap();
}
