//! Bearer-token authentication of the workers and clients to the coordinator: the
//! client side adds `authorization: Bearer TOKEN` to every call, the server side refuses
//! calls without it (UNAUTHENTICATED) and logs them. Once a worker has joined a run, its
//! calls also name the run (`lightrnn-run`): a coordinator serving another run refuses
//! them (FAILED_PRECONDITION) and counts them for nothing.

use std::sync::{Arc, OnceLock};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::v1::coordinator_client::CoordinatorClient;

/// A coordinator client that presents a token (or none).
pub type Client = CoordinatorClient<InterceptedService<Channel, BearerToken>>;

/// The header that names the run a worker's call belongs to.
pub const RUN_HEADER: &str = "lightrnn-run";

/// Adds the token to every call, and the run once the worker has joined one (shared by
/// every clone of the client).
#[derive(Clone, Default)]
pub struct BearerToken {
    token: Option<MetadataValue<Ascii>>,
    run: Arc<OnceLock<MetadataValue<Ascii>>>,
}

impl BearerToken {
    /// `None`: present no token. Fails on a token that is not printable ASCII.
    pub fn new(token: Option<&str>) -> Result<Self, String> {
        let token = match token {
            None => None,
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| "the token must be printable ASCII".to_string())?,
            ),
        };
        Ok(Self {
            token,
            run: Arc::default(),
        })
    }

    /// From now on every call names `run`; a worker belongs to one run for its life, so
    /// naming another is refused.
    pub fn set_run(&self, run: &str) -> Result<(), String> {
        let v: MetadataValue<Ascii> = run
            .parse()
            .map_err(|_| format!("run id {run:?} is not printable ASCII"))?;
        let held = self.run.get_or_init(|| v.clone());
        if *held != v {
            return Err(format!(
                "this worker belongs to run {}, the coordinator serves run {run}",
                held.to_str().unwrap_or("?")
            ));
        }
        Ok(())
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.token {
            req.metadata_mut().insert("authorization", v.clone());
        }
        if let Some(v) = self.run.get() {
            req.metadata_mut().insert(RUN_HEADER, v.clone());
        }
        Ok(req)
    }
}

/// Refuses calls that do not present the token (when one is set), and calls that name
/// another run than the one served.
#[derive(Clone, Default)]
pub struct RequireToken {
    token: Option<Arc<[u8]>>,
    run: Option<Arc<str>>,
}

impl RequireToken {
    pub fn new(token: Option<&str>) -> Self {
        Self {
            token: token.map(|t| Arc::from(format!("Bearer {t}").into_bytes())),
            run: None,
        }
    }

    /// Refuse calls that name a run other than `run` (calls that name none, a worker's
    /// first join, pass).
    pub fn for_run(mut self, run: &str) -> Self {
        self.run = Some(Arc::from(run));
        self
    }

    /// A call of another run, refused and logged.
    fn other_run(&self, req: &Request<()>) -> Option<Status> {
        let want = self.run.as_deref()?;
        let got = req.metadata().get(RUN_HEADER)?;
        if got.as_bytes() == want.as_bytes() {
            return None;
        }
        let got = String::from_utf8_lossy(got.as_bytes());
        tracing::warn!(peer = %peer_of(req), run = %got, serving = %want, "refused a call of another run");
        Some(Status::failed_precondition(format!(
            "this coordinator serves run {want}, not run {got}: the caller is a worker of another job or of an earlier run in this directory"
        )))
    }
}

fn peer_of(req: &Request<()>) -> String {
    req.remote_addr()
        .map_or_else(|| "an unknown peer".to_string(), |a| a.to_string())
}

/// Equal bytes, in time that depends only on the lengths.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Interceptor for RequireToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(want) = &self.token {
            let got = req.metadata().get("authorization").map(|v| v.as_bytes());
            if !got.is_some_and(|g| same(g, want)) {
                let why = if got.is_some() {
                    "a wrong token"
                } else {
                    "no token"
                };
                tracing::warn!(peer = %peer_of(&req), "refused a call with {why}");
                return Err(Status::unauthenticated(format!(
                    "this coordinator requires its bearer token ({why} presented)"
                )));
            }
        }
        match self.other_run(&req) {
            Some(s) => Err(s),
            None => Ok(req),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(auth: &mut BearerToken) -> Request<()> {
        auth.call(Request::new(())).unwrap()
    }

    #[test]
    fn a_joined_worker_names_its_run_and_another_run_s_coordinator_refuses_it() {
        let mut worker = BearerToken::new(Some("t")).unwrap();
        let mut served = RequireToken::new(Some("t")).for_run("run-a");
        // Before it joins, a worker names no run: its join passes.
        let first = sent(&mut worker);
        assert!(first.metadata().get(RUN_HEADER).is_none());
        assert!(served.call(first).is_ok());
        worker.set_run("run-a").unwrap();
        // Every clone of the client names it (the heartbeat task's too).
        let mut clone = worker.clone();
        assert_eq!(
            sent(&mut clone).metadata().get(RUN_HEADER).unwrap(),
            "run-a"
        );
        assert!(served.call(sent(&mut worker)).is_ok());
        let mut other = RequireToken::new(Some("t")).for_run("run-b");
        let e = other.call(sent(&mut worker)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(
            e.message().contains("serves run run-b, not run run-a"),
            "{e:?}"
        );
        // A worker belongs to one run.
        assert!(
            worker
                .set_run("run-b")
                .unwrap_err()
                .contains("belongs to run run-a")
        );
        assert!(worker.set_run("run-a").is_ok());
        // The token is checked first.
        let mut stranger = BearerToken::new(Some("x")).unwrap();
        stranger.set_run("run-b").unwrap();
        let e = served.call(sent(&mut stranger)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
    }
}
