//! The HTTP/JSON interface, close to TF Serving's REST API:
//!
//! - `POST /v1/models/{name}:predict` and
//!   `POST /v1/models/{name}/versions/{n}:predict` with
//!   `{"instances": [...]}`; the answer is
//!   `{"predictions": [...], "model_version": n, ...}`.
//! - `GET /v1/models/{name}` (and `/versions/{n}`): `model_version_status`
//!   as TF Serving gives it, with this server's details beside it.
//! - `GET /healthz` (the process answers) and `GET /readyz` (every model
//!   has a version loaded: 200, else 503).
//! - `GET /metrics`: Prometheus metrics (`crate::metrics`).
//!
//! An instance is a model kind's example: an array of features (MLP), an
//! object `{"indices": [...], "values": [...]}` (logistic regression), an
//! object `{"user": u, "item": i}` (MF), an array of slot ids (CTR).
//! Errors are `{"error": "..."}` with the status of [`Error::http_status`].

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::model::{Inputs, Servable};
use crate::server::Models;
use crate::slot::{Freshness, ModelSlot, Prediction};

/// The router of the HTTP interface; bodies above `max_body_bytes` are
/// refused with 413 before they are read whole.
pub fn router(models: Arc<Models>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/models/{name}", get(model_status).post(predict_latest))
        .route("/v1/models/{name}/versions/{version}", get(version_status).post(predict_version))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .fallback(|| async { Error::bad_path() })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(models)
}

impl Error {
    fn bad_path() -> Response {
        let body = json!({"error": "no such endpoint; see POST /v1/models/{name}:predict"});
        (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(json!({"error": self.to_string()}))).into_response()
    }
}

/// Prometheus metrics (`crate::metrics`), with the version each model
/// serves read now.
async fn metrics(State(models): State<Arc<Models>>) -> Response {
    for slot in models.slots() {
        if let Ok(s) = slot.status() {
            models.metrics.serving(&slot.name, s.version);
        }
    }
    let text = ps_common::metrics::render(&models.metrics.registry);
    ([(axum::http::header::CONTENT_TYPE, ps_common::metrics::CONTENT_TYPE)], text).into_response()
}

async fn ready(State(models): State<Arc<Models>>) -> Response {
    if models.ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: a model has no version loaded").into_response()
    }
}

/// `name:predict` -> `name`.
fn action<'a>(segment: &'a str, what: &str) -> Result<&'a str> {
    match segment.rsplit_once(':') {
        Some((name, "predict")) => Ok(name),
        Some((_, verb)) => Err(Error::bad(format!("unknown verb `:{verb}`; POST {what}:predict"))),
        None => Err(Error::bad(format!("POST {what}:predict, not {what}"))),
    }
}

async fn predict_latest(
    State(models): State<Arc<Models>>,
    Path(segment): Path<String>,
    body: Bytes,
) -> Result<axum::Json<Value>> {
    let name = action(&segment, "/v1/models/{name}")?;
    predict(&models, models.get(name)?, None, &body).await
}

async fn predict_version(
    State(models): State<Arc<Models>>,
    Path((name, segment)): Path<(String, String)>,
    body: Bytes,
) -> Result<axum::Json<Value>> {
    let version = action(&segment, "/v1/models/{name}/versions/{n}")?;
    let version = version.parse().map_err(|_| Error::bad(format!("version `{version}` is not a number")))?;
    predict(&models, models.get(&name)?, Some(version), &body).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PredictBody<'a> {
    #[serde(borrow)]
    instances: &'a RawValue,
    /// TF Serving's; one signature here, so only accepted.
    #[serde(default, rename = "signature_name")]
    _signature_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SparseInstance {
    indices: Vec<u32>,
    values: Vec<f32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PairInstance {
    user: u64,
    item: u64,
}

/// Predicts and records the prediction (or its failure) in the metrics.
async fn predict(
    models: &Models,
    slot: &ModelSlot,
    version: Option<i64>,
    body: &[u8],
) -> Result<axum::Json<Value>> {
    let started = std::time::Instant::now();
    match predict_on(slot, version, body).await {
        Ok(p) => {
            let examples = p.outputs.len() / p.width.max(1);
            let seconds = started.elapsed().as_secs_f64();
            models.metrics.predicted(&slot.name, p.version, "http", examples, seconds);
            Ok(axum::Json(answer(&slot.name, p)))
        }
        Err(e) => {
            models.metrics.failed(&slot.name, "http", e.code());
            Err(e)
        }
    }
}

async fn predict_on(slot: &ModelSlot, version: Option<i64>, body: &[u8]) -> Result<Prediction> {
    let body: PredictBody<'_> =
        serde_json::from_slice(body).map_err(|e| Error::bad(format!("malformed JSON body: {e}")))?;
    // One version for the whole request: the one that says how to parse it.
    let loaded = slot.resolve(version).await?;
    let inputs = parse_instances(&loaded.model, body.instances.get())?;
    slot.predict_on(loaded, inputs).await
}

fn parse_instances(model: &Servable, raw: &str) -> Result<Inputs> {
    fn parse<T: DeserializeOwned>(raw: &str) -> Result<Vec<T>> {
        serde_json::from_str(raw).map_err(|e| Error::bad(format!("instances: {e}")))
    }
    Ok(match model {
        Servable::Mlp { .. } | Servable::MlpInt8(_) | Servable::MlpSparse(_) => {
            let rows: Vec<Vec<f32>> = parse(raw)?;
            let width = model.input_width();
            if let Some((i, r)) = rows.iter().enumerate().find(|(_, r)| r.len() != width) {
                return Err(Error::bad(format!(
                    "instance {i} has {} features; the model takes {width}",
                    r.len()
                )));
            }
            Inputs::Dense { width, values: rows.concat() }
        }
        Servable::Logreg { .. } => {
            Inputs::Sparse(parse::<SparseInstance>(raw)?.into_iter().map(|s| (s.indices, s.values)).collect())
        }
        Servable::Mf { .. } => {
            let pairs: Vec<PairInstance> = parse(raw)?;
            Inputs::Pairs {
                users: pairs.iter().map(|p| p.user).collect(),
                items: pairs.iter().map(|p| p.item).collect(),
            }
        }
        Servable::Ctr { .. } => {
            let rows: Vec<Vec<u64>> = parse(raw)?;
            let slots = model.input_width();
            if let Some((i, r)) = rows.iter().enumerate().find(|(_, r)| r.len() != slots) {
                return Err(Error::bad(format!("instance {i} has {} ids; the model takes {slots}", r.len())));
            }
            Inputs::Slots { slots, ids: rows.concat() }
        }
    })
}

fn freshness(f: Option<Freshness>) -> Value {
    f.map_or(Value::Null, |f| json!({"age_ms": f.age().as_millis() as u64, "min_clock": f.min_clock}))
}

fn answer(model: &str, p: Prediction) -> Value {
    let predictions: Value = if p.width == 1 {
        p.outputs.into()
    } else {
        p.outputs.chunks(p.width.max(1)).map(|r| Value::from(r.to_vec())).collect()
    };
    let mut v = json!({"model": model, "model_version": p.version, "predictions": predictions});
    if p.freshness.is_some() {
        v["freshness"] = freshness(p.freshness);
    }
    v
}

async fn model_status(
    State(models): State<Arc<Models>>,
    Path(name): Path<String>,
) -> Result<axum::Json<Value>> {
    let slot = models.get(&name)?;
    let s = slot.status()?;
    Ok(axum::Json(json!({
        "model_version_status": [{
            "version": s.version.to_string(),
            "state": "AVAILABLE",
            "status": {"error_code": "OK", "error_message": ""},
        }],
        "model": name,
        "source": s.source,
        "kind": s.kind,
        "input": s.input,
        "output_width": s.output_width,
        "loaded_at_ms": s.loaded_at_ms,
        "history": s.history,
        "freshness": freshness(s.freshness),
        "batches": s.batches.map(|(passes, examples)| json!({"passes": passes, "examples": examples})),
    })))
}

async fn version_status(
    State(models): State<Arc<Models>>,
    Path((name, version)): Path<(String, String)>,
) -> Result<axum::Json<Value>> {
    let version: i64 =
        version.parse().map_err(|_| Error::bad(format!("version `{version}` is not a number")))?;
    let loaded = models.get(&name)?.resolve(Some(version)).await?;
    Ok(axum::Json(json!({
        "model_version_status": [{
            "version": loaded.version.to_string(),
            "state": "AVAILABLE",
            "status": {"error_code": "OK", "error_message": ""},
        }],
        "model": name,
        "kind": loaded.model.kind(),
        "input": loaded.model.input(),
        "output_width": loaded.model.output_width(),
        "loaded_at_ms": loaded.loaded_at_ms,
    })))
}
