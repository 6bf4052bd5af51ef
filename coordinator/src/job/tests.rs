//! The job's state machine in process, under paused tokio time: heartbeat loss, the end
//! of a generation and the fencing of its workers, the epoch barrier's accounting, a
//! group that does not form, an elastic group that forms below its maximum.

use std::sync::Arc;
use std::time::Duration;

use lightrnn_core::config::TrainConfig;
use lightrnn_core::data::store::Location;
use lightrnn_core::protocol::{EpochDone, Fail, Heartbeat, Join, Lease};

use super::{Job, JobError, JobSpec};

fn spec(world: (usize, usize)) -> JobSpec {
    let cfg = TrainConfig::preset("tiny").unwrap();
    let loc = |s: &str| Location::parse(&format!("memory://job-tests/{s}")).unwrap();
    JobSpec::new(cfg, loc("data"), loc("run"), world, 1000, 100)
}

fn join_req(pid: u32) -> Join {
    Join {
        rank: None,
        collective_addr: format!("127.0.0.1:{}", 1000 + pid),
        host: "test".into(),
        pid,
        version: env!("CARGO_PKG_VERSION").into(),
    }
}

fn heartbeat(generation: u64, rank: u32) -> Heartbeat {
    Heartbeat {
        generation,
        rank,
        ..Default::default()
    }
}

/// `n` workers join; their (rank, pid) in the formed group.
async fn form(job: &Arc<Job>, pids: &[u32]) -> Vec<(usize, u32)> {
    let joins: Vec<_> = pids
        .iter()
        .map(|&pid| {
            let job = job.clone();
            tokio::spawn(async move { (job.join(join_req(pid)).await, pid) })
        })
        .collect();
    let mut out = Vec::new();
    for j in joins {
        let (r, pid) = j.await.unwrap();
        out.push((r.unwrap().rank, pid));
    }
    out
}

#[tokio::test(start_paused = true)]
async fn a_silent_rank_ends_the_generation_and_its_workers_are_fenced() {
    let job = Job::new(spec((2, 2)));
    tokio::spawn(job.clone().monitor());
    let ranks = form(&job, &[11, 12]).await;
    assert_eq!(job.generation(), 1);
    let silent_pid = ranks.iter().find(|(r, _)| *r == 1).unwrap().1;
    // Rank 0 heartbeats every 2 s; rank 1 never does: lost after 5 heartbeats (10 s).
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        job.heartbeat(heartbeat(1, 0)).unwrap();
        assert_eq!(job.generation(), 1, "lost too early");
    }
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let _ = job.heartbeat(heartbeat(job.generation(), 0));
    }
    assert_eq!(job.generation(), 2);
    let stats = job.stats();
    assert_eq!(stats.restarts.get("heartbeat"), Some(&1), "{stats:?}");
    assert_eq!(job.take_stalled(), vec![silent_pid]);
    assert!(!job.failed());
    // Generation 1's workers are fenced from every call, told why it ended.
    let e = job.heartbeat(heartbeat(1, 0)).unwrap_err();
    assert!(matches!(e, JobError::Stale(_)), "{e:?}");
    let why = e.to_string();
    assert!(
        why.contains("generation 1 has ended (the job is at generation 2; the last generation ended because rank 1")
            && why.contains("no heartbeat since its group formed"),
        "{why}"
    );
    // Its failure reports count for nothing (no restart spent on a ghost).
    let ghost = Fail {
        generation: 1,
        rank: 0,
        error: "receiving from rank 1 failed".into(),
        retryable: true,
    };
    assert!(matches!(job.fail(ghost).unwrap_err(), JobError::Stale(_)));
    assert_eq!(job.stats().restarts.values().sum::<u64>(), 1);
    assert_eq!(job.generation(), 2);
    let lease = Lease {
        generation: 1,
        rank: 0,
        epoch: 0,
        streams: 8,
        cursor: 0,
    };
    assert!(matches!(job.lease(lease).unwrap_err(), JobError::Stale(_)));
    // The next generation forms from the survivor and a replacement, and trains.
    let ranks = form(&job, &[11, 13]).await;
    assert_eq!(ranks.len(), 2);
    assert!(job.heartbeat(heartbeat(2, 0)).unwrap().abort.is_none());
}

#[tokio::test(start_paused = true)]
async fn restarts_are_bounded_and_heartbeats_then_say_why() {
    let mut s = spec((1, 1));
    s.max_restarts = 1;
    let job = Job::new(s);
    tokio::spawn(job.clone().monitor());
    for generation in 1..=2 {
        form(&job, &[20 + generation as u32]).await;
        assert_eq!(job.generation(), generation);
        tokio::time::sleep(Duration::from_secs(13)).await;
    }
    assert!(job.failed());
    let why = job.heartbeat(heartbeat(2, 0)).unwrap().abort.unwrap();
    assert!(why.contains("giving up after 1 restarts"), "{why}");
}

#[tokio::test(start_paused = true)]
async fn the_epoch_barrier_counts_every_token_once() {
    let job = Job::new(spec((2, 2)));
    tokio::spawn(job.clone().monitor());
    form(&job, &[31, 32]).await;
    // 1000 tokens in 4 streams: 250 per stream, 249 positions of targets each.
    let lease = |rank: u32, epoch: u64| Lease {
        generation: 1,
        rank,
        epoch,
        streams: 4,
        cursor: 0,
    };
    let done = |rank: u32, epoch: u64, tokens: u64| EpochDone {
        generation: 1,
        rank,
        epoch,
        tokens,
    };
    for rank in 0..2 {
        let r = job.lease(lease(rank, 0)).unwrap();
        assert_eq!(r.streams, 2 * rank as usize..2 * rank as usize + 2);
    }
    let first = {
        let job = job.clone();
        tokio::spawn(async move { job.epoch_done(done(0, 0, 498)).await })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(!first.is_finished(), "the barrier waits for every rank");
    assert_eq!(job.epoch_done(done(1, 0, 498)).await.unwrap(), 996);
    assert_eq!(first.await.unwrap().unwrap(), 996);
    assert_eq!(job.stats().tokens_accounted, 996);
    // Another epoch that misses a token ends the job, for every rank.
    for rank in 0..2 {
        job.lease(lease(rank, 1)).unwrap();
    }
    let first = {
        let job = job.clone();
        tokio::spawn(async move { job.epoch_done(done(0, 1, 498)).await })
    };
    let e = job.epoch_done(done(1, 1, 497)).await.unwrap_err();
    assert!(matches!(e, JobError::Ended(_)), "{e:?}");
    assert!(
        e.to_string()
            .contains("consumed 995 tokens, the epoch's leases hold 996"),
        "{e:?}"
    );
    assert!(matches!(
        first.await.unwrap().unwrap_err(),
        JobError::Ended(_)
    ));
    assert!(job.failed());
    // A second report of the same epoch is refused, not counted.
    let job = Job::new(spec((1, 1)));
    form(&job, &[41]).await;
    job.lease(Lease {
        rank: 0,
        ..lease(0, 0)
    })
    .unwrap();
    assert_eq!(job.epoch_done(done(0, 0, 996)).await.unwrap(), 996);
    let e = job.epoch_done(done(0, 0, 996)).await.unwrap_err();
    assert!(matches!(e, JobError::OutOfTurn(_)), "{e:?}");
    assert_eq!(job.stats().tokens_accounted, 996);
}

#[tokio::test(start_paused = true)]
async fn groups_that_do_not_form_end_the_job_and_elastic_ones_form_below_their_maximum() {
    let mut s = spec((2, 2));
    s.join_timeout = Duration::from_secs(30);
    let job = Job::new(s);
    tokio::spawn(job.clone().monitor());
    let waiting = {
        let job = job.clone();
        tokio::spawn(async move { job.join(join_req(51)).await })
    };
    tokio::time::sleep(Duration::from_secs(40)).await;
    let e = waiting.await.unwrap().unwrap_err();
    assert!(matches!(e, JobError::Ended(_)), "{e:?}");
    assert!(
        e.to_string().contains("only 1 of 2 workers joined"),
        "{e:?}"
    );
    // Elastic 1..3: one worker, and no other for form_wait (10 s): a group of one.
    let job = Job::new(spec((1, 3)));
    tokio::spawn(job.clone().monitor());
    let r = job.join(join_req(61)).await.unwrap();
    assert_eq!((r.rank, r.world_size), (0, 1));
    // The formed group below its maximum takes newcomers at its next checkpoint only.
    let e = job.join(join_req(62)).await.unwrap_err();
    assert!(matches!(e, JobError::NoRoom(_)), "{e:?}");
    assert!(e.to_string().contains("next checkpoint"), "{e:?}");
}

/// Every member of a generation gets that generation's NCCL id and ring key, the next
/// generation new ones, and a CPU job no NCCL id: a communicator or ring of an ended
/// generation cannot be re-joined.
#[tokio::test(start_paused = true)]
async fn each_generation_hands_its_members_a_new_nccl_id_and_ring_key() {
    use std::sync::atomic::{AtomicU8, Ordering};
    let made = Arc::new(AtomicU8::new(0));
    let mut s = spec((2, 2));
    let m = made.clone();
    s.nccl_ids = Some(Arc::new(move || {
        Ok(vec![m.fetch_add(1, Ordering::SeqCst) + 1; 128])
    }));
    let job = Job::new(s);
    tokio::spawn(job.clone().monitor());
    let ids = |job: &Arc<Job>, pids: [u32; 2]| {
        let job = job.clone();
        async move {
            let joins: Vec<_> = pids
                .iter()
                .map(|&pid| {
                    let job = job.clone();
                    tokio::spawn(async move { job.join(join_req(pid)).await.unwrap() })
                })
                .collect();
            let mut out = Vec::new();
            for j in joins {
                let r = j.await.unwrap();
                assert_eq!(r.ring_key.len(), 32, "a 32-byte ring key");
                out.push((r.generation, r.nccl_id, r.ring_key));
            }
            out
        }
    };
    let g1 = ids(&job, [41, 42]).await;
    assert_eq!((g1[0].0, &g1[0].1), (1, &vec![1u8; 128]));
    assert_eq!(g1[0], g1[1], "both ranks of generation 1 share its ids");
    job.lose_worker(
        1,
        "worker_failed",
        "rank 1: NCCL all-to-all timed out".into(),
    );
    assert_eq!(job.generation(), 2);
    // A worker of generation 1 is fenced; generation 2 forms with a fresh id.
    let e = job.heartbeat(heartbeat(1, 0)).unwrap_err();
    assert!(matches!(e, JobError::Stale(_)), "{e:?}");
    let g2 = ids(&job, [41, 43]).await;
    assert_eq!((g2[0].0, &g2[0].1), (2, &vec![2u8; 128]));
    assert_eq!(g2[0], g2[1]);
    assert_eq!(made.load(Ordering::SeqCst), 2, "one id per generation");
    assert_ne!(g1[0].2, g2[0].2, "a new ring key per generation");

    let cpu = Job::new(spec((1, 1)));
    tokio::spawn(cpu.clone().monitor());
    let r = cpu.join(join_req(50)).await.unwrap();
    assert!(
        r.nccl_id.is_empty(),
        "a job without NCCL ids hands out none"
    );
    assert_eq!(r.ring_key.len(), 32, "every job's ring has a key");
    assert!(!format!("{r:?}").contains(&format!("{:?}", r.ring_key)));
}

/// A job whose NCCL id cannot be created fails with the reason instead of forming a group
/// its GPU workers cannot use.
#[tokio::test(start_paused = true)]
async fn a_failed_nccl_id_fails_the_job_with_the_reason() {
    let mut s = spec((1, 1));
    s.nccl_ids = Some(Arc::new(|| Err("no libnccl.so".into())));
    let job = Job::new(s);
    tokio::spawn(job.clone().monitor());
    let e = job.join(join_req(60)).await.unwrap_err();
    assert!(matches!(e, JobError::Ended(_)), "{e:?}");
    assert!(
        e.to_string()
            .contains("NCCL id of generation 1: no libnccl.so"),
        "{e:?}"
    );
    assert!(job.failed());
}
