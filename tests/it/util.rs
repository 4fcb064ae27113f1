//! Shared helpers: in-process shards on loopback.

use std::net::SocketAddr;

use ps_server::ServerConfig;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A set of in-process shards; dropped (or `stop`ped) shuts them down.
pub struct Shards {
    pub addrs: Vec<String>,
    stops: Vec<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<ps_server::Result<()>>>,
}

impl Shards {
    /// Starts `n` shards on 127.0.0.1:0 with default settings.
    pub async fn start(n: u32) -> Shards {
        Self::start_with(n, |_| {}).await
    }

    /// Starts `n` shards, letting `tweak` adjust each config.
    pub async fn start_with(n: u32, tweak: impl Fn(&mut ServerConfig)) -> Shards {
        let mut shards = Shards { addrs: Vec::new(), stops: Vec::new(), tasks: Vec::new() };
        for shard in 0..n {
            let mut config = ServerConfig { shard, num_shards: n, ..ServerConfig::default() };
            tweak(&mut config);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
            let addr: SocketAddr = listener.local_addr().expect("local addr");
            let (tx, rx) = oneshot::channel();
            shards.tasks.push(tokio::spawn(ps_server::serve(config, listener, async {
                let _ = rx.await;
            })));
            shards.addrs.push(addr.to_string());
            shards.stops.push(tx);
        }
        shards
    }

    /// Stops every shard and waits for it; panics if one failed.
    pub async fn stop(mut self) {
        for tx in self.stops.drain(..) {
            let _ = tx.send(());
        }
        for t in self.tasks.drain(..) {
            t.await.expect("shard task panicked").expect("shard failed");
        }
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The generated gRPC client, for requests the sharded client would never send.
pub type RawClient =
    ps_common::wire::pb::parameter_server_client::ParameterServerClient<tonic::transport::Channel>;

/// Connects a raw client to one shard, accepting messages of any size (the
/// server's limits are what the tests probe).
pub async fn raw_client(addr: &str) -> RawClient {
    RawClient::connect(format!("http://{addr}"))
        .await
        .expect("connect to shard")
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
}

/// A sharded client of worker `worker` over `shards`, with default options.
pub async fn sharded_client(shards: &Shards, worker: u64) -> ps_worker::client::ShardedClient {
    ps_worker::client::ShardedClient::connect(
        &shards.addrs,
        worker,
        ps_worker::client::ClientOptions::default(),
    )
    .await
    .expect("connect sharded client")
}
