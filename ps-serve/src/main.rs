//! `ps-serve`: serve registry versions of models (or a live cluster's
//! weights) over gRPC and HTTP. See docs/SERVING.md.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use ps_model::{ModelKind, SavedModel};
use ps_registry::Registry;
use ps_serve::batch::BatchConfig;
use ps_serve::cli::Args;
use ps_serve::online::Online;
use ps_serve::server::{self, Limits, Models};
use ps_serve::slot::{ModelSlot, Source};

fn main() -> std::process::ExitCode {
    ps_common::error::exit_code(run())
}

#[tokio::main]
async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    if args.max_batch == 0
        || args.max_request_rows == 0
        || args.max_request_mib == 0
        || args.max_inflight_mib == 0
        || args.max_connections == 0
        || args.max_connections_per_host == 0
    {
        bail!(
            "--max-batch, --max-request-rows, --max-request-mib, --max-inflight-mib, --max-connections and \
             --max-connections-per-host must be positive"
        );
    }
    let transport = args.server_transport()?;
    let batching = (!args.no_batching).then_some(BatchConfig {
        max_batch: args.max_batch,
        max_delay: Duration::from_micros(args.batch_delay_us),
        queue: args.queue,
    });
    let (url, root) = ps_registry::location(args.registry.clone(), Some(args.registry_root.clone()));
    let open = || async {
        let keys = ps_registry::keys_choice(args.registry_keys.as_deref(), args.no_seal);
        Registry::open_with(&url, &root, keys)
            .await
            .map(Arc::new)
            .with_context(|| format!("opening the registry {url}"))
    };

    let mut slots = Vec::new();
    let refresh;
    if args.online.is_empty() {
        refresh = Duration::from_millis(args.refresh_ms.unwrap_or(1000));
        let registry = open().await?;
        for spec in &args.models {
            let (name, source) = Source::parse(spec)?;
            slots.push(Arc::new(ModelSlot::from_registry(
                name,
                source,
                Arc::clone(&registry),
                batching,
                args.max_request_rows,
            )));
        }
    } else {
        refresh = Duration::from_millis(args.refresh_ms.unwrap_or(5000));
        let [name] = args.models.as_slice() else {
            bail!("online mode serves one model: give one --model NAME")
        };
        let template = match &args.template {
            None => None,
            Some(t) if Path::new(t).exists() => Some(read_template(Path::new(t))?),
            Some(t) => {
                let (model, source) = Source::parse(t)?;
                let registry = open().await?;
                let version = match source {
                    Source::Version(v) => v,
                    Source::Label(l) => registry.label(&model, &l).await?,
                    Source::Latest | Source::Online => registry.latest(&model).await?.version,
                };
                Some(registry.load(&registry.version(&model, version).await?)?.model)
            }
        };
        let credential = ps_common::auth::Credential::from_optional_file(args.token_file.as_deref())?;
        let online = Online::connect_with(&args.online, template, &args.online_transport()?, credential)
            .await
            .with_context(|| format!("reading the cluster {}", args.online.join(",")))?;
        slots.push(Arc::new(ModelSlot::from_cluster(name.clone(), online, batching, args.max_request_rows)));
    }

    for slot in &slots {
        match slot.refresh().await {
            Err(ps_serve::Error::Registry(e @ ps_registry::Error::NoLabel { .. })) => bail!(
                "{e}: point it at a version first (ps-cluster models promote {}:N --to LABEL), or serve NAME:N",
                slot.name
            ),
            r => r.with_context(|| format!("loading model `{}`", slot.name))?,
        };
        let s = slot.status()?;
        tracing::info!(model = %slot.name, version = s.version, source = %s.source, kind = s.kind, "loaded");
        slot.spawn_watch(refresh);
    }
    let models = Arc::new(Models::new(slots));
    let limits = Limits {
        max_request_bytes: args.max_request_mib << 20,
        max_inflight_bytes: args.max_inflight_mib << 20,
        max_connections: args.max_connections,
        max_connections_per_host: args.max_connections_per_host,
        ..Limits::default()
    };
    let running = server::start_with(models, args.grpc, args.http, limits, &transport).await?;
    println!(
        "ps-serve: gRPC on {}, HTTP on {} (POST {}://{}/v1/models/NAME:predict){}; batching {}",
        running.grpc,
        running.http,
        if transport.tls.is_some() { "https" } else { "http" },
        running.http,
        if transport.tls.is_some() { ", TLS" } else { ", plaintext" },
        match batching {
            Some(b) => format!("up to {} examples, {} us", b.max_batch, b.max_delay.as_micros()),
            None => "off".into(),
        }
    );
    tokio::select! {
        _ = running.wait() => bail!("a listener stopped"),
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
    }
    Ok(())
}

/// The architecture of a model file (`model.msgpack`).
fn read_template(path: &Path) -> anyhow::Result<ModelKind> {
    Ok(SavedModel::read(path).with_context(|| format!("reading the template {}", path.display()))?.model)
}
