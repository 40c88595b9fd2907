//! The projector component against a simulated Optoma projector on a pseudo-terminal pair: the
//! real serial code path (serialport on a tty), acknowledged commands, a refusal, a missing
//! port, line noise, a silent projector, and an unplug and replug.

use std::time::{Duration, Instant};

use debfleet_component::{Component, ComponentState, Ctx, ErrorCode, Map, Value};
use debfleet_projector::projector::Projector;
use debfleet_projector::sim::SimProjector;
use serde_json::json;

fn args(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

fn projector(port: &std::path::Path, ctx: &mut Ctx) -> Projector {
    let mut p = Projector::new();
    let mut cfg = p.default_cfg();
    cfg.insert("port".into(), port.display().to_string().into());
    cfg.insert("timeout_ms".into(), 500.into());
    p.configure(&cfg, ctx).unwrap();
    p.start(ctx);
    p
}

/// Ticks until `f` holds (the component's loop does this every half second).
fn until(p: &mut Projector, ctx: &mut Ctx, what: &str, f: impl Fn(&Projector, &Ctx) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f(p, ctx) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {:?}", p.state());
        p.tick(Instant::now(), ctx);
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn acknowledged_commands_and_the_projectors_own_state() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("ttyUSB0");
    let sim = SimProjector::start(&link);
    let mut ctx = Ctx::for_tests();
    let mut p = projector(&link, &mut ctx);
    assert_eq!(ctx.status(), ComponentState::Running);
    // Asked on connecting: off, on HDMI 1.
    assert_eq!(p.state()["power"], "off");
    assert_eq!(p.state()["input"], "hdmi1");

    let st = p.call("power", &args(json!({"on": true})), &mut ctx).unwrap();
    assert_eq!(st["power"], "on");
    assert!(sim.get().power);
    assert_eq!(sim.get().received.last().unwrap(), "~0000 1");
    // Its unsolicited report (warming up) is picked up.
    until(&mut p, &mut ctx, "the warming report", |p, _| p.state()["power"] == "warming");

    p.call("input", &args(json!({"source": "hdmi2"})), &mut ctx).unwrap();
    assert_eq!(sim.get().input, 15);
    p.call("keystone", &args(json!({"value": -12})), &mut ctx).unwrap();
    assert_eq!(sim.get().keystone, -12);
    p.call("key", &args(json!({"name": "menu"})), &mut ctx).unwrap();
    assert_eq!(sim.get().received.last().unwrap(), "~00140 20");

    // Off: the projector refuses an aspect change, and the call says so.
    p.call("power", &args(json!({"on": false})), &mut ctx).unwrap();
    let e = p.call("aspect", &args(json!({"ratio": "4:3"})), &mut ctx).unwrap_err();
    assert_eq!(e.code, ErrorCode::NotSupported, "{}", e.message);
    assert!(p.state().get("aspect").is_none(), "a refused setting is not taken");
    p.call("refresh", &Map::new(), &mut ctx).unwrap();
    assert_eq!(p.state()["input"], "hdmi2");
}

#[test]
fn noise_silence_a_missing_port_and_an_unplugged_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("ttyUSB0");
    let mut ctx = Ctx::for_tests();

    // No port yet: disconnected, calls fail with component_unavailable, the port is looked for.
    let mut p = projector(&link, &mut ctx);
    assert_eq!(p.state()["connection"], "disconnected");
    assert_eq!(ctx.status(), ComponentState::Error);
    let e = p.call("power", &args(json!({"on": true})), &mut ctx).unwrap_err();
    assert_eq!(e.code, ErrorCode::ComponentUnavailable, "{}", e.message);
    let mut sim = SimProjector::start(&link);
    until(&mut p, &mut ctx, "the port to appear", |p, _| p.state()["connection"] == "connected");
    assert_eq!(ctx.status(), ComponentState::Running);

    // Line noise before every answer: still understood.
    sim.set(|s| s.noisy = true);
    p.call("power", &args(json!({"on": true})), &mut ctx).unwrap();
    assert!(sim.get().power);
    sim.set(|s| s.noisy = false);

    // A silent projector: the call fails with timeout, the line stays up.
    sim.set(|s| s.silent = true);
    let e = p.call("input", &args(json!({"source": "vga"})), &mut ctx).unwrap_err();
    assert_eq!(e.code, ErrorCode::Timeout, "{}", e.message);
    assert!(e.message.contains("~0012 5"), "{}", e.message);
    assert_eq!(p.state()["connection"], "connected");
    sim.set(|s| s.silent = false);
    p.call("input", &args(json!({"source": "vga"})), &mut ctx).unwrap();

    // Unplugged: noticed without a command; plugged in again: reconnected and asked again.
    sim.unplug();
    until(&mut p, &mut ctx, "the unplugging", |p, _| p.state()["connection"] == "disconnected");
    assert_eq!(ctx.status(), ComponentState::Error);
    let e = p.call("power", &args(json!({"on": false})), &mut ctx).unwrap_err();
    assert_eq!(e.code, ErrorCode::ComponentUnavailable);
    sim.plug();
    until(&mut p, &mut ctx, "the replugging", |p, _| p.state()["connection"] == "connected");
    assert_eq!(p.state()["power"], "on", "asked again after the replug");
    p.call("power", &args(json!({"on": false})), &mut ctx).unwrap();
    assert!(!sim.get().power);
    let m = p.metrics();
    assert!(m["unanswered"] >= 1.0 && m["acknowledged"] >= 4.0, "{m:?}");
}

#[test]
fn configuration_is_checked_whole() {
    let mut ctx = Ctx::for_tests();
    let mut p = Projector::new();
    let base = p.default_cfg();
    for (k, v) in [
        ("port", json!("ttyUSB0")),
        ("baud", json!(7)),
        ("dialect", json!("epson")),
        ("id", json!(100)),
        ("colour", json!(1)),
    ] {
        let mut bad = base.clone();
        bad.insert(k.into(), v);
        assert!(p.configure(&bad, &mut ctx).is_err(), "{k}");
    }
}
