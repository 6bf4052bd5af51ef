//! The tonic service of a [`Job`]: each call converts its request to the job's domain
//! types through the wire layer ([`lightrnn_core::wire`]), runs the job's part of the
//! protocol, and converts the answer back; a refusal becomes its status code here, in
//! [`status`], the one place. All the protocol lives in [`crate::job`].

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use lightrnn_core::protocol::PrepareAsk;
use lightrnn_core::wire;
use lightrnn_proto::Coordinator;
use lightrnn_proto::v1::{
    AllocationChunk, AllocationRequest, CommitReply, CommitRequest, EpochDoneReply,
    EpochDoneRequest, FailReply, FailRequest, FinishReply, FinishRequest, HeartbeatReply,
    HeartbeatRequest, JoinReply, JoinRequest, LeaseReply, LeaseRequest, PrepareReply,
    PrepareRequest, PushReply, SparseChunk, TableChunk,
};

use crate::job::{Job, JobError};

/// The tonic service over a [`Job`].
#[derive(Clone)]
pub struct Service {
    job: Arc<Job>,
}

impl Service {
    pub fn new(job: Arc<Job>) -> Self {
        Self { job }
    }
}

/// The status a refusal of the job travels as: the code the workers act on (a stale
/// generation rejoins, a group without room is asked again) and the job's sentence.
pub fn status(e: JobError) -> Status {
    let message = e.to_string();
    match e {
        JobError::Stale(_) | JobError::OutOfTurn(_) => Status::failed_precondition(message),
        JobError::NotMember(_) => Status::permission_denied(message),
        JobError::Ended(_) => Status::aborted(message),
        JobError::BadRequest(_) => Status::invalid_argument(message),
        JobError::Duplicate(_) => Status::already_exists(message),
        JobError::NoRoom(_) => Status::resource_exhausted(message),
        JobError::Internal(_) => Status::internal(message),
        JobError::ShuttingDown => Status::unavailable(message),
        // The transport's own status, as it came.
        JobError::Received { source, .. } => match source.downcast::<Status>() {
            Ok(s) => *s,
            Err(_) => Status::unknown(message),
        },
    }
}

/// A broken stream of a call, for the job.
fn received(s: Status) -> JobError {
    JobError::Received {
        message: s.message().to_string(),
        source: Box::new(s),
    }
}

/// A request stream's messages as the job's domain chunks.
fn chunks<M, T: From<M>>(s: Streaming<M>) -> impl Stream<Item = Result<T, JobError>> + Unpin {
    s.map(|m| m.map(T::from).map_err(received))
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<AllocationChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for Service {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        let joined = self.job.join(req.into_inner().into()).await;
        joined.map(|j| Response::new(j.into())).map_err(status)
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let answer = self.job.heartbeat(req.into_inner().into());
        answer.map(|a| Response::new(a.into())).map_err(status)
    }

    async fn lease(&self, req: Request<LeaseRequest>) -> Result<Response<LeaseReply>, Status> {
        let leased = self.job.lease(req.into_inner().into());
        leased.map(|l| Response::new(l.into())).map_err(status)
    }

    async fn epoch_done(
        &self,
        req: Request<EpochDoneRequest>,
    ) -> Result<Response<EpochDoneReply>, Status> {
        let tokens = self.job.epoch_done(req.into_inner().into()).await;
        tokens
            .map(|tokens| Response::new(EpochDoneReply { tokens }))
            .map_err(status)
    }

    async fn push_loss_tables(
        &self,
        req: Request<Streaming<TableChunk>>,
    ) -> Result<Response<PushReply>, Status> {
        let pushed = self.job.push_loss_tables(chunks(req.into_inner())).await;
        pushed.map(|()| Response::new(PushReply {})).map_err(status)
    }

    async fn push_sparse_tables(
        &self,
        req: Request<Streaming<SparseChunk>>,
    ) -> Result<Response<PushReply>, Status> {
        let pushed = self.job.push_sparse_tables(chunks(req.into_inner())).await;
        pushed.map(|()| Response::new(PushReply {})).map_err(status)
    }

    type FetchAllocationStream = ChunkStream;

    async fn fetch_allocation(
        &self,
        req: Request<AllocationRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let solved = self
            .job
            .fetch_allocation(req.into_inner().into())
            .await
            .map_err(status)?;
        let chunks = wire::allocation_chunks(&solved.cells, &solved.counts, &solved.report);
        Ok(Response::new(Box::pin(futures::stream::iter(
            chunks.into_iter().map(Ok),
        ))))
    }

    async fn commit(&self, req: Request<CommitRequest>) -> Result<Response<CommitReply>, Status> {
        let committed = self.job.commit(req.into_inner().into()).await;
        committed
            .map(|()| Response::new(CommitReply {}))
            .map_err(status)
    }

    async fn finish(&self, req: Request<FinishRequest>) -> Result<Response<FinishReply>, Status> {
        let finished = self.job.finish(req.into_inner().into());
        finished
            .map(|()| Response::new(FinishReply {}))
            .map_err(status)
    }

    async fn fail(&self, req: Request<FailRequest>) -> Result<Response<FailReply>, Status> {
        let failed = self.job.fail(req.into_inner().into());
        failed.map(|()| Response::new(FailReply {})).map_err(status)
    }

    async fn prepare(
        &self,
        req: Request<PrepareRequest>,
    ) -> Result<Response<PrepareReply>, Status> {
        let ask = PrepareAsk::try_from(req.into_inner())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let answer = self.job.prepare(ask).await.map_err(status)?;
        Ok(Response::new((&answer).into()))
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    /// Each refusal travels with the code the workers act on and the job's sentence as
    /// it is; a broken stream's own status comes back unchanged.
    #[test]
    fn refusals_travel_as_their_codes_with_their_sentences() {
        let cases = [
            (JobError::Stale("stale".into()), Code::FailedPrecondition),
            (JobError::OutOfTurn("turn".into()), Code::FailedPrecondition),
            (JobError::NotMember("who".into()), Code::PermissionDenied),
            (JobError::Ended("over".into()), Code::Aborted),
            (JobError::BadRequest("bad".into()), Code::InvalidArgument),
            (JobError::Duplicate("twice".into()), Code::AlreadyExists),
            (JobError::NoRoom("full".into()), Code::ResourceExhausted),
            (JobError::Internal("lost".into()), Code::Internal),
        ];
        for (e, code) in cases {
            let message = e.to_string();
            let s = status(e);
            assert_eq!((s.code(), s.message()), (code, message.as_str()));
        }
        let s = status(JobError::ShuttingDown);
        assert_eq!(
            (s.code(), s.message()),
            (Code::Unavailable, "the coordinator is shutting down")
        );
        let s = status(received(Status::cancelled("the client went away")));
        assert_eq!(
            (s.code(), s.message()),
            (Code::Cancelled, "the client went away")
        );
    }
}
