//! Who is admitted to a rank's ring connections while the ring forms: the connector's
//! side ([`offer_right`]) dials the right neighbour and proves itself; the acceptor's side
//! ([`accept_left`]) runs the handshake ([`super::secure`]) of every connection to the
//! rank's listener until one proves it is the left neighbour of this generation.
//!
//! An outsider who reaches the listener cannot get in, and cannot keep the neighbour out
//! either: every handshake has one deadline for all of it ([`HANDSHAKE`], not per read:
//! a peer that drips a byte at a time gains nothing), runs on its own thread, and each
//! source address may hold at most [`PER_PEER`] handshakes at once; a connection past
//! that (or past [`HANDSHAKES`] in all) evicts the oldest handshake of its address (of
//! any), so the neighbour's retries always get a turn. Refusals are logged with the peer
//! and the reason, the first [`LOGGED`] of them in full, then one summary line every few
//! seconds (a flood of connections does not flood the log).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::secure::{self, Opener, Refusal, RingSecret, Sealer};
use lightrnn_core::{Error, Result};

/// The longest a connection's whole handshake may take.
pub const HANDSHAKE: Duration = Duration::from_secs(5);
/// Handshakes from one source address in flight at once.
pub const PER_PEER: usize = 4;
/// Handshakes in flight at once on a rank's listener.
pub const HANDSHAKES: usize = 64;
/// Refusals logged one by one before they are summed up.
const LOGGED: usize = 16;
/// How often the summary of further refusals is logged.
const SUMMARY_EVERY: Duration = Duration::from_secs(5);

/// A connection whose every read and write ends by one deadline.
struct Bounded<'a> {
    s: &'a mut TcpStream,
    until: Instant,
}

impl Bounded<'_> {
    /// The time left, set as the socket's timeout; none left is a timeout error.
    fn arm(&mut self) -> std::io::Result<()> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the handshake's deadline passed",
            ));
        }
        self.s.set_read_timeout(Some(left))?;
        self.s.set_write_timeout(Some(left))
    }
}

impl Read for Bounded<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.arm()?;
        self.s.read(buf)
    }
}

impl Write for Bounded<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.arm()?;
        self.s.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.s.flush()
    }
}

/// The refusals of one listener: logged in full up to [`LOGGED`], then counted and
/// summed up every [`SUMMARY_EVERY`].
struct Refusals {
    rank: usize,
    count: usize,
    unlogged: usize,
    last: String,
    summed: Instant,
}

impl Refusals {
    fn new(rank: usize) -> Self {
        Self {
            rank,
            count: 0,
            unlogged: 0,
            last: String::new(),
            summed: Instant::now(),
        }
    }

    fn refuse(&mut self, peer: SocketAddr, why: &dyn std::fmt::Display) {
        let rank = self.rank;
        self.count += 1;
        self.last = format!("{peer}: {why}");
        if self.count <= LOGGED {
            tracing::warn!("ring: rank {rank} refused a connection from {peer}: {why}");
            return;
        }
        self.unlogged += 1;
        if self.summed.elapsed() >= SUMMARY_EVERY {
            self.sum_up();
        }
    }

    /// One line for the refusals not logged yet.
    fn sum_up(&mut self) {
        if self.unlogged > 0 {
            let (rank, n, last) = (self.rank, self.unlogged, &self.last);
            tracing::warn!(
                "ring: rank {rank} refused {n} more connection(s) ({} in all), the last from {last}",
                self.count
            );
        }
        self.unlogged = 0;
        self.summed = Instant::now();
    }
}

/// The connector's side of a ring: connect to the right neighbour at `to` and prove
/// this rank to it, retrying until `deadline` (it may not listen yet). A peer there that
/// cannot prove itself rank `right` of this generation is logged and tried again.
pub fn offer_right(
    rank: usize,
    right: usize,
    to: SocketAddr,
    secret: &RingSecret,
    deadline: Instant,
) -> Result<(TcpStream, Sealer)> {
    let mut last = String::new();
    loop {
        match TcpStream::connect_timeout(&to, Duration::from_millis(500)) {
            Ok(mut s) => {
                s.set_nodelay(true).ok();
                let until = deadline.min(Instant::now() + HANDSHAKE);
                let offered = secure::offer(
                    &mut Bounded { s: &mut s, until },
                    secret,
                    rank as u64,
                    right as u64,
                );
                match offered {
                    Ok(sealer) => return Ok((s, sealer)),
                    Err(e) => {
                        let e = format!("the handshake failed: {e}");
                        if e != last {
                            tracing::warn!(
                                "ring: rank {rank}: connecting to rank {right} at {to}: {e}; trying again"
                            );
                        }
                        last = e;
                    }
                }
            }
            Err(e) => last = e.to_string(),
        }
        if Instant::now() >= deadline {
            return Err(Error::Io(format!(
                "ring: rank {rank} cannot reach rank {right} at {to}: {last}"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A handshake under way: which connection, from where, since when, and the handle that
/// ends it early.
struct InFlight {
    id: u64,
    ip: IpAddr,
    since: Instant,
    evicted: bool,
    stop: TcpStream,
}

type Outcome = (
    u64,
    SocketAddr,
    std::result::Result<(TcpStream, Opener), Refusal>,
);

/// The acceptor's side of a ring: take the first connection on `listener` whose
/// handshake proves it is rank `left` of this generation (see the module's doc for what
/// keeps an outsider from holding it up).
pub fn accept_left(
    rank: usize,
    left: usize,
    listener: &TcpListener,
    secret: &RingSecret,
    deadline: Instant,
    timeout: Duration,
) -> Result<(TcpStream, Opener)> {
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::Io(format!("ring: {e}")))?;
    let (tx, rx) = mpsc::channel::<Outcome>();
    let mut flight: Vec<InFlight> = Vec::new();
    let mut refusals = Refusals::new(rank);
    let mut next_id = 0u64;
    let taken = 'accept: loop {
        while let Ok((id, peer, r)) = rx.try_recv() {
            let evicted = flight.iter().any(|f| f.id == id && f.evicted);
            flight.retain(|f| f.id != id);
            match r {
                Ok(taken) => break 'accept Ok(taken),
                Err(_) if evicted => refusals.refuse(
                    peer,
                    &format_args!(
                        "ended to make room ({PER_PEER} handshakes from its address, or \
                         {HANDSHAKES} in all, were under way)"
                    ),
                ),
                Err(why) => refusals.refuse(peer, &why),
            }
        }
        match listener.accept() {
            Ok((s, peer)) => {
                make_room(&mut flight, peer.ip());
                let Ok(stop) = s.try_clone() else {
                    refusals.refuse(peer, &"its socket could not be cloned");
                    continue;
                };
                let (id, tx, secret) = (next_id, tx.clone(), secret.clone());
                next_id += 1;
                let until = Instant::now() + HANDSHAKE.min(timeout);
                let spawned = std::thread::Builder::new()
                    .name("ring-handshake".into())
                    .spawn(move || {
                        let mut s = s;
                        s.set_nonblocking(false).ok();
                        s.set_nodelay(true).ok();
                        let mut bounded = Bounded { s: &mut s, until };
                        let r = secure::answer(&mut bounded, &secret, rank as u64, left as u64);
                        let _ = tx.send((id, peer, r.map(|opener| (s, opener))));
                    });
                match spawned {
                    Ok(_) => flight.push(InFlight {
                        id,
                        ip: peer.ip(),
                        since: Instant::now(),
                        evicted: false,
                        stop,
                    }),
                    Err(e) => refusals.refuse(peer, &format_args!("no thread for it: {e}")),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let also = match refusals.count {
                        0 => String::new(),
                        n => format!(
                            " (refused {n} other connection(s), the last from {})",
                            refusals.last
                        ),
                    };
                    break Err(Error::Io(format!(
                        "ring: rank {rank}: rank {left} did not connect within {timeout:?}{also}"
                    )));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => break Err(Error::Io(format!("ring: rank {rank} accepting: {e}"))),
        }
    };
    drop(tx);
    // Handshakes still under way: their refusals are logged as they end (a second
    // connection that proves itself, e.g. a connector's retry, is closed).
    std::thread::spawn(move || {
        for (_, peer, r) in rx {
            match r {
                Err(why) => refusals.refuse(peer, &why),
                Ok(_) => tracing::info!(
                    "ring: rank {rank}: closed a second connection from rank {left} ({peer})"
                ),
            }
        }
        refusals.sum_up();
    });
    taken
}

/// Room for one more handshake from `ip`: past [`PER_PEER`] from that address, or
/// [`HANDSHAKES`] in all, the oldest one (of that address, else of any) is ended (its
/// thread then reports it refused).
fn make_room(flight: &mut [InFlight], ip: IpAddr) {
    let live = |f: &&mut InFlight| !f.evicted;
    let mut per_ip: HashMap<IpAddr, usize> = HashMap::new();
    for f in flight.iter().filter(|f| !f.evicted) {
        *per_ip.entry(f.ip).or_default() += 1;
    }
    let total: usize = per_ip.values().sum();
    let victim = if per_ip.get(&ip).copied().unwrap_or(0) >= PER_PEER {
        flight
            .iter_mut()
            .filter(live)
            .filter(|f| f.ip == ip)
            .min_by_key(|f| f.since)
    } else if total >= HANDSHAKES {
        flight.iter_mut().filter(live).min_by_key(|f| f.since)
    } else {
        None
    };
    if let Some(v) = victim {
        v.evicted = true;
        let _ = v.stop.shutdown(std::net::Shutdown::Both);
    }
}
