//! The reduce step of a Monte Carlo sweep: the results of independent
//! pricing runs (`option-pricer` with different seeds), each
//! `{price, std_error, paths}`, pooled into the estimate of all their paths
//! together: `{price, std_error, paths, runs}` (see `mc_math::Pool` for the
//! formula).
//!
//! The runs come either as the task's input, streamed by the host a page at
//! a time (a task submitted with `"input": {"results_of": JOB}`, whose
//! payload is then `null`: memory stays flat however many runs there
//! are), or as a JSON array payload `[{price, std_error, paths}, ...]`
//! (how `kwq workflow run --client-order` hands them over).

use serde::Serialize;

/// The pooled estimate and how many runs went into it.
#[derive(Serialize)]
struct Pooled {
    #[serde(flatten)]
    estimate: mc_math::Estimate,
    runs: usize,
}

fn run(payload: Option<Vec<mc_math::Estimate>>) -> Result<Pooled, String> {
    let mut pool = mc_math::Pool::default();
    let mut runs = 0usize;
    let mut add = |i: usize, estimate: &mc_math::Estimate| {
        if !(estimate.price.is_finite() && estimate.std_error.is_finite()) || estimate.paths == 0 {
            return Err(format!("run {i}: {estimate:?} is not a finished estimate"));
        }
        pool.add(estimate);
        runs += 1;
        Ok(())
    };
    match payload {
        Some(list) => {
            for (i, estimate) in list.iter().enumerate() {
                add(i, estimate)?;
                if i % 1024 == 0 {
                    kwq_guest::progress(i as f32 / list.len() as f32);
                }
            }
        }
        None => {
            for (i, estimate) in kwq_guest::json_results::<mc_math::Estimate>().enumerate() {
                add(i, &estimate?)?;
            }
        }
    }
    let estimate = pool
        .estimate()
        .ok_or("no runs to pool: no results in the input and no array in the payload")?;
    Ok(Pooled { estimate, runs })
}

kwq_guest::task!(run);
