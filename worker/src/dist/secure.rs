//! The ring's security: who may join a rank's ring connection, and what a message must
//! carry to be accepted.
//!
//! The coordinator draws a fresh 32-byte secret for every generation and hands it to the
//! generation's ranks in the join reply, over the control plane's authenticated channel
//! ([`RingSecret`]). Every ring connection opens with a mutual challenge and response
//! over that secret, bound to the run, the generation, both ranks and both sides' fresh
//! nonces:
//!
//! ```text
//! connector -> acceptor   "LRNRING2" | rank | generation | nonce_c          (HELLO_LEN)
//! acceptor  -> connector  nonce_a | HMAC(secret, "acceptor" | transcript)   (REPLY_LEN)
//! connector -> acceptor   HMAC(secret, "connector" | transcript)            (FINISH_LEN)
//! ```
//!
//! An intruder without the secret cannot answer the acceptor's fresh nonce; a recorded
//! handshake replayed (of an earlier generation, or of this one) answers an old nonce; a
//! rank of another generation holds another secret. Each is refused ([`Refusal`]), and
//! the acceptor keeps waiting for its real neighbour.
//!
//! Data flows one way on a ring connection (a rank sends right, receives from the left),
//! each message in frames of at most one piece and a 16-byte tag, encrypted and
//! authenticated with AES-256-GCM under a key derived (HKDF-SHA256) from the secret, both
//! nonces and the transcript (a new one every 65,536 frames), with the frame's number as
//! its nonce, so a frame altered, dropped, replayed or reordered fails its check. The ring is always encrypted: with
//! AES-GCM's cipher and hash fused, encrypting costs less than a tag over data left in
//! the clear (docs/architecture.md, "The ring's security"). The primitives are the `ring`
//! crate's, the provider rustls uses here.

use std::io::{Read, Write};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};
use ring::hkdf::{HKDF_SHA256, Prk, Salt};
use ring::hmac::{self, HMAC_SHA256};
use ring::rand::{SecureRandom, SystemRandom};

/// The greeting of a ring connection (this protocol's version).
pub const GREETING: &[u8; 8] = b"LRNRING2";
/// Bytes of a nonce, of the secret, of a handshake proof.
const NONCE: usize = 32;
pub const KEY_BYTES: usize = 32;
const PROOF: usize = 32;
/// The connector's first message: greeting, its rank, the generation, its nonce.
pub const HELLO_LEN: usize = 8 + 8 + 8 + NONCE;
/// The acceptor's answer: its nonce and its proof.
pub const REPLY_LEN: usize = NONCE + PROOF;
/// The connector's proof.
pub const FINISH_LEN: usize = PROOF;
/// Bytes a frame adds to its data.
pub const TAG_LEN: usize = 16;

/// A generation's ring secret and what it binds: the run and the generation it was drawn
/// for.
#[derive(Clone)]
pub struct RingSecret {
    key: [u8; KEY_BYTES],
    run: String,
    generation: u64,
}

impl std::fmt::Debug for RingSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingSecret")
            .field("run", &self.run)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl RingSecret {
    /// The secret the coordinator sent for `generation` of `run`; refused unless it is
    /// [`KEY_BYTES`] long.
    pub fn new(key: &[u8], run: &str, generation: u64) -> Result<Self, lightrnn_core::Error> {
        let key: [u8; KEY_BYTES] = key.try_into().map_err(|_| {
            lightrnn_core::Error::Io(format!(
                "the coordinator sent a ring key of {} bytes for generation {generation}, \
                 not {KEY_BYTES}",
                key.len()
            ))
        })?;
        Ok(Self {
            key,
            run: run.to_string(),
            generation,
        })
    }

    /// A fresh random secret (tests, and rings formed without a coordinator).
    pub fn random(run: &str, generation: u64) -> Self {
        let mut key = [0u8; KEY_BYTES];
        SystemRandom::new()
            .fill(&mut key)
            .expect("the system's random source");
        Self {
            key,
            run: run.to_string(),
            generation,
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// What both proofs and the data key are bound to: the run, the generation, the
    /// connection's ranks (`from` sends to `to`), both nonces.
    fn transcript(&self, from: u64, to: u64, nc: &[u8], na: &[u8]) -> Vec<u8> {
        let mut t = Vec::with_capacity(64 + self.run.len() + 2 * NONCE);
        t.extend_from_slice(b"lightrnn ring v2");
        t.extend_from_slice(&(self.run.len() as u64).to_le_bytes());
        t.extend_from_slice(self.run.as_bytes());
        t.extend_from_slice(&self.generation.to_le_bytes());
        t.extend_from_slice(&from.to_le_bytes());
        t.extend_from_slice(&to.to_le_bytes());
        t.extend_from_slice(nc);
        t.extend_from_slice(na);
        t
    }

    fn proof(&self, role: &[u8], transcript: &[u8]) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&hmac::Key::new(HMAC_SHA256, &self.key));
        ctx.update(role);
        ctx.update(transcript);
        ctx.sign()
    }

    fn check(&self, role: &[u8], transcript: &[u8], proof: &[u8]) -> bool {
        let key = hmac::Key::new(HMAC_SHA256, &self.key);
        let mut msg = role.to_vec();
        msg.extend_from_slice(transcript);
        hmac::verify(&key, &msg, proof).is_ok()
    }

    /// The data keys of a connection whose handshake gave `transcript`.
    fn data_keys(&self, nc: &[u8], na: &[u8], transcript: Vec<u8>) -> Keys {
        let salt = [nc, na].concat();
        Keys::new(Salt::new(HKDF_SHA256, &salt).extract(&self.key), transcript)
    }
}

fn nonce() -> [u8; NONCE] {
    let mut n = [0u8; NONCE];
    SystemRandom::new()
        .fill(&mut n)
        .expect("the system's random source");
    n
}

/// Why an acceptor refused a connection (logged with the peer's address).
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// Not this protocol's greeting.
    NotRing,
    /// It claims a rank that is not this rank's left neighbour.
    Rank { claims: u64, expected: u64 },
    /// It claims another generation (an ended one's process, or a replay).
    Generation { claims: u64, ours: u64 },
    /// Its proof does not check: it lacks this generation's secret, or replays a
    /// recorded handshake.
    Proof,
    /// The connection failed or went silent during the handshake.
    Io(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::NotRing => write!(f, "not a lightrnn ring greeting"),
            Refusal::Rank { claims, expected } => write!(
                f,
                "it claims rank {claims}, this rank's left neighbour is rank {expected}"
            ),
            Refusal::Generation { claims, ours } => write!(
                f,
                "it claims generation {claims}, this ring is generation {ours} (an ended \
                 generation's process, or a replayed handshake)"
            ),
            Refusal::Proof => write!(
                f,
                "its proof does not check (it lacks this generation's ring key, or replays \
                 a recorded handshake)"
            ),
            Refusal::Io(e) => write!(f, "the handshake failed: {e}"),
        }
    }
}

/// The connector's side of a handshake on `s`: rank `from` proves itself to rank `to`
/// and checks `to`'s proof. Returns the sealer of the data it sends, or why the peer is
/// not `to` of this generation.
pub fn offer(
    s: &mut (impl Read + Write),
    secret: &RingSecret,
    from: u64,
    to: u64,
) -> Result<Sealer, String> {
    let nc = nonce();
    let mut hello = Vec::with_capacity(HELLO_LEN);
    hello.extend_from_slice(GREETING);
    hello.extend_from_slice(&from.to_le_bytes());
    hello.extend_from_slice(&secret.generation.to_le_bytes());
    hello.extend_from_slice(&nc);
    s.write_all(&hello).map_err(|e| format!("greeting: {e}"))?;
    let mut reply = [0u8; REPLY_LEN];
    s.read_exact(&mut reply).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            "it closed the connection (it refused this rank's greeting)".to_string()
        }
        _ => format!("its answer: {e}"),
    })?;
    let (na, proof) = reply.split_at(NONCE);
    let t = secret.transcript(from, to, &nc, na);
    if !secret.check(b"acceptor", &t, proof) {
        return Err(format!(
            "its proof does not check: it does not hold this generation's ring key (not \
             rank {to} of this generation)"
        ));
    }
    s.write_all(secret.proof(b"connector", &t).as_ref())
        .map_err(|e| format!("proof: {e}"))?;
    Ok(Sealer(secret.data_keys(&nc, na, t)))
}

/// The acceptor's side of a handshake on `s`: rank `me` expects its left neighbour
/// `left`. Returns the opener of the data it receives, or why the peer is refused.
pub fn answer(
    s: &mut (impl Read + Write),
    secret: &RingSecret,
    me: u64,
    left: u64,
) -> Result<Opener, Refusal> {
    let io = |e: std::io::Error| Refusal::Io(e.to_string());
    let mut hello = [0u8; HELLO_LEN];
    s.read_exact(&mut hello).map_err(io)?;
    if &hello[..8] != GREETING {
        return Err(Refusal::NotRing);
    }
    let word = |i: usize| u64::from_le_bytes(hello[i..i + 8].try_into().unwrap());
    let (claims, generation) = (word(8), word(16));
    if claims != left {
        return Err(Refusal::Rank {
            claims,
            expected: left,
        });
    }
    if generation != secret.generation {
        return Err(Refusal::Generation {
            claims: generation,
            ours: secret.generation,
        });
    }
    let nc = &hello[24..];
    let na = nonce();
    let t = secret.transcript(left, me, nc, &na);
    let mut reply = Vec::with_capacity(REPLY_LEN);
    reply.extend_from_slice(&na);
    reply.extend_from_slice(secret.proof(b"acceptor", &t).as_ref());
    s.write_all(&reply).map_err(io)?;
    let mut proof = [0u8; FINISH_LEN];
    s.read_exact(&mut proof).map_err(io)?;
    if !secret.check(b"connector", &t, &proof) {
        return Err(Refusal::Proof);
    }
    Ok(Opener(secret.data_keys(nc, &na, t)))
}

/// The AEAD nonce of frame `n` of a connection (each key seals one direction of one
/// connection, so a counter never repeats under it).
fn frame_nonce(n: u64) -> Nonce {
    let mut b = [0u8; 12];
    b[4..].copy_from_slice(&n.to_be_bytes());
    Nonce::assume_unique_for_key(b)
}

/// Frames sealed under one key before the next is derived: at most 64 GiB of 1 MiB
/// frames, far inside AES-GCM's limits for one key (TLS 1.3 allows about 2^38 bytes).
const FRAMES_PER_KEY: u64 = 1 << 16;

/// The keys of one direction of one connection: key `i` (for frames `i * per_key ..`)
/// is HKDF-expanded from the handshake's pseudorandom key, the transcript and `i`.
struct Keys {
    prk: Prk,
    transcript: Vec<u8>,
    key: LessSafeKey,
    frames: u64,
    per_key: u64,
}

impl Keys {
    fn new(prk: Prk, transcript: Vec<u8>) -> Self {
        let key = Self::derive(&prk, &transcript, 0);
        Self {
            prk,
            transcript,
            key,
            frames: 0,
            per_key: FRAMES_PER_KEY,
        }
    }

    fn derive(prk: &Prk, transcript: &[u8], index: u64) -> LessSafeKey {
        let index = index.to_le_bytes();
        let info: [&[u8]; 3] = [b"lightrnn ring v2 data", transcript, &index];
        let okm = prk
            .expand(&info, &AES_256_GCM)
            .expect("a 32-byte key is within HKDF's length");
        LessSafeKey::new(UnboundKey::from(okm))
    }

    /// The key and nonce of the next frame.
    fn next(&mut self) -> (&LessSafeKey, Nonce) {
        let n = self.frames;
        self.frames += 1;
        if n > 0 && n.is_multiple_of(self.per_key) {
            self.key = Self::derive(&self.prk, &self.transcript, n / self.per_key);
        }
        (&self.key, frame_nonce(n))
    }
}

/// The sending side of a ring connection: seals each frame.
pub struct Sealer(Keys);

impl Sealer {
    /// Encrypt the data in `frame` in place and append its tag.
    pub fn seal(&mut self, frame: &mut Vec<u8>) {
        let (key, n) = self.0.next();
        let tag = key
            .seal_in_place_separate_tag(n, Aad::empty(), frame)
            .expect("a frame within AES-GCM's length");
        frame.extend_from_slice(tag.as_ref());
    }
}

/// The receiving side of a ring connection: checks and decrypts each frame.
pub struct Opener(Keys);

/// A frame that failed its check: altered, out of order, replayed or another key's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadFrame;

impl Opener {
    /// Check and decrypt the frame (data and tag) in place; on success its first
    /// `frame.len() - TAG_LEN` bytes are the data. A frame that fails is not to be used,
    /// nor anything after it: the connection is done.
    pub fn open(&mut self, frame: &mut [u8]) -> Result<(), BadFrame> {
        if frame.len() < TAG_LEN {
            return Err(BadFrame);
        }
        let (key, n) = self.0.next();
        let at = frame.len() - TAG_LEN;
        let (data, tag) = frame.split_at_mut(at);
        let tag = Tag::try_from(&tag[..]).map_err(|_| BadFrame)?;
        key.open_in_place_separate_tag(n, Aad::empty(), tag, data, 0..)
            .map(|_| ())
            .map_err(|_| BadFrame)
    }
}

#[cfg(test)]
#[path = "secure_tests.rs"]
mod tests;
