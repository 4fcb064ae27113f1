//! The generated protobuf/gRPC code of package `ps.v1` ([`pb`]) and the only
//! conversions between it and the domain types of [`crate::spec`] and
//! [`crate::optim`]. Servers and workers convert here, at the edge; their
//! stores and trainers never see a prost struct.

use crate::optim::Rule;
use crate::spec::{Consistency, Init, InitKind, Layout, OptimizerConfig, TableSpec};
use crate::{Error, Result};

/// Generated code for `proto/ps/v1/ps.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("ps.v1");
}

impl From<&TableSpec> for pb::TableSpec {
    fn from(t: &TableSpec) -> Self {
        let layout = match &t.layout {
            Layout::Dense { shape, chunk_len } => {
                pb::table_spec::Layout::Dense(pb::DenseLayout { shape: shape.clone(), chunk_len: *chunk_len })
            }
            Layout::Sparse { dim } => pb::table_spec::Layout::Sparse(pb::SparseLayout { dim: *dim }),
        };
        pb::TableSpec {
            name: t.name.clone(),
            layout: Some(layout),
            init: Some(pb::Initializer::from(&t.init)),
            optimizer: Some(pb::OptimizerSpec::from(&t.optimizer)),
        }
    }
}

impl TryFrom<pb::TableSpec> for TableSpec {
    type Error = Error;
    /// Converts and validates.
    fn try_from(t: pb::TableSpec) -> Result<Self> {
        let layout = match t.layout.ok_or(Error::MissingField("table.layout"))? {
            pb::table_spec::Layout::Dense(d) => Layout::Dense { shape: d.shape, chunk_len: d.chunk_len },
            pb::table_spec::Layout::Sparse(s) => Layout::Sparse { dim: s.dim },
        };
        let spec = TableSpec {
            name: t.name,
            layout,
            init: Init::try_from(t.init.ok_or(Error::MissingField("table.init"))?)?,
            optimizer: OptimizerConfig::try_from(t.optimizer.ok_or(Error::MissingField("table.optimizer"))?)?,
        };
        spec.validate()?;
        Ok(spec)
    }
}

impl From<&Init> for pb::Initializer {
    fn from(i: &Init) -> Self {
        use pb::initializer::Kind;
        let kind = match i.kind {
            InitKind::Constant { value } => Kind::Constant(value),
            InitKind::Uniform { low, high } => Kind::Uniform(pb::Uniform { low, high }),
            InitKind::Normal { mean, std } => Kind::Normal(pb::Normal { mean, std }),
        };
        pb::Initializer { kind: Some(kind), seed: i.seed }
    }
}

impl TryFrom<pb::Initializer> for Init {
    type Error = Error;
    fn try_from(i: pb::Initializer) -> Result<Self> {
        use pb::initializer::Kind;
        let kind = match i.kind.ok_or(Error::MissingField("init.kind"))? {
            Kind::Constant(value) => InitKind::Constant { value },
            Kind::Uniform(u) => InitKind::Uniform { low: u.low, high: u.high },
            Kind::Normal(n) => InitKind::Normal { mean: n.mean, std: n.std },
        };
        let init = Init { kind, seed: i.seed };
        init.validate()?;
        Ok(init)
    }
}

impl From<&OptimizerConfig> for pb::OptimizerSpec {
    fn from(o: &OptimizerConfig) -> Self {
        use pb::optimizer_spec::Rule as R;
        let rule = match o.rule {
            Rule::Sgd { lr, weight_decay } => R::Sgd(pb::Sgd { lr, weight_decay }),
            Rule::Momentum { lr, momentum, dampening, nesterov, weight_decay } => {
                R::Momentum(pb::Momentum { lr, momentum, dampening, nesterov, weight_decay })
            }
            Rule::Adagrad { lr, eps, initial_accumulator, weight_decay } => {
                R::Adagrad(pb::Adagrad { lr, eps, initial_accumulator, weight_decay })
            }
            Rule::Adam { lr, beta1, beta2, eps, weight_decay, decoupled } => {
                R::Adam(pb::Adam { lr, beta1, beta2, eps, weight_decay, decoupled })
            }
            Rule::Ftrl { alpha, beta, l1, l2 } => R::Ftrl(pb::Ftrl { alpha, beta, l1, l2 }),
        };
        pb::OptimizerSpec { rule: Some(rule), staleness_aware: o.staleness_aware }
    }
}

impl TryFrom<pb::OptimizerSpec> for OptimizerConfig {
    type Error = Error;
    fn try_from(o: pb::OptimizerSpec) -> Result<Self> {
        use pb::optimizer_spec::Rule as R;
        let rule = match o.rule.ok_or(Error::MissingField("optimizer.rule"))? {
            R::Sgd(s) => Rule::Sgd { lr: s.lr, weight_decay: s.weight_decay },
            R::Momentum(m) => Rule::Momentum {
                lr: m.lr,
                momentum: m.momentum,
                dampening: m.dampening,
                nesterov: m.nesterov,
                weight_decay: m.weight_decay,
            },
            R::Adagrad(a) => Rule::Adagrad {
                lr: a.lr,
                eps: a.eps,
                initial_accumulator: a.initial_accumulator,
                weight_decay: a.weight_decay,
            },
            R::Adam(a) => Rule::Adam {
                lr: a.lr,
                beta1: a.beta1,
                beta2: a.beta2,
                eps: a.eps,
                weight_decay: a.weight_decay,
                decoupled: a.decoupled,
            },
            R::Ftrl(f) => Rule::Ftrl { alpha: f.alpha, beta: f.beta, l1: f.l1, l2: f.l2 },
        };
        rule.validate()?;
        Ok(OptimizerConfig { rule, staleness_aware: o.staleness_aware })
    }
}

impl From<Consistency> for pb::ConsistencySpec {
    fn from(c: Consistency) -> Self {
        let (model, staleness) = match c {
            Consistency::Asp => (pb::ConsistencyModel::Asp, 0),
            Consistency::Ssp { staleness } => (pb::ConsistencyModel::Ssp, staleness),
            Consistency::Bsp => (pb::ConsistencyModel::Bsp, 0),
        };
        pb::ConsistencySpec { model: model as i32, staleness }
    }
}

impl TryFrom<pb::ConsistencySpec> for Consistency {
    type Error = Error;
    fn try_from(c: pb::ConsistencySpec) -> Result<Self> {
        match pb::ConsistencyModel::try_from(c.model) {
            Ok(pb::ConsistencyModel::Asp) => Ok(Consistency::Asp),
            Ok(pb::ConsistencyModel::Ssp) => Ok(Consistency::Ssp { staleness: c.staleness }),
            Ok(pb::ConsistencyModel::Bsp) => Ok(Consistency::Bsp),
            Ok(pb::ConsistencyModel::Unspecified) | Err(_) => Err(Error::MissingField("consistency.model")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rule() -> impl Strategy<Value = Rule> {
        let p = 0.0f32..0.99;
        let lr = 1e-4f32..1.0;
        prop_oneof![
            (lr.clone(), p.clone()).prop_map(|(lr, weight_decay)| Rule::Sgd { lr, weight_decay }),
            (lr.clone(), 0.01f32..0.99, p.clone(), any::<bool>(), p.clone()).prop_map(
                |(lr, momentum, dampening, nesterov, weight_decay)| Rule::Momentum {
                    lr,
                    momentum,
                    // PyTorch: Nesterov needs zero dampening.
                    dampening: if nesterov { 0.0 } else { dampening },
                    nesterov,
                    weight_decay
                }
            ),
            (lr.clone(), 1e-10f32..1e-3, p.clone(), p.clone()).prop_map(
                |(lr, eps, initial_accumulator, weight_decay)| {
                    Rule::Adagrad { lr, eps, initial_accumulator, weight_decay }
                }
            ),
            (lr.clone(), p.clone(), p.clone(), 1e-10f32..1e-3, p.clone(), any::<bool>()).prop_map(
                |(lr, beta1, beta2, eps, weight_decay, decoupled)| Rule::Adam {
                    lr,
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                    decoupled
                }
            ),
            (lr, 0.0f32..2.0, p.clone(), p).prop_map(|(alpha, beta, l1, l2)| Rule::Ftrl {
                alpha,
                beta,
                l1,
                l2
            }),
        ]
    }

    fn init() -> impl Strategy<Value = Init> {
        let kind = prop_oneof![
            (-10.0f32..10.0).prop_map(|value| InitKind::Constant { value }),
            (-1.0f32..0.0, 0.0f32..1.0).prop_map(|(low, high)| InitKind::Uniform { low, high }),
            (-1.0f32..1.0, 0.0f32..1.0).prop_map(|(mean, std)| InitKind::Normal { mean, std }),
        ];
        (kind, any::<u64>()).prop_map(|(kind, seed)| Init { kind, seed })
    }

    proptest! {
        #[test]
        fn table_spec_round_trips(
            name in "[a-z][a-z0-9._]{0,20}",
            dense in any::<bool>(),
            shape in proptest::collection::vec(1u64..100, 1..4),
            chunk_len in 1u32..100_000,
            dim in 1u32..512,
            init in init(),
            rule in rule(),
            staleness_aware in any::<bool>(),
        ) {
            let layout = if dense { Layout::Dense { shape, chunk_len } } else { Layout::Sparse { dim } };
            let spec = TableSpec { name, layout, init, optimizer: OptimizerConfig { rule, staleness_aware } };
            let back = TableSpec::try_from(pb::TableSpec::from(&spec)).unwrap();
            prop_assert_eq!(back, spec);
        }

        #[test]
        fn consistency_round_trips(s in 0u32..100, which in 0u8..3) {
            let c = match which { 0 => Consistency::Asp, 1 => Consistency::Ssp { staleness: s }, _ => Consistency::Bsp };
            prop_assert_eq!(Consistency::try_from(pb::ConsistencySpec::from(c)).unwrap(), c);
        }
    }

    #[test]
    fn missing_fields_are_errors() {
        let t = pb::TableSpec { name: "w".into(), layout: None, init: None, optimizer: None };
        assert_eq!(TableSpec::try_from(t), Err(Error::MissingField("table.layout")));
    }
}
