//! `debfleet serve`: the zero-setup services: an embedded MQTT broker (rumqttd) on a local
//! address (production fleets use Mosquitto or any MQTT 3.1.1 broker instead), and beside it the
//! rollout controller (`debfleet rollout run`) and the web console (`debfleet web`) against that
//! broker.

use std::collections::HashMap;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

use crate::web::WebOptions;

/// Runs the broker until the process ends; beside it the rollout controller and the web console
/// when `ctx` is given. A web console that cannot start stops `serve` when it was asked for
/// (`required`: an address given), else it is reported and the broker runs without it.
pub fn run(
    listen: SocketAddr,
    ctx: Option<&crate::Ctx>,
    rollouts: bool,
    web: Option<(WebOptions, bool)>,
    broker_dir: Option<&std::path::Path>,
) -> Result<()> {
    // Beyond this machine, nobody connects without a password (the embedded broker has no ACLs:
    // a fleet's broker is a Mosquitto with the ACLs `debfleet broker` writes).
    if !listen.ip().is_loopback() && broker_dir.is_none() {
        return Err(crate::cmds::usage(format!(
            "{listen} is not a loopback address: give --broker-dir DIR (debfleet broker init, add-device, add-user) \
             so that clients need a password"
        )));
    }
    // Bind once ourselves so a busy port is a clear error instead of a panic in a broker thread.
    std::net::TcpListener::bind(listen).with_context(|| format!("cannot listen on {listen}"))?;
    // serve's own clients (rollout controller, web console) sign in with a password made now.
    let internal = match broker_dir {
        Some(_) => Some(("debfleet-serve".to_owned(), crate::broker::random_password()?)),
        None => None,
    };
    let mut server = ServerSettings {
        name: "v4".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            // Below what clients accept: one oversized publish is refused here, not delivered to every
            // subscriber (whose client library would drop the connection).
            max_payload_size: debfleet_protocol::limits::BROKER_MAX_PACKET_BYTES,
            max_inflight_count: 200,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    if let Some(dir) = broker_dir {
        let passwd = crate::broker::BrokerDir::open(dir)?.passwd_path();
        let internal = internal.clone();
        // The file is read at every connect: a device enrolled while serve runs can connect.
        server.connections.set_auth_handler(move |_client, user: String, password: String| {
            let ok = internal.as_ref().is_some_and(|(u, p)| *u == user && *p == password)
                || crate::broker::read_passwd(&passwd)
                    .map(|m| m.get(&user).is_some_and(|h| crate::broker::verify(h, &password)))
                    .unwrap_or(false);
            if !ok {
                tracing::warn!("embedded broker: refused {user:?} (unknown user or wrong password)");
            }
            std::future::ready(ok)
        });
    }
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_010,
            max_outgoing_packet_count: 200,
            max_segment_size: 104_857_600,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("v4".to_owned(), server)])),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    };
    let local = ctx.map(|ctx| {
        let host = if listen.ip().is_unspecified() { "127.0.0.1".parse() } else { Ok(listen.ip()) };
        crate::Ctx {
            broker: format!("mqtt://{}", SocketAddr::new(host.unwrap_or(listen.ip()), listen.port())),
            ca_file: None,
            topics: ctx.topics.clone(),
            expires: ctx.expires,
            by: ctx.by.clone(),
            credentials: internal.clone(),
            signer: ctx.signer.clone(),
        }
    });
    if let (Some(ctx), Some((opts, required))) = (&local, web) {
        // Listening (or failing) before the broker starts, so a busy port is known at once.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        match rt.block_on(crate::web::Server::start(ctx, &opts)) {
            Ok(server) => {
                eprintln!("debfleet: web console on {}", server.describe(&opts));
                if server.no_users() {
                    eprintln!(
                        "debfleet: the web console has no users yet: debfleet web user add NAME --role admin --users {}",
                        opts.users.display()
                    );
                }
                std::thread::spawn(move || {
                    if let Err(e) = rt.block_on(server.run(std::future::pending())) {
                        eprintln!("debfleet: the web console stopped: {e:#}");
                    }
                });
            }
            Err(e) if !required => eprintln!("debfleet: no web console ({e:#}); --web-listen picks another address"),
            Err(e) => return Err(e),
        }
    }
    if let (Some(ctx), true) = (local, rollouts) {
        std::thread::spawn(move || controller(ctx));
    }
    eprintln!("debfleet: embedded MQTT broker listening on mqtt://{listen} (Ctrl-C stops)");
    let mut broker = Broker::new(config);
    broker.start().context("embedded broker")?;
    Ok(())
}

/// The rollout controller beside the embedded broker, once it takes connections; it tries again
/// if its connection is lost.
fn controller(ctx: crate::Ctx) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
    let addr = ctx.broker.trim_start_matches("mqtt://").to_owned();
    loop {
        while std::net::TcpStream::connect(&addr).is_err() {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        match rt.block_on(crate::rollout::drive(&ctx, false)) {
            // Stopped by SIGINT or SIGTERM (the controller handles them, so they no longer end
            // the process by themselves): all of `serve` stops.
            Ok(_) => std::process::exit(0),
            Err(e) => eprintln!("debfleet: the rollout controller stopped: {e:#}; starting it again"),
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}
