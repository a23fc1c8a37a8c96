//! `/v1/modules`: upload (validated by compiling it), list, get.

use super::AppState;
use super::error::{ApiQuery, AppError};
use super::wire::ErrorBody;
use crate::model::ModuleId;
use crate::queue::ModuleRecord;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;

/// Query of an upload.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UploadQuery {
    name: Option<String>,
}

/// `POST /v1/modules?name=`: raw Wasm bytes in the body. The same bytes
/// always get the same id; bytes that do not compile get 400 with the reason.
#[utoipa::path(post, path = "/v1/modules", tag = "modules", params(("name" = Option<String>, Query, description = "a name to refer to the module by")), request_body(content = Vec<u8>, content_type = "application/wasm", description = "the module's .wasm bytes"), responses((status = 201, description = "stored", body = crate::queue::ModuleRecord), (status = 200, description = "already known (same bytes, same id)", body = crate::queue::ModuleRecord), (status = 400, description = "not a usable module", body = ErrorBody), (status = 413, description = "body too large", body = ErrorBody), (status = 415, description = "not application/wasm or application/octet-stream", body = ErrorBody)))]
pub(super) async fn upload(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<UploadQuery>,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<(StatusCode, Json<ModuleRecord>), AppError> {
    super::guard::require_wasm_body(&headers)?;
    let body = body?;
    if body.is_empty() {
        return Err(AppError::bad_request(
            "invalid_module",
            "the body is empty: send the module's .wasm bytes",
        ));
    }
    if let Some(name) = &query.name {
        check_name(name)?;
    }
    let registered = state.modules.register(query.name, body.to_vec()).await?;
    let status = if registered.existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(registered.record)))
}

/// A module name: 1 to 128 characters, no control characters, and not 64
/// hex digits (that would read as a module id), nor `external:…`.
fn check_name(name: &str) -> Result<(), AppError> {
    let why = if name.is_empty() || name.chars().count() > 128 {
        "must be 1 to 128 characters"
    } else if name.chars().any(char::is_control) {
        "must not contain control characters"
    } else if ModuleId::parse(name).is_some() {
        "must not be 64 hex digits (that is how module ids look)"
    } else if name.starts_with(ModuleId::EXTERNAL_PREFIX) {
        "must not start with `external:` (that names tasks for external workers)"
    } else {
        return Ok(());
    };
    Err(AppError::bad_request("invalid_name", format!("name {why}")))
}

/// `GET /v1/modules`.
#[utoipa::path(get, path = "/v1/modules", tag = "modules", responses((status = 200, body = Vec<crate::queue::ModuleRecord>)))]
pub(super) async fn list(
    State(state): State<AppState>,
) -> Result<Json<Vec<ModuleRecord>>, AppError> {
    Ok(Json(state.reads.modules().await?))
}

/// `GET /v1/modules/{id}` (id or name).
#[utoipa::path(get, path = "/v1/modules/{id}", tag = "modules", params(("id" = String, Path, description = "module id (SHA-256) or name")), responses((status = 200, body = crate::queue::ModuleRecord), (status = 400, body = ErrorBody)))]
pub(super) async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ModuleRecord>, AppError> {
    let id = resolve(&state, &id).await?;
    Ok(Json(state.reads.module(&id).await?))
}

/// A module named by its id (64 hex digits) or by one of its names (a name
/// points at the latest module uploaded under it), or an external kind
/// (`external:NAME`: tasks for workers outside the Wasm runtime).
pub(super) async fn resolve(state: &AppState, module: &str) -> Result<ModuleId, AppError> {
    if module.starts_with(ModuleId::EXTERNAL_PREFIX) {
        return ModuleId::external(module).ok_or_else(|| {
            AppError::bad_request(
                "invalid_module",
                format!("{module:?}: an external kind is `external:` and 1-64 letters, digits, '-', '_' or '.'"),
            )
        });
    }
    if let Some(id) = ModuleId::parse(module) {
        if state.module_names.is_stored(&id) {
            return Ok(id);
        }
        return match state.reads.module(&id).await {
            Ok(_) => {
                state.module_names.found_id(&id);
                Ok(id)
            }
            Err(_) => Err(AppError::bad_request(
                "unknown_module",
                format!("no module with id {id} was uploaded"),
            )),
        };
    }
    if let Some(id) = state.module_names.named(module) {
        return Ok(id);
    }
    let id = state.reads.module_named(module).await?.ok_or_else(|| {
        AppError::bad_request(
            "unknown_module",
            format!("no module named {module:?}: upload it first"),
        )
    })?;
    state.module_names.found(module, &id);
    Ok(id)
}
