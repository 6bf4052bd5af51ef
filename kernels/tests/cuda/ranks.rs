//! Ranks on the device: the fixed-order all-reduce and the loss tables' reduce-scatter
//! over [`ThreadPeers`] on the emulated device, ranks that train as one rank with all the
//! groups, NCCL ids, and NCCL at world size 1 on a GPU.
//!
//! [`ThreadPeers`]: lightrnn_kernels::cuda::comm::allreduce::ThreadPeers

use crate::common::{GIB, batch_of, kinds, tokens};
use lightrnn_kernels::cuda::{CudaBackend, Precision};
use lightrnn_kernels::optim::Optimizer;
use lightrnn_kernels::{
    Backend, Batch, CpuBackend, Error, LossTables, ModelConfig, ModelDims, Shard, Stream,
};

/// The pairwise sum of `pieces` on the host, through the gradient groups' own tree.
fn pairwise(pieces: &[Vec<f32>]) -> Vec<f32> {
    let mut sum = lightrnn_kernels::groups::PairwiseSum::default();
    let add = |a: &mut Vec<f32>, b: &Vec<f32>| {
        a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        Ok(())
    };
    for p in pieces {
        sum.push(p.clone(), add).unwrap();
    }
    sum.finish(add).unwrap()
}

/// A rank's collective on [`ThreadPeers`]: the fixed-order device all-reduce.
struct OnPeers(lightrnn_kernels::cuda::comm::allreduce::ThreadPeers);

impl lightrnn_kernels::GradReduce for OnPeers {
    fn all_reduce_grads(&mut self, grads: lightrnn_kernels::GradsMut<'_>) -> Result<(), Error> {
        match grads {
            lightrnn_kernels::GradsMut::Device(d) => d.all_reduce(&mut self.0),
            lightrnn_kernels::GradsMut::Host(_) => panic!("a CUDA backend lent host memory"),
        }
    }
}

/// The fixed-order all-reduce gives every rank the pairwise sum of the ranks' buffers, bit
/// for bit, at sizes that do and do not divide by the world.
#[test]
fn emulator_ranks_device_all_reduce_is_the_pairwise_sum_on_every_rank() {
    use lightrnn_kernels::cuda::comm::allreduce::ThreadPeers;
    let dims = ModelDims::square(60, 4, 6, 1).unwrap();
    let cfg = ModelConfig {
        dims,
        dropout: 0.0,
        seed: 3,
    };
    for world in [1usize, 2, 3, 5] {
        let peers = ThreadPeers::group(world, std::time::Duration::from_secs(30));
        let results: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
            let handles: Vec<_> = peers
                .into_iter()
                .enumerate()
                .map(|(r, p)| {
                    s.spawn(move || {
                        let mut be = CudaBackend::emulated(&cfg, GIB).unwrap();
                        // A different gradient on every rank.
                        let toks = tokens(r as u64, 3, 2, 60);
                        let batch = Batch {
                            inputs: &toks[..6],
                            targets: &toks[2..],
                            steps: 3,
                            batch: 2,
                            stream: Stream::Train(0),
                        };
                        be.train_step(&batch, 0, 1.0).unwrap();
                        let mine = be.grads().unwrap();
                        be.all_reduce_grads(&mut OnPeers(p)).unwrap();
                        (mine, be.grads().unwrap())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mine: Vec<Vec<f32>> = results.iter().map(|r| r.0.clone()).collect();
        let want = pairwise(&mine);
        for (r, (_, got)) in results.iter().enumerate() {
            assert_eq!(got, &want, "world {world}, rank {r}");
        }
    }
}

/// A loss-table pass ended on the device with a reduce-scatter gives each rank its run
/// of whole words of the ranks' pairwise-summed tables, bit for bit, the runs covering
/// the pass's words once; every rank keeps its own counts of all of them. Word counts
/// that do and do not divide by the world, and a world with more ranks than words.
#[test]
fn emulator_ranks_scattered_loss_table_pass_gives_each_rank_its_words_of_the_summed_tables() {
    use lightrnn_kernels::cuda::comm::allreduce::ThreadPeers;
    let dims = ModelDims::square(150, 6, 8, 1).unwrap();
    let cfg = ModelConfig {
        dims,
        dropout: 0.0,
        seed: 11,
    };
    let (rr, cc) = (dims.rows, dims.cols);
    let (t, b) = (4usize, 3usize);
    for (world, words) in [(1usize, 0..150), (2, 20..120), (3, 20..120), (4, 0..3)] {
        let peers = ThreadPeers::group(world, std::time::Duration::from_secs(30));
        let got: Vec<(LossTables, lightrnn_kernels::ScatteredTables)> = std::thread::scope(|s| {
            let hs: Vec<_> = peers
                .into_iter()
                .enumerate()
                .map(|(r, mut p)| {
                    let words = words.clone();
                    s.spawn(move || {
                        let mut be = CudaBackend::emulated(&cfg, GIB).unwrap();
                        let toks = tokens(300 + r as u64, t, b, 150);
                        let pass = |be: &mut CudaBackend| {
                            be.begin_loss_tables(words.clone(), 1 << 30).unwrap();
                            be.reset_state(Stream::Tables);
                            be.accumulate_loss_tables(&Batch {
                                inputs: &toks[..t * b],
                                targets: &toks[b..],
                                steps: t,
                                batch: b,
                                stream: Stream::Tables,
                            })
                            .unwrap();
                        };
                        pass(&mut be);
                        let whole = be.take_loss_tables().unwrap();
                        pass(&mut be);
                        let scattered = be.take_loss_tables_scattered(&mut p).unwrap().unwrap();
                        assert!(be.take_loss_tables().is_err(), "the pass is ended");
                        (whole, scattered)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let n = words.len();
        let sum_r = pairwise(&got.iter().map(|g| g.0.lr.clone()).collect::<Vec<_>>());
        let sum_c = pairwise(&got.iter().map(|g| g.0.lc.clone()).collect::<Vec<_>>());
        let mut next = words.start;
        for (r, (whole, s)) in got.iter().enumerate() {
            let own = &s.own;
            let per = n.div_ceil(world);
            let start = (words.start + r * per).min(words.end);
            assert_eq!(own.words, start..(start + per).min(words.end), "rank {r}");
            assert_eq!(own.words.start, next, "rank {r}: the runs are consecutive");
            next = own.words.end;
            let (i, j) = (own.words.start - words.start, own.words.end - words.start);
            assert_eq!(
                own.lr,
                sum_r[i * rr..j * rr],
                "world {world}, rank {r}: rows"
            );
            assert_eq!(
                own.lc,
                sum_c[i * cc..j * cc],
                "world {world}, rank {r}: columns"
            );
            assert_eq!((own.vocab, own.rows, own.cols), (150, rr, cc));
            assert_eq!(s.counts, whole.counts);
            assert_eq!(own.counts, whole.counts[i..j]);
        }
        assert_eq!(next, words.end, "world {world}: the runs cover the pass");
        assert!(
            got.iter().any(|g| g.1.counts.iter().any(|&c| c > 0)),
            "the pass saw words"
        );
    }
    // The CPU backend's tables are in host memory: it declines and keeps the pass.
    let mut cpu = CpuBackend::new(&cfg, 1).unwrap();
    cpu.begin_loss_tables(0..150, 1 << 30).unwrap();
    let mut p = ThreadPeers::group(1, std::time::Duration::from_secs(5)).remove(0);
    assert!(cpu.take_loss_tables_scattered(&mut p).unwrap().is_none());
    assert_eq!(cpu.take_loss_tables().unwrap().words, 0..150);
}

/// With `grad_groups` fixed, W ranks holding G / W groups each end every step with the
/// parameters one rank holding all G groups computes, bit for bit (dropout keyed by
/// global stream, the groups' tree continued across the ranks by the fixed-order
/// all-reduce): the run does not depend on the GPU count.
#[test]
fn emulator_ranks_on_the_device_all_reduce_train_as_one_rank_with_all_the_groups() {
    use lightrnn_kernels::cuda::comm::allreduce::ThreadPeers;
    let dims = ModelDims::square(120, 8, 10, 2).unwrap();
    let cfg = ModelConfig {
        dims,
        dropout: 0.2,
        seed: 5,
    };
    let (t, b, steps) = (4usize, 12usize, 3u64);
    let run = |world: usize, groups: usize| -> Vec<Vec<f32>> {
        let peers = ThreadPeers::group(world, std::time::Duration::from_secs(60));
        std::thread::scope(|s| {
            let handles: Vec<_> = peers
                .into_iter()
                .enumerate()
                .map(|(r, p)| {
                    s.spawn(move || {
                        let mut coll = OnPeers(p);
                        let mut be = CudaBackend::emulated(&cfg, GIB).unwrap();
                        let bl = b / world;
                        be.set_shard(Shard {
                            offset: r * bl,
                            global: b,
                            groups: groups / world,
                        })
                        .unwrap();
                        for step in 0..steps {
                            let all = tokens(200 + step, t, b, 120);
                            // This rank's streams: columns r * bl .. (r + 1) * bl.
                            let toks: Vec<u32> = all
                                .chunks(b)
                                .flat_map(|row| row[r * bl..(r + 1) * bl].iter().copied())
                                .collect();
                            let batch = Batch {
                                inputs: &toks[..t * bl],
                                targets: &toks[bl..],
                                steps: t,
                                batch: bl,
                                stream: Stream::Train(0),
                            };
                            be.train_step(&batch, step, 1.0 / (t * b) as f32).unwrap();
                            be.all_reduce_grads(&mut coll).unwrap();
                            be.clip_and_step(&Optimizer::Sgd, 1.0, 0.25).unwrap();
                        }
                        be.params().unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    };
    for (groups, worlds) in [(4usize, &[2usize, 4][..]), (6, &[3][..])] {
        let one = run(1, groups).remove(0);
        for &world in worlds {
            for (r, p) in run(world, groups).iter().enumerate() {
                assert!(
                    p == &one,
                    "{groups} groups on {world} ranks, rank {r}: parameters differ from one rank's"
                );
            }
        }
    }
}

/// Where `libnccl.so` loads (the GPU machines; `scripts/gpu-check.sh`), ids are created
/// without a GPU, each new; where it does not, the reason names the library.
#[test]
fn emulator_nccl_ids_are_created_without_a_gpu_or_the_library_is_named() {
    use lightrnn_kernels::cuda::comm::nccl;
    use lightrnn_kernels::cuda::{nccl_available, nccl_unique_id};
    if !nccl_available() {
        let e = nccl_unique_id().unwrap_err().to_string();
        assert!(e.contains("libnccl.so"), "{e}");
        println!("no libnccl.so here: {e}");
        return;
    }
    let (major, minor, patch) = nccl::version().unwrap();
    println!("NCCL {major}.{minor}.{patch}");
    assert!(major >= 2);
    let (a, b) = (nccl_unique_id().unwrap(), nccl_unique_id().unwrap());
    assert_eq!(a.len(), nccl::ID_BYTES);
    assert_ne!(a, b, "every id names a new group");
}

/// NCCL at world size 1 on GPU 0, in this process: a unique id, a communicator, the
/// fixed-order all-reduce of a training step's gradient (one rank's sum is its own
/// gradient, through the all-to-all, the pairwise adds and the all-gather on the device)
/// and the reduce-scatter of a loss-table pass, against the host's values. Needs a GPU and
/// `libnccl.so` (scripts/gpu-check.sh, tier 1); elsewhere it says why and passes, unless
/// `LIGHTRNN_REQUIRE_GPU=1`.
#[test]
fn nccl_at_world_size_one_sums_on_the_gpu() {
    use lightrnn_kernels::cuda::comm::nccl::{self, Nccl};
    use lightrnn_kernels::cuda::{gpu_present, nccl_available, nccl_unique_id};
    if !kinds().contains(&"gpu") || !nccl_available() {
        let require = std::env::var("LIGHTRNN_REQUIRE_GPU").is_ok_and(|v| v == "1");
        assert!(
            !require || nccl_available(),
            "LIGHTRNN_REQUIRE_GPU=1 but no libnccl.so on the library path"
        );
        println!(
            "NCCL at world size 1: skipped (GPU {}, libnccl.so {})",
            gpu_present(),
            nccl_available()
        );
        return;
    }
    let (major, minor, patch) = nccl::version().unwrap();
    let t0 = std::time::Instant::now();
    let id = nccl_unique_id().unwrap();
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let comm = Nccl::join(&id, 0, 1, 0, std::time::Duration::from_secs(60), cancel).unwrap();
    println!(
        "NCCL {major}.{minor}.{patch}: communicator of 1 formed in {:?}",
        t0.elapsed()
    );
    struct Ring(Nccl);
    impl lightrnn_kernels::GradReduce for Ring {
        fn all_reduce_grads(&mut self, g: lightrnn_kernels::GradsMut<'_>) -> Result<(), Error> {
            match g {
                lightrnn_kernels::GradsMut::Device(d) => d.all_reduce(&mut self.0),
                lightrnn_kernels::GradsMut::Host(_) => panic!("host memory"),
            }
        }
    }
    let mut ring = Ring(comm);
    let dims = ModelDims::square(300, 12, 12, 2).unwrap();
    let cfg = ModelConfig {
        dims,
        dropout: 0.1,
        seed: 4,
    };
    let mut be = CudaBackend::with_precision(&cfg, 0, Precision::Fp32).unwrap();
    let t = tokens(5, 5, 4, 300);
    be.train_step(&batch_of(&t, 5, 4), 0, 0.05).unwrap();
    let mine = be.grads().unwrap();
    assert!(mine.iter().any(|&g| g != 0.0));
    be.all_reduce_grads(&mut ring).unwrap();
    assert_eq!(
        be.grads().unwrap(),
        mine,
        "a world of one sums to its own gradient"
    );
    let f = be.clip_and_step(&Optimizer::Sgd, 1.0, 0.25).unwrap();
    assert!(f.norm.is_finite());
    let pass = |be: &mut CudaBackend| {
        be.begin_loss_tables(0..300, 1 << 30).unwrap();
        be.reset_state(Stream::Tables);
        let b = Batch {
            stream: Stream::Tables,
            ..batch_of(&t, 5, 4)
        };
        be.accumulate_loss_tables(&b).unwrap();
    };
    pass(&mut be);
    let whole = be.take_loss_tables().unwrap();
    pass(&mut be);
    let s = be.take_loss_tables_scattered(&mut ring.0).unwrap().unwrap();
    assert_eq!(s.own.words, 0..300);
    assert_eq!(
        (s.own.lr, s.own.lc),
        (whole.lr, whole.lc),
        "the reduce-scatter of one rank"
    );
    println!(
        "NCCL at world size 1: all-reduce and reduce-scatter checked ({:?})",
        t0.elapsed()
    );
}
