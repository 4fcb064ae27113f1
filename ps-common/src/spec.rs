//! Domain form of a table (what a worker registers and a shard stores) and of
//! a job's consistency model. Only these types cross into server and worker
//! logic; [`crate::wire`] converts them to and from protobuf at the edge.

use serde::{Deserialize, Serialize};

use crate::compress::Codecs;
use crate::optim::{DelayCompensation, Rule};
use crate::partition::{fnv1a64, splitmix64};
use crate::{Error, Result};

/// Default dense chunk length in elements (64 KiB of f32).
pub const DEFAULT_CHUNK_LEN: u32 = 16_384;

#[derive(Debug, Clone, PartialEq)]
pub struct TableSpec {
    pub name: String,
    pub layout: Layout,
    pub init: Init,
    pub optimizer: OptimizerConfig,
    /// How pushes and compressed pulls of this table travel (f32 by default).
    pub codecs: Codecs,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Layout {
    /// A dense tensor, flattened row-major and cut into chunks.
    Dense { shape: Vec<u64>, chunk_len: u32 },
    /// u64 keys to rows of `dim` floats, created on first touch.
    Sparse { dim: u32 },
}

impl Layout {
    /// Total number of elements of a dense tensor.
    pub fn dense_len(shape: &[u64]) -> Option<usize> {
        shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(usize::try_from(d).ok()?))
    }
}

/// How many standard deviations from the mean a normal draw of
/// [`Init::fill`] may land, at most: its Box-Muller draw takes `u1 >= 2^-24`,
/// so `|z| <= sqrt(-2 ln 2^-24) = 5.77`.
const NORMAL_REACH: f64 = 6.0;

/// How a table's values start: a pure function of (seed, table name, chunk
/// index or sparse key), so all shards and restarts agree.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Init {
    pub kind: InitKind,
    #[serde(default)]
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum InitKind {
    Constant { value: f32 },
    Uniform { low: f32, high: f32 },
    Normal { mean: f32, std: f32 },
}

impl Init {
    pub fn zeros() -> Init {
        Init { kind: InitKind::Constant { value: 0.0 }, seed: 0 }
    }

    /// Checks that every value [`Init::fill`] can draw is finite: finite
    /// parameters, and a range whose width (uniform) or whose mean plus
    /// [`NORMAL_REACH`] standard deviations (normal) is finite too. A spec
    /// of finite but huge parameters (uniform -3e38..3e38) used to pass and
    /// fill every row with infinities and NaN.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::InvalidInitializer(m.to_string()));
        match self.kind {
            InitKind::Constant { value } if !value.is_finite() => bad("constant must be finite"),
            InitKind::Uniform { low, high } if !(low.is_finite() && high.is_finite() && low <= high) => {
                bad("uniform needs finite low <= high")
            }
            InitKind::Uniform { low, high } if !(high - low).is_finite() => {
                bad("uniform needs a range (high - low) that is a finite f32")
            }
            InitKind::Normal { mean, std } if !(mean.is_finite() && std.is_finite() && std >= 0.0) => {
                bad("normal needs finite mean and std >= 0")
            }
            InitKind::Normal { mean, std }
                if f64::from(mean).abs() + NORMAL_REACH * f64::from(std) > f64::from(f32::MAX) =>
            {
                bad("normal needs |mean| + 6 std within the f32 range")
            }
            _ => Ok(()),
        }
    }

    /// Fills `out` with the initial values of block `index` (a dense chunk
    /// index or a sparse key) of table `table`. The generator is SplitMix64,
    /// seeded from (seed, FNV-1a of the name, index); normals use Box-Muller.
    pub fn fill(&self, table: &str, index: u64, out: &mut [f32]) {
        let mut state = self.seed ^ fnv1a64(table).rotate_left(21) ^ splitmix64(index);
        let mut next_unit = || {
            // 24 random bits -> [0, 1) exactly representable in f32.
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            (splitmix64(state) >> 40) as f32 / (1u64 << 24) as f32
        };
        match self.kind {
            InitKind::Constant { value } => out.fill(value),
            InitKind::Uniform { low, high } => {
                for v in out.iter_mut() {
                    *v = low + (high - low) * next_unit();
                }
            }
            InitKind::Normal { mean, std } => {
                for v in out.iter_mut() {
                    // u1 in (0, 1] so ln is finite.
                    let u1 = 1.0 - next_unit();
                    let u2 = next_unit();
                    let z = (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos();
                    *v = mean + std * z;
                }
            }
        }
    }
}

/// An update rule plus how it reacts to stale pushes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OptimizerConfig {
    #[serde(flatten)]
    pub rule: Rule,
    /// Scale the learning rate by 1 / (1 + tau), tau = the push's staleness.
    #[serde(default)]
    pub staleness_aware: bool,
    /// Delay-compensated ASGD (Zheng et al., ICML 2017) on dense tables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_compensation: Option<DelayCompensation>,
}

impl From<Rule> for OptimizerConfig {
    fn from(rule: Rule) -> Self {
        OptimizerConfig { rule, staleness_aware: false, delay_compensation: None }
    }
}

impl OptimizerConfig {
    /// State floats per parameter: the rule's, plus DC-ASGD-a's mean square
    /// (after the rule's slots).
    pub fn state_per_param(&self) -> usize {
        self.rule.state_per_param() + self.delay_compensation.map_or(0, |d| d.state_per_param())
    }

    pub fn validate(&self) -> Result<()> {
        self.rule.validate()?;
        self.delay_compensation.map_or(Ok(()), |d| d.validate())
    }
}

impl TableSpec {
    pub fn dense(name: impl Into<String>, shape: &[u64], init: Init, optimizer: OptimizerConfig) -> Self {
        TableSpec {
            name: name.into(),
            layout: Layout::Dense { shape: shape.to_vec(), chunk_len: DEFAULT_CHUNK_LEN },
            init,
            optimizer,
            codecs: Codecs::default(),
        }
    }

    pub fn sparse(name: impl Into<String>, dim: u32, init: Init, optimizer: OptimizerConfig) -> Self {
        TableSpec {
            name: name.into(),
            layout: Layout::Sparse { dim },
            init,
            optimizer,
            codecs: Codecs::default(),
        }
    }

    /// Checks the whole spec; a server calls this before creating anything.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidSpec(m));
        if self.name.is_empty() || self.name.len() > 256 {
            return bad(format!("table name must be 1..=256 bytes, got {}", self.name.len()));
        }
        match &self.layout {
            Layout::Dense { shape, chunk_len } => {
                if *chunk_len == 0 {
                    return bad("chunk_len must be positive".into());
                }
                match Layout::dense_len(shape) {
                    Some(len) if len > 0 && len <= (1 << 34) => {}
                    _ => return bad(format!("dense shape {shape:?} must have 1..=2^34 elements")),
                }
                if crate::partition::num_chunks(Layout::dense_len(shape).unwrap_or(0), *chunk_len as usize)
                    > u32::MAX as usize
                {
                    return bad("too many chunks".into());
                }
            }
            Layout::Sparse { dim } => {
                if *dim == 0 || *dim > 1 << 16 {
                    return bad(format!("row width must be 1..=65536, got {dim}"));
                }
            }
        }
        self.init.validate()?;
        self.codecs.validate()?;
        if self.optimizer.delay_compensation.is_some() && matches!(self.layout, Layout::Sparse { .. }) {
            return bad(format!(
                "`{}`: delay compensation is for dense tables (a shard keeps what each worker read)",
                self.name
            ));
        }
        self.optimizer.validate()
    }
}

/// How stale a worker's reads may be. Enforced by every shard on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "model", rename_all = "lowercase", deny_unknown_fields)]
pub enum Consistency {
    /// Asynchronous: reads never wait.
    #[default]
    Asp,
    /// Stale synchronous with bound `staleness`: a worker at clock c reads
    /// only once every worker has finished clock c - staleness - 1.
    Ssp { staleness: u32 },
    /// Bulk synchronous: SSP with bound 0.
    Bsp,
}

/// What a shard does with a late push (backup workers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LateGradients {
    /// Not applied (Chen et al., 2016); the push still ticks the clock.
    #[default]
    Drop,
    /// Applied with the learning rate scaled by 1 / (1 + staleness).
    Weight,
}

impl std::fmt::Display for LateGradients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LateGradients::Drop => "drop",
            LateGradients::Weight => "weight",
        })
    }
}

/// Backup workers for synchronous training (Chen et al., "Revisiting
/// Distributed Synchronous SGD", 2016): under BSP and SSP an iteration
/// completes when all but `workers` members have pushed it, so a read never
/// waits for the slowest `workers`; a later push of that iteration is late.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backup {
    pub workers: u32,
    #[serde(default)]
    pub late: LateGradients,
}

impl Consistency {
    /// The staleness bound, or `None` for ASP.
    pub fn bound(&self) -> Option<u64> {
        match self {
            Consistency::Asp => None,
            Consistency::Ssp { staleness } => Some(u64::from(*staleness)),
            Consistency::Bsp => Some(0),
        }
    }
}

impl std::fmt::Display for Consistency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Consistency::Asp => write!(f, "ASP"),
            Consistency::Ssp { staleness } => write!(f, "SSP(s={staleness})"),
            Consistency::Bsp => write!(f, "BSP"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_is_deterministic_and_in_range() {
        let init = Init { kind: InitKind::Uniform { low: -0.5, high: 0.5 }, seed: 7 };
        let mut a = vec![0.0; 1000];
        let mut b = vec![0.0; 1000];
        init.fill("w", 3, &mut a);
        init.fill("w", 3, &mut b);
        assert_eq!(a, b);
        assert!(a.iter().all(|v| (-0.5..0.5).contains(v)));
        init.fill("w", 4, &mut b);
        assert_ne!(a, b, "different blocks get different values");
        let mean = a.iter().sum::<f32>() / 1000.0;
        assert!(mean.abs() < 0.05, "mean {mean}");
    }

    #[test]
    fn normal_init_has_the_right_moments() {
        let init = Init { kind: InitKind::Normal { mean: 1.0, std: 2.0 }, seed: 1 };
        let mut v = vec![0.0; 100_000];
        init.fill("e", 0, &mut v);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!((mean - 1.0).abs() < 0.03, "mean {mean}");
        assert!((var.sqrt() - 2.0).abs() < 0.03, "std {}", var.sqrt());
    }

    #[test]
    fn bad_specs_are_rejected() {
        let opt = OptimizerConfig::from(Rule::sgd(0.1));
        assert!(TableSpec::dense("w", &[3, 4], Init::zeros(), opt).validate().is_ok());
        assert!(TableSpec::dense("w", &[3, 0], Init::zeros(), opt).validate().is_err());
        assert!(TableSpec::dense("", &[3], Init::zeros(), opt).validate().is_err());
        assert!(TableSpec::sparse("e", 0, Init::zeros(), opt).validate().is_err());
        let nan = Init { kind: InitKind::Constant { value: f32::NAN }, seed: 0 };
        assert!(TableSpec::sparse("e", 4, nan, opt).validate().is_err());
        let bad_lr = OptimizerConfig::from(Rule::sgd(-1.0));
        assert!(TableSpec::sparse("e", 4, Init::zeros(), bad_lr).validate().is_err());
    }

    /// Every initializer that validates fills finite values, at the edges of
    /// the f32 range too; finite parameters whose draws would overflow
    /// (a uniform range wider than f32::MAX, a normal reaching past it) are
    /// refused.
    #[test]
    fn initializers_that_validate_draw_only_finite_values() {
        let max = f32::MAX;
        let kinds = [
            InitKind::Uniform { low: -3e38, high: 3e38 },
            InitKind::Uniform { low: -max, high: max },
            InitKind::Uniform { low: -max, high: 0.0 },
            InitKind::Uniform { low: 0.0, high: max },
            InitKind::Uniform { low: max, high: max },
            InitKind::Uniform { low: -1.0, high: max },
            InitKind::Uniform { low: max / 2.0, high: max },
            InitKind::Normal { mean: 3e38, std: 3e38 },
            InitKind::Normal { mean: 0.0, std: 1e38 },
            InitKind::Normal { mean: 0.0, std: max / 6.5 },
            InitKind::Normal { mean: max, std: 0.0 },
            InitKind::Normal { mean: -max, std: 1e30 },
            InitKind::Normal { mean: max / 2.0, std: max / 12.5 },
            InitKind::Normal { mean: 1.0, std: 2.0 },
        ];
        let mut refused = 0;
        let mut v = vec![0.0; 100_000];
        for kind in kinds {
            let init = Init { kind, seed: 3 };
            if init.validate().is_err() {
                refused += 1;
                continue;
            }
            for block in 0..4 {
                init.fill("e", block, &mut v);
                assert!(v.iter().all(|x| x.is_finite()), "{kind:?} drew a non-finite value");
            }
        }
        assert_eq!(refused, 5, "the ranges that overflow, and only those, are refused");
    }
}
