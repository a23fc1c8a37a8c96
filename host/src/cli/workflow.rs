//! `kwq workflow run FILE`: a workflow is steps, each a task or a job,
//! with `after` naming the steps it waits for, and a task step may take
//! the results of another as its input (`"input": {"results_of": STEP}`).
//! This client submits the steps to a host and prints the final step's
//! result.
//!
//! The host keeps the order where it can: a step is submitted as soon as
//! the steps it names have been, with their ids as its `after`, and waits
//! on the host (state Waiting) until they complete, so it runs without
//! this command. A step reading a job's results is submitted the same way
//! with `"input": {"results_of": JOB_ID}`: the host streams them to it.
//! Steps wait here instead, and get their input as a JSON array payload,
//! when they read a task step's result, on a store that holds no
//! dependencies (a Kafka grid answers 400 `unsupported`; this command then
//! keeps the order itself), and with `--client-order`.
//! A host that is killed and started again is waited for (reads are
//! retried for up to a minute).

use super::CliError;
use super::client::{Client, Connection};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `kwq workflow ...`.
#[derive(Debug, clap::Subcommand)]
pub enum WorkflowCommand {
    /// Run the workflow in FILE (steps, each a task or a job, with the
    /// steps it waits for) and print the final step's result. Exit 1 if a
    /// step failed (the steps after it are not run).
    Run {
        /// The workflow: `{"steps": [{"name", "after": [...], "on_failure", "task": {...}
        /// | "job": {...}}]}` (see examples/mc-price.json).
        file: PathBuf,
        /// Keep the order in this command: submit each step once the steps
        /// it names have completed, instead of handing them to the host
        /// with `after` (what it does anyway on a store that holds no
        /// dependencies).
        #[arg(long)]
        client_order: bool,
    },
}

/// A workflow file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Workflow {
    steps: Vec<Step>,
}

/// One step: a task or a job, as `POST /v1/tasks` or `POST /v1/jobs`
/// takes it, and the steps that must complete first.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    name: String,
    #[serde(default)]
    after: Vec<String>,
    #[serde(default)]
    on_failure: OnFailure,
    task: Option<Map<String, Value>>,
    job: Option<Map<String, Value>>,
}

/// What a step does when a step it waits for does not complete.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum OnFailure {
    /// It is not run, and counts as failed (the default).
    #[default]
    Cancel,
    /// It runs anyway once every step it waits for has ended (a report or
    /// clean-up step); a `results_of` input then holds the results there are.
    Run,
}

/// What a step submits.
#[derive(Debug, Clone, PartialEq)]
enum Work {
    /// A task body; `results_of`: the step whose results become its payload.
    Task {
        body: Map<String, Value>,
        results_of: Option<usize>,
    },
    /// A job body.
    Job(Map<String, Value>),
}

/// A checked workflow: steps in an order that runs every step after the
/// ones it names.
#[derive(Debug)]
struct Plan {
    names: Vec<String>,
    /// Per step, the indices of the steps it waits for.
    after: Vec<Vec<usize>>,
    /// Per step, what it does when one of those does not complete.
    on_failure: Vec<OnFailure>,
    work: Vec<Work>,
    /// Step indices, each after every step it waits for.
    order: Vec<usize>,
}

impl Plan {
    /// Steps no other step waits for: what the workflow produces.
    fn finals(&self) -> Vec<usize> {
        (0..self.names.len())
            .filter(|i| !self.after.iter().any(|a| a.contains(i)))
            .collect()
    }
}

/// Check a workflow: unique names, `after` and `results_of` naming known
/// steps, exactly one of task and job, no cycle. The error is one line
/// naming the step.
fn plan(workflow: Workflow) -> Result<Plan, String> {
    if workflow.steps.is_empty() {
        return Err("the workflow has no steps".into());
    }
    let mut index = HashMap::new();
    for (i, step) in workflow.steps.iter().enumerate() {
        if step.name.is_empty() {
            return Err(format!("step {} has no name", i + 1));
        }
        if index.insert(step.name.clone(), i).is_some() {
            return Err(format!("two steps are named {:?}", step.name));
        }
    }
    let find = |from: &str, name: &str| {
        index
            .get(name)
            .copied()
            .ok_or_else(|| format!("step {from:?} names an unknown step {name:?}"))
    };
    let (mut names, mut after, mut work) = (Vec::new(), Vec::new(), Vec::new());
    let mut on_failure = Vec::new();
    for step in workflow.steps.iter() {
        let waits: Vec<usize> = step
            .after
            .iter()
            .map(|name| find(&step.name, name))
            .collect::<Result<_, _>>()?;
        let this = match (&step.task, &step.job) {
            (Some(task), None) => {
                let mut body = task.clone();
                let results_of = match body.remove("input") {
                    None => None,
                    Some(input) => {
                        let source =
                            input
                                .get("results_of")
                                .and_then(Value::as_str)
                                .ok_or_else(|| {
                                    format!(
                                        "step {:?}: input must be {{\"results_of\": STEP}}",
                                        step.name
                                    )
                                })?;
                        let source = find(&step.name, source)?;
                        if !waits.contains(&source) {
                            return Err(format!(
                                "step {:?} takes the results of {:?}, so it must also name it in after",
                                step.name, workflow.steps[source].name
                            ));
                        }
                        if body.contains_key("payload") {
                            return Err(format!(
                                "step {:?}: give a payload or an input, not both",
                                step.name
                            ));
                        }
                        Some(source)
                    }
                };
                Work::Task { body, results_of }
            }
            (None, Some(job)) => Work::Job(job.clone()),
            _ => {
                return Err(format!(
                    "step {:?} must have exactly one of task and job",
                    step.name
                ));
            }
        };
        names.push(step.name.clone());
        after.push(waits);
        on_failure.push(step.on_failure);
        work.push(this);
    }
    let order = run_order(&names, &after)?;
    Ok(Plan {
        names,
        after,
        on_failure,
        work,
        order,
    })
}

/// Kahn's topological sort, ties in file order; a cycle is an error naming
/// the steps in it.
fn run_order(names: &[String], after: &[Vec<usize>]) -> Result<Vec<usize>, String> {
    let mut waiting: Vec<usize> = after.iter().map(Vec::len).collect();
    let mut order = Vec::new();
    let mut ready: Vec<usize> = (0..names.len()).filter(|&i| waiting[i] == 0).collect();
    while let Some(i) = (!ready.is_empty()).then(|| ready.remove(0)) {
        order.push(i);
        for (j, waits) in after.iter().enumerate() {
            for _ in waits.iter().filter(|&&w| w == i) {
                waiting[j] -= 1;
                if waiting[j] == 0 {
                    ready.push(j);
                    ready.sort_unstable();
                }
            }
        }
    }
    if order.len() < names.len() {
        let stuck: Vec<&str> = (0..names.len())
            .filter(|i| !order.contains(i))
            .map(|i| names[i].as_str())
            .collect();
        return Err(format!(
            "the steps {} wait for each other (a cycle)",
            stuck.join(", ")
        ));
    }
    Ok(order)
}

/// Read and check a workflow file.
fn load(path: &Path) -> Result<Plan, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::usage(format!("cannot read {}: {e}", path.display())))?;
    let workflow: Workflow = serde_json::from_str(&text)
        .map_err(|e| CliError::usage(format!("{}: {e}", path.display())))?;
    plan(workflow).map_err(|e| CliError::usage(format!("{}: {e}", path.display())))
}

/// `kwq workflow ...`.
pub(super) fn workflow(connection: Connection, command: WorkflowCommand) -> Result<(), CliError> {
    match command {
        WorkflowCommand::Run { file, client_order } => {
            let plan = load(&file)?;
            let client = Client::new(&connection);
            super::tokio_runtime()?.block_on(run(&client, &plan, !client_order))
        }
    }
}

/// Where a step is.
#[derive(Debug, Clone)]
enum Progress {
    NotStarted,
    /// Submitted, and not ended when last looked at.
    Submitted,
    /// Completed: the task's result, or the job's id.
    Completed(Value),
    /// Ended otherwise, or not run because a step it waits for did not
    /// complete: why.
    Failed(String),
}

impl Progress {
    /// Whether the step is over, whichever way.
    fn ended(&self) -> bool {
        matches!(self, Progress::Completed(_) | Progress::Failed(_))
    }
}

/// How soon running steps are looked at after something changed (a step
/// submitted or ended): a chain of short steps moves on within a few ms.
const POLL_FIRST: Duration = Duration::from_millis(1);

/// How often running steps are looked at at the most: the wait doubles
/// from [`POLL_FIRST`] up to this while nothing changes.
const POLL: Duration = Duration::from_millis(100);

/// How long the host may leave reads unanswered before the workflow gives
/// up: a host killed and started again is back well within it.
const HOST_PATIENCE: Duration = Duration::from_secs(60);

/// The longest wait between two tries of a read the host did not answer.
const RETRY_MAX: Duration = Duration::from_secs(2);

/// A read of the host that rides out a host down or restarting: a
/// connection refused or a 5xx is tried again, with backoff, for up to
/// [`HOST_PATIENCE`]; a 4xx (the request is wrong) is not. Only reads:
/// a submit whose answer was lost may have been taken, so it is not
/// repeated.
async fn patiently<T, F, Fut>(mut read: F) -> Result<T, CliError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, CliError>>,
{
    let mut wait = POLL;
    let mut failing_since: Option<std::time::Instant> = None;
    loop {
        match read().await {
            Ok(value) => {
                if failing_since.is_some() {
                    eprintln!("the host answers again");
                }
                return Ok(value);
            }
            Err(refused) if refused.code == 2 => return Err(refused),
            Err(error) => {
                let since = *failing_since.get_or_insert_with(|| {
                    eprintln!(
                        "the host does not answer ({}); trying again for up to {} s",
                        error.message,
                        HOST_PATIENCE.as_secs()
                    );
                    std::time::Instant::now()
                });
                if since.elapsed() >= HOST_PATIENCE {
                    return Err(CliError::failed(format!(
                        "the host has not answered for {} s: {}",
                        HOST_PATIENCE.as_secs(),
                        error.message
                    )));
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(RETRY_MAX);
            }
        }
    }
}

/// Run the plan to its end and print the final steps' results;
/// `host_orders`: hand the order to the host where it holds dependencies.
async fn run(client: &Client, plan: &Plan, mut host_orders: bool) -> Result<(), CliError> {
    let mut progress = vec![Progress::NotStarted; plan.names.len()];
    // The task or job id each step got when it was submitted.
    let mut ids: Vec<Option<String>> = vec![None; plan.names.len()];
    let mut pause = POLL_FIRST;
    loop {
        let mut changed = false;
        for &i in &plan.order {
            if !matches!(progress[i], Progress::NotStarted) {
                continue;
            }
            // A task's result becomes a payload here; a job's results are
            // streamed to the step by the host.
            let waits_here = match plan.work[i] {
                Work::Task {
                    results_of: Some(source),
                    ..
                } => matches!(plan.work[source], Work::Task { .. }),
                _ => false,
            };
            let after_ids: Option<Vec<String>> =
                plan.after[i].iter().map(|&w| ids[w].clone()).collect();
            if let (true, false, Some(after_ids)) = (host_orders, waits_here, after_ids) {
                let held = Held {
                    after: after_ids,
                    on_failure: plan.on_failure[i],
                };
                match submit(client, plan, &progress, &ids, i, Some(&held)).await {
                    Err(e) if e.message.contains("400 unsupported") => {
                        eprintln!("the host holds no dependencies: this command orders the steps");
                        host_orders = false;
                    }
                    submitted => {
                        let id = submitted.map_err(|e| not_retried(plan, i, e))?;
                        eprintln!("step {}: submitted {id}", plan.names[i]);
                        ids[i] = Some(id);
                        progress[i] = Progress::Submitted;
                        changed = true;
                        continue;
                    }
                }
            }
            let failed = plan.after[i]
                .iter()
                .find(|&&w| matches!(progress[w], Progress::Failed(_)));
            let all_ended = plan.after[i].iter().all(|&w| progress[w].ended());
            if let (Some(&failed), OnFailure::Cancel) = (failed, plan.on_failure[i]) {
                let why = format!("not run: step {:?} did not complete", plan.names[failed]);
                eprintln!("step {}: {why}", plan.names[i]);
                progress[i] = Progress::Failed(why);
                changed = true;
            } else if all_ended {
                let id = submit(client, plan, &progress, &ids, i, None)
                    .await
                    .map_err(|e| not_retried(plan, i, e))?;
                eprintln!("step {}: submitted {id}", plan.names[i]);
                ids[i] = Some(id);
                progress[i] = Progress::Submitted;
                changed = true;
            }
        }
        let mut running = false;
        for (i, step) in progress.iter_mut().enumerate() {
            if let (Progress::Submitted, Some(id)) = (&step, &ids[i]) {
                let name = &plan.names[i];
                match look(client, &plan.work[i], id).await? {
                    Some(done) => {
                        match &done {
                            Progress::Completed(_) => eprintln!("step {name}: completed"),
                            Progress::Failed(why) => eprintln!("step {name}: {why}"),
                            _ => {}
                        }
                        *step = done;
                        changed = true;
                    }
                    None => running = true,
                }
            }
        }
        if progress.iter().all(Progress::ended) {
            break;
        }
        pause = if changed {
            POLL_FIRST
        } else {
            (pause * 2).min(POLL)
        };
        if running && !changed {
            tokio::time::sleep(pause).await;
        }
    }
    let finals = plan.finals();
    let output = if let [only] = finals[..] {
        outcome(&progress[only])
    } else {
        Value::Object(
            finals
                .iter()
                .map(|&i| (plan.names[i].clone(), outcome(&progress[i])))
                .collect(),
        )
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&output).unwrap_or_default()
    );
    let failed: Vec<&str> = (0..progress.len())
        .filter(|&i| matches!(progress[i], Progress::Failed(_)))
        .map(|i| plan.names[i].as_str())
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(CliError::failed(format!(
            "steps that did not complete: {}",
            failed.join(", ")
        )))
    }
}

/// A step's submit failed: the error, saying why it is not tried again.
fn not_retried(plan: &Plan, i: usize, e: CliError) -> CliError {
    CliError {
        message: format!(
            "submitting step {:?}: {} (a submit is not retried: the host may have taken it)",
            plan.names[i], e.message
        ),
        ..e
    }
}

/// A step the host holds until the steps it names have ended.
struct Held {
    /// Their task or job ids.
    after: Vec<String>,
    on_failure: OnFailure,
}

/// What a finished step prints: a task's result, a job's id and counts,
/// or why it failed.
fn outcome(progress: &Progress) -> Value {
    match progress {
        Progress::Completed(value) => value.clone(),
        Progress::Failed(why) => json!({ "failed": why }),
        _ => Value::Null,
    }
}

/// Submit step `i`, its input gathered from the step it takes results of
/// (`ids`: the task or job id each submitted step got); `held`: with the
/// ids it waits for on the host.
async fn submit(
    client: &Client,
    plan: &Plan,
    progress: &[Progress],
    ids: &[Option<String>],
    i: usize,
    held: Option<&Held>,
) -> Result<String, CliError> {
    let with_after = |body: &Map<String, Value>| {
        let mut body = body.clone();
        if let Some(held) = held.filter(|h| !h.after.is_empty()) {
            body.insert("after".into(), json!(held.after));
            if held.on_failure == OnFailure::Run {
                body.insert("on_failure".into(), json!("run"));
            }
        }
        body
    };
    let posted = match &plan.work[i] {
        Work::Job(body) => client.post("/v1/jobs", &with_after(body)).await?,
        Work::Task { body, results_of } => {
            let mut body = with_after(body);
            let streamed = match (*results_of, held) {
                (Some(source), Some(_)) => match (&plan.work[source], &ids[source]) {
                    (Work::Job(_), Some(job)) => Some(job),
                    _ => None,
                },
                _ => None,
            };
            if let Some(job) = streamed {
                // The host reads the job's results to the task a page at a
                // time: no result set is too large.
                body.insert("input".into(), json!({ "results_of": job }));
            } else if let Some(source) = *results_of {
                // A job's results are those of its completed tasks, even when
                // others failed (an `on_failure: run` step reads them).
                let results = match (&plan.work[source], &progress[source], &ids[source]) {
                    (Work::Job(_), _, Some(job)) => job_results(client, job).await?,
                    (Work::Task { .. }, Progress::Completed(result), _) => vec![result.clone()],
                    _ => Vec::new(),
                };
                body.insert("payload".into(), Value::Array(results));
            }
            client.post("/v1/tasks", &body).await?
        }
    };
    posted["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| CliError::failed("the host answered a submit without an id"))
}

/// Whether a submitted step has ended: `None` while it runs.
async fn look(client: &Client, work: &Work, id: &str) -> Result<Option<Progress>, CliError> {
    Ok(match work {
        Work::Task { .. } => {
            let path = format!("/v1/tasks/{id}");
            let task = patiently(|| client.get(&path)).await?;
            match task["state"].as_str() {
                Some("Completed") => Some(Progress::Completed(
                    task.get("result").cloned().unwrap_or(Value::Null),
                )),
                Some(state @ ("Dead" | "Cancelled")) => Some(Progress::Failed(format!(
                    "task {id} ended {state}: {}",
                    task["error_message"].as_str().unwrap_or("")
                ))),
                _ => None,
            }
        }
        Work::Job(_) => {
            let path = format!("/v1/jobs/{id}");
            let job = patiently(|| client.get(&path)).await?;
            let counts = &job["counts"];
            let count = |state: &str| counts[state].as_u64().unwrap_or(0);
            match job["state"].as_str() {
                Some("Finished" | "Cancelled") if count("Dead") + count("Cancelled") == 0 => Some(
                    Progress::Completed(json!({"job": id, "completed": count("Completed")})),
                ),
                Some("Finished" | "Cancelled") => Some(Progress::Failed(format!(
                    "job {id}: {} dead, {} cancelled",
                    count("Dead"),
                    count("Cancelled")
                ))),
                _ => None,
            }
        }
    })
}

/// A finished job's results, in task order (`GET /v1/jobs/{id}/results`).
async fn job_results(client: &Client, id: &str) -> Result<Vec<Value>, CliError> {
    let path = format!("/v1/jobs/{id}/results");
    let text = patiently(|| client.get_text(&path)).await?;
    text.lines()
        .filter(|line| !line.is_empty())
        .map(|line| {
            let line: Value = serde_json::from_str(line)
                .map_err(|e| CliError::failed(format!("job {id}'s results: {e}")))?;
            Ok(line.get("result").cloned().unwrap_or(Value::Null))
        })
        .collect()
}

/// Step names in the order they run, for tests.
#[cfg(test)]
fn names_in_order(plan: &Plan) -> Vec<&str> {
    plan.order.iter().map(|&i| plan.names[i].as_str()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn parse(text: &str) -> Result<Plan, String> {
        plan(serde_json::from_str(text).map_err(|e| e.to_string())?)
    }

    #[test]
    fn steps_run_after_the_steps_they_name_whatever_the_file_order() {
        let plan = parse(
            r#"{"steps": [
                {"name": "price", "after": ["paths", "curve"], "task": {"module": "r", "input": {"results_of": "paths"}}},
                {"name": "paths", "after": ["curve"], "job": {"module": "p"}},
                {"name": "curve", "task": {"module": "c"}}
            ]}"#,
        )
        .unwrap();
        assert_eq!(names_in_order(&plan), ["curve", "paths", "price"]);
        assert_eq!(plan.finals(), [0]);
        assert_eq!(
            plan.work[0],
            Work::Task {
                body: serde_json::from_str(r#"{"module": "r"}"#).unwrap(),
                results_of: Some(1)
            }
        );
    }

    #[test]
    fn bad_workflows_are_refused_naming_the_step() {
        let cases: BTreeMap<&str, &str> = BTreeMap::from([
            (
                r#"{"steps": [{"name": "a", "after": ["b"], "task": {}}, {"name": "b", "after": ["a"], "task": {}}]}"#,
                "the steps a, b wait for each other",
            ),
            (
                r#"{"steps": [{"name": "a", "after": ["nope"], "task": {}}]}"#,
                "step \"a\" names an unknown step \"nope\"",
            ),
            (
                r#"{"steps": [{"name": "a", "task": {}}, {"name": "a", "job": {}}]}"#,
                "two steps are named \"a\"",
            ),
            (
                r#"{"steps": [{"name": "a", "task": {}, "job": {}}]}"#,
                "exactly one of task and job",
            ),
            (
                r#"{"steps": [{"name": "a", "job": {}}, {"name": "b", "task": {"input": {"results_of": "a"}}}]}"#,
                "must also name it in after",
            ),
            (r#"{"steps": []}"#, "no steps"),
        ]);
        for (text, expected) in cases {
            let error = parse(text).unwrap_err();
            assert!(error.contains(expected), "{text}: {error}");
        }
    }
}
