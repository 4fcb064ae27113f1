//! The gRPC interface (`ps.serve.v1.Prediction`, proto/ps/serve/v1).

//!
//! prost decodes a request whole before the service sees it, so the limits
//! on a request's examples (`--max-request-rows`, the model's width) are
//! checked after decoding, within the message size limit; but the one field
//! of many small messages, `SparseInputs.rows`, stays encoded until it is
//! read with a bound ([`SparseInputs`]).

use std::sync::Arc;

use prost::Message;
use prost::bytes::{Buf, BufMut};
use prost::encoding::{DecodeContext, WireType};
use tonic::{Request, Response, Status};

use crate::error::{Error, Result, too_many_rows};
use crate::model::Inputs;
use crate::server::Models;
use crate::slot::Freshness;

/// The generated types of `ps.serve.v1` (and the hand-written
/// [`SparseInputs`]).
pub mod pb {
    tonic::include_proto!("ps.serve.v1");

    pub use super::SparseInputs;
}

use pb::predict_request::Inputs as PbInputs;

/// `ps.serve.v1.SparseInputs` (`repeated SparseRow rows = 1`), its rows kept
/// as they came on the wire until [`SparseInputs::rows`] decodes them, at
/// most as many as a request may hold. Decoded by prost, the 2 bytes of an
/// empty row became a 48-byte `SparseRow` (24x the message) before the
/// count was checked.
#[derive(Clone, PartialEq, Default)]
pub struct SparseInputs {
    /// Field 1 as encoded: (key, length, row) for each row.
    encoded: Vec<u8>,
}

impl SparseInputs {
    pub fn new(rows: impl IntoIterator<Item = pb::SparseRow>) -> SparseInputs {
        let mut encoded = Vec::new();
        for row in rows {
            prost::encoding::message::encode(1, &row, &mut encoded);
        }
        SparseInputs { encoded }
    }

    /// The rows, refused at row `max + 1` before it is decoded.
    pub fn rows(&self, max: usize) -> Result<Vec<pb::SparseRow>> {
        let malformed = |e: prost::DecodeError| Error::bad(format!("sparse rows: {e}"));
        let mut buf = &self.encoded[..];
        let mut rows = Vec::new();
        while buf.has_remaining() {
            if rows.len() == max {
                return Err(Error::bad(too_many_rows(max)));
            }
            // Written by `merge_field`: a key of field 1, then a row.
            prost::encoding::decode_key(&mut buf).map_err(malformed)?;
            let mut row = pb::SparseRow::default();
            prost::encoding::message::merge(
                WireType::LengthDelimited,
                &mut row,
                &mut buf,
                DecodeContext::default(),
            )
            .map_err(malformed)?;
            rows.push(row);
        }
        Ok(rows)
    }
}

impl std::fmt::Debug for SparseInputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SparseInputs").field("encoded_bytes", &self.encoded.len()).finish()
    }
}

impl Message for SparseInputs {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.encoded);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        if tag != 1 {
            return prost::encoding::skip_field(wire_type, tag, buf, ctx);
        }
        // Checks the wire type and the length; the row itself is decoded
        // (and checked) by `rows`.
        let mut row = Vec::new();
        prost::encoding::bytes::merge(wire_type, &mut row, buf, ctx)?;
        prost::encoding::bytes::encode(1, &row, &mut self.encoded);
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        self.encoded.len()
    }

    fn clear(&mut self) {
        self.encoded.clear();
    }
}

/// The service over the models served here.
pub struct PredictionService(pub Arc<Models>);

/// The examples of a request, at most `max_rows` of sparse rows.
fn inputs(inputs: PbInputs, max_rows: usize) -> Result<Inputs> {
    Ok(match inputs {
        PbInputs::Dense(d) => Inputs::Dense { width: d.width as usize, values: d.values },
        PbInputs::Sparse(s) => {
            Inputs::Sparse(s.rows(max_rows)?.into_iter().map(|r| (r.indices, r.values)).collect())
        }
        PbInputs::Pairs(p) => Inputs::Pairs { users: p.users, items: p.items },
        PbInputs::Slots(s) => Inputs::Slots { slots: s.slots as usize, ids: s.ids },
    })
}

fn freshness(f: Option<Freshness>) -> Option<pb::Freshness> {
    f.map(|f| pb::Freshness { age_ms: f.age().as_millis() as u64, min_clock: f.min_clock })
}

#[tonic::async_trait]
impl pb::prediction_server::Prediction for PredictionService {
    async fn predict(
        &self,
        req: Request<pb::PredictRequest>,
    ) -> Result<Response<pb::PredictResponse>, Status> {
        let started = std::time::Instant::now();
        let req = req.into_inner();
        let slot = self.0.get(&req.model)?;
        let inputs = req.inputs.ok_or_else(|| Error::bad("the request has no inputs"));
        let inputs = inputs.and_then(|i| self::inputs(i, slot.max_request_rows()));
        let version = (req.version != 0).then_some(req.version);
        let p = match inputs {
            Ok(inputs) => slot.predict(version, inputs).await,
            Err(e) => Err(e),
        };
        let p = p.inspect_err(|e| self.0.metrics.failed(&slot.name, "grpc", e.code()))?;
        let examples = p.outputs.len() / p.width.max(1);
        self.0.metrics.predicted(&slot.name, p.version, "grpc", examples, started.elapsed().as_secs_f64());
        Ok(Response::new(pb::PredictResponse {
            model: req.model,
            version: p.version,
            width: p.width as u32,
            outputs: p.outputs,
            freshness: freshness(p.freshness),
        }))
    }

    async fn get_model(
        &self,
        req: Request<pb::GetModelRequest>,
    ) -> Result<Response<pb::ModelStatus>, Status> {
        let req = req.into_inner();
        let s = self.0.get(&req.model)?.status()?;
        Ok(Response::new(pb::ModelStatus {
            model: req.model,
            version: s.version,
            source: s.source,
            kind: s.kind.to_string(),
            input: s.input,
            output_width: s.output_width as u32,
            loaded_at_ms: s.loaded_at_ms,
            history: s.history,
            freshness: freshness(s.freshness),
        }))
    }

    async fn health(&self, _req: Request<pb::HealthRequest>) -> Result<Response<pb::HealthResponse>, Status> {
        use pb::health_response::Status as S;
        let status = if self.0.ready() { S::Serving } else { S::NotServing };
        Ok(Response::new(pb::HealthResponse { status: status as i32 }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `SparseInputs` as prost would generate it.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Generated {
        #[prost(message, repeated, tag = "1")]
        rows: Vec<pb::SparseRow>,
    }

    fn rows() -> Vec<pb::SparseRow> {
        vec![
            pb::SparseRow { indices: vec![0, 7], values: vec![1.0, -2.5] },
            pb::SparseRow::default(),
            pb::SparseRow { indices: vec![3], values: vec![0.5] },
        ]
    }

    #[test]
    fn sparse_inputs_are_encoded_and_decoded_as_generated_ones() {
        let generated = Generated { rows: rows() }.encode_to_vec();
        let ours = SparseInputs::new(rows());
        assert_eq!(ours.encode_to_vec(), generated);
        assert_eq!(SparseInputs::decode(&generated[..]).unwrap(), ours);
        assert_eq!(ours.rows(3).unwrap(), rows());
        // Two messages concatenated are merged: their rows, in order.
        let twice = SparseInputs::decode(&[generated.clone(), generated].concat()[..]).unwrap();
        assert_eq!(twice.rows(6).unwrap(), [rows(), rows()].concat());
        // Unknown fields are skipped; a row cut short is refused.
        let mut unknown = Vec::new();
        prost::encoding::uint32::encode(9, &5, &mut unknown);
        assert_eq!(SparseInputs::decode(&[unknown, ours.encode_to_vec()].concat()[..]).unwrap(), ours);
        let cut = ours.encode_to_vec();
        assert!(SparseInputs::decode(&cut[..cut.len() - 1]).is_err());
    }

    #[test]
    fn sparse_rows_past_the_limit_are_refused_before_they_are_decoded() {
        // Three rows, then a fourth that is not a row: decoding stops at the
        // limit before reaching it.
        let mut encoded = SparseInputs::new(rows()).encode_to_vec();
        prost::encoding::bytes::encode(1, &vec![0xff, 0xff], &mut encoded);
        let inputs = SparseInputs::decode(&encoded[..]).unwrap();
        let e = inputs.rows(3).unwrap_err().to_string();
        assert_eq!(e, "invalid request: more than 3 examples in one request; the limit is 3");
        assert!(inputs.rows(4).unwrap_err().to_string().contains("sparse rows:"));
        let empty = SparseInputs::new(vec![pb::SparseRow::default(); 1000]);
        assert!(empty.rows(999).unwrap_err().to_string().contains("the limit is 999"));
        assert_eq!(empty.rows(1000).unwrap().len(), 1000);
    }
}
