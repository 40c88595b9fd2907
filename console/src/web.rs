//! `debfleet web`: the web console (crate `debfleet-web`) over the broker. A session follows the
//! fleet's retained and live topics into a [`Fleet`]; the pages read rows from it and get every
//! change as an update; actions go out as `debfleet` sends commands, with the signed-in user as
//! `by`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use debfleet_protocol::rollout::{Action, RolloutId};
use debfleet_protocol::time::{now_unix_ms, parse_unix_ms};
use debfleet_protocol::{CommandArgs, DeviceId, LogBatch, OpRecord, PackageResult, Role, Telemetry, Topic};
use debfleet_web::history::{History, LogRow, Point};
use debfleet_web::repo::RepoSuite;
use debfleet_web::{Act, Backend, BoxFuture, DeviceDetail, DeviceRow, OpRow, PackageRow, RolloutView, UnitRow, Update};

use crate::repo::RepoClient;
use crate::rollout::Rollouts;
use tokio::sync::broadcast;

use crate::fleet::{Change, Device, Fleet};
use crate::request::{Request, Target};
use crate::session::Session;
use crate::Ctx;

/// Where the web console keeps its users and its audit log unless told: beside the console's
/// configuration (`$XDG_CONFIG_HOME/debfleet/`, else `~/.config/debfleet/`).
pub fn default_path(name: &str) -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("debfleet").join(name)
}

/// `debfleet web user add NAME --role R`: the password from stdin (one line), or asked for.
pub fn add_user(users: &std::path::Path, name: &str, role: Role) -> Result<u8> {
    use std::io::{BufRead, IsTerminal};
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("password for {name} (shown as you type; at least 8 characters): ");
    }
    let mut password = String::new();
    stdin.lock().read_line(&mut password).context("reading the password from stdin")?;
    let password = password.trim_end_matches(['\n', '\r']);
    let mut u = debfleet_web::users::Users::load(users)?;
    u.add(name, role, password).map_err(|e| crate::cmds::usage(e.to_string()))?;
    println!("{name} ({}) can sign in; users are in {}", role.as_str(), users.display());
    Ok(0)
}

/// `debfleet audit verify [FILE]`.
pub fn verify_audit(path: &std::path::Path) -> Result<u8> {
    match debfleet_web::audit::verify(path) {
        Ok((n, _)) => {
            println!("{}: {n} entries, the chain is intact", path.display());
            Ok(0)
        }
        Err(e) => {
            println!("{}: TAMPERED: {e}", path.display());
            Ok(crate::exit::FAILED)
        }
    }
}

pub struct WebOptions {
    pub listen: SocketAddr,
    /// The repository for the repository page; without it the page says so.
    pub repo: Option<crate::repo::RepoAccess>,
    /// The certificate chain and key (PEM) to serve HTTPS with.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub users: PathBuf,
    pub audit: PathBuf,
}

/// `debfleet web`: serves until Ctrl-C.
pub async fn serve(ctx: &Ctx, opts: WebOptions) -> Result<u8> {
    let server = Server::start(ctx, &opts).await?;
    eprintln!("debfleet web: {}; Ctrl-C stops", server.describe(&opts));
    server
        .run(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(0)
}

/// The web console, listening and following the fleet; it answers once [`Server::run`] runs.
/// Started apart from running so a caller (the demo, `debfleet serve`) learns at once whether the
/// address was free and the files readable.
pub struct Server {
    app: Arc<debfleet_web::App>,
    listener: tokio::net::TcpListener,
    tls: Option<debfleet_web::TlsConfig>,
}

impl Server {
    pub async fn start(ctx: &Ctx, opts: &WebOptions) -> Result<Server> {
        if !opts.listen.ip().is_loopback() && opts.tls.is_none() {
            bail!(crate::cmds::usage(format!(
                "{} is not a loopback address: serve it with --tls-cert and --tls-key (passwords and cookies must not cross a network in clear)",
                opts.listen
            )));
        }
        let tls = match &opts.tls {
            Some((cert, key)) => {
                Some(debfleet_web::tls_config(cert, key).map_err(|e| crate::cmds::usage(e.to_string()))?)
            }
            None => None,
        };
        let repo = match &opts.repo {
            Some(access) => Some(Arc::new(RepoClient::new(Some(access.clone()))?.quiet())),
            None => None,
        };
        let live = Arc::new(Live {
            ctx: ctx.clone(),
            repo,
            fleet: Mutex::default(),
            history: Mutex::default(),
            rollouts: Mutex::default(),
            tx: broadcast::channel(1024).0,
            sessions_seen: Default::default(),
        });
        let config =
            debfleet_web::Config { users: opts.users.clone(), audit: opts.audit.clone(), secure: tls.is_some() };
        let app = debfleet_web::App::new(live.clone(), &config)?;
        let listener = tokio::net::TcpListener::bind(opts.listen)
            .await
            .with_context(|| format!("the web console cannot listen on {}", opts.listen))?;
        tokio::spawn(live.follow());
        app.audit_sessions();
        Ok(Server { app, listener, tls })
    }

    /// Whether nobody can sign in yet.
    pub fn no_users(&self) -> bool {
        self.app.no_users()
    }

    /// The address and files, for the line that says the console is up.
    pub fn describe(&self, opts: &WebOptions) -> String {
        format!("{} (users {}, audit log {})", self.url(), opts.users.display(), opts.audit.display())
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        match self.listener.local_addr() {
            Ok(a) => format!("{scheme}://{a}"),
            Err(_) => format!("{scheme}://?"),
        }
    }

    /// Serves until `stop` resolves.
    pub async fn run(self, stop: impl std::future::Future<Output = ()> + Send + 'static) -> Result<()> {
        match self.tls {
            Some(tls) => debfleet_web::serve_tls(self.app, self.listener, tls, stop).await?,
            None => {
                let service = self.app.router().into_make_service_with_connect_info::<SocketAddr>();
                axum::serve(self.listener, service).with_graceful_shutdown(stop).await?;
            }
        }
        Ok(())
    }
}

/// The fleet as the broker holds it, kept current, and what the broker does not keep
/// (telemetry over time, log lines) since the server started.
struct Live {
    ctx: Ctx,
    repo: Option<Arc<RepoClient>>,
    fleet: Mutex<Fleet>,
    history: Mutex<History>,
    rollouts: Mutex<Rollouts>,
    tx: broadcast::Sender<Update>,
    /// Remote sessions seen starting and not yet ended (for the audit log).
    sessions_seen: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Live {
    /// Follows the fleet's topics for as long as the server runs, reconnecting when the broker
    /// goes away (the retained set comes again on every connect).
    async fn follow(self: Arc<Self>) {
        let mut pause = Duration::from_secs(1);
        loop {
            if let Err(e) = self.follow_once().await {
                tracing::warn!("following the fleet: {e:#}; again in {} s", pause.as_secs());
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(30));
        }
    }

    async fn follow_once(&self) -> Result<()> {
        let mut session = Session::connect(self.ctx.connect_options()).await?;
        session.subscribe_view(&[self.ctx.topics.fleet_filter(), self.ctx.topics.rollout_filter()]).await?;
        loop {
            let msg = session.recv().await?;
            if let Ok(Topic::Rollout(id, part)) = self.ctx.topics.parse(&msg.topic) {
                let Ok(mut rollouts) = self.rollouts.lock() else { bail!("the rollouts' lock is poisoned") };
                match rollouts.apply(id.clone(), part, &msg.payload) {
                    Ok(()) => {
                        let phase = rollouts.states.get(&id).map_or("created", |s| s.phase.as_str());
                        let _ = self.tx.send(Update::Rollout { id: id.to_string(), phase: phase.to_owned() });
                    }
                    Err(e) => tracing::debug!("ignoring a rollout message on {}: {e}", msg.topic),
                }
                continue;
            }
            let update = {
                let Ok(mut fleet) = self.fleet.lock() else { bail!("the fleet's lock is poisoned") };
                let change = fleet.apply(&self.ctx.topics, &msg.topic, &msg.payload);
                if let Change::Status(d) | Change::Other(d) = &change {
                    if !fleet.devices.contains_key(d) {
                        // Its last retained fact deleted: the device is gone, and its history too.
                        if let Ok(mut h) = self.history.lock() {
                            h.forget(d.as_str());
                        }
                    }
                }
                match change {
                    Change::Other(d) => match self.ctx.topics.parse(&msg.topic) {
                        // Telemetry and logs change no row: they go to the history and the
                        // device's open pages.
                        Ok(Topic::Telemetry(_)) => fleet
                            .devices
                            .get(&d)
                            .and_then(|dev| dev.telemetry.as_ref())
                            .and_then(|t| self.remember_sample(&d, t)),
                        // Lines of a device the broker holds nothing else of are not kept.
                        Ok(Topic::Logs(_)) if fleet.devices.contains_key(&d) => self.remember_logs(&d, &msg.payload),
                        Ok(Topic::Logs(_)) => None,
                        _ => fleet.devices.get(&d).map(|dev| Update::Device(row(&d, dev))),
                    },
                    Change::Status(d) => fleet.devices.get(&d).map(|dev| Update::Device(row(&d, dev))),
                    Change::Op(d, op) => fleet
                        .devices
                        .get(&d)
                        .and_then(|dev| dev.ops.get(&op))
                        .map(|r| Update::Op { device: d.to_string(), op: op_row(r) }),
                    Change::Invalid(why) => {
                        tracing::debug!("ignoring an invalid message: {why}");
                        None
                    }
                    Change::Ignored => None,
                }
            };
            if let Some(u) = update {
                // Nobody listening is fine.
                let _ = self.tx.send(u);
            }
            // Remote sessions, for the audit log: as they happen (a retained record is one the
            // log had its chance at already, or that happened while no console watched).
            if !msg.retained {
                if let (Ok(Topic::Op(d, _)), Ok(r)) =
                    (self.ctx.topics.parse(&msg.topic), serde_json::from_slice::<OpRecord>(&msg.payload))
                {
                    if let Some(note) = self.session_note(&d, &r) {
                        let _ = self.tx.send(Update::Session(note));
                    }
                }
            }
        }
    }

    /// A session's start (its running record carries the session) or end (a final record of a
    /// session seen starting, or of a shell or forward).
    fn session_note(&self, d: &debfleet_protocol::DeviceId, r: &OpRecord) -> Option<debfleet_web::SessionNote> {
        let session_verb = matches!(r.verb.as_str(), "shell" | "forward");
        let Ok(mut started) = self.sessions_seen.lock() else { return None };
        let (action, detail, outcome) = match r.state {
            debfleet_protocol::OpState::Running => {
                let mut about = r.result.as_ref()?.get("session")?.clone();
                if let Some(o) = about.as_object_mut() {
                    o.remove("key");
                }
                if !started.insert(r.id.to_string()) {
                    return None;
                }
                ("session start", about.to_string(), "ok".to_owned())
            }
            s if s.is_final() && (started.remove(r.id.as_str()) || session_verb) => {
                let detail = r.result.as_ref().map(|v| v.to_string()).unwrap_or_default();
                let outcome = match &r.error {
                    Some(e) => format!("{}: {}", e.code.as_str(), e.message),
                    None => "ok".to_owned(),
                };
                ("session end", detail, outcome)
            }
            _ => return None,
        };
        Some(debfleet_web::SessionNote {
            device: d.to_string(),
            op: r.id.to_string(),
            verb: r.verb.clone(),
            by: r.by.clone().unwrap_or_else(|| "-".into()),
            action,
            detail,
            outcome,
        })
    }
}

impl Live {
    /// Runs a repository call off the async threads (the client blocks); an error when the
    /// console was given no repository.
    fn with_repo<T: Send + 'static>(
        &self,
        f: impl FnOnce(&RepoClient) -> Result<T> + Send + 'static,
    ) -> BoxFuture<Result<T, String>> {
        let repo = self.repo.clone();
        Box::pin(async move {
            let Some(client) = repo else {
                return Err(
                    "no repository: start the console with --repo URL and --token (or DEBFLEET_REPO, DEBFLEET_TOKEN)"
                        .to_owned(),
                );
            };
            match tokio::task::spawn_blocking(move || f(&client)).await {
                Ok(r) => r.map_err(|e| format!("{e:#}")),
                Err(e) => Err(format!("the repository call stopped: {e}")),
            }
        })
    }

    fn remember_sample(&self, d: &DeviceId, t: &Telemetry) -> Option<Update> {
        let now = now_unix_ms() / 1000;
        // The device's own time, unless its clock is ahead of ours (then ours).
        let at = parse_unix_ms(&t.ts).map(|ms| ms / 1000).filter(|&s| s <= now + 60).unwrap_or(now);
        let point = Point {
            t: at,
            cpu: t.cpu.map(|v| v as f32),
            memory: t.memory.map(|v| v as f32),
            disk: t.disk.values().copied().reduce(f64::max).map(|v| v as f32),
        };
        let point = self.history.lock().ok()?.sample(d.as_str(), point)?;
        Some(Update::Telemetry { device: d.to_string(), point })
    }

    fn remember_logs(&self, d: &DeviceId, payload: &[u8]) -> Option<Update> {
        let batch: LogBatch = serde_json::from_slice(payload).ok()?;
        let lines: Vec<LogRow> = batch.lines.iter().map(|l| LogRow::new(&l.ts, &l.level, &l.target, &l.msg)).collect();
        self.history.lock().ok()?.log(d.as_str(), lines.iter().cloned());
        Some(Update::Logs { device: d.to_string(), lines })
    }
}

fn row(id: &DeviceId, d: &Device) -> DeviceRow {
    let units = d.units.as_ref().map(|u| u.units.values().collect::<Vec<_>>()).unwrap_or_default();
    DeviceRow {
        id: id.to_string(),
        status: d.status_word().to_owned(),
        since: d.since().unwrap_or_default().to_owned(),
        agent_version: d.meta.as_ref().map(|m| m.agent_version.clone()).unwrap_or_default(),
        groups: d.groups().iter().map(|g| g.to_string()).collect(),
        units: units.len(),
        units_failed: units.iter().filter(|u| u.active == debfleet_protocol::units::ActiveState::Failed).count(),
    }
}

fn op_row(r: &OpRecord) -> OpRow {
    let package = r.result.clone().and_then(|v| serde_json::from_value::<PackageResult>(v).ok());
    let detail = match (&r.error, &r.result, package) {
        (Some(e), _, _) => format!("{}: {}", e.code.as_str(), e.message),
        (None, _, Some(p)) if p.dry_run => format!("dry run (nothing changed): {}", p.changes_text()),
        (None, _, Some(p)) => p.changes_text(),
        (None, Some(v), None) => v.to_string(),
        (None, None, None) => String::new(),
    };
    OpRow {
        id: r.id.to_string(),
        verb: r.verb.clone(),
        state: r.state.as_str().to_owned(),
        phase: r.phase.map(|p| p.as_str().to_owned()).unwrap_or_default(),
        percent: r.percent.map(|p| format!("{p}%")).unwrap_or_default(),
        by: r.by.clone().unwrap_or_default(),
        updated: r.updated_at.clone(),
        detail,
    }
}

impl Backend for Live {
    fn devices(&self) -> Vec<DeviceRow> {
        let Ok(fleet) = self.fleet.lock() else { return Vec::new() };
        fleet.devices.iter().filter(|(_, d)| d.meta.is_some() || d.status.is_some()).map(|(id, d)| row(id, d)).collect()
    }

    fn device(&self, id: &DeviceId) -> Option<DeviceDetail> {
        let fleet = self.fleet.lock().ok()?;
        let history = self.history.lock().ok()?;
        let d = fleet.devices.get(id)?;
        let meta = d.meta.as_ref();
        let mut ops: Vec<&OpRecord> = d.ops.values().collect();
        ops.sort_by(|a, b| b.accepted_at.cmp(&a.accepted_at));
        Some(DeviceDetail {
            row: row(id, d),
            hostname: meta.map(|m| m.hostname.clone()).unwrap_or_default(),
            os: meta.map(|m| m.os.pretty_name.clone()).unwrap_or_default(),
            arch: meta.map(|m| m.arch.clone()).unwrap_or_default(),
            packages: d
                .packages
                .iter()
                .flat_map(|p| p.packages.iter())
                .map(|(name, s)| PackageRow {
                    name: name.clone(),
                    version: s.version.clone().unwrap_or_default(),
                    status: s.status.clone(),
                })
                .collect(),
            units: d
                .units
                .iter()
                .flat_map(|u| u.units.iter())
                .map(|(name, u)| UnitRow {
                    name: name.clone(),
                    package: u.package.clone(),
                    active: u.active.as_str().to_owned(),
                    sub: u.sub.clone(),
                })
                .collect(),
            ops: ops.into_iter().map(op_row).collect(),
            cfg: d.cfg.as_ref().map(|c| c.cfg.clone()),
            telemetry: history.points(id.as_str(), now_unix_ms() / 1000),
            logs: history.logs(id.as_str()),
        })
    }

    fn updates(&self) -> broadcast::Receiver<Update> {
        self.tx.subscribe()
    }

    fn repository(&self) -> BoxFuture<Result<Vec<RepoSuite>, String>> {
        self.with_repo(|client| {
            let mut out = Vec::new();
            for suite in client.suites()? {
                out.push(serde_json::from_value(client.packages(&suite)?)?);
            }
            Ok(out)
        })
    }

    fn upload(&self, file: PathBuf, suite: String) -> BoxFuture<Result<String, String>> {
        self.with_repo(move |client| {
            let v = crate::repo::publish_one(client, &file, &suite)?;
            let s = |k: &str| v[k].as_str().unwrap_or("").to_owned();
            Ok(format!("{}={} ({}) {} in {}", s("name"), s("version"), s("arch"), s("status"), s("suite")))
        })
    }

    fn promote(&self, name: String, version: String, from: String, to: String) -> BoxFuture<Result<String, String>> {
        self.with_repo(move |client| {
            client.promote(&name, &version, &from, &to)?;
            Ok(format!("promoted {name}={version} from {from} to {to}"))
        })
    }

    fn rollouts(&self) -> Vec<RolloutView> {
        let Ok(r) = self.rollouts.lock() else { return Vec::new() };
        r.specs
            .values()
            .map(|spec| RolloutView { spec: spec.clone(), state: r.states.get(&spec.id).cloned() })
            .collect()
    }

    fn steer(&self, id: RolloutId, action: Action, by: String) -> BoxFuture<Result<String, String>> {
        let ctx = self.ctx.clone();
        Box::pin(async move {
            match crate::rollout::steer_once(&ctx, &id, action, by).await {
                Ok((_, Some(phase))) => Ok(format!("{} applied; now {}", action.as_str(), phase.as_str())),
                Ok((_, None)) => Err(format!(
                    "{} is on the broker, but no controller applied it within 15 s (is `debfleet rollout run` or `debfleet serve` running?)",
                    action.as_str()
                )),
                Err(e) => Err(format!("{e:#}")),
            }
        })
    }

    fn act(&self, act: Act) -> BoxFuture<Result<Vec<String>, String>> {
        let ctx = Ctx { by: Some(act.by.clone()), ..self.ctx.clone() };
        let dry_run = matches!(
            &act.args,
            CommandArgs::Install { options, .. }
                | CommandArgs::Upgrade { options, .. }
                | CommandArgs::Uninstall { options, .. }
                | CommandArgs::Rollback { options, .. } if options.dry_run
        );
        let target = match act.target {
            debfleet_web::Target::Device(d) => Target::Devices(vec![d]),
            debfleet_web::Target::Group(g) => Target::Group(g),
        };
        let req = Request {
            target,
            args: act.args,
            timeout: Duration::from_secs(if dry_run { 60 } else { 1800 }),
            expires: ctx.expires,
            by: ctx.by.clone(),
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<Result<Vec<String>, String>>();
        tokio::spawn(async move {
            let mut first = Some(tx);
            let result = async {
                let (mut session, mut fleet) = crate::cmds::load_fleet(&ctx).await?;
                let outcomes = crate::request::send(&mut session, &ctx.topics, &mut fleet, &req, &mut |_, _| {
                    // A device has it: the pages follow it from here.
                    if !dry_run {
                        if let Some(tx) = first.take() {
                            let _ = tx.send(Ok(Vec::new()));
                        }
                    }
                })
                .await;
                session.disconnect().await;
                outcomes
            }
            .await;
            let answer = result.map_err(|e| format!("{e:#}")).map(|outcomes| {
                outcomes
                    .iter()
                    .map(|o| {
                        let what = crate::packages::package_result(o).map(|r| r.changes_text());
                        match (&o.error, what) {
                            (Some(e), _) => format!("{}: {e}", o.device),
                            (None, Some(w)) => format!("{}: {w}", o.device),
                            (None, None) => format!("{}: ok", o.device),
                        }
                    })
                    .collect()
            });
            if let Err(e) = &answer {
                tracing::warn!("sending {}: {e}", req.args.verb().as_str());
            }
            if let Some(tx) = first.take() {
                let _ = tx.send(answer);
            }
        });
        Box::pin(async move {
            match tokio::time::timeout(Duration::from_secs(90), rx).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(_)) => Err("the request was dropped".into()),
                Err(_) => Ok(vec!["sent; no device has answered yet".into()]),
            }
        })
    }

    fn terminal(
        &self,
        device: DeviceId,
        by: String,
        cols: u16,
        rows: u16,
    ) -> BoxFuture<Result<debfleet_web::terminal::Terminal, String>> {
        let ctx = Ctx { by: Some(by), ..self.ctx.clone() };
        Box::pin(async move {
            let term = "xterm-256color".to_owned();
            let open = crate::remote::open(&ctx, &device, |key| CommandArgs::Shell {
                key,
                cols,
                rows,
                term,
                command: None,
                raw: false,
            })
            .await
            .map_err(|e| format!("{e:#}"))?;
            let (out_tx, output) = tokio::sync::mpsc::channel(16);
            let (input, in_rx) = tokio::sync::mpsc::channel(64);
            tokio::spawn(crate::remote::pump_terminal(open, in_rx, out_tx));
            Ok(debfleet_web::terminal::Terminal { output, input })
        })
    }

    fn journal(
        &self,
        device: DeviceId,
        unit: Option<String>,
        lines: u32,
        by: String,
    ) -> BoxFuture<Result<serde_json::Value, String>> {
        let ctx = Ctx { by: Some(by.clone()), ..self.ctx.clone() };
        Box::pin(async move {
            let req = Request {
                target: Target::Devices(vec![device]),
                args: CommandArgs::Journal { unit, since_s: None, lines, follow: None },
                timeout: Duration::from_secs(30),
                expires: ctx.expires,
                by: Some(by),
            };
            let result = async {
                let (mut session, mut fleet) = crate::cmds::load_fleet(&ctx).await?;
                let outcomes = crate::request::send(&mut session, &ctx.topics, &mut fleet, &req, &mut |_, _| {}).await;
                session.disconnect().await;
                outcomes
            }
            .await
            .map_err(|e| format!("{e:#}"))?;
            let o = result.into_iter().next().ok_or("no answer")?;
            match (o.ok, o.record.and_then(|r| r.result)) {
                (true, Some(v)) => Ok(v),
                _ => Err(o.error.unwrap_or_else(|| "no answer".into())),
            }
        })
    }
}
