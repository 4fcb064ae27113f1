//! The models served by one process, and the two listeners (gRPC and HTTP)
//! in front of them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use ps_common::transport::{self, TransportConfig};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::grpc::{PredictionService, pb::prediction_server::PredictionServer};
use crate::metrics::ServeMetrics;
use crate::slot::ModelSlot;

/// Every model name served here, and the process's metrics.
#[derive(Default)]
pub struct Models {
    slots: BTreeMap<String, Arc<ModelSlot>>,
    pub metrics: ServeMetrics,
}

impl Models {
    pub fn new(slots: impl IntoIterator<Item = Arc<ModelSlot>>) -> Models {
        Models {
            slots: slots.into_iter().map(|s| (s.name.clone(), s)).collect(),
            metrics: ServeMetrics::default(),
        }
    }

    /// The slot of `name`, or [`Error::UnknownModel`].
    pub fn get(&self, name: &str) -> Result<&Arc<ModelSlot>> {
        self.slots.get(name).ok_or_else(|| Error::UnknownModel(name.to_string()))
    }

    pub fn slots(&self) -> impl Iterator<Item = &Arc<ModelSlot>> {
        self.slots.values()
    }

    /// Every model has a version loaded.
    pub fn ready(&self) -> bool {
        self.slots.values().all(|s| s.is_ready())
    }
}

/// Limits of one request, the same on both interfaces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body or message, in bytes.
    pub max_request_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_request_bytes: 16 << 20 }
    }
}

/// The listeners of a running server.
pub struct Running {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops both listeners (connections in progress are dropped).
    pub fn abort(&self) {
        self.tasks.iter().for_each(JoinHandle::abort);
    }

    /// Waits until a listener stops (it does not unless it fails).
    pub async fn wait(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Binds `grpc` and `http` (port 0: any free port) and serves `models` on
/// both.
pub async fn start(
    models: Arc<Models>,
    grpc: SocketAddr,
    http: SocketAddr,
    limits: Limits,
) -> Result<Running> {
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr).await.map_err(|source| Error::Io { what: format!("binding {addr}"), source })
    };
    let (grpc_listener, http_listener) = (bind(grpc).await?, bind(http).await?);
    let local = |l: &TcpListener| {
        l.local_addr().map_err(|source| Error::Io { what: "reading the bound address".into(), source })
    };
    let (grpc, http) = (local(&grpc_listener)?, local(&http_listener)?);

    let config = TransportConfig::default();
    let rpc = models.metrics.rpc.clone();
    let service = PredictionServer::new(PredictionService(Arc::clone(&models)))
        .max_decoding_message_size(limits.max_request_bytes)
        .max_encoding_message_size(limits.max_request_bytes.max(64 << 20));
    let incoming = transport::incoming(&config, grpc_listener);
    let grpc_task = tokio::spawn(async move {
        if let Err(e) =
            transport::server(&config, &rpc).add_service(service).serve_with_incoming(incoming).await
        {
            tracing::error!("gRPC listener stopped: {e}");
        }
    });
    let router = crate::http::router(models, limits.max_request_bytes);
    let http_task = tokio::spawn(async move {
        if let Err(e) = axum::serve(http_listener, router).await {
            tracing::error!("HTTP listener stopped: {e}");
        }
    });
    Ok(Running { grpc, http, tasks: vec![grpc_task, http_task] })
}
