//! `debfleet-agent --config FILE`: the long-lived agent on every device.

mod config;
mod connection;
mod core;
mod fsutil;
mod identity;
mod journal;
mod logs;
mod telemetry;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use debfleet_protocol::time;
use rumqttc::{AsyncClient, QoS};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{filter::LevelFilter, Layer};

use crate::config::AgentConfig;
use crate::connection::NetEvent;
use crate::core::{Core, Out};

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
    let (client, eventloop) = connection::client(&cfg)?;
    let reconnect = cfg.reconnect.clone();
    let mut core = Core::new(cfg, journal, identity::Identity::read(), under_systemd, Some(gate.clone()));
    let will = core.will_builder();

    let shutdown = CancellationToken::new();
    let (net_tx, mut net_rx) = mpsc::channel(256);
    let driver = tokio::spawn(connection::drive(eventloop, net_tx, reconnect, will, shutdown.clone()));

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
    tracing::info!("debfleet-agent {} starting", env!("CARGO_PKG_VERSION"));

    let restart = loop {
        let outs = tokio::select! {
            ev = net_rx.recv() => match ev {
                Some(NetEvent::Connected { since }) => {
                    connected = true;
                    // Thresholds compare with what the broker last got; after a gap, start over.
                    sampler = telemetry::Sampler::default();
                    core.on_connected(since, time::now_unix_ms())
                }
                Some(NetEvent::Disconnected) => {
                    connected = false;
                    core.on_disconnected();
                    Vec::new()
                }
                Some(NetEvent::Message { topic, payload }) => core.on_message(&topic, &payload, time::now_unix_ms()),
                None => bail!("the MQTT connection task ended unexpectedly"),
            },
            _ = tick.tick() => {
                let now = Instant::now();
                let mut outs = Vec::new();
                if connected {
                    if let Some(t) = sampler.tick(now, &core.runtime().telemetry, &mut probe) {
                        outs.push(core.telemetry(&t));
                    }
                }
                for batch in batcher.flush(now, &core.runtime().logs) {
                    outs.push(core.logs(&batch));
                }
                if now.duration_since(last_housekeeping) >= Duration::from_secs(60) {
                    last_housekeeping = now;
                    outs.extend(core.housekeeping(time::now_unix_ms()));
                }
                outs
            }
            _ = sigterm.recv() => break false,
            _ = sigint.recv() => break false,
        };
        if perform(&client, outs, connected) {
            break true;
        }
    };
    if restart {
        tracing::info!("restarting at the operator's request");
    } else {
        tracing::info!("stopping");
    }
    if connected {
        perform(&client, vec![core.offline()], true);
        let _ = client.try_disconnect();
    }
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), driver).await;
    Ok(())
}

/// Hands actions to the MQTT client without ever waiting on it: the event loop may be busy
/// reconnecting, and everything retained is republished on the next connect anyway. Returns
/// true when the agent should stop for a restart.
fn perform(client: &AsyncClient, outs: Vec<Out>, connected: bool) -> bool {
    let mut restart = false;
    for out in outs {
        let result = match out {
            Out::Restart => {
                restart = true;
                Ok(())
            }
            _ if !connected => Ok(()),
            Out::Publish { topic, payload, retain, reliable } => {
                let qos = if reliable { QoS::AtLeastOnce } else { QoS::AtMostOnce };
                client.try_publish(topic, qos, retain, payload)
            }
            Out::Subscribe(filters) => client
                .try_subscribe_many(filters.into_iter().map(|f| rumqttc::SubscribeFilter::new(f, QoS::AtLeastOnce))),
            Out::Unsubscribe(filters) => filters.into_iter().try_for_each(|f| client.try_unsubscribe(f)),
        };
        if let Err(e) = result {
            tracing::debug!("MQTT request not queued: {e}");
        }
    }
    restart
}
