//! The generated protobuf/gRPC code of package `ps.v1` ([`pb`]) and the only
//! conversions between it and the domain types of [`crate::spec`] and
//! [`crate::optim`]. Servers and workers convert here, at the edge; their
//! stores and trainers never see a prost struct.

use crate::compress::{Codec, CodecKind, Codecs};
use crate::optim::DelayCompensation;
use crate::optim::Rule;
use crate::spec::{Backup, Consistency, Init, InitKind, LateGradients, Layout, OptimizerConfig, TableSpec};
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
            // f32 is left unset, so a spec without codecs encodes as before.
            push_codec: t.codecs.push.is_lossy().then(|| t.codecs.push.into()),
            pull_codec: t.codecs.pull.is_lossy().then(|| t.codecs.pull.into()),
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
            codecs: Codecs {
                push: t.push_codec.map(Codec::try_from).transpose()?.unwrap_or_default(),
                pull: t.pull_codec.map(Codec::try_from).transpose()?.unwrap_or_default(),
            },
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
        let delay_compensation = o.delay_compensation.map(|d| pb::DelayCompensation {
            lambda: d.lambda,
            adaptive: d.adaptive,
            momentum: d.momentum,
        });
        pb::OptimizerSpec { rule: Some(rule), staleness_aware: o.staleness_aware, delay_compensation }
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
        let delay_compensation = o.delay_compensation.map(|d| DelayCompensation {
            lambda: d.lambda,
            adaptive: d.adaptive,
            momentum: d.momentum,
        });
        let config = OptimizerConfig { rule, staleness_aware: o.staleness_aware, delay_compensation };
        config.validate()?;
        Ok(config)
    }
}

impl From<CodecKind> for pb::CodecKind {
    fn from(k: CodecKind) -> Self {
        match k {
            CodecKind::F32 => pb::CodecKind::F32,
            CodecKind::F16 => pb::CodecKind::Fp16,
            CodecKind::Bf16 => pb::CodecKind::Bf16,
            CodecKind::Int8 => pb::CodecKind::Int8,
            CodecKind::TopK => pb::CodecKind::TopK,
        }
    }
}

impl CodecKind {
    /// The kind of a wire enum value (`what` names the field); an unknown
    /// value is an error, not f32.
    pub fn from_wire(what: &'static str, value: i32) -> Result<CodecKind> {
        match pb::CodecKind::try_from(value) {
            Ok(pb::CodecKind::F32) => Ok(CodecKind::F32),
            Ok(pb::CodecKind::Fp16) => Ok(CodecKind::F16),
            Ok(pb::CodecKind::Bf16) => Ok(CodecKind::Bf16),
            Ok(pb::CodecKind::Int8) => Ok(CodecKind::Int8),
            Ok(pb::CodecKind::TopK) => Ok(CodecKind::TopK),
            Err(_) => Err(Error::InvalidCodec(format!("{what}: unknown codec {value}"))),
        }
    }

    pub fn to_wire(self) -> i32 {
        pb::CodecKind::from(self) as i32
    }
}

impl From<Codec> for pb::WireCodec {
    fn from(c: Codec) -> Self {
        let (stochastic, ratio) = match c {
            Codec::Int8 { stochastic } => (stochastic, 0.0),
            Codec::TopK { ratio } => (false, ratio),
            _ => (false, 0.0),
        };
        pb::WireCodec { kind: c.kind().to_wire(), stochastic, ratio }
    }
}

impl TryFrom<pb::WireCodec> for Codec {
    type Error = Error;
    fn try_from(c: pb::WireCodec) -> Result<Self> {
        let codec = match CodecKind::from_wire("table codec", c.kind)? {
            CodecKind::F32 => Codec::F32,
            CodecKind::F16 => Codec::F16,
            CodecKind::Bf16 => Codec::Bf16,
            CodecKind::Int8 => Codec::Int8 { stochastic: c.stochastic },
            CodecKind::TopK => Codec::TopK { ratio: c.ratio },
        };
        codec.validate()?;
        Ok(codec)
    }
}

impl From<LateGradients> for pb::LateGradients {
    fn from(l: LateGradients) -> Self {
        match l {
            LateGradients::Drop => pb::LateGradients::Drop,
            LateGradients::Weight => pb::LateGradients::Weight,
        }
    }
}

impl Backup {
    /// The backup settings of a `Join` (`backup_workers`, `late_gradients`).
    pub fn from_wire(workers: u32, late: i32) -> Result<Backup> {
        let late = match pb::LateGradients::try_from(late) {
            Ok(pb::LateGradients::Drop) => LateGradients::Drop,
            Ok(pb::LateGradients::Weight) => LateGradients::Weight,
            Err(_) => return Err(Error::MissingField("late_gradients")),
        };
        Ok(Backup { workers, late })
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

    fn codec() -> impl Strategy<Value = Codec> {
        prop_oneof![
            Just(Codec::F32),
            Just(Codec::F16),
            Just(Codec::Bf16),
            any::<bool>().prop_map(|stochastic| Codec::Int8 { stochastic }),
            (0.001f32..=1.0).prop_map(|ratio| Codec::TopK { ratio }),
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
            push in codec(),
            pull in prop_oneof![Just(Codec::F32), Just(Codec::F16), Just(Codec::Bf16)],
        ) {
            let layout = if dense { Layout::Dense { shape, chunk_len } } else { Layout::Sparse { dim } };
            let optimizer = OptimizerConfig { rule, staleness_aware, delay_compensation: None };
            let spec = TableSpec { name, layout, init, optimizer, codecs: Codecs { push, pull } };
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
        let t = pb::TableSpec { name: "w".into(), ..Default::default() };
        assert_eq!(TableSpec::try_from(t), Err(Error::MissingField("table.layout")));
    }

    #[test]
    fn bad_codecs_are_errors() {
        let spec = TableSpec::sparse("e", 4, Init::zeros(), Rule::sgd(0.1).into());
        let mut t = pb::TableSpec::from(&spec);
        t.push_codec = Some(pb::WireCodec { kind: 99, ..Default::default() });
        assert_eq!(
            TableSpec::try_from(t.clone()),
            Err(Error::InvalidCodec("table codec: unknown codec 99".into()))
        );
        t.push_codec =
            Some(pb::WireCodec { kind: pb::CodecKind::TopK as i32, ratio: 2.0, ..Default::default() });
        assert!(matches!(TableSpec::try_from(t.clone()), Err(Error::InvalidCodec(_))));
        t.push_codec = None;
        t.pull_codec = Some(Codec::Int8 { stochastic: false }.into());
        assert!(matches!(TableSpec::try_from(t), Err(Error::InvalidCodec(_))), "pulls do not travel in int8");
        assert_eq!(pb::TableSpec::from(&spec).push_codec, None, "f32 encodes as before codecs existed");
    }
}
