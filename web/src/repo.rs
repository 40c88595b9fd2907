//! The repository on the web: its suites and packages, an upload (the file goes to the
//! repository exactly as `debfleet publish` sends it, with the same checks), and promotion of a
//! version from one suite to another after a confirmation. Operators only; every upload and
//! promotion audited.

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Form;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::{actions, signed_in, view_session, App};

/// The largest upload taken (the repository has its own limit, which may be lower).
pub const MAX_UPLOAD_BYTES: usize = 512 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoSuite {
    pub suite: String,
    #[serde(default)]
    pub packages: Vec<RepoPackage>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoPackage {
    pub name: String,
    #[serde(default)]
    pub versions: Vec<RepoVersion>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoVersion {
    pub version: String,
    #[serde(default)]
    pub arch: String,
    #[serde(default)]
    pub size: u64,
}

use debfleet_protocol::debian::{valid_package_name, valid_suite, valid_version};

pub(crate) async fn page(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let s = signed_in!(app, headers);
    let (suites, error) = match app.backend.repository().await {
        Ok(s) => (s, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    let names: Vec<String> = suites.iter().map(|s| s.suite.clone()).collect();
    let ctx =
        minijinja::context! { session => view_session(&s), suites, names, error, max_mib => MAX_UPLOAD_BYTES >> 20 };
    app.render("repo.html", ctx)
}

#[derive(Deserialize)]
pub(crate) struct UploadQuery {
    suite: String,
    #[serde(default)]
    name: String,
}

/// Removes the upload's temporary file however the request ends.
struct Spool(PathBuf);

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `POST /repo/upload?suite=S&name=FILE`: the .deb as the request body (sent by the page's
/// script), the session's CSRF token in `X-CSRF-Token`. Answers in plain text.
pub(crate) async fn upload(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(q): Query<UploadQuery>,
    body: Body,
) -> Response {
    let Some((_, s)) = app.session(&headers) else {
        return (StatusCode::UNAUTHORIZED, "sign in first").into_response();
    };
    let csrf = headers.get("x-csrf-token").and_then(|v| v.to_str().ok()).unwrap_or("");
    let name: String = q.name.chars().filter(|c| !c.is_control()).take(200).collect();
    let target = format!("repo/{}", q.suite);
    if let Err(refused) = actions::permit(&app, &s, csrf, "upload", &target, &name) {
        return refused;
    }
    if !valid_suite(&q.suite) {
        return (StatusCode::BAD_REQUEST, format!("{:?} is not a suite name", q.suite)).into_response();
    }
    let declared = headers.get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_UPLOAD_BYTES as u64) {
        return (StatusCode::PAYLOAD_TOO_LARGE, format!("over {} MiB", MAX_UPLOAD_BYTES >> 20)).into_response();
    }
    // Spooled to a file only this user reads: the repository client sends a file, as
    // `debfleet publish` does.
    let spool = Spool(std::env::temp_dir().join(format!("debfleet-web-upload-{}.deb", crate::session::token())));
    let mut file = match tokio::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&spool.0).await {
        Ok(f) => f,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot keep the upload: {e}")).into_response(),
    };
    let mut stream = body.into_data_stream();
    let mut size = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return (StatusCode::BAD_REQUEST, format!("the upload broke off: {e}")).into_response(),
        };
        size += chunk.len();
        if size > MAX_UPLOAD_BYTES {
            return (StatusCode::PAYLOAD_TOO_LARGE, format!("over {} MiB", MAX_UPLOAD_BYTES >> 20)).into_response();
        }
        if let Err(e) = file.write_all(&chunk).await {
            return (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot keep the upload: {e}")).into_response();
        }
    }
    if let Err(e) = file.flush().await {
        return (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot keep the upload: {e}")).into_response();
    }
    drop(file);
    let detail = format!("{name} ({size} bytes)");
    if !app.log(&s, "upload", &target, &detail, "sent") {
        return (StatusCode::SERVICE_UNAVAILABLE, "the audit log cannot be written, so nothing was sent")
            .into_response();
    }
    match app.backend.upload(spool.0.clone(), q.suite.clone()).await {
        Ok(what) => (StatusCode::OK, what).into_response(),
        Err(e) => {
            app.log(&s, "upload", &target, &detail, &format!("failed: {e}"));
            (StatusCode::BAD_GATEWAY, e).into_response()
        }
    }
}

#[derive(Deserialize)]
pub(crate) struct PromoteForm {
    #[serde(default)]
    csrf: String,
    name: String,
    version: String,
    from: String,
    to: String,
    #[serde(default)]
    confirm: String,
}

pub(crate) async fn promote(State(app): State<Arc<App>>, headers: HeaderMap, Form(f): Form<PromoteForm>) -> Response {
    let s = signed_in!(app, headers);
    let target = format!("repo/{}", f.to);
    let detail = format!("{}={} from {}", f.name, f.version, f.from);
    if let Err(refused) = actions::permit(&app, &s, &f.csrf, "promote", &target, &detail) {
        return refused;
    }
    if !valid_suite(&f.from) || !valid_suite(&f.to) || f.from == f.to {
        let why = format!("promote from one suite to another ({:?} to {:?})", f.from, f.to);
        return app.message(StatusCode::BAD_REQUEST, Some(&s), "Not sent", &why);
    }
    if !valid_package_name(&f.name) || !valid_version(&f.version) {
        let why = format!("{:?}={:?} is not a package name and version", f.name, f.version);
        return app.message(StatusCode::BAD_REQUEST, Some(&s), "Not sent", &why);
    }
    if f.confirm != "yes" {
        let what = format!(
            "{}={} is published in suite {} as well as {}: devices that take {} get it with their next update.",
            f.name, f.version, f.to, f.from, f.to
        );
        let fields = [("name", f.name), ("version", f.version), ("from", f.from), ("to", f.to)];
        let ctx = minijinja::context! {
            session => view_session(&s), what, plan => Vec::<String>::new(), action => "/repo/promote", fields, back => "/repo",
        };
        return app.render("confirm.html", ctx);
    }
    let send = || app.backend.promote(f.name.clone(), f.version.clone(), f.from.clone(), f.to.clone());
    actions::logged(&app, &s, "promote", &target, &detail, "/repo", send).await
}
