//! Online mode: serve the weights of a live training cluster.
//!
//! Every refresh reads the whole model from the shards with read-only calls
//! (dense chunks at clock 0, which never waits on the consistency gate, and
//! page-by-page scans of the sparse tables), so serving neither joins the
//! job nor creates a row. The reader is not a member: it holds no clock, and
//! training does not wait for it. What is served is as old as the last
//! refresh; [`Freshness`] says how old, and how far the slowest worker had
//! come.
//!
//! The architecture comes from a template (a registry version or a model
//! file of the same job); an MLP whose tables are `fc{l}.weight` and
//! `fc{l}.bias` needs none.

use std::time::{Duration, Instant};

use ps_common::spec::{Layout, TableSpec};
use ps_common::transport::TransportConfig;
use ps_model::{ModelKind, SavedModel, SparseTable};
use ps_worker::client::{ClientOptions, DenseSet, ShardedClient};

use crate::error::{Error, Result};
use crate::slot::Freshness;

/// The worker id of the reader's requests; it never joins, so it is only a
/// label in the shards' logs.
const READER_ID: u64 = u64::MAX - 1;

/// A read-only view of a training cluster's model.
pub struct Online {
    addrs: Vec<String>,
    client: ShardedClient,
    kind: ModelKind,
    dense: DenseSet,
    sparse: Vec<TableSpec>,
}

impl Online {
    /// Connects to the shards (`addrs[i]` is shard `i`) and matches the
    /// tables they hold against `template` (or infers an MLP).
    pub async fn connect(addrs: &[String], template: Option<ModelKind>) -> Result<Online> {
        Online::connect_with(
            addrs,
            template,
            &TransportConfig::default(),
            ps_common::auth::Credential::none(),
        )
        .await
    }

    /// [`Online::connect`] over `transport` (TLS as `reader`), sending
    /// `credential` (a reader's) with every call.
    pub async fn connect_with(
        addrs: &[String],
        template: Option<ModelKind>,
        transport: &TransportConfig,
        credential: ps_common::auth::Credential,
    ) -> Result<Online> {
        let opts = ClientOptions {
            connect_within: Duration::from_secs(10),
            transport: transport.clone(),
            credential,
            ..ClientOptions::default()
        };
        let client = ShardedClient::connect(addrs, READER_ID, opts).await?;
        let specs = client.list_tables().await?;
        let kind = match template {
            Some(k) => k,
            None => infer_mlp(&specs)?,
        };
        let find = |name: &str| {
            specs.iter().find(|s| s.name == name).ok_or_else(|| {
                Error::bad(format!("the cluster holds no table `{name}` (the template's {:?})", kind.name()))
            })
        };
        let shapes = kind.dense_tensors()?;
        let mut dense_specs = Vec::with_capacity(shapes.len());
        for (name, shape) in &shapes {
            let spec = find(name)?;
            match &spec.layout {
                Layout::Dense { shape: s, .. } if s.iter().map(|&d| d as usize).eq(shape.iter().copied()) => {
                }
                other => {
                    return Err(Error::bad(format!(
                        "table `{name}` is {other:?}, the template wants shape {shape:?}"
                    )));
                }
            }
            dense_specs.push(spec.clone());
        }
        let mut sparse = Vec::new();
        for (name, dim) in kind.sparse_tables() {
            let spec = find(name)?;
            if !matches!(spec.layout, Layout::Sparse { dim: d } if d as usize == dim) {
                return Err(Error::bad(format!(
                    "table `{name}` is {:?}, the template wants rows of {dim}",
                    spec.layout
                )));
            }
            sparse.push(spec.clone());
        }
        let dense = DenseSet::new(&dense_specs, client.num_shards())?;
        Ok(Online { addrs: addrs.to_vec(), client, kind, dense, sparse })
    }

    /// The shard addresses, for status reports.
    pub fn describe(&self) -> String {
        self.addrs.join(",")
    }

    /// Reads the whole model now.
    pub async fn read(&self) -> Result<(SavedModel, Freshness)> {
        let read_at = Instant::now();
        let stats = self.client.stats().await?;
        let min_clock = stats
            .iter()
            .flat_map(|s| s.clocks.iter().filter(|c| c.alive).map(|c| c.clock))
            .min()
            .unwrap_or(0);
        let mut flat = vec![0.0f32; self.dense.len()];
        self.client.pull_dense(&self.dense, 0, &mut flat).await?;
        let mut model = SavedModel::from_flat(self.kind.clone(), &flat)?;
        for spec in &self.sparse {
            let Layout::Sparse { dim } = spec.layout else { unreachable!("checked at connect") };
            let (keys, values) = self.client.scan_sparse(&spec.name, dim as usize).await?;
            model.sparse.push(SparseTable {
                name: spec.name.clone(),
                dim: dim as usize,
                keys,
                values,
                init: Some(spec.init),
            });
        }
        Ok((model, Freshness { read_at, min_clock }))
    }
}

/// An MLP from tables `fc1.weight` `[in, h1]`, `fc1.bias`, `fc2.weight`
/// `[h1, h2]`, ...: the only architecture the tables alone describe.
fn infer_mlp(specs: &[TableSpec]) -> Result<ModelKind> {
    let shape = |name: String| {
        specs.iter().find(|s| s.name == name).and_then(|s| match &s.layout {
            Layout::Dense { shape, .. } if shape.len() == 2 => Some((shape[0] as usize, shape[1] as usize)),
            _ => None,
        })
    };
    let mut layers = Vec::new();
    for l in 1.. {
        let Some((n_in, n_out)) = shape(format!("fc{l}.weight")) else { break };
        if layers.last().is_some_and(|&last| last != n_in) {
            return Err(Error::bad(format!(
                "fc{l}.weight takes {n_in} inputs, fc{}.weight gives {}",
                l - 1,
                layers[layers.len() - 1]
            )));
        }
        if layers.is_empty() {
            layers.push(n_in);
        }
        layers.push(n_out);
    }
    if layers.len() < 2 {
        return Err(Error::bad(
            "the cluster's tables are not an MLP's (fc1.weight, ...): give a template (--template)"
                .to_string(),
        ));
    }
    Ok(ModelKind::Mlp { layers })
}
