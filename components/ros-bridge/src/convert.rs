//! ROS values to JSON and back. Outgoing: a decoded message as JSON, cut down to the selected
//! fields. Incoming: a command's JSON checked field by field against the type's definition —
//! an unknown field, a value of the wrong kind or out of its type's range is refused, naming
//! the field, before anything is encoded; a field left out takes its zero value (as
//! `rostopic pub` does).

use std::collections::HashMap;

use ros_message::{DataType, Duration, FieldCase, MessagePath, MessageValue, Msg, Time, Value};
use serde_json::{json, Map, Value as Json};

use crate::types::MsgType;

/// A decoded message as JSON. Times and durations as `{secs, nsecs}` (rostopic's names); a
/// float that JSON cannot hold (NaN, infinite) as `null`.
pub fn to_json(v: &Value) -> Json {
    match v {
        Value::Bool(b) => Json::Bool(*b),
        Value::I8(n) => json!(n),
        Value::I16(n) => json!(n),
        Value::I32(n) => json!(n),
        Value::I64(n) => json!(n),
        Value::U8(n) => json!(n),
        Value::U16(n) => json!(n),
        Value::U32(n) => json!(n),
        Value::U64(n) => json!(n),
        Value::F32(x) => serde_json::Number::from_f64(f64::from(*x)).map_or(Json::Null, Json::Number),
        Value::F64(x) => serde_json::Number::from_f64(*x).map_or(Json::Null, Json::Number),
        Value::String(s) => Json::String(s.clone()),
        Value::Time(t) => json!({"secs": t.sec, "nsecs": t.nsec}),
        Value::Duration(d) => json!({"secs": d.sec, "nsecs": d.nsec}),
        Value::Array(items) => Json::Array(items.iter().map(to_json).collect()),
        Value::Message(m) => message_to_json(m),
    }
}

pub fn message_to_json(m: &MessageValue) -> Json {
    Json::Object(m.iter().map(|(k, v)| (k.clone(), to_json(v))).collect())
}

/// A field selection: dotted paths (`pose.pose.position`, `twist.twist.linear.x`).
/// Checked once, when configured.
pub fn check_path(path: &str) -> Result<(), String> {
    let ok = !path.is_empty()
        && path.len() <= 200
        && path.split('.').all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
    if ok {
        Ok(())
    } else {
        Err(format!("{path:?} is not a field path (names separated by dots)"))
    }
}

/// Only the selected fields of `v`, nested as in the message; an empty selection keeps it
/// whole. Paths the message does not have are returned, so the caller can say so once.
pub fn select(v: &Json, fields: &[String]) -> (Json, Vec<String>) {
    if fields.is_empty() {
        return (v.clone(), Vec::new());
    }
    let mut out = Json::Object(Map::new());
    let mut missing = Vec::new();
    for path in fields {
        let mut src = v;
        let mut found = true;
        for part in path.split('.') {
            match src.get(part) {
                Some(next) => src = next,
                None => {
                    found = false;
                    break;
                }
            }
        }
        if !found {
            missing.push(path.clone());
            continue;
        }
        let mut dst = &mut out;
        let parts: Vec<&str> = path.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let Json::Object(map) = dst else { break };
            if i + 1 == parts.len() {
                map.insert((*part).to_owned(), src.clone());
                break;
            }
            dst = map.entry((*part).to_owned()).or_insert_with(|| Json::Object(Map::new()));
        }
    }
    (out, missing)
}

/// A command's JSON as a message of type `t`.
pub fn from_json(t: &MsgType, data: &Map<String, Json>) -> Result<MessageValue, String> {
    message(t, t.codec.msg(), data, "")
}

fn message(t: &MsgType, msg: &Msg, data: &Map<String, Json>, at: &str) -> Result<MessageValue, String> {
    let fields: Vec<_> = msg.fields().iter().filter(|f| !f.is_constant()).collect();
    for key in data.keys() {
        if !fields.iter().any(|f| f.name() == key) {
            let names: Vec<&str> = fields.iter().map(|f| f.name()).collect();
            return Err(format!(
                "{}: {} has no field {key:?} (it has {})",
                if at.is_empty() { "data" } else { at },
                msg.path(),
                if names.is_empty() { "none".to_owned() } else { names.join(", ") }
            ));
        }
    }
    let mut out = HashMap::new();
    for f in fields {
        let here = if at.is_empty() { f.name().to_owned() } else { format!("{at}.{}", f.name()) };
        let v = match (f.case(), data.get(f.name())) {
            (FieldCase::Unit, None) => zero(t, msg.path(), f.datatype(), &here)?,
            (FieldCase::Unit, Some(j)) => one(t, msg.path(), f.datatype(), j, &here)?,
            (FieldCase::Vector, None) => Value::Array(Vec::new()),
            (FieldCase::Array(n), None) => {
                Value::Array((0..*n).map(|_| zero(t, msg.path(), f.datatype(), &here)).collect::<Result<_, _>>()?)
            }
            (FieldCase::Vector | FieldCase::Array(_), Some(j)) => {
                let Json::Array(items) = j else {
                    return Err(format!("{here}: expected an array, got {}", kind(j)));
                };
                if let FieldCase::Array(n) = f.case() {
                    if items.len() != *n {
                        return Err(format!("{here}: expected {n} items, got {}", items.len()));
                    }
                }
                let items = items
                    .iter()
                    .enumerate()
                    .map(|(i, j)| one(t, msg.path(), f.datatype(), j, &format!("{here}[{i}]")))
                    .collect::<Result<_, _>>()?;
                Value::Array(items)
            }
            (FieldCase::Const(_), _) => continue,
        };
        out.insert(f.name().to_owned(), v);
    }
    Ok(out)
}

fn nested<'a>(t: &'a MsgType, parent: &MessagePath, dt: &DataType, at: &str) -> Result<&'a Msg, String> {
    let path = match dt {
        DataType::LocalMessage(name) => parent.peer(name.as_str()),
        DataType::GlobalMessage(p) => p.clone(),
        _ => return Err(format!("{at}: not a message")),
    };
    if &path == t.codec.msg().path() {
        return Ok(t.codec.msg());
    }
    t.codec.dependency(&path).ok_or_else(|| format!("{at}: no definition of {path}"))
}

fn zero(t: &MsgType, parent: &MessagePath, dt: &DataType, at: &str) -> Result<Value, String> {
    Ok(match dt {
        DataType::Bool => Value::Bool(false),
        DataType::I8(_) => Value::I8(0),
        DataType::I16 => Value::I16(0),
        DataType::I32 => Value::I32(0),
        DataType::I64 => Value::I64(0),
        DataType::U8(_) => Value::U8(0),
        DataType::U16 => Value::U16(0),
        DataType::U32 => Value::U32(0),
        DataType::U64 => Value::U64(0),
        DataType::F32 => Value::F32(0.0),
        DataType::F64 => Value::F64(0.0),
        DataType::String => Value::String(String::new()),
        DataType::Time => Value::Time(Time { sec: 0, nsec: 0 }),
        DataType::Duration => Value::Duration(Duration { sec: 0, nsec: 0 }),
        DataType::LocalMessage(_) | DataType::GlobalMessage(_) => {
            let m = nested(t, parent, dt, at)?;
            Value::Message(message(t, m, &Map::new(), at)?)
        }
    })
}

fn one(t: &MsgType, parent: &MessagePath, dt: &DataType, j: &Json, at: &str) -> Result<Value, String> {
    fn int<T: TryFrom<i64> + TryFrom<u64>>(j: &Json, at: &str, ty: &str) -> Result<T, String> {
        let n = match j {
            Json::Number(n) => n,
            _ => return Err(format!("{at}: expected an integer ({ty}), got {}", kind(j))),
        };
        let v = if let Some(i) = n.as_i64() {
            T::try_from(i).ok()
        } else if let Some(u) = n.as_u64() {
            T::try_from(u).ok()
        } else {
            return Err(format!("{at}: expected an integer ({ty}), got {n}"));
        };
        v.ok_or_else(|| format!("{at}: {n} does not fit in {ty}"))
    }
    fn float(j: &Json, at: &str) -> Result<f64, String> {
        j.as_f64().ok_or_else(|| format!("{at}: expected a number, got {}", kind(j)))
    }
    fn stamp(j: &Json, at: &str) -> Result<(i64, i64), String> {
        let Json::Object(m) = j else { return Err(format!("{at}: expected {{secs, nsecs}}, got {}", kind(j))) };
        if let Some(k) = m.keys().find(|k| *k != "secs" && *k != "nsecs") {
            return Err(format!("{at}: no field {k:?} (it has secs, nsecs)"));
        }
        let get =
            |k: &str| m.get(k).map_or(Ok(0), |v| v.as_i64().ok_or_else(|| format!("{at}.{k}: expected an integer")));
        Ok((get("secs")?, get("nsecs")?))
    }
    Ok(match dt {
        DataType::Bool => {
            Value::Bool(j.as_bool().ok_or_else(|| format!("{at}: expected true or false, got {}", kind(j)))?)
        }
        DataType::I8(_) => Value::I8(int(j, at, "int8")?),
        DataType::I16 => Value::I16(int(j, at, "int16")?),
        DataType::I32 => Value::I32(int(j, at, "int32")?),
        DataType::I64 => Value::I64(int(j, at, "int64")?),
        DataType::U8(_) => Value::U8(int(j, at, "uint8")?),
        DataType::U16 => Value::U16(int(j, at, "uint16")?),
        DataType::U32 => Value::U32(int(j, at, "uint32")?),
        DataType::U64 => Value::U64(int(j, at, "uint64")?),
        DataType::F32 => {
            let x = float(j, at)?;
            if x.is_finite() && x.abs() > f64::from(f32::MAX) {
                return Err(format!("{at}: {x} does not fit in float32"));
            }
            Value::F32(x as f32)
        }
        DataType::F64 => Value::F64(float(j, at)?),
        DataType::String => {
            Value::String(j.as_str().ok_or_else(|| format!("{at}: expected a string, got {}", kind(j)))?.to_owned())
        }
        DataType::Time => {
            let (s, n) = stamp(j, at)?;
            let (sec, nsec) = (u32::try_from(s), u32::try_from(n));
            match (sec, nsec) {
                (Ok(sec), Ok(nsec)) if nsec < 1_000_000_000 => Value::Time(Time { sec, nsec }),
                _ => return Err(format!("{at}: not a time (secs >= 0, nsecs in 0..1e9)")),
            }
        }
        DataType::Duration => {
            let (s, n) = stamp(j, at)?;
            match (i32::try_from(s), i32::try_from(n)) {
                (Ok(sec), Ok(nsec)) => Value::Duration(Duration { sec, nsec }),
                _ => return Err(format!("{at}: not a duration")),
            }
        }
        DataType::LocalMessage(_) | DataType::GlobalMessage(_) => {
            let m = nested(t, parent, dt, at)?;
            let Json::Object(obj) = j else {
                return Err(format!("{at}: expected an object ({}), got {}", m.path(), kind(j)));
            };
            Value::Message(message(t, m, obj, at)?)
        }
    })
}

fn kind(j: &Json) -> &'static str {
    match j {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Registry;

    fn obj(v: Json) -> Map<String, Json> {
        match v {
            Json::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn a_twist_round_trips_through_the_wire_format() {
        let mut r = Registry::new(Vec::new());
        let t = r.get("geometry_msgs/Twist").unwrap();
        let m = from_json(&t, &obj(json!({"linear": {"x": 0.5}, "angular": {"z": -1}}))).unwrap();
        let mut bytes = Vec::new();
        t.codec.encode(&m, &mut bytes).unwrap();
        assert_eq!(bytes.len(), 48, "six float64s");
        let back = message_to_json(&t.codec.decode(std::io::Cursor::new(bytes)).unwrap());
        assert_eq!(back, json!({"linear": {"x": 0.5, "y": 0.0, "z": 0.0}, "angular": {"x": 0.0, "y": 0.0, "z": -1.0}}));
    }

    #[test]
    fn wrong_fields_and_values_are_named() {
        let mut r = Registry::new(Vec::new());
        let twist = r.get("geometry_msgs/Twist").unwrap();
        let bat = r.get("sensor_msgs/BatteryState").unwrap();
        let odom = r.get("nav_msgs/Odometry").unwrap();
        for (t, data, says) in [
            (&twist, json!({"linear": {"x": 1}, "speed": 2}), "geometry_msgs/Twist has no field \"speed\""),
            (&twist, json!({"linear": {"w": 1}}), "linear: geometry_msgs/Vector3 has no field \"w\""),
            (&twist, json!({"linear": {"x": "fast"}}), "linear.x: expected a number, got a string"),
            (&twist, json!({"linear": 3}), "linear: expected an object (geometry_msgs/Vector3)"),
            (&bat, json!({"power_supply_status": 300}), "power_supply_status: 300 does not fit in uint8"),
            (&bat, json!({"present": 1}), "present: expected true or false"),
            (&bat, json!({"cell_voltage": 3.7}), "cell_voltage: expected an array"),
            (&bat, json!({"cell_voltage": [3.7, "x"]}), "cell_voltage[1]: expected a number"),
            (&odom, json!({"pose": {"covariance": [0.0]}}), "pose.covariance: expected 36 items, got 1"),
            (&odom, json!({"header": {"stamp": {"secs": -1}}}), "header.stamp: not a time"),
        ] {
            let e = from_json(t, &obj(data.clone())).unwrap_err();
            assert!(e.contains(says), "{data}: {e}");
        }
        // Constants are not fields; the header and arrays take their zero values.
        let m = from_json(&bat, &obj(json!({"voltage": 12.5, "cell_voltage": [4.1, 4.2, 4.2]}))).unwrap();
        let mut bytes = Vec::new();
        bat.codec.encode(&m, &mut bytes).unwrap();
        let back = message_to_json(&bat.codec.decode(std::io::Cursor::new(bytes)).unwrap());
        assert_eq!(back["voltage"], 12.5);
        assert_eq!(back["cell_voltage"].as_array().unwrap().len(), 3);
        assert_eq!(back["header"]["stamp"], json!({"secs": 0, "nsecs": 0}));
    }

    #[test]
    fn selections_keep_the_nesting_and_name_what_is_missing() {
        let v = json!({"pose": {"pose": {"position": {"x": 1, "y": 2}, "orientation": {"w": 1}}}, "data": [1, 2, 3]});
        let (s, missing) =
            select(&v, &["pose.pose.position.x".into(), "pose.pose.orientation".into(), "twist.linear".into()]);
        assert_eq!(s, json!({"pose": {"pose": {"position": {"x": 1}, "orientation": {"w": 1}}}}));
        assert_eq!(missing, vec!["twist.linear".to_owned()]);
        assert_eq!(select(&v, &[]).0, v);
        assert!(check_path("a.b_c.d1").is_ok());
        for bad in ["", "a..b", ".a", "a b", "a/b"] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
    }
}
