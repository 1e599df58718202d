//! `ratelimit-server`: Envoy's rate limit service over token buckets.
//!
//! ```sh
//! ratelimit-server --config ratelimit.yaml [--grpc-listen 127.0.0.1:8081] \
//!     [--http-listen 127.0.0.1:8080] [--redis-url redis://127.0.0.1:6379]
//! ```
//!
//! `--help` lists every option; docs/server.md explains them.

use std::process::ExitCode;

use clap::Parser;
use ratelimit_server::run::{RunningServer, ServerArgs, termination};

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = ServerArgs::parse();
    let server = match RunningServer::start(&args).await {
        Ok(server) => server,
        Err(err) => {
            tracing::error!(error = %err, "cannot start");
            eprintln!("error: {err}");
            return ExitCode::FAILURE;
        }
    };
    termination().await;
    tracing::info!("shutting down");
    if server.shutdown().await {
        tracing::info!("stopped");
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
