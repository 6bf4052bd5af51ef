//! The heads' fused log-softmax + NLL (`softmax.cu`) against the CPU's, in every mode.

use crate::common::{Dev, kinds, rand, rand_ids, rel};
use lightrnn_kernels::cpu::simd;
use lightrnn_kernels::cuda::layer::Arg;

#[test]
fn fused_softmax_matches_the_cpu_in_every_mode() {
    for kind in kinds() {
        for width in [45usize, 300, 1000] {
            let mut d = Dev::on(kind);
            let rows = 7;
            // Rows padded to a multiple of 4 as the backend lays them out: the padding
            // columns are neither read nor written.
            let ld = width.div_ceil(4) * 4 + 4;
            let z0 = rand(12, rows * width, 4.0);
            let pad = |z: &[f32]| -> Vec<f32> {
                let mut out = vec![f32::NAN; rows * ld];
                for r in 0..rows {
                    out[r * ld..r * ld + width].copy_from_slice(&z[r * width..(r + 1) * width]);
                }
                out
            };
            let bias = rand(13, width, 1.0);
            let tgt = rand_ids(14, rows, width as u32);
            for mode in 0..3u32 {
                let (za, la) = (d.put(&pad(&z0)), d.put(&vec![0f64; rows]));
                let args = [
                    za,
                    d.put(&bias),
                    d.put(&tgt),
                    la,
                    Arg::U32(width as u32),
                    Arg::U32(ld as u32),
                    d.put(&[0.25f32]),
                    Arg::U32(mode),
                ];
                d.run("softmax_nll", [rows as u32, 1, 1], 256, &args)
                    .unwrap();
                let mut z = z0.clone();
                let mut nll = vec![0f64; rows];
                match mode {
                    0 => {
                        simd::softmax_nll(&mut z, width, &bias, &tgt, None, &mut nll);
                    }
                    1 => {
                        simd::softmax_nll(&mut z, width, &bias, &tgt, Some(0.25), &mut nll);
                    }
                    _ => {
                        simd::neg_log_softmax(&mut z, width, &bias, &tgt);
                        for r in 0..rows {
                            nll[r] = z[r * width + tgt[r] as usize] as f64;
                        }
                    }
                }
                let got_z: Vec<f32> = d.get(za, rows * ld);
                let (mut cols, mut padding) = (Vec::new(), Vec::new());
                for r in 0..rows {
                    cols.extend_from_slice(&got_z[r * ld..r * ld + width]);
                    padding.extend_from_slice(&got_z[r * ld + width..(r + 1) * ld]);
                }
                assert!(rel(&cols, &z) < 1e-5, "width {width} mode {mode}: z");
                assert!(
                    padding.iter().all(|x| x.is_nan()),
                    "the padding is untouched"
                );
                let got: Vec<f64> = d.get(la, rows);
                for r in 0..rows {
                    assert!(
                        (got[r] - nll[r]).abs() <= 1e-5 * nll[r].abs().max(1.0),
                        "width {width} mode {mode} row {r}: {} vs {}",
                        got[r],
                        nll[r]
                    );
                }
            }
        }
    }
}
