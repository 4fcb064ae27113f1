//! The gRPC interface (`ps.serve.v1.Prediction`, proto/ps/serve/v1).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::error::{Error, Result};
use crate::model::Inputs;
use crate::server::Models;
use crate::slot::Freshness;

/// The generated types of `ps.serve.v1`.
pub mod pb {
    tonic::include_proto!("ps.serve.v1");
}

use pb::predict_request::Inputs as PbInputs;

/// The service over the models served here.
pub struct PredictionService(pub Arc<Models>);

impl From<PbInputs> for Inputs {
    fn from(inputs: PbInputs) -> Inputs {
        match inputs {
            PbInputs::Dense(d) => Inputs::Dense { width: d.width as usize, values: d.values },
            PbInputs::Sparse(s) => {
                Inputs::Sparse(s.rows.into_iter().map(|r| (r.indices, r.values)).collect())
            }
            PbInputs::Pairs(p) => Inputs::Pairs { users: p.users, items: p.items },
            PbInputs::Slots(s) => Inputs::Slots { slots: s.slots as usize, ids: s.ids },
        }
    }
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
        let version = (req.version != 0).then_some(req.version);
        let p = match inputs {
            Ok(inputs) => slot.predict(version, inputs.into()).await,
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
