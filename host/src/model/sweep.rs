//! Parameter sweeps: a base payload and axes whose cartesian product is the
//! job's tasks. Point `i` is computed from `i` alone, so a sweep of 50
//! million tasks is stored as one job row and expanded as tasks are leased.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};
use std::collections::BTreeMap;

/// A parameter sweep. The last axis (in name order) varies fastest.
/// Unknown fields are refused: a typo such as `"parms"` must not silently
/// turn into a sweep of something else.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Sweep {
    /// Fields every payload shares (a JSON object).
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    pub base: Value,
    /// Field name -> values it takes: at least one; the product of their
    /// lengths is at most 10^10.
    pub params: BTreeMap<String, SweepAxis>,
}

fn empty_object() -> Value {
    Value::Object(Map::new())
}

/// The values one sweep field takes: a range object or a list.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum SweepAxis {
    /// `from`, `from + step`, ... up to and including `to` (not below `from`).
    Range {
        /// First value.
        from: f64,
        /// Last value (inclusive, within rounding).
        to: f64,
        /// Increment, > 0. Default 1.
        #[serde(default = "one")]
        #[schema(exclusive_minimum = 0, default = 1)]
        step: f64,
    },
    /// An explicit list, not empty.
    Values(Vec<Value>),
}

fn one() -> f64 {
    1.0
}

/// The range form as written, with its fields checked by name (an untagged
/// derive would only say "did not match any variant", and would accept
/// `{"from": 0, "to": 1, "stp": 0.5}` as a range of step 1).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RangeFields {
    from: f64,
    to: f64,
    #[serde(default = "one")]
    step: f64,
}

impl<'de> Deserialize<'de> for SweepAxis {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match Value::deserialize(deserializer)? {
            Value::Array(values) => Ok(SweepAxis::Values(values)),
            range @ Value::Object(_) => {
                let RangeFields { from, to, step } =
                    serde_json::from_value(range).map_err(D::Error::custom)?;
                Ok(SweepAxis::Range { from, to, step })
            }
            other => Err(D::Error::custom(format!(
                "a sweep parameter is {{\"from\", \"to\", \"step\"}} or a list of values, not {other}"
            ))),
        }
    }
}

/// Why a sweep is unusable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SweepError {
    /// The base payload is not a JSON object.
    #[error("sweep base must be a JSON object")]
    BaseNotObject,
    /// No axes.
    #[error("sweep needs at least one parameter")]
    NoParams,
    /// An axis is empty or malformed.
    #[error("sweep parameter {0:?}: {1}")]
    BadAxis(String, String),
    /// The product is beyond what one job may hold.
    #[error("sweep has more than {0} points")]
    TooLarge(u64),
    /// The base payload is over [`MAX_SWEEP_BASE_BYTES`].
    #[error("sweep base is {0} bytes of JSON; at most {max} are allowed", max = MAX_SWEEP_BASE_BYTES)]
    BaseTooLarge(usize),
}

/// The most points one sweep may have.
pub const MAX_SWEEP_POINTS: u64 = 10_000_000_000;

/// The largest sweep base, as JSON bytes. Every point's payload is the base
/// plus its parameters, so the base is what a sweep multiplies: a large one
/// belongs in the module (or its `init` state), not in every task.
pub const MAX_SWEEP_BASE_BYTES: usize = 64 << 10;

impl SweepAxis {
    fn len(&self) -> u64 {
        match self {
            SweepAxis::Range { from, to, step } => ((to - from) / step + 1e-9).floor() as u64 + 1,
            SweepAxis::Values(values) => values.len() as u64,
        }
    }

    fn value(&self, i: u64) -> Value {
        match self {
            SweepAxis::Range { from, step, .. } => {
                let x = from + step * i as f64;
                let integral = from.fract() == 0.0 && step.fract() == 0.0;
                if integral && x.abs() < 9.0e15 {
                    Value::Number(Number::from(x as i64))
                } else {
                    // Round away binary noise such as 0.30000000000000004.
                    let rounded = (x * 1e12).round() / 1e12;
                    Number::from_f64(rounded).map_or(Value::Null, Value::Number)
                }
            }
            SweepAxis::Values(values) => values[i as usize].clone(),
        }
    }
}

impl Sweep {
    /// Check the sweep and return its number of points.
    pub fn validate(&self) -> Result<u64, SweepError> {
        if !self.base.is_object() {
            return Err(SweepError::BaseNotObject);
        }
        let base_bytes = serde_json::to_vec(&self.base).map_or(0, |b| b.len());
        if base_bytes > MAX_SWEEP_BASE_BYTES {
            return Err(SweepError::BaseTooLarge(base_bytes));
        }
        if self.params.is_empty() {
            return Err(SweepError::NoParams);
        }
        let mut total: u64 = 1;
        for (name, axis) in &self.params {
            if let SweepAxis::Range { from, to, step } = axis {
                if !(from.is_finite() && to.is_finite() && step.is_finite()) {
                    return Err(SweepError::BadAxis(
                        name.clone(),
                        "from, to and step must be numbers".into(),
                    ));
                }
                if *step <= 0.0 {
                    return Err(SweepError::BadAxis(
                        name.clone(),
                        "step must be positive".into(),
                    ));
                }
                if to < from {
                    return Err(SweepError::BadAxis(
                        name.clone(),
                        "to must not be below from".into(),
                    ));
                }
                if (to - from) / step > MAX_SWEEP_POINTS as f64 {
                    return Err(SweepError::TooLarge(MAX_SWEEP_POINTS));
                }
            }
            let len = axis.len();
            if len == 0 {
                return Err(SweepError::BadAxis(name.clone(), "has no values".into()));
            }
            total = total
                .checked_mul(len)
                .filter(|t| *t <= MAX_SWEEP_POINTS)
                .ok_or(SweepError::TooLarge(MAX_SWEEP_POINTS))?;
        }
        Ok(total)
    }

    /// The payload of point `index` (0-based, below [`Sweep::validate`]'s count).
    pub fn point(&self, index: u64) -> Value {
        let mut payload = self.base.as_object().cloned().unwrap_or_default();
        let mut rest = index;
        for (name, axis) in self.params.iter().rev() {
            let len = axis.len();
            payload.insert(name.clone(), axis.value(rest % len));
            rest /= len;
        }
        Value::Object(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_base_is_capped() {
        let big = serde_json::json!({"curve": "x".repeat(MAX_SWEEP_BASE_BYTES)});
        let sweep: Sweep =
            serde_json::from_value(serde_json::json!({"base": big, "params": {"i": [1]}})).unwrap();
        assert!(
            matches!(sweep.validate(), Err(SweepError::BaseTooLarge(n)) if n > MAX_SWEEP_BASE_BYTES)
        );
    }

    #[test]
    fn typos_in_a_sweep_are_refused_by_name() {
        let typo = serde_json::from_value::<Sweep>(serde_json::json!(
            {"params": {"spot": {"from": 0, "to": 4, "stp": 0.5}}}
        ))
        .unwrap_err()
        .to_string();
        assert!(typo.contains("stp"), "{typo}");
        let typo = serde_json::from_value::<Sweep>(serde_json::json!(
            {"parms": {"spot": [1, 2]}, "params": {"x": [1]}}
        ))
        .unwrap_err()
        .to_string();
        assert!(typo.contains("parms"), "{typo}");
        let fine: Sweep = serde_json::from_value(serde_json::json!(
            {"params": {"spot": {"from": 0, "to": 4, "step": 0.5}, "kind": ["call", "put"]}}
        ))
        .unwrap();
        assert_eq!(fine.validate(), Ok(18));
    }
    use serde_json::json;

    fn sweep(value: Value) -> Sweep {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn points_are_the_cartesian_product_last_axis_fastest() {
        let s = sweep(
            json!({"base": {"kind": "call"}, "params": {"spot": {"from": 40, "to": 44, "step": 2}, "vol": [0.1, 0.2]}}),
        );
        assert_eq!(s.validate(), Ok(6));
        assert_eq!(s.point(0), json!({"kind": "call", "spot": 40, "vol": 0.1}));
        assert_eq!(s.point(1), json!({"kind": "call", "spot": 40, "vol": 0.2}));
        assert_eq!(s.point(5), json!({"kind": "call", "spot": 44, "vol": 0.2}));
    }

    #[test]
    fn fractional_ranges_round_binary_noise() {
        let s = sweep(json!({"params": {"rate": {"from": 0.1, "to": 0.3, "step": 0.1}}}));
        assert_eq!(s.validate(), Ok(3));
        assert_eq!(s.point(2), json!({"rate": 0.3}));
    }

    #[test]
    fn fifty_million_points_are_fine_and_bad_sweeps_are_named() {
        let s = sweep(json!({"params": {"seed": {"from": 0, "to": 49_999_999}}}));
        assert_eq!(s.validate(), Ok(50_000_000));
        assert_eq!(s.point(49_999_999), json!({"seed": 49_999_999}));
        let bad = sweep(json!({"params": {"spot": {"from": 1, "to": 0}}}));
        assert!(matches!(bad.validate(), Err(SweepError::BadAxis(name, _)) if name == "spot"));
        let huge =
            sweep(json!({"params": {"a": {"from": 0, "to": 1e6}, "b": {"from": 0, "to": 1e6}}}));
        assert_eq!(huge.validate(), Err(SweepError::TooLarge(MAX_SWEEP_POINTS)));
        assert_eq!(
            sweep(json!({"base": 3, "params": {"a": [1]}})).validate(),
            Err(SweepError::BaseNotObject)
        );
    }
}
