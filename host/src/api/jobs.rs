//! `/v1/jobs`: submit a job (explicit payloads or a sweep), look it up,
//! stream its results, pause, resume, cancel.

use super::error::{ApiJson, ApiQuery, AppError};
#[allow(unused_imports)]
use super::tasks::payload_bytes;
use super::wire::{Deleted, ErrorBody, JobSubmission, JobView, PriorityChange};
use super::{AppState, modules, views};
use crate::model::NewJob;
use crate::queue::Control;
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::Response;
use serde::Deserialize;

/// `POST /v1/jobs`: 201 with the job once it (and its explicit tasks) are durable.
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs", request_body = JobSubmission, responses((status = 201, description = "the job with its counts", body = JobView), (status = 400, body = ErrorBody)))]
pub(super) async fn submit(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<JobSubmission>,
) -> Result<(StatusCode, Json<JobView>), AppError> {
    let options = request.options.into_options()?;
    check_name(request.name.as_deref())?;
    super::tasks::check_dependencies(&state, &options).await?;
    let payloads: Vec<Vec<u8>> = match (request.payloads, request.payloads_base64, &request.sweep) {
        (Some(list), None, None) => list
            .into_iter()
            .map(|p| payload_bytes(Some(p), None))
            .collect::<Result<_, _>>()?,
        (None, Some(list), None) => list
            .into_iter()
            .map(|p| payload_bytes(None, Some(p)))
            .collect::<Result<_, _>>()?,
        (None, None, Some(sweep)) => {
            sweep
                .validate()
                .map_err(|e| AppError::bad_request("invalid_sweep", e.to_string()))?;
            Vec::new()
        }
        _ => {
            return Err(AppError::bad_request(
                "invalid_job",
                "give exactly one of payloads, payloads_base64 or sweep",
            ));
        }
    };
    if request.sweep.is_none() && payloads.is_empty() {
        return Err(AppError::bad_request(
            "invalid_job",
            "a job needs at least one payload",
        ));
    }
    if payloads.len() > state.limits.job_tasks {
        return Err(AppError::bad_request(
            "invalid_job",
            format!(
                "at most {} payloads per job; use a sweep, several jobs, or POST /v1/jobs/stream",
                state.limits.job_tasks
            ),
        ));
    }
    let module = modules::resolve(&state, &request.module).await?;
    let id = format!("j-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let job = NewJob {
        id,
        name: request.name,
        module,
        options,
        payloads,
        sweep: request.sweep,
    };
    let record = state.work.submit_job(job).await?;
    let stats = state.tracker.job(&record.id);
    Ok((StatusCode::CREATED, Json(views::job(&record, &stats))))
}

/// A job's name, if given, is 1 to 256 characters without control characters.
pub(super) fn check_name(name: Option<&str>) -> Result<(), AppError> {
    if let Some(name) = name
        && (name.is_empty() || name.chars().count() > 256 || name.chars().any(char::is_control))
    {
        return Err(AppError::bad_request(
            "invalid_field",
            "name: must be 1 to 256 characters, without control characters",
        ));
    }
    Ok(())
}

/// `GET /v1/jobs/{id}`: counts per state, progress, throughput, run times.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs", params(("id" = String, Path)), responses((status = 200, description = "counts per state, progress, throughput, run times", body = JobView), (status = 404, body = ErrorBody)))]
pub(super) async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, AppError> {
    let job = state.reads.job(&id).await?;
    Ok(Json(views::job(&job, &state.tracker.job(&id))))
}

/// Query of `GET /v1/jobs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    limit: Option<usize>,
}

/// `GET /v1/jobs`: newest first.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", params(("limit" = Option<usize>, Query, minimum = 1, maximum = 1000, description = "1 to 1000, default 100")), responses((status = 200, body = Vec<JobView>), (status = 400, body = ErrorBody)))]
pub(super) async fn list(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Vec<JobView>>, AppError> {
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > 1000 {
        return Err(AppError::bad_request(
            "invalid_query",
            "limit must be 1 to 1000",
        ));
    }
    let jobs = state.reads.jobs(limit).await?;
    Ok(Json(
        jobs.iter()
            .map(|j| views::job(j, &state.tracker.job(&j.id)))
            .collect(),
    ))
}

/// `GET /v1/jobs/{id}/results`: NDJSON, one line per completed task, in
/// task order: `{"task_id": ..., "result": ...}`. Streams in pages, so a
/// result set of any size is served in bounded memory.
#[utoipa::path(get, path = "/v1/jobs/{id}/results", tag = "jobs", params(("id" = String, Path)), responses((status = 200, description = "NDJSON: one {task_id, result} per completed task", content_type = "application/x-ndjson", body = String), (status = 404, body = ErrorBody)))]
pub(super) async fn results(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, AppError> {
    state.reads.job(&id).await?;
    let queue = state.reads.clone();
    let pages = futures::stream::unfold(Some(0u64), move |cursor| {
        let (queue, id) = (queue.clone(), id.clone());
        async move {
            let after = cursor?;
            match queue.results(&id, after, 1000).await {
                Ok(page) if page.is_empty() => None,
                Ok(page) => {
                    let next = page.last().map(|r| r.seq);
                    let mut chunk = Vec::new();
                    for result in page {
                        chunk.extend(crate::model::result_line(&result.task_id, &result.result));
                    }
                    Some((Ok::<_, std::io::Error>(chunk), next))
                }
                Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(pages))
        .map_err(|e| AppError::internal(e.to_string()))
}

/// `POST /v1/jobs/{id}/pause`.
#[utoipa::path(post, path = "/v1/jobs/{id}/pause", tag = "jobs", params(("id" = String, Path)), responses((status = 200, body = JobView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn pause(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, AppError> {
    control(&state, id.clone(), Control::PauseJob { job: id }).await
}

/// `POST /v1/jobs/{id}/resume`.
#[utoipa::path(post, path = "/v1/jobs/{id}/resume", tag = "jobs", params(("id" = String, Path)), responses((status = 200, body = JobView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn resume(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, AppError> {
    control(&state, id.clone(), Control::ResumeJob { job: id }).await
}

/// `POST /v1/jobs/{id}/priority`: raise a held job (priority 0: a held
/// sweep creates no points) or reorder a waiting one; its unfinished tasks
/// and the points not yet created take the new priority.
#[utoipa::path(post, path = "/v1/jobs/{id}/priority", tag = "jobs", params(("id" = String, Path)), request_body = PriorityChange, responses((status = 200, body = JobView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn set_priority(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<PriorityChange>,
) -> Result<Json<JobView>, AppError> {
    let priority = request.checked()?;
    control(
        &state,
        id.clone(),
        Control::JobPriority { job: id, priority },
    )
    .await
}

/// `POST /v1/jobs/{id}/cancel`.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs", params(("id" = String, Path)), responses((status = 200, body = JobView), (status = 404, body = ErrorBody)))]
pub(super) async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, AppError> {
    control(&state, id.clone(), Control::CancelJob { job: id }).await
}

/// `DELETE /v1/jobs/{id}`: delete a finished or cancelled job with its
/// tasks, results and events (their space in the store is reused); 409
/// while any of its tasks may still run.
#[utoipa::path(delete, path = "/v1/jobs/{id}", tag = "jobs", params(("id" = String, Path)), responses((status = 200, body = Deleted), (status = 404, body = ErrorBody), (status = 409, description = "the job has unfinished tasks, or the backend keeps what its topics keep", body = ErrorBody)))]
pub(super) async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Deleted>, AppError> {
    state
        .work
        .control(Control::DeleteJob { job: id.clone() })
        .await?;
    state.tracker.forget_job(&id);
    Ok(Json(Deleted { id, deleted: true }))
}

/// Apply a job control, then answer with the job as it is after it.
async fn control(
    state: &AppState,
    id: String,
    control: Control,
) -> Result<Json<JobView>, AppError> {
    state.work.control(control).await?;
    let job = state.reads.job(&id).await?;
    Ok(Json(views::job(&job, &state.tracker.job(&id))))
}
