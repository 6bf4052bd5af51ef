//! The coordinator's guard on its connections, below TLS and HTTP/2: at most
//! [`Limits::per_peer`] open connections per peer address; a connection must send its
//! first bytes (the TLS hello or the HTTP/2 preface) within [`Limits::first_bytes`] and
//! is closed after [`Limits::idle`] without a byte (the server's HTTP/2 pings keep a
//! live client's connection busy). Each refusal and closing is logged with the peer.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The guard's bounds.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub per_peer: usize,
    pub first_bytes: Duration,
    pub idle: Duration,
}

impl Limits {
    /// The bounds for a job of `world` workers: every worker may share one address
    /// (workers on one host, a NAT), each with a few channels.
    pub fn for_world(world: usize) -> Self {
        Self {
            per_peer: 32 + 8 * world,
            first_bytes: Duration::from_secs(10),
            idle: Duration::from_secs(300),
        }
    }
}

type Counts = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// A connection the guard admitted: its peer's count is released when it closes.
pub struct Guarded {
    tcp: TcpStream,
    peer: Option<IpAddr>,
    counts: Counts,
    /// Bytes received so far (0: still waiting for the first).
    received: u64,
    limits: Limits,
    deadline: Pin<Box<Sleep>>,
}

impl Guarded {
    /// The peer's address, for the log.
    pub fn peer(&self) -> String {
        self.tcp
            .peer_addr()
            .map_or_else(|_| "an unknown peer".to_string(), |a| a.to_string())
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Some(ip) = self.peer {
            let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = c.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    c.remove(&ip);
                }
            }
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.tcp).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = (buf.filled().len() - before) as u64;
                if n > 0 {
                    self.received += n;
                    let next = Instant::now() + self.limits.idle;
                    self.deadline.as_mut().reset(next);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    let (what, secs) = if self.received == 0 {
                        ("sent nothing", self.limits.first_bytes.as_secs())
                    } else {
                        ("went idle", self.limits.idle.as_secs())
                    };
                    let peer = self
                        .peer
                        .map_or_else(|| "an unknown peer".into(), |p| p.to_string());
                    tracing::warn!(peer = %peer, "closed a connection that {what} for {secs} s");
                    Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("the connection {what} for {secs} s"),
                    )))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

impl Connected for Guarded {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.tcp.connect_info()
    }
}

/// The connections of `incoming` that the guard admits.
pub fn guard<S>(incoming: S, limits: Limits) -> impl Stream<Item = std::io::Result<Guarded>>
where
    S: Stream<Item = std::io::Result<TcpStream>> + Send + 'static,
{
    let counts: Counts = Arc::default();
    let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
    incoming.filter_map(move |conn| {
        let (counts, refused) = (counts.clone(), refused.clone());
        async move {
            let tcp = match conn {
                Ok(t) => t,
                Err(e) => return Some(Err(e)),
            };
            let peer = tcp.peer_addr().ok().map(|a| a.ip());
            if let Some(ip) = peer {
                let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
                let n = c.entry(ip).or_insert(0);
                if *n >= limits.per_peer {
                    drop(c);
                    // Logged once per 100 refusals after the first 10: a flood must not
                    // flood the log too.
                    let k = refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if k < 10 || k % 100 == 0 {
                        tracing::warn!(peer = %ip, limit = limits.per_peer, refused = k + 1, "refused a connection: too many open from this peer");
                    }
                    return None;
                }
                *n += 1;
            }
            Some(Ok(Guarded {
                tcp,
                peer,
                counts,
                received: 0,
                limits,
                deadline: Box::pin(tokio::time::sleep(limits.first_bytes)),
            }))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A listener guarded with small limits; the admitted connections echo what they
    /// read until the guard or the peer closes them.
    async fn server(limits: Limits) -> std::net::SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let incoming = futures::stream::unfold(l, |l| async move {
            let c = l.accept().await.map(|(s, _)| s);
            Some((c, l))
        });
        tokio::spawn(async move {
            let mut g = Box::pin(guard(incoming, limits));
            while let Some(Ok(mut conn)) = g.next().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 64];
                    while let Ok(n) = conn.read(&mut b).await {
                        if n == 0 || conn.write_all(&b[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    /// Whether the server closed `c` (EOF or reset) within `wait`.
    async fn closed(c: &mut TcpStream, wait: Duration) -> bool {
        let mut b = [0u8; 8];
        matches!(
            tokio::time::timeout(wait, c.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    #[tokio::test]
    async fn silent_idle_and_surplus_connections_are_closed() {
        let limits = Limits {
            per_peer: 3,
            first_bytes: Duration::from_millis(300),
            idle: Duration::from_millis(900),
        };
        let addr = server(limits).await;
        // Silent from the start: closed after first_bytes.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        assert!(closed(&mut silent, Duration::from_secs(3)).await);
        // Talking keeps a connection open past first_bytes; silence then closes it.
        let mut talker = TcpStream::connect(addr).await.unwrap();
        for _ in 0..4 {
            talker.write_all(b"ping").await.unwrap();
            let mut b = [0u8; 4];
            talker.read_exact(&mut b).await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(closed(&mut talker, Duration::from_secs(3)).await);
        // At most per_peer at once: the surplus is closed at once, a freed slot reopens.
        let mut open = Vec::new();
        for _ in 0..3 {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            c.read_exact(&mut b).await.unwrap();
            open.push(c);
        }
        let mut surplus = TcpStream::connect(addr).await.unwrap();
        assert!(closed(&mut surplus, Duration::from_millis(200)).await);
        drop(open.pop());
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut again = TcpStream::connect(addr).await.unwrap();
        again.write_all(b"y").await.unwrap();
        let mut b = [0u8; 1];
        again.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"y");
    }
}
