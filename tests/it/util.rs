//! Shared helpers: raw and sharded clients of in-process shards
//! (`ps_server::local::LocalShards`).

use ps_server::local::LocalShards;

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
pub async fn sharded_client(shards: &LocalShards, worker: u64) -> ps_worker::client::ShardedClient {
    ps_worker::client::ShardedClient::connect(
        &shards.addrs,
        worker,
        ps_worker::client::ClientOptions::default(),
    )
    .await
    .expect("connect sharded client")
}

/// A temporary folder, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!("ps-it-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A small 784-8-10 MLP with fixed values, as a trained model would be saved.
pub fn small_mlp() -> ps_model::SavedModel {
    use ps_model::{DenseTensor, ModelKind, SavedModel};
    let tensor = |name: &str, shape: Vec<usize>| {
        let values = (0..shape.iter().product::<usize>()).map(|i| i as f32 * 0.01 - 0.1).collect();
        DenseTensor { name: name.into(), shape, values }
    };
    SavedModel::new(
        ModelKind::Mlp { layers: vec![784, 8, 10] },
        vec![
            tensor("fc1.weight", vec![784, 8]),
            tensor("fc1.bias", vec![8]),
            tensor("fc2.weight", vec![8, 10]),
            tensor("fc2.bias", vec![10]),
        ],
        Vec::new(),
    )
}

/// Connections the kernel holds to the Unix socket at `path` (the shard's
/// accepted ones; Linux lists them in /proc/net/unix with the path).
pub fn connected_to(path: &std::path::Path) -> usize {
    const SS_CONNECTED: &str = "03";
    let table = std::fs::read_to_string("/proc/net/unix").expect("/proc/net/unix");
    let path = path.to_str().expect("a UTF-8 temp path");
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() == 8 && f[5] == SS_CONNECTED && f[7] == path)
        .count()
}
