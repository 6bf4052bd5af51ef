//! TLS of the coordinator's gRPC endpoint: the server side is built here (rustls with
//! the ring provider) rather than inside tonic, so that every refused handshake (no
//! client certificate, one from another CA, plaintext, a stalled handshake) is logged
//! with the peer's address; workers connect through tonic's client TLS.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::guard::Guarded;

use crate::error::IoContext;
use crate::{Error, Result};

/// A handshake that takes longer is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn tls(msg: String) -> Error {
    Error::Tls(msg)
}

/// Selects rustls's crypto provider for this process (ring, as tonic's TLS is built
/// with), once; two providers are linked, so rustls cannot pick one by itself.
pub fn crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A PEM file's bytes (refused when it holds no PEM block).
pub fn read_pem(path: &str, what: &str) -> Result<Vec<u8>> {
    let b = std::fs::read(path).doing(|| format!("reading the {what} {path}"))?;
    if !String::from_utf8_lossy(&b).contains("-----BEGIN") {
        return Err(tls(format!(
            "{path}: the {what} is not PEM (no -----BEGIN line)"
        )));
    }
    Ok(b)
}

fn certs(path: &str, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read_pem(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls(format!("{path}: the {what} does not parse: {e}")))?;
    if certs.is_empty() {
        return Err(tls(format!("{path}: the {what} holds no certificate")));
    }
    Ok(certs)
}

/// Server TLS from PEM files: the certificate chain, its key, and for mutual TLS the CA
/// whose certificates clients must present. HTTP/2 only (ALPN h2).
pub fn server_config(
    cert: &str,
    key: &str,
    client_ca: Option<&str>,
) -> Result<Arc<rustls::ServerConfig>> {
    crypto_provider();
    let chain = certs(cert, "TLS certificate")?;
    let key_der = PrivateKeyDer::from_pem_slice(&read_pem(key, "TLS key")?)
        .map_err(|e| tls(format!("{key}: the TLS key does not parse: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls(format!("TLS protocol versions: {e}")))?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs(ca, "client CA")? {
                roots
                    .add(c)
                    .map_err(|e| tls(format!("{ca}: the client CA is not usable: {e}")))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| tls(format!("{ca}: the client CA is not usable: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(chain, key_der)
        .map_err(|e| tls(format!("{cert} with {key}: {e}")))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// The TLS connections accepted on `incoming`: handshakes run concurrently, each bounded
/// by a deadline; a failed one is logged (peer and reason) and never reaches the server.
pub fn accept(
    incoming: impl futures::Stream<Item = std::io::Result<Guarded>> + Send + 'static,
    cfg: Arc<rustls::ServerConfig>,
) -> impl futures::Stream<Item = std::io::Result<TlsStream<Guarded>>> + Send + 'static {
    let acceptor = TlsAcceptor::from(cfg);
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<TlsStream<Guarded>>>(64);
    tokio::spawn(async move {
        let mut incoming = Box::pin(incoming);
        while let Some(conn) = incoming.next().await {
            let tcp = match conn {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    continue;
                }
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let peer = tcp.peer();
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(peer = %peer, error = %e, "refused a TLS connection")
                    }
                    Err(_) => {
                        tracing::warn!(peer = %peer, "refused a TLS connection: no handshake within 10 s")
                    }
                }
            });
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
}
