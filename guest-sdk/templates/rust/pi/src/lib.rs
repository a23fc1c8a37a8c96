//! A KWQ task: pi by Monte Carlo, the share of random points in the unit
//! square that fall inside the quarter circle, times four.
//!
//! In:  `{"samples": 200000, "seed": 1}`
//! Out: `{"estimate": 3.14...,"std_error":0.003...,"inside":...,"samples":200000}`

use serde::{Deserialize, Serialize};

/// How many points, from which seed.
#[derive(Debug, Clone, Deserialize)]
pub struct Input {
    pub samples: u64,
    #[serde(default)]
    pub seed: u64,
}

/// The estimate and its standard error.
#[derive(Debug, Clone, Serialize)]
pub struct Output {
    pub estimate: f64,
    pub std_error: f64,
    pub inside: u64,
    pub samples: u64,
}

fn run(input: Input) -> Result<Output, String> {
    estimate_pi(&input, kwq_guest::progress)
}

kwq_guest::task!(run);

/// Estimate pi from `input.samples` points; `on_progress` gets the fraction done.
pub fn estimate_pi(input: &Input, mut on_progress: impl FnMut(f32)) -> Result<Output, String> {
    if input.samples == 0 {
        return Err("samples must be at least 1".into());
    }
    // xorshift64*, seeded so that seed 0 is not the all-zero state.
    let mut state = input.seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut uniform = || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    };
    let report_every = (input.samples / 10).max(1);
    let mut inside = 0u64;
    for i in 0..input.samples {
        let (x, y) = (uniform(), uniform());
        inside += u64::from(x * x + y * y <= 1.0);
        if (i + 1) % report_every == 0 {
            on_progress((i + 1) as f32 / input.samples as f32);
        }
    }
    let share = inside as f64 / input.samples as f64;
    Ok(Output {
        estimate: 4.0 * share,
        std_error: 4.0 * (share * (1.0 - share) / input.samples as f64).sqrt(),
        inside,
        samples: input.samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agrees_with_pi() {
        let out = estimate_pi(&Input { samples: 200_000, seed: 7 }, |_| {}).unwrap();
        assert!((out.estimate - std::f64::consts::PI).abs() < 4.0 * out.std_error, "{out:?}");
    }

    #[test]
    fn rejects_no_samples() {
        assert!(estimate_pi(&Input { samples: 0, seed: 1 }, |_| {}).is_err());
    }
}
