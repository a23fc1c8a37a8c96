//! Estimate pi by Monte Carlo: `{"samples": 1000000, "seed": 1}` ->
//! `{"estimate": 3.14.., "inside": .., "samples": ..}`.

use serde::Deserialize;

#[derive(Deserialize)]
struct Input {
    samples: u64,
    #[serde(default)]
    seed: u64,
}

fn run(input: Input) -> Result<mc_math::PiEstimate, String> {
    if input.samples == 0 {
        return Err("samples must be at least 1".into());
    }
    Ok(mc_math::estimate_pi(input.samples, input.seed))
}

kwq_guest::task!(run);
