//! `debfleet-agent --config FILE`: the long-lived agent on every device.

mod components;
mod config;
mod connection;
mod core;
mod fetch;
mod fetch_request;
mod fsutil;
mod identity;
mod jobs;
mod journal;
mod link;
mod localtime;
mod logs;
mod managed;
mod operators;
mod outbox;
mod pty;
mod remote;
mod spool;
mod telemetry;
mod unitlog;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use debfleet_protocol::time;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{filter::LevelFilter, Layer};

use crate::config::AgentConfig;
use crate::core::{Core, Event, Out};

const USAGE: &str =
    "usage: debfleet-agent --config FILE\n\nRuns the debfleet device agent. See the README for the configuration keys.";

fn parse_args() -> Result<PathBuf> {
    let mut args = std::env::args_os().skip(1);
    let mut config = None;
    while let Some(a) = args.next() {
        match a.to_str() {
            Some("--config" | "-c") => config = Some(PathBuf::from(args.next().context("--config needs a file")?)),
            Some("--version" | "-V") => {
                println!("debfleet-agent {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            Some("--help" | "-h") => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => bail!("unexpected argument {a:?}\n{USAGE}"),
        }
    }
    config.context(USAGE)
}

fn main() -> ExitCode {
    // One malloc arena for the process: glibc gives each further thread that allocates (the
    // blocking pool's, which runs the core) an arena of its own, a few hundred KiB resident
    // for nothing on a process this small.
    #[cfg(target_env = "gnu")]
    // SAFETY: called before any other thread exists; mallopt only sets an allocator parameter.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    let cfg = match parse_args().and_then(|p| AgentConfig::load(&p)) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("debfleet-agent: {e:#}");
            return ExitCode::from(2);
        }
    };
    let (forward, gate, log_rx) = logs::forwarding(&cfg.file_runtime.logs);
    let local_level =
        std::env::var("DEBFLEET_LOG").ok().and_then(|l| l.parse::<LevelFilter>().ok()).unwrap_or(LevelFilter::INFO);
    let local = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .with_filter(local_level);
    let subscriber = tracing_subscriber::registry().with(local).with(forward);
    let _ = tracing::subscriber::set_global_default(subscriber);

    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("debfleet-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cfg, gate, log_rx)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(
    cfg: AgentConfig,
    gate: std::sync::Arc<logs::LogGate>,
    log_rx: std::sync::mpsc::Receiver<debfleet_protocol::LogLine>,
) -> Result<()> {
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("state_dir: creating {}", cfg.state_dir.display()))?;
    let (journal, interrupted) =
        journal::Journal::open(&cfg.state_dir.join("ops"), cfg.ops.journal_size, time::now_unix_ms())?;
    for id in &interrupted {
        tracing::warn!(op = %id, "operation was interrupted by the previous stop; recorded as failed");
    }
    // systemd sets INVOCATION_ID for every service it starts.
    let under_systemd = std::env::var_os("INVOCATION_ID").is_some();
    let apt = debfleet_apt::Apt { lock_timeout_s: cfg.apt.lock_timeout_s, ..Default::default() };
    let package_verbs = ["install", "upgrade", "uninstall", "rollback"];
    let touched: Vec<String> =
        interrupted.iter().filter_map(|id| journal.get(id)).flat_map(|e| e.packages.clone()).collect();
    if interrupted.iter().any(|id| journal.verb(id).is_some_and(|v| package_verbs.contains(&v))) {
        // A package operation was cut short (SIGKILL, power cut): repair dpkg before new work.
        let repair = apt.clone();
        match tokio::task::spawn_blocking(move || repair.recover()).await {
            Ok(Ok(true)) => tracing::warn!("repaired an interrupted dpkg run"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => tracing::error!("repairing dpkg failed: {e}"),
            Err(e) => tracing::error!("repairing dpkg: {e}"),
        }
    }
    let systemd = match tokio::time::timeout(Duration::from_secs(3), debfleet_systemd::Systemd::system()).await {
        Ok(Ok(sd)) => Some(Arc::new(sd)),
        Ok(Err(e)) => {
            tracing::info!("no systemd bus ({e}); unit control and unit state are off");
            None
        }
        Err(_) => {
            tracing::info!("the system bus did not answer; unit control and unit state are off");
            None
        }
    };
    let dpkg = Arc::new(debfleet_apt::dpkg::Database::new(&cfg.dpkg_admindir));
    let fetcher = fetch::Fetcher {
        enabled: cfg.deltas.enabled,
        keep_dir: cfg.state_dir.join("debs"),
        work_dir: cfg.state_dir.join("fetch"),
        keep_max_bytes: cfg.deltas.keep_mb << 20,
    };
    fetcher.clean();
    let job_ctx = Arc::new(jobs::JobContext {
        apt,
        fetcher,
        db: dpkg.clone(),
        systemd: systemd.clone(),
        self_upgrade: under_systemd && systemd.is_some(),
        cancelled: Default::default(),
    });
    // Transactions a transient unit carried while this agent (re)started are finished first.
    let resumed: Vec<jobs::Job> = journal
        .handoffs()
        .into_iter()
        .map(|(id, h)| jobs::Job {
            id,
            kind: jobs::JobKind::Resume { unit: h.unit, before: h.before },
            dry_run: false,
            watch: Duration::ZERO,
            settle: None,
            expires_at: None,
        })
        .collect();
    let link = Arc::new(link::Link::open(&cfg.state_dir, time::now_unix_ms()));
    let endpoint = connection::endpoint(&cfg)?;
    let (protocol, reconnect) = (cfg.mqtt, cfg.reconnect.clone());
    let socket = cfg.components_socket.clone();
    let mut core =
        Core::new(cfg, journal, identity::Identity::read(), under_systemd, Some(gate.clone()), dpkg, link.clone());
    core.reconcile_packages(&touched);
    let will = core.will_builder();
    let (client, eventloop) = connection::open(&endpoint, protocol, core.link_settings());

    let shutdown = CancellationToken::new();
    let (net_tx, mut net_rx) = mpsc::channel(256);
    let (settings_tx, settings_rx) = tokio::sync::watch::channel(core.link_settings());
    let (client_tx, client_rx) = tokio::sync::watch::channel(client);
    let driver = tokio::spawn(connection::drive(
        connection::Driver {
            protocol,
            endpoint,
            reconnect,
            client: client_tx,
            events: net_tx,
            link: link.clone(),
            settings: settings_rx,
            shutdown: shutdown.clone(),
        },
        eventloop,
        will,
    ));
    let outbox = Arc::new(outbox::Outbox::default());
    let (connected_tx, connected_rx) = tokio::sync::watch::channel(false);
    let sender = tokio::spawn(outbox::send(client_rx.clone(), outbox.clone(), link.clone(), connected_rx));

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    // The first tick comes a second after start, so the first CPU figure spans a real interval.
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_secs(1), Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut probe = telemetry::SystemProbe::new();
    let mut sampler = telemetry::Sampler::default();
    let mut batcher = logs::Batcher::new(log_rx, gate, Instant::now());
    let mut last_housekeeping = Instant::now();
    let mut connected = false;
    let (job_tx, mut job_rx) = mpsc::channel(64);
    let (unit_tx, mut unit_rx) = mpsc::channel(64);
    let mut watched = core.managed_units();
    let mut watcher = systemd.as_ref().map(|sd| spawn_unit_watcher(sd.clone(), watched.clone(), unit_tx.clone()));
    tracing::info!("debfleet-agent {} starting", env!("CARGO_PKG_VERSION"));

    let (component_tx, mut component_rx) = mpsc::channel(256);
    let registry = components::Registry::default();
    let _components = match &socket {
        Some(path) => match components::bind(path) {
            Ok(listener) => Some(components::spawn(listener, component_tx, registry.clone())),
            Err(e) => {
                tracing::error!("components' socket {}: {e}; components cannot connect", path.display());
                None
            }
        },
        None => None,
    };

    let (session_tx, mut session_rx) = mpsc::channel(64);
    let sessions = remote::Sessions::new(outbox.clone(), link.clone(), session_tx);

    let mut outs = core.resume(resumed);
    let ctx = Perform {
        sessions: &sessions,
        outbox: &outbox,
        job_ctx: &job_ctx,
        job_tx: &job_tx,
        settings: &settings_tx,
        link: &link,
        components: &registry,
    };
    let restart = loop {
        if ctx.perform(std::mem::take(&mut outs), connected) {
            break true;
        }
        // The connection counts as up for the sender only once the core has queued what a new
        // connection needs first (subscriptions, status, retained facts).
        if connected && !*connected_tx.borrow() {
            let _ = connected_tx.send(true);
        }
        // One closed set of events; each becomes the core's actions.
        let event = tokio::select! {
            ev = net_rx.recv() => match ev {
                Some(ev @ Event::Connected { .. }) => {
                    connected = true;
                    ev
                }
                // A session's frames go to it straight, not through the core.
                Some(Event::Message { topic, payload, retain }) => match sessions.deliver(&topic, payload) {
                    None => continue,
                    Some(payload) => Event::Message { topic, payload, retain },
                },
                Some(Event::Disconnected { .. }) => {
                    connected = false;
                    let _ = connected_tx.send(false);
                    // Telemetry and logs the connection left unsent go to the on-disk outbox.
                    let unsent = outbox.lock().disconnected();
                    Event::Disconnected { unsent }
                }
                Some(ev) => {
                    core.set_backlog(outbox.len());
                    ev
                }
                None => bail!("the MQTT connection task ended unexpectedly"),
            },
            _ = tick.tick() => {
                let now = Instant::now();
                // Sampled while disconnected too: the core keeps what cannot go in the outbox.
                let telemetry = sampler.tick(now, &core.runtime().telemetry, &mut probe);
                let logs = batcher.flush(now, &core.runtime().logs);
                let housekeeping = now.duration_since(last_housekeeping) >= Duration::from_secs(60);
                if housekeeping {
                    last_housekeeping = now;
                }
                Event::Tick { telemetry, logs, housekeeping }
            }
            Some(ev) = job_rx.recv() => match ev {
                jobs::JobEvent::Progress { id, phase, percent } => Event::JobProgress { id, phase, percent },
                jobs::JobEvent::Handoff { id, handoff, ack } => {
                    // Journaled (durably) before the job is told to go on.
                    let (c, o) = off_loop(core, Event::JobHandoff { id, handoff }, false).await?;
                    (core, outs) = (c, o.0);
                    let _ = ack.send(());
                    continue;
                }
                jobs::JobEvent::Done(done) => Event::JobDone(done),
            },
            Some((unit, package, state)) = unit_rx.recv() => Event::Unit { unit, package, state },
            Some(ev) = component_rx.recv() => ev,
            Some(ev) = session_rx.recv() => Event::Session(ev),
            _ = sigterm.recv() => break false,
            _ = sigint.recv() => break false,
        };
        let job_ended = matches!(event, Event::JobDone(_));
        let (c, (o, units)) = off_loop(core, event, job_ended).await?;
        (core, outs) = (c, o);
        if let Some(now_units) = units {
            // The managed set may have changed: watch the units it has now.
            if now_units != watched {
                watched = now_units;
                outs.extend(core.retain_units(&watched));
                if let Some(sd) = &systemd {
                    if let Some(w) = watcher.take() {
                        w.abort();
                    }
                    watcher = Some(spawn_unit_watcher(sd.clone(), watched.clone(), unit_tx.clone()));
                }
            }
        }
    };
    // Sessions end with the agent (their operations are recorded as interrupted at the next start).
    sessions.kill_all();
    if restart {
        tracing::info!("restarting at the operator's request");
    } else {
        tracing::info!("stopping");
    }
    if connected {
        ctx.perform(vec![core.offline()], true);
        // What was recorded (the restart's own result, the offline status) goes out first.
        let drained = async {
            loop {
                let notified = outbox.drained.notified();
                if outbox.len() == 0 {
                    break;
                }
                notified.await;
            }
        };
        // Only a clean DISCONNECT makes the broker drop the last will: send it only once the
        // offline status is on its way. Otherwise the will says `lost`, which is then true.
        if tokio::time::timeout(Duration::from_secs(2), drained).await.is_ok() {
            let client = client_rx.borrow().clone();
            let _ = tokio::time::timeout(Duration::from_secs(1), client.disconnect()).await;
            // Everything was handed over: a kept session holds what the link remembers.
            link.save_facts();
        } else {
            tracing::warn!("the outbox did not drain in time; leaving the broker to publish the last will");
        }
    }
    link.save_now();
    sender.abort();
    shutdown.cancel();
    // The driver flushes what was queued (the offline status) for at most 1.5 s, then ends.
    let _ = tokio::time::timeout(Duration::from_secs(2), driver).await;
    Ok(())
}

/// Runs the core on the blocking pool's thread, not the runtime's: its disk work (journal
/// flushes, dpkg's database, the configuration file) must not hold up the task that keeps the
/// connection alive (keepalives, reading the socket), which the runtime goes on polling while
/// this awaits. With `units`, also reads the managed units afterwards (dpkg's file lists).
async fn off_loop(
    mut core: Core,
    event: Event,
    units: bool,
) -> Result<(Core, (Vec<Out>, Option<Vec<(String, String)>>))> {
    tokio::task::spawn_blocking(move || {
        let outs = core.handle(event, time::now_unix_ms());
        let units = units.then(|| core.managed_units());
        (core, (outs, units))
    })
    .await
    .context("the core's thread")
}

/// Where the core's actions go.
struct Perform<'a> {
    sessions: &'a Arc<remote::Sessions>,
    outbox: &'a outbox::Outbox,
    job_ctx: &'a Arc<jobs::JobContext>,
    job_tx: &'a mpsc::Sender<jobs::JobEvent>,
    settings: &'a tokio::sync::watch::Sender<connection::Settings>,
    link: &'a link::Link,
    components: &'a components::Registry,
}

impl Perform<'_> {
    /// Carries out the core's actions: broker requests into the outbox (the sender task hands
    /// them to the client), jobs started on their own task, new connection settings to the
    /// connection task. Returns true when the agent should stop for a restart.
    fn perform(&self, outs: Vec<Out>, connected: bool) -> bool {
        let mut restart = false;
        let mut queued = false;
        {
            let mut q = self.outbox.lock();
            let dropped = q.dropped;
            for out in outs {
                match q.push(out, connected) {
                    None => queued = true,
                    Some(Out::Restart) => restart = true,
                    Some(Out::Cancel(id)) => self.job_ctx.cancel(id),
                    Some(Out::Job(job)) => {
                        tokio::spawn(jobs::run(job, self.job_ctx.clone(), self.job_tx.clone()));
                    }
                    Some(Out::Relink(s)) => {
                        let _ = self.settings.send(s);
                    }
                    Some(Out::Component { conn, frame, close }) => self.components.send(conn, frame, close),
                    Some(Out::Session(order)) => self.sessions.order(order),
                    Some(_) => {}
                }
            }
            self.link.dropped(q.dropped - dropped);
        }
        if queued {
            self.outbox.wake.notify_one();
        }
        restart
    }
}

/// Follows the managed units' states through systemd's signals and hands them to the core.
fn spawn_unit_watcher(
    sd: Arc<debfleet_systemd::Systemd>,
    units: Vec<(String, String)>,
    tx: mpsc::Sender<(String, String, debfleet_systemd::UnitState)>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        use futures_util::StreamExt;
        if units.is_empty() {
            return;
        }
        let names: Vec<String> = units.iter().map(|(u, _)| u.clone()).collect();
        match sd.watch(&names).await {
            Ok(mut states) => {
                while let Some(state) = states.next().await {
                    let package =
                        units.iter().find(|(u, _)| *u == state.name).map(|(_, p)| p.clone()).unwrap_or_default();
                    if tx.send((state.name.clone(), package, state)).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => tracing::warn!("cannot watch units: {e}"),
        }
    })
}
