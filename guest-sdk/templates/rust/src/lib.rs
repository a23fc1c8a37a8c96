//! A KWQ task: the price of a European option by Monte Carlo, with
//! antithetic variates.
//!
//! In:  `{"spot":100,"strike":100,"rate":0.05,"vol":0.2,"maturity":1,"kind":"call","paths":100000,"seed":1}`
//! Out: `{"price":10.45...,"std_error":0.02...,"paths":100000}`

use serde::{Deserialize, Serialize};

/// Call or put.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The right to buy at the strike.
    Call,
    /// The right to sell at the strike.
    Put,
}

/// One pricing request: the contract, the number of paths and the seed.
#[derive(Debug, Clone, Deserialize)]
pub struct Input {
    pub spot: f64,
    pub strike: f64,
    pub rate: f64,
    pub vol: f64,
    pub maturity: f64,
    pub kind: Kind,
    pub paths: u64,
    #[serde(default)]
    pub seed: u64,
}

/// The Monte Carlo price and its standard error.
#[derive(Debug, Clone, Serialize)]
pub struct Output {
    pub price: f64,
    pub std_error: f64,
    pub paths: u64,
}

/// The task: validate, price, report progress to the host.
fn run(input: Input) -> Result<Output, String> {
    kwq_guest::info(format!("pricing {} paths", input.paths));
    price(&input, kwq_guest::progress)
}

kwq_guest::task!(run);

/// Price `input` by Monte Carlo; `on_progress` gets the fraction done.
pub fn price(input: &Input, mut on_progress: impl FnMut(f32)) -> Result<Output, String> {
    for (name, value) in [
        ("spot", input.spot),
        ("strike", input.strike),
        ("vol", input.vol),
        ("maturity", input.maturity),
    ] {
        if !(value.is_finite() && value > 0.0) {
            return Err(format!("{name} must be a positive number, got {value}"));
        }
    }
    if input.paths == 0 {
        return Err("paths must be at least 1".into());
    }
    let pairs = input.paths.div_ceil(2);
    let drift = (input.rate - 0.5 * input.vol * input.vol) * input.maturity;
    let diffusion = input.vol * input.maturity.sqrt();
    let forward = input.spot * drift.exp();
    let payoff = |terminal: f64| match input.kind {
        Kind::Call => (terminal - input.strike).max(0.0),
        Kind::Put => (input.strike - terminal).max(0.0),
    };
    let mut normals = Normals::new(input.seed);
    let (mut sum, mut sum_sq) = (0.0, 0.0);
    let report_every = (pairs / 10).max(1);
    for i in 0..pairs {
        let shock = (diffusion * normals.next()).exp();
        let sample = 0.5 * (payoff(forward * shock) + payoff(forward / shock));
        sum += sample;
        sum_sq += sample * sample;
        if (i + 1) % report_every == 0 {
            on_progress((i + 1) as f32 / pairs as f32);
        }
    }
    let n = pairs as f64;
    let mean = sum / n;
    let variance = (sum_sq / n - mean * mean).max(0.0) * n / (n - 1.0).max(1.0);
    let discount = (-input.rate * input.maturity).exp();
    Ok(Output {
        price: discount * mean,
        std_error: discount * (variance / n).sqrt(),
        paths: pairs * 2,
    })
}

/// Standard normal draws: xoshiro256** seeded by splitmix64, Box-Muller.
struct Normals {
    state: [u64; 4],
    spare: Option<f64>,
}

impl Normals {
    fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut splitmix = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Normals {
            state: [splitmix(), splitmix(), splitmix(), splitmix()],
            spare: None,
        }
    }

    /// A uniform draw in (0, 1].
    fn uniform(&mut self) -> f64 {
        let s = &mut self.state;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        ((result >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    fn next(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let radius = (-2.0 * self.uniform().ln()).sqrt();
        let angle = std::f64::consts::TAU * self.uniform();
        self.spare = Some(radius * angle.sin());
        radius * angle.cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The closed-form price the Monte Carlo estimate must agree with.
    fn black_scholes(input: &Input) -> f64 {
        let sqrt_t = input.maturity.sqrt();
        let d1 = ((input.spot / input.strike).ln()
            + (input.rate + 0.5 * input.vol * input.vol) * input.maturity)
            / (input.vol * sqrt_t);
        let d2 = d1 - input.vol * sqrt_t;
        let k = input.strike * (-input.rate * input.maturity).exp();
        match input.kind {
            Kind::Call => input.spot * cdf(d1) - k * cdf(d2),
            Kind::Put => k * cdf(-d2) - input.spot * cdf(-d1),
        }
    }

    /// Standard normal CDF from erfc (Numerical Recipes, error < 1.2e-7).
    fn cdf(x: f64) -> f64 {
        let z = (x / std::f64::consts::SQRT_2).abs();
        let t = 1.0 / (1.0 + 0.5 * z);
        let poly = -z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
        let erfc = t * poly.exp();
        if x >= 0.0 { 1.0 - 0.5 * erfc } else { 0.5 * erfc }
    }

    fn input(kind: Kind, strike: f64) -> Input {
        Input { spot: 100.0, strike, rate: 0.05, vol: 0.2, maturity: 1.0, kind, paths: 200_000, seed: 7 }
    }

    #[test]
    fn agrees_with_black_scholes() {
        for input in [input(Kind::Call, 100.0), input(Kind::Put, 110.0)] {
            let out = price(&input, |_| {}).unwrap();
            let exact = black_scholes(&input);
            assert!(
                (out.price - exact).abs() < 4.0 * out.std_error,
                "{:?}: {} vs Black-Scholes {exact} (std error {})",
                input.kind, out.price, out.std_error
            );
        }
    }

    #[test]
    fn rejects_a_bad_contract() {
        let mut bad = input(Kind::Call, 100.0);
        bad.vol = 0.0;
        assert_eq!(price(&bad, |_| {}).unwrap_err(), "vol must be a positive number, got 0");
    }
}
