//! Bearer-token authentication of the workers and clients to the coordinator: the
//! client side adds `authorization: Bearer TOKEN` to every call, the server side refuses
//! calls without it (UNAUTHENTICATED) and logs them.

use std::sync::Arc;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::v1::coordinator_client::CoordinatorClient;

/// A coordinator client that presents a token (or none).
pub type Client = CoordinatorClient<InterceptedService<Channel, BearerToken>>;

/// Adds the token to every call.
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    /// `None`: present no token. Fails on a token that is not printable ASCII.
    pub fn new(token: Option<&str>) -> Result<Self, String> {
        match token {
            None => Ok(Self(None)),
            Some(t) => format!("Bearer {t}")
                .parse()
                .map(|v| Self(Some(v)))
                .map_err(|_| "the token must be printable ASCII".to_string()),
        }
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// Refuses calls that do not present the token (when one is set).
#[derive(Clone, Default)]
pub struct RequireToken(Option<Arc<[u8]>>);

impl RequireToken {
    pub fn new(token: Option<&str>) -> Self {
        Self(token.map(|t| Arc::from(format!("Bearer {t}").into_bytes())))
    }
}

/// Equal bytes, in time that depends only on the lengths.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Interceptor for RequireToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(want) = &self.0 else {
            return Ok(req);
        };
        let got = req.metadata().get("authorization").map(|v| v.as_bytes());
        if got.is_some_and(|g| same(g, want)) {
            return Ok(req);
        }
        let peer = req
            .remote_addr()
            .map_or_else(|| "an unknown peer".to_string(), |a| a.to_string());
        let why = if got.is_some() {
            "a wrong token"
        } else {
            "no token"
        };
        tracing::warn!(peer = %peer, "refused a call with {why}");
        Err(Status::unauthenticated(format!(
            "this coordinator requires its bearer token ({why} presented)"
        )))
    }
}
