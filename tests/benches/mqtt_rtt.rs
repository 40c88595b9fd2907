//! A command's round trip through the agent against a raw publish/reply through the same broker:
//! a client publishes `ping` on the agent's command topic and waits for the final operation
//! record; the anchor is the same client publishing to a bare responder that answers at once.
//! Alternating rounds, medians, the ratio (goal: at most 2x). Run by bench/mqtt-rtt.sh.

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use debfleet_tests::*;
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// A client with TCP_NODELAY (as every debfleet client has) and a channel of what it receives.
fn client(port: u16, name: &str, subscribe: &[&str]) -> (Client, mpsc::Receiver<(String, Vec<u8>)>) {
    let mut opts = MqttOptions::new(name, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut conn) = Client::new(opts, 64);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    conn.eventloop.set_network_options(net);
    for s in subscribe {
        client.subscribe(*s, QoS::AtLeastOnce).unwrap();
    }
    let (tx, rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel();
    let want = subscribe.len();
    thread::spawn(move || {
        let mut acks = 0;
        for ev in conn.iter() {
            match ev {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send((p.topic.clone(), p.payload.to_vec())).is_err() {
                        return;
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    acks += 1;
                    if acks == want {
                        let _ = ready_tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::ConnAck(_))) if want == 0 => {
                    let _ = ready_tx.send(());
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).expect("subscribed");
    (client, rx)
}

fn main() {
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(200);
    let m = Mosquitto::start();
    let _agent = Agent::start(AgentSpec { id: "rtt-1", port: m.port, groups: &[], extra: "" });
    let (responder, requests) = client(m.port, "bench-responder", &["bench/request"]);
    thread::spawn(move || {
        for (_, payload) in requests {
            if responder.publish("bench/reply", QoS::AtLeastOnce, false, payload).is_err() {
                return;
            }
        }
    });
    let (c, rx) =
        client(m.port, "bench-client", &["bench/reply", "debfleet/device/rtt-1/op/+", "debfleet/device/rtt-1/status"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !rx
        .recv_timeout(Duration::from_secs(30))
        .is_ok_and(|(t, p)| t.ends_with("/status") && p.windows(8).any(|w| w == b"\"online\""))
    {
        assert!(Instant::now() < deadline, "the agent did not come online");
    }
    let wait = |pred: &dyn Fn(&str, &[u8]) -> bool| loop {
        let (t, p) = rx.recv_timeout(Duration::from_secs(10)).expect("an answer within 10 s");
        if pred(&t, &p) {
            return;
        }
    };
    let (mut raw, mut agent) = (Vec::new(), Vec::new());
    for i in 0..rounds + 10 {
        let t = Instant::now();
        let nonce = format!("n-{i}");
        c.publish("bench/request", QoS::AtLeastOnce, false, nonce.clone().into_bytes()).unwrap();
        wait(&|t, p| t == "bench/reply" && p == nonce.as_bytes());
        let raw_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let id = format!("rtt-{i}");
        c.publish(
            "debfleet/device/rtt-1/cmd/ping",
            QoS::AtLeastOnce,
            false,
            format!(r#"{{"id":"{id}"}}"#).into_bytes(),
        )
        .unwrap();
        let topic = format!("debfleet/device/rtt-1/op/{id}");
        wait(&|t, p| t == topic && p.windows(11).any(|w| w == b"\"succeeded\""));
        let agent_s = t.elapsed().as_secs_f64();
        // The first rounds warm up connections and caches.
        if i >= 10 {
            raw.push(raw_s);
            agent.push(agent_s);
        }
    }
    let (r, a) = (median(raw) * 1000.0, median(agent) * 1000.0);
    println!("command round trip through Mosquitto on 127.0.0.1, medians of {rounds} alternating rounds");
    println!("{:<56} {:>8.2} ms", "raw publish -> reply (a bare responder)", r);
    println!("{:<56} {:>8.2} ms", "debfleet ping -> final operation record (the agent)", a);
    println!("ratio agent / raw: {:.2}x (goal <= 2x)", a / r);
}
