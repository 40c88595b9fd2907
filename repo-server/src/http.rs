//! HTTP: the repository as static files (ranges, content types) and the publish API.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;
use sha2::Digest;
use tokio::io::AsyncWriteExt;
use tower_http::services::ServeDir;

use crate::fsutil::hex;
use crate::store::{Repo, RepoError};
use crate::tokens::{AuthError, Team, Tokens};

pub struct AppState {
    pub repo: Repo,
    pub tokens: Tokens,
}

type Shared = Arc<AppState>;

pub fn router(state: Shared) -> Router {
    let files = ServeDir::new(state.repo.public()).append_index_html_on_directories(false);
    Router::new()
        .route("/api/v1/suites", get(suites))
        .route("/api/v1/suites/:suite/packages", post(upload).get(list))
        .route("/api/v1/suites/:suite/packages/:name/:version", delete(remove))
        .route("/api/v1/promote", post(promote))
        .fallback_service(files)
        .layer(middleware::from_fn(log_request))
        .with_state(state)
}

async fn log_request(mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    // Release and the plain indices can change twice within a second, the resolution of
    // Last-Modified: a 304 would then hide a publish from apt. by-hash files never change, so
    // conditional requests stay useful there.
    let path = req.uri().path();
    if path.starts_with("/dists/") && !path.contains("/by-hash/") {
        req.headers_mut().remove(header::IF_MODIFIED_SINCE);
        req.headers_mut().remove(header::IF_NONE_MATCH);
        req.headers_mut().remove(header::IF_RANGE);
    }
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let range =
        req.headers().get(header::RANGE).and_then(|v| v.to_str().ok()).map(|r| format!(" {r}")).unwrap_or_default();
    let resp = next.run(req).await;
    let len = resp.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned();
    tracing::info!("{method} {path}{range} {} {len} {}ms", resp.status().as_u16(), started.elapsed().as_millis());
    resp
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

impl IntoResponse for RepoError {
    fn into_response(self) -> Response {
        let status = match &self {
            RepoError::BadRequest(_) | RepoError::Deb(_) => StatusCode::BAD_REQUEST,
            RepoError::Conflict(_) => StatusCode::CONFLICT,
            RepoError::NotFound(_) => StatusCode::NOT_FOUND,
            RepoError::Forbidden(_) => StatusCode::FORBIDDEN,
            RepoError::Internal(e) => {
                tracing::error!("{e:#}");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        error(status, self.to_string())
    }
}

fn authorize(state: &AppState, headers: &HeaderMap) -> Result<Team, Response> {
    let token =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    state.tokens.check(token.map(str::trim)).map_err(|e| {
        let status = if e == AuthError::Missing { StatusCode::UNAUTHORIZED } else { StatusCode::FORBIDDEN };
        error(status, e.to_string())
    })
}

/// Removes the temporary upload however the request ends.
struct TempUpload(PathBuf);

impl Drop for TempUpload {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn upload(State(state): State<Shared>, Path(suite): Path<String>, headers: HeaderMap, body: Body) -> Response {
    let team = match authorize(&state, &headers) {
        Ok(t) => t,
        Err(r) => return r,
    };
    if !crate::control::valid_suite(&suite) {
        return RepoError::BadRequest(format!("suite {suite:?} must match [a-z0-9][a-z0-9.-]*")).into_response();
    }
    let max = state.repo.config.max_upload_bytes;
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("upload of {} bytes exceeds the limit of {max}", declared.unwrap()),
        );
    }
    let mut raw = [0u8; 12];
    let _ = getrandom::getrandom(&mut raw);
    let tmp = TempUpload(state.repo.tmp_dir().join(format!("upload-{}.deb", hex(&raw))));
    let mut file = match tokio::fs::File::create(&tmp.0).await {
        Ok(f) => f,
        Err(e) => return RepoError::Internal(e.into()).into_response(),
    };
    let mut hasher = sha2::Sha256::new();
    let mut size = 0u64;
    let received = Instant::now();
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("upload truncated or interrupted: {e}")),
        };
        size += chunk.len() as u64;
        if size > max {
            return error(StatusCode::PAYLOAD_TOO_LARGE, format!("upload exceeds the limit of {max} bytes"));
        }
        hasher.update(&chunk);
        if let Err(e) = file.write_all(&chunk).await {
            return RepoError::Internal(e.into()).into_response();
        }
    }
    if declared.is_some_and(|n| n != size) {
        return error(StatusCode::BAD_REQUEST, format!("upload truncated: {size} of {} bytes", declared.unwrap()));
    }
    if let Err(e) = file.sync_all().await {
        return RepoError::Internal(e.into()).into_response();
    }
    drop(file);
    let sha256 = hex(&hasher.finalize());
    tracing::debug!("upload of {size} bytes received in {:?}", received.elapsed());
    let st = state.clone();
    let team_scope = team.scope.clone();
    let result = tokio::task::spawn_blocking(move || {
        let r = st.repo.publish(&suite, &tmp.0, &sha256, size, &|name| team_scope.allows(name, &suite));
        drop(tmp);
        r
    })
    .await;
    match result {
        Ok(Ok(p)) => {
            tracing::info!("team {}: {} {} {} -> {} ({})", team.name, p.name, p.version, p.arch, p.suite, p.status);
            let status = if p.status == "published" { StatusCode::CREATED } else { StatusCode::OK };
            (status, Json(p)).into_response()
        }
        Ok(Err(e)) => e.into_response(),
        Err(e) => RepoError::Internal(anyhow::anyhow!("publish task: {e}")).into_response(),
    }
}

async fn suites(State(state): State<Shared>) -> Response {
    Json(json!({"suites": state.repo.suites()})).into_response()
}

async fn list(State(state): State<Shared>, Path(suite): Path<String>) -> Response {
    match state.repo.list(&suite) {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
struct ArchQuery {
    arch: Option<String>,
}

async fn remove(
    State(state): State<Shared>,
    Path((suite, name, version)): Path<(String, String, String)>,
    Query(q): Query<ArchQuery>,
    headers: HeaderMap,
) -> Response {
    let team = match authorize(&state, &headers) {
        Ok(t) => t,
        Err(r) => return r,
    };
    if let Err(why) = team.scope.allows(&name, &suite) {
        return RepoError::Forbidden(why).into_response();
    }
    let st = state.clone();
    let r = tokio::task::spawn_blocking(move || st.repo.remove(&suite, &name, &version, q.arch.as_deref())).await;
    match r {
        Ok(Ok(removed)) => {
            let list: Vec<_> =
                removed.iter().map(|e| json!({"name": e.name, "version": e.version, "arch": e.arch})).collect();
            Json(json!({"removed": list})).into_response()
        }
        Ok(Err(e)) => e.into_response(),
        Err(e) => RepoError::Internal(anyhow::anyhow!("remove task: {e}")).into_response(),
    }
}

#[derive(Deserialize)]
struct PromoteRequest {
    name: String,
    version: String,
    from: String,
    to: String,
}

async fn promote(State(state): State<Shared>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let team = match authorize(&state, &headers) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let req: PromoteRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("expected {{name, version, from, to}}: {e}")),
    };
    // Reading the source suite is public; what the scope guards is the suite that changes.
    if let Err(why) = team.scope.allows(&req.name, &req.to) {
        return RepoError::Forbidden(why).into_response();
    }
    let st = state.clone();
    let r = tokio::task::spawn_blocking(move || st.repo.promote(&req.name, &req.version, &req.from, &req.to)).await;
    match r {
        Ok(Ok(p)) => Json(json!({"promoted": p})).into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(e) => RepoError::Internal(anyhow::anyhow!("promote task: {e}")).into_response(),
    }
}
