//! `journal`: a unit's journal read on demand, with `journalctl -o json` (an argument vector,
//! unit names checked by the protocol, passed as `--unit=NAME`), bounded in what is read and in
//! what goes into the operation's record (which must fit its topic).

use std::io::Read;
use std::process::{Command, Stdio};

use debfleet_protocol::{time, ErrorCode, OpError};
use serde_json::{json, Value};

/// What is read from journalctl at most, and what the entries' messages may add up to in the
/// result (the newest are kept).
const READ_LIMIT: u64 = 8 << 20;
const RESULT_BUDGET: usize = 40 * 1024;
/// A longer message is cut (and says so).
const MESSAGE_CHARS: usize = 2000;

/// journalctl for these units, the newest `lines` entries (and new ones as they come, with
/// `follow`), as JSON lines.
pub fn journalctl(units: &[String], since_s: Option<u64>, lines: u32, follow: bool) -> Command {
    let mut cmd = Command::new("journalctl");
    cmd.args(["--output=json", "--no-pager", "--quiet", "--output-fields=MESSAGE,PRIORITY,_SYSTEMD_UNIT,UNIT"]);
    cmd.arg(format!("--lines={lines}"));
    if let Some(s) = since_s {
        cmd.arg(format!("--since=-{s}s"));
    }
    if follow {
        cmd.arg("--follow");
    }
    for u in units {
        cmd.arg(format!("--unit={u}"));
    }
    cmd
}

pub fn read(units: &[String], since_s: Option<u64>, lines: u32) -> Result<Value, OpError> {
    let mut cmd = journalctl(units, since_s, lines, false);
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(|e| {
        OpError { code: ErrorCode::NotSupported, message: format!("cannot run journalctl on this device: {e}") }
    })?;
    let mut out = Vec::new();
    let read = child.stdout.take().map(|s| s.take(READ_LIMIT).read_to_end(&mut out));
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = (&mut e).take(4096).read_to_string(&mut err);
    }
    // Whatever it had left to say beyond the limit is not wanted.
    let _ = child.kill();
    let status = child.wait();
    if let Some(Err(e)) = read {
        return Err(OpError { code: ErrorCode::Internal, message: format!("reading journalctl: {e}") });
    }
    if (out.len() as u64) < READ_LIMIT && !status.as_ref().is_ok_and(|s| s.success()) {
        return Err(OpError { code: ErrorCode::Internal, message: format!("journalctl failed: {}", err.trim()) });
    }
    Ok(entries(&out, units))
}

/// The result from journalctl's JSON lines: the newest entries within the budget, oldest first.
fn entries(out: &[u8], units: &[String]) -> Value {
    let mut all: Vec<Value> = out.split(|&b| b == b'\n').filter_map(entry).collect();
    let mut used = 0;
    let mut keep = all.len();
    while keep > 0 {
        let size = all[keep - 1]["message"].as_str().map_or(0, str::len) + 64;
        if used + size > RESULT_BUDGET {
            break;
        }
        used += size;
        keep -= 1;
    }
    let dropped = keep;
    let kept = all.split_off(keep);
    json!({"units": units, "entries": kept, "dropped": dropped})
}

/// One of journalctl's JSON lines as an entry of the result (`None`: not an entry).
pub fn entry(line: &[u8]) -> Option<Value> {
    let e = serde_json::from_slice::<Value>(line).ok()?;
    let ts = e["__REALTIME_TIMESTAMP"].as_str().and_then(|t| t.parse::<i64>().ok()).map(|us| us / 1000);
    let unit = e["_SYSTEMD_UNIT"].as_str().or(e["UNIT"].as_str()).unwrap_or("");
    let priority = e["PRIORITY"].as_str().and_then(|p| p.parse::<u8>().ok());
    Some(json!({
        "ts": ts.map(time::format_unix_ms),
        "unit": unit,
        "priority": priority,
        "message": message(&e["MESSAGE"]),
    }))
}

/// MESSAGE is a string, or an array of bytes when it is not UTF-8, or absent.
fn message(v: &Value) -> String {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Array(bytes) => {
            let b: Vec<u8> = bytes.iter().filter_map(|x| x.as_u64().map(|n| n as u8)).collect();
            String::from_utf8_lossy(&b).into_owned()
        }
        _ => String::new(),
    };
    match text.char_indices().nth(MESSAGE_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_bounded_newest_kept() {
        let line = |i: usize, msg: &str| {
            format!(
                r#"{{"__REALTIME_TIMESTAMP":"{}","_SYSTEMD_UNIT":"a.service","PRIORITY":"6","MESSAGE":"{msg} {i}"}}"#,
                1_700_000_000_000_000u64 + i as u64 * 1000
            )
        };
        let out: String = (0..3).map(|i| line(i, "hello") + "\n").collect();
        let v = entries(out.as_bytes(), &["a.service".into()]);
        assert_eq!(v["entries"].as_array().unwrap().len(), 3);
        assert_eq!(v["entries"][0]["message"], "hello 0");
        assert_eq!(v["entries"][2]["ts"], "2023-11-14T22:13:20.002Z");
        assert_eq!(v["entries"][0]["priority"], 6);
        assert_eq!(v["dropped"], 0);
        let big = "x".repeat(1500);
        let out: String = (0..100).map(|i| line(i, &big) + "\n").collect();
        let v = entries(out.as_bytes(), &[]);
        let kept = v["entries"].as_array().unwrap();
        assert!(kept.len() < 100 && v["dropped"].as_u64().unwrap() as usize + kept.len() == 100);
        assert!(kept.last().unwrap()["message"].as_str().unwrap().ends_with(" 99"), "the newest are kept");
        assert!(serde_json::to_vec(&v).unwrap().len() < 48 * 1024);
        // Binary messages, long messages, garbage lines.
        let out = format!("{}\nnot json\n{{\"MESSAGE\":[104,105,255]}}\n", line(0, &"y".repeat(3000)));
        let v = entries(out.as_bytes(), &[]);
        assert!(v["entries"][0]["message"].as_str().unwrap().ends_with('…'));
        assert_eq!(v["entries"][1]["message"], "hi\u{fffd}");
    }
}
