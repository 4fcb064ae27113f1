//! Optimizer update rules as pure functions over `f32` slices.
//!
//! A [`Rule`] is a value: the hyper-parameters of one update rule. It owns no
//! state. The caller (the server's store) owns each block's parameters, its
//! optimizer state and its step count, takes whatever lock it needs, and calls
//! [`Rule::apply`], which is a deterministic function of
//! `(param, grad, state, step, lr_scale)`. Nothing here allocates, locks or
//! does I/O.
//!
//! The rules follow `torch.optim` (SGD, SGD with momentum/Nesterov, Adagrad,
//! Adam, AdamW) operation by operation, and FTRL-proximal follows Algorithm 1
//! of McMahan et al., "Ad Click Prediction: a View from the Trenches"
//! (KDD 2013). Each variant documents its formula.
//!
//! # State layout
//!
//! A block of `n` parameters needs `n * rule.state_per_param()` state values,
//! slot-major: `state[k * n..(k + 1) * n]` is slot `k` for all `n` parameters
//! (momentum: the buffer; Adagrad: the sum of squares; Adam: `m` then `v`;
//! FTRL: `z` then `n`). A fresh buffer is filled by [`Rule::init_state`].

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// An update rule with its hyper-parameters.
///
/// Deserializes from a table tagged by `rule`, e.g. `{ rule = "adam", lr = 1e-3 }`.
/// Omitted fields take the defaults noted on them (PyTorch's, where PyTorch has
/// the rule); unknown fields are rejected. Call [`Rule::validate`] after
/// deserializing.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case", deny_unknown_fields)]
pub enum Rule {
    /// `torch.optim.SGD` without momentum:
    ///
    /// ```text
    /// g ← g + weight_decay·p
    /// p ← p − lr·g
    /// ```
    Sgd {
        lr: f32,
        /// L2 penalty added to the gradient. Default 0.
        #[serde(default)]
        weight_decay: f32,
    },
    /// `torch.optim.SGD` with momentum, dampening and Nesterov. One state slot,
    /// the momentum buffer `b`:
    ///
    /// ```text
    /// g ← g + weight_decay·p
    /// b ← g                              on step 1 (no dampening, as PyTorch)
    /// b ← momentum·b + (1 − dampening)·g on later steps
    /// g ← g + momentum·b  if nesterov, else  g ← b
    /// p ← p − lr·g
    /// ```
    ///
    /// With `momentum = 0` PyTorch keeps no buffer and this is plain SGD; so is
    /// this rule (the buffer stays untouched).
    Momentum {
        lr: f32,
        momentum: f32,
        /// Default 0.
        #[serde(default)]
        dampening: f32,
        /// Default false. Requires `momentum > 0` and `dampening = 0`.
        #[serde(default)]
        nesterov: bool,
        /// Default 0.
        #[serde(default)]
        weight_decay: f32,
    },
    /// `torch.optim.Adagrad` with `lr_decay = 0`. One state slot, the sum of
    /// squared gradients `s`, initially `initial_accumulator`:
    ///
    /// ```text
    /// g ← g + weight_decay·p
    /// s ← s + g²
    /// p ← p − lr·g / (√s + eps)          eps outside the square root
    /// ```
    Adagrad {
        lr: f32,
        /// Default 1e-10.
        #[serde(default = "defaults::adagrad_eps")]
        eps: f32,
        /// Default 0.
        #[serde(default)]
        initial_accumulator: f32,
        /// Default 0.
        #[serde(default)]
        weight_decay: f32,
    },
    /// `torch.optim.Adam` (`decoupled = false`) or `torch.optim.AdamW`
    /// (`decoupled = true`). Two state slots, `m` then `v`; `t` is the step:
    ///
    /// ```text
    /// Adam:  g ← g + weight_decay·p      AdamW: p ← p·(1 − lr·weight_decay)
    /// m ← β1·m + (1 − β1)·g
    /// v ← β2·v + (1 − β2)·g²
    /// m̂ ← m / (1 − β1ᵗ),  v̂ ← v / (1 − β2ᵗ)
    /// p ← p − lr·m̂ / (√v̂ + eps)         eps outside the square root,
    ///                                    added after bias correction
    /// ```
    ///
    /// The bias corrections are computed in `f64`, and the update is evaluated
    /// as PyTorch does: `p − (lr / (1 − β1ᵗ))·m / (√v / √(1 − β2ᵗ) + eps)`.
    Adam {
        lr: f32,
        /// Default 0.9.
        #[serde(default = "defaults::adam_beta1")]
        beta1: f32,
        /// Default 0.999.
        #[serde(default = "defaults::adam_beta2")]
        beta2: f32,
        /// Default 1e-8.
        #[serde(default = "defaults::adam_eps")]
        eps: f32,
        /// Default 0 (note: `torch.optim.AdamW` defaults to 0.01).
        #[serde(default)]
        weight_decay: f32,
        /// Default false: L2 penalty in the gradient (Adam). True: decoupled
        /// weight decay (AdamW).
        #[serde(default)]
        decoupled: bool,
    },
    /// FTRL-proximal, McMahan et al. (KDD 2013), Algorithm 1, per coordinate.
    /// Two state slots, `z` then `n`; the parameter is the weight `w`:
    ///
    /// ```text
    /// σ ← (√(n + g²) − √n) / alpha
    /// z ← z + g − σ·w
    /// n ← n + g²
    /// w ← 0                                                    if |z| ≤ l1
    /// w ← −(z − sign(z)·l1) / ((beta + √n) / alpha + l2)      otherwise
    /// ```
    ///
    /// The weight is a function of `(z, n)`; `apply` overwrites the parameter
    /// with it. See [`Rule::init_state`] for the initial state.
    Ftrl {
        alpha: f32,
        /// Default 1.
        #[serde(default = "defaults::ftrl_beta")]
        beta: f32,
        /// Default 0.
        #[serde(default)]
        l1: f32,
        /// Default 0.
        #[serde(default)]
        l2: f32,
    },
}

mod defaults {
    pub(super) fn adagrad_eps() -> f32 {
        1e-10
    }
    pub(super) fn adam_beta1() -> f32 {
        0.9
    }
    pub(super) fn adam_beta2() -> f32 {
        0.999
    }
    pub(super) fn adam_eps() -> f32 {
        1e-8
    }
    pub(super) fn ftrl_beta() -> f32 {
        1.0
    }
    pub(super) fn dc_momentum() -> f32 {
        0.95
    }
}

/// Delay compensation of a stale gradient, from Zheng et al., "Asynchronous
/// Stochastic Gradient Descent with Delay Compensation" (ICML 2017),
/// Algorithm 1 (DC-ASGD): a gradient computed at the parameters `w_read` a
/// worker pulled, applied when they are `w_now`, is corrected by a
/// first-order Taylor term whose Hessian is approximated by `λ·g⊙g`:
///
/// ```text
/// g ← g + λ·g⊙g⊙(w_now − w_read)                         DC-ASGD-c
/// ms ← m·ms + (1 − m)·g²;  λ' = λ / (√ms + 1e-7)
/// g ← g + λ'⊙g⊙g⊙(w_now − w_read)                        DC-ASGD-a
/// ```
///
/// (the paper's DC-ASGD-a divides by √ms element-wise; the 1e-7 only keeps
/// a zero gradient history finite). The corrected gradient then goes to the
/// table's rule as usual. DC-ASGD-a keeps `ms` as one state slot per
/// parameter, after the rule's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelayCompensation {
    /// λ (λ0 of DC-ASGD-a); the paper uses 0.04 and 2 respectively.
    pub lambda: f32,
    /// DC-ASGD-a: λ scaled by the inverse root mean square of the gradient.
    #[serde(default)]
    pub adaptive: bool,
    /// Decay `m` of the mean square. Default 0.95 (the paper's).
    #[serde(default = "defaults::dc_momentum")]
    pub momentum: f32,
}

impl DelayCompensation {
    /// State floats per parameter: 1 for DC-ASGD-a (the mean square), else 0.
    pub fn state_per_param(&self) -> usize {
        usize::from(self.adaptive)
    }

    /// `lambda` finite and `>= 0`; `momentum` in `[0, 1)`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidOptimizer`] naming the field.
    pub fn validate(&self) -> Result<()> {
        if !(self.lambda.is_finite() && self.lambda >= 0.0) {
            return Err(Error::InvalidOptimizer(format!(
                "delay_compensation.lambda must be finite and >= 0, got {}",
                self.lambda
            )));
        }
        if !(self.momentum.is_finite() && (0.0..1.0).contains(&self.momentum)) {
            return Err(Error::InvalidOptimizer(format!(
                "delay_compensation.momentum must be finite and in [0, 1), got {}",
                self.momentum
            )));
        }
        Ok(())
    }

    /// Corrects `grad` in place for the parameters having moved from `read`
    /// to `now` since the worker read them. `mean_square` is the DC-ASGD-a
    /// state (`grad.len()` floats, starting at 0), empty otherwise.
    pub fn compensate(&self, grad: &mut [f32], now: &[f32], read: &[f32], mean_square: &mut [f32]) {
        debug_assert_eq!(now.len(), grad.len());
        debug_assert_eq!(read.len(), grad.len());
        let lambda = self.lambda;
        if self.adaptive {
            debug_assert_eq!(mean_square.len(), grad.len());
            let (m, c) = (self.momentum, 1.0 - self.momentum);
            for (((g, &w), &b), ms) in grad.iter_mut().zip(now).zip(read).zip(mean_square) {
                *ms = m * *ms + c * (*g * *g);
                let l = lambda / (ms.sqrt() + 1e-7);
                *g += l * *g * *g * (w - b);
            }
        } else {
            for ((g, &w), &b) in grad.iter_mut().zip(now).zip(read) {
                *g += lambda * *g * *g * (w - b);
            }
        }
    }
}

impl Rule {
    /// Adam with PyTorch's defaults: β1 = 0.9, β2 = 0.999, eps = 1e-8, no
    /// weight decay.
    #[must_use]
    pub fn adam(lr: f32) -> Rule {
        Rule::Adam {
            lr,
            beta1: defaults::adam_beta1(),
            beta2: defaults::adam_beta2(),
            eps: defaults::adam_eps(),
            weight_decay: 0.0,
            decoupled: false,
        }
    }

    /// Plain SGD without weight decay.
    #[must_use]
    pub fn sgd(lr: f32) -> Rule {
        Rule::Sgd { lr, weight_decay: 0.0 }
    }

    /// The rule's name, as in the serialized `rule` tag.
    fn name(&self) -> &'static str {
        match self {
            Rule::Sgd { .. } => "sgd",
            Rule::Momentum { .. } => "momentum",
            Rule::Adagrad { .. } => "adagrad",
            Rule::Adam { .. } => "adam",
            Rule::Ftrl { .. } => "ftrl",
        }
    }

    /// Checks every hyper-parameter: all are finite; `lr`, `alpha` and `eps`
    /// are `> 0`; `momentum`, `beta1` and `beta2` are in `[0, 1)`;
    /// `dampening` is in `[0, 1]`; weight decays, `initial_accumulator`,
    /// FTRL's `beta`, `l1` and `l2` are `>= 0`. Nesterov needs `momentum > 0`
    /// and `dampening = 0` (as PyTorch). FTRL needs `beta / alpha + l2 > 0`,
    /// or the weight is undefined before the first non-zero gradient.
    ///
    /// The error names the rule and the field, e.g.
    /// `adam.beta2 must be finite and in [0, 1), got 1`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidOptimizer`] for the first offending field.
    pub fn validate(&self) -> Result<()> {
        let rule = self.name();
        let field = |name: &str, value: f32, ok: bool, want: &str| {
            if value.is_finite() && ok {
                Ok(())
            } else {
                Err(Error::InvalidOptimizer(format!("{rule}.{name} must be finite and {want}, got {value}")))
            }
        };
        let positive = |name: &str, v: f32| field(name, v, v > 0.0, "> 0");
        let non_negative = |name: &str, v: f32| field(name, v, v >= 0.0, ">= 0");
        let unit = |name: &str, v: f32| field(name, v, (0.0..1.0).contains(&v), "in [0, 1)");
        match *self {
            Rule::Sgd { lr, weight_decay } => {
                positive("lr", lr)?;
                non_negative("weight_decay", weight_decay)?;
            }
            Rule::Momentum { lr, momentum, dampening, nesterov, weight_decay } => {
                positive("lr", lr)?;
                unit("momentum", momentum)?;
                field("dampening", dampening, (0.0..=1.0).contains(&dampening), "in [0, 1]")?;
                non_negative("weight_decay", weight_decay)?;
                if nesterov && (momentum == 0.0 || dampening != 0.0) {
                    return Err(Error::InvalidOptimizer(format!(
                        "{rule}.nesterov requires momentum > 0 and dampening = 0, \
                         got momentum {momentum} and dampening {dampening}"
                    )));
                }
            }
            Rule::Adagrad { lr, eps, initial_accumulator, weight_decay } => {
                positive("lr", lr)?;
                positive("eps", eps)?;
                non_negative("initial_accumulator", initial_accumulator)?;
                non_negative("weight_decay", weight_decay)?;
            }
            Rule::Adam { lr, beta1, beta2, eps, weight_decay, decoupled: _ } => {
                positive("lr", lr)?;
                unit("beta1", beta1)?;
                unit("beta2", beta2)?;
                positive("eps", eps)?;
                non_negative("weight_decay", weight_decay)?;
            }
            Rule::Ftrl { alpha, beta, l1, l2 } => {
                positive("alpha", alpha)?;
                non_negative("beta", beta)?;
                non_negative("l1", l1)?;
                non_negative("l2", l2)?;
                if beta / alpha + l2 <= 0.0 {
                    return Err(Error::InvalidOptimizer(format!(
                        "{rule}: beta / alpha + l2 must be > 0 (the weight is undefined \
                         before the first gradient otherwise), got beta {beta}, \
                         alpha {alpha}, l2 {l2}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// How many `f32` state slots each parameter needs: SGD 0, momentum 1,
    /// Adagrad 1, Adam 2 (`m`, `v`), FTRL 2 (`z`, `n`).
    pub fn state_per_param(&self) -> usize {
        match self {
            Rule::Sgd { .. } => 0,
            Rule::Momentum { .. } | Rule::Adagrad { .. } => 1,
            Rule::Adam { .. } | Rule::Ftrl { .. } => 2,
        }
    }

    /// Fills a fresh state buffer (`state.len() == param.len() *
    /// state_per_param()`, slot-major) for a block whose initial parameters
    /// are `param`.
    ///
    /// Momentum and Adam start from zeros; Adagrad's sum starts at
    /// `initial_accumulator`.
    ///
    /// FTRL defines the weight as a function of `(z, n)`, so its state must
    /// encode the initial weights. We start with `n = 0` and pick `z` so that
    /// the closed form gives back `w` exactly (in exact arithmetic):
    ///
    /// ```text
    /// z = −(w·(beta / alpha + l2) + sign(w)·l1),  n = 0
    /// ```
    ///
    /// (`sign(0) = 0`, so zero weights give `z = 0`, the paper's start.) The
    /// first update then sees the same weight the paper's algorithm would
    /// compute at the start of the round. [`Rule::validate`] guarantees
    /// `beta / alpha + l2 > 0`, so every initial weight is representable.
    pub fn init_state(&self, param: &[f32], state: &mut [f32]) {
        let n = param.len();
        debug_assert_eq!(state.len(), n * self.state_per_param(), "state length");
        match *self {
            Rule::Sgd { .. } => {}
            Rule::Momentum { .. } | Rule::Adam { .. } => state.fill(0.0),
            Rule::Adagrad { initial_accumulator, .. } => state.fill(initial_accumulator),
            Rule::Ftrl { alpha, beta, l1, l2 } => {
                let (z, acc) = state.split_at_mut(n);
                let d = beta / alpha + l2;
                for (z, &w) in z.iter_mut().zip(param) {
                    let shift = if w == 0.0 { 0.0 } else { l1.copysign(w) };
                    *z = -(w * d + shift);
                }
                acc.fill(0.0);
            }
        }
    }

    /// Applies one update in place; returns whether every value and state
    /// it wrote is finite (the caller decides what to do with a block that
    /// is not: the store puts it back).
    ///
    /// - `step` is the 1-based count of updates applied to this block so far,
    ///   including this one (the caller stores it per block or row). Momentum
    ///   uses it to detect the first step, Adam for bias correction.
    /// - `lr_scale` multiplies the learning rate (`lr`; FTRL's `alpha`) for
    ///   this update only: 1 normally, `1 / (1 + τ)` for a gradient that is τ
    ///   versions stale. For AdamW the decay is `lr·lr_scale·weight_decay`.
    /// - `state` is the block's state, laid out as in the module docs.
    ///
    /// Preconditions, checked by the caller (only debug-asserted here):
    /// `grad.len() == param.len()`, `state.len() == param.len() *
    /// state_per_param()`, `step >= 1`, `lr_scale` finite and `> 0`, and the
    /// rule passed [`Rule::validate`].
    ///
    /// Each rule is one pass over the slices with no branch on the rule inside
    /// the loop, written so that LLVM vectorizes it. On x86-64 the loops are
    /// compiled three times (the baseline's 4 lanes, AVX2's 8, AVX-512's 16)
    /// and the widest the CPU has is picked at run time. The results are the
    /// same bit for bit whichever runs: every operation is an IEEE add, mul,
    /// div or sqrt on one lane, and no multiply-add is fused.
    pub fn apply(
        &self,
        step: u64,
        lr_scale: f32,
        param: &mut [f32],
        grad: &[f32],
        state: &mut [f32],
    ) -> bool {
        let slots = self.slots(state, param.len());
        self.apply_slots(step, lr_scale, param, grad, slots)
    }

    /// [`Rule::apply`] with the state given as its slots (`m` and `v` for
    /// Adam; an unused slot is empty), each as long as `param`: so that a
    /// caller can apply a range of a block, slot-major as it is, a tile at a
    /// time. The result is the same as applying the whole block at once: each
    /// parameter's update reads only its own values.
    pub fn apply_slots(
        &self,
        step: u64,
        lr_scale: f32,
        param: &mut [f32],
        grad: &[f32],
        slots: [&mut [f32]; 2],
    ) -> bool {
        self.at(step, lr_scale).apply_slots(param, grad, slots)
    }

    /// [`Rule::apply_slots`] that also copies each parameter's value and
    /// slots as they were before the update into `saved` (`[values, first
    /// slot, second slot]`, each as long as the slot it keeps: an unused
    /// slot's is empty), so that the caller can undo the update. The copy is
    /// made inside the update's own loop, where its stores cost almost
    /// nothing beside the arithmetic; as a pass of its own before the
    /// update, it took a seventh of a dense Adam push's time on a shard
    /// (docs/PERFORMANCE.md). The update is the same bit for bit.
    ///
    /// # Panics
    /// If a part of `saved` is not as long as what it keeps.
    pub fn apply_saving(
        &self,
        step: u64,
        lr_scale: f32,
        param: &mut [f32],
        grad: &[f32],
        slots: [&mut [f32]; 2],
        saved: [&mut [f32]; 3],
    ) -> bool {
        self.at(step, lr_scale).apply_saving(param, grad, slots, saved)
    }

    /// Update number `step` (1-based) with learning-rate scale `lr_scale`
    /// ([`Rule::apply`]), its constants worked out once: for a caller that
    /// applies one update to a block a tile at a time. Adam's bias
    /// corrections (two `powi` in f64) cost about as much as the update of
    /// a few dozen parameters, and were worked out again for every tile.
    pub fn at(&self, step: u64, lr_scale: f32) -> Update {
        let adam = match *self {
            Rule::Adam { lr, beta1, beta2, .. } => {
                // β^t underflows to 0 long before t reaches i32::MAX.
                let t = i32::try_from(step).unwrap_or(i32::MAX);
                let bias1 = 1.0 - f64::from(beta1).powi(t);
                let bias2 = 1.0 - f64::from(beta2).powi(t);
                ((f64::from(lr * lr_scale) / bias1) as f32, (1.0 / bias2.sqrt()) as f32)
            }
            _ => (0.0, 0.0),
        };
        Update { rule: *self, step, lr_scale, adam, isa: Isa::best() }
    }

    /// `state` (`n` floats per slot, slot after slot) as the rule's two
    /// slots, the unused ones empty.
    pub fn slots<'a>(&self, state: &'a mut [f32], n: usize) -> [&'a mut [f32]; 2] {
        debug_assert_eq!(state.len(), n * self.state_per_param(), "state length");
        let (first, rest) = state.split_at_mut(n.min(state.len()));
        let second_len = n.min(rest.len());
        let second = &mut rest[..second_len];
        [first, second]
    }

    /// [`Rule::apply`] with the loops of `isa` (which the CPU must have; the
    /// baseline always runs), for tests that compare them.
    #[cfg(test)]
    fn apply_as(
        &self,
        isa: Isa,
        step: u64,
        lr_scale: f32,
        param: &mut [f32],
        grad: &[f32],
        state: &mut [f32],
    ) -> bool {
        let slots = self.slots(state, param.len());
        Update { isa, ..self.at(step, lr_scale) }.apply_slots(param, grad, slots)
    }
}

/// One update of a [`Rule`] ([`Rule::at`]): the rule, its step and
/// learning-rate scale, and the constants its loop uses, worked out once.
#[derive(Debug, Clone, Copy)]
pub struct Update {
    rule: Rule,
    step: u64,
    lr_scale: f32,
    /// Adam: its step size `lr·lr_scale / (1 − β1ᵗ)` and `1 / √(1 − β2ᵗ)`.
    adam: (f32, f32),
    isa: Isa,
}

impl Update {
    /// The step (1-based) this update is.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// [`Rule::apply_slots`] with this update's step and scale.
    pub fn apply_slots(&self, param: &mut [f32], grad: &[f32], slots: [&mut [f32]; 2]) -> bool {
        self.run::<false>(param, grad, slots, [&mut [], &mut [], &mut []])
    }

    /// [`Rule::apply_saving`] with this update's step and scale.
    ///
    /// # Panics
    /// If a part of `saved` is not as long as what it keeps.
    pub fn apply_saving(
        &self,
        param: &mut [f32],
        grad: &[f32],
        slots: [&mut [f32]; 2],
        saved: [&mut [f32]; 3],
    ) -> bool {
        let lens = [param.len(), slots[0].len(), slots[1].len()];
        assert!(saved.iter().zip(lens).all(|(s, n)| s.len() == n), "saved lengths");
        self.run::<true>(param, grad, slots, saved)
    }

    /// The loops of `self.isa`, where the CPU has it (the baseline's otherwise).
    #[inline]
    fn run<const SAVE: bool>(
        &self,
        param: &mut [f32],
        grad: &[f32],
        slots: [&mut [f32]; 2],
        saved: [&mut [f32]; 3],
    ) -> bool {
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 if std::arch::is_x86_feature_detected!("avx512f") => {
                // SAFETY: the CPU has AVX-512F (checked on the line above).
                unsafe { self.apply_avx512::<SAVE>(param, grad, slots, saved) }
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 if std::arch::is_x86_feature_detected!("avx2") => {
                // SAFETY: the CPU has AVX2 (checked on the line above).
                unsafe { self.apply_avx2::<SAVE>(param, grad, slots, saved) }
            }
            _ => self.apply_loops::<SAVE>(param, grad, slots, saved),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn apply_avx2<const SAVE: bool>(
        &self,
        param: &mut [f32],
        grad: &[f32],
        slots: [&mut [f32]; 2],
        saved: [&mut [f32]; 3],
    ) -> bool {
        self.apply_loops::<SAVE>(param, grad, slots, saved)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn apply_avx512<const SAVE: bool>(
        &self,
        param: &mut [f32],
        grad: &[f32],
        slots: [&mut [f32]; 2],
        saved: [&mut [f32]; 3],
    ) -> bool {
        self.apply_loops::<SAVE>(param, grad, slots, saved)
    }

    /// The loops of [`Rule::apply`], inlined into each of its builds; with
    /// `SAVE`, each parameter's value and slots are copied into `saved`
    /// before its update ([`Rule::apply_saving`]).
    #[inline(always)]
    fn apply_loops<const SAVE: bool>(
        &self,
        param: &mut [f32],
        grad: &[f32],
        slots: [&mut [f32]; 2],
        saved: [&mut [f32]; 3],
    ) -> bool {
        let (step, lr_scale) = (self.step, self.lr_scale);
        let n = param.len();
        debug_assert_eq!(grad.len(), n, "gradient length");
        debug_assert!(
            slots.iter().take(self.rule.state_per_param()).all(|s| s.len() == n),
            "state slot length"
        );
        let [first, second] = slots;
        debug_assert!(step >= 1, "step is 1-based");
        debug_assert!(lr_scale.is_finite() && lr_scale > 0.0, "lr_scale {lr_scale}");
        match self.rule {
            Rule::Sgd { lr, weight_decay } => sgd::<SAVE>(lr * lr_scale, weight_decay, param, grad, saved),
            Rule::Momentum { lr, momentum, dampening, nesterov, weight_decay } => {
                let lr = lr * lr_scale;
                let k = MomentumConsts { lr, momentum, keep: 1.0 - dampening, weight_decay };
                match (momentum == 0.0, step == 1, nesterov) {
                    (true, _, _) => {
                        // Plain SGD leaves the buffer as it is: kept as it is.
                        let [values, buffer, unused] = saved;
                        if SAVE {
                            buffer.copy_from_slice(first);
                        }
                        sgd::<SAVE>(lr, weight_decay, param, grad, [values, &mut [], unused])
                    }
                    (false, true, false) => {
                        momentum_kernel::<SAVE, true, false>(k, param, grad, first, saved)
                    }
                    (false, true, true) => momentum_kernel::<SAVE, true, true>(k, param, grad, first, saved),
                    (false, false, false) => {
                        momentum_kernel::<SAVE, false, false>(k, param, grad, first, saved)
                    }
                    (false, false, true) => {
                        momentum_kernel::<SAVE, false, true>(k, param, grad, first, saved)
                    }
                }
            }
            Rule::Adagrad { lr, eps, initial_accumulator: _, weight_decay } => {
                let lr = lr * lr_scale;
                each1::<SAVE>(param, grad, first, saved, |p, g, s| {
                    let g = g + weight_decay * *p;
                    *s += g * g;
                    *p -= lr * (g / (s.sqrt() + eps));
                    finite(*p) & finite(*s)
                })
            }
            Rule::Adam { lr, beta1, beta2, eps, weight_decay, decoupled } => {
                let lr = lr * lr_scale;
                // One loop for both: Adam adds `l2·p` to the gradient, AdamW
                // scales `p` by `shrink` first; the other factor is neutral.
                let (l2, shrink) =
                    if decoupled { (0.0, 1.0 - lr * weight_decay) } else { (weight_decay, 1.0) };
                let (step_size, inv_sqrt_bias2) = self.adam;
                let (c1, c2) = (1.0 - beta1, 1.0 - beta2);
                each2::<SAVE>(param, grad, first, second, saved, |p, g, m, v| {
                    let g = g + l2 * *p;
                    *p *= shrink;
                    *m = beta1 * *m + c1 * g;
                    *v = beta2 * *v + c2 * (g * g);
                    let denom = v.sqrt() * inv_sqrt_bias2 + eps;
                    *p -= step_size * (*m / denom);
                    finite(*p) & finite(*m) & finite(*v)
                })
            }
            Rule::Ftrl { alpha, beta, l1, l2 } => {
                let inv_alpha = 1.0 / (alpha * lr_scale);
                each2::<SAVE>(param, grad, first, second, saved, |w, g, z, acc| {
                    let sqrt_old = acc.sqrt();
                    *acc += g * g;
                    let sqrt_new = acc.sqrt();
                    let sigma = (sqrt_new - sqrt_old) * inv_alpha;
                    *z += g - sigma * *w;
                    let denom = (beta + sqrt_new) * inv_alpha + l2;
                    // `l1.copysign(z)` is sign(z)·l1 whenever |z| > l1 >= 0.
                    *w = if z.abs() <= l1 { 0.0 } else { (l1.copysign(*z) - *z) / denom };
                    finite(*w) & finite(*z) & finite(*acc)
                })
            }
        }
    }
}

/// Runs `update` on each parameter with its gradient and returns whether
/// every call returned true; with `SAVE`, copies the parameter into
/// `saved[0]` first. [`each1`] and [`each2`] do the same with one and two
/// slots of state.
#[inline(always)]
fn each0<const SAVE: bool>(
    param: &mut [f32],
    grad: &[f32],
    saved: [&mut [f32]; 3],
    mut update: impl FnMut(&mut f32, f32) -> bool,
) -> bool {
    let mut ok = true;
    if SAVE {
        let [sp, ..] = saved;
        for ((p, &g), sp) in param.iter_mut().zip(grad).zip(sp) {
            *sp = *p;
            ok &= update(p, g);
        }
    } else {
        for (p, &g) in param.iter_mut().zip(grad) {
            ok &= update(p, g);
        }
    }
    ok
}

#[inline(always)]
fn each1<const SAVE: bool>(
    param: &mut [f32],
    grad: &[f32],
    a: &mut [f32],
    saved: [&mut [f32]; 3],
    mut update: impl FnMut(&mut f32, f32, &mut f32) -> bool,
) -> bool {
    let mut ok = true;
    if SAVE {
        let [sp, sa, _] = saved;
        for (((p, &g), a), (sp, sa)) in param.iter_mut().zip(grad).zip(a).zip(sp.iter_mut().zip(sa)) {
            (*sp, *sa) = (*p, *a);
            ok &= update(p, g, a);
        }
    } else {
        for ((p, &g), a) in param.iter_mut().zip(grad).zip(a) {
            ok &= update(p, g, a);
        }
    }
    ok
}

#[inline(always)]
fn each2<const SAVE: bool>(
    param: &mut [f32],
    grad: &[f32],
    a: &mut [f32],
    b: &mut [f32],
    saved: [&mut [f32]; 3],
    mut update: impl FnMut(&mut f32, f32, &mut f32, &mut f32) -> bool,
) -> bool {
    let mut ok = true;
    if SAVE {
        let [sp, sa, sb] = saved;
        let saved = sp.iter_mut().zip(sa).zip(sb);
        for ((((p, &g), a), b), ((sp, sa), sb)) in param.iter_mut().zip(grad).zip(a).zip(b).zip(saved) {
            (*sp, *sa, *sb) = (*p, *a, *b);
            ok &= update(p, g, a, b);
        }
    } else {
        for (((p, &g), a), b) in param.iter_mut().zip(grad).zip(a).zip(b) {
            ok &= update(p, g, a, b);
        }
    }
    ok
}

/// The vector instructions [`Rule::apply`] runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    Baseline,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    /// The widest this CPU has (std caches the detection).
    #[inline]
    fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return Isa::Avx2;
            }
        }
        Isa::Baseline
    }
}

/// `p ← p − lr·(g + weight_decay·p)`.
#[inline(always)]
fn sgd<const SAVE: bool>(
    lr: f32,
    weight_decay: f32,
    param: &mut [f32],
    grad: &[f32],
    saved: [&mut [f32]; 3],
) -> bool {
    each0::<SAVE>(param, grad, saved, |p, g| {
        let g = g + weight_decay * *p;
        *p -= lr * g;
        finite(*p)
    })
}

/// Whether `x` is finite, as a comparison the rules' loops vectorize (NaN
/// compares false).
#[inline(always)]
fn finite(x: f32) -> bool {
    x.abs() <= f32::MAX
}

#[derive(Clone, Copy)]
struct MomentumConsts {
    lr: f32,
    momentum: f32,
    /// `1 − dampening`.
    keep: f32,
    weight_decay: f32,
}

/// The momentum update, specialized on the first step and on Nesterov so the
/// loop body has no branches.
#[inline(always)]
fn momentum_kernel<const SAVE: bool, const FIRST: bool, const NESTEROV: bool>(
    k: MomentumConsts,
    param: &mut [f32],
    grad: &[f32],
    buf: &mut [f32],
    saved: [&mut [f32]; 3],
) -> bool {
    each1::<SAVE>(param, grad, buf, saved, |p, g, b| {
        let g = g + k.weight_decay * *p;
        *b = if FIRST { g } else { k.momentum * *b + k.keep * g };
        let d = if NESTEROV { g + k.momentum * *b } else { *b };
        *p -= k.lr * d;
        finite(*p) & finite(*b)
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use proptest::sample::Index;

    use super::*;

    // ---------------------------------------------------------------------
    // Fixed reference values.
    //
    // The expected numbers were printed by this Python script (plain f64
    // floats), written from the algorithm boxes of the PyTorch docs for
    // torch.optim.SGD, Adagrad, Adam and AdamW, and from Algorithm 1 of
    // McMahan et al. (KDD 2013) for FTRL-proximal:
    //
    // import math
    // P0 = [1.0, -0.5, 0.0, 2.0]
    // G = [[0.5, -1.0, 2.0, 0.0], [-0.3, -0.8, 1.5, 0.1], [0.2, 0.4, -2.5, 0.0],
    //      [1.0, -0.2, 0.7, -0.05], [-0.6, 0.9, 0.3, 0.2]]
    //
    // def sgd(lr, mu=0.0, tau=0.0, nesterov=False, wd=0.0, T=5):
    //     th = list(P0); b = [0.0] * 4
    //     for t in range(1, T + 1):
    //         for i in range(4):
    //             g = G[t - 1][i]
    //             if wd != 0: g = g + wd * th[i]
    //             if mu != 0:
    //                 b[i] = mu * b[i] + (1 - tau) * g if t > 1 else g
    //                 g = g + mu * b[i] if nesterov else b[i]
    //             th[i] = th[i] - lr * g
    //     return th
    //
    // def adagrad(lr, eps=1e-10, init=0.0, wd=0.0, T=5):
    //     th = list(P0); s = [init] * 4
    //     for t in range(1, T + 1):
    //         for i in range(4):
    //             g = G[t - 1][i]
    //             if wd != 0: g = g + wd * th[i]
    //             s[i] = s[i] + g * g
    //             th[i] = th[i] - lr * g / (math.sqrt(s[i]) + eps)
    //     return th
    //
    // def adam(lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.0, adamw=False, T=5):
    //     th = list(P0); m = [0.0] * 4; v = [0.0] * 4
    //     for t in range(1, T + 1):
    //         for i in range(4):
    //             g = G[t - 1][i]
    //             if adamw: th[i] = th[i] - lr * wd * th[i]
    //             elif wd != 0: g = g + wd * th[i]
    //             m[i] = b1 * m[i] + (1 - b1) * g
    //             v[i] = b2 * v[i] + (1 - b2) * g * g
    //             mh = m[i] / (1 - b1 ** t); vh = v[i] / (1 - b2 ** t)
    //             th[i] = th[i] - lr * mh / (math.sqrt(vh) + eps)
    //     return th
    //
    // def ftrl(alpha, beta=1.0, l1=0.0, l2=0.0, T=5):
    //     sgn = lambda x: (x > 0) - (x < 0)
    //     def weight(z, n):
    //         return 0.0 if abs(z) <= l1 else -(z - sgn(z) * l1) / ((beta + math.sqrt(n)) / alpha + l2)
    //     # Initial state (optim.rs's documented choice): n = 0 and z chosen so that
    //     # the closed-form weight of the paper equals the initial parameter.
    //     z = [-(w * (beta / alpha + l2) + sgn(w) * l1) for w in P0]; n = [0.0] * 4
    //     assert all(abs(weight(z[i], n[i]) - P0[i]) < 1e-12 for i in range(4))
    //     for t in range(1, T + 1):
    //         for i in range(4):
    //             w = weight(z[i], n[i]); g = G[t - 1][i]
    //             sigma = (math.sqrt(n[i] + g * g) - math.sqrt(n[i])) / alpha
    //             z[i] += g - sigma * w
    //             n[i] += g * g
    //     return [weight(z[i], n[i]) for i in range(4)]
    //
    // print(sgd(0.1, mu=0.9, nesterov=True))  # and so on, one call per case below
    // ---------------------------------------------------------------------

    const P0: [f32; 4] = [1.0, -0.5, 0.0, 2.0];
    const G: [[f32; 4]; 5] = [
        [0.5, -1.0, 2.0, 0.0],
        [-0.3, -0.8, 1.5, 0.1],
        [0.2, 0.4, -2.5, 0.0],
        [1.0, -0.2, 0.7, -0.05],
        [-0.6, 0.9, 0.3, 0.2],
    ];

    /// Runs `steps` updates from `P0` (step `t` uses `grads[(t - 1) % len]`)
    /// and compares with `expected` to 1e-6 relative to the parameter scale
    /// (about 1 here; f32 rounding over five steps stays well below that).
    #[track_caller]
    fn check(rule: Rule, steps: u64, grads: &[[f32; 4]], expected: [f64; 4]) {
        rule.validate().unwrap();
        let mut param = P0;
        let mut state = vec![f32::NAN; P0.len() * rule.state_per_param()];
        rule.init_state(&param, &mut state);
        for t in 1..=steps {
            let g = &grads[(t as usize - 1) % grads.len()];
            rule.apply(t, 1.0, &mut param, g, &mut state);
        }
        for (i, (&got, want)) in param.iter().zip(expected).enumerate() {
            let diff = (f64::from(got) - want).abs();
            assert!(
                diff <= 1e-6 * (1.0 + want.abs()),
                "{rule:?}: param {i} is {got}, expected {want} (|diff| {diff:e})"
            );
        }
    }

    /// DC-ASGD against values computed by hand (plain f64 Python, from the
    /// formulas of Zheng et al., Algorithm 1 and the DC-ASGD-a variant): SGD
    /// lr 0.1 from `P0` over the five gradients of `G`, each computed at the
    /// parameters of two updates before (the worker's read), compensated,
    /// then applied:
    ///
    /// ```text
    /// def dc(lr, lam, adaptive=False, m=0.95, delay=2, T=5):
    ///     hist = [list(P0)]; w = list(P0); ms = [0.0]*4
    ///     for t in range(1, T+1):
    ///         read = hist[max(0, t-1-delay)]
    ///         for i in range(4):
    ///             g = G[t-1][i]
    ///             if adaptive:
    ///                 ms[i] = m*ms[i] + (1-m)*g*g
    ///                 l = lam/(math.sqrt(ms[i]) + 1e-7)
    ///             else:
    ///                 l = lam
    ///             g = g + l*g*g*(w[i]-read[i])
    ///             w[i] = w[i] - lr*g
    ///         hist.append(list(w))
    ///     return w
    /// ```
    #[test]
    #[rustfmt::skip] // one case per line
    fn delay_compensation_matches_hand_computed_values() {
        let run = |dc: DelayCompensation, expected: [f64; 4]| {
            dc.validate().unwrap();
            let rule = Rule::sgd(0.1);
            let mut hist = vec![P0];
            let mut param = P0;
            let mut ms = vec![0.0f32; 4 * dc.state_per_param()];
            for (t, g) in G.iter().enumerate() {
                let read = hist[t.saturating_sub(2)];
                let mut g = *g;
                dc.compensate(&mut g, &param, &read, &mut ms);
                rule.apply(t as u64 + 1, 1.0, &mut param, &g, &mut []);
                hist.push(param);
            }
            for (i, (&got, want)) in param.iter().zip(expected).enumerate() {
                let diff = (f64::from(got) - want).abs();
                assert!(diff <= 1e-6 * (1.0 + want.abs()), "{dc:?}: param {i} is {got}, expected {want}");
            }
        };
        let dc = |lambda, adaptive| DelayCompensation { lambda, adaptive, momentum: 0.95 };
        // lambda = 0 is plain SGD (sgd_matches_pytorch_values).
        run(dc(0.0, false), [9.200000000e-01, -4.300000000e-01, -2.000000000e-01, 1.975000000e+00]);
        run(dc(0.5, false), [9.219198487e-01, -4.338150218e-01, -8.191067973e-02, 1.974991247e+00]);
        run(dc(2.0, true), [9.475963995e-01, -4.735241618e-01, 1.829070923e-01, 1.974382758e+00]);
        assert!(dc(-1.0, false).validate().is_err());
        assert!(DelayCompensation { momentum: 1.0, ..dc(0.1, true) }.validate().is_err());
    }

    #[test]
    #[rustfmt::skip] // one case per line
    fn sgd_matches_pytorch_values() {
        check(Rule::sgd(0.1), 5, &G, [9.200000000e-01, -4.300000000e-01, -2.000000000e-01, 1.975000000e+00]);
        check(Rule::Sgd { lr: 0.1, weight_decay: 0.1 }, 5, &G, [8.734672194e-01, -4.112155040e-01, -1.919390520e-01, 1.877227110e+00]);
    }

    #[test]
    #[rustfmt::skip] // one case per line
    fn momentum_matches_pytorch_values() {
        let m = |momentum, dampening, nesterov, weight_decay| Rule::Momentum {
            lr: 0.1,
            momentum,
            dampening,
            nesterov,
            weight_decay,
        };
        check(m(0.9, 0.0, false, 0.0), 5, &G, [7.142150000e-01, 2.423000000e-02, -8.203700000e-01, 1.955110000e+00]);
        check(m(0.9, 0.0, true, 0.0), 5, &G, [6.627935000e-01, 4.180700000e-02, -9.383330000e-01, 1.934599000e+00]);
        check(m(0.9, 0.5, false, 0.05), 5, &G, [7.139553685e-01, -1.675008297e-02, -8.105394407e-01, 1.892066329e+00]);
        // momentum = 0 is plain SGD in PyTorch, whatever the dampening.
        check(m(0.0, 0.5, false, 0.0), 5, &G, [9.200000000e-01, -4.300000000e-01, -2.000000000e-01, 1.975000000e+00]);
    }

    #[test]
    #[rustfmt::skip] // one case per line
    fn adagrad_matches_pytorch_values() {
        let a = |eps, initial_accumulator, weight_decay| Rule::Adagrad {
            lr: 0.1,
            eps,
            initial_accumulator,
            weight_decay,
        };
        check(a(1e-10, 0.0, 0.0), 5, &G, [8.793655209e-01, -4.078870999e-01, -1.170063191e-01, 1.857434204e+00]);
        check(a(1e-3, 0.1, 0.1), 5, &G, [8.573010974e-01, -4.039971162e-01, -1.142900229e-01, 1.764379575e+00]);
    }

    #[test]
    #[rustfmt::skip] // one case per line
    fn adam_matches_pytorch_values() {
        let a = |beta2, eps, weight_decay, decoupled| Rule::Adam {
            lr: 0.01,
            beta1: 0.9,
            beta2,
            eps,
            weight_decay,
            decoupled,
        };
        check(Rule::adam(0.01), 5, &G, [9.758057755e-01, -4.688590733e-01, -2.446721027e-02, 1.979766519e+00]);
        check(a(0.999, 1e-3, 0.1, false), 5, &G, [9.694114891e-01, -4.673862755e-01, -2.443024040e-02, 1.951377519e+00]);
        check(a(0.99, 1e-8, 0.1, true), 5, &G, [9.708942009e-01, -4.664105532e-01, -2.440853377e-02, 1.969871506e+00]);
    }

    #[test]
    #[rustfmt::skip] // one case per line
    fn ftrl_matches_paper_values() {
        let f = |l1| Rule::Ftrl { alpha: 0.5, beta: 1.0, l1, l2: 0.1 };
        check(f(1.0), 5, &G, [7.724365936e-01, -2.945829027e-01, -2.099502324e-01, 1.899861799e+00]);
        // A larger l1 keeps the coordinate that starts at 0 at exactly 0.
        check(f(3.0), 5, &G, [7.724365936e-01, -2.945829027e-01, 0.0, 1.899861799e+00]);
    }

    #[test]
    fn constructors_use_pytorch_defaults() {
        assert_eq!(
            Rule::adam(1e-3),
            Rule::Adam { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, decoupled: false }
        );
        assert_eq!(Rule::sgd(0.5), Rule::Sgd { lr: 0.5, weight_decay: 0.0 });
        assert_eq!([Rule::sgd(1.0), Rule::adam(1.0)].map(|r| r.state_per_param()), [0, 2]);
    }

    #[test]
    fn validate_names_field_and_reason() {
        let err = |rule: Rule| rule.validate().unwrap_err().to_string();
        assert_eq!(
            err(Rule::Adam {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 1.0,
                eps: 1e-8,
                weight_decay: 0.0,
                decoupled: false
            }),
            "invalid optimizer settings: adam.beta2 must be finite and in [0, 1), got 1"
        );
        assert_eq!(
            err(Rule::Sgd { lr: 0.0, weight_decay: 0.0 }),
            "invalid optimizer settings: sgd.lr must be finite and > 0, got 0"
        );
        let momentum = |momentum, dampening, nesterov| Rule::Momentum {
            lr: 0.1,
            momentum,
            dampening,
            nesterov,
            weight_decay: 0.0,
        };
        assert!(
            err(momentum(0.9, 0.1, true))
                .contains("momentum.nesterov requires momentum > 0 and dampening = 0")
        );
        assert!(err(momentum(0.0, 0.0, true)).contains("momentum.nesterov requires"));
        assert!(
            err(momentum(1.0, 0.0, false)).contains("momentum.momentum must be finite and in [0, 1), got 1")
        );
        assert!(
            err(Rule::Ftrl { alpha: 1.0, beta: 0.0, l1: 1.0, l2: 0.0 })
                .contains("beta / alpha + l2 must be > 0")
        );
        Rule::Ftrl { alpha: 1.0, beta: 0.0, l1: 0.0, l2: 0.1 }.validate().unwrap();
    }

    #[test]
    fn adam_bias_correction_survives_huge_steps() {
        let rule = Rule::adam(0.1);
        let (mut p, mut state) = ([1.0f32], [0.0f32; 2]);
        rule.apply(u64::MAX, 1.0, &mut p, &[1.0], &mut state);
        // Both corrections are 1: p = 1 − lr·(1 − β1)·g / (√((1 − β2)·g²) + eps),
        // with the hyper-parameters as the f32 values the rule holds.
        let f = |x: f32| f64::from(x);
        let want = 1.0 - f(0.1) * (1.0 - f(0.9)) / ((1.0 - f(0.999)).sqrt() + f(1e-8));
        assert!((f64::from(p[0]) - want).abs() < 1e-6, "{} vs {want}", p[0]);
    }

    // ---------------------------------------------------------------------
    // Property tests against an f64 reference implementation.
    // ---------------------------------------------------------------------

    /// One random training run of a block.
    #[derive(Debug, Clone)]
    struct Case {
        param: Vec<f32>,
        grads: Vec<Vec<f32>>,
        /// One learning-rate scale per step.
        lr_scales: Vec<f32>,
        /// The step number of the first update (later than 1 for a block
        /// whose state was reset, or to exercise bias correction at large t).
        first_step: u64,
    }

    fn case() -> impl Strategy<Value = Case> {
        (1usize..64, 1usize..20).prop_flat_map(|(len, steps)| {
            // Exact zeros are common in sparse gradients and are edge cases
            // for Adam, Adagrad and FTRL.
            let grad = prop_oneof![1 => Just(0.0f32), 5 => -10.0f32..10.0];
            (
                prop::collection::vec(-10.0f32..10.0, len),
                prop::collection::vec(prop::collection::vec(grad, len), steps),
                prop::collection::vec(prop_oneof![Just(1.0f32), 0.05f32..1.0], steps),
                prop_oneof![4 => Just(1u64), 2 => 2u64..1_000_000, 1 => Just(u64::MAX - 32)],
            )
                .prop_map(|(param, grads, lr_scales, first_step)| Case {
                    param,
                    grads,
                    lr_scales,
                    first_step,
                })
        })
    }

    /// `10^e` for `e` uniform in `[log10 lo, log10 hi)`.
    fn log_uniform(lo: f64, hi: f64) -> impl Strategy<Value = f32> {
        (lo.log10()..hi.log10()).prop_map(|e| 10f64.powf(e) as f32)
    }

    /// Exactly zero a quarter of the time (the default of most fields).
    fn or_zero(s: impl Strategy<Value = f32>) -> impl Strategy<Value = f32> {
        prop_oneof![1 => Just(0.0f32), 3 => s]
    }

    fn sgd_rule() -> impl Strategy<Value = Rule> {
        (log_uniform(1e-4, 1.0), or_zero(0.0f32..0.1))
            .prop_map(|(lr, weight_decay)| Rule::Sgd { lr, weight_decay })
    }

    fn momentum_rule() -> impl Strategy<Value = Rule> {
        (
            log_uniform(1e-4, 1.0),
            or_zero(0.0f32..0.99),
            or_zero(0.0f32..=1.0),
            any::<bool>(),
            or_zero(0.0f32..0.1),
        )
            .prop_map(|(lr, momentum, dampening, nesterov, weight_decay)| {
                let nesterov = nesterov && momentum > 0.0;
                let dampening = if nesterov { 0.0 } else { dampening };
                Rule::Momentum { lr, momentum, dampening, nesterov, weight_decay }
            })
    }

    fn adagrad_rule() -> impl Strategy<Value = Rule> {
        (log_uniform(1e-4, 1.0), log_uniform(1e-10, 1.0), or_zero(0.0f32..1.0), or_zero(0.0f32..0.1))
            .prop_map(|(lr, eps, initial_accumulator, weight_decay)| Rule::Adagrad {
                lr,
                eps,
                initial_accumulator,
                weight_decay,
            })
    }

    fn adam_rule() -> impl Strategy<Value = Rule> {
        (
            log_uniform(1e-4, 1.0),
            prop_oneof![Just(0.9f32), or_zero(0.0f32..0.99)],
            // Not below 0.5: with β2 near 0 and L2 decay the step is about
            // m / |g + wd·p|, which amplifies rounding without bound as
            // g + wd·p nears 0, so no f32 result is "close" to the f64 one.
            prop_oneof![Just(0.999f32), 0.5f32..0.99999],
            // A wide eps range: where eps goes (inside or outside the square
            // root, before or after bias correction) only shows when eps is
            // not negligible next to √v̂.
            log_uniform(1e-10, 1.0),
            or_zero(0.0f32..0.1),
            any::<bool>(),
        )
            .prop_map(|(lr, beta1, beta2, eps, weight_decay, decoupled)| Rule::Adam {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
                decoupled,
            })
    }

    fn ftrl_rule() -> impl Strategy<Value = Rule> {
        (log_uniform(1e-3, 10.0), or_zero(0.0f32..2.0), or_zero(0.0f32..2.0), or_zero(0.0f32..2.0))
            .prop_map(|(alpha, beta, l1, l2)| Rule::Ftrl { alpha, beta, l1, l2 })
            .prop_filter("beta / alpha + l2 > 0", |rule| rule.validate().is_ok())
    }

    fn any_rule() -> impl Strategy<Value = Rule> {
        prop_oneof![sgd_rule(), momentum_rule(), adagrad_rule(), adam_rule(), ftrl_rule()]
    }

    /// The fast f32 path: `init_state`, then one `apply` per gradient.
    fn run_f32(rule: Rule, case: &Case) -> Vec<f32> {
        let mut param = case.param.clone();
        // NaN, so a slot `init_state` forgets poisons the result.
        let mut state = vec![f32::NAN; param.len() * rule.state_per_param()];
        rule.init_state(&param, &mut state);
        for (k, (grad, &lr_scale)) in case.grads.iter().zip(&case.lr_scales).enumerate() {
            rule.apply(case.first_step + k as u64, lr_scale, &mut param, grad, &mut state);
        }
        param
    }

    /// The reference: each coordinate on its own, in f64, written from the
    /// formulas (PyTorch docs; McMahan et al. Algorithm 1) rather than from
    /// the fast code. Hyper-parameters are the same f32 values widened to f64,
    /// so differences come from f32 arithmetic only.
    ///
    /// Returns `(value, scale)` per coordinate. `scale` is the size of the
    /// largest quantities, in units of the parameter, that the result was
    /// computed from: the largest |p| along the way plus the magnitudes of
    /// every update term (built from |g| + wd·|p| and absolute values of the
    /// moment buffers, so cancellation inside a term is accounted for). Each
    /// f32 operation errs by at most 2^-24 of its operands' size, so the f32
    /// result is off by a small multiple of 2^-24 · scale.
    fn run_f64(rule: Rule, case: &Case) -> Vec<(f64, f64)> {
        let f = f64::from;
        let steps = || case.grads.iter().zip(&case.lr_scales).enumerate();
        (0..case.param.len())
            .map(|i| {
                let mut p = f(case.param[i]);
                let mut scale = p.abs();
                let mut largest_p = p.abs();
                match rule {
                    Rule::Sgd { lr, weight_decay: wd } => {
                        for (_, (grad, &s)) in steps() {
                            let lr = f(lr) * f(s);
                            let g = f(grad[i]) + f(wd) * p;
                            scale += lr * (f(grad[i]).abs() + f(wd) * p.abs());
                            p -= lr * g;
                            largest_p = largest_p.max(p.abs());
                        }
                    }
                    Rule::Momentum { lr, momentum: mu, dampening: tau, nesterov, weight_decay: wd } => {
                        let (mu, tau, wd) = (f(mu), f(tau), f(wd));
                        let (mut b, mut b_abs) = (0.0f64, 0.0f64);
                        for (k, (grad, &s)) in steps() {
                            let t = case.first_step + k as u64;
                            let lr = f(lr) * f(s);
                            let mut g = f(grad[i]) + wd * p;
                            let g_abs = f(grad[i]).abs() + wd * p.abs();
                            let step_abs;
                            if mu != 0.0 {
                                if t > 1 {
                                    b = mu * b + (1.0 - tau) * g;
                                    b_abs = mu * b_abs + (1.0 - tau) * g_abs;
                                } else {
                                    b = g;
                                    b_abs = g_abs;
                                }
                                if nesterov {
                                    g += mu * b;
                                    step_abs = g_abs + mu * b_abs;
                                } else {
                                    g = b;
                                    step_abs = b_abs;
                                }
                            } else {
                                step_abs = g_abs;
                            }
                            scale += lr * step_abs;
                            p -= lr * g;
                            largest_p = largest_p.max(p.abs());
                        }
                    }
                    Rule::Adagrad { lr, eps, initial_accumulator, weight_decay: wd } => {
                        let mut sum = f(initial_accumulator);
                        for (_, (grad, &s)) in steps() {
                            let lr = f(lr) * f(s);
                            let g = f(grad[i]) + f(wd) * p;
                            let g_abs = f(grad[i]).abs() + f(wd) * p.abs();
                            sum += g * g;
                            let denom = sum.sqrt() + f(eps);
                            scale += lr * g_abs / denom;
                            p -= lr * g / denom;
                            largest_p = largest_p.max(p.abs());
                        }
                    }
                    Rule::Adam { lr, beta1, beta2, eps, weight_decay, decoupled } => {
                        let (b1, b2, eps, wd) = (f(beta1), f(beta2), f(eps), f(weight_decay));
                        let (mut m, mut v, mut m_abs) = (0.0f64, 0.0f64, 0.0f64);
                        for (k, (grad, &s)) in steps() {
                            let t = (case.first_step + k as u64) as f64;
                            let lr = f(lr) * f(s);
                            let mut g = f(grad[i]);
                            let mut g_abs = g.abs();
                            if decoupled {
                                p -= lr * wd * p;
                            } else {
                                g += wd * p;
                                g_abs += wd * p.abs();
                            }
                            m = b1 * m + (1.0 - b1) * g;
                            m_abs = b1 * m_abs + (1.0 - b1) * g_abs;
                            v = b2 * v + (1.0 - b2) * g * g;
                            let m_hat = m / (1.0 - b1.powf(t));
                            let v_hat = v / (1.0 - b2.powf(t));
                            let denom = v_hat.sqrt() + eps;
                            scale += lr * m_abs / (1.0 - b1.powf(t)) / denom;
                            p -= lr * m_hat / denom;
                            largest_p = largest_p.max(p.abs());
                        }
                    }
                    Rule::Ftrl { alpha, beta, l1, l2 } => {
                        let (beta, l1, l2) = (f(beta), f(l1), f(l2));
                        let sign = |x: f64| {
                            if x > 0.0 {
                                1.0
                            } else if x < 0.0 {
                                -1.0
                            } else {
                                0.0
                            }
                        };
                        let weight = |z: f64, n: f64, alpha: f64| {
                            if z.abs() <= l1 {
                                0.0
                            } else {
                                -(z - sign(z) * l1) / ((beta + n.sqrt()) / alpha + l2)
                            }
                        };
                        // The documented initial state: n = 0, and z such that
                        // the closed-form weight is the initial parameter.
                        let mut z = -(p * (beta / f(alpha) + l2) + sign(p) * l1);
                        let mut n = 0.0f64;
                        let mut z_abs = z.abs();
                        for (_, (grad, &s)) in steps() {
                            let alpha = f(alpha) * f(s);
                            let g = f(grad[i]);
                            let sigma = ((n + g * g).sqrt() - n.sqrt()) / alpha;
                            z += g - sigma * p;
                            n += g * g;
                            z_abs += g.abs() + n.sqrt() / alpha * p.abs();
                            p = weight(z, n, alpha);
                            let denom = (beta + n.sqrt()) / alpha + l2;
                            largest_p = largest_p.max(p.abs());
                            scale = scale.max((z_abs + l1) / denom);
                        }
                    }
                }
                (p, largest_p + scale)
            })
            .collect()
    }

    /// Allowed error per unit of scale: 32 f32 epsilons (≈ 3.8e-6). Up to 20
    /// steps of a handful of operations, each off by at most half an epsilon
    /// of its operands, could in the worst case add up to ~50 epsilons, but
    /// rounding errors mostly cancel: over 50,000 random cases per rule the
    /// largest error seen was 5 epsilons (Adam; 2–3 for the others). 32 keeps
    /// a wide margin against flakiness while a misplaced eps, a missing bias
    /// correction or a wrong first momentum step change results by percents.
    const TOLERANCE: f64 = 32.0 * f32::EPSILON as f64;

    fn assert_matches_reference(rule: Rule, case: &Case) -> std::result::Result<(), TestCaseError> {
        prop_assert!(rule.validate().is_ok(), "{:?}", rule.validate());
        let got = run_f32(rule, case);
        for (i, (&a, (b, scale))) in got.iter().zip(run_f64(rule, case)).enumerate() {
            let (diff, tol) = ((f64::from(a) - b).abs(), TOLERANCE * (1.0 + scale));
            prop_assert!(
                diff <= tol,
                "param {i}: f32 gives {a}, f64 reference {b}; |diff| {diff:e} > {tol:e}"
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn sgd_matches_f64_reference(rule in sgd_rule(), case in case()) {
            assert_matches_reference(rule, &case)?;
        }

        #[test]
        fn momentum_matches_f64_reference(rule in momentum_rule(), case in case()) {
            assert_matches_reference(rule, &case)?;
        }

        #[test]
        fn adagrad_matches_f64_reference(rule in adagrad_rule(), case in case()) {
            assert_matches_reference(rule, &case)?;
        }

        #[test]
        fn adam_matches_f64_reference(rule in adam_rule(), case in case()) {
            assert_matches_reference(rule, &case)?;
        }

        #[test]
        fn ftrl_matches_f64_reference(rule in ftrl_rule(), case in case()) {
            assert_matches_reference(rule, &case)?;
        }

        #[test]
        fn validate_rejects_non_finite_and_negative(rule in any_rule(), which in any::<Index>(), bad in bad_value()) {
            prop_assert!(rule.validate().is_ok(), "{:?}", rule.validate());
            let mut broken = rule;
            let mut fields = float_fields(&mut broken);
            let i = which.index(fields.len());
            let (name, slot) = &mut fields[i];
            let name = *name;
            **slot = bad;
            let err = broken.validate().expect_err("a broken rule validated").to_string();
            let prefix = format!("{}.{name} must", rule.name());
            prop_assert!(err.contains(&prefix), "{err:?} does not start with {prefix:?}");
        }

        /// Every build of the loops (baseline, AVX2, AVX-512, as far as the
        /// CPU has them) gives the same bits: params and state after every
        /// step, lengths that leave every kind of tail.
        #[test]
        fn every_vector_width_gives_the_same_bits(rule in any_rule(), case in case()) {
            let run = |isa: Isa| {
                let mut param = case.param.clone();
                let mut state = vec![0.0; param.len() * rule.state_per_param()];
                rule.init_state(&param, &mut state);
                let mut seen = Vec::new();
                for (k, (grad, &lr_scale)) in case.grads.iter().zip(&case.lr_scales).enumerate() {
                    rule.apply_as(isa, case.first_step + k as u64, lr_scale, &mut param, grad, &mut state);
                    seen.extend(param.iter().chain(&state).map(|v| v.to_bits()));
                }
                seen
            };
            let baseline = run(Isa::Baseline);
            #[cfg(target_arch = "x86_64")]
            for isa in [Isa::Avx2, Isa::Avx512] {
                prop_assert!(run(isa) == baseline, "{isa:?} differs from the baseline for {rule:?}");
            }
            prop_assert_eq!(run(Isa::best()), baseline);
        }

        /// `apply` says whether what it wrote is finite, in every build of
        /// the loops: values near `f32::MAX` and huge gradients overflow
        /// some parameters, in any position.
        #[test]
        fn apply_says_whether_everything_it_wrote_is_finite(
            rule in any_rule(),
            cells in prop::collection::vec(
                (prop_oneof![4 => -10.0f32..10.0, 1 => Just(3e38f32), 1 => Just(-3e38f32)],
                 prop_oneof![4 => -10.0f32..10.0, 1 => Just(2e19f32), 1 => Just(-1e38f32)]),
                1..40,
            ),
        ) {
            let (param, grad): (Vec<f32>, Vec<f32>) = cells.into_iter().unzip();
            #[cfg(target_arch = "x86_64")]
            let isas = [Isa::Baseline, Isa::Avx2, Isa::Avx512];
            #[cfg(not(target_arch = "x86_64"))]
            let isas = [Isa::Baseline];
            for isa in isas {
                let mut param = param.clone();
                let mut state = vec![0.0; param.len() * rule.state_per_param()];
                rule.init_state(&param, &mut state);
                let said = rule.apply_as(isa, 2, 1.0, &mut param, &grad, &mut state);
                let finite = param.iter().chain(&state).all(|v| v.is_finite());
                prop_assert_eq!(said, finite, "{:?} with {:?}", isa, rule);
            }
        }

        /// `apply_saving` updates as `apply` does, bit for bit, in every
        /// build of the loops, and keeps each value and slot as it was.
        #[test]
        fn apply_saving_keeps_what_it_overwrote(rule in any_rule(), case in case()) {
            #[cfg(target_arch = "x86_64")]
            let isas = [Isa::Baseline, Isa::Avx2, Isa::Avx512];
            #[cfg(not(target_arch = "x86_64"))]
            let isas = [Isa::Baseline];
            for isa in isas {
                let n = case.param.len();
                let (mut plain, mut saving) = (case.param.clone(), case.param.clone());
                let mut plain_state = vec![0.0; n * rule.state_per_param()];
                rule.init_state(&plain, &mut plain_state);
                let mut saving_state = plain_state.clone();
                for (k, (grad, &lr_scale)) in case.grads.iter().zip(&case.lr_scales).enumerate() {
                    let step = case.first_step + k as u64;
                    let before: Vec<f32> = saving.iter().chain(&saving_state).copied().collect();
                    let said_plain = rule.apply_as(isa, step, lr_scale, &mut plain, grad, &mut plain_state);
                    let slots = rule.slots(&mut saving_state, n);
                    let mut kept = vec![f32::NAN; n + slots[0].len() + slots[1].len()];
                    let (kept_values, rest) = kept.split_at_mut(n);
                    let (kept_first, kept_second) = rest.split_at_mut(slots[0].len());
                    let update = Update { isa, ..rule.at(step, lr_scale) };
                    let said = update.apply_saving(&mut saving, grad, slots,
                        [kept_values, kept_first, kept_second]);
                    prop_assert_eq!(said, said_plain);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    prop_assert_eq!(bits(&saving), bits(&plain), "{:?}: values", isa);
                    prop_assert_eq!(bits(&saving_state), bits(&plain_state), "{:?}: state", isa);
                    prop_assert_eq!(bits(&kept), bits(&before), "{:?}: kept", isa);
                }
            }
        }

        #[test]
        fn zero_gradient_leaves_params_unchanged(
            rule in prop_oneof![sgd_rule(), momentum_rule(), adagrad_rule(), adam_rule()].prop_map(without_weight_decay),
            param in prop::collection::vec(-10.0f32..10.0, 1..64),
            steps in 1u64..10,
        ) {
            let mut p = param.clone();
            let mut state = vec![f32::NAN; p.len() * rule.state_per_param()];
            rule.init_state(&p, &mut state);
            let zeros = vec![0.0; p.len()];
            for t in 1..=steps {
                rule.apply(t, 1.0, &mut p, &zeros, &mut state);
            }
            prop_assert_eq!(p, param);
        }

        /// FTRL's initial state encodes the initial weights: with zero
        /// gradients the recomputed weights equal them up to rounding.
        #[test]
        fn ftrl_initial_state_reproduces_weights(
            rule in ftrl_rule(),
            param in prop::collection::vec(-10.0f32..10.0, 1..64),
        ) {
            let Rule::Ftrl { alpha, beta, l1, l2 } = rule else { unreachable!() };
            let mut p = param.clone();
            let mut state = vec![f32::NAN; 2 * p.len()];
            rule.init_state(&p, &mut state);
            let zeros = vec![0.0; p.len()];
            rule.apply(1, 1.0, &mut p, &zeros, &mut state);
            for (&got, &want) in p.iter().zip(&param) {
                // z = −(w·d + l1) rounds by 2^-24·(|w|·d + l1); dividing by d
                // gives the bound below (a few roundings more for safety).
                let tol = 4.0 * f32::EPSILON * (want.abs() + l1 / (beta / alpha + l2));
                prop_assert!((got - want).abs() <= tol, "{got} vs {want} (tol {tol:e})");
            }
        }
    }

    fn bad_value() -> impl Strategy<Value = f32> {
        prop_oneof![
            Just(f32::NAN),
            Just(f32::INFINITY),
            Just(f32::NEG_INFINITY),
            (-30.0f64..6.0).prop_map(|e| -(10f64.powf(e) as f32)),
        ]
    }

    /// Every f32 hyper-parameter with its name. All of them must be finite
    /// and none may be negative.
    fn float_fields(rule: &mut Rule) -> Vec<(&'static str, &mut f32)> {
        match rule {
            Rule::Sgd { lr, weight_decay } => vec![("lr", lr), ("weight_decay", weight_decay)],
            Rule::Momentum { lr, momentum, dampening, nesterov: _, weight_decay } => {
                vec![
                    ("lr", lr),
                    ("momentum", momentum),
                    ("dampening", dampening),
                    ("weight_decay", weight_decay),
                ]
            }
            Rule::Adagrad { lr, eps, initial_accumulator, weight_decay } => vec![
                ("lr", lr),
                ("eps", eps),
                ("initial_accumulator", initial_accumulator),
                ("weight_decay", weight_decay),
            ],
            Rule::Adam { lr, beta1, beta2, eps, weight_decay, decoupled: _ } => vec![
                ("lr", lr),
                ("beta1", beta1),
                ("beta2", beta2),
                ("eps", eps),
                ("weight_decay", weight_decay),
            ],
            Rule::Ftrl { alpha, beta, l1, l2 } => {
                vec![("alpha", alpha), ("beta", beta), ("l1", l1), ("l2", l2)]
            }
        }
    }

    fn without_weight_decay(mut rule: Rule) -> Rule {
        match &mut rule {
            Rule::Sgd { weight_decay, .. }
            | Rule::Momentum { weight_decay, .. }
            | Rule::Adagrad { weight_decay, .. }
            | Rule::Adam { weight_decay, .. } => *weight_decay = 0.0,
            Rule::Ftrl { .. } => {}
        }
        rule
    }
}
