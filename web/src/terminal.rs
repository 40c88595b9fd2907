//! The terminal tab: a remote shell on a device (issue 18's `debfleet shell`, opened by the
//! backend as the signed-in operator) shown with xterm.js. Output reaches the page as
//! server-sent events; keystrokes and resizes come back as small POSTs carrying the session's
//! CSRF token. A terminal belongs to the signed-in session that opened it; when its page goes,
//! its event stream ends and the remote session is closed.
//!
//! Also the journal view: a unit's journal read on the device (`journal`), as a table.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Form;
use debfleet_protocol::{DeviceId, Role};
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::session::{self, Session};
use crate::{signed_in, view_session, App};

/// What the terminal shows.
#[derive(Debug)]
pub enum TermOut {
    Data(Vec<u8>),
    /// The session ended, and why (`exited with status 0`, ...).
    End(String),
}

/// What the operator does.
#[derive(Debug)]
pub enum TermIn {
    Data(Vec<u8>),
    Resize(u16, u16),
    Close,
}

/// An open remote terminal, as the backend hands it over.
pub struct Terminal {
    pub output: mpsc::Receiver<TermOut>,
    pub input: mpsc::Sender<TermIn>,
}

struct Slot {
    /// The cookie session that opened it: only it may use the terminal.
    owner: String,
    input: mpsc::Sender<TermIn>,
    /// Taken by the page's event stream (once).
    output: Option<mpsc::Receiver<TermOut>>,
}

#[derive(Default)]
pub(crate) struct Terminals {
    open: Mutex<HashMap<String, Slot>>,
}

impl Terminals {
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, Slot>) -> T) -> T {
        let mut m = self.open.lock().unwrap_or_else(|e| e.into_inner());
        // Terminals whose remote end is gone are forgotten.
        m.retain(|_, s| !s.input.is_closed());
        f(&mut m)
    }
}

fn device_or_404(app: &App, s: &Session, id: &str) -> Result<DeviceId, Response> {
    match DeviceId::new(id).ok().filter(|d| app.backend.device(d).is_some()) {
        Some(d) => Ok(d),
        None => Err(app.message(
            StatusCode::NOT_FOUND,
            Some(s),
            "No such device",
            &format!("the broker has no device {id:?}"),
        )),
    }
}

/// The terminal page (operators and admins).
pub(crate) async fn page(State(app): State<Arc<App>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let s = signed_in!(app, headers);
    if s.role < Role::Operator {
        return app.message(
            StatusCode::FORBIDDEN,
            Some(&s),
            "Refused",
            &format!("{} is a viewer: viewers see, operators act", s.user),
        );
    }
    let device = match device_or_404(&app, &s, &id) {
        Ok(d) => d,
        Err(r) => return r,
    };
    app.render("terminal.html", minijinja::context! { session => view_session(&s), device => device.to_string() })
}

#[derive(Deserialize)]
pub(crate) struct OpenForm {
    #[serde(default)]
    csrf: String,
    cols: u16,
    rows: u16,
}

fn json(status: StatusCode, v: serde_json::Value) -> Response {
    (status, [(axum::http::header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

fn json_error(status: StatusCode, e: impl Into<String>) -> Response {
    json(status, serde_json::json!({ "error": e.into() }))
}

/// Opens the remote shell: audited first, then asked of the device; the terminal's id.
pub(crate) async fn open(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<OpenForm>,
) -> Response {
    let Some((cookie, s)) = app.session(&headers) else { return json_error(StatusCode::UNAUTHORIZED, "not signed in") };
    let target = format!("device/{id}");
    if let Err(refused) = crate::actions::permit(&app, &s, &f.csrf, "shell", &target, "terminal") {
        return refused;
    }
    let device = match device_or_404(&app, &s, &id) {
        Ok(d) => d,
        Err(r) => return r,
    };
    if !app.log(&s, "shell", &target, "terminal", "sent") {
        return json_error(StatusCode::SERVICE_UNAVAILABLE, "the audit log cannot be written, so nothing was sent");
    }
    let (cols, rows) = (f.cols.clamp(10, 500), f.rows.clamp(4, 200));
    match app.backend.terminal(device, s.user.clone(), cols, rows).await {
        Ok(t) => {
            let tid = session::token();
            app.terminals
                .with(|m| m.insert(tid.clone(), Slot { owner: cookie, input: t.input, output: Some(t.output) }));
            json(StatusCode::OK, serde_json::json!({ "id": tid }))
        }
        Err(e) => {
            app.log(&s, "shell", &target, "terminal", &format!("failed: {e}"));
            json_error(StatusCode::BAD_GATEWAY, e)
        }
    }
}

/// The terminal's output, as events: `data` (base64) and `end` (why).
pub(crate) async fn events(State(app): State<Arc<App>>, headers: HeaderMap, Path(tid): Path<String>) -> Response {
    let Some((cookie, _)) = app.session(&headers) else { return StatusCode::UNAUTHORIZED.into_response() };
    let Some(output) = app.terminals.with(|m| match m.get_mut(&tid) {
        Some(slot) if slot.owner == cookie => slot.output.take(),
        _ => None,
    }) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let stream = futures_util::stream::unfold(Some(output), |rx| async move {
        let mut rx = rx?;
        let event = match rx.recv().await {
            Some(TermOut::Data(bytes)) => Event::default().event("data").data(base64(&bytes)),
            Some(TermOut::End(why)) => {
                return Some((Ok::<_, Infallible>(Event::default().event("end").data(why)), None))
            }
            None => return Some((Ok(Event::default().event("end").data("the session ended")), None)),
        };
        Some((Ok(event), Some(rx)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

/// The slot's input, when the request is its owner's with the session's CSRF token.
fn owned_input(app: &App, headers: &HeaderMap, tid: &str) -> Result<mpsc::Sender<TermIn>, Response> {
    let Some((cookie, s)) = app.session(headers) else { return Err(StatusCode::UNAUTHORIZED.into_response()) };
    let csrf = headers.get("x-csrf").and_then(|v| v.to_str().ok()).unwrap_or("");
    if !session::same(csrf, &s.csrf) {
        return Err(json_error(StatusCode::FORBIDDEN, "no valid CSRF token"));
    }
    app.terminals
        .with(|m| m.get(tid).filter(|slot| slot.owner == cookie).map(|slot| slot.input.clone()))
        .ok_or_else(|| StatusCode::NOT_FOUND.into_response())
}

/// Keystrokes (the body, as typed; at most 16 KiB).
pub(crate) async fn input(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(tid): Path<String>,
    body: Bytes,
) -> Response {
    let tx = match owned_input(&app, &headers, &tid) {
        Ok(tx) => tx,
        Err(r) => return r,
    };
    if body.len() > debfleet_protocol::session::CHUNK {
        return json_error(StatusCode::PAYLOAD_TOO_LARGE, "at most 16 KiB at once");
    }
    match tx.send(TermIn::Data(body.to_vec())).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(_) => StatusCode::GONE.into_response(),
    }
}

#[derive(Deserialize)]
pub(crate) struct Size {
    cols: u16,
    rows: u16,
}

pub(crate) async fn resize(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(tid): Path<String>,
    Query(size): Query<Size>,
) -> Response {
    let tx = match owned_input(&app, &headers, &tid) {
        Ok(tx) => tx,
        Err(r) => return r,
    };
    let _ = tx.send(TermIn::Resize(size.cols.clamp(10, 500), size.rows.clamp(4, 200))).await;
    StatusCode::NO_CONTENT.into_response()
}

pub(crate) async fn close(State(app): State<Arc<App>>, headers: HeaderMap, Path(tid): Path<String>) -> Response {
    let tx = match owned_input(&app, &headers, &tid) {
        Ok(tx) => tx,
        Err(r) => return r,
    };
    let _ = tx.send(TermIn::Close).await;
    app.terminals.with(|m| m.remove(&tid));
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
pub(crate) struct JournalQuery {
    #[serde(default)]
    unit: String,
    #[serde(default)]
    lines: Option<u32>,
}

/// The journal view: the managed units' journal (or one unit's), read on the device now.
pub(crate) async fn journal(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<JournalQuery>,
) -> Response {
    let s = signed_in!(app, headers);
    let device = match device_or_404(&app, &s, &id) {
        Ok(d) => d,
        Err(r) => return r,
    };
    let unit = Some(q.unit.trim().to_owned()).filter(|u| !u.is_empty());
    let lines = q.lines.unwrap_or(100).clamp(1, debfleet_protocol::command::MAX_JOURNAL_LINES);
    // Reading a journal is a command to the device, but changes nothing: viewers may.
    let (entries, error) = match app.backend.journal(device.clone(), unit.clone(), lines, s.user.clone()).await {
        Ok(v) => (v["entries"].as_array().cloned().unwrap_or_default(), None),
        Err(e) => (Vec::new(), Some(e)),
    };
    let ctx = minijinja::context! {
        session => view_session(&s), device => device.to_string(), unit => unit.unwrap_or_default(), lines, entries, error,
    };
    app.render("journal.html", ctx)
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_as_browsers_read_it() {
        assert_eq!(super::base64(b""), "");
        assert_eq!(super::base64(b"f"), "Zg==");
        assert_eq!(super::base64(b"fo"), "Zm8=");
        assert_eq!(super::base64(b"foo"), "Zm9v");
        assert_eq!(super::base64(&[0xff, 0xee, 0x00, 0x10]), "/+4AEA==");
    }
}
