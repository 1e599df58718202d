//! The gRPC side: `envoy.service.ratelimit.v3.RateLimitService` and the standard
//! `grpc.health.v1.Health` service.

use std::net::SocketAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService as RateLimitServiceApi, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use tonic::{Request, Response, Status};

use crate::service::RateLimitService;

/// The largest request message accepted, in bytes (the request bounds are checked after
/// decoding; this bounds the decoding itself).
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// [`RateLimitService`] as the Envoy gRPC service.
#[derive(Debug, Clone)]
pub struct GrpcRateLimit {
    service: Arc<RateLimitService>,
}

impl GrpcRateLimit {
    /// Serves `service` over gRPC.
    pub fn new(service: Arc<RateLimitService>) -> Self {
        Self { service }
    }

    /// The tonic service, with the message size bound.
    pub fn into_server(self) -> RateLimitServiceServer<Self> {
        RateLimitServiceServer::new(self).max_decoding_message_size(MAX_MESSAGE_BYTES)
    }
}

#[tonic::async_trait]
impl RateLimitServiceApi for GrpcRateLimit {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        self.service
            .should_rate_limit(request.get_ref())
            .await
            .map(Response::new)
    }
}

/// Serves the rate-limit and health services on `listener` until `shutdown` completes.
///
/// # Errors
/// The transport's error.
pub async fn serve(
    service: Arc<RateLimitService>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<RateLimitServiceServer<GrpcRateLimit>>()
        .await;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    // On shutdown, health watchers (Envoy's gRPC health checks that stream) hear NOT_SERVING
    // before the connections close.
    let stopping = async move {
        shutdown.await;
        reporter
            .set_not_serving::<RateLimitServiceServer<GrpcRateLimit>>()
            .await;
        reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
    };
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(GrpcRateLimit::new(service).into_server())
        .serve_with_incoming_shutdown(incoming, stopping)
        .await
}

/// The address a listener is bound to, for logs.
pub fn local_addr(listener: &tokio::net::TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}
