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

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Value, json};

use ps_common::inflight::{Errors, InFlight};

use crate::error::{Error, Result, too_many_rows};
use crate::model::{Inputs, Servable};
use crate::server::Models;
use crate::slot::{Freshness, ModelSlot, Prediction};

/// Longest a request's body may take to arrive once its headers have, by
/// default (`server::Limits::body_timeout`). hyper bounds the time to send
/// the headers (`transport::HEADER_TIMEOUT`) but not the body: a client that
/// sent the headers of a POST and then stalled, or sent its body a byte at
/// a time, held its connection, its handler and the bytes it had sent for
/// as long as it kept the connection open. 16 MiB (the default request
/// limit) in 30 s is 0.5 MiB/s.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// The router of the HTTP interface; bodies above `max_body_bytes` are
/// refused with 413 before they are read whole, bodies that take longer than
/// `body_timeout` to arrive with 408, and every body is charged to
/// `inflight` as it arrives (429 when it does not fit).
pub fn router(
    models: Arc<Models>,
    (max_body_bytes, body_timeout): (usize, Duration),
    inflight: Arc<InFlight>,
) -> Router {
    Router::new()
        .route("/v1/models/{name}", get(model_status).post(predict_latest))
        .route("/v1/models/{name}/versions/{version}", get(version_status).post(predict_version))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .fallback(|| async { Error::bad_path() })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::Extension(BodyTimeout(body_timeout)))
        .layer(axum::middleware::from_fn_with_state(inflight, charge_body))
        .with_state(models)
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Charges the request's body to the in-flight budget until it is answered.
async fn charge_body(State(inflight): State<Arc<InFlight>>, req: Request, next: Next) -> Response {
    // A refused body is read to its end (up to 64 MiB) so that an HTTP/1
    // client gets its 429 rather than a reset.
    let errors = Errors { refused: |r| Box::new(Error::from(r)) as BoxError, inner: |e| e, drain: 64 << 20 };
    let (req, charge) = ps_common::inflight::charged(req, &inflight, errors);
    let resp = next.run(req.map(axum::body::Body::new)).await;
    drop(charge);
    resp
}

/// The answer to a body that could not be read (see [`Body`]).
fn unread(rejection: BytesRejection) -> Response {
    let mut source = std::error::Error::source(&rejection);
    while let Some(e) = source {
        if let Some(Error::InFlight(r)) = e.downcast_ref::<Error>() {
            return Error::InFlight(*r).into_response();
        }
        source = e.source();
    }
    rejection.into_response()
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
        let body = axum::Json(json!({"error": self.to_string()}));
        match self.retry_after() {
            // HTTP says when in whole seconds (RFC 9110, 10.2.3).
            Some(after) => {
                let seconds = after.as_secs() + u64::from(after.subsec_nanos() > 0);
                (status, [(axum::http::header::RETRY_AFTER, seconds.to_string())], body).into_response()
            }
            None => (status, body).into_response(),
        }
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
    Body(body): Body,
) -> Result<axum::Json<Value>> {
    let name = action(&segment, "/v1/models/{name}")?;
    predict(&models, models.get(name)?, None, &body).await
}

async fn predict_version(
    State(models): State<Arc<Models>>,
    Path((name, segment)): Path<(String, String)>,
    Body(body): Body,
) -> Result<axum::Json<Value>> {
    let version = action(&segment, "/v1/models/{name}/versions/{n}")?;
    let version = version.parse().map_err(|_| Error::bad(format!("version `{version}` is not a number")))?;
    predict(&models, models.get(&name)?, Some(version), &body).await
}

/// A request's body, read whole. A body that could not be read is answered
/// with the in-flight budget's refusal (429) as every other error of this
/// interface, or with axum's own answer (413 over the size limit); one that
/// has not arrived within the router's [`BodyTimeout`] with 408, closing the
/// connection (the rest of the body is never read).
struct Body(Bytes);

/// How long a request's body may take to arrive ([`BODY_TIMEOUT`]).
#[derive(Clone, Copy)]
struct BodyTimeout(Duration);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> std::result::Result<Body, Response> {
        let limit = req.extensions().get::<BodyTimeout>().map_or(BODY_TIMEOUT, |t| t.0);
        match tokio::time::timeout(limit, Bytes::from_request(req, state)).await {
            Ok(read) => read.map(Body).map_err(unread),
            Err(_) => {
                let mut refused = Error::SlowBody(limit).into_response();
                refused
                    .headers_mut()
                    .insert(axum::http::header::CONNECTION, axum::http::HeaderValue::from_static("close"));
                Err(refused)
            }
        }
    }
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
    let inputs = parse_instances(&loaded.model, body.instances.get(), slot.max_request_rows())?;
    slot.predict_on(loaded, inputs).await
}

/// The instances of a request as `model`'s inputs, read one at a time and
/// refused at instance `max_rows + 1` or at a row of the wrong width, before
/// more of them are parsed: `[[],[],...]` used to become one empty `Vec`
/// per instance (24 bytes for the 3 of `[],`) before either check ran.
fn parse_instances(model: &Servable, raw: &str, max_rows: usize) -> Result<Inputs> {
    Ok(match model {
        Servable::Mlp { .. } | Servable::MlpInt8(_) | Servable::MlpSparse(_) => {
            let mut rows = Fixed::new(model.input_width(), "features");
            read(raw, max_rows, &mut rows)?;
            Inputs::Dense { width: rows.width, values: rows.values }
        }
        Servable::Logreg { .. } => {
            let mut rows = Each::<SparseInstance>(Vec::new());
            read(raw, max_rows, &mut rows)?;
            Inputs::Sparse(rows.0.into_iter().map(|s| (s.indices, s.values)).collect())
        }
        Servable::Mf { .. } => {
            let mut pairs = Each::<PairInstance>(Vec::new());
            read(raw, max_rows, &mut pairs)?;
            Inputs::Pairs {
                users: pairs.0.iter().map(|p| p.user).collect(),
                items: pairs.0.iter().map(|p| p.item).collect(),
            }
        }
        Servable::Ctr { .. } => {
            let mut rows = Fixed::new(model.input_width(), "ids");
            read(raw, max_rows, &mut rows)?;
            Inputs::Slots { slots: rows.width, ids: rows.values }
        }
    })
}

/// Why the instances were refused while they were parsed, in the words of
/// the refusal (serde_json's message adds where it stopped reading).
type Refusal = Option<String>;

fn refuse<E: de::Error>(refusal: &mut Refusal, msg: String) -> E {
    let e = E::custom(&msg);
    *refusal = Some(msg);
    e
}

/// Reads the JSON array `raw` into `rows`, at most `max_rows` instances.
fn read<'de, R: Rows<'de>>(raw: &'de str, max_rows: usize, rows: &mut R) -> Result<()> {
    let mut refusal = None;
    let mut de = serde_json::Deserializer::from_str(raw);
    Instances { rows, max_rows, refusal: &mut refusal }
        .deserialize(&mut de)
        .and_then(|()| de.end())
        .map_err(|e| Error::bad(refusal.take().unwrap_or_else(|| format!("instances: {e}"))))
}

/// What a model kind makes of its instances, one at a time.
trait Rows<'de> {
    /// Reads instance `i` from `seq`; `false` once there is none.
    fn next<A: SeqAccess<'de>>(
        &mut self,
        i: usize,
        seq: &mut A,
        refusal: &mut Refusal,
    ) -> Result<bool, A::Error>;
}

/// The `instances` array, read into `rows` up to `max_rows` instances; one
/// more is skipped (not kept) and refuses the request.
struct Instances<'r, R> {
    rows: &'r mut R,
    max_rows: usize,
    refusal: &'r mut Refusal,
}

impl<'de, R: Rows<'de>> DeserializeSeed<'de> for Instances<'_, R> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, R: Rows<'de>> Visitor<'de> for Instances<'_, R> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of instances")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        for i in 0..self.max_rows {
            if !self.rows.next(i, &mut seq, self.refusal)? {
                return Ok(());
            }
        }
        match seq.next_element::<IgnoredAny>()? {
            None => Ok(()),
            Some(_) => Err(refuse(self.refusal, too_many_rows(self.max_rows))),
        }
    }
}

/// Instances that are whole values of their own (sparse features, pairs).
struct Each<T>(Vec<T>);

impl<'de, T: Deserialize<'de>> Rows<'de> for Each<T> {
    fn next<A: SeqAccess<'de>>(&mut self, _: usize, seq: &mut A, _: &mut Refusal) -> Result<bool, A::Error> {
        let row = seq.next_element()?;
        Ok(row.map(|r| self.0.push(r)).is_some())
    }
}

/// Instances that are arrays of exactly `width` values (MLP features, CTR
/// ids), read into one row-major vector; a row is refused at its value
/// `width + 1`, or at its end if it is shorter.
struct Fixed<T> {
    width: usize,
    /// What a value is, for the refusal.
    unit: &'static str,
    values: Vec<T>,
}

impl<T> Fixed<T> {
    fn new(width: usize, unit: &'static str) -> Fixed<T> {
        Fixed { width, unit, values: Vec::new() }
    }
}

impl<'de, T: Deserialize<'de>> Rows<'de> for Fixed<T> {
    fn next<A: SeqAccess<'de>>(
        &mut self,
        i: usize,
        seq: &mut A,
        refusal: &mut Refusal,
    ) -> Result<bool, A::Error> {
        Ok(seq.next_element_seed(Row { i, rows: self, refusal })?.is_some())
    }
}

/// Instance `i` of a [`Fixed`].
struct Row<'r, T> {
    i: usize,
    rows: &'r mut Fixed<T>,
    refusal: &'r mut Refusal,
}

impl<'de, T: Deserialize<'de>> DeserializeSeed<'de> for Row<'_, T> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for Row<'_, T> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "an array of {} {}", self.rows.width, self.rows.unit)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Fixed { width, unit, values } = self.rows;
        let (width, i, start) = (*width, self.i, values.len());
        while values.len() - start < width {
            match seq.next_element()? {
                Some(v) => values.push(v),
                None => break,
            }
        }
        let n = values.len() - start;
        if n == width && seq.next_element::<IgnoredAny>()?.is_some() {
            let msg = format!("instance {i} has more than {width} {unit}; the model takes {width}");
            return Err(refuse(self.refusal, msg));
        }
        if n < width {
            return Err(refuse(
                self.refusal,
                format!("instance {i} has {n} {unit}; the model takes {width}"),
            ));
        }
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use ps_model::{ModelKind, SavedModel};

    use super::*;

    /// A refusal for want of room now tells the client when to come back,
    /// on HTTP (`Retry-After`, whole seconds) and gRPC (a pushback); one
    /// that would be refused again does not.
    #[test]
    fn only_refusals_that_may_pass_later_say_when_to_retry() {
        use ps_common::inflight::Refused;
        use ps_common::transport::pushback;
        let full = || Error::Overloaded("m".into());
        let resp = full().into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers().get(axum::http::header::RETRY_AFTER).unwrap(), "1");
        assert_eq!(pushback(&tonic::Status::from(full())), Some(std::time::Duration::from_millis(10)));
        let huge = || Error::InFlight(Refused { bytes: 5 << 20, used: 0, cap: 3 << 20, total: 5 << 20 });
        let resp = huge().into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(resp.headers().get(axum::http::header::RETRY_AFTER).is_none());
        assert_eq!(pushback(&tonic::Status::from(huge())), None);
    }

    /// A request's instances as JSON-like text: an array of the shapes
    /// examples take (an array of numbers, an object with the fields of a
    /// sparse example or of a pair), with numbers from the small whole ones
    /// models take to ones past f32's range, and now and then a token out
    /// of place or the closing bracket missing.
    fn json_like() -> impl Strategy<Value = String> {
        let number = prop_oneof![
            6 => (0i64..6).prop_map(|n| n.to_string()),
            2 => (-3i64..1100).prop_map(|n| n.to_string()),
            1 => any::<i64>().prop_map(|n| n.to_string()),
            1 => any::<u64>().prop_map(|n| n.to_string()),
            1 => any::<f64>().prop_map(|x| format!("{x:e}")),
            1 => proptest::sample::select(vec!["1e39", "-1e39", "281474976710656", "0.5", "-0", "4294967296"])
                .prop_map(String::from),
        ];
        let odd = proptest::sample::select(vec!["null", "\"x\"", "true", "{}", "[[]]", "{", "]"])
            .prop_map(String::from);
        let value = prop_oneof![9 => number, 1 => odd.clone()];
        let list = move |n: std::ops::Range<usize>| {
            proptest::collection::vec(value.clone(), n).prop_map(|v| v.join(","))
        };
        let sparse = |(i, v): (String, String)| format!(r#"{{"indices":[{i}],"values":[{v}]}}"#);
        let instance = prop_oneof![
            3 => list(0..6).prop_map(|v| format!("[{v}]")),
            2 => (0..5usize).prop_flat_map({
                let list = list.clone();
                move |n| (list(n..n + 1), list(n..n + 1))
            })
            .prop_map(sparse),
            1 => (list(0..5), list(0..5)).prop_map(sparse),
            2 => (list(1..2), list(1..2)).prop_map(|(u, i)| format!(r#"{{"user":{u},"item":{i}}}"#)),
            1 => odd,
        ];
        (proptest::collection::vec(instance, 0..5), proptest::bool::weighted(0.9))
            .prop_map(|(v, closed)| format!("[{}{}", v.join(","), if closed { "]" } else { "" }))
    }

    proptest::proptest! {
        // Most texts are refused before a model sees them: enough cases for
        // each kind to predict from a few dozen.
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Whatever a request's instances hold, each kind of model parses
        /// them or refuses them, and what it parses and accepts it predicts:
        /// one output row per example, and no panic on the way. (Finite
        /// inputs far out of range can still make a prediction NaN, as
        /// `[[4.1e37, 0, 0]]` did for the int8 model here; the slot refuses
        /// such an answer, `bad_inputs_are_refused_over_both_interfaces`.)
        #[test]
        fn any_instances_are_refused_or_predicted(raw in json_like()) {
            for model in crate::model::tests::every_kind() {
                let Ok(inputs) = parse_instances(&model, &raw, 8) else { continue };
                if model.check(&inputs).is_err() {
                    continue;
                }
                let mut out = Vec::new();
                model.predict(&inputs, &mut out).unwrap();
                proptest::prop_assert_eq!(out.len(), inputs.rows() * model.output_width(), "{}", model.kind());
            }
        }
    }

    /// Counts the instances it is handed, keeping none.
    struct Count(usize);

    impl<'de> Rows<'de> for Count {
        fn next<A: SeqAccess<'de>>(
            &mut self,
            _: usize,
            seq: &mut A,
            _: &mut Refusal,
        ) -> Result<bool, A::Error> {
            let row = seq.next_element::<IgnoredAny>()?;
            self.0 += usize::from(row.is_some());
            Ok(row.is_some())
        }
    }

    /// A refusal's message.
    fn refused(r: Result<impl fmt::Debug>) -> String {
        r.expect_err("refused").to_string()
    }

    #[test]
    fn instances_past_the_limit_are_refused_before_they_are_read() {
        // 1000 instances and then not JSON: a parser that read them all
        // would fail on the tail, or hand the rows on for counting.
        let raw = format!("[{}oops", "[],".repeat(1000));
        let mut count = Count(0);
        let e = refused(read(&raw, 3, &mut count));
        assert_eq!(count.0, 3, "instances handed on past the limit");
        assert_eq!(e, "invalid request: more than 3 examples in one request; the limit is 3");
        // Up to the limit, every instance is read, and the end is checked.
        let mut count = Count(0);
        read("[[], [], []]", 3, &mut count).unwrap();
        assert_eq!(count.0, 3);
        assert!(refused(read("[[], []] x", 3, &mut Count(0))).contains("trailing characters"));
    }

    #[test]
    fn rows_of_the_wrong_width_are_refused_at_the_first_value_too_many() {
        let mlp = ps_model::Mlp::new(&[3, 4, 2]);
        let saved = SavedModel::from_flat(ModelKind::Mlp { layers: vec![3, 4, 2] }, &mlp.init_params(1));
        let model = Servable::new(saved.unwrap()).unwrap();
        let parse = |raw: &str| parse_instances(&model, raw, 4);
        let e = refused(parse(&format!("[[],{}oops", "[],".repeat(1000))));
        assert_eq!(e, "invalid request: instance 0 has 0 features; the model takes 3");
        let e = refused(parse(&format!("[[1, 2, 3], [1, 2, 3, {}oops", "4,".repeat(1000))));
        assert_eq!(e, "invalid request: instance 1 has more than 3 features; the model takes 3");
        let e = refused(parse(&format!("[{}oops", "[1, 2, 3],".repeat(1000))));
        assert_eq!(e, "invalid request: more than 4 examples in one request; the limit is 4");
        // Within both limits: the rows, row-major; serde's own errors say where.
        let rows = parse("[[1, 2, 3], [4, 5, 6]]").unwrap();
        assert_eq!(rows, Inputs::Dense { width: 3, values: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0] });
        assert_eq!(parse("[]").unwrap(), Inputs::Dense { width: 3, values: vec![] });
        assert!(refused(parse("[[1, \"a\", 3]]")).contains("instances: invalid type: string"));
        assert!(refused(parse("[{\"user\": 1}]")).contains("expected an array of 3 features"));
    }
}
