//! The one error shape of the HTTP API: `{"error": {"code", "message"}}`.

use super::wire::{ErrorBody, ErrorDetail};
use crate::dispatch::RegisterError;
use crate::queue::QueueError;
use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// An API error: status, stable code, and a message naming the problem.
#[derive(Debug)]
pub struct AppError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code, e.g. `invalid_module`.
    pub code: &'static str,
    /// What is wrong, for people.
    pub message: String,
}

impl AppError {
    /// 400 with a code.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        AppError {
            status: StatusCode::BAD_REQUEST,
            code,
            message: message.into(),
        }
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        AppError {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: message.into(),
        }
    }

    /// 401.
    pub fn unauthorized() -> Self {
        AppError {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthorized",
            message: "this endpoint needs the header Authorization: Bearer <token>".into(),
        }
    }

    /// 500.
    pub fn internal(message: impl Into<String>) -> Self {
        AppError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message: message.into(),
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let body = Json(ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        });
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            // The store or the host recovers by itself: say when to try again.
            return (self.status, [(axum::http::header::RETRY_AFTER, "5")], body).into_response();
        }
        (self.status, body).into_response()
    }
}

impl From<QueueError> for AppError {
    fn from(e: QueueError) -> Self {
        let status = match &e {
            QueueError::NotFound(_) => StatusCode::NOT_FOUND,
            QueueError::Conflict(_) | QueueError::StaleLease(_) => StatusCode::CONFLICT,
            QueueError::Closed | QueueError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            QueueError::Storage { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let code = match &e {
            QueueError::NotFound(_) => "not_found",
            QueueError::Conflict(_) | QueueError::StaleLease(_) => "conflict",
            QueueError::Closed => "shutting_down",
            QueueError::Unavailable(_) => "store_unavailable",
            QueueError::Storage { .. } => "storage",
        };
        AppError {
            status,
            code,
            message: e.to_string(),
        }
    }
}

impl From<RegisterError> for AppError {
    fn from(e: RegisterError) -> Self {
        match e {
            RegisterError::Invalid(reason) => AppError::bad_request("invalid_module", reason),
            RegisterError::Store(e) => e.into(),
            other => AppError::internal(other.to_string()),
        }
    }
}

impl From<JsonRejection> for AppError {
    fn from(rejection: JsonRejection) -> Self {
        let status = rejection.status();
        let (status, code) = match status {
            StatusCode::PAYLOAD_TOO_LARGE => (status, "body_too_large"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => (status, "unsupported_media_type"),
            // Well-formed JSON of the wrong shape (a missing field, a number
            // out of its type's range, an unknown field): the same 400 as a
            // value the handler itself finds out of range, so one mistake
            // gets one status whichever layer notices it.
            StatusCode::UNPROCESSABLE_ENTITY => (StatusCode::BAD_REQUEST, "invalid_field"),
            _ => (status, "invalid_json"),
        };
        AppError {
            status,
            code,
            message: rejection.body_text(),
        }
    }
}

impl From<QueryRejection> for AppError {
    fn from(rejection: QueryRejection) -> Self {
        AppError::bad_request("invalid_query", rejection.body_text())
    }
}

impl From<axum::extract::rejection::BytesRejection> for AppError {
    fn from(rejection: axum::extract::rejection::BytesRejection) -> Self {
        let status = rejection.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "body_too_large"
        } else {
            "invalid_body"
        };
        AppError {
            status,
            code,
            message: rejection.body_text(),
        }
    }
}

/// `Json` whose rejections are [`AppError`]s.
#[derive(Debug, axum::extract::FromRequest)]
#[from_request(via(axum::Json), rejection(AppError))]
pub(super) struct ApiJson<T>(pub T);

/// `Query` whose rejections are [`AppError`]s.
#[derive(Debug, axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(AppError))]
pub(super) struct ApiQuery<T>(pub T);
