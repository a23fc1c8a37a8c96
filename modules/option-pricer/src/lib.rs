//! European option price by Monte Carlo with antithetic variates:
//! `{spot, strike, rate, vol, maturity, kind, paths, seed}` -> `{price, std_error, paths}`.

use serde::Deserialize;

#[derive(Deserialize)]
struct Input {
    #[serde(flatten)]
    contract: mc_math::Contract,
    paths: u64,
    #[serde(default)]
    seed: u64,
}

fn run(input: Input) -> Result<mc_math::Estimate, String> {
    input.contract.validate()?;
    if input.paths == 0 {
        return Err("paths must be at least 1".into());
    }
    Ok(mc_math::price_european(
        &input.contract,
        input.paths,
        input.seed,
        kwq_guest::progress,
    ))
}

kwq_guest::task!(run);
