//! The tonic service of a [`Job`]: each call unwraps its request, runs the job's part of
//! the protocol, and wraps the reply. All the protocol lives in [`crate::job`].

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Request, Response, Status, Streaming};

use lightrnn_proto::Coordinator;
use lightrnn_proto::v1::{
    AllocationChunk, AllocationRequest, CommitReply, CommitRequest, EpochDoneReply,
    EpochDoneRequest, FailReply, FailRequest, FinishReply, FinishRequest, HeartbeatReply,
    HeartbeatRequest, JoinReply, JoinRequest, LeaseReply, LeaseRequest, PushReply, SparseChunk,
    TableChunk,
};

use crate::job::Job;

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

type ChunkStream = Pin<Box<dyn Stream<Item = Result<AllocationChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for Service {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        self.job.join(req.into_inner()).await.map(Response::new)
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        self.job.heartbeat(req.into_inner()).map(Response::new)
    }

    async fn lease(&self, req: Request<LeaseRequest>) -> Result<Response<LeaseReply>, Status> {
        self.job.lease(req.into_inner()).map(Response::new)
    }

    async fn epoch_done(
        &self,
        req: Request<EpochDoneRequest>,
    ) -> Result<Response<EpochDoneReply>, Status> {
        let tokens = self.job.epoch_done(req.into_inner()).await?;
        Ok(Response::new(EpochDoneReply { tokens }))
    }

    async fn push_loss_tables(
        &self,
        req: Request<Streaming<TableChunk>>,
    ) -> Result<Response<PushReply>, Status> {
        self.job.push_loss_tables(req.into_inner()).await?;
        Ok(Response::new(PushReply {}))
    }

    async fn push_sparse_tables(
        &self,
        req: Request<Streaming<SparseChunk>>,
    ) -> Result<Response<PushReply>, Status> {
        self.job.push_sparse_tables(req.into_inner()).await?;
        Ok(Response::new(PushReply {}))
    }

    type FetchAllocationStream = ChunkStream;

    async fn fetch_allocation(
        &self,
        req: Request<AllocationRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let chunks = self.job.fetch_allocation(req.into_inner()).await?;
        Ok(Response::new(Box::pin(futures::stream::iter(
            chunks.into_iter().map(Ok),
        ))))
    }

    async fn commit(&self, req: Request<CommitRequest>) -> Result<Response<CommitReply>, Status> {
        self.job.commit(req.into_inner()).await?;
        Ok(Response::new(CommitReply {}))
    }

    async fn finish(&self, req: Request<FinishRequest>) -> Result<Response<FinishReply>, Status> {
        self.job.finish(req.into_inner())?;
        Ok(Response::new(FinishReply {}))
    }

    async fn fail(&self, req: Request<FailRequest>) -> Result<Response<FailReply>, Status> {
        self.job.fail(req.into_inner())?;
        Ok(Response::new(FailReply {}))
    }
}
