use super::*;
use crate::dist::watch::logs::logged;
use lightrnn_core::report::WAIT_BUCKETS;

#[test]
fn all_reduce_and_broadcast_agree_bit_for_bit() {
    // 600,001 values: more than two of the ring's pieces per chunk.
    for (world, n) in [
        (2usize, 10usize),
        (3, 1),
        (3, 100_003),
        (4, 7),
        (2, 600_001),
    ] {
        let handles = rings(world, Duration::from_secs(20));
        let rings: Vec<TcpRing> = handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect();
        let data = |r: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 7 + r * 13) % 17) as f32 * 0.37 - r as f32)
                .collect()
        };
        let results: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
            let hs: Vec<_> = rings
                .into_iter()
                .enumerate()
                .map(|(r, mut ring)| {
                    s.spawn(move || {
                        let mut buf = data(r);
                        ring.all_reduce_sum(&mut buf).unwrap();
                        let mut b = if r == world - 1 {
                            data(99)
                        } else {
                            vec![0.0; n]
                        };
                        ring.broadcast(&mut b, world - 1).unwrap();
                        ring.barrier().unwrap();
                        // f64 sums are exact for these values and identical everywhere.
                        let mut f = [r as f64 + 0.25, 1e300, -(r as f64)];
                        ring.all_reduce_sum_f64(&mut f).unwrap();
                        let w = world as f64;
                        assert_eq!(
                            f,
                            [
                                w * (w - 1.0) / 2.0 + 0.25 * w,
                                1e300 * w,
                                -w * (w - 1.0) / 2.0
                            ]
                        );
                        (buf, b)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let inputs: Vec<Vec<f32>> = (0..world).map(data).collect();
        for i in 0..n {
            let exact: f64 = inputs.iter().map(|d| d[i] as f64).sum();
            assert!((results[0].0[i] as f64 - exact).abs() <= 1e-5 * (1.0 + exact.abs()));
        }
        for (sum, b) in &results {
            assert_eq!(
                sum.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                results[0].0.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "world {world}: ranks differ"
            );
            assert_eq!(b, &data(99));
        }
    }
}

#[test]
fn a_reduce_scatter_gives_each_rank_whole_units_of_the_all_reduce() {
    for (world, units, unit) in [
        (2usize, 9usize, 5usize),
        (3, 2, 4),
        (3, 1000, 3),
        (4, 7, 1),
        (2, 200_001, 3),
    ] {
        let n = units * unit;
        let data = |r: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 5 + r * 11) % 13) as f32 * 0.29 - r as f32)
                .collect()
        };
        let rings: Vec<TcpRing> = rings(world, Duration::from_secs(20))
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect();
        let got: Vec<(Vec<f32>, Vec<f32>, std::ops::Range<usize>)> = std::thread::scope(|s| {
            let hs: Vec<_> = rings
                .into_iter()
                .enumerate()
                .map(|(r, mut ring)| {
                    s.spawn(move || {
                        let mut all = data(r);
                        ring.all_reduce_sum(&mut all).unwrap();
                        let mut part = data(r);
                        if unit > 1 {
                            // Not whole units: refused on every rank, before any exchange.
                            assert!(ring.reduce_scatter_sum(&mut part[1..], unit).is_err());
                        }
                        let own = ring.reduce_scatter_sum(&mut part, unit).unwrap();
                        (all, part, own)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // The owned ranges cover every unit once.
        let mut owned: Vec<_> = got.iter().map(|g| g.2.clone()).collect();
        owned.sort_by_key(|r| r.start);
        assert_eq!(owned.first().unwrap().start, 0);
        assert_eq!(owned.last().unwrap().end, units);
        assert!(
            owned.windows(2).all(|w| w[0].end == w[1].start),
            "{owned:?}"
        );
        // In them, the sum over the ranks (in the ring's order, as the all-reduce's).
        let inputs: Vec<Vec<f32>> = (0..world).map(data).collect();
        for (all, part, own) in &got {
            for i in own.start * unit..own.end * unit {
                let exact: f64 = inputs.iter().map(|d| d[i] as f64).sum();
                assert!(
                    (part[i] as f64 - exact).abs() <= 1e-5 * (1.0 + exact.abs()),
                    "world {world}, element {i}: {} vs {exact}",
                    part[i]
                );
                assert!((all[i] as f64 - exact).abs() <= 1e-5 * (1.0 + exact.abs()));
            }
        }
    }
}

#[test]
fn a_neighbour_stalled_for_seconds_is_warned_about_once_counted_and_the_sum_is_exact() {
    let mut rings = rings(2, Duration::from_secs(20))
        .into_iter()
        .map(|h| h.join().unwrap().unwrap());
    let (mut r0, mut r1) = (rings.next().unwrap(), rings.next().unwrap());
    let stall = Duration::from_millis(2600);
    let late = std::thread::spawn(move || {
        for _ in 0..3 {
            r1.all_reduce_sum(&mut [2.0; 5]).unwrap();
        }
        std::thread::sleep(stall);
        let mut b = [0.5, -1.0, 3.0];
        r1.all_reduce_sum(&mut b).unwrap();
        (b, r1.waits())
    });
    let ((b, waits), log) = logged(|| {
        for _ in 0..3 {
            let mut b = [1.0; 5];
            r0.all_reduce_sum(&mut b).unwrap();
            assert_eq!(b, [3.0; 5]);
        }
        let mut b = [0.25, 1.0, -2.0];
        let t = std::time::Instant::now();
        r0.all_reduce_sum(&mut b).unwrap();
        assert!(t.elapsed() >= stall - Duration::from_millis(100));
        (b, r0.waits())
    });
    let (b1, waits1) = late.join().unwrap();
    assert_eq!(b, [0.75, 0.0, 1.0]);
    assert_eq!(b1, b);
    // Rank 0 waited for rank 1's bytes once past the threshold; its sends and rank 1's
    // waits did not.
    let get =
        |w: &[LinkWaits], d: LinkDirection| w.iter().find(|l| l.direction == d).cloned().unwrap();
    let recv = get(&waits, LinkDirection::Receive);
    assert_eq!((recv.peer, recv.count, recv.stalls), (1, 8, 1));
    assert_eq!(recv.buckets[WAIT_BUCKETS.len() - 2], 1, "{recv:?}");
    assert!(recv.seconds >= 2.4, "{recv:?}");
    assert_eq!(get(&waits, LinkDirection::Send).stalls, 0);
    assert!(
        waits1.iter().all(|l| l.stalls == 0 && l.count == 8),
        "{waits1:?}"
    );
    // One warning while it lasted, one line when rank 1 answered.
    let warned: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warned.len(), 1, "{log}");
    assert!(
        warned[0].contains("ring: rank 0 of 2, all-reduce: receiving from rank 1 (127.0.0.1:")
            && warned[0].contains("waiting for 2."),
        "{log}"
    );
    assert!(
        log.contains("rank 1 answered after 2.6 s") || log.contains("rank 1 answered after 2.7 s"),
        "{log}"
    );
}

/// A ring of two whose rank 0 sends to rank 1 through a recording proxy: the rings
/// and what crossed from rank 0 to rank 1.
fn ring_through_recorder(
    secret: &RingSecret,
) -> (TcpRing, TcpRing, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    use std::io::{Read, Write};
    let l0 = TcpRing::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l1 = TcpRing::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let (a0, a1, ap) = (
        l0.local_addr().unwrap(),
        l1.local_addr().unwrap(),
        proxy.local_addr().unwrap(),
    );
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        let (mut from, _) = proxy.accept().unwrap();
        let mut to = TcpStream::connect(a1).unwrap();
        let mut back = (from.try_clone().unwrap(), to.try_clone().unwrap());
        std::thread::spawn(move || std::io::copy(&mut back.1, &mut back.0));
        let mut b = [0u8; 1 << 16];
        while let Ok(n) = from.read(&mut b) {
            if n == 0 || to.write_all(&b[..n]).is_err() {
                break;
            }
            log.lock().unwrap().extend_from_slice(&b[..n]);
        }
    });
    // Rank 0 dials rank 1 at the proxy; rank 1 dials rank 0 directly.
    let (s0, s1) = (secret.clone(), secret.clone());
    let t = Duration::from_secs(20);
    let r0 = std::thread::spawn(move || TcpRing::connect(0, &[a0, ap], l0, t, &s0));
    let r1 = std::thread::spawn(move || TcpRing::connect(1, &[a0, a1], l1, t, &s1));
    (
        r0.join().unwrap().unwrap(),
        r1.join().unwrap().unwrap(),
        seen,
    )
}

/// A ring of two that formed sums: 1 + 2 on both ranks.
fn sums_alike(mut r0: TcpRing, mut r1: TcpRing) {
    let h = std::thread::spawn(move || {
        let mut b = [2.0f32; 3];
        r1.all_reduce_sum(&mut b).unwrap();
        b
    });
    let mut b = [1.0f32; 3];
    r0.all_reduce_sum(&mut b).unwrap();
    assert_eq!((b, h.join().unwrap()), ([3.0; 3], [3.0; 3]));
}

#[test]
fn the_ring_carries_no_known_buffer_in_the_clear() {
    // A buffer no traffic would hold by chance.
    let known: Vec<f32> = (0..4096).map(|i| 1.0 + i as f32 * 1e-3).collect();
    let bytes: Vec<u8> = known.iter().flat_map(|x| x.to_le_bytes()).collect();
    let secret = RingSecret::random("known", 7);
    let (mut r0, mut r1, seen) = ring_through_recorder(&secret);
    let k = known.clone();
    let h = std::thread::spawn(move || {
        let mut b = vec![0.0; k.len()];
        r1.broadcast(&mut b, 0).unwrap();
        b
    });
    let mut b = known.clone();
    r0.broadcast(&mut b, 0).unwrap();
    assert_eq!(h.join().unwrap(), known);
    drop(r0);
    std::thread::sleep(Duration::from_millis(100));
    let seen = seen.lock().unwrap().clone();
    // The recorder saw the whole connection: the greeting in the clear, then one frame.
    assert_eq!(
        seen.len(),
        secure::HELLO_LEN + secure::FINISH_LEN + bytes.len() + TAG_LEN
    );
    assert_eq!(&seen[..8], secure::GREETING);
    // Not one 16-byte piece of the buffer crossed in the clear.
    for piece in bytes.chunks_exact(16) {
        assert!(!seen.windows(16).any(|w| w == piece));
    }
}

#[test]
fn an_intruder_while_the_ring_forms_is_refused_and_logged_and_the_ring_forms() {
    use std::io::{Read, Write};
    let sink = crate::dist::watch::logs::Sink::default();
    {
        let secret = RingSecret::random("intruded", 3);
        let l0 = TcpRing::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let l1 = TcpRing::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let (a0, a1) = (l0.local_addr().unwrap(), l1.local_addr().unwrap());
        // Before rank 1 starts: one intruder with the right greeting, rank and
        // generation (no key), one that stays silent, one that speaks nonsense.
        let mut proper = TcpStream::connect(a0).unwrap();
        let mut hello = secure::GREETING.to_vec();
        hello.extend_from_slice(&1u64.to_le_bytes());
        hello.extend_from_slice(&3u64.to_le_bytes());
        hello.extend_from_slice(&[9u8; 32]);
        proper.write_all(&hello).unwrap();
        let _silent = TcpStream::connect(a0).unwrap();
        let mut noise = TcpStream::connect(a0).unwrap();
        noise.write_all(&[0x47; 200]).unwrap();
        let t = Duration::from_secs(20);
        let (s0, sink0) = (secret.clone(), sink.clone());
        let r0 = std::thread::spawn(move || {
            // Rank 0's refusals are logged on its thread.
            let _logs = sink0.attach();
            TcpRing::connect(0, &[a0, a1], l0, t, &s0)
        });
        // The proper-looking intruder gets the challenge, answers it with nothing
        // better than bytes, and is refused.
        let mut reply = [0u8; secure::REPLY_LEN];
        proper.read_exact(&mut reply).unwrap();
        proper.write_all(&[0u8; secure::FINISH_LEN]).unwrap();
        // Rank 1 starts once rank 0 has said so (its log, on its thread).
        let t0 = std::time::Instant::now();
        while !sink.text().contains("its proof does not check") {
            assert!(t0.elapsed() < Duration::from_secs(10), "{}", sink.text());
            std::thread::sleep(Duration::from_millis(10));
        }
        let r1 = std::thread::spawn(move || TcpRing::connect(1, &[a0, a1], l1, t, &secret));
        let (r0, r1) = (r0.join().unwrap().unwrap(), r1.join().unwrap().unwrap());
        sums_alike(r0, r1);
    }
    let log = sink.text();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ring: rank 0 refused a connection from 127.0.0.1:"))
        .collect();
    assert!(
        refused
            .iter()
            .any(|l| l.contains("its proof does not check")),
        "{log}"
    );
    assert!(
        refused
            .iter()
            .any(|l| l.contains("not a lightrnn ring greeting")),
        "{log}"
    );
}

#[test]
fn outsiders_dripping_bytes_from_the_neighbour_s_own_address_cannot_keep_it_out() {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    let secret = RingSecret::random("flooded", 2);
    let l0 = TcpRing::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l1 = TcpRing::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let (a0, a1) = (l0.local_addr().unwrap(), l1.local_addr().unwrap());
    // Eight outsiders (twice the handshakes one address may have under way) on the
    // neighbour's own address, each sending one byte of a greeting every 200 ms (never a
    // whole one), reconnecting as soon as they are shut out, from before the ring forms
    // until it has.
    let done = std::sync::Arc::new(AtomicBool::new(false));
    let drips: Vec<_> = (0..8)
        .map(|_| {
            let done = done.clone();
            std::thread::spawn(move || {
                let mut connections = 0;
                while !done.load(Ordering::Relaxed) {
                    let Ok(mut s) = TcpStream::connect(a0) else {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    connections += 1;
                    while !done.load(Ordering::Relaxed) && s.write_all(b"L").is_ok() {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
                connections
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let t = Duration::from_secs(20);
    let s0 = secret.clone();
    let started = std::time::Instant::now();
    let r0 = std::thread::spawn(move || TcpRing::connect(0, &[a0, a1], l0, t, &s0));
    let r1 = std::thread::spawn(move || TcpRing::connect(1, &[a0, a1], l1, t, &secret));
    let (r0, r1) = (r0.join().unwrap().unwrap(), r1.join().unwrap().unwrap());
    let formed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    sums_alike(r0, r1);
    // Formed within seconds (under 0.1 s on a quiet machine), not at the ring's 20 s
    // deadline.
    assert!(formed < Duration::from_secs(10), "formed after {formed:?}");
    let connections: usize = drips.into_iter().map(|d| d.join().unwrap()).sum();
    assert!(connections >= 8, "{connections}");
}

#[test]
fn a_silent_neighbour_is_an_error_not_a_hang() {
    let handles = rings(2, Duration::from_millis(300));
    let mut rings: Vec<TcpRing> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    let _quiet = rings.pop().unwrap(); // rank 1 never takes part
    let mut r0 = rings.pop().unwrap();
    let t = std::time::Instant::now();
    let e = r0.all_reduce_sum(&mut [1.0; 8]).unwrap_err().to_string();
    // What passed, how long it is, and who did not answer from where.
    assert!(
        e.starts_with("ring: rank 0 of 2, all-reduce: receiving from rank 1 (127.0.0.1:")
            && e.ends_with(
                "): nothing for 0.3 s, the collective deadline (--collective-timeout-s)"
            ),
        "{e}"
    );
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(r0.waits()[0].count, 1);
    // A rank nobody connects to gives up at its deadline.
    let l = TcpRing::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let me = l.local_addr().unwrap();
    let ghost = TcpRing::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addrs = vec![me, ghost.local_addr().unwrap()];
    let secret = RingSecret::random("test", 1);
    let e = TcpRing::connect(0, &addrs, l, Duration::from_millis(300), &secret)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("rank 1"), "{e}");
}
