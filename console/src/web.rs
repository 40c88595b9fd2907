//! `debfleet web`: the web console (crate `debfleet-web`) over the broker. A session follows the
//! fleet's retained and live topics into a [`Fleet`]; the pages read rows from it and get every
//! change as an update; actions go out as `debfleet` sends commands, with the signed-in user as
//! `by`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use debfleet_protocol::{CommandArgs, DeviceId, OpRecord, PackageResult, Role};
use debfleet_web::{Act, Backend, BoxFuture, DeviceDetail, DeviceRow, OpRow, PackageRow, UnitRow, Update};
use tokio::sync::broadcast;

use crate::fleet::{Change, Device, Fleet};
use crate::request::{Request, Target};
use crate::session::{ConnectOptions, Session};
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
    /// The certificate chain and key (PEM) to serve HTTPS with.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub users: PathBuf,
    pub audit: PathBuf,
}

/// Serves until Ctrl-C.
pub async fn serve(ctx: &Ctx, opts: WebOptions) -> Result<u8> {
    if !opts.listen.ip().is_loopback() && opts.tls.is_none() {
        bail!(crate::cmds::usage(format!(
            "{} is not a loopback address: serve it with --tls-cert and --tls-key (passwords and cookies must not cross a network in clear)",
            opts.listen
        )));
    }
    let tls = match &opts.tls {
        Some((cert, key)) => Some(debfleet_web::tls_config(cert, key).map_err(|e| crate::cmds::usage(e.to_string()))?),
        None => None,
    };
    let live = Arc::new(Live { ctx: ctx.clone(), fleet: Mutex::default(), tx: broadcast::channel(1024).0 });
    tokio::spawn(live.clone().follow());
    let config = debfleet_web::Config { users: opts.users.clone(), audit: opts.audit.clone(), secure: tls.is_some() };
    let app = debfleet_web::App::new(live, &config)?;
    let listener =
        tokio::net::TcpListener::bind(opts.listen).await.with_context(|| format!("listening on {}", opts.listen))?;
    eprintln!(
        "debfleet web: {}://{} (users {}, audit log {}); Ctrl-C stops",
        if tls.is_some() { "https" } else { "http" },
        listener.local_addr()?,
        opts.users.display(),
        opts.audit.display()
    );
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match tls {
        Some(tls) => debfleet_web::serve_tls(app, listener, tls, stop).await?,
        None => {
            let service = app.router().into_make_service_with_connect_info::<SocketAddr>();
            axum::serve(listener, service).with_graceful_shutdown(stop).await?;
        }
    }
    Ok(0)
}

/// The fleet as the broker holds it, kept current.
struct Live {
    ctx: Ctx,
    fleet: Mutex<Fleet>,
    tx: broadcast::Sender<Update>,
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
        let opts = ConnectOptions {
            url: &self.ctx.broker,
            ca_file: self.ctx.ca_file.as_deref(),
            prefix: self.ctx.topics.prefix(),
        };
        let mut session = Session::connect(opts).await?;
        session.subscribe_view(&[self.ctx.topics.fleet_filter()]).await?;
        loop {
            let msg = session.recv().await?;
            let update = {
                let Ok(mut fleet) = self.fleet.lock() else { bail!("the fleet's lock is poisoned") };
                match fleet.apply(&self.ctx.topics, &msg.topic, &msg.payload) {
                    Change::Status(d) | Change::Other(d) => {
                        fleet.devices.get(&d).map(|dev| Update::Device(row(&d, dev)))
                    }
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
        }
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
            cfg: d.cfg.as_ref().and_then(|c| serde_json::to_string_pretty(&c.cfg).ok()).unwrap_or_default(),
        })
    }

    fn updates(&self) -> broadcast::Receiver<Update> {
        self.tx.subscribe()
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
}
