//! Components: what they publish (through the agent, under `device/ID/components/CID/`), the
//! devices' list of them (`state/components`), and the frames a component and the agent
//! exchange on the agent's local socket. A component never talks to the broker: the agent
//! names its topics, carries its traffic on the one connection, and runs the `call`
//! command's lifecycle for it (see docs/contract.md, "Components").

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::ids::{ActionName, ComponentId, DeviceId, OpId};
use crate::payloads::{LogBatch, OpError};

/// Where the agent listens for its components (a Unix stream socket, group `debfleet`).
pub const SOCKET_PATH: &str = "/run/debfleet/agent.sock";

/// The largest frame either side sends or accepts (its 4-byte length prefix not counted): a
/// component's retained fact must fit the broker's limits like the device's own.
pub const MAX_FRAME_BYTES: usize = crate::limits::MAX_STATE_BYTES;

/// A component's lifecycle state, in its retained `status`. `stopped` is what the agent
/// reports when the component's connection ends (it crashed, or its unit stopped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComponentState {
    /// Started, nothing running (an LED strip that is dark).
    Idle,
    /// Doing its work (an effect playing, a projector connected).
    Running,
    /// It cannot do its work; `message` says why (a missing serial port).
    Error,
    /// Not connected to the agent.
    Stopped,
}

impl ComponentState {
    pub fn as_str(self) -> &'static str {
        match self {
            ComponentState::Idle => "idle",
            ComponentState::Running => "running",
            ComponentState::Error => "error",
            ComponentState::Stopped => "stopped",
        }
    }
}

/// `device/ID/components/CID/status` (retained).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentStatus {
    pub v: u32,
    pub state: ComponentState,
    /// When it entered this state.
    pub since: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The type of one action parameter: what the component's runtime checks before the
/// component sees a call, and what a console shows as help. (Externally tagged, like every
/// enum here: serde's internally tagged and flattened forms cost the agent code size.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamKind {
    /// A whole number in `[min, max]`.
    Int {
        min: i64,
        max: i64,
    },
    /// A number in `[min, max]`.
    Number {
        min: f64,
        max: f64,
    },
    Bool,
    /// `#rrggbb`, or `[r, g, b]` with each in 0..=255.
    Color,
    /// A string of at most `max_len` characters.
    Text {
        max_len: u32,
    },
    /// One of the listed words.
    Choice {
        values: Vec<String>,
    },
    /// A JSON object of at most `max_bytes` bytes (serialised), whose contents the component
    /// checks itself (a ROS message's fields against its definition).
    Object {
        max_bytes: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamSpec {
    pub name: String,
    pub kind: ParamKind,
    /// Absent parameters take the component's default; a required one must be given.
    #[serde(default, skip_serializing_if = "is_false")]
    pub required: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub help: String,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionSpec {
    pub name: ActionName,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub help: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub params: Vec<ParamSpec>,
}

/// `device/ID/components/CID/meta` (retained): what the component is and what it can do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentMeta {
    pub v: u32,
    pub component: ComponentId,
    pub version: String,
    pub actions: Vec<ActionSpec>,
    /// The metrics its telemetry carries (each gated by its cfg's `telemetry.METRIC`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<String>,
}

impl ComponentMeta {
    pub fn action(&self, name: &str) -> Option<&ActionSpec> {
        self.actions.iter().find(|a| a.name.as_str() == name)
    }
}

/// `device/ID/components/CID/state` (retained): what the component reports of its work, in its
/// own words.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentStateMessage {
    pub v: u32,
    pub ts: String,
    pub state: Map<String, Value>,
}

/// `device/ID/components/CID/cfg` (retained): the component's whole configuration in force
/// (its own keys, `logs`, `telemetry`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentCfgMessage {
    pub v: u32,
    pub cfg: Map<String, Value>,
}

/// `device/ID/components/CID/telemetry` (retained, QoS 0): the latest value of each metric.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentTelemetry {
    pub v: u32,
    pub ts: String,
    pub metrics: BTreeMap<String, f64>,
}

/// `device/ID/components/CID/stream` (not retained, QoS 0): one sample of one of the
/// component's named streams, such as a ROS topic forwarded by the bridge. The component
/// decides what a sample holds (fields selected, rate limited); the agent only forwards it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentStream {
    pub v: u32,
    pub ts: String,
    /// The stream's name, as the component's configuration names it.
    pub stream: String,
    pub value: Value,
}

/// One entry of the device's `state/components`: an installed component as the package
/// database and the agent's socket know it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentEntry {
    pub package: String,
    pub version: String,
    /// Its systemd unit.
    pub unit: String,
    /// The state it last reported; `stopped` while it is not connected.
    pub state: ComponentState,
    /// How often the unit started again since the agent started (a crash and systemd's
    /// restart, or an operator's restart).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub restarts: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// `device/ID/state/components` (retained): the components installed on the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentsState {
    pub v: u32,
    pub components: BTreeMap<ComponentId, ComponentEntry>,
}

/// What a component answers to one call: a result value, or an error with a code from the
/// same list as device commands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallResult {
    Ok(Value),
    Err(OpError),
}

/// Component → agent, one frame each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Up {
    /// The first frame: who it is and what it can do. The agent answers `welcome` or `bye`.
    Hello {
        meta: ComponentMeta,
    },
    Status {
        status: ComponentStatus,
    },
    /// Its state (component-defined JSON object), retained.
    State {
        state: Map<String, Value>,
    },
    /// Its configuration as it now applies, retained.
    Cfg {
        cfg: Map<String, Value>,
    },
    Telemetry {
        telemetry: ComponentTelemetry,
    },
    Stream {
        sample: ComponentStream,
    },
    Logs {
        logs: LogBatch,
    },
    /// The answer to `call` `id`.
    Result {
        id: OpId,
        result: CallResult,
    },
}

/// Agent → component, one frame each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Down {
    Welcome {
        device: DeviceId,
    },
    /// Run `action` (arguments not yet checked against the action's parameters: the
    /// component's runtime does that) and answer with `result` for `id`.
    Call {
        id: OpId,
        action: ActionName,
        args: Map<String, Value>,
    },
    /// The agent refuses the connection (a second connection for the same id, a bad hello)
    /// and closes it.
    Bye {
        reason: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes; the limit is {MAX_FRAME_BYTES}")]
    TooLarge(usize),
    #[error("bad frame: {0}")]
    Json(#[from] serde_json::Error),
}

/// A frame on the socket: its length (4 bytes, big-endian), then its JSON.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let json = serde_json::to_vec(msg)?;
    if json.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(json.len()));
    }
    let mut out = Vec::with_capacity(json.len() + 4);
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

/// The length a frame header announces, refused before anything is read when too large.
pub fn frame_len(header: [u8; 4]) -> Result<usize, FrameError> {
    let n = u32::from_be_bytes(header) as usize;
    if n > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(n));
    }
    Ok(n)
}

pub fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    if body.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(body.len()));
    }
    Ok(serde_json::from_slice(body)?)
}

/// A colour as actions take it: `#rrggbb` or `[r, g, b]`.
pub fn parse_color(v: &Value) -> Option<[u8; 3]> {
    match v {
        Value::String(s) => {
            let hex = s.strip_prefix('#')?;
            if hex.len() != 6 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            let n = u32::from_str_radix(hex, 16).ok()?;
            Some([(n >> 16) as u8, (n >> 8) as u8, n as u8])
        }
        Value::Array(a) if a.len() == 3 => {
            let mut c = [0u8; 3];
            for (slot, x) in c.iter_mut().zip(a) {
                *slot = u8::try_from(x.as_u64()?).ok()?;
            }
            Some(c)
        }
        _ => None,
    }
}

impl ParamKind {
    /// Checks one argument; the error says what was expected.
    pub fn check(&self, v: &Value) -> Result<(), String> {
        match self {
            ParamKind::Int { min, max } => match v.as_i64() {
                Some(n) if (*min..=*max).contains(&n) => Ok(()),
                Some(n) => Err(format!("{n} is outside {min}..={max}")),
                None => Err(format!("expected a whole number in {min}..={max}, got {}", crate::command::type_name(v))),
            },
            ParamKind::Number { min, max } => match v.as_f64() {
                Some(n) if n >= *min && n <= *max => Ok(()),
                Some(n) => Err(format!("{n} is outside {min}..={max}")),
                None => Err(format!("expected a number in {min}..={max}, got {}", crate::command::type_name(v))),
            },
            ParamKind::Bool => v
                .as_bool()
                .map(|_| ())
                .ok_or_else(|| format!("expected true or false, got {}", crate::command::type_name(v))),
            ParamKind::Color => parse_color(v)
                .map(|_| ())
                .ok_or_else(|| "expected a colour: \"#rrggbb\" or [r, g, b] (0-255)".to_owned()),
            ParamKind::Text { max_len } => match v.as_str() {
                Some(s) if s.chars().count() <= *max_len as usize => Ok(()),
                Some(_) => Err(format!("longer than {max_len} characters")),
                None => Err(format!("expected a string, got {}", crate::command::type_name(v))),
            },
            ParamKind::Choice { values } => match v.as_str() {
                Some(s) if values.iter().any(|c| c == s) => Ok(()),
                _ => Err(format!("expected one of {}", values.join(", "))),
            },
            ParamKind::Object { max_bytes } => match v {
                Value::Object(_) => {
                    let n = serde_json::to_vec(v).map(|b| b.len()).unwrap_or(usize::MAX);
                    if n <= *max_bytes as usize {
                        Ok(())
                    } else {
                        Err(format!("an object of {n} bytes; at most {max_bytes}"))
                    }
                }
                _ => Err(format!("expected an object, got {}", crate::command::type_name(v))),
            },
        }
    }
}

impl ParamSpec {
    pub fn required(name: &str, kind: ParamKind, help: &str) -> ParamSpec {
        ParamSpec { name: name.into(), kind, required: true, help: help.into() }
    }

    pub fn optional(name: &str, kind: ParamKind, help: &str) -> ParamSpec {
        ParamSpec { name: name.into(), kind, required: false, help: help.into() }
    }
}

impl ActionSpec {
    /// An action written in a component's code. Panics on a name that breaks the syntax: that
    /// is a programming error, caught by the component's first test.
    pub fn new(name: &'static str, help: &str, params: Vec<ParamSpec>) -> ActionSpec {
        let name = ActionName::new(name).unwrap_or_else(|e| panic!("action {name:?}: {e}"));
        ActionSpec { name, help: help.into(), params }
    }

    /// Checks a call's arguments against the parameters: none unknown, every required one
    /// present, each of its type and range.
    pub fn check(&self, args: &Map<String, Value>) -> Result<(), String> {
        for (k, v) in args {
            let p = self.params.iter().find(|p| &p.name == k).ok_or_else(|| {
                let known: Vec<&str> = self.params.iter().map(|p| p.name.as_str()).collect();
                if known.is_empty() {
                    format!("{}: takes no arguments, got {k:?}", self.name)
                } else {
                    format!("{}: unknown argument {k:?} (it takes {})", self.name, known.join(", "))
                }
            })?;
            p.kind.check(v).map_err(|e| format!("{}: {k}: {e}", self.name))?;
        }
        if let Some(p) = self.params.iter().find(|p| p.required && !args.contains_key(&p.name)) {
            return Err(format!("{}: {} is required", self.name, p.name));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payloads::ErrorCode;
    use serde_json::json;

    fn spec() -> ActionSpec {
        ActionSpec {
            name: ActionName::new("set-color").unwrap(),
            help: String::new(),
            params: vec![
                ParamSpec { name: "color".into(), kind: ParamKind::Color, required: true, help: String::new() },
                ParamSpec {
                    name: "from".into(),
                    kind: ParamKind::Int { min: 0, max: 100 },
                    required: false,
                    help: String::new(),
                },
                ParamSpec {
                    name: "unit".into(),
                    kind: ParamKind::Choice { values: vec!["percent".into(), "index".into()] },
                    required: false,
                    help: String::new(),
                },
            ],
        }
    }

    fn args(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn arguments_are_checked_against_the_action() {
        let s = spec();
        assert!(s.check(&args(json!({"color": "#ff8000"}))).is_ok());
        assert!(s.check(&args(json!({"color": [1, 2, 3], "from": 5, "unit": "index"}))).is_ok());
        for (bad, says) in [
            (json!({}), "color is required"),
            (json!({"color": "red"}), "expected a colour"),
            (json!({"color": [1, 2, 300]}), "expected a colour"),
            (json!({"color": "#ff8000", "from": 101}), "outside 0..=100"),
            (json!({"color": "#ff8000", "from": "5"}), "got a string"),
            (json!({"color": "#ff8000", "unit": "cm"}), "expected one of"),
            (json!({"color": "#ff8000", "speed": 1}), "unknown argument \"speed\""),
        ] {
            let e = s.check(&args(bad.clone())).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn frames_round_trip_and_refuse_oversized() {
        let up = Up::Result {
            id: OpId::new("c-1").unwrap(),
            result: CallResult::Err(OpError { code: ErrorCode::InvalidValue, message: "no".into() }),
        };
        let f = encode(&up).unwrap();
        let n = frame_len(f[..4].try_into().unwrap()).unwrap();
        assert_eq!(decode::<Up>(&f[4..4 + n]).unwrap(), up);
        assert!(frame_len((MAX_FRAME_BYTES as u32 + 1).to_be_bytes()).is_err());
        let down =
            Down::Call { id: OpId::new("c-2").unwrap(), action: ActionName::new("clear").unwrap(), args: Map::new() };
        let f = encode(&down).unwrap();
        assert_eq!(decode::<Down>(&f[4..]).unwrap(), down);
        assert!(decode::<Up>(br#"{"hello":{}}"#).is_err());
        assert!(decode::<Up>(b"\xff\x00").is_err());
    }

    #[test]
    fn colours() {
        assert_eq!(parse_color(&json!("#0a0B0c")), Some([10, 11, 12]));
        assert_eq!(parse_color(&json!([255, 0, 1])), Some([255, 0, 1]));
        for bad in [json!("0a0b0c"), json!("#0a0b0"), json!([1, 2]), json!([1, 2, -1]), json!(7)] {
            assert_eq!(parse_color(&bad), None, "{bad}");
        }
    }
}
