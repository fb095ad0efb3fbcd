//! Traffic weights.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A share of traffic in whole percent, always within 0..=100 (Flagger's unit for every weight
/// field). Directives carry basis points: see [`Weight::basis_points`].
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(try_from = "i64", into = "u8")]
pub struct Weight(u8);

/// A number outside 0..=100 used as a weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a weight must be between 0 and 100 percent, got {0}")]
pub struct WeightError(pub i64);

impl Weight {
    /// No traffic.
    pub const ZERO: Weight = Weight(0);
    /// All traffic.
    pub const FULL: Weight = Weight(100);

    /// A weight of `percent`, which must be within 0..=100.
    pub fn try_new(percent: i64) -> Result<Self, WeightError> {
        match u8::try_from(percent) {
            Ok(p) if p <= 100 => Ok(Weight(p)),
            _ => Err(WeightError(percent)),
        }
    }

    /// The weight in percent.
    pub const fn percent(self) -> u8 {
        self.0
    }

    /// The weight in basis points (0..=10000), the unit of `CanaryRoute.canary_weight_bp`.
    pub const fn basis_points(self) -> u32 {
        self.0 as u32 * 100
    }

    /// What is left for the other side: `100 - self`.
    pub const fn complement(self) -> Weight {
        Weight(100 - self.0)
    }

    /// `self + other`, capped at 100.
    pub fn saturating_add(self, other: Weight) -> Weight {
        Weight(self.0.saturating_add(other.0).min(100))
    }

    /// `self - other`, floored at 0.
    pub fn saturating_sub(self, other: Weight) -> Weight {
        Weight(self.0.saturating_sub(other.0))
    }
}

impl schemars::JsonSchema for Weight {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Weight".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "integer", "minimum": 0, "maximum": 100})
    }
}

impl TryFrom<i64> for Weight {
    type Error = WeightError;
    fn try_from(v: i64) -> Result<Self, Self::Error> {
        Weight::try_new(v)
    }
}

impl From<Weight> for u8 {
    fn from(w: Weight) -> u8 {
        w.0
    }
}

impl fmt::Display for Weight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_zero_to_one_hundred() {
        assert_eq!(Weight::try_new(0), Ok(Weight::ZERO));
        assert_eq!(Weight::try_new(100), Ok(Weight::FULL));
        assert_eq!(Weight::try_new(101), Err(WeightError(101)));
        assert_eq!(Weight::try_new(-1), Err(WeightError(-1)));
    }

    #[test]
    fn converts_to_basis_points_for_directives() {
        assert_eq!(Weight::try_new(10).unwrap().basis_points(), 1000);
        assert_eq!(Weight::FULL.basis_points(), weir_proto::FULL_WEIGHT_BP);
    }

    #[test]
    fn deserializing_an_out_of_range_weight_fails() {
        assert_eq!(serde_json::from_str::<Weight>("50").unwrap().percent(), 50);
        assert!(serde_json::from_str::<Weight>("150").is_err());
        assert!(serde_json::from_str::<Weight>("-5").is_err());
    }

    #[test]
    fn arithmetic_stays_in_range() {
        let w = |p| Weight::try_new(p).unwrap();
        assert_eq!(w(90).saturating_add(w(20)), Weight::FULL);
        assert_eq!(w(10).saturating_sub(w(20)), Weight::ZERO);
        assert_eq!(w(30).complement(), w(70));
    }
}
