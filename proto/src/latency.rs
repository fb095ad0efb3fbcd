//! The HDR latency histogram both ends of `weir.v1` share: the filter records into it, the wire
//! carries it sparsely, the controller merges it and reads exact-to-the-bucket quantiles from it.
//!
//! The layout is HdrHistogram's log-linear one with 2 significant digits (256 sub-buckets, so any
//! value is known to within 1/128 of itself) over 1 µs .. 2^32 µs (about 71 minutes). Keeping the
//! index math here, in one place, is what lets a slot index travel on the wire instead of a value.

use crate::v1::Histogram;

/// log2 of half the sub-bucket count: 128 linear slots per power of two.
const SUB_BUCKET_HALF_MAGNITUDE: u32 = 7;
const SUB_BUCKET_HALF: usize = 1 << SUB_BUCKET_HALF_MAGNITUDE;
const SUB_BUCKET_MASK: u64 = (1 << (SUB_BUCKET_HALF_MAGNITUDE + 1)) - 1;
/// Buckets needed so that 256 << (BUCKETS - 1) exceeds [`MAX_MICROS`].
const BUCKETS: usize = 25;
/// Number of slots in a histogram.
pub const SLOTS: usize = (BUCKETS + 1) * SUB_BUCKET_HALF;
/// Largest value recorded as itself; larger values are clamped to it (and still counted).
pub const MAX_MICROS: u64 = (1 << 32) - 1;

/// Why a wire histogram was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The run-length encoding points past the last slot.
    TooManySlots { slots: usize },
    /// A zero is never written by the encoder; its presence means the data is not ours.
    ZeroRun,
    /// The counts add up to more than a u64 holds.
    Overflow,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::TooManySlots { slots } => write!(
                f,
                "latency histogram addresses {slots} slots but the weir.v1 layout has {SLOTS}; \
                 the reporter uses another layout (upgrade the filter and controller together)"
            ),
            DecodeError::ZeroRun => write!(
                f,
                "latency histogram holds a 0 entry, which the weir.v1 run-length encoding never writes"
            ),
            DecodeError::Overflow => write!(f, "latency histogram counts overflow a 64-bit total"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Index of the slot that holds `micros` (clamped to [`MAX_MICROS`]).
pub fn slot_of(micros: u64) -> usize {
    let value = micros.min(MAX_MICROS);
    // As HdrHistogram's countsArrayIndex with unit magnitude 0.
    let pow2_ceiling = 64 - (value | SUB_BUCKET_MASK).leading_zeros();
    let bucket = pow2_ceiling - (SUB_BUCKET_HALF_MAGNITUDE + 1);
    let sub_bucket = (value >> bucket) as usize;
    ((bucket as usize + 1) << SUB_BUCKET_HALF_MAGNITUDE) + sub_bucket - SUB_BUCKET_HALF
}

/// The smallest value that lands in `slot`, and the slot's width.
fn slot_range(slot: usize) -> (u64, u64) {
    let mut bucket = (slot >> SUB_BUCKET_HALF_MAGNITUDE) as i64 - 1;
    let mut sub_bucket = (slot & (SUB_BUCKET_HALF - 1)) + SUB_BUCKET_HALF;
    if bucket < 0 {
        sub_bucket -= SUB_BUCKET_HALF;
        bucket = 0;
    }
    ((sub_bucket as u64) << bucket, 1u64 << bucket)
}

/// The value reported for samples in `slot`: the middle of the slot, so the error is at most half
/// a slot (1/256 of the value) either way.
pub fn slot_value(slot: usize) -> f64 {
    let (low, width) = slot_range(slot);
    if width == 1 {
        low as f64
    } else {
        low as f64 + (width as f64 - 1.0) / 2.0
    }
}

/// A latency histogram in microseconds. Allocates its slots on the first sample, so an unused
/// (canary, version) costs nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LatencyHistogram {
    counts: Vec<u64>,
    total: u64,
}

impl LatencyHistogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Records one sample.
    pub fn record(&mut self, micros: u64) {
        self.record_n(slot_of(micros), 1);
    }

    fn record_n(&mut self, slot: usize, n: u64) {
        if self.counts.is_empty() {
            self.counts = vec![0; SLOTS];
        }
        if let Some(count) = self.counts.get_mut(slot) {
            *count = count.saturating_add(n);
            self.total = self.total.saturating_add(n);
        }
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (slot, &n) in other.counts.iter().enumerate() {
            if n > 0 {
                self.record_n(slot, n);
            }
        }
    }

    /// Forgets every sample, keeping the allocation.
    pub fn clear(&mut self) {
        self.counts.iter_mut().for_each(|c| *c = 0);
        self.total = 0;
    }

    /// The value at quantile `q` (0.0..=1.0) by nearest rank, in microseconds; None when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.total == 0 {
            return None;
        }
        let q = q.clamp(0.0, 1.0);
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0u64;
        for (slot, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(slot_value(slot));
            }
        }
        None
    }

    /// Mean in microseconds; None when empty.
    pub fn mean(&self) -> Option<f64> {
        if self.total == 0 {
            return None;
        }
        let sum: f64 = self
            .counts
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(slot, &n)| slot_value(slot) * n as f64)
            .sum();
        Some(sum / self.total as f64)
    }

    /// The sparse wire form.
    pub fn encode(&self) -> Histogram {
        let mut counts = Vec::new();
        let mut zeros: i64 = 0;
        for &n in &self.counts {
            if n == 0 {
                zeros += 1;
                continue;
            }
            if zeros > 0 {
                counts.push(-zeros);
                zeros = 0;
            }
            counts.push(i64::try_from(n).unwrap_or(i64::MAX));
        }
        Histogram { counts }
    }

    /// Parses the wire form, refusing anything the encoder would not have written.
    pub fn decode(wire: &Histogram) -> Result<Self, DecodeError> {
        let mut histogram = Self::new();
        histogram.merge_wire(wire)?;
        Ok(histogram)
    }

    /// Adds the samples of a wire histogram. On error nothing is added.
    pub fn merge_wire(&mut self, wire: &Histogram) -> Result<(), DecodeError> {
        // Validate first so a bad histogram never half-applies.
        let mut slot: usize = 0;
        let mut total: u64 = 0;
        for &entry in &wire.counts {
            match entry {
                0 => return Err(DecodeError::ZeroRun),
                n if n < 0 => slot = slot.saturating_add(n.unsigned_abs() as usize),
                n => {
                    if slot >= SLOTS {
                        return Err(DecodeError::TooManySlots {
                            slots: slot.saturating_add(1),
                        });
                    }
                    total = total.checked_add(n as u64).ok_or(DecodeError::Overflow)?;
                    slot += 1;
                }
            }
        }
        self.total.checked_add(total).ok_or(DecodeError::Overflow)?;
        let mut slot = 0usize;
        for &entry in &wire.counts {
            if entry < 0 {
                slot += entry.unsigned_abs() as usize;
            } else {
                self.record_n(slot, entry as u64);
                slot += 1;
            }
        }
        Ok(())
    }

    /// Number of samples at or below `micros` (for "share of requests faster than").
    pub fn count_at_or_below(&self, micros: u64) -> u64 {
        let last = slot_of(micros);
        self.counts.iter().take(last + 1).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hdrhistogram::Histogram as Hdr;

    #[test]
    fn slot_layout_matches_hdrhistogram_with_two_significant_digits() {
        let hdr = Hdr::<u64>::new_with_bounds(1, MAX_MICROS, 2).unwrap();
        for value in (0..5_000u64).chain([65_535, 65_536, 1_000_000, 123_456_789, MAX_MICROS]) {
            let (low, width) = slot_range(slot_of(value));
            assert_eq!(
                low,
                hdr.lowest_equivalent(value),
                "lowest equivalent of {value}"
            );
            assert_eq!(
                low + width - 1,
                hdr.highest_equivalent(value),
                "highest of {value}"
            );
        }
        assert!(slot_of(MAX_MICROS) < SLOTS);
        assert_eq!(slot_of(u64::MAX), slot_of(MAX_MICROS));
    }

    #[test]
    fn quantile_is_within_half_a_slot_of_the_exact_nearest_rank() {
        let mut samples: Vec<u64> = (0..10_000u64).map(|i| 200 + (i * i) % 480_000).collect();
        let mut h = LatencyHistogram::new();
        samples.iter().for_each(|&s| h.record(s));
        samples.sort_unstable();
        for q in [0.5, 0.9, 0.99, 0.999] {
            let exact = samples[((q * samples.len() as f64).ceil() as usize).max(1) - 1] as f64;
            let got = h.quantile(q).unwrap();
            assert!(
                (got - exact).abs() / exact <= 1.0 / 256.0 + 1e-9,
                "q{q}: {got} vs {exact}"
            );
        }
    }

    #[test]
    fn wire_form_round_trips_and_merges() {
        let mut a = LatencyHistogram::new();
        let mut b = LatencyHistogram::new();
        [1, 1, 7, 300, 300, 99_999]
            .iter()
            .for_each(|&v| a.record(v));
        [5, 300, 1_000_000].iter().for_each(|&v| b.record(v));
        let decoded = LatencyHistogram::decode(&a.encode()).unwrap();
        assert_eq!(decoded, a);
        let mut merged = a.clone();
        merged.merge_wire(&b.encode()).unwrap();
        assert_eq!(merged.count(), 9);
        a.merge(&b);
        assert_eq!(merged, a);
    }

    #[test]
    fn hostile_wire_histograms_are_refused_without_side_effects() {
        let mut h = LatencyHistogram::new();
        h.record(10);
        let before = h.clone();
        for bad in [
            vec![0],
            vec![-(SLOTS as i64), 1],
            vec![i64::MIN, 1],
            vec![i64::MIN, i64::MIN, 1],
            vec![i64::MAX, i64::MAX, i64::MAX],
        ] {
            assert!(h.merge_wire(&Histogram { counts: bad }).is_err());
            assert_eq!(h, before);
        }
    }

    #[test]
    fn empty_histogram_is_free_and_has_no_quantile() {
        let h = LatencyHistogram::new();
        assert_eq!(h.quantile(0.99), None);
        assert!(h.encode().counts.is_empty());
    }
}
