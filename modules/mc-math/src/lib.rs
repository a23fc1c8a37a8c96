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
        match self.kind {
            OptionKind::Call => (terminal - self.strike).max(0.0),
            OptionKind::Put => (self.strike - terminal).max(0.0),
        }
    }
}

/// Price a European option by Monte Carlo with antithetic variates:
/// each normal draw `z` simulates the terminal price for `z` and `-z`, and
/// the pair's mean payoff is one sample. `paths` is rounded up to even.
/// `on_progress` is called with the fraction done roughly every 1/16 of the work.
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
    let report_every = (pairs / 16).max(1);
    let (mut sum, mut sum_sq) = (0.0f64, 0.0f64);
    for i in 0..pairs {
        let z: f64 = StandardNormal.sample(&mut rng);
        let shock = (diffusion * z).exp();
        let up = forward * shock;
        let down = forward / shock;
        let sample = 0.5 * (contract.payoff(up) + contract.payoff(down));
        sum += sample;
        sum_sq += sample * sample;
        if (i + 1) % report_every == 0 && i + 1 < pairs {
            on_progress((i + 1) as f32 / pairs as f32);
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
    fn pi_estimate_is_close() {
        let pi = estimate_pi(1_000_000, 3);
        assert!((pi.estimate - std::f64::consts::PI).abs() < 0.01, "{pi:?}");
        assert_eq!(pi.samples, 1_000_000);
    }
}
