//! Monte Carlo kernels shared by the example task modules and by the host's
//! native-vs-Wasm benchmark, so both run exactly the same code.

use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal, Uniform};
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::{Deserialize, Serialize};

/// Call or put.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptionKind {
    /// Right to buy at the strike.
    Call,
    /// Right to sell at the strike.
    Put,
}

/// A European option on a non-dividend-paying stock under Black-Scholes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Contract {
    /// Spot price of the underlying.
    pub spot: f64,
    /// Strike price.
    pub strike: f64,
    /// Continuously compounded risk-free rate.
    pub rate: f64,
    /// Annualised volatility.
    pub vol: f64,
    /// Time to maturity in years.
    pub maturity: f64,
    /// Call or put.
    pub kind: OptionKind,
}

/// A Monte Carlo price with its standard error.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Estimate {
    /// Discounted mean payoff.
    pub price: f64,
    /// Standard error of `price`.
    pub std_error: f64,
    /// Number of simulated paths (each antithetic pair counts as two).
    pub paths: u64,
}

impl Contract {
    /// Reject contracts the models cannot price, with a reason a user can act on.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("spot", self.spot),
            ("strike", self.strike),
            ("vol", self.vol),
            ("maturity", self.maturity),
        ];
        for (name, value) in positive {
            if !(value.is_finite() && value > 0.0) {
                return Err(format!("{name} must be a positive number, got {value}"));
            }
        }
        if !self.rate.is_finite() {
            return Err("rate must be finite".into());
        }
        Ok(())
    }

    fn payoff(&self, terminal: f64) -> f64 {
        let intrinsic = match self.kind {
            OptionKind::Call => terminal - self.strike,
            OptionKind::Put => self.strike - terminal,
        };
        // max(x, 0) without a branch: (x + |x|) / 2 is exactly x or 0 for
        // finite x. Not `f64::max`: on wasm32 that is a call into libc's
        // `fmax` (Wasm's `f64.max` treats NaN differently), a fifth of the
        // pricer's time; nor `if x > 0.0`: Cranelift makes that a branch,
        // which mispredicts on half the paths of an at-the-money option.
        0.5 * (intrinsic + intrinsic.abs())
    }
}

/// Antithetic pairs simulated per block (see `price_european`).
const PATH_BLOCK: usize = 256;

/// Price a European option by Monte Carlo with antithetic variates:
/// each normal draw `z` simulates the terminal price for `z` and `-z`, and
/// the pair's mean payoff is one sample. `paths` is rounded up to even.
/// `on_progress` is called with the fraction done roughly every 1/16 of the work.
///
/// The loop is shaped for Wasm as much as for native code (`kwq bench
/// runtime` compares the two): paths go in blocks of `PATH_BLOCK`, first all
/// the block's normal draws, then its payoffs, each in its own function with
/// four draws or four pairs per loop iteration. Cranelift checks the epoch at
/// every loop header and function entry, and a value live across a call
/// (`exp`, or the epoch check's call into the host) lives in a stack slot;
/// fewer, fatter iterations over fewer live values made the Wasm pricer 2x
/// faster than one loop of one path each, and native code a little faster too.
pub fn price_european(
    contract: &Contract,
    paths: u64,
    seed: u64,
    mut on_progress: impl FnMut(f32),
) -> Estimate {
    let pairs = paths.div_ceil(2).max(1);
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let drift = (contract.rate - 0.5 * contract.vol * contract.vol) * contract.maturity;
    let diffusion = contract.vol * contract.maturity.sqrt();
    // S_T = S_0 e^(drift) e^(+-diffusion z): one exp per antithetic pair.
    let forward = contract.spot * drift.exp();
    // A countdown, not `i % report_every`: a 64-bit division per path was a
    // tenth of the Wasm loop (native code dropped it with the no-op callback).
    let report_every = (pairs / 16).max(1);
    let mut next_report = report_every;
    let (mut sum, mut sum_sq) = (0.0f64, 0.0f64);
    let mut normals = [0.0f64; PATH_BLOCK];
    let mut done = 0u64;
    while done < pairs {
        let block = &mut normals[..(pairs - done).min(PATH_BLOCK as u64) as usize];
        fill_standard_normals(&mut rng, block);
        let (block_sum, block_sum_sq) = antithetic_payoff_sums(contract, forward, diffusion, block);
        sum += block_sum;
        sum_sq += block_sum_sq;
        done += block.len() as u64;
        if done >= next_report && done < pairs {
            next_report = done + report_every;
            on_progress(done as f32 / pairs as f32);
        }
    }
    on_progress(1.0);
    let n = pairs as f64;
    let mean = sum / n;
    let variance = ((sum_sq / n) - mean * mean).max(0.0) * n / (n - 1.0).max(1.0);
    let discount = (-contract.rate * contract.maturity).exp();
    Estimate {
        price: discount * mean,
        std_error: discount * (variance / n).sqrt(),
        paths: pairs * 2,
    }
}

/// Overwrite `out` with standard normal draws (ziggurat), four per
/// iteration (see `price_european`; measured: 4 beat 1 and 8).
#[inline(never)]
fn fill_standard_normals(rng: &mut Xoshiro256PlusPlus, out: &mut [f64]) {
    let mut chunks = out.chunks_exact_mut(4);
    for chunk in &mut chunks {
        chunk[0] = StandardNormal.sample(rng);
        chunk[1] = StandardNormal.sample(rng);
        chunk[2] = StandardNormal.sample(rng);
        chunk[3] = StandardNormal.sample(rng);
    }
    for z in chunks.into_remainder() {
        *z = StandardNormal.sample(rng);
    }
}

/// Sum and sum of squares of the mean payoff of the antithetic pairs of
/// the normal draws `normals`, in four independent accumulators: in Wasm a
/// running sum lives in a stack slot (see `price_european`), so four pairs
/// per iteration share its load and store, and the additions no longer wait
/// on each other.
#[inline(never)]
fn antithetic_payoff_sums(
    contract: &Contract,
    forward: f64,
    diffusion: f64,
    normals: &[f64],
) -> (f64, f64) {
    const LANES: usize = 4;
    let pair_mean = |z: f64| {
        let shock = (diffusion * z).exp();
        0.5 * (contract.payoff(forward * shock) + contract.payoff(forward / shock))
    };
    let (mut sums, mut squares) = ([0.0f64; LANES], [0.0f64; LANES]);
    let mut chunks = normals.chunks_exact(LANES);
    for chunk in &mut chunks {
        for lane in 0..LANES {
            let sample = pair_mean(chunk[lane]);
            sums[lane] += sample;
            squares[lane] += sample * sample;
        }
    }
    for &z in chunks.remainder() {
        let sample = pair_mean(z);
        sums[0] += sample;
        squares[0] += sample * sample;
    }
    (sums.iter().sum(), squares.iter().sum())
}

/// Combines Monte Carlo estimates of one price from independent runs
/// (different seeds) into the estimate of all their samples together: the
/// reduce step of a sweep of seeds. Streaming, so a reduce over a million
/// results holds three numbers, not the results.
///
/// Each run's samples are its antithetic pairs (`paths / 2`); its sum of
/// squared deviations is recovered from its standard error as
/// `(n − 1) · n · se²`, and runs are merged with Chan's parallel update, so
/// the pooled standard error is exactly the one a single run over every
/// sample would report: `s / √N` with `s² = [Σ(nᵢ − 1)sᵢ² + Σ nᵢ(pᵢ − p̄)²] / (N − 1)`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Pool {
    /// Samples (antithetic pairs) so far.
    samples: f64,
    /// Their mean (a discounted price).
    mean: f64,
    /// Their sum of squared deviations from `mean`.
    squares: f64,
}

impl Pool {
    /// Add one run's estimate.
    pub fn add(&mut self, run: &Estimate) {
        let n = (run.paths / 2).max(1) as f64;
        // A run of one sample has no spread of its own (and no finite error).
        let squares = if n > 1.0 {
            (n - 1.0) * n * run.std_error * run.std_error
        } else {
            0.0
        };
        let total = self.samples + n;
        let delta = run.price - self.mean;
        self.mean += delta * n / total;
        self.squares += squares + delta * delta * self.samples * n / total;
        self.samples = total;
    }

    /// The pooled estimate (`None` before any run was added).
    pub fn estimate(&self) -> Option<Estimate> {
        if self.samples == 0.0 {
            return None;
        }
        let variance = self.squares / (self.samples - 1.0).max(1.0);
        Some(Estimate {
            price: self.mean,
            std_error: (variance / self.samples).sqrt(),
            paths: 2 * self.samples as u64,
        })
    }
}

/// The Black-Scholes closed-form price, the reference the Monte Carlo price is tested against.
pub fn black_scholes(contract: &Contract) -> f64 {
    let sqrt_t = contract.maturity.sqrt();
    let d1 = ((contract.spot / contract.strike).ln()
        + (contract.rate + 0.5 * contract.vol * contract.vol) * contract.maturity)
        / (contract.vol * sqrt_t);
    let d2 = d1 - contract.vol * sqrt_t;
    let discounted_strike = contract.strike * (-contract.rate * contract.maturity).exp();
    match contract.kind {
        OptionKind::Call => contract.spot * normal_cdf(d1) - discounted_strike * normal_cdf(d2),
        OptionKind::Put => discounted_strike * normal_cdf(-d2) - contract.spot * normal_cdf(-d1),
    }
}

/// Standard normal CDF via the complementary error function (W. J. Cody's
/// rational approximation as in Numerical Recipes' `erfc`, |error| < 1.2e-7).
fn normal_cdf(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

/// Result of a Monte Carlo estimate of pi.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct PiEstimate {
    /// 4 * inside / samples.
    pub estimate: f64,
    /// Points that fell inside the quarter circle.
    pub inside: u64,
    /// Points drawn.
    pub samples: u64,
}

/// Estimate pi by throwing `samples` points at the unit square.
pub fn estimate_pi(samples: u64, seed: u64) -> PiEstimate {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let unit = Uniform::new(0.0f64, 1.0).expect("0 < 1");
    let inside = (0..samples)
        .filter(|_| {
            let (x, y) = (unit.sample(&mut rng), unit.sample(&mut rng));
            x * x + y * y <= 1.0
        })
        .count() as u64;
    PiEstimate {
        estimate: 4.0 * inside as f64 / samples.max(1) as f64,
        inside,
        samples,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contract(
        spot: f64,
        strike: f64,
        rate: f64,
        vol: f64,
        maturity: f64,
        kind: OptionKind,
    ) -> Contract {
        Contract {
            spot,
            strike,
            rate,
            vol,
            maturity,
            kind,
        }
    }

    #[test]
    fn black_scholes_matches_textbook_value() {
        // Hull, Options, Futures and Other Derivatives, example 15.6: c = 4.76, p = 0.81.
        let call = black_scholes(&contract(42.0, 40.0, 0.1, 0.2, 0.5, OptionKind::Call));
        let put = black_scholes(&contract(42.0, 40.0, 0.1, 0.2, 0.5, OptionKind::Put));
        assert!((call - 4.76).abs() < 0.005, "call {call}");
        assert!((put - 0.81).abs() < 0.005, "put {put}");
    }

    #[test]
    fn monte_carlo_is_within_three_standard_errors_of_black_scholes() {
        let contracts = [
            contract(42.0, 40.0, 0.1, 0.2, 0.5, OptionKind::Call),
            contract(42.0, 40.0, 0.1, 0.2, 0.5, OptionKind::Put),
            contract(100.0, 120.0, 0.03, 0.35, 2.0, OptionKind::Call),
            contract(100.0, 80.0, 0.05, 0.5, 1.0, OptionKind::Put),
            contract(50.0, 50.0, 0.0, 0.1, 0.25, OptionKind::Call),
        ];
        for (i, c) in contracts.iter().enumerate() {
            let mc = price_european(c, 200_000, 11 + i as u64, |_| {});
            let exact = black_scholes(c);
            assert!(mc.std_error > 0.0);
            assert!(
                (mc.price - exact).abs() < 3.0 * mc.std_error,
                "contract {c:?}: mc {} +- {} vs bs {exact}",
                mc.price,
                mc.std_error
            );
        }
    }

    #[test]
    fn same_seed_gives_same_price_and_progress_reaches_one() {
        let c = contract(42.0, 40.0, 0.1, 0.2, 0.5, OptionKind::Call);
        let mut last = 0.0;
        let a = price_european(&c, 10_001, 7, |p| last = p);
        let b = price_european(&c, 10_001, 7, |_| {});
        assert_eq!(a, b);
        assert_eq!(a.paths, 10_002);
        assert_eq!(last, 1.0);
    }

    #[test]
    fn validate_names_the_bad_field() {
        let err = contract(42.0, 40.0, 0.1, -0.2, 0.5, OptionKind::Call)
            .validate()
            .unwrap_err();
        assert!(err.contains("vol"), "{err}");
    }

    #[test]
    fn pooled_runs_equal_one_run_of_all_their_paths() {
        // The workflow: 1,000 runs of 100,000 paths, pooled, against
        // one run of 10^8 paths. Independent draws, so the prices agree to
        // sampling error and the errors (each estimated from 5 * 10^7 pairs)
        // to well under 1 %.
        let c = contract(100.0, 100.0, 0.05, 0.2, 1.0, OptionKind::Call);
        let mut pool = Pool::default();
        for seed in 1..=1_000 {
            pool.add(&price_european(&c, 100_000, seed, |_| {}));
        }
        let pooled = pool.estimate().unwrap();
        let single = price_european(&c, 100_000_000, 1_000_001, |_| {});
        let exact = black_scholes(&c);
        assert_eq!(pooled.paths, single.paths);
        assert!(
            (pooled.price - exact).abs() < 3.0 * pooled.std_error,
            "pooled {pooled:?}, Black-Scholes {exact}"
        );
        assert!(
            (pooled.price - single.price).abs() < 3.0 * (2.0f64).sqrt() * single.std_error,
            "pooled {pooled:?}, single {single:?}"
        );
        assert!(
            (pooled.std_error / single.std_error - 1.0).abs() < 0.01,
            "pooled {pooled:?}, single {single:?}"
        );
    }

    #[test]
    fn pooling_splits_of_one_sample_gives_that_samples_own_statistics() {
        // Exact algebra, no sampling: runs built from known pair payoffs
        // pool to the mean and standard error of all of them at once.
        let values: Vec<f64> = (0..1_000)
            .map(|i| ((i * 7919) % 1_000) as f64 / 10.0)
            .collect();
        let stats = |xs: &[f64]| {
            let n = xs.len() as f64;
            let mean = xs.iter().sum::<f64>() / n;
            let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
            Estimate {
                price: mean,
                std_error: (var / n).sqrt(),
                paths: 2 * xs.len() as u64,
            }
        };
        let mut pool = Pool::default();
        assert_eq!(pool.estimate(), None);
        // 1,000 = 27 * 37 + 1: the last run is a single sample, whose
        // standard error is NaN (n - 1 = 0) and must not poison the pool.
        for chunk in values.chunks(37) {
            pool.add(&stats(chunk));
        }
        let pooled = pool.estimate().unwrap();
        let whole = stats(&values);
        assert_eq!(pooled.paths, whole.paths);
        assert!(
            (pooled.price - whole.price).abs() < 1e-9,
            "{pooled:?} {whole:?}"
        );
        assert!(
            (pooled.std_error - whole.std_error).abs() < 1e-9,
            "{pooled:?} {whole:?}"
        );
    }

    #[test]
    fn pi_estimate_is_close() {
        let pi = estimate_pi(1_000_000, 3);
        assert!((pi.estimate - std::f64::consts::PI).abs() < 0.01, "{pi:?}");
        assert_eq!(pi.samples, 1_000_000);
    }
}
