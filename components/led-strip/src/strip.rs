//! The LED strip as a component: what is shown (dark, a static picture, or an effect),
//! brightness, the frame clock, and the actions.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use debfleet_component::{
    json, parse_color, ActionSpec, CallError, Component, ComponentMeta, ComponentState, Ctx, ErrorCode, Level, Map,
    ParamKind, ParamSpec, Value,
};

use crate::effects::{dim, Effect, Kind, Rgb, BLACK};
use crate::output::{history_png, Order, Output, Spi, Virtual};

/// Pixels one `frames` answer may carry (six hex digits each: within a command result's size).
const MAX_FRAME_PIXELS: usize = 8192;

#[derive(Debug, Clone, PartialEq)]
struct StripCfg {
    leds: usize,
    fps: u32,
    brightness: u8,
    output: String,
    spi_bus: u8,
    spi_slave: u8,
    order: Order,
}

impl StripCfg {
    fn from_map(cfg: &Map<String, Value>) -> Result<StripCfg, String> {
        for k in cfg.keys() {
            if !["leds", "fps", "brightness", "output", "spi_bus", "spi_slave", "order"].contains(&k.as_str()) {
                return Err(format!("unknown key {k:?}"));
            }
        }
        let int = |k: &str, min: u64, max: u64| {
            cfg.get(k)
                .and_then(Value::as_u64)
                .filter(|n| (min..=max).contains(n))
                .ok_or_else(|| format!("{k}: a whole number in {min}..={max}"))
        };
        let text = |k: &str| cfg.get(k).and_then(Value::as_str).ok_or_else(|| format!("{k}: a string"));
        let output = text("output")?.to_owned();
        if output != "virtual" && output != "spi" {
            return Err(format!("output: \"virtual\" or \"spi\", not {output:?}"));
        }
        Ok(StripCfg {
            leds: int("leds", 1, 10_000)? as usize,
            fps: int("fps", 1, 120)? as u32,
            brightness: int("brightness", 0, 100)? as u8,
            output,
            spi_bus: int("spi_bus", 0, 6)? as u8,
            spi_slave: int("spi_slave", 0, 2)? as u8,
            order: Order::parse(text("order")?).ok_or("order: grb, rgb or brg")?,
        })
    }
}

/// What the strip shows.
#[derive(Debug, Clone, PartialEq)]
enum Show {
    Dark,
    /// A picture set with `set-color` and `set-range`.
    Still(Vec<Rgb>),
    /// An effect, from when it started.
    Effect(Effect, Instant),
}

pub struct Strip {
    cfg: Option<StripCfg>,
    output: Option<Box<dyn Output>>,
    show: Show,
    /// Brightness now (the `brightness` action), the configured one until then.
    brightness: u8,
    /// The frame before brightness, and after.
    frame: Vec<Rgb>,
    dimmed: Vec<Rgb>,
    /// The effect's step last shown: a frame is drawn only when it changes.
    last_step: Option<u64>,
    dirty: bool,
    /// Frames shown in the current second, and the rate measured over the last.
    fps_count: (Instant, u32),
    fps: f64,
    runtime_dir: std::path::PathBuf,
}

impl Strip {
    pub fn new() -> Strip {
        let runtime_dir = std::env::var("RUNTIME_DIRECTORY")
            .ok()
            .and_then(|s| s.split(':').next().map(Into::into))
            .unwrap_or_else(|| std::env::temp_dir().join("debfleet-led-strip"));
        Strip {
            cfg: None,
            output: None,
            show: Show::Dark,
            brightness: 100,
            frame: Vec::new(),
            dimmed: Vec::new(),
            last_step: None,
            dirty: true,
            fps_count: (Instant::now(), 0),
            fps: 0.0,
            runtime_dir,
        }
    }

    fn leds(&self) -> usize {
        self.cfg.as_ref().map_or(0, |c| c.leds)
    }

    /// Draws the frame due at `now` and shows it, if it changed.
    fn draw(&mut self, now: Instant, ctx: &mut Ctx) {
        let leds = self.leds();
        let fps = self.cfg.as_ref().map_or(60, |c| c.fps);
        self.frame.resize(leds, BLACK);
        match &self.show {
            Show::Dark => self.frame.fill(BLACK),
            Show::Still(px) => {
                self.frame.fill(BLACK);
                for (dst, src) in self.frame.iter_mut().zip(px) {
                    *dst = *src;
                }
            }
            Show::Effect(e, started) => {
                let n = (now.duration_since(*started).as_micros() * u128::from(fps) / 1_000_000) as u64;
                let step = e.step_at(n, fps);
                if !self.dirty && self.last_step == Some(step) {
                    return;
                }
                self.last_step = Some(step);
                e.render(step, &mut self.frame);
            }
        }
        self.dirty = false;
        dim(&self.frame, self.brightness, &mut self.dimmed);
        let Some(out) = self.output.as_mut() else { return };
        match out.show(&self.dimmed) {
            Ok(()) => {
                if ctx.status() == ComponentState::Error {
                    ctx.set_status(self.running_state(), None);
                }
            }
            Err(e) => {
                ctx.set_status(ComponentState::Error, Some(e.clone()));
                ctx.log(Level::Error, e);
            }
        }
        let (since, n) = &mut self.fps_count;
        *n += 1;
        let elapsed = now.duration_since(*since);
        if elapsed >= Duration::from_secs(1) {
            self.fps = f64::from(*n) / elapsed.as_secs_f64();
            self.fps_count = (now, 0);
        }
    }

    fn running_state(&self) -> ComponentState {
        if self.show == Show::Dark {
            ComponentState::Idle
        } else {
            ComponentState::Running
        }
    }

    fn set_show(&mut self, show: Show, ctx: &mut Ctx) {
        self.show = show;
        self.last_step = None;
        self.dirty = true;
        if ctx.status() != ComponentState::Error {
            ctx.set_status(self.running_state(), None);
        }
        self.draw(Instant::now(), ctx);
    }

    /// The still picture to paint on: the current one, or a dark strip.
    fn still(&self) -> Vec<Rgb> {
        match &self.show {
            Show::Still(px) => px.clone(),
            _ => vec![BLACK; self.leds()],
        }
    }

    fn set_range(&mut self, args: &Map<String, Value>, ctx: &mut Ctx) -> Result<Value, CallError> {
        let leds = self.leds();
        let color = args.get("color").and_then(parse_color).unwrap_or(BLACK);
        let percent = args.get("unit").and_then(Value::as_str) != Some("index");
        let from = args.get("from").and_then(Value::as_f64).unwrap_or(0.0);
        let to = args.get("to").and_then(Value::as_f64).unwrap_or(if percent { 100.0 } else { (leds - 1) as f64 });
        if from > to {
            return Err(CallError::invalid(format!("set-range: from {from} is after to {to}")));
        }
        let (a, b) = if percent {
            if to > 100.0 {
                return Err(CallError::invalid(format!("set-range: to {to} % is past the end (100)")));
            }
            // Percent of the strip: 0-100 covers every LED; a range always lights at least one.
            let first = ((from / 100.0) * leds as f64).floor() as usize;
            let last = (((to / 100.0) * leds as f64).ceil() as usize).max(first + 1);
            (first.min(leds - 1), last.min(leds) - 1)
        } else {
            if from.fract() != 0.0 || to.fract() != 0.0 {
                return Err(CallError::invalid("set-range: indices are whole numbers"));
            }
            if to as usize >= leds {
                return Err(CallError::invalid(format!(
                    "set-range: index {to} is past the strip's end ({leds} LEDs, 0-{})",
                    leds - 1
                )));
            }
            (from as usize, to as usize)
        };
        let mut px = self.still();
        px.resize(leds, BLACK);
        for p in &mut px[a..=b] {
            *p = color;
        }
        self.set_show(Show::Still(px), ctx);
        Ok(json!({"first": a, "last": b}))
    }

    fn frames(&self, args: &Map<String, Value>) -> Result<Value, CallError> {
        let count = args.get("count").and_then(Value::as_u64).unwrap_or(1) as usize;
        let leds = self.leds().max(1);
        if count * leds > MAX_FRAME_PIXELS {
            return Err(CallError::invalid(format!(
                "frames: {count} frames of {leds} LEDs is over {MAX_FRAME_PIXELS} pixels; ask for at most {}",
                (MAX_FRAME_PIXELS / leds).max(1)
            )));
        }
        let hex = |f: &[Rgb]| f.iter().map(|c| format!("{:02x}{:02x}{:02x}", c[0], c[1], c[2])).collect::<String>();
        let out = self.output.as_ref().ok_or_else(|| CallError::unavailable("no output"))?;
        let (frames, shown) = match out.history() {
            Some(h) => (h.frames.iter().skip(h.frames.len().saturating_sub(count)).map(|f| hex(f)).collect(), h.shown),
            // Hardware keeps no history: the frame last sent is what the strip shows.
            None => (vec![hex(&self.dimmed)], 0),
        };
        Ok(json!({"leds": self.leds(), "shown": shown, "frames": frames}))
    }

    /// The virtual strip's last frames as a PNG in the runtime directory.
    fn snapshot(&self) -> Result<Value, CallError> {
        let h =
            self.output.as_ref().and_then(|o| o.history()).ok_or_else(|| {
                CallError::new(ErrorCode::NotSupported, "snapshot: only the virtual output keeps frames")
            })?;
        let png = history_png(h);
        let path = self.runtime_dir.join("strip.png");
        std::fs::create_dir_all(&self.runtime_dir)
            .and_then(|()| std::fs::write(&path, &png))
            .map_err(|e| CallError::new(ErrorCode::Internal, format!("writing {}: {e}", path.display())))?;
        Ok(json!({"png": path.display().to_string(), "bytes": png.len(), "frames": h.frames.len()}))
    }
}

impl Default for Strip {
    fn default() -> Self {
        Strip::new()
    }
}

impl Component for Strip {
    fn meta(&self) -> ComponentMeta {
        let mut actions = vec![
            ActionSpec::new("clear", "all LEDs off (an effect stops)", vec![]),
            ActionSpec::new(
                "set-color",
                "the whole strip in one colour",
                vec![ParamSpec::required("color", ParamKind::Color, "\"#rrggbb\" or [r, g, b]")],
            ),
            ActionSpec::new(
                "set-range",
                "LEDs from..to (inclusive) in one colour, the rest as they are",
                vec![
                    ParamSpec::required("color", ParamKind::Color, "\"#rrggbb\" or [r, g, b]"),
                    ParamSpec::optional("from", ParamKind::Number { min: 0.0, max: 100_000.0 }, "first (default 0)"),
                    ParamSpec::optional("to", ParamKind::Number { min: 0.0, max: 100_000.0 }, "last (default the end)"),
                    ParamSpec::optional(
                        "unit",
                        ParamKind::Choice { values: vec!["percent".into(), "index".into()] },
                        "percent (default) or index",
                    ),
                ],
            ),
            ActionSpec::new(
                "brightness",
                "brightness now, 0-100 (the cfg key sets it at start)",
                vec![ParamSpec::required("level", ParamKind::Int { min: 0, max: 100 }, "percent")],
            ),
            ActionSpec::new(
                "frames",
                "the last frames shown, as hex colours per LED",
                vec![ParamSpec::optional("count", ParamKind::Int { min: 1, max: 64 }, "frames (default 1)")],
            ),
            ActionSpec::new("snapshot", "the virtual strip's last frames as a PNG (a row a frame)", vec![]),
        ];
        actions.extend(Kind::ALL.into_iter().map(Effect::action));
        ComponentMeta {
            v: debfleet_component::CONTRACT_VERSION,
            component: "led-strip".parse().expect("a valid component id"),
            version: env!("CARGO_PKG_VERSION").into(),
            actions,
            metrics: vec!["fps".into()],
        }
    }

    fn default_cfg(&self) -> Map<String, Value> {
        let v = json!({"leds": 60, "fps": 60, "brightness": 100, "output": "virtual", "spi_bus": 0, "spi_slave": 0, "order": "grb"});
        v.as_object().cloned().unwrap_or_default()
    }

    fn configure(&mut self, cfg: &Map<String, Value>, ctx: &mut Ctx) -> Result<(), String> {
        let new = StripCfg::from_map(cfg)?;
        let reopen = self.cfg.as_ref().is_none_or(|old| {
            (old.output.as_str(), old.spi_bus, old.spi_slave, old.order)
                != (new.output.as_str(), new.spi_bus, new.spi_slave, new.order)
        });
        if reopen {
            let out: Box<dyn Output> = if new.output == "spi" {
                match Spi::open(new.spi_bus, new.spi_slave, new.order) {
                    Ok(s) => Box::new(s),
                    Err(e) => return Err(e),
                }
            } else {
                Box::new(Virtual::default())
            };
            self.output = Some(out);
        }
        let brightness_changed = self.cfg.as_ref().is_none_or(|old| old.brightness != new.brightness);
        if brightness_changed {
            self.brightness = new.brightness;
        }
        if let Show::Still(px) = &mut self.show {
            px.resize(new.leds, BLACK);
        }
        self.cfg = Some(new);
        self.dirty = true;
        self.draw(Instant::now(), ctx);
        Ok(())
    }

    fn start(&mut self, ctx: &mut Ctx) {
        ctx.set_status(ComponentState::Idle, None);
        self.dirty = true;
        self.draw(Instant::now(), ctx);
    }

    fn stop(&mut self, ctx: &mut Ctx) {
        self.show = Show::Dark;
        self.dirty = true;
        self.draw(Instant::now(), ctx);
    }

    fn call(&mut self, action: &str, args: &Map<String, Value>, ctx: &mut Ctx) -> Result<Value, CallError> {
        match action {
            "clear" => self.set_show(Show::Dark, ctx),
            "set-color" => {
                let c = args.get("color").and_then(parse_color).unwrap_or(BLACK);
                self.set_show(Show::Still(vec![c; self.leds()]), ctx);
            }
            "set-range" => return self.set_range(args, ctx),
            "brightness" => {
                self.brightness = args.get("level").and_then(Value::as_u64).unwrap_or(100).min(100) as u8;
                self.dirty = true;
                self.draw(Instant::now(), ctx);
            }
            "frames" => return self.frames(args),
            "snapshot" => return self.snapshot(),
            name => {
                let kind = Kind::from_name(name)
                    .ok_or_else(|| CallError::new(ErrorCode::UnknownAction, format!("no action {name:?}")))?;
                // A new effect replaces the running one from its first frame.
                self.set_show(Show::Effect(Effect::from_args(kind, args), Instant::now()), ctx);
            }
        }
        Ok(Value::Object(self.state()))
    }

    fn state(&self) -> Map<String, Value> {
        let mut m = Map::new();
        let (mode, effect) = match &self.show {
            Show::Dark => ("dark", None),
            Show::Still(_) => ("still", None),
            Show::Effect(e, _) => ("effect", Some(e)),
        };
        m.insert("mode".into(), mode.into());
        if let Some(e) = effect {
            m.insert("effect".into(), e.kind.name().into());
            m.insert("params".into(), e.params());
            let finished = self.last_step.is_some_and(|s| e.finished(s, self.leds()));
            m.insert("finished".into(), finished.into());
        }
        m.insert("brightness".into(), self.brightness.into());
        m.insert("leds".into(), self.leds().into());
        if let Some(o) = &self.output {
            m.insert("output".into(), o.name().into());
        }
        m
    }

    fn tick(&mut self, now: Instant, ctx: &mut Ctx) -> Option<Duration> {
        self.draw(now, ctx);
        match &self.show {
            Show::Effect(..) => {
                Some(Duration::from_micros(1_000_000 / u64::from(self.cfg.as_ref().map_or(60, |c| c.fps))))
            }
            _ => None,
        }
    }

    fn metrics(&mut self) -> BTreeMap<String, f64> {
        let fps = if matches!(self.show, Show::Effect(..)) { (self.fps * 10.0).round() / 10.0 } else { 0.0 };
        BTreeMap::from([("fps".to_owned(), fps)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn strip(leds: usize) -> (Strip, Ctx) {
        let mut s = Strip::new();
        let mut ctx = Ctx::for_tests();
        let mut cfg = s.default_cfg();
        cfg.insert("leds".into(), leds.into());
        s.configure(&cfg, &mut ctx).unwrap();
        s.start(&mut ctx);
        (s, ctx)
    }

    fn last(s: &Strip) -> Vec<Rgb> {
        s.output.as_ref().unwrap().history().unwrap().frames.back().unwrap().clone()
    }

    #[test]
    fn ranges_by_percent_and_index_paint_on_the_still_picture() {
        let (mut s, mut ctx) = strip(10);
        s.call("set-range", &args(json!({"color": "#ff0000", "from": 0, "to": 50})), &mut ctx).unwrap();
        s.call("set-range", &args(json!({"color": "#0000ff", "from": 9, "to": 9, "unit": "index"})), &mut ctx).unwrap();
        let f = last(&s);
        assert_eq!(&f[..5], &[[255, 0, 0]; 5]);
        assert_eq!(&f[5..9], &[BLACK; 4]);
        assert_eq!(f[9], [0, 0, 255]);
        for (bad, says) in [
            (json!({"color": "#ff0000", "from": 0, "to": 5000, "unit": "index"}), "past the strip's end"),
            (json!({"color": "#ff0000", "from": 0, "to": 101}), "past the end"),
            (json!({"color": "#ff0000", "from": 6, "to": 2}), "after"),
            (json!({"color": "#ff0000", "from": 1.5, "to": 2, "unit": "index"}), "whole numbers"),
        ] {
            let e = s.call("set-range", &args(bad.clone()), &mut ctx).unwrap_err();
            assert!(e.message.contains(says), "{bad}: {}", e.message);
        }
        assert_eq!(last(&s), f, "a refused range changes nothing");
    }

    #[test]
    fn an_effect_replaces_the_running_one_and_brightness_dims_it() {
        let (mut s, mut ctx) = strip(4);
        s.call("theater-chase", &args(json!({"color": "#ff0000"})), &mut ctx).unwrap();
        assert_eq!(s.state()["effect"], "theater-chase");
        let st = s.call("color-wipe", &args(json!({"color": "#00ff00", "wait_ms": 1000})), &mut ctx).unwrap();
        assert_eq!(st["effect"], "color-wipe");
        assert_eq!(st["params"]["color"], "#00ff00");
        assert_eq!(last(&s), [[0, 255, 0], BLACK, BLACK, BLACK], "the new effect's first frame");
        s.call("brightness", &args(json!({"level": 50})), &mut ctx).unwrap();
        assert_eq!(last(&s)[0], [0, 128, 0]);
        assert_eq!(s.state()["brightness"], 50);
        assert_eq!(ctx.status(), ComponentState::Running);
        s.call("clear", &Map::new(), &mut ctx).unwrap();
        assert_eq!(last(&s), [BLACK; 4]);
        assert_eq!(ctx.status(), ComponentState::Idle);
    }

    #[test]
    fn frames_are_bounded_and_snapshot_writes_a_png() {
        let (mut s, mut ctx) = strip(1000);
        s.call("set-color", &args(json!({"color": [1, 2, 3]})), &mut ctx).unwrap();
        let f = s.frames(&args(json!({"count": 8}))).unwrap();
        assert_eq!(f["frames"].as_array().unwrap().last().unwrap().as_str().unwrap(), "010203".repeat(1000));
        let e = s.frames(&args(json!({"count": 9}))).unwrap_err();
        assert!(e.message.contains("at most 8"), "{}", e.message);
        let dir = tempfile::tempdir().unwrap();
        s.runtime_dir = dir.path().to_owned();
        let snap = s.snapshot().unwrap();
        assert!(std::fs::read(dir.path().join("strip.png")).unwrap().starts_with(b"\x89PNG"), "{snap}");
    }

    #[test]
    fn cfg_is_checked_whole() {
        let (mut s, mut ctx) = strip(4);
        let mut cfg = s.default_cfg();
        for (k, v) in [
            ("leds", json!(0)),
            ("fps", json!(1000)),
            ("output", json!("hdmi")),
            ("order", json!("xyz")),
            ("colour", json!(1)),
        ] {
            let mut bad = cfg.clone();
            bad.insert(k.into(), v);
            assert!(s.configure(&bad, &mut ctx).is_err(), "{k}");
        }
        cfg.insert("brightness".into(), 20.into());
        cfg.insert("leds".into(), 8.into());
        s.configure(&cfg, &mut ctx).unwrap();
        assert_eq!(s.state()["brightness"], 20);
        assert_eq!(s.state()["leds"], 8);
    }
}
