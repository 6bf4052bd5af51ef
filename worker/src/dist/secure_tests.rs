use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use super::*;

/// A connected pair of sockets on loopback (connector, acceptor).
fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (a, _) = l.accept().unwrap();
    for s in [&c, &a] {
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
    }
    (c, a)
}

/// A copy of `secret` (same key) for the other side.
fn twin(s: &RingSecret) -> RingSecret {
    RingSecret::new(&s.key, &s.run, s.generation).unwrap()
}

/// Run the handshake between rank `from` (holding `cs`) and rank `to` (holding `as_`).
fn handshake(
    cs: RingSecret,
    as_: RingSecret,
    from: u64,
    to: u64,
) -> (Result<Sealer, String>, Result<Opener, Refusal>) {
    let (mut c, mut a) = pair();
    let acceptor = std::thread::spawn(move || {
        let r = answer(&mut a, &as_, to, from);
        drop(a); // a refusal closes the connection
        r
    });
    let sealer = offer(&mut c, &cs, from, to);
    drop(c);
    (sealer, acceptor.join().unwrap())
}

#[test]
fn frames_open_in_order_and_never_carry_the_data_in_the_clear() {
    let s = RingSecret::random("run-a", 3);
    let (sealer, opener) = handshake(twin(&s), s, 0, 1);
    let (mut sealer, mut opener) = (sealer.unwrap(), opener.unwrap());
    let data: Vec<u8> = (0..1000u32)
        .flat_map(|i| (i as f32).to_le_bytes())
        .collect();
    let mut frames = Vec::new();
    for _ in 0..3 {
        let mut f = data.clone();
        sealer.seal(&mut f);
        assert_eq!(f.len(), data.len() + TAG_LEN);
        assert!(
            !f.windows(16)
                .any(|w| data.windows(16).step_by(16).any(|d| d == w))
        );
        frames.push(f);
    }
    // Identical data make different frames (the frame number is the nonce).
    assert_ne!(frames[0], frames[1]);
    // In order, each opens to the data.
    let mut f0 = frames[0].clone();
    opener.open(&mut f0).unwrap();
    assert_eq!(&f0[..data.len()], &data[..]);
    // A replayed frame (frame 0 again where frame 1 is due) fails, and so does the
    // connection from then on.
    let mut again = frames[0].clone();
    assert!(opener.open(&mut again).is_err());
}

#[test]
fn one_flipped_bit_anywhere_in_a_frame_fails_its_check() {
    let s = RingSecret::random("run-b", 1);
    let data = vec![7u8; 64];
    for bit in [0usize, 9, 8 * 63 + 7, 8 * 64, 8 * (64 + TAG_LEN) - 1] {
        let (sealer, opener) = handshake(twin(&s), twin(&s), 1, 0);
        let (mut sealer, mut opener) = (sealer.unwrap(), opener.unwrap());
        let mut f = data.clone();
        sealer.seal(&mut f);
        f[bit / 8] ^= 1 << (bit % 8);
        assert!(opener.open(&mut f).is_err(), "bit {bit}");
    }
    // Reordered frames fail too.
    let (sealer, opener) = handshake(twin(&s), twin(&s), 1, 0);
    let (mut sealer, mut opener) = (sealer.unwrap(), opener.unwrap());
    let (mut a, mut b) = (data.clone(), data.clone());
    sealer.seal(&mut a);
    sealer.seal(&mut b);
    assert!(opener.open(&mut b).is_err());
}

/// A connector that speaks the protocol with `secret` and answers the acceptor's
/// challenge with `finish(transcript, acceptor's proof)`: the acceptor's verdict.
fn raw_connector(
    secret: &RingSecret,
    acceptor: &RingSecret,
    finish: impl Fn(&[u8], &[u8]) -> Vec<u8>,
) -> Result<Opener, Refusal> {
    let (mut c, mut a) = pair();
    let nc = [3u8; 32];
    let mut hello = GREETING.to_vec();
    hello.extend_from_slice(&1u64.to_le_bytes());
    hello.extend_from_slice(&secret.generation.to_le_bytes());
    hello.extend_from_slice(&nc);
    c.write_all(&hello).unwrap();
    let acceptor = acceptor.clone();
    let verdict = std::thread::spawn(move || answer(&mut a, &acceptor, 0, 1));
    let mut reply = [0u8; REPLY_LEN];
    c.read_exact(&mut reply).unwrap();
    let t = secret.transcript(1, 0, &nc, &reply[..32]);
    c.write_all(&finish(&t, &reply[32..])).unwrap();
    verdict.join().unwrap()
}

/// A connector's finish: its proof over the transcript with `s`.
fn signed(s: &RingSecret) -> impl Fn(&[u8], &[u8]) -> Vec<u8> + '_ {
    move |t, _| s.proof(b"connector", t).as_ref().to_vec()
}

#[test]
fn a_peer_without_the_generations_key_is_refused_both_ways() {
    let ours = RingSecret::random("run-c", 2);
    let theirs = RingSecret::random("run-c", 2);
    // An intruder that speaks the protocol, signing with another key: its proof does
    // not check.
    assert_eq!(
        raw_connector(&theirs, &ours, signed(&theirs)).err(),
        Some(Refusal::Proof)
    );
    // The same with this generation's key is let in (the harness is sound).
    assert!(raw_connector(&ours, &ours, signed(&ours)).is_ok());
    // Another run with the same key bytes is another transcript.
    let other_run = RingSecret::new(&ours.key, "run-d", 2).unwrap();
    assert_eq!(
        raw_connector(&other_run, &ours, signed(&other_run)).err(),
        Some(Refusal::Proof)
    );
    // Reflection: the acceptor's own proof sent back, or signed in the acceptor's role
    // with the right key, is refused (the roles are in what is signed).
    assert_eq!(
        raw_connector(&ours, &ours, |_, theirs| theirs.to_vec()).err(),
        Some(Refusal::Proof)
    );
    let as_acceptor = |t: &[u8], _: &[u8]| ours.proof(b"acceptor", t).as_ref().to_vec();
    assert_eq!(
        raw_connector(&ours, &ours, as_acceptor).err(),
        Some(Refusal::Proof)
    );
    // A rank connecting to an impostor at its neighbour's address: the impostor's
    // proof does not check, and the rank says so.
    let (c, _) = handshake(twin(&ours), theirs, 1, 0);
    let e = c.err().unwrap();
    assert!(
        e.contains("does not hold this generation's ring key"),
        "{e}"
    );
}

#[test]
fn keys_change_every_so_many_frames_on_both_sides_alike() {
    let s = RingSecret::random("run-k", 1);
    let data = vec![9u8; 100];
    // Both sides change keys every 3 frames: every frame opens.
    let (sealer, opener) = handshake(twin(&s), twin(&s), 0, 1);
    let (mut sealer, mut opener) = (sealer.unwrap(), opener.unwrap());
    sealer.0.per_key = 3;
    opener.0.per_key = 3;
    for _ in 0..8 {
        let mut f = data.clone();
        sealer.seal(&mut f);
        opener.open(&mut f).unwrap();
        assert_eq!(&f[..100], &data[..]);
    }
    // An opener that keeps its first key opens frames 0 to 2 and fails frame 3: the
    // sealer's key changed there.
    let (sealer, opener) = handshake(twin(&s), s, 0, 1);
    let (mut sealer, mut opener) = (sealer.unwrap(), opener.unwrap());
    sealer.0.per_key = 3;
    for k in 0..4 {
        let mut f = data.clone();
        sealer.seal(&mut f);
        assert_eq!(opener.open(&mut f).is_ok(), k < 3, "frame {k}");
    }
}

#[test]
fn wrong_greetings_ranks_and_generations_are_refused_with_the_reason() {
    let s = RingSecret::random("run-e", 5);
    let refused = |hello: Vec<u8>| {
        let (mut c, mut a) = pair();
        c.write_all(&hello).unwrap();
        answer(&mut a, &s, 0, 1).err().unwrap()
    };
    let hello = |greeting: &[u8], rank: u64, generation: u64| {
        let mut h = greeting.to_vec();
        h.extend_from_slice(&rank.to_le_bytes());
        h.extend_from_slice(&generation.to_le_bytes());
        h.extend_from_slice(&[0u8; 32]);
        h
    };
    assert_eq!(refused(hello(b"LRNRING1", 1, 5)), Refusal::NotRing);
    assert_eq!(
        refused(hello(GREETING, 2, 5)),
        Refusal::Rank {
            claims: 2,
            expected: 1
        }
    );
    let r = refused(hello(GREETING, 1, 4));
    assert_eq!(r, Refusal::Generation { claims: 4, ours: 5 });
    assert!(r.to_string().contains("this ring is generation 5"));
    // Right greeting, rank and generation, then silence or garbage: no proof.
    let (mut c, mut a) = pair();
    c.set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .unwrap();
    a.set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .unwrap();
    c.write_all(&hello(GREETING, 1, 5)).unwrap();
    assert!(matches!(answer(&mut a, &s, 0, 1), Err(Refusal::Io(_))));
    let (mut c, mut a) = pair();
    c.write_all(&hello(GREETING, 1, 5)).unwrap();
    c.write_all(&[0xAB; FINISH_LEN]).unwrap();
    assert_eq!(answer(&mut a, &s, 0, 1).err(), Some(Refusal::Proof));
}

/// A transparent recorder between a connector and an acceptor: what the connector sent.
fn recorded_handshake(cs: RingSecret, as_: RingSecret) -> Vec<u8> {
    let (mut c, mut a) = pair();
    let acceptor = std::thread::spawn(move || answer(&mut a, &as_, 1, 0).map(|_| ()));
    // Record the connector's bytes by letting it write into a tee.
    struct Tee<'a>(&'a mut TcpStream, Vec<u8>);
    impl Read for Tee<'_> {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            self.0.read(b)
        }
    }
    impl Write for Tee<'_> {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let n = self.0.write(b)?;
            self.1.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.0.flush()
        }
    }
    let mut tee = Tee(&mut c, Vec::new());
    offer(&mut tee, &cs, 0, 1).unwrap();
    acceptor.join().unwrap().unwrap();
    tee.1
}

#[test]
fn a_recorded_handshake_replayed_is_refused() {
    let g1 = RingSecret::random("run-f", 1);
    let bytes = recorded_handshake(twin(&g1), twin(&g1));
    assert_eq!(bytes.len(), HELLO_LEN + FINISH_LEN);
    let replay = |secret: &RingSecret, bytes: &[u8]| {
        let (mut c, mut a) = pair();
        c.write_all(bytes).unwrap();
        answer(&mut a, secret, 1, 0).err().unwrap()
    };
    // In the same generation: the acceptor's nonce is fresh, the old proof answers
    // another.
    assert_eq!(replay(&g1, &bytes), Refusal::Proof);
    // In the next generation: refused by its number, and with the number rewritten, by
    // its proof (another key).
    let g2 = RingSecret::random("run-f", 2);
    assert_eq!(
        replay(&g2, &bytes),
        Refusal::Generation { claims: 1, ours: 2 }
    );
    let mut patched = bytes.clone();
    patched[16..24].copy_from_slice(&2u64.to_le_bytes());
    assert_eq!(replay(&g2, &patched), Refusal::Proof);
}

#[test]
fn a_secret_of_the_wrong_length_is_refused_and_never_printed() {
    let e = RingSecret::new(&[1u8; 16], "r", 1).unwrap_err();
    assert!(e.to_string().contains("16 bytes"), "{e}");
    let s = RingSecret::new(&[0x5A; KEY_BYTES], "r", 1).unwrap();
    let shown = format!("{s:?}");
    assert!(!shown.contains("90") && !shown.contains("5a"), "{shown}");
}

/// What protecting a 1 MiB frame costs on this machine, in GB/s on one core (one JSON
/// line; `cargo test --release -p lightrnn-worker primitive_throughput -- --ignored
/// --nocapture`): the ring's frames sealed and opened, and the candidates it was chosen
/// among, AEADs encrypting and tags over data left in the clear (the figures in
/// docs/benchmarks.md section 17).
#[test]
#[ignore = "a measurement, run by hand"]
fn primitive_throughput() {
    use ring::aead::{AES_128_GCM, CHACHA20_POLY1305};
    let piece = vec![0x3Cu8; 1 << 20];
    let reps = 300;
    let rate =
        |t: std::time::Instant| (reps * piece.len()) as f64 / t.elapsed().as_secs_f64() / 1e9;
    let mut line = serde_json::Map::new();
    let s = RingSecret::random("bench", 1);
    let (sealer, opener) = handshake(twin(&s), s, 0, 1);
    let (mut sealer, mut opener) = (sealer.unwrap(), opener.unwrap());
    let mut f = Vec::with_capacity(piece.len() + TAG_LEN);
    let t = std::time::Instant::now();
    for _ in 0..reps {
        f.clear();
        f.extend_from_slice(&piece);
        sealer.seal(&mut f);
        opener.open(&mut f).unwrap();
    }
    line.insert("ring_frame_seal_and_open".into(), rate(t).into());
    for (name, alg) in [
        ("aes_256_gcm", &AES_256_GCM),
        ("aes_128_gcm", &AES_128_GCM),
        ("chacha20_poly1305", &CHACHA20_POLY1305),
    ] {
        let key = LessSafeKey::new(UnboundKey::new(alg, &vec![1u8; alg.key_len()]).unwrap());
        let mut f = piece.clone();
        let t = std::time::Instant::now();
        for i in 0..reps {
            let _ = std::hint::black_box(
                key.seal_in_place_separate_tag(frame_nonce(i as u64), Aad::empty(), &mut f)
                    .unwrap(),
            );
        }
        line.insert(format!("{name}_encrypt"), rate(t).into());
        // A tag over the data in the clear (GHASH, Poly1305): associated data only.
        let t = std::time::Instant::now();
        for i in 0..reps {
            let _ = std::hint::black_box(
                key.seal_in_place_separate_tag(
                    frame_nonce(i as u64),
                    Aad::from(&piece[..]),
                    &mut [],
                )
                .unwrap(),
            );
        }
        line.insert(format!("{name}_tag_only"), rate(t).into());
    }
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[1u8; 32]);
    let t = std::time::Instant::now();
    for _ in 0..reps {
        std::hint::black_box(ring::hmac::sign(&k, &piece));
    }
    line.insert("hmac_sha256".into(), rate(t).into());
    println!("{}", serde_json::Value::Object(line));
}
