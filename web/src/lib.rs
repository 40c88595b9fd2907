//! The web console: the fleet in a browser, live, with sign-in, roles and an audit trail.
//!
//! This crate is the HTTP side only. What it shows and what it asks of devices comes through a
//! [`Backend`] (the console binary implements it over MQTT; the tests here, over a fake), so the
//! pages, the checks and the audit are tested without a broker.
//!
//! Plain HTTP is for loopback; anything else is served over TLS ([`serve_tls`]).
//!
//! Invariants:
//! - Every page but the sign-in form needs a live session; every POST but sign-in needs the
//!   session's CSRF token, and the role the action asks for — refused with 403 otherwise, checked
//!   here on the server whatever the page showed.
//! - Every action (and every refused one) is in the audit log before its answer goes out; one
//!   that cannot be logged is not taken.
//! - Commands carry the signed-in user's name (`by`), so the device's record says who asked.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use debfleet_protocol::rollout::{Action, RolloutId, RolloutSpec, RolloutState};
use debfleet_protocol::{CommandArgs, DeviceId, GroupName, Role};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

mod actions;
pub mod audit;
mod cfg;
pub mod history;
pub mod repo;
mod rollouts;
pub mod session;
pub mod terminal;
pub mod users;

use audit::{Audit, Entry};
use session::{Limiter, Session, Sessions};
use users::UsersFile;

const COOKIE: &str = "debfleet_session";

/// A device as the fleet page lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceRow {
    pub id: String,
    /// `online`, `offline` (said goodbye) or `lost` (its last will: gone without a word).
    pub status: String,
    /// Since when, or for a lost device when it was last heard from.
    pub since: String,
    pub agent_version: String,
    pub groups: Vec<String>,
    pub units: usize,
    pub units_failed: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PackageRow {
    pub name: String,
    pub version: String,
    pub status: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnitRow {
    pub name: String,
    pub package: String,
    pub active: String,
    pub sub: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OpRow {
    pub id: String,
    pub verb: String,
    pub state: String,
    pub phase: String,
    pub percent: String,
    pub by: String,
    pub updated: String,
    pub detail: String,
}

/// Everything the device page shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceDetail {
    pub row: DeviceRow,
    pub hostname: String,
    pub os: String,
    pub arch: String,
    pub packages: Vec<PackageRow>,
    pub units: Vec<UnitRow>,
    pub ops: Vec<OpRow>,
    /// The effective runtime configuration, once the device has published it.
    pub cfg: Option<debfleet_protocol::RuntimeCfg>,
    /// Telemetry over the last hours (see [`history`]), oldest first.
    pub telemetry: Vec<history::Point>,
    /// The latest log lines, newest first.
    pub logs: Vec<history::LogRow>,
}

/// What changed, for the pages that are open.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Update {
    Device(DeviceRow),
    Op {
        device: String,
        op: OpRow,
    },
    /// Sent only to pages of that device.
    Telemetry {
        device: String,
        point: history::Point,
    },
    /// Sent only to pages of that device; oldest first.
    Logs {
        device: String,
        lines: Vec<history::LogRow>,
    },
    /// A rollout's state changed (the pages read it again).
    Rollout {
        id: String,
        phase: String,
    },
    /// A remote session (shell, forward, followed journal) began or ended, as seen live on the
    /// broker: for the audit log, not for pages.
    Session(SessionNote),
}

/// A remote session's start or end, for the audit log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SessionNote {
    pub device: String,
    pub op: String,
    /// `shell`, `forward`, `journal`.
    pub verb: String,
    /// The operator the command named.
    pub by: String,
    /// `session start` or `session end`.
    pub action: &'static str,
    /// The session's user or target, or its exit, duration and bytes.
    pub detail: String,
    /// `ok`, or why it ended.
    pub outcome: String,
}

/// A rollout as the broker holds it: what was asked, and the controller's state once one took it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RolloutView {
    pub spec: RolloutSpec,
    pub state: Option<RolloutState>,
}

impl Update {
    /// The event's name, and whether a page following `device` (the fleet page: none) gets it.
    fn event_for(&self, device: Option<&str>) -> Option<&'static str> {
        match self {
            Update::Device(_) => Some("device"),
            Update::Op { .. } => Some("op"),
            Update::Telemetry { device: d, .. } => (device == Some(d.as_str())).then_some("telemetry"),
            Update::Logs { device: d, .. } => (device == Some(d.as_str())).then_some("logs"),
            Update::Rollout { .. } => Some("rollout"),
            Update::Session(_) => None,
        }
    }
}

/// Who an action is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Device(DeviceId),
    Group(GroupName),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Device(d) => write!(f, "device/{d}"),
            Target::Group(g) => write!(f, "group/{g}"),
        }
    }
}

/// A command to send, and who asks.
#[derive(Debug, Clone, PartialEq)]
pub struct Act {
    pub target: Target,
    pub args: CommandArgs,
    pub by: String,
}

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What the web console reads and asks of the fleet.
pub trait Backend: Send + Sync + 'static {
    fn devices(&self) -> Vec<DeviceRow>;
    fn device(&self, id: &DeviceId) -> Option<DeviceDetail>;
    fn updates(&self) -> broadcast::Receiver<Update>;
    /// Sends the command; resolves once it is on its way (the pages follow its records), or
    /// for a dry run once the devices answered: a line per device.
    fn act(&self, act: Act) -> BoxFuture<Result<Vec<String>, String>>;
    /// Every rollout the broker holds, by id.
    fn rollouts(&self) -> Vec<RolloutView>;
    /// Sends an operator's control for the rollout; resolves once a controller applied it (or
    /// why not: not applicable, or no controller within a while).
    fn steer(&self, id: RolloutId, action: Action, by: String) -> BoxFuture<Result<String, String>>;
    /// The repository's suites and their packages (an error: no repository, or it did not answer).
    fn repository(&self) -> BoxFuture<Result<Vec<repo::RepoSuite>, String>>;
    /// Publishes the .deb at `file` in `suite`, as `debfleet publish` does; what was published.
    fn upload(&self, file: PathBuf, suite: String) -> BoxFuture<Result<String, String>>;
    /// Publishes `name=version` from suite `from` in suite `to` too.
    fn promote(&self, name: String, version: String, from: String, to: String) -> BoxFuture<Result<String, String>>;
    /// Opens a remote shell on the device as `by` (a terminal of `cols` × `rows`).
    fn terminal(
        &self,
        device: DeviceId,
        by: String,
        cols: u16,
        rows: u16,
    ) -> BoxFuture<Result<terminal::Terminal, String>>;
    /// The device's journal (the `journal` command's result), as `by`.
    fn journal(
        &self,
        device: DeviceId,
        unit: Option<String>,
        lines: u32,
        by: String,
    ) -> BoxFuture<Result<serde_json::Value, String>>;
}

pub struct Config {
    pub users: PathBuf,
    pub audit: PathBuf,
    /// Cookies marked `Secure` (served over TLS).
    pub secure: bool,
}

pub struct App {
    backend: Arc<dyn Backend>,
    users: UsersFile,
    sessions: Sessions,
    limiter: Limiter,
    audit: Mutex<Audit>,
    terminals: terminal::Terminals,
    templates: minijinja::Environment<'static>,
    secure: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error(transparent)]
    Users(#[from] users::UserError),
    #[error(transparent)]
    Audit(#[from] audit::AuditError),
    #[error("templates: {0}")]
    Templates(#[from] minijinja::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
}

/// What [`serve_tls`] serves with.
pub type TlsConfig = Arc<rustls::ServerConfig>;

/// The server's TLS configuration from PEM files: the certificate chain and its private key.
pub fn tls_config(cert: &std::path::Path, key: &std::path::Path) -> Result<TlsConfig, WebError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: &std::path::Path, e: &dyn std::fmt::Display| WebError::Tls(format!("{}: {e}", what.display()));
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(cert, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(cert, &e))?;
    if certs.is_empty() {
        return Err(bad(cert, &"no certificate in it"));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, &e))?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| WebError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves HTTPS on `listener` until `shutdown` resolves: each connection's TLS handshake (at most
/// 10 s), then HTTP/1.1 over it, with the peer's address for the sign-in limit.
pub async fn serve_tls(
    app: Arc<App>,
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WebError> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("accepting a connection: {e}");
                    continue;
                }
            },
            () = &mut shutdown => return Ok(()),
        };
        let acceptor = acceptor.clone();
        let router = app.router().layer(axum::Extension(ConnectInfo(peer)));
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return tracing::debug!("TLS handshake with {peer}: {e}"),
                Err(_) => return tracing::debug!("TLS handshake with {peer}: timed out"),
            };
            let service = hyper_util::service::TowerToHyperService::new(router);
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await {
                tracing::debug!("connection from {peer}: {e}");
            }
        });
    }
}

impl App {
    pub fn new(backend: Arc<dyn Backend>, config: &Config) -> Result<Arc<App>, WebError> {
        let mut templates = minijinja::Environment::new();
        for (name, src) in [
            ("base.html", include_str!("../templates/base.html")),
            ("login.html", include_str!("../templates/login.html")),
            ("fleet.html", include_str!("../templates/fleet.html")),
            ("device.html", include_str!("../templates/device.html")),
            ("confirm.html", include_str!("../templates/confirm.html")),
            ("message.html", include_str!("../templates/message.html")),
            ("cfg.html", include_str!("../templates/cfg.html")),
            ("rollouts.html", include_str!("../templates/rollouts.html")),
            ("rollout.html", include_str!("../templates/rollout.html")),
            ("repo.html", include_str!("../templates/repo.html")),
            ("terminal.html", include_str!("../templates/terminal.html")),
            ("journal.html", include_str!("../templates/journal.html")),
        ] {
            templates.add_template(name, src)?;
        }
        Ok(Arc::new(App {
            backend,
            users: UsersFile::open(&config.users)?,
            sessions: Sessions::default(),
            limiter: Limiter::default(),
            audit: Mutex::new(Audit::open(&config.audit)?),
            terminals: Default::default(),
            templates,
            secure: config.secure,
        }))
    }

    /// Whether the users file has nobody in it (nobody can sign in).
    pub fn no_users(&self) -> bool {
        self.users.current().is_empty()
    }

    pub fn router(self: &Arc<App>) -> Router {
        Router::new()
            .route("/", get(fleet))
            .route("/login", get(login_form).post(login))
            .route("/logout", post(logout))
            .route("/events", get(events))
            .route("/device/:id", get(device))
            .route("/device/:id/act", post(actions::act_device))
            .route("/group/:group/act", post(actions::act_group))
            .route("/device/:id/cfg", get(cfg::form).post(cfg::submit))
            .route("/device/:id/terminal", get(terminal::page).post(terminal::open))
            .route("/device/:id/journal", get(terminal::journal))
            .route("/terminal/:tid/events", get(terminal::events))
            .route("/terminal/:tid/input", post(terminal::input))
            .route("/terminal/:tid/resize", post(terminal::resize))
            .route("/terminal/:tid/close", post(terminal::close))
            .route("/rollouts", get(rollouts::list))
            .route("/rollout/:id", get(rollouts::detail))
            .route("/rollout/:id/act", post(rollouts::control))
            .route("/repo", get(repo::page))
            .route("/repo/upload", post(repo::upload))
            .route("/repo/promote", post(repo::promote))
            .route(
                "/static/live.js",
                get(|| async { static_file("text/javascript", include_str!("../static/live.js")) }),
            )
            .route("/static/style.css", get(|| async { static_file("text/css", include_str!("../static/style.css")) }))
            .route(
                "/static/terminal.js",
                get(|| async { static_file("text/javascript", include_str!("../static/terminal.js")) }),
            )
            .route(
                "/static/vendor/xterm.js",
                get(|| async { static_file("text/javascript", include_str!("../static/vendor/xterm/xterm.js")) }),
            )
            .route(
                "/static/vendor/xterm.css",
                get(|| async { static_file("text/css", include_str!("../static/vendor/xterm/xterm.css")) }),
            )
            .with_state(self.clone())
    }

    fn render(&self, name: &str, ctx: minijinja::Value) -> Response {
        match self.templates.get_template(name).and_then(|t| t.render(ctx)) {
            Ok(html) => Html(html).into_response(),
            Err(e) => {
                tracing::error!("rendering {name}: {e:#}");
                (StatusCode::INTERNAL_SERVER_ERROR, "the page could not be rendered").into_response()
            }
        }
    }

    fn message(&self, status: StatusCode, s: Option<&Session>, title: &str, text: &str) -> Response {
        let ctx = minijinja::context! { session => s.map(view_session), title, text };
        (status, self.render("message.html", ctx)).into_response()
    }

    /// Logs the action; false when it could not be (then it must not be taken).
    fn log(&self, s: &Session, action: &str, target: &str, detail: &str, outcome: &str) -> bool {
        let entry = Entry {
            ts: debfleet_protocol::time::now(),
            user: s.user.clone(),
            role: Some(s.role),
            action: action.into(),
            target: target.into(),
            detail: detail.into(),
            outcome: outcome.into(),
        };
        self.append(entry)
    }

    /// Remote sessions' starts and ends go to the audit log as the broker shows them (opened
    /// from the command line as much as from here): runs until the backend's updates end.
    pub fn audit_sessions(self: &Arc<App>) -> tokio::task::JoinHandle<()> {
        let app = self.clone();
        let mut updates = self.backend.updates();
        tokio::spawn(async move {
            loop {
                match updates.recv().await {
                    Ok(Update::Session(n)) => {
                        let entry = Entry {
                            ts: debfleet_protocol::time::now(),
                            user: n.by,
                            role: None,
                            action: format!("{} {}", n.verb, n.action),
                            target: format!("device/{}", n.device),
                            detail: format!("{} {}", n.op, n.detail),
                            outcome: n.outcome,
                        };
                        app.append(entry);
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::error!("the audit of remote sessions fell {n} updates behind; some may be missing");
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        })
    }

    fn append(&self, entry: Entry) -> bool {
        match self.audit.lock().map(|mut a| a.append(entry)) {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::error!("audit log: {e}");
                false
            }
            Err(_) => false,
        }
    }

    /// The request's session, while its user still exists with the role signed in with: a user
    /// removed, or given another role, in the users file is signed out at their next request.
    fn session(&self, headers: &HeaderMap) -> Option<(String, Session)> {
        let id = cookie(headers, COOKIE)?;
        let s = self.sessions.get(&id)?;
        if self.users.current().role(&s.user) != Some(s.role) {
            self.sessions.close(&id);
            return None;
        }
        Some((id, s))
    }
}

fn static_file(kind: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

#[derive(Serialize)]
struct SessionView {
    user: String,
    role: &'static str,
    csrf: String,
    can_act: bool,
}

fn view_session(s: &Session) -> SessionView {
    SessionView { user: s.user.clone(), role: s.role.as_str(), csrf: s.csrf.clone(), can_act: s.role >= Role::Operator }
}

/// The session, or the way to the sign-in form.
macro_rules! signed_in {
    ($app:expr, $headers:expr) => {
        match $app.session(&$headers) {
            Some((_, s)) => s,
            None => return axum::response::IntoResponse::into_response(axum::response::Redirect::to("/login")),
        }
    };
}
pub(crate) use signed_in;

async fn login_form(State(app): State<Arc<App>>) -> Response {
    let empty = app.users.current().is_empty();
    app.render("login.html", minijinja::context! { error => None::<String>, no_users => empty })
}

#[derive(Deserialize)]
struct LoginForm {
    user: String,
    password: String,
}

async fn login(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Form(f): Form<LoginForm>,
) -> Response {
    let ip = peer.ip();
    if let Err(wait) = app.limiter.allowed(ip) {
        let error = format!("too many failed sign-ins from {ip}; try again in {} s", wait.as_secs() + 1);
        let ctx = minijinja::context! { error, no_users => false };
        return (StatusCode::TOO_MANY_REQUESTS, app.render("login.html", ctx)).into_response();
    }
    // Hashing is deliberately slow: off the async threads.
    let (app2, user, password) = (app.clone(), f.user.clone(), f.password);
    let role = tokio::task::spawn_blocking(move || app2.users.current().check(&user, &password)).await.ok().flatten();
    let Some(role) = role else {
        app.limiter.failed(ip);
        tracing::warn!("failed sign-in as {:?} from {ip}", f.user);
        let ctx =
            minijinja::context! { error => "wrong user name or password", no_users => app.users.current().is_empty() };
        return (StatusCode::UNAUTHORIZED, app.render("login.html", ctx)).into_response();
    };
    app.limiter.succeeded(ip);
    let id = app.sessions.open(&f.user, role);
    let s = app.sessions.get(&id).expect("the session just opened");
    if !app.log(&s, "sign in", &format!("web/{ip}"), "", "ok") {
        app.sessions.close(&id);
        return app.message(StatusCode::SERVICE_UNAVAILABLE, None, "Not signed in", "the audit log cannot be written");
    }
    let secure = if app.secure { "; Secure" } else { "" };
    let set = format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict{secure}");
    ([(header::SET_COOKIE, set)], Redirect::to("/")).into_response()
}

#[derive(Deserialize)]
struct CsrfOnly {
    #[serde(default)]
    csrf: String,
}

async fn logout(State(app): State<Arc<App>>, headers: HeaderMap, Form(f): Form<CsrfOnly>) -> Response {
    if let Some((id, s)) = app.session(&headers) {
        if !session::same(&f.csrf, &s.csrf) {
            return app.message(StatusCode::FORBIDDEN, Some(&s), "Refused", "the form did not come from this page");
        }
        app.log(&s, "sign out", "web", "", "ok");
        app.sessions.close(&id);
    }
    let clear = format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    ([(header::SET_COOKIE, clear)], Redirect::to("/login")).into_response()
}

#[derive(Deserialize, Default)]
struct FleetQuery {
    #[serde(default)]
    group: String,
    #[serde(default)]
    status: String,
    /// Devices whose id contains this.
    #[serde(default)]
    q: String,
    /// From 1.
    #[serde(default)]
    page: usize,
}

/// Devices a fleet page lists: a browser takes about 0.15 s per thousand rows to build and lay
/// out a table (1.3-1.7 s for 10,000 in `bench/web.sh`), so a larger fleet is paged.
pub const FLEET_PAGE: usize = 1000;

async fn fleet(State(app): State<Arc<App>>, headers: HeaderMap, Query(q): Query<FleetQuery>) -> Response {
    let s = signed_in!(app, headers);
    let all = app.backend.devices();
    let groups: std::collections::BTreeSet<String> = all.iter().flat_map(|d| d.groups.iter().cloned()).collect();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for d in &all {
        *counts.entry(d.status.clone()).or_default() += 1;
    }
    let matching: Vec<&DeviceRow> = all
        .iter()
        .filter(|d| q.group.is_empty() || d.groups.contains(&q.group))
        .filter(|d| q.status.is_empty() || d.status == q.status)
        .filter(|d| q.q.is_empty() || d.id.contains(q.q.as_str()))
        .collect();
    let pages = matching.len().div_ceil(FLEET_PAGE).max(1);
    let page = q.page.clamp(1, pages);
    let devices = &matching[(page - 1) * FLEET_PAGE..matching.len().min(page * FLEET_PAGE)];
    // The link to another page keeps the filters.
    let mut base = String::from("/?");
    for (k, v) in [("group", &q.group), ("status", &q.status), ("q", &q.q)] {
        if !v.is_empty() {
            base.push_str(&format!("{k}={}&", form_encode(v)));
        }
    }
    let ctx = minijinja::context! {
        session => view_session(&s), devices, groups, counts, total => all.len(),
        group => q.group, status => q.status, q => q.q, page, pages, matching => matching.len(), base,
        // The heading's counts are the page's own rows only when the page holds the whole fleet.
        per_page => FLEET_PAGE, whole => pages == 1 && q.group.is_empty() && q.status.is_empty() && q.q.is_empty(),
    };
    app.render("fleet.html", ctx)
}

/// A query value, percent-encoded.
fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn device(State(app): State<Arc<App>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let s = signed_in!(app, headers);
    let Some(detail) = DeviceId::new(id.as_str()).ok().and_then(|d| app.backend.device(&d)) else {
        return app.message(
            StatusCode::NOT_FOUND,
            Some(&s),
            "No such device",
            &format!("the broker has no device {id:?}"),
        );
    };
    let now = debfleet_protocol::time::now_unix_ms() / 1000;
    let plots: Vec<Plot> = [
        ("cpu", "CPU", (|p: &history::Point| p.cpu) as fn(&history::Point) -> Option<f32>),
        ("memory", "Memory", |p| p.memory),
        ("disk", "Disk (fullest mount)", |p| p.disk),
    ]
    .into_iter()
    .map(|(name, label, value)| Plot {
        name,
        label,
        points: history::polyline(&detail.telemetry, now, value),
        dot: detail.telemetry.iter().rev().find_map(|p| Some((p.t, value(p)?))).map(|(t, v)| {
            let (x, y) = history::place(t, v, now);
            (format!("{:.2}", x as f64 * 100.0 / history::SPAN_S as f64), format!("{y:.1}"))
        }),
        last: detail.telemetry.iter().rev().find_map(value).map(|v| format!("{v:.0} %")).unwrap_or_default(),
    })
    .collect();
    let ctx = minijinja::context! {
        cfg => detail.cfg.as_ref().and_then(|c| serde_json::to_string_pretty(&c.full_value()).ok()),
        session => view_session(&s), d => detail, plots, span => history::SPAN_S, start => now - history::SPAN_S,
        hours => history::SPAN_S / 3600, step => history::STEP_S, log_lines => history::LOG_LINES,
    };
    app.render("device.html", ctx)
}

/// One telemetry plot on the device page.
#[derive(Serialize)]
struct Plot {
    name: &'static str,
    label: &'static str,
    /// SVG polyline points (see [`history::polyline`]).
    points: String,
    /// The latest point, as percentages of the plot's width and height: a dot, so that a single
    /// sample (which draws no line) shows too.
    dot: Option<(String, String)>,
    /// The latest value, "42 %".
    last: String,
}

#[derive(Deserialize, Default)]
struct EventsQuery {
    /// The device whose page is open: its telemetry and logs come too.
    #[serde(default)]
    device: Option<String>,
}

/// Live updates for the open pages, as server-sent events (`device`, `op`, and for a device's
/// page its `telemetry` and `logs`).
async fn events(State(app): State<Arc<App>>, headers: HeaderMap, Query(q): Query<EventsQuery>) -> Response {
    if app.session(&headers).is_none() {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let rx = app.backend.updates();
    let stream = futures_util::stream::unfold((rx, q.device), |(mut rx, device)| async move {
        let event = loop {
            match rx.recv().await {
                Ok(u) => {
                    let Some(name) = u.event_for(device.as_deref()) else { continue };
                    break Event::default().event(name).data(serde_json::to_string(&u).unwrap_or_default());
                }
                // A slow page missed some: it reloads to catch up.
                Err(broadcast::error::RecvError::Lagged(_)) => break Event::default().event("reload").data(""),
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        };
        Some((Ok::<_, Infallible>(event), (rx, device)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

#[cfg(test)]
mod tests;
