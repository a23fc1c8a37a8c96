//! Client commands: they talk to a running `kwq serve` over its HTTP API.

use super::{CliError, parse};
use crate::api::wire::{
    JobSubmission, PriorityChange, SubmitOptions, TaskInput, TaskSubmission, parse_tag,
};
use serde_json::Number;
use serde_json::{Map, Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the server is and how to authenticate.
#[derive(Debug, Clone, clap::Args)]
pub struct Connection {
    /// Base URL of a kwq host.
    #[arg(
        long,
        global = true,
        env = "KWQ_SERVER",
        default_value = "http://127.0.0.1:7700"
    )]
    server: String,
    /// Bearer token for write endpoints.
    #[arg(
        long = "auth-token",
        global = true,
        env = "KWQ_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
}

/// Options shared by `submit` and `job submit`.
#[derive(Debug, Clone, clap::Args)]
pub struct TaskFlags {
    /// Module id or name.
    #[arg(long, short)]
    module: String,
    /// Priority 0..=9 (9 highest; 0 holds the task).
    #[arg(long)]
    priority: Option<u8>,
    /// Tag as key=value (or key:value); repeat for more.
    #[arg(long = "tag", value_parser = parse_tag)]
    tags: Vec<(String, String)>,
    /// Affinity key, e.g. curve=USD.
    #[arg(long)]
    affinity: Option<String>,
    /// Timeout per attempt, e.g. 30s.
    #[arg(long, value_parser = parse::duration)]
    timeout: Option<Duration>,
    /// Memory cap, e.g. 256MiB.
    #[arg(long, value_parser = parse::bytes)]
    memory: Option<u64>,
    /// Attempts before the task is parked as Dead.
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Start no earlier than this long from now.
    #[arg(long, value_parser = parse::duration)]
    delay: Option<Duration>,
    /// Wait (state Waiting) until this task or job has ended; repeat for
    /// more. The embedded store only.
    #[arg(long = "after", value_name = "ID")]
    after: Vec<String>,
    /// With --after: what a dependency that did not complete does.
    #[arg(long, value_parser = ["cancel", "run"], requires = "after")]
    on_failure: Option<String>,
}

impl TaskFlags {
    /// The options of a submission, as the API reads them.
    fn options(&self) -> SubmitOptions {
        SubmitOptions {
            priority: self.priority.map(Number::from),
            tags: self.tags.iter().cloned().collect(),
            affinity: self.affinity.clone(),
            timeout_ms: self.timeout.map(|t| Number::from(t.as_millis() as u64)),
            memory_bytes: self.memory.map(Number::from),
            max_attempts: self.max_attempts.map(Number::from),
            delay_ms: self.delay.map(|d| Number::from(d.as_millis() as u64)),
            after: self.after.clone(),
            on_failure: self.on_failure.clone(),
            ..SubmitOptions::default()
        }
    }
}

/// `kwq module ...`.
#[derive(Debug, clap::Subcommand)]
pub enum ModuleCommand {
    /// Upload a .wasm module; prints its record (id = SHA-256).
    Push {
        /// The module file.
        file: PathBuf,
        /// A name to refer to it by.
        #[arg(long)]
        name: Option<String>,
    },
    /// List uploaded modules.
    List,
}

/// `kwq job ...`.
#[derive(Debug, clap::Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub enum JobCommand {
    /// Submit a job: payloads from a file (JSON array or NDJSON), or a sweep.
    Submit {
        /// Options of every task.
        #[command(flatten)]
        task: TaskFlags,
        /// File of payloads: a JSON array, or one JSON value per line.
        #[arg(long, conflicts_with = "sweep")]
        payloads: Option<PathBuf>,
        /// Stream the --payloads file (NDJSON) to `POST /v1/jobs/stream` as
        /// it is read, for files of any size (no cap on a Kafka grid).
        #[arg(long, requires = "payloads")]
        stream: bool,
        /// Sweep axis NAME=FROM..TO[:STEP] or NAME=[v1,v2,...]; repeat for more axes.
        #[arg(long)]
        sweep: Vec<String>,
        /// Fields every sweep payload shares (a JSON object).
        #[arg(long, default_value = "{}")]
        base: String,
        /// A name for people.
        #[arg(long)]
        name: Option<String>,
        /// Watch the job with a progress bar after submitting.
        #[arg(long)]
        watch: bool,
        /// Wait for the job to finish, then print its results as NDJSON
        /// (the job id goes to stderr). Exit 1 if any task did not complete.
        #[arg(long)]
        results: bool,
    },
    /// Stop leasing a job's tasks.
    Pause {
        /// Job id.
        id: String,
    },
    /// Lease a paused job's tasks again.
    Resume {
        /// Job id.
        id: String,
    },
    /// Cancel a job's unfinished tasks.
    Cancel {
        /// Job id.
        id: String,
    },
    /// Delete a finished or cancelled job with its tasks, results and events.
    Delete {
        /// Job id.
        id: String,
    },
    /// Change a job's priority: 1..=9 releases a held job, 0 holds it.
    Priority {
        /// Job id.
        id: String,
        /// New priority, 0..=9 (9 highest, 0 holds).
        #[arg(value_parser = clap::value_parser!(u8).range(0..=9))]
        priority: u8,
    },
    /// List jobs, newest first.
    List,
}

/// A small HTTP client for the API.
pub(super) struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    /// A client of the host `connection` names.
    pub(super) fn new(connection: &Connection) -> Self {
        Client {
            http: reqwest::Client::new(),
            base: connection.server.trim_end_matches('/').to_string(),
            token: connection.token.clone(),
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let builder = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    /// Send a request; a success's response, or the host's refusal (or
    /// the connection's failure) as one line.
    async fn answered(
        &self,
        builder: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, CliError> {
        let response = builder
            .send()
            .await
            .map_err(|e| CliError::failed(format!("cannot reach {}: {e}", self.base)))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body: Value = response.json().await.unwrap_or(Value::Null);
        Err(refusal(status, &body))
    }

    async fn send(&self, builder: reqwest::RequestBuilder) -> Result<Value, CliError> {
        let response = self.answered(builder).await?;
        Ok(response.json().await.unwrap_or(Value::Null))
    }

    /// `GET path`, its JSON body.
    pub(super) async fn get(&self, path: &str) -> Result<Value, CliError> {
        self.send(self.request(reqwest::Method::GET, path)).await
    }

    /// `GET path`, its body as text (NDJSON), with errors as [`Client::get`]'s.
    pub(super) async fn get_text(&self, path: &str) -> Result<String, CliError> {
        self.answered(self.request(reqwest::Method::GET, path))
            .await?
            .text()
            .await
            .map_err(|e| CliError::failed(format!("reading {path} from {}: {e}", self.base)))
    }

    /// `POST path` with a JSON body, its JSON answer.
    pub(super) async fn post(
        &self,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Result<Value, CliError> {
        self.send(self.request(reqwest::Method::POST, path).json(body))
            .await
    }

    /// `POST /v1/jobs/stream`: the job as its first line, then the NDJSON
    /// file `path` as it is read (never whole in memory).
    async fn post_stream(&self, job: &JobSubmission, path: &Path) -> Result<Value, CliError> {
        use futures::StreamExt;
        use tokio::io::AsyncReadExt;
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| CliError::usage(format!("cannot read {}: {e}", path.display())))?;
        let mut first = serde_json::to_vec(job).unwrap_or_default();
        first.push(b'\n');
        let rest = futures::stream::unfold(file, |mut file| async move {
            let mut buffer = vec![0; 256 * 1024];
            match file.read(&mut buffer).await {
                Ok(0) => None,
                Ok(n) => {
                    buffer.truncate(n);
                    Some((Ok(buffer), file))
                }
                Err(e) => Some((Err(e), file)),
            }
        });
        let body = futures::stream::once(async move { Ok::<_, std::io::Error>(first) }).chain(rest);
        self.send(
            self.request(reqwest::Method::POST, "/v1/jobs/stream")
                .header(reqwest::header::CONTENT_TYPE, "application/x-ndjson")
                .body(reqwest::Body::wrap_stream(body)),
        )
        .await
    }
}

/// A host's error answer as one line: the user's fault (4xx, exit 2) or
/// the host's (exit 1).
fn refusal(status: reqwest::StatusCode, body: &Value) -> CliError {
    let message = body["error"]["message"].as_str().unwrap_or("no details");
    let code = body["error"]["code"].as_str().unwrap_or("error");
    let error = format!("{} {code}: {message}", status.as_u16());
    if status.is_client_error() {
        CliError::usage(error)
    } else {
        CliError::failed(error)
    }
}

fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

fn block_on<T>(
    future: impl std::future::Future<Output = Result<T, CliError>>,
) -> Result<T, CliError> {
    super::tokio_runtime()?.block_on(future)
}

/// `kwq module push|list`.
pub(super) fn module(connection: Connection, command: ModuleCommand) -> Result<(), CliError> {
    let client = Client::new(&connection);
    block_on(async move {
        match command {
            ModuleCommand::Push { file, name } => {
                let bytes = std::fs::read(&file)
                    .map_err(|e| CliError::usage(format!("cannot read {}: {e}", file.display())))?;
                let mut request = client
                    .request(reqwest::Method::POST, "/v1/modules")
                    .body(bytes);
                if let Some(name) = name {
                    request = request.query(&[("name", name)]);
                }
                print_json(&client.send(request).await?);
            }
            ModuleCommand::List => print_json(&client.get("/v1/modules").await?),
        }
        Ok(())
    })
}

/// `kwq submit`: one task; prints its id.
pub(super) fn submit(
    connection: Connection,
    task: TaskFlags,
    payload: String,
    wait: Option<std::time::Duration>,
    durable: bool,
    results_of: Option<String>,
) -> Result<(), CliError> {
    let client = Client::new(&connection);
    let (payload, input) = match results_of {
        Some(job) => (None, Some(TaskInput { results_of: job })),
        None => (Some(read_json_arg(&payload)?), None),
    };
    let body = TaskSubmission {
        options: task.options(),
        module: task.module,
        payload,
        payload_base64: None,
        durable: (!durable).then_some(false),
        input,
    };
    block_on(async move {
        let path = match wait {
            Some(wait) => format!("/v1/tasks?wait={}ms", wait.as_millis()),
            None => "/v1/tasks".to_string(),
        };
        let answer = client.post(&path, &body).await?;
        let id = answer["id"].as_str().unwrap_or_default();
        // With --wait, a finished task comes back whole: print its result.
        match answer["state"].as_str() {
            None => {
                println!("{id}");
                if let Some(wait) = wait {
                    eprintln!("not finished within {wait:?}: follow it with `kwq status {id}`");
                }
                Ok(())
            }
            Some("Completed") => {
                let result = answer
                    .get("result")
                    .cloned()
                    .unwrap_or_else(|| answer.get("result_base64").cloned().unwrap_or(Value::Null));
                println!("{result}");
                Ok(())
            }
            Some(state) => Err(CliError::failed(format!(
                "task {id} ended {state}: {}",
                answer["error_message"].as_str().unwrap_or("cancelled")
            ))),
        }
    })
}

/// A JSON argument: inline, `@FILE`, or `-` for stdin.
fn read_json_arg(text: &str) -> Result<Value, CliError> {
    let raw = if text == "-" {
        std::io::read_to_string(std::io::stdin())
            .map_err(|e| CliError::usage(format!("cannot read stdin: {e}")))?
    } else if let Some(path) = text.strip_prefix('@') {
        std::fs::read_to_string(path)
            .map_err(|e| CliError::usage(format!("cannot read {path}: {e}")))?
    } else {
        text.to_string()
    };
    serde_json::from_str(&raw).map_err(|e| CliError::usage(format!("payload is not JSON: {e}")))
}

/// Payloads from a file: a JSON array, or NDJSON.
fn read_payloads(path: &PathBuf) -> Result<Vec<Value>, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::usage(format!("cannot read {}: {e}", path.display())))?;
    if let Ok(Value::Array(items)) = serde_json::from_str::<Value>(&text) {
        return Ok(items);
    }
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| {
                CliError::usage(format!("{}:{}: not JSON: {e}", path.display(), i + 1))
            })
        })
        .collect()
}

/// `NAME=FROM..TO[:STEP]` or `NAME=[a,b,c]` into a sweep axis.
fn parse_axis(text: &str) -> Result<(String, Value), CliError> {
    let bad = || {
        CliError::usage(format!(
            "sweep {text:?} must look like spot=80..120:0.5 or kind=[\"call\",\"put\"]"
        ))
    };
    let (name, spec) = text.split_once('=').ok_or_else(bad)?;
    if spec.starts_with('[') {
        let values: Value = serde_json::from_str(spec).map_err(|_| bad())?;
        return Ok((name.to_string(), values));
    }
    let (range, step) = spec.split_once(':').unwrap_or((spec, "1"));
    let (from, to) = range.split_once("..").ok_or_else(bad)?;
    let number = |s: &str| s.trim().parse::<f64>().map_err(|_| bad());
    Ok((
        name.to_string(),
        json!({"from": number(from)?, "to": number(to)?, "step": number(step)?}),
    ))
}

/// `kwq job ...`.
pub(super) fn job(connection: Connection, command: JobCommand) -> Result<(), CliError> {
    let client = Client::new(&connection);
    match command {
        JobCommand::Submit {
            task,
            payloads,
            stream,
            sweep,
            base,
            name,
            watch,
            results,
        } => {
            let mut body = JobSubmission {
                options: task.options(),
                module: task.module,
                name,
                payloads: None,
                payloads_base64: None,
                sweep: None,
            };
            let mut streamed = None;
            match (payloads, sweep.is_empty()) {
                (Some(path), _) if stream => streamed = Some(path),
                (Some(path), _) => body.payloads = Some(read_payloads(&path)?),
                (None, false) => {
                    let base = read_json_arg(&base)?;
                    let params: Map<String, Value> = sweep
                        .iter()
                        .map(|s| parse_axis(s))
                        .collect::<Result<_, _>>()?;
                    let sweep = serde_json::from_value(json!({"base": base, "params": params}))
                        .map_err(|e| CliError::usage(format!("sweep: {e}")))?;
                    body.sweep = Some(sweep);
                }
                (None, true) => {
                    return Err(CliError::usage(
                        "give --payloads FILE or at least one --sweep",
                    ));
                }
            }
            let id = block_on(async {
                let job = match &streamed {
                    Some(path) => client.post_stream(&body, path).await?,
                    None => client.post("/v1/jobs", &body).await?,
                };
                Ok(job["id"].as_str().unwrap_or_default().to_string())
            })?;
            if results {
                eprintln!("job {id}");
                let finished = watch_job(&client, &id);
                stream_results(&client, &id)?;
                return finished;
            }
            println!("{id}");
            if watch {
                watch_job(&client, &id)
            } else {
                Ok(())
            }
        }
        JobCommand::Pause { id } => block_on(async {
            print_json(
                &client
                    .post(&format!("/v1/jobs/{id}/pause"), &json!({}))
                    .await?,
            );
            Ok(())
        }),
        JobCommand::Resume { id } => block_on(async {
            print_json(
                &client
                    .post(&format!("/v1/jobs/{id}/resume"), &json!({}))
                    .await?,
            );
            Ok(())
        }),
        JobCommand::Cancel { id } => block_on(async {
            print_json(
                &client
                    .post(&format!("/v1/jobs/{id}/cancel"), &json!({}))
                    .await?,
            );
            Ok(())
        }),
        JobCommand::Delete { id } => block_on(async {
            print_json(
                &client
                    .send(client.request(reqwest::Method::DELETE, &format!("/v1/jobs/{id}")))
                    .await?,
            );
            Ok(())
        }),
        JobCommand::Priority { id, priority } => block_on(async {
            print_json(
                &client
                    .post(
                        &format!("/v1/jobs/{id}/priority"),
                        &PriorityChange { priority },
                    )
                    .await?,
            );
            Ok(())
        }),
        JobCommand::List => block_on(async {
            print_json(&client.get("/v1/jobs").await?);
            Ok(())
        }),
    }
}

/// `kwq status ID`: a task (with its timeline) or a job (`j-...`).
pub(super) fn status(connection: Connection, id: String) -> Result<(), CliError> {
    let client = Client::new(&connection);
    let path = if id.starts_with("j-") && !id.contains('.') {
        format!("/v1/jobs/{id}")
    } else {
        format!("/v1/tasks/{id}")
    };
    block_on(async move {
        print_json(&client.get(&path).await?);
        Ok(())
    })
}

/// `kwq watch JOB`.
pub(super) fn watch(connection: Connection, id: String) -> Result<(), CliError> {
    watch_job(&Client::new(&connection), &id)
}

/// A progress bar with rate and ETA until the job finishes. Exit code 1 if
/// any task ended Dead or Cancelled.
fn watch_job(client: &Client, id: &str) -> Result<(), CliError> {
    block_on(async {
        let job = client.get(&format!("/v1/jobs/{id}")).await?;
        let bar = indicatif::ProgressBar::new(job["total"].as_u64().unwrap_or(0));
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {elapsed_precise} [{bar:40}] {pos}/{len} {per_sec} ETA {eta} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        loop {
            let job = client.get(&format!("/v1/jobs/{id}")).await?;
            let counts = &job["counts"];
            bar.set_position(job["finished"].as_u64().unwrap_or(0));
            bar.set_message(format!(
                "waiting {} running {} failed {} dead {}",
                counts["Waiting"].as_u64().unwrap_or(0),
                counts["Running"].as_u64().unwrap_or(0),
                counts["Error"].as_u64().unwrap_or(0),
                counts["Dead"].as_u64().unwrap_or(0)
            ));
            if matches!(job["state"].as_str(), Some("Finished" | "Cancelled")) {
                bar.finish();
                let dead = counts["Dead"].as_u64().unwrap_or(0)
                    + counts["Cancelled"].as_u64().unwrap_or(0);
                eprintln!(
                    "job {id} {}: {} completed, {} dead, {} cancelled, mean run {}, p95 {}",
                    job["state"].as_str().unwrap_or(""),
                    counts["Completed"],
                    counts["Dead"],
                    counts["Cancelled"],
                    super::parse::micros(job["mean_run_us"].as_f64().unwrap_or(0.0)),
                    super::parse::micros(job["p95_run_us"].as_f64().unwrap_or(0.0))
                );
                return if dead > 0 {
                    Err(CliError::failed(format!("{dead} tasks did not complete")))
                } else {
                    Ok(())
                };
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
}

/// `kwq results JOB`: NDJSON to stdout.
pub(super) fn results(connection: Connection, id: String) -> Result<(), CliError> {
    stream_results(&Client::new(&connection), &id)
}

/// A job's results as NDJSON to stdout, as the host streams them.
fn stream_results(client: &Client, id: &str) -> Result<(), CliError> {
    block_on(async move {
        let mut response = client
            .request(reqwest::Method::GET, &format!("/v1/jobs/{id}/results"))
            .send()
            .await
            .map_err(|e| CliError::failed(format!("cannot reach {}: {e}", client.base)))?;
        if !response.status().is_success() {
            let status = response.status();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            let message = format!(
                "{} {}",
                status.as_u16(),
                body["error"]["message"].as_str().unwrap_or("")
            );
            return Err(if status.is_client_error() {
                CliError::usage(message)
            } else {
                CliError::failed(message)
            });
        }
        let mut out = std::io::stdout().lock();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| CliError::failed(e.to_string()))?
        {
            match out.write_all(&chunk) {
                Ok(()) => {}
                // The reader (e.g. `head`) has seen enough.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                Err(e) => return Err(CliError::failed(e.to_string())),
            }
        }
        Ok(())
    })
}
