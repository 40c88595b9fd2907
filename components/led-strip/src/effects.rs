//! The effects: each a pure function of its parameters and a step number, so a frame can be
//! computed for any moment (tests compare golden frames; `frames` answers ahead of time). A
//! step lasts `wait_ms`; the frame number at the strip's rate gives the step.

use debfleet_component::{json, parse_color, ActionSpec, Map, ParamKind, ParamSpec, Value};

pub type Rgb = [u8; 3];

pub const BLACK: Rgb = [0, 0, 0];

/// The effects, by their action names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Glow,
    Wave,
    ColorWipe,
    ColorFade,
    Sparkle,
    Rainbow,
    RainbowCycle,
    TheaterChase,
    Running,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Glow,
        Kind::Wave,
        Kind::ColorWipe,
        Kind::ColorFade,
        Kind::Sparkle,
        Kind::Rainbow,
        Kind::RainbowCycle,
        Kind::TheaterChase,
        Kind::Running,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Glow => "glow",
            Kind::Wave => "wave",
            Kind::ColorWipe => "color-wipe",
            Kind::ColorFade => "color-fade",
            Kind::Sparkle => "sparkle",
            Kind::Rainbow => "rainbow",
            Kind::RainbowCycle => "rainbow-cycle",
            Kind::TheaterChase => "theater-chase",
            Kind::Running => "running",
        }
    }

    pub fn from_name(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }

    fn help(self) -> &'static str {
        match self {
            Kind::Glow => "the whole strip breathes in one colour, `steps` steps a breath",
            Kind::Wave => "a sine wave of `width` LEDs travels along the strip",
            Kind::ColorWipe => "the strip fills with the colour one LED a step",
            Kind::ColorFade => "fades from `color` to `to` and back, `steps` steps each way",
            Kind::Sparkle => "`density` percent of the LEDs light at random each step",
            Kind::Rainbow => "the whole strip goes through the colour wheel",
            Kind::RainbowCycle => "the colour wheel spread along the strip, turning",
            Kind::TheaterChase => "every `width`-th LED lit, marching",
            Kind::Running => "a block of `width` LEDs runs along the strip",
        }
    }
}

/// One effect with its parameters, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Effect {
    pub kind: Kind,
    pub color: Rgb,
    pub to: Rgb,
    pub wait_ms: u32,
    pub steps: u32,
    pub width: u32,
    pub density: u32,
    /// Periods to play, then hold the last frame; 0 plays until replaced.
    pub cycles: u32,
}

impl Effect {
    /// The action of an effect, with the parameters it takes.
    pub fn action(kind: Kind) -> ActionSpec {
        let mut params =
            vec![ParamSpec::optional("wait_ms", ParamKind::Int { min: 1, max: 60_000 }, "milliseconds a step")];
        let color = ParamSpec::optional("color", ParamKind::Color, "\"#rrggbb\" or [r, g, b]");
        match kind {
            Kind::Rainbow | Kind::RainbowCycle => {}
            Kind::ColorFade => {
                params.push(color);
                params.push(ParamSpec::optional("to", ParamKind::Color, "the colour faded to (default black)"));
                params.push(ParamSpec::optional("steps", ParamKind::Int { min: 1, max: 10_000 }, "steps each way"));
            }
            Kind::Glow => {
                params.push(color);
                params.push(ParamSpec::optional("steps", ParamKind::Int { min: 2, max: 10_000 }, "steps a breath"));
            }
            Kind::Sparkle => {
                params.push(color);
                params.push(ParamSpec::optional(
                    "density",
                    ParamKind::Int { min: 1, max: 100 },
                    "percent of LEDs lit a step",
                ));
            }
            Kind::Wave | Kind::TheaterChase | Kind::Running => {
                params.push(color);
                params.push(ParamSpec::optional("width", ParamKind::Int { min: 1, max: 10_000 }, "LEDs"));
            }
            Kind::ColorWipe => params.push(color),
        }
        params.push(ParamSpec::optional(
            "cycles",
            ParamKind::Int { min: 0, max: 1_000_000 },
            "periods to play, then hold (0: until replaced)",
        ));
        ActionSpec::new(kind.name(), kind.help(), params)
    }

    /// From a call's arguments (already checked against [`Effect::action`]), over defaults.
    pub fn from_args(kind: Kind, args: &Map<String, Value>) -> Effect {
        let int =
            |k: &str, d: u32| args.get(k).and_then(Value::as_u64).map_or(d, |v| v.min(u64::from(u32::MAX)) as u32);
        let color = |k: &str, d: Rgb| args.get(k).and_then(parse_color).unwrap_or(d);
        let (wait, width) = match kind {
            Kind::Rainbow | Kind::RainbowCycle | Kind::ColorFade | Kind::Glow => (20, 1),
            Kind::TheaterChase => (50, 3),
            _ => (50, 5),
        };
        Effect {
            kind,
            color: color("color", [255, 255, 255]),
            to: color("to", BLACK),
            wait_ms: int("wait_ms", wait),
            steps: int("steps", 100),
            width: int("width", width),
            density: int("density", 10),
            cycles: int("cycles", 0),
        }
    }

    /// Its parameters as the state reports them (and as `from_args` reads them back).
    pub fn params(&self) -> Value {
        let hex = |c: Rgb| format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2]);
        let mut m = Map::new();
        m.insert("wait_ms".into(), self.wait_ms.into());
        m.insert("cycles".into(), self.cycles.into());
        match self.kind {
            Kind::Rainbow | Kind::RainbowCycle => {}
            Kind::ColorFade => {
                m.insert("color".into(), hex(self.color).into());
                m.insert("to".into(), hex(self.to).into());
                m.insert("steps".into(), self.steps.into());
            }
            Kind::Glow => {
                m.insert("color".into(), hex(self.color).into());
                m.insert("steps".into(), self.steps.into());
            }
            Kind::Sparkle => {
                m.insert("color".into(), hex(self.color).into());
                m.insert("density".into(), self.density.into());
            }
            Kind::Wave | Kind::TheaterChase | Kind::Running => {
                m.insert("color".into(), hex(self.color).into());
                m.insert("width".into(), self.width.into());
            }
            Kind::ColorWipe => {
                m.insert("color".into(), hex(self.color).into());
            }
        }
        json!(m)
    }

    /// Steps in one period on a strip of `len` LEDs.
    pub fn period(&self, len: usize) -> u64 {
        let len = len.max(1) as u64;
        match self.kind {
            Kind::Glow => self.steps.into(),
            Kind::Wave => self.width.into(),
            Kind::ColorWipe | Kind::Running => len,
            Kind::ColorFade => 2 * u64::from(self.steps),
            Kind::Sparkle => 1,
            Kind::Rainbow | Kind::RainbowCycle => 256,
            Kind::TheaterChase => self.width.into(),
        }
    }

    /// The step shown at `frame` at `fps` frames a second.
    pub fn step_at(&self, frame: u64, fps: u32) -> u64 {
        frame.saturating_mul(1000) / u64::from(fps.max(1)) / u64::from(self.wait_ms.max(1))
    }

    /// Whether the effect has played its cycles by `step` (it then holds its last frame).
    pub fn finished(&self, step: u64, len: usize) -> bool {
        self.cycles > 0 && step >= u64::from(self.cycles) * self.period(len)
    }

    /// The LEDs at `step`, into `out` (the strip's length).
    pub fn render(&self, step: u64, out: &mut [Rgb]) {
        let len = out.len();
        if len == 0 {
            return;
        }
        let step = if self.finished(step, len) { u64::from(self.cycles) * self.period(len) - 1 } else { step };
        let c = self.color;
        match self.kind {
            Kind::Glow => {
                let period = self.steps.max(2) as f64;
                let phase = (step % u64::from(self.steps.max(2))) as f64 / period;
                let k = (1.0 - (std::f64::consts::TAU * phase).cos()) / 2.0;
                out.fill(scale(c, k));
            }
            Kind::Wave => {
                let w = f64::from(self.width.max(1));
                let shift = step % u64::from(self.width.max(1));
                for (i, px) in out.iter_mut().enumerate() {
                    let x = (i as u64 + shift) as f64 / w;
                    *px = scale(c, (1.0 + (std::f64::consts::TAU * x).sin()) / 2.0);
                }
            }
            Kind::ColorWipe => {
                let lit = (step % len as u64) as usize + 1;
                for (i, px) in out.iter_mut().enumerate() {
                    *px = if i < lit { c } else { BLACK };
                }
            }
            Kind::ColorFade => {
                let n = u64::from(self.steps.max(1));
                let s = step % (2 * n);
                let k = if s <= n { s as f64 / n as f64 } else { (2 * n - s) as f64 / n as f64 };
                out.fill(mix(c, self.to, k));
            }
            Kind::Sparkle => {
                for (i, px) in out.iter_mut().enumerate() {
                    *px = if hash(step, i as u64) % 100 < u64::from(self.density) { c } else { BLACK };
                }
            }
            Kind::Rainbow => out.fill(wheel((step % 256) as u8)),
            Kind::RainbowCycle => {
                for (i, px) in out.iter_mut().enumerate() {
                    *px = wheel(((i * 256 / len) as u64 + step) as u8);
                }
            }
            Kind::TheaterChase => {
                let w = u64::from(self.width.max(1));
                for (i, px) in out.iter_mut().enumerate() {
                    *px = if (i as u64 + w - step % w).is_multiple_of(w) { c } else { BLACK };
                }
            }
            Kind::Running => {
                let head = (step % len as u64) as usize;
                out.fill(BLACK);
                for k in 0..(self.width as usize).min(len) {
                    out[(head + len - k) % len] = c;
                }
            }
        }
    }
}

fn scale(c: Rgb, k: f64) -> Rgb {
    // sin and cos at whole turns are a rounding error off 0 and ±1: cut that off first.
    let k = (k * 1e9).round() / 1e9;
    c.map(|x| (f64::from(x) * k).round().clamp(0.0, 255.0) as u8)
}

fn mix(a: Rgb, b: Rgb, k: f64) -> Rgb {
    [0, 1, 2].map(|i| (f64::from(a[i]) * (1.0 - k) + f64::from(b[i]) * k).round().clamp(0.0, 255.0) as u8)
}

/// The classic 256-step colour wheel: red → green → blue → red.
pub fn wheel(pos: u8) -> Rgb {
    let p = pos as u16;
    match p {
        0..=84 => [(255 - p * 3) as u8, (p * 3) as u8, 0],
        85..=169 => {
            let p = p - 85;
            [0, (255 - p * 3) as u8, (p * 3) as u8]
        }
        _ => {
            let p = p - 170;
            [(p * 3) as u8, 0, (255 - p * 3) as u8]
        }
    }
}

/// A fixed pseudo-random function (splitmix64) of the step and the LED: sparkle is the same
/// every time it is computed.
fn hash(step: u64, i: u64) -> u64 {
    let mut z = step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i.wrapping_add(0x6A09_E667_F3BC_C909);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Brightness (0-100) applied to a frame.
pub fn dim(frame: &[Rgb], brightness: u8, out: &mut Vec<Rgb>) {
    out.clear();
    let k = u16::from(brightness.min(100));
    out.extend(frame.iter().map(|c| c.map(|x| ((u16::from(x) * k + 50) / 100) as u8)));
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: Rgb = [255, 0, 0];
    const O: Rgb = BLACK;

    fn effect(kind: Kind, args: Value) -> Effect {
        let args = args.as_object().unwrap().clone();
        Effect::action(kind).check(&args).unwrap();
        Effect::from_args(kind, &args)
    }

    fn frame(e: &Effect, step: u64, len: usize) -> Vec<Rgb> {
        let mut out = vec![[9, 9, 9]; len];
        e.render(step, &mut out);
        out
    }

    #[test]
    fn golden_color_wipe_running_and_theater_chase() {
        let wipe = effect(Kind::ColorWipe, json!({"color": "#ff0000"}));
        assert_eq!(frame(&wipe, 0, 4), [R, O, O, O]);
        assert_eq!(frame(&wipe, 2, 4), [R, R, R, O]);
        assert_eq!(frame(&wipe, 4, 4), [R, O, O, O], "starts again");
        let run = effect(Kind::Running, json!({"color": [255, 0, 0], "width": 2}));
        assert_eq!(frame(&run, 0, 5), [R, O, O, O, R], "the tail wraps");
        assert_eq!(frame(&run, 3, 5), [O, O, R, R, O]);
        let chase = effect(Kind::TheaterChase, json!({"color": "#ff0000"}));
        assert_eq!(frame(&chase, 0, 7), [R, O, O, R, O, O, R]);
        assert_eq!(frame(&chase, 1, 7), [O, R, O, O, R, O, O]);
        assert_eq!(frame(&chase, 3, 7), frame(&chase, 0, 7));
    }

    #[test]
    fn golden_rainbows_glow_and_fade() {
        assert_eq!(wheel(0), [255, 0, 0]);
        assert_eq!(wheel(85), [0, 255, 0]);
        assert_eq!(wheel(170), [0, 0, 255]);
        assert_eq!(wheel(255), [255, 0, 0]);
        let rainbow = effect(Kind::Rainbow, json!({}));
        assert_eq!(frame(&rainbow, 85, 3), [[0, 255, 0]; 3]);
        let cycle = effect(Kind::RainbowCycle, json!({}));
        assert_eq!(frame(&cycle, 0, 3), [[255, 0, 0], [0, 255, 0], [0, 0, 255]]);
        assert_eq!(frame(&cycle, 85, 3), [[0, 255, 0], [0, 0, 255], [255, 0, 0]]);
        let glow = effect(Kind::Glow, json!({"color": "#ff0000", "steps": 4}));
        assert_eq!(frame(&glow, 0, 2), [O, O]);
        assert_eq!(frame(&glow, 1, 2), [[128, 0, 0]; 2]);
        assert_eq!(frame(&glow, 2, 2), [R, R]);
        let fade = effect(Kind::ColorFade, json!({"color": "#ff0000", "to": "#0000ff", "steps": 2}));
        assert_eq!(frame(&fade, 0, 1), [R]);
        assert_eq!(frame(&fade, 1, 1), [[128, 0, 128]]);
        assert_eq!(frame(&fade, 2, 1), [[0, 0, 255]]);
        assert_eq!(frame(&fade, 3, 1), [[128, 0, 128]]);
    }

    #[test]
    fn golden_wave_and_sparkle() {
        let wave = effect(Kind::Wave, json!({"color": "#ff0000", "width": 4}));
        assert_eq!(frame(&wave, 0, 4), [[128, 0, 0], R, [128, 0, 0], O]);
        assert_eq!(frame(&wave, 1, 4), [R, [128, 0, 0], O, [128, 0, 0]]);
        let sparkle = effect(Kind::Sparkle, json!({"color": "#ff0000", "density": 50}));
        let a = frame(&sparkle, 7, 1000);
        assert_eq!(a, frame(&sparkle, 7, 1000), "the same step is the same frame");
        assert_ne!(a, frame(&sparkle, 8, 1000));
        let lit = a.iter().filter(|c| **c == R).count();
        assert!((400..600).contains(&lit), "{lit} of 1000 lit at 50 %");
        assert!(a.iter().all(|c| *c == R || *c == O));
    }

    #[test]
    fn cycles_end_on_the_last_frame() {
        let wipe = effect(Kind::ColorWipe, json!({"color": "#ff0000", "cycles": 2}));
        assert!(!wipe.finished(7, 4));
        assert!(wipe.finished(8, 4));
        assert_eq!(frame(&wipe, 100, 4), [R; 4]);
    }

    #[test]
    fn steps_follow_the_frame_rate_and_wait() {
        let e = effect(Kind::Rainbow, json!({"wait_ms": 50}));
        assert_eq!(e.step_at(0, 60), 0);
        assert_eq!(e.step_at(59, 60), 19);
        assert_eq!(e.step_at(60, 60), 20);
        assert_eq!(e.step_at(u64::MAX, 60), u64::MAX / 60 / 50, "no overflow");
    }

    #[test]
    fn params_read_back_as_the_same_effect() {
        for kind in Kind::ALL {
            let e = effect(kind, json!({"cycles": 3, "wait_ms": 7}));
            let again = Effect::from_args(kind, e.params().as_object().unwrap());
            assert_eq!(again, e, "{}", kind.name());
        }
    }

    #[test]
    fn brightness_scales() {
        let mut out = Vec::new();
        dim(&[[255, 100, 0]], 50, &mut out);
        assert_eq!(out, [[128, 50, 0]]);
        dim(&[[255, 100, 0]], 0, &mut out);
        assert_eq!(out, [O]);
    }
}
