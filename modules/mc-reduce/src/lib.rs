//! The reduce step of a Monte Carlo sweep: the results of independent
//! pricing runs (`option-pricer` with different seeds), as a JSON array
//! `[{price, std_error, paths}, ...]`, pooled into the estimate of all
//! their paths together: `{price, std_error, paths, runs}` (see
//! `mc_math::Pool` for the formula). `kwq workflow run` hands it a job's
//! results this way (`"input": {"results_of": STEP}`).

use serde::Serialize;

/// The pooled estimate and how many runs went into it.
#[derive(Serialize)]
struct Pooled {
    #[serde(flatten)]
    estimate: mc_math::Estimate,
    runs: usize,
}

fn run(runs: Vec<mc_math::Estimate>) -> Result<Pooled, String> {
    let mut pool = mc_math::Pool::default();
    for (i, estimate) in runs.iter().enumerate() {
        if !(estimate.price.is_finite() && estimate.std_error.is_finite()) || estimate.paths == 0 {
            return Err(format!("run {i}: {estimate:?} is not a finished estimate"));
        }
        pool.add(estimate);
        if i % 1024 == 0 {
            kwq_guest::progress(i as f32 / runs.len() as f32);
        }
    }
    let estimate = pool
        .estimate()
        .ok_or("no runs to pool: the payload is an empty array")?;
    Ok(Pooled {
        estimate,
        runs: runs.len(),
    })
}

kwq_guest::task!(run);
