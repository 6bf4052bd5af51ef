//! The kernels of an LSTM layer against their CPU twins: dropout masks (`dropout.cu`),
//! the input tables' gather and per-row gradient sum (`embed.cu`), the fused cell forward
//! and backward (`lstm.cu`).

use crate::common::{Dev, kinds, rand, rand_ids, rel};
use lightrnn_kernels::cpu::simd;
use lightrnn_kernels::cuda::layer::Arg;
use lightrnn_kernels::rng::{Philox, Purpose};

#[test]
fn dropout_masks_are_the_cpu_masks_bit_for_bit() {
    for kind in kinds() {
        let mut d = Dev::on(kind);
        let (rows, width, batch, offset, global, site, p) =
            (7usize, 13usize, 3usize, 2usize, 8usize, 77u64, 0.3);
        let x = rand(1, rows * width, 2.0);
        let rng = Philox::new(42, Purpose::Dropout);
        let [k0, k1] = rng.key();
        let (xa, out) = (d.put(&x), d.put(&vec![0f32; rows * width]));
        // The site's step part is read from device memory (site = *base + offset).
        let base = d.put(&[70u64]);
        let threshold = (p * 4_294_967_296.0) as u32;
        let keep = (1.0 / (1.0 - p)) as f32;
        let args = [
            out,
            xa,
            Arg::U32(rows as u32),
            Arg::U32(width as u32),
            Arg::U32(k0),
            Arg::U32(k1),
            base,
            Arg::U64(site - 70),
            Arg::U32(batch as u32),
            Arg::U32(offset as u32),
            Arg::U32(global as u32),
            Arg::U32(threshold),
            Arg::F32(keep),
        ];
        d.run("dropout_apply", [2, 1, 1], 32, &args).unwrap();
        let got: Vec<f32> = d.get(out, rows * width);
        for r in 0..rows {
            let g = (r / batch) * global + offset + r % batch;
            let mut mask = vec![0f32; width];
            simd::dropout_mask(&rng, site, (g * width) as u64, p, &mut mask);
            for j in 0..width {
                assert_eq!(
                    got[r * width + j],
                    x[r * width + j] * mask[j],
                    "row {r} col {j}"
                );
            }
        }
    }
}

#[test]
fn gather_and_scatter_rows_match_host_loops() {
    for kind in kinds() {
        let mut d = Dev::on(kind);
        let (table_rows, width, rows) = (11usize, 9usize, 30usize);
        let table = rand(2, table_rows * width, 1.0);
        let ids = rand_ids(3, rows, table_rows as u32);
        let (ta, ia, out) = (d.put(&table), d.put(&ids), d.put(&vec![0f32; rows * width]));
        d.run(
            "gather_rows",
            [3, 1, 1],
            64,
            &[out, ta, ia, Arg::U32(rows as u32), Arg::U32(width as u32)],
        )
        .unwrap();
        let got: Vec<f32> = d.get(out, rows * width);
        for r in 0..rows {
            assert_eq!(
                &got[r * width..(r + 1) * width],
                &table[ids[r] as usize * width..][..width]
            );
        }
        // Scatter: rows grouped by id, ascending.
        let grad = rand(4, rows * width, 1.0);
        let mut uniq: Vec<u32> = ids.clone();
        uniq.sort();
        uniq.dedup();
        let (mut starts, mut members) = (vec![], vec![]);
        for &u in &uniq {
            starts.push(members.len() as u32);
            members.extend((0..rows as u32).filter(|&r| ids[r as usize] == u));
        }
        starts.push(members.len() as u32);
        let tg = d.put(&vec![0f32; table_rows * width]);
        // The count of distinct ids comes from device memory; fewer blocks than ids
        // (grid-strided) and more give the same sums.
        let args = [
            tg,
            d.put(&grad),
            d.put(&uniq),
            d.put(&starts),
            d.put(&members),
            d.put(&[uniq.len() as u32]),
            Arg::U32(width as u32),
        ];
        d.run("scatter_rows", [3, 1, 1], 32, &args).unwrap();
        let strided: Vec<f32> = d.get(tg, table_rows * width);
        d.run("scatter_rows", [uniq.len() as u32 + 2, 1, 1], 32, &args)
            .unwrap();
        assert_eq!(d.get::<f32>(tg, table_rows * width), strided);
        let got: Vec<f32> = d.get(tg, table_rows * width);
        let mut want = vec![0f32; table_rows * width];
        for r in 0..rows {
            for j in 0..width {
                want[ids[r] as usize * width + j] += grad[r * width + j];
            }
        }
        assert!(rel(&got, &want) < 1e-6);
    }
}

#[test]
fn lstm_cell_kernels_match_the_cpu_cell() {
    for kind in kinds() {
        for hidden in [5usize, 8] {
            // hidden <= one CPU gate block: the CPU's internal gate order is PyTorch's.
            let mut d = Dev::on(kind);
            let batch = 6;
            let g0 = rand(5, batch * 4 * hidden, 2.0);
            let (bih, bhh) = (rand(6, 4 * hidden, 0.5), rand(7, 4 * hidden, 0.5));
            let cprev = rand(8, batch * hidden, 1.0);
            let n = batch * hidden;
            let (ga, ca, tca, ha) = (
                d.put(&g0),
                d.put(&vec![0f32; n]),
                d.put(&vec![0f32; n]),
                d.put(&vec![0f32; n]),
            );
            let cpa = d.put(&cprev);
            let args = [
                ga,
                d.put(&bih),
                d.put(&bhh),
                cpa,
                ca,
                tca,
                ha,
                Arg::U32(batch as u32),
                Arg::U32(hidden as u32),
            ];
            d.run("lstm_cell_forward", [1, 1, 1], 16, &args).unwrap();
            let bsum: Vec<f32> = bih.iter().zip(&bhh).map(|(a, b)| a + b).collect();
            let (mut g, mut c, mut tc, mut h) =
                (g0.clone(), vec![0f32; n], vec![0f32; n], vec![0f32; n]);
            for b in 0..batch {
                let r = b * hidden..(b + 1) * hidden;
                simd::cell_forward(
                    simd::Units {
                        hidden,
                        range: 0..hidden,
                    },
                    &mut g[b * 4 * hidden..(b + 1) * 4 * hidden],
                    &bsum,
                    &cprev[r.clone()],
                    &mut c[r.clone()],
                    &mut tc[r.clone()],
                    &mut h[r],
                );
            }
            let got_g: Vec<f32> = d.get(ga, g.len());
            for (name, a, want) in [
                ("g", got_g, &g),
                ("c", d.get(ca, n), &c),
                ("tc", d.get(tca, n), &tc),
                ("h", d.get(ha, n), &h),
            ] {
                assert!(
                    rel(&a, want) < 1e-5,
                    "hidden {hidden}: forward {name} {}",
                    rel(&a, want)
                );
            }
            // Backward from those activations.
            let (dh, rec, dc0) = (rand(9, n, 1.0), rand(10, n, 1.0), rand(11, n, 1.0));
            for has_rec in [0u32, 1] {
                let (ga2, dca) = (d.put(&g), d.put(&dc0));
                let args = [
                    ga2,
                    d.put(&dh),
                    d.put(&rec),
                    Arg::U32(has_rec),
                    cpa,
                    d.put(&tc),
                    dca,
                    Arg::U32(batch as u32),
                    Arg::U32(hidden as u32),
                ];
                d.run("lstm_cell_backward", [1, 1, 1], 32, &args).unwrap();
                let (mut a, mut dc) = (g.clone(), dc0.clone());
                for b in 0..batch {
                    let r = b * hidden..(b + 1) * hidden;
                    let rec_row: &[f32] = if has_rec == 1 { &rec[r.clone()] } else { &[] };
                    simd::cell_backward(
                        simd::Units {
                            hidden,
                            range: 0..hidden,
                        },
                        &mut a[b * 4 * hidden..(b + 1) * 4 * hidden],
                        &dh[r.clone()],
                        rec_row,
                        &cprev[r.clone()],
                        &tc[r.clone()],
                        &mut dc[r],
                    );
                }
                assert!(rel(&d.get(ga2, a.len()), &a) < 1e-5, "hidden {hidden}: dG");
                assert!(rel(&d.get(dca, n), &dc) < 1e-5, "hidden {hidden}: dc");
            }
        }
    }
}
