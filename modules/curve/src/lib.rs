//! A curve-style task: `init` builds an expensive discount curve for the
//! affinity key (`curve=USD`, `curve=EUR`, ...) and every task on a warm
//! instance reuses it. `{"maturity": 2.5, "notional": 1e6}` ->
//! `{"currency", "discount_factor", "present_value", "builds", "served"}`,
//! where `builds` counts how often this instance ran `init` (1 when warm
//! reuse works) and `served` counts the tasks it has run.

use serde::{Deserialize, Serialize};

/// A zero curve sampled daily for 30 years, bootstrapped from a flat-ish
/// par curve: deliberately costly so warm reuse is worth something.
struct Curve {
    currency: String,
    zero_rates: Vec<f64>,
    builds: u32,
    served: u64,
}

const DAYS: usize = 30 * 365;

fn build(config: &str) -> Result<Curve, String> {
    let currency = config
        .strip_prefix("curve=")
        .filter(|c| !c.is_empty())
        .ok_or_else(|| format!("affinity key must look like curve=USD, got {config:?}"))?
        .to_string();
    kwq_guest::info(format!("building {currency} curve"));
    // A per-currency base rate so different curves give different prices.
    let base = 0.01 + (currency.bytes().map(u32::from).sum::<u32>() % 50) as f64 / 1000.0;
    let mut zero_rates = Vec::with_capacity(DAYS);
    let mut discount_sum = 0.0;
    for day in 1..=DAYS {
        let t = day as f64 / 365.0;
        let par = base + 0.02 * (1.0 - (-t / 5.0).exp());
        // Bootstrap: par coupon bond prices to 1 given earlier discount factors.
        let df = (1.0 - par / 365.0 * discount_sum) / (1.0 + par / 365.0);
        discount_sum += df;
        zero_rates.push(-df.ln() / t);
    }
    Ok(Curve {
        currency,
        zero_rates,
        builds: 1,
        served: 0,
    })
}

#[derive(Deserialize)]
struct Input {
    maturity: f64,
    #[serde(default = "one")]
    notional: f64,
}

fn one() -> f64 {
    1.0
}

#[derive(Serialize)]
struct Output {
    currency: String,
    discount_factor: f64,
    present_value: f64,
    builds: u32,
    served: u64,
}

fn price(curve: &mut Curve, input: Input) -> Result<Output, String> {
    if !(input.maturity > 0.0 && input.maturity <= 30.0) {
        return Err(format!(
            "maturity must be in (0, 30] years, got {}",
            input.maturity
        ));
    }
    let index = ((input.maturity * 365.0).round() as usize).clamp(1, DAYS) - 1;
    let discount_factor = (-curve.zero_rates[index] * input.maturity).exp();
    curve.served += 1;
    Ok(Output {
        currency: curve.currency.clone(),
        discount_factor,
        present_value: input.notional * discount_factor,
        builds: curve.builds,
        served: curve.served,
    })
}

kwq_guest::task!(init = build, run = price);
