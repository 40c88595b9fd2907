//! Commands as they arrive on `.../cmd/VERB`: size check, JSON, id, verb, arguments. Parsing is
//! total: any byte string yields either a command or a rejection with an error code.

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::ids::OpId;
use crate::limits::MAX_COMMAND_BYTES;
use crate::payloads::ErrorCode;

/// The verbs this contract version defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Ping,
    Refresh,
    Restart,
    Cfg,
    Clear,
}

impl Verb {
    pub const ALL: [Verb; 5] = [Verb::Ping, Verb::Refresh, Verb::Restart, Verb::Cfg, Verb::Clear];

    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Ping => "ping",
            Verb::Refresh => "refresh",
            Verb::Restart => "restart",
            Verb::Cfg => "cfg",
            Verb::Clear => "clear",
        }
    }

    pub fn from_name(name: &str) -> Option<Verb> {
        Verb::ALL.into_iter().find(|v| v.as_str() == name)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum CommandArgs {
    Ping,
    Refresh,
    /// Restart the agent itself, or a managed unit when `unit` is given.
    Restart {
        unit: Option<String>,
    },
    /// A partial configuration update (see [`crate::RuntimeCfg::apply_patch`]).
    Cfg {
        set: Value,
    },
    /// Forget finished operations: the listed ids, or those finished more than `older_than_s`
    /// seconds ago, or all finished ones when neither is given.
    Clear {
        ops: Vec<OpId>,
        older_than_s: Option<u64>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub id: OpId,
    pub verb: Verb,
    pub args: CommandArgs,
}

/// Why a command was not accepted. With an `id` the failure is reported on that operation's
/// topic; without one, on the device's `rejected` topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub id: Option<OpId>,
    pub code: ErrorCode,
    pub message: String,
}

fn reject(id: Option<OpId>, code: ErrorCode, message: impl Into<String>) -> Rejection {
    Rejection { id, code, message: message.into() }
}

#[derive(Deserialize)]
struct RestartArgs {
    #[serde(default)]
    unit: Option<String>,
}

#[derive(Deserialize)]
struct CfgArgs {
    set: Map<String, Value>,
}

#[derive(Deserialize)]
struct ClearArgs {
    #[serde(default)]
    ops: Vec<OpId>,
    #[serde(default)]
    older_than_s: Option<u64>,
}

pub fn parse_command(verb: &str, payload: &[u8]) -> Result<Command, Rejection> {
    if payload.len() > MAX_COMMAND_BYTES {
        return Err(reject(
            None,
            ErrorCode::PayloadTooLarge,
            format!("command is {} bytes; the limit is {MAX_COMMAND_BYTES}", payload.len()),
        ));
    }
    let object: Map<String, Value> = match serde_json::from_slice(payload) {
        Ok(Value::Object(o)) => o,
        Ok(other) => {
            return Err(reject(
                None,
                ErrorCode::MalformedJson,
                format!("expected a JSON object, got {}", type_name(&other)),
            ))
        }
        Err(e) => return Err(reject(None, ErrorCode::MalformedJson, format!("not JSON: {e}"))),
    };
    let id = match object.get("id") {
        Some(Value::String(s)) => {
            OpId::new(s.as_str()).map_err(|e| reject(None, ErrorCode::InvalidId, e.to_string()))?
        }
        Some(other) => {
            return Err(reject(None, ErrorCode::InvalidId, format!("id must be a string, got {}", type_name(other))))
        }
        None => return Err(reject(None, ErrorCode::MissingId, "the command has no \"id\"")),
    };
    let Some(verb) = Verb::from_name(verb) else {
        return Err(reject(Some(id), ErrorCode::UnknownVerb, format!("unknown verb {verb:?}")));
    };
    let args = parse_args(verb, Value::Object(object))
        .map_err(|e| reject(Some(id.clone()), ErrorCode::InvalidValue, format!("{}: {e}", verb.as_str())))?;
    Ok(Command { id, verb, args })
}

fn parse_args(verb: Verb, v: Value) -> Result<CommandArgs, serde_json::Error> {
    Ok(match verb {
        Verb::Ping => CommandArgs::Ping,
        Verb::Refresh => CommandArgs::Refresh,
        Verb::Restart => CommandArgs::Restart { unit: serde_json::from_value::<RestartArgs>(v)?.unit },
        Verb::Cfg => CommandArgs::Cfg { set: Value::Object(serde_json::from_value::<CfgArgs>(v)?.set) },
        Verb::Clear => {
            let a: ClearArgs = serde_json::from_value(v)?;
            CommandArgs::Clear { ops: a.ops, older_than_s: a.older_than_s }
        }
    })
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn code(verb: &str, payload: &[u8]) -> ErrorCode {
        parse_command(verb, payload).unwrap_err().code
    }

    #[test]
    fn parses_known_verbs() {
        let c = parse_command("ping", br#"{"id":"p1","extra":true}"#).unwrap();
        assert_eq!((c.id.as_str(), c.verb, c.args), ("p1", Verb::Ping, CommandArgs::Ping));
        let c = parse_command("cfg", br#"{"id":"c1","set":{"logs":{"level":"debug"}}}"#).unwrap();
        assert!(matches!(c.args, CommandArgs::Cfg { .. }));
        let c = parse_command("clear", br#"{"id":"c2","older_than_s":60}"#).unwrap();
        assert_eq!(c.args, CommandArgs::Clear { ops: vec![], older_than_s: Some(60) });
    }

    #[test]
    fn bad_input_matrix() {
        assert_eq!(code("ping", b"{not json"), ErrorCode::MalformedJson);
        assert_eq!(code("ping", b"[1,2]"), ErrorCode::MalformedJson);
        assert_eq!(code("ping", b"{}"), ErrorCode::MissingId);
        assert_eq!(code("ping", br#"{"id":7}"#), ErrorCode::InvalidId);
        assert_eq!(code("ping", br#"{"id":"../etc"}"#), ErrorCode::InvalidId);
        assert_eq!(code("ping", &vec![b' '; MAX_COMMAND_BYTES + 1]), ErrorCode::PayloadTooLarge);
        let r = parse_command("launch", br#"{"id":"x1"}"#).unwrap_err();
        assert_eq!((r.code, r.id.unwrap().as_str()), (ErrorCode::UnknownVerb, "x1"));
        assert_eq!(code("cfg", br#"{"id":"x2"}"#), ErrorCode::InvalidValue);
        assert_eq!(code("clear", br#"{"id":"x3","ops":["a/b"]}"#), ErrorCode::InvalidValue);
    }

    proptest! {
        #[test]
        fn never_panics_on_bytes(verb in "[a-z]{1,8}", payload in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_command(&verb, &payload);
        }

        #[test]
        fn never_panics_on_objects(id in "\\PC{0,70}", set in "\\PC{0,30}") {
            let payload = serde_json::json!({"id": id, "set": set}).to_string();
            for verb in ["ping", "cfg", "clear", "restart", "refresh", "zap"] {
                let _ = parse_command(verb, payload.as_bytes());
            }
        }
    }
}
