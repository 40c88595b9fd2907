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
use debfleet_protocol::{CommandArgs, DeviceId, GroupName, PackageSpec, Role};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

pub mod audit;
pub mod session;
pub mod users;

use audit::{Audit, Entry};
use session::{Limiter, Session, Sessions};
use users::Users;

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
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceDetail {
    pub row: DeviceRow,
    pub hostname: String,
    pub os: String,
    pub arch: String,
    pub packages: Vec<PackageRow>,
    pub units: Vec<UnitRow>,
    pub ops: Vec<OpRow>,
    /// The effective runtime configuration, pretty JSON.
    pub cfg: String,
}

/// What changed, for the pages that are open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Update {
    Device(DeviceRow),
    Op { device: String, op: OpRow },
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
}

pub struct Config {
    pub users: PathBuf,
    pub audit: PathBuf,
    /// Cookies marked `Secure` (served over TLS).
    pub secure: bool,
}

pub struct App {
    backend: Arc<dyn Backend>,
    users: Users,
    sessions: Sessions,
    limiter: Limiter,
    audit: Mutex<Audit>,
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

/// The server's TLS configuration from PEM files: the certificate chain and its private key.
pub fn tls_config(cert: &std::path::Path, key: &std::path::Path) -> Result<Arc<rustls::ServerConfig>, WebError> {
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
        ] {
            templates.add_template(name, src)?;
        }
        Ok(Arc::new(App {
            backend,
            users: Users::load(&config.users)?,
            sessions: Sessions::default(),
            limiter: Limiter::default(),
            audit: Mutex::new(Audit::open(&config.audit)?),
            templates,
            secure: config.secure,
        }))
    }

    pub fn router(self: &Arc<App>) -> Router {
        Router::new()
            .route("/", get(fleet))
            .route("/login", get(login_form).post(login))
            .route("/logout", post(logout))
            .route("/events", get(events))
            .route("/device/:id", get(device))
            .route("/device/:id/act", post(act_device))
            .route("/group/:group/act", post(act_group))
            .route(
                "/static/live.js",
                get(|| async { static_file("text/javascript", include_str!("../static/live.js")) }),
            )
            .route("/static/style.css", get(|| async { static_file("text/css", include_str!("../static/style.css")) }))
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
            role: s.role,
            action: action.into(),
            target: target.into(),
            detail: detail.into(),
            outcome: outcome.into(),
        };
        match self.audit.lock().map(|mut a| a.append(entry)) {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::error!("audit log: {e}");
                false
            }
            Err(_) => false,
        }
    }

    fn session(&self, headers: &HeaderMap) -> Option<(String, Session)> {
        let id = cookie(headers, COOKIE)?;
        let s = self.sessions.get(&id)?;
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
            None => return Redirect::to("/login").into_response(),
        }
    };
}

async fn login_form(State(app): State<Arc<App>>) -> Response {
    let empty = app.users.is_empty();
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
    let role = tokio::task::spawn_blocking(move || app2.users.check(&user, &password)).await.ok().flatten();
    let Some(role) = role else {
        app.limiter.failed(ip);
        tracing::warn!("failed sign-in as {:?} from {ip}", f.user);
        let ctx = minijinja::context! { error => "wrong user name or password", no_users => app.users.is_empty() };
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
}

async fn fleet(State(app): State<Arc<App>>, headers: HeaderMap, Query(q): Query<FleetQuery>) -> Response {
    let s = signed_in!(app, headers);
    let all = app.backend.devices();
    let groups: std::collections::BTreeSet<String> = all.iter().flat_map(|d| d.groups.iter().cloned()).collect();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for d in &all {
        *counts.entry(d.status.clone()).or_default() += 1;
    }
    let devices: Vec<&DeviceRow> = all
        .iter()
        .filter(|d| q.group.is_empty() || d.groups.contains(&q.group))
        .filter(|d| q.status.is_empty() || d.status == q.status)
        .collect();
    let ctx = minijinja::context! {
        session => view_session(&s), devices, groups, counts, total => all.len(),
        group => q.group, status => q.status,
    };
    app.render("fleet.html", ctx)
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
    app.render("device.html", minijinja::context! { session => view_session(&s), d => detail })
}

/// Live updates for the open pages, as server-sent events (`device` and `op`).
async fn events(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if app.session(&headers).is_none() {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let rx = app.backend.updates();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let event = match rx.recv().await {
            Ok(u) => {
                let name = match &u {
                    Update::Device(_) => "device",
                    Update::Op { .. } => "op",
                };
                Event::default().event(name).data(serde_json::to_string(&u).unwrap_or_default())
            }
            // A slow page missed some: it reloads to catch up.
            Err(broadcast::error::RecvError::Lagged(_)) => Event::default().event("reload").data(""),
            Err(broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok::<_, Infallible>(event), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

/// An action form: the verb and its words. Without `confirm` the answer is a page that says
/// what will happen (with the devices' dry run for package verbs); with it, the action.
#[derive(Deserialize, Debug)]
struct ActForm {
    #[serde(default)]
    csrf: String,
    verb: String,
    /// Package specs or a unit, space separated.
    #[serde(default)]
    words: String,
    #[serde(default)]
    confirm: String,
}

async fn act_device(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<ActForm>,
) -> Response {
    let s = signed_in!(app, headers);
    match DeviceId::new(id.as_str()) {
        Ok(d) => act(app, s, Target::Device(d), f).await,
        Err(e) => app.message(StatusCode::BAD_REQUEST, Some(&s), "Refused", &e.to_string()),
    }
}

async fn act_group(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(group): Path<String>,
    Form(f): Form<ActForm>,
) -> Response {
    let s = signed_in!(app, headers);
    match GroupName::new(group.as_str()) {
        Ok(g) => act(app, s, Target::Group(g), f).await,
        Err(e) => app.message(StatusCode::BAD_REQUEST, Some(&s), "Refused", &e.to_string()),
    }
}

/// The command a form asks for: its words put in the command's own payload and read back by
/// the protocol's parser, so the form is checked exactly as a device checks the command.
fn command(verb: &str, words: &str, dry_run: bool) -> Result<CommandArgs, String> {
    let words: Vec<&str> = words.split_whitespace().collect();
    let mut m = serde_json::Map::new();
    m.insert("id".into(), "web-form".into());
    match verb {
        "ping" => {}
        "restart" => match words[..] {
            [unit] => {
                m.insert("unit".into(), unit.into());
            }
            _ => return Err("name the one unit to restart".into()),
        },
        "install" | "upgrade" | "uninstall" | "rollback" => {
            m.insert("packages".into(), words.into());
            if dry_run {
                m.insert("dry_run".into(), true.into());
            }
        }
        other => return Err(format!("{other:?} is not an action here")),
    }
    let payload = serde_json::to_vec(&m).map_err(|e| e.to_string())?;
    debfleet_protocol::command::parse_command(verb, &payload).map(|c| c.args).map_err(|r| r.message)
}

/// What a confirmation says will happen.
fn describe(target: &Target, args: &CommandArgs) -> String {
    let who = match target {
        Target::Device(d) => format!("device {d}"),
        Target::Group(g) => format!("every device in group {g}"),
    };
    let names = |p: &[PackageSpec]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ");
    match args {
        CommandArgs::Ping => format!("{who} will answer a ping."),
        CommandArgs::Restart { unit } => format!("{who} will restart {}.", unit.as_deref().unwrap_or("the agent")),
        CommandArgs::Install { packages, .. } => {
            format!("{who} will install {} (apt, units watched, undone if they fail).", names(packages))
        }
        CommandArgs::Upgrade { packages, .. } if packages.is_empty() => {
            format!("{who} will upgrade every managed package.")
        }
        CommandArgs::Upgrade { packages, .. } => format!("{who} will upgrade {}.", names(packages)),
        CommandArgs::Uninstall { packages, .. } => {
            format!("{who} will remove {} (configuration kept).", names(packages))
        }
        CommandArgs::Rollback { package, .. } => format!("{who} will go back to the previous version of {package}."),
        other => format!("{who}: {}", other.verb().as_str()),
    }
}

async fn act(app: Arc<App>, s: Session, target: Target, f: ActForm) -> Response {
    let target_name = target.to_string();
    let detail = format!("{} {}", f.verb, f.words.trim()).trim().to_owned();
    if !session::same(&f.csrf, &s.csrf) {
        app.log(&s, &f.verb, &target_name, &detail, "refused: no valid CSRF token");
        return app.message(
            StatusCode::FORBIDDEN,
            Some(&s),
            "Refused",
            "the form did not come from this page (CSRF token missing or wrong)",
        );
    }
    if s.role < Role::Operator {
        app.log(&s, &f.verb, &target_name, &detail, "refused: viewers cannot act");
        return app.message(
            StatusCode::FORBIDDEN,
            Some(&s),
            "Refused",
            &format!("{} is a viewer: viewers see, operators act", s.user),
        );
    }
    let confirmed = f.confirm == "yes";
    let package_verb = matches!(f.verb.as_str(), "install" | "upgrade" | "uninstall" | "rollback");
    let args = match command(&f.verb, &f.words, !confirmed && package_verb) {
        Ok(a) => a,
        Err(e) => return app.message(StatusCode::BAD_REQUEST, Some(&s), "Not sent", &e),
    };
    let back = match &target {
        Target::Device(d) => format!("/device/{d}"),
        Target::Group(g) => format!("/?group={g}"),
    };
    if !confirmed {
        // The dry run: what apt on each device would do, nothing changed.
        let plan = if package_verb {
            let dry = Act { target: target.clone(), args: args.clone(), by: s.user.clone() };
            match app.backend.act(dry).await {
                Ok(lines) => lines,
                Err(e) => vec![format!("the dry run failed: {e}")],
            }
        } else {
            Vec::new()
        };
        let ctx = minijinja::context! {
            session => view_session(&s), what => describe(&target, &args), plan,
            action => match &target { Target::Device(d) => format!("/device/{d}/act"), Target::Group(g) => format!("/group/{g}/act") },
            verb => f.verb, words => f.words, back,
        };
        return app.render("confirm.html", ctx);
    }
    if !app.log(&s, &f.verb, &target_name, &detail, "sent") {
        return app.message(
            StatusCode::SERVICE_UNAVAILABLE,
            Some(&s),
            "Not sent",
            "the audit log cannot be written, so nothing was sent",
        );
    }
    match app.backend.act(Act { target, args, by: s.user.clone() }).await {
        Ok(_) => Redirect::to(&back).into_response(),
        Err(e) => {
            app.log(&s, &f.verb, &target_name, &detail, &format!("failed: {e}"));
            app.message(StatusCode::BAD_GATEWAY, Some(&s), "Not sent", &e)
        }
    }
}

#[cfg(test)]
mod tests;
